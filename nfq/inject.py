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

A TCP packet longer than the link's MTU (a GSO super-packet the native queue
binding handed over whole, kept to be sent again: a client segment held while
its endpoint moved) is cut into segments that fit, as the kernel's GSO would
have (:func:`split_tcp`): a raw socket sends a datagram as it is given, and one
over the MTU with DF set would be refused.
"""

from __future__ import annotations

import socket
import struct

from .checksum import checksum, tcp_checksum

INJECT_MARK = 0x4150
MTU = 1500
_FIN, _PSH = 0x01, 0x08


def split_tcp(packet: bytes | bytearray, mtu: int = MTU) -> list[bytes]:
    """``packet`` (IPv4 or IPv6, TCP) as segments of at most ``mtu`` bytes: the headers copied,
    the payload cut, each segment's sequence number, length, IPv4 identification and checksums
    set; FIN and PSH only on the last.  A packet that fits is returned as it is."""
    if len(packet) <= mtu:
        return [bytes(packet)]
    from .packet import PacketView

    pv = PacketView(bytearray(packet))  # raises MalformedPacket on anything it cannot parse
    l4 = pv.ihl
    hdr = l4 + ((packet[l4 + 12] >> 4) * 4)
    mss = mtu - hdr
    if mss <= 0:
        return [bytes(packet)]
    payload = bytes(packet[hdr:])
    seq = pv.seq
    out = []
    for i, start in enumerate(range(0, len(payload), mss)):
        chunk = payload[start:start + mss]
        h = bytearray(packet[:hdr])
        if start + mss < len(payload):
            h[l4 + 13] &= ~(_FIN | _PSH) & 0xFF
        struct.pack_into("!I", h, l4 + 4, (seq + start) & 0xFFFFFFFF)
        if pv.version == 4:
            struct.pack_into("!HH", h, 2, hdr + len(chunk), (struct.unpack_from("!H", packet, 4)[0] + i) & 0xFFFF)
            struct.pack_into("!H", h, 10, 0)
            struct.pack_into("!H", h, 10, checksum(h[:l4]))
            src, dst = bytes(h[12:16]), bytes(h[16:20])
        else:
            struct.pack_into("!H", h, 4, hdr - 40 + len(chunk))
            src, dst = bytes(h[8:24]), bytes(h[24:40])
        struct.pack_into("!H", h, l4 + 16, 0)
        struct.pack_into("!H", h, l4 + 16, tcp_checksum(src, dst, bytes(h[l4:]) + chunk))
        out.append(bytes(h) + chunk)
    return out
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
            for seg in split_tcp(packet) if len(packet) > MTU else (packet,):
                sock.sendto(seg, (dst, 0) if version == 4 else (dst, 0, 0, 0))
                self.sent += 1
        except Exception as exc:  # no route, buffer full, no IPv6 here, unparsable: the peer retransmits
            self.errors += 1
            self.last_error = f"{dst}: {getattr(exc, 'strerror', None) or exc}"

    def close(self) -> None:
        self.sock.close()
        if self.sock6 is not None:
            self.sock6.close()
