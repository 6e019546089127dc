"""Internet checksums: full (RFC 1071) and incremental (RFC 1624).

The hot path never recomputes a checksum over a packet: a field change of m to
m' turns checksum HC into HC' = ~(~HC + ~m + m') (RFC 1624 eqn. 3), a few
integer operations whatever the packet's size.
"""

from __future__ import annotations

import array
import struct
import sys

_WORDS8 = struct.Struct("!8H")


def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def update16(csum: int, old: int, new: int) -> int:
    """Checksum after a 16-bit word changed from ``old`` to ``new``."""
    s = (~csum & 0xFFFF) + (~old & 0xFFFF) + (new & 0xFFFF)
    return ~_fold(s) & 0xFFFF


def update32(csum: int, old: int, new: int) -> int:
    """Checksum after a 32-bit field (two words) changed from ``old`` to ``new``."""
    s = (
        (~csum & 0xFFFF)
        + (~(old >> 16) & 0xFFFF)
        + (~old & 0xFFFF)
        + ((new >> 16) & 0xFFFF)
        + (new & 0xFFFF)
    )
    return ~_fold(s) & 0xFFFF


def update_words(csum: int, old: bytes, new: bytes) -> int:
    """Checksum after an even-length field (an IPv6 address: eight words) changed from ``old``
    to ``new`` (same length): eqn. 3 with one ``~m + m'`` per word (``~m`` is ``0xFFFF - m``)."""
    words = _WORDS8 if len(old) == 16 else struct.Struct(f"!{len(old) // 2}H")
    s = (~csum & 0xFFFF) + 0xFFFF * (len(old) // 2) - sum(words.unpack(old)) + sum(words.unpack(new))
    return ~_fold(s) & 0xFFFF


_LITTLE = sys.byteorder == "little"


def checksum(data: bytes | bytearray | memoryview) -> int:
    """Full Internet checksum of ``data`` (odd length padded with a zero byte)."""
    b = bytes(data)
    if len(b) % 2:
        b += b"\0"
    # the sum of the words in the machine's order, folded, then swapped back: the one's
    # complement sum does not depend on byte order (RFC 1071 section 2(B)); ~100x a loop here
    s = _fold(sum(array.array("H", b)))
    if _LITTLE:
        s = ((s & 0xFF) << 8) | (s >> 8)
    return ~s & 0xFFFF


def tcp_checksum(src: bytes, dst: bytes, tcp: bytes | bytearray | memoryview) -> int:
    """TCP checksum over the pseudo-header and ``tcp`` (checksum field as found): the IPv4 one
    (RFC 793) for 4-byte addresses, the IPv6 one (RFC 8200 section 8.1: 32-bit length, three zero
    bytes, next header) for 16-byte ones."""
    if len(src) == 16:
        pseudo = src + dst + len(tcp).to_bytes(4, "big") + bytes((0, 0, 0, 6))
    else:
        pseudo = src + dst + bytes((0, 6)) + len(tcp).to_bytes(2, "big")
    return checksum(pseudo + bytes(tcp))
