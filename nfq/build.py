"""Build IPv4/TCP and IPv6/TCP packets for the gateway to send (SYNs, ACKs,
replayed data, RSTs): ``struct`` for the headers, a vectorised Internet
checksum.  The family is the addresses' (``":"`` in an IPv6 one); an IPv6
packet has no extension header, flow label 0, traffic class 0, hop limit
``ttl``, and its TCP checksum covers the IPv6 pseudo-header (RFC 8200 8.1).

Options are laid out the way Linux lays them out, so the backends see
ordinary segments: on a SYN ``MSS, SACK-permitted, TS, NOP, WScale`` (the
SACK-permitted and TS options packed as Linux does); otherwise ``NOP, NOP,
TS``.
"""

from __future__ import annotations

import socket
import struct
import sys
from array import array

_BIG = sys.byteorder == "big"


def inet_checksum(data: bytes) -> int:
    """RFC 1071 checksum, summing 16-bit words in native order (fast)."""
    if len(data) % 2:
        data += b"\0"
    a = array("H", data)
    s = sum(a)
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    s = ~s & 0xFFFF
    if not _BIG:
        s = ((s & 0xFF) << 8) | (s >> 8)
    return s


def tcp_options(*, mss: int | None = None, wscale: int | None = None, sack_permitted: bool = False,
                tsval: int | None = None, tsecr: int | None = None, syn: bool = False) -> bytes:
    o = b""
    if syn:
        if mss is not None:
            o += struct.pack("!BBH", 2, 4, mss)
        if sack_permitted and tsval is not None:
            o += struct.pack("!BBBBII", 4, 2, 8, 10, tsval, tsecr or 0)
        else:
            if sack_permitted:
                o += b"\x01\x01\x04\x02"
            if tsval is not None:
                o += struct.pack("!BBBBII", 1, 1, 8, 10, tsval, tsecr or 0)
        if wscale is not None:
            o += struct.pack("!BBBB", 1, 3, 3, wscale)
    elif tsval is not None:
        o += struct.pack("!BBBBII", 1, 1, 8, 10, tsval, tsecr or 0)
    while len(o) % 4:
        o += b"\x01"
    return o


def tcp_packet(src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: int, window: int,
               options: bytes = b"", payload: bytes = b"", ttl: int = 64, ident: int = 0) -> bytes:
    """One TCP segment with its IP header: IPv4 (DF set, id ``ident``) or, for IPv6 addresses,
    IPv6 (hop limit ``ttl``; ``ident`` unused).  Both addresses must be of one family."""
    v6 = ":" in src
    if v6 != (":" in dst):
        raise ValueError(f"addresses of two families: {src} and {dst}")
    if v6:
        s, d = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
    else:
        s, d = socket.inet_aton(src), socket.inet_aton(dst)
    thl = 20 + len(options)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, (thl // 4) << 4,
                      flags, min(window, 0xFFFF), 0, 0) + options + payload
    if v6:
        pseudo = s + d + struct.pack("!IBBBB", len(tcp), 0, 0, 0, 6)
        csum = inet_checksum(pseudo + tcp)
        tcp = tcp[:16] + struct.pack("!H", csum) + tcp[18:]
        return struct.pack("!IHBB16s16s", 0x60000000, len(tcp), 6, ttl, s, d) + tcp
    pseudo = s + d + struct.pack("!BBH", 0, 6, len(tcp))
    csum = inet_checksum(pseudo + tcp)
    tcp = tcp[:16] + struct.pack("!H", csum) + tcp[18:]
    total = 20 + len(tcp)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, ident & 0xFFFF, 0x4000, ttl, 6, 0, s, d)
    ip = ip[:10] + struct.pack("!H", inet_checksum(ip)) + ip[12:]
    return ip + tcp
