"""checkpoint.resurrect: tcpcp 6.1's rules for a checkpoint behind the wire, with crafted segments."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpoint.ici import ConnectionRecord
from checkpoint.resurrect import (
    AbsorbedAck, absorb_ack, bytes_since, check_resumable, estimate_bytes_since, estimate_tsval, rebased,
)
from checkpoint.segment import ACK, PSH, RST
from checkpoint.seqnum import MASK, seq_add, seq_diff, seq_le
from checkpoint.splice import Phase
from checkpoint.tracker import observe

from ._helpers import cseg, handshake, make_record, sseg
from .test_splice import ACKED, MSS, REGEN, RESPONSE, SENT, Net, converse

PROP = settings(max_examples=300, deadline=None)
CISN, SISN = 1000, 5000
C0, S0 = CISN + 1, SISN + 1


def conversation(s_ts0: int = 7000, seconds: float = 10.0) -> ConnectionRecord:
    """Handshake at t=0, the server sending 1000 bytes a second for ``seconds``
    (TSval at 1000 Hz), the client acknowledging each."""
    rec = make_record(now=0.0)
    handshake(rec, CISN, SISN, now=0.0, s_ts=s_ts0)
    for i in range(1, int(seconds) + 1):
        observe(rec, sseg(S0 + (i - 1) * 1000, C0, ACK | PSH, b"x" * 1000, tsval=(s_ts0 + 1000 * i) & MASK,
                          tsecr=101), False, float(i))
        observe(rec, cseg(C0, S0 + i * 1000, ACK, tsval=101 + i, tsecr=(s_ts0 + 1000 * i) & MASK), True, float(i))
    return rec


# ----- absorb_ack ---------------------------------------------------------------------------

def test_ack_above_snd_nxt_is_absorbed_not_refused():
    assert absorb_ack(5000, 4000) == AbsorbedAck(4000, 1000)
    assert absorb_ack(4000, 4000) == AbsorbedAck(4000, 0)
    assert absorb_ack(3000, 4000) == AbsorbedAck(3000, 0)  # an old ACK: passed on as it is
    # across the wrap: snd_nxt just below 2**32, the ACK just past 0
    assert absorb_ack(100, MASK - 99) == AbsorbedAck(MASK - 99, 200)
    assert absorb_ack(MASK - 199, MASK - 99) == AbsorbedAck(MASK - 199, 0)


@PROP
@given(snd_nxt=st.integers(0, MASK), d=st.integers(-(2**31) + 1, 2**31 - 1))
def test_absorbed_ack_never_above_snd_nxt(snd_nxt, d):
    ack = (snd_nxt + d) & MASK
    a = absorb_ack(ack, snd_nxt)
    assert seq_le(a.ack, snd_nxt)
    assert a.ahead == max(d, 0)
    assert seq_add(a.ack, a.ahead) == ack


def test_resumed_sender_absorbs_a_client_ack_above_its_snd_nxt():
    """The checkpoint is behind the wire: after it, the old primary sent 20 more segments,
    which the client received and acknowledged.  The backup (the resumed sender) is far
    behind that.  The client's ACK above the backup's snd_nxt is clamped, not refused; no
    reset; the backup never sees an ACK above what it sent (its model asserts that), its
    output the client already has is skipped, and the download completes."""
    conv = converse()  # the checkpoint: SENT bytes sent, ACKED acknowledged
    ahead = SENT + 20 * MSS
    assert ahead < len(RESPONSE)
    net = Net(conv, client_has=ahead)  # ... but the client holds more than the checkpoint knows
    sp = net.sp
    net.run(until=lambda: sp.phase is Phase.SPLICED and sp.verifier.end >= 10 * MSS)
    top = seq_add(net.backup.base, sp.b_high)
    assert seq_diff(top, net.backup.base) < ahead
    # a crafted client segment: data, acknowledging everything it holds
    seg = cseg(net.client.seq, conv.s_base + ahead, ACK | PSH, b"GET /next HTTP/1.1\r\n\r\n", window=502,
               tsval=conv.c_ts(net.now), tsecr=net.client.ts_seen)
    n = sp.stats["acks_clamped"]
    d = net.from_client(seg)
    assert d.forward and d.rewrite.ack == top  # clamped to the backup's snd_nxt (I6)
    assert sp.stats["acks_clamped"] == n + 1 and sp.client_acked == ahead
    assert not any(o.flags & RST for o in d.inject) and sp.phase is Phase.SPLICED
    # a pure ACK above it as well: absorbed (nothing new for the backup), no reset
    d = net.from_client(net.client.ack(net.now))
    assert not any(o.flags & RST for o in d.inject) and sp.active
    net.run()
    assert net.done() and sp.phase is Phase.SPLICED and sp.reason is None
    assert bytes(net.client.stream.data) == RESPONSE[:ahead] + REGEN[ahead:]
    assert not any(p.flags & RST for p in net.client.rx + net.backup.got)
    # the backup's bytes the client already had (up to `ahead`) were never sent to it again
    assert all(seq_diff(f.seq, conv.s_base) + len(f.payload) > ahead for _, f in net.forwarded)
    assert sp.stats["suppressed_bytes"] >= ahead - ACKED


# ----- check_resumable: age -------------------------------------------------------------------

def test_fresh_checkpoint_is_resumable():
    rec = conversation()
    assert check_resumable(rec, checkpoint_time=10.0, now=12.0) is None
    assert check_resumable(rec, checkpoint_time=10.0, now=130.0) is None  # exactly the MSL


def test_checkpoint_older_than_the_msl_is_refused():
    rec = conversation()
    assert check_resumable(rec, 10.0, 140.2) == "checkpoint is 130.2 s old, over the MSL of 120 s"
    assert check_resumable(rec, 10.0, 140.2, msl=200.0) is None
    assert check_resumable(rec, 10.0, 40.0, msl=20.0) == "checkpoint is 30.0 s old, over the MSL of 20 s"


def test_checkpoint_from_the_future_is_refused():
    rec = conversation()
    assert "in the future" in check_resumable(rec, 100.0, 90.0)
    assert check_resumable(rec, 100.0, 99.5) is None  # within the tolerance of a clock step


# ----- check_resumable and bytes_since: 2**31 bytes -------------------------------------------

def fast_sender() -> ConnectionRecord:
    """A server that sent 2**30 bytes in the 10 s of the connection's life (crafted: no
    single segment may jump that far, so the record is set as the tracker would leave it)."""
    rec = conversation()
    s = rec.server
    s.data_high = s.next_seq = seq_add(S0, 1 << 30)
    return rec


def test_two_to_the_31_bytes_estimated_from_the_byte_rate():
    rec = fast_sender()
    assert rec.server.bytes == 1 << 30 and rec.last_seen - rec.created == 10.0
    assert estimate_bytes_since(rec, rec.server, 15.0) == pytest.approx(1.5 * 2**30)
    assert check_resumable(rec, 10.0, 25.0) is None            # 15 s: about 1.6e9 < 2**31
    reason = check_resumable(rec, 10.0, 30.0)                  # 20 s: 2**31 exactly
    assert reason is not None and reason.startswith("the server may have sent 2**31 bytes or more")
    assert "2.15e+09" in reason and "20.0 s" in reason
    # the client sent almost nothing: it is never the reason
    assert estimate_bytes_since(rec, rec.client, 100.0) == 0.0


def test_exact_progress_replaces_the_estimate():
    rec = fast_sender()
    s = rec.server
    # a server segment seen after the resume, 5000 bytes past the checkpoint: exact, fine
    assert check_resumable(rec, 10.0, 30.0, server_seq=seq_add(s.next_seq, 5000)) is None
    # one 2**31 + 5 past it looks 2**31 - 5 *behind*: it cannot be told apart, refused
    reason = check_resumable(rec, 10.0, 11.0, server_seq=seq_add(s.next_seq, 2**31 + 5))
    assert reason is not None and "cannot be told apart modulo 2**32" in reason


def test_bytes_since():
    rec = conversation()
    s = rec.server
    nxt = s.next_seq
    assert bytes_since(s, seq_add(nxt, 1448)) == 1448
    assert bytes_since(s, nxt) == 0
    assert bytes_since(s, seq_add(nxt, -1000)) == -1000            # a retransmission of old data
    assert bytes_since(s, seq_add(nxt, 2**31 - 1)) == 2**31 - 1    # the furthest that can be told
    assert bytes_since(s, seq_add(nxt, 2**31)) is None             # exactly half the space: ambiguous
    assert bytes_since(s, seq_add(nxt, 2**31 + 5)) is None         # looks behind by more than any window
    assert bytes_since(s, seq_add(nxt, -(2**30))) == -(2**30)      # behind by the largest window: still old data
    assert bytes_since(s, seq_add(nxt, -(2**30) - 1)) is None
    # across the wrap of the sequence space
    s.next_seq = MASK - 10
    assert bytes_since(s, 100) == 111
    assert bytes_since(make_record().server, 5) is None  # nothing known to measure from


# ----- estimate_tsval ---------------------------------------------------------------------------

def test_tsval_estimate_with_a_known_rate():
    rec = conversation()
    s = rec.server
    assert s.ts_last == (10.0, 17000) and s.tick_rate == pytest.approx(1000.0)
    # 10 s after it was seen: 10 s at 1000 Hz times the margin of 1.25
    assert estimate_tsval(s, checkpoint_time_mono=10.0, now=20.0) == 17000 + 12500
    assert estimate_tsval(s, 10.0, 20.0, margin=1.0) == 17000 + 10000
    # the ticks count from when the TSval was seen, not from the (later) checkpoint
    assert estimate_tsval(s, checkpoint_time_mono=15.0, now=20.0) == 17000 + 12500
    # ... or from the checkpoint if its time is earlier (a sample time that cannot be right)
    assert estimate_tsval(s, checkpoint_time_mono=8.0, now=20.0) == 17000 + 15000
    assert estimate_tsval(s, 10.0, 9.0) == 17000  # no time elapsed: never below the last TSval


def test_tsval_estimate_slow_clock():
    rec = make_record()
    handshake(rec, CISN, SISN, now=0.0, s_ts=500)
    observe(rec, sseg(S0, C0, ACK, b"x", tsval=600, tsecr=101), False, 1.0)  # 100 Hz
    assert rec.server.tick_rate == pytest.approx(100.0)
    assert estimate_tsval(rec.server, 1.0, 11.0) == 600 + 1250


def test_tsval_estimate_with_an_unknown_rate_uses_1000_hz():
    rec = make_record()
    handshake(rec, CISN, SISN, now=0.0, s_ts=7000)  # one sample: no rate yet
    assert rec.server.tick_rate is None and rec.server.tsval == 7000
    assert estimate_tsval(rec.server, 0.0, 10.0) == 7000 + 10000
    assert estimate_tsval(rec.server, 0.0, 10.0004) == 7000 + 10001  # rounded up
    rec.server.ts_first = rec.server.ts_last = None  # no sample time either: from the checkpoint
    assert estimate_tsval(rec.server, 4.0, 10.0) == 7000 + 6000
    assert estimate_tsval(make_record().server, 0.0, 10.0) is None  # no timestamps


def test_tsval_estimate_wraps():
    rec = conversation(s_ts0=MASK - 12_000)  # the last TSval seen is MASK - 2000
    s = rec.server
    assert s.tsval == MASK - 2000 and s.tick_rate == pytest.approx(1000.0)
    est = estimate_tsval(s, 10.0, 20.0)
    assert est == 12500 - 2000 - 1  # past 0
    assert seq_diff(est, s.tsval) == 12500  # ahead, in the peer's modulo-2**32 view


@PROP
@given(ts=st.integers(0, MASK), rate=st.none() | st.floats(0.0, 5000.0), elapsed=st.floats(0.0, 120.0),
       margin=st.floats(1.0, 2.0))
def test_tsval_estimate_never_below_the_truth(ts, rate, elapsed, margin):
    """For any clock within RFC 7323's 1..1000 Hz observed at its true rate, over up to
    an MSL: the estimate is ahead of (or at) the peer's real TSval, never behind."""
    rec = make_record()
    s = rec.server
    s.tsval = ts
    s.ts_last = (100.0, ts)
    if rate is not None:
        s.ts_first = (100.0 - 10.0, (ts - int(rate * 10.0)) & MASK)
    else:
        s.ts_first = s.ts_last
    est = estimate_tsval(s, 100.0, 100.0 + elapsed, margin)
    true_rate = s.tick_rate if rate is not None else 1000.0  # unknown: any clock up to the fastest
    if true_rate is not None and 1.0 <= true_rate <= 1000.0:
        truth = int(elapsed * true_rate)
        assert seq_diff(est, ts) >= truth
    assert 0 <= seq_diff(est, ts) <= 5000 * 2.0 * 120.0 + 1


# ----- rebasing onto this clock -------------------------------------------------------------------

def test_rebased_moves_every_time_and_nothing_else():
    rec = conversation()
    moved = rebased(rec, 1000.0)
    assert (moved.created, moved.last_seen) == (1000.0, 1010.0)
    assert moved.server.ts_last == (1010.0, 17000) and moved.server.ts_first == (1000.0, 7000)
    assert moved.server.tick_rate == rec.server.tick_rate and moved.server.next_seq == rec.server.next_seq
    assert rec.created == 0.0  # the original is untouched
    assert estimate_tsval(moved.server, 1010.0, 1020.0) == estimate_tsval(rec.server, 10.0, 20.0)
    assert check_resumable(moved, 1010.0, 1140.5) == check_resumable(rec, 10.0, 140.5)
