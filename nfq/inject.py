"""Sending packets the gateway built: raw sockets that take the IP header as given.

IPv4 goes through an ``AF_INET`` raw socket with ``IP_HDRINCL``; IPv6 through
an ``AF_INET6, SOCK_RAW, IPPROTO_RAW`` socket (Linux includes the header for
that protocol), opened at the first IPv6 packet, so a host without IPv6 runs
an IPv4 gateway as before.  :meth:`Injector.send` picks the socket by the
packet's version nibble and addresses ``sendto`` to the packet's destination
(bytes 16:20 of IPv4, 24:40 of IPv6).

Injected packets carry ``SO_MARK`` :data:`INJECT_MARK`; the appliance's
rules return them untouched before any queue rule and mark them NOTRACK, so
the gateway never queues or conntracks its own packets.  The kernel routes
each by its destination; the source may be any address (the client's, the
VIP), which is what replay and fencing need.  A failed send (no route, a full
buffer, no IPv6 on the host) is counted, never raised: the peer retransmits.
"""

from __future__ import annotations

import socket

INJECT_MARK = 0x4150
SO_MARK = getattr(socket, "SO_MARK", 36)


class Injector:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_MARK, INJECT_MARK)
        self.sock6: socket.socket | None = None  # opened at the first IPv6 packet
        self.sent = 0
        self.errors = 0
        self.last_error: str | None = None

    def _open6(self) -> socket.socket:
        s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, INJECT_MARK)
        except OSError:
            s.close()
            raise
        self.sock6 = s
        return s

    def send(self, packet: bytes | bytearray) -> None:
        version = packet[0] >> 4 if packet else 0
        sock: socket.socket | None
        if version == 4 and len(packet) >= 20:
            sock, dst = self.sock, socket.inet_ntoa(packet[16:20])
        elif version == 6 and len(packet) >= 40:
            sock, dst = self.sock6, socket.inet_ntop(socket.AF_INET6, packet[24:40])
        else:  # a bug upstream: counted, not raised
            self.errors += 1
            self.last_error = f"not an IP packet (version {version}, {len(packet)} bytes)"
            return
        try:
            if sock is None:
                sock = self._open6()
            sock.sendto(packet, (dst, 0) if version == 4 else (dst, 0, 0, 0))
            self.sent += 1
        except OSError as exc:  # no route, buffer full, no IPv6 here: the peer retransmits
            self.errors += 1
            self.last_error = f"{dst}: {exc.strerror or exc}"

    def close(self) -> None:
        self.sock.close()
        if self.sock6 is not None:
            self.sock6.close()
