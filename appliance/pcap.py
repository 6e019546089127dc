"""A small pcap reader (struct only): fast enough for captures of 100 MiB
downloads, used by the benchmarks and the tests' transparency checker."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path


def packets(pcap: Path | str) -> Iterator[tuple[float, bytes]]:
    """(timestamp, IPv4 packet bytes) from a pcap file (Ethernet, Linux cooked or raw IP)."""
    with open(pcap, "rb") as f:
        head = f.read(24)
        if len(head) < 24:
            return
        magic = struct.unpack("<I", head[:4])[0]
        endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
        nano = magic in (0xA1B23C4D, 0x4D3CB2A1)
        link = struct.unpack(endian + "I", head[20:24])[0]
        skip = 14 if link == 1 else 16 if link == 113 else 0
        rec = struct.Struct(endian + "IIII")
        while True:
            h = f.read(16)
            if len(h) < 16:
                return
            sec, frac, incl, _ = rec.unpack(h)
            data = f.read(incl)
            if skip == 14 and data[12:14] != b"\x08\x00":
                continue
            yield sec + frac / (1e9 if nano else 1e6), data[skip:]


def tcp_fields(p: bytes) -> tuple[bytes, bytes, int, int, int, int, int, int] | None:
    """(src, dst, sport, dport, seq, ack, flags, payload length) of an IPv4/TCP packet."""
    if len(p) < 40 or p[9] != 6:
        return None
    ihl = (p[0] & 15) * 4
    total = struct.unpack_from("!H", p, 2)[0]
    sport, dport, seq, ack = struct.unpack_from("!HHII", p, ihl)
    thl = (p[ihl + 12] >> 4) * 4
    return p[12:16], p[16:20], sport, dport, seq, ack, p[ihl + 13], total - ihl - thl
