"""A small pcap reader (struct only): fast enough for captures of 100 MiB
downloads, used by the benchmarks and the tests' transparency checker.

Both families: :func:`packets` yields the IP packets of a capture whatever its
link type (Ethernet, Linux cooked v1 and v2, raw IP of either family), and
:func:`tcp_fields` reads IPv4 and IPv6 TCP headers (addresses of 4 or 16
bytes; IPv6 extension headers walked by :func:`nfq.packet.ipv6_tcp_offset`'s
rules).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

from nfq.packet import MalformedPacket, ipv6_tcp_offset

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101          # IPv4 or IPv6, by the version nibble (what the appliance writes)
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276
_IP_ETHERTYPES = (b"\x08\x00", b"\x86\xdd")


def packets(pcap: Path | str) -> Iterator[tuple[float, bytes]]:
    """(timestamp, IP packet bytes) from a pcap file (Ethernet, Linux cooked or raw IP);
    IPv4 and IPv6 packets, nothing else (ARP, neighbour discovery's link layer)."""
    with open(pcap, "rb") as f:
        head = f.read(24)
        if len(head) < 24:
            return
        magic = struct.unpack("<I", head[:4])[0]
        endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
        nano = magic in (0xA1B23C4D, 0x4D3CB2A1)
        link = struct.unpack(endian + "I", head[20:24])[0]
        # (bytes of link header, offset of the EtherType in it, or -1: raw IP)
        skip, proto = {LINKTYPE_ETHERNET: (14, 12), LINKTYPE_LINUX_SLL: (16, 14),
                       LINKTYPE_LINUX_SLL2: (20, 0)}.get(link, (0, -1))
        rec = struct.Struct(endian + "IIII")
        while True:
            h = f.read(16)
            if len(h) < 16:
                return
            sec, frac, incl, _ = rec.unpack(h)
            data = f.read(incl)
            if proto >= 0 and data[proto:proto + 2] not in _IP_ETHERTYPES:
                continue
            yield sec + frac / (1e9 if nano else 1e6), data[skip:]


def tcp_fields(p: bytes) -> tuple[bytes, bytes, int, int, int, int, int, int] | None:
    """(src, dst, sport, dport, seq, ack, flags, payload length) of an IPv4/TCP or IPv6/TCP
    packet (addresses as 4 or 16 bytes); None for anything else, or too little captured."""
    n = len(p)
    if n < 40:
        return None
    version = p[0] >> 4
    if version == 4:
        if p[9] != 6:
            return None
        ihl = (p[0] & 15) * 4
        total = struct.unpack_from("!H", p, 2)[0]
        src, dst = p[12:16], p[16:20]
    elif version == 6:
        total = 40 + struct.unpack_from("!H", p, 4)[0]
        try:
            ihl = ipv6_tcp_offset(p, n, total)
        except MalformedPacket:
            return None
        src, dst = p[8:24], p[24:40]
    else:
        return None
    if n < ihl + 20:
        return None
    sport, dport, seq, ack = struct.unpack_from("!HHII", p, ihl)
    thl = (p[ihl + 12] >> 4) * 4
    return src, dst, sport, dport, seq, ack, p[ihl + 13], total - ihl - thl
