"""checkpoint.translate: the client-view <-> backend sequence/clock translation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpoint.seqnum import HALF, MASK, seq_diff
from checkpoint.translate import Translation, choose_ts_delta

# values near the wrap are where the bugs live
u32 = st.one_of(
    st.integers(0, MASK),
    st.integers(MASK - 4096, MASK),
    st.integers(0, 4096),
    st.integers(HALF - 4096, HALF + 4096),
)
wscale = st.integers(0, 14)
blocks = st.lists(st.tuples(u32, u32), min_size=0, max_size=4).map(tuple)

PROP = settings(max_examples=200, deadline=None)


def tr_strategy():
    return st.builds(Translation, seq_delta=u32, ts_delta=u32, backend_wscale=wscale, client_view_wscale=wscale)


# ----- exact inverses ------------------------------------------------------------------

@PROP
@given(tr=tr_strategy(), x=u32)
def test_seq_round_trip(tr, x):
    c = tr.seq_to_client(x)
    assert 0 <= c <= MASK
    assert tr.seq_to_backend(c) == x
    assert tr.seq_to_client(tr.seq_to_backend(x)) == x
    # the translation is a rotation of the circle: distances are preserved
    assert seq_diff(tr.seq_to_client(x), tr.seq_to_client((x + 1000) & MASK)) == -1000


@PROP
@given(tr=tr_strategy(), x=u32)
def test_ack_round_trip(tr, x):
    b = tr.ack_to_backend(x)
    assert 0 <= b <= MASK
    assert tr.ack_to_client(b) == x
    assert tr.ack_to_backend(tr.ack_to_client(x)) == x
    # an ack of a backend sequence number, translated, names the same byte
    assert tr.ack_to_backend(tr.seq_to_client(x)) == x


@PROP
@given(tr=tr_strategy(), v=u32)
def test_timestamp_round_trips(tr, v):
    assert tr.tsval_to_backend(tr.tsval_to_client(v)) == v
    assert tr.tsval_to_client(tr.tsval_to_backend(v)) == v
    assert tr.tsecr_to_client(tr.tsecr_to_backend(v)) == v
    assert tr.tsecr_to_backend(tr.tsecr_to_client(v)) == v
    # the client echoing a translated TSval gives the backend its own value back
    assert tr.tsecr_to_backend(tr.tsval_to_client(v)) == v
    assert 0 <= tr.tsval_to_client(v) <= MASK and 0 <= tr.tsecr_to_backend(v) <= MASK


@PROP
@given(tr=tr_strategy(), b=blocks)
def test_sack_round_trip(tr, b):
    back = tr.sack_to_backend(b)
    assert isinstance(back, tuple) and len(back) == len(b)
    assert tr.sack_to_client(back) == b
    assert tr.sack_to_backend(tr.sack_to_client(b)) == b
    assert back == tuple((tr.ack_to_backend(left), tr.ack_to_backend(right)) for left, right in b)


def test_wrap_examples():
    tr = Translation(seq_delta=0x100, ts_delta=0x10)
    assert tr.seq_to_client(MASK - 0x7F) == 0x80
    assert tr.seq_to_backend(0x80) == MASK - 0x7F
    assert tr.ack_to_backend(0x10) == MASK - 0xEF
    assert tr.tsval_to_client(MASK) == 0xF
    assert tr.tsecr_to_backend(0x5) == MASK - 0xA
    assert tr.sack_to_backend(((0x10, 0x20),)) == ((MASK - 0xEF, MASK - 0xDF),)


# ----- window --------------------------------------------------------------------------

@PROP
@given(raw=st.integers(0, 0xFFFF), bw=wscale, cw=wscale)
def test_window_never_overstates(raw, bw, cw):
    tr = Translation(0, 0, backend_wscale=bw, client_view_wscale=cw)
    w = tr.window_to_client(raw)
    assert 0 <= w <= 0xFFFF
    offered = raw << bw
    believed = w << cw
    assert believed <= offered
    # ... and it is as large as it may be: one more unit would overstate (or not fit)
    assert w == 0xFFFF or (w + 1) << cw > offered


@pytest.mark.parametrize("raw,bw,cw,want", [
    (1000, 7, 9, 250),       # 128000 bytes in units of 512
    (1001, 0, 2, 250),       # rounded down
    (3, 0, 2, 0),            # less than one unit: zero, never one
    (0xFFFF, 14, 0, 0xFFFF),  # does not fit the field: capped
    (0xFFFF, 0, 0, 0xFFFF),
    (502, 7, 7, 502),
])
def test_window_examples(raw, bw, cw, want):
    assert Translation(0, 0, bw, cw).window_to_client(raw) == want


# ----- choose_ts_delta -----------------------------------------------------------------

def _first_ticks(last_seen, elapsed, rate, backend_tsval):
    delta = choose_ts_delta(last_seen, elapsed, rate, backend_tsval)
    first = Translation(0, delta).tsval_to_client(backend_tsval)
    return (first - last_seen) & MASK


@PROP
@given(last=u32, backend=u32, elapsed=st.floats(0, 3600, allow_nan=False),
       rate=st.one_of(st.none(), st.floats(0, 5000, allow_nan=False)))
def test_ts_delta_never_goes_back(last, backend, elapsed, rate):
    ticks = _first_ticks(last, elapsed, rate, backend)
    assert ticks >= 1
    assert ticks >= elapsed * max(rate or 0.0, 1000.0)
    assert ticks >= elapsed * 1000
    # conservative, but not absurdly: at most one tick over the estimate
    assert ticks <= elapsed * max(rate or 0.0, 1000.0) + 1
    # the client sees the server clock move forward (modulo 2**32)
    assert seq_diff(Translation(0, choose_ts_delta(last, elapsed, rate, backend)).tsval_to_client(backend), last) > 0


def test_ts_delta_wraps():
    last = MASK - 5
    first = Translation(0, choose_ts_delta(last, 0.010, None, 123456)).tsval_to_client(123456)
    assert first == (last + 11) & MASK == 5          # 10 ms at 1000 Hz, + 1
    assert seq_diff(first, last) == 11
    # the backend clock wrapped instead
    first = Translation(0, choose_ts_delta(1000, 0.0, None, MASK - 1)).tsval_to_client(MASK - 1)
    assert first == 1001


def test_ts_delta_rate_floor_and_measured_rate():
    # a 100 Hz server clock: the 1000 Hz floor applies (overestimating is harmless)
    assert _first_ticks(5000, 2.0, 100.0, 77) == 2001
    # a 2000 Hz clock is used as measured
    assert _first_ticks(5000, 2.0, 2000.0, 77) == 4001
    # no estimate yet
    assert _first_ticks(5000, 2.0, None, 77) == 2001
    # no time elapsed (or a clock that went back): still one tick forward
    assert _first_ticks(5000, 0.0, 2000.0, 77) == 1
    assert _first_ticks(5000, -3.0, 2000.0, 77) == 1
