"""TCP sequence-number arithmetic, modulo 2**32 (RFC 793 section 3.3, RFC 1982).

Every comparison of sequence numbers, acknowledgment numbers and timestamps in
the project goes through these helpers: two numbers are compared by the sign of
their 32-bit difference, so ordering survives the wrap from 0xFFFFFFFF to 0.
Two numbers exactly 2**31 apart are incomparable; ``seq_diff`` then answers
-2**31 and ``seq_lt(a, b)`` is true for both orders' negation of ``seq_gt``,
which is why the tracker refuses jumps of 2**30 or more (see ``MAX_JUMP``).
"""

from __future__ import annotations

MOD = 1 << 32
MASK = MOD - 1
HALF = 1 << 31
# The tracker never advances a sequence variable by this much or more in one
# segment: a real TCP cannot have that much data in flight (the largest
# scaled window is 2**30), so such a segment is garbage, an attack, or
# belongs to another incarnation of the connection.
MAX_JUMP = 1 << 30


def seq_add(a: int, n: int) -> int:
    """``a + n`` modulo 2**32 (``n`` may be negative)."""
    return (a + n) & MASK


def seq_diff(a: int, b: int) -> int:
    """Signed distance ``a - b`` in [-2**31, 2**31)."""
    d = (a - b) & MASK
    return d - MOD if d >= HALF else d


def seq_lt(a: int, b: int) -> bool:
    return seq_diff(a, b) < 0


def seq_le(a: int, b: int) -> bool:
    return seq_diff(a, b) <= 0


def seq_gt(a: int, b: int) -> bool:
    return seq_diff(a, b) > 0


def seq_ge(a: int, b: int) -> bool:
    return seq_diff(a, b) >= 0


def seq_max(a: int, b: int) -> int:
    return a if seq_diff(a, b) >= 0 else b


def seq_min(a: int, b: int) -> int:
    return a if seq_diff(a, b) <= 0 else b


def seq_between(lo: int, x: int, hi: int) -> bool:
    """``lo <= x <= hi`` on the circle (``hi`` reached from ``lo`` going up)."""
    return ((x - lo) & MASK) <= ((hi - lo) & MASK)


def advances(old: int, new: int) -> bool:
    """True when ``new`` is ahead of ``old`` by a plausible amount (0 < d < MAX_JUMP)."""
    d = (new - old) & MASK
    return 0 < d < MAX_JUMP
