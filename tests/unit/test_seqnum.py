"""checkpoint.seqnum: modulo 2**32 sequence arithmetic."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from checkpoint.seqnum import (
    HALF, MASK, MAX_JUMP, MOD, advances, seq_add, seq_between, seq_diff, seq_ge, seq_gt, seq_le,
    seq_lt, seq_max, seq_min,
)

# Values near the wrap are where the bugs live: bias the generator towards them.
u32 = st.one_of(
    st.integers(0, MASK),
    st.integers(MASK - 4096, MASK),
    st.integers(0, 4096),
    st.integers(HALF - 4096, HALF + 4096),
)
delta = st.integers(-(HALF - 1), HALF - 1)


def test_constants():
    assert MOD == 2**32 and MASK == 2**32 - 1 and HALF == 2**31 and MAX_JUMP == 2**30


def test_wrap_examples():
    assert seq_add(0xFFFFFFFF, 1) == 0
    assert seq_add(0, -1) == 0xFFFFFFFF
    assert seq_diff(0x10, 0xFFFFFFF0) == 0x20
    assert seq_diff(0xFFFFFFF0, 0x10) == -0x20
    assert seq_lt(0xFFFFFFF0, 0x10)
    assert seq_le(0xFFFFFFF0, 0x10)
    assert seq_gt(0x10, 0xFFFFFFF0)
    assert seq_ge(0x10, 0xFFFFFFF0)
    assert not seq_lt(0x10, 0xFFFFFFF0)
    assert seq_max(0xFFFFFFF0, 0x10) == 0x10
    assert seq_min(0xFFFFFFF0, 0x10) == 0xFFFFFFF0
    # plain-integer order would say the opposite
    assert 0xFFFFFFF0 > 0x10


def test_diff_range_and_half_is_negative():
    # exactly 2**31 apart: both orders answer -2**31 (documented incomparability)
    assert seq_diff(HALF, 0) == -HALF
    assert seq_diff(0, HALF) == -HALF
    assert seq_lt(0, HALF) and seq_lt(HALF, 0)
    assert seq_diff(HALF - 1, 0) == HALF - 1


@given(u32, u32)
def test_diff_antisymmetric(a, b):
    d = seq_diff(a, b)
    assert -HALF <= d < HALF
    if d != -HALF:
        assert seq_diff(b, a) == -d
    assert seq_add(b, d) == a


@given(u32, delta)
def test_add_diff_inverse(a, n):
    b = seq_add(a, n)
    assert 0 <= b <= MASK
    assert seq_diff(b, a) == n
    assert seq_add(b, -n) == a


@given(u32, delta)
def test_ordering_consistent_with_offset(a, n):
    b = seq_add(a, n)
    assert seq_lt(a, b) == (n > 0)
    assert seq_gt(a, b) == (n < 0)
    assert seq_le(a, b) == (n >= 0)
    assert seq_ge(a, b) == (n <= 0)
    assert seq_lt(b, a) == (n < 0)
    # exactly one of <, ==, > holds
    assert [seq_lt(a, b), a == b, seq_gt(a, b)].count(True) == 1
    assert seq_max(a, b) == (b if n >= 0 else a)
    assert seq_min(a, b) == (a if n >= 0 else b)
    assert {seq_max(a, b), seq_min(a, b)} == {a, b}


@given(u32, st.integers(0, MAX_JUMP - 1), st.integers(0, MAX_JUMP - 1))
def test_ordering_transitive_within_window(a, x, y):
    b, c = seq_add(a, x), seq_add(a, x + y)
    assert seq_le(a, b) and seq_le(b, c) and seq_le(a, c)
    assert seq_max(seq_max(a, b), c) == c == seq_max(a, seq_max(c, b))
    assert seq_min(seq_min(c, b), a) == a


@given(u32, st.integers(0, MASK), st.integers(0, MASK))
def test_seq_between(lo, span, off):
    hi = seq_add(lo, span)
    x = seq_add(lo, off)
    assert seq_between(lo, x, hi) == (off <= span)
    assert seq_between(lo, lo, hi)
    assert seq_between(lo, hi, hi)


def test_seq_between_across_wrap():
    assert seq_between(0xFFFFFFF0, 0xFFFFFFFF, 0x10)
    assert seq_between(0xFFFFFFF0, 0, 0x10)
    assert seq_between(0xFFFFFFF0, 0x10, 0x10)
    assert not seq_between(0xFFFFFFF0, 0x11, 0x10)
    assert not seq_between(0xFFFFFFF0, 0xFFFFFFEF, 0x10)
    assert not seq_between(0x10, 0x5, 0x20)


@given(u32, st.integers(-MOD, MOD))
def test_advances(old, n):
    new = seq_add(old, n)
    d = n % MOD
    assert advances(old, new) == (0 < d < MAX_JUMP)


def test_advances_boundaries():
    assert not advances(5, 5)
    assert advances(5, 6)
    assert advances(0xFFFFFFFF, 0)
    assert advances(0, MAX_JUMP - 1)
    assert not advances(0, MAX_JUMP)
    assert not advances(0, HALF)
    assert not advances(6, 5)
    assert not advances(0, 0xFFFFFFFF)
