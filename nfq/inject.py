"""Sending packets the gateway built (raw IPv4 socket with IP_HDRINCL).

Injected packets carry ``SO_MARK`` :data:`INJECT_MARK`; the appliance's
iptables chain returns them untouched before any queue rule and marks them
NOTRACK, so the gateway never queues or conntracks its own packets.  The
kernel routes each by its destination; the source may be any address (the
client's, the VIP), which is what replay and fencing need.
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
        self.sent = 0
        self.errors = 0
        self.last_error: str | None = None

    def send(self, packet: bytes) -> None:
        dst = socket.inet_ntoa(packet[16:20])
        try:
            self.sock.sendto(packet, (dst, 0))
            self.sent += 1
        except OSError as exc:  # no route, buffer full: the peer retransmits
            self.errors += 1
            self.last_error = f"{dst}: {exc.strerror}"

    def close(self) -> None:
        self.sock.close()
