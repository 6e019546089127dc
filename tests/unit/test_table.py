"""checkpoint.table.ConnectionTable: admission, lookup, replacement, eviction, expiry."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpoint.ici import TcpState
from checkpoint.segment import ACK, FIN, RST, SYN, Segment
from checkpoint.table import FINISHED, OPENING, ConnectionTable, Timeouts

from ._helpers import VIP, VPORT, cseg, handshake_segments, sseg

BACKEND = {"service": "web", "backend": "b1", "backend_ip": "10.0.0.2", "backend_port": 8080}


def key(port: int) -> tuple[str, int, str, int]:
    return ("192.0.2.10", port, VIP, VPORT)


def seg_for(k, seq: int, flags: int, ack: int = 0) -> Segment:
    return Segment(k[0], k[2], k[1], k[3], seq, ack, flags)


def open_conn(t: ConnectionTable, k, now: float, cisn: int = 1000, sisn: int = 5000):
    """Admit a SYN for ``k`` and run the handshake through the table."""
    segs = handshake_segments(cisn, sisn)
    rec = t.admit(k, seg_for(k, cisn, SYN), now=now, **BACKEND)
    assert rec is not None
    for s, fc in segs:
        s.sport, s.dport = (k[1], k[3]) if fc else (k[3], k[1])
        t.observe(rec, s, fc, now)
    assert rec.state is TcpState.ESTABLISHED
    return rec


def close_rst(t, rec, now):
    t.observe(rec, seg_for(rec.key, rec.client.next_seq, RST), True, now)
    assert rec.state is TcpState.CLOSED


def close_fin(t, rec, now):
    """Drive ``rec`` through a full FIN exchange to TIME_WAIT."""
    c, s = rec.client.next_seq, rec.server.next_seq
    t.observe(rec, cseg(c, s, ACK | FIN), True, now)
    t.observe(rec, sseg(s, c + 1, ACK | FIN), False, now)
    t.observe(rec, cseg(c + 1, s + 1), True, now)
    assert rec.state is TcpState.TIME_WAIT


def test_admit_creates_records_with_incrementing_ids():
    t = ConnectionTable()
    r1 = t.admit(key(1), seg_for(key(1), 10, SYN), now=1.0, **BACKEND)
    r2 = t.admit(key(2), seg_for(key(2), 20, SYN), now=2.0, **BACKEND)
    assert (r1.id, r2.id) == (1, 2)
    assert len(t) == 2 and t.created == 2
    assert t.get(key(1)) is r1 and t.get(key(2)) is r2 and t.get(key(3)) is None
    assert t.by_id(1) is r1 and t.by_id(2) is r2 and t.by_id(3) is None
    assert r1.key == key(1) and r1.created == r1.last_seen == 1.0
    assert (r1.service, r1.backend, r1.backend_ip, r1.backend_port) == ("web", "b1", "10.0.0.2", 8080)
    assert list(t) == [r1, r2]
    # admit does not observe: the caller does
    assert r1.client.segments == 0 and r1.state is TcpState.SYN_SENT


def test_admit_existing_key_returns_same_record():
    t = ConnectionTable()
    r = open_conn(t, key(1), 0)
    assert t.admit(key(1), seg_for(key(1), 1001, ACK), now=1, **BACKEND) is r
    # even a SYN with another ISN: the live connection is not replaced
    assert t.admit(key(1), seg_for(key(1), 777, SYN), now=1, **BACKEND) is r
    assert len(t) == 1 and t.created == 1


def test_non_syn_creates_mid_stream_record():
    t = ConnectionTable()
    r = t.admit(key(1), seg_for(key(1), 50, ACK), now=0, **BACKEND)
    assert r is not None and t.get(key(1)) is r
    t.observe(r, seg_for(key(1), 50, ACK), True, 0)
    assert r.mid_stream and r.state is TcpState.ESTABLISHED


def test_new_syn_replaces_a_record_picked_up_mid_stream():
    """A leftover packet of a connection the table never saw open (an earlier appliance's, say)
    leaves a mid-stream record without a log; a new connection on the same client port must get
    a record of its own, not be folded into that one."""
    t = ConnectionTable()
    stale = t.admit(key(1), seg_for(key(1), 50, ACK), now=0, **BACKEND)
    t.observe(stale, seg_for(key(1), 50, ACK), True, 0)
    assert stale.mid_stream and stale.state is TcpState.ESTABLISHED
    new = t.admit(key(1), seg_for(key(1), 90000, SYN), now=1, **BACKEND)
    assert new is not stale and t.get(key(1)) is new and t.by_id(stale.id) is None
    t.observe(new, seg_for(key(1), 90000, SYN), True, 1)
    assert not new.mid_stream and new.client.isn == 90000 and new.state is TcpState.SYN_SENT


def test_rst_never_creates():
    t = ConnectionTable()
    assert t.admit(key(1), seg_for(key(1), 50, RST), now=0, **BACKEND) is None
    assert t.admit(key(1), seg_for(key(1), 50, RST | ACK), now=0, **BACKEND) is None
    assert len(t) == 0 and t.created == 0
    r = open_conn(t, key(1), 0)
    assert t.admit(key(1), seg_for(key(1), 1001, RST), now=1, **BACKEND) is r


@pytest.mark.parametrize("closer", [close_rst, close_fin])
def test_new_syn_replaces_finished_record(closer):
    t = ConnectionTable()
    old = open_conn(t, key(1), 0, cisn=1000)
    closer(t, old, 1)
    new = t.admit(key(1), seg_for(key(1), 90000, SYN), now=2, **BACKEND)
    assert new is not None and new is not old
    assert new.id == 2 and new.state is TcpState.SYN_SENT and new.client.isn is None
    assert t.get(key(1)) is new and t.by_id(2) is new and t.by_id(1) is None
    assert len(t) == 1 and t.created == 2


def test_syn_same_isn_on_finished_record_is_a_retransmission():
    t = ConnectionTable()
    old = open_conn(t, key(1), 0, cisn=1000)
    close_rst(t, old, 1)
    assert t.admit(key(1), seg_for(key(1), 1000, SYN), now=2, **BACKEND) is old
    # a SYN-ACK-flagged client segment is not a new SYN either
    assert t.admit(key(1), seg_for(key(1), 42, SYN | ACK), now=2, **BACKEND) is old


def test_max_connections_validation():
    with pytest.raises(ValueError):
        ConnectionTable(max_connections=0)


def test_full_table_evicts_least_recently_seen_finished_first():
    t = ConnectionTable(max_connections=3)
    a = open_conn(t, key(1), 0)
    b = open_conn(t, key(2), 1)
    c = open_conn(t, key(3), 2)
    close_rst(t, b, 3)
    close_fin(t, a, 4)  # a is finished and now more recently seen than b
    d = t.admit(key(4), seg_for(key(4), 1, SYN), now=5, **BACKEND)
    assert d is not None and t.evicted == 1
    assert t.get(key(2)) is None and t.by_id(b.id) is None  # oldest finished went
    assert t.get(key(1)) is a and t.get(key(3)) is c
    e = t.admit(key(5), seg_for(key(5), 1, SYN), now=6, **BACKEND)
    assert e is not None and t.evicted == 2 and t.get(key(1)) is None
    assert len(t) == 3 and t.refused_full == 0


def test_observe_refreshes_lru_order():
    t = ConnectionTable(max_connections=2)
    a = open_conn(t, key(1), 0)
    b = open_conn(t, key(2), 1)
    close_rst(t, a, 2)
    close_rst(t, b, 3)
    # a is touched again (a late segment), so b becomes the least recently seen
    t.observe(a, seg_for(key(1), 1001, ACK, 5001), True, 4)
    assert [r.id for r in t] == [b.id, a.id]
    assert t.admit(key(3), seg_for(key(3), 1, SYN), now=5, **BACKEND) is not None
    assert t.get(key(2)) is None and t.get(key(1)) is a


def test_full_table_of_established_refuses():
    t = ConnectionTable(max_connections=2)
    a = open_conn(t, key(1), 0)
    b = open_conn(t, key(2), 0)
    assert t.admit(key(3), seg_for(key(3), 1, SYN), now=1, **BACKEND) is None
    assert t.admit(key(4), seg_for(key(4), 1, ACK), now=1, **BACKEND) is None
    assert t.refused_full == 2 and t.evicted == 0 and len(t) == 2 and t.created == 2
    assert t.get(key(1)) is a and t.get(key(2)) is b
    # existing connections are still served while full
    assert t.admit(key(1), seg_for(key(1), 1001, ACK), now=1, **BACKEND) is a


def test_replacement_in_full_table_does_not_evict_others():
    t = ConnectionTable(max_connections=2)
    a = open_conn(t, key(1), 0)
    b = open_conn(t, key(2), 0)
    close_rst(t, a, 1)
    close_rst(t, b, 1)
    new = t.admit(key(2), seg_for(key(2), 99999, SYN), now=2, **BACKEND)
    assert new is not None and t.evicted == 0 and t.get(key(1)) is a and len(t) == 2


def test_timeouts_for_state():
    to = Timeouts(opening=1, established=2, closing=3, finished=4)
    assert [to.for_state(s) for s in TcpState] == [1, 1, 2, 3, 3, 3, 4, 4]
    assert Timeouts().for_state(TcpState.ESTABLISHED) == 3600.0


def test_expire_honours_per_state_timeouts():
    to = Timeouts(opening=5, established=100, closing=20, finished=2)
    t = ConnectionTable(timeouts=to)
    opening = t.admit(key(1), seg_for(key(1), 1, SYN), now=0, **BACKEND)
    t.observe(opening, seg_for(key(1), 1, SYN), True, 0)
    est = open_conn(t, key(2), 0)
    closing = open_conn(t, key(3), 0)
    t.observe(closing, cseg(closing.client.next_seq, closing.server.next_seq, ACK | FIN), True, 0)
    assert closing.state is TcpState.FIN_WAIT
    fin = open_conn(t, key(4), 0)
    close_rst(t, fin, 0)

    assert t.expire(1.999) == [] and len(t) == 4
    assert t.expire(2.0) == [fin]  # >= timeout expires
    assert t.expired == 1 and t.by_id(fin.id) is None
    assert t.expire(4.9) == []
    assert t.expire(5.0) == [opening]
    assert t.expire(19.9) == []
    # est is touched at 19.9: its idle time restarts
    t.observe(est, cseg(est.client.next_seq, est.server.next_seq), True, 19.9)
    assert t.expire(20.0) == [closing]
    assert t.expire(100.0) == []
    assert t.expire(119.9) == [est]
    assert len(t) == 0 and t.expired == 4


def test_expire_uses_state_at_expiry_time():
    t = ConnectionTable(timeouts=Timeouts(opening=5, established=100, closing=20, finished=2))
    r = open_conn(t, key(1), 0)
    assert t.expire(10) == []  # established: not yet
    close_rst(t, r, 10)
    assert t.expire(11.5) == [] and t.expire(12) == [r]


# --- early drop: half-open records make room when no finished one is left ----------------------

def half_open(t: ConnectionTable, k, now: float, cisn: int = 1000, synack: bool = False):
    """Admit and observe a client SYN for ``k`` (SYN_SENT), and the server's SYN-ACK
    when ``synack`` (SYN_RECV): a handshake the client never completes."""
    rec = t.admit(k, seg_for(k, cisn, SYN), now=now, **BACKEND)
    assert rec is not None
    t.observe(rec, seg_for(k, cisn, SYN), True, now)
    if synack:
        t.observe(rec, server_seg(k, 5000, SYN | ACK, cisn + 1), False, now)
        assert rec.state is TcpState.SYN_RECV
    else:
        assert rec.state is TcpState.SYN_SENT
    return rec


def server_seg(k, seq: int, flags: int, ack: int = 0) -> Segment:
    return Segment(k[2], k[0], k[3], k[1], seq, ack, flags)


def test_full_table_of_half_open_evicts_the_oldest_created():
    t = ConnectionTable(max_connections=3)
    a = half_open(t, key(1), 0)
    b = half_open(t, key(2), 1, synack=True)
    c = half_open(t, key(3), 2)
    # a's SYN is retransmitted (and b's SYN-ACK): last seen is now c, a, b, but
    # creation order decides which handshake has been pending longest
    t.observe(a, seg_for(key(1), 1000, SYN), True, 3)
    t.observe(b, server_seg(key(2), 5000, SYN | ACK, 1001), False, 4)
    d = t.admit(key(4), seg_for(key(4), 1, SYN), now=5, **BACKEND)
    assert d is not None and t.get(key(4)) is d
    assert t.get(key(1)) is None and t.by_id(a.id) is None
    assert t.get(key(2)) is b and t.get(key(3)) is c
    assert (t.early_drops, t.evicted, t.refused_full, len(t)) == (1, 0, 0, 3)
    e = t.admit(key(5), seg_for(key(5), 1, SYN), now=6, **BACKEND)
    assert e is not None and t.get(key(2)) is None  # SYN_RECV is half-open too
    assert (t.early_drops, len(t)) == (2, 3)


def test_established_and_closing_are_never_early_dropped():
    t = ConnectionTable(max_connections=3)
    est = open_conn(t, key(1), 0)
    closing = open_conn(t, key(2), 1)
    t.observe(closing, cseg(closing.client.next_seq, closing.server.next_seq, ACK | FIN), True, 1)
    assert closing.state is TcpState.FIN_WAIT
    h = half_open(t, key(3), 2)
    # a flood: each new SYN pushes out the previous half-open one, never est/closing
    for port in range(10, 20):
        r = t.admit(key(port), seg_for(key(port), port, SYN), now=3 + port, **BACKEND)
        assert r is not None
        assert t.get(key(1)) is est and t.get(key(2)) is closing
    assert t.by_id(h.id) is None and t.early_drops == 10 and t.refused_full == 0
    # the last one completes its handshake: nothing evictable is left, so refuse
    last = t.get(key(19))
    assert last is not None
    for s, fc in handshake_segments(19, 7000)[1:]:
        s.sport, s.dport = (19, VPORT) if fc else (VPORT, 19)
        t.observe(last, s, fc, 30)
    assert last.state is TcpState.ESTABLISHED
    assert t.admit(key(99), seg_for(key(99), 1, SYN), now=31, **BACKEND) is None
    assert (t.refused_full, t.early_drops, t.evicted, len(t)) == (1, 10, 0, 3)


def test_finished_are_evicted_before_half_open():
    t = ConnectionTable(max_connections=3)
    h = half_open(t, key(1), 0)  # the oldest record of all
    f = open_conn(t, key(2), 1)
    est = open_conn(t, key(3), 2)
    close_rst(t, f, 3)
    d = t.admit(key(4), seg_for(key(4), 1, SYN), now=4, **BACKEND)
    assert d is not None and t.by_id(f.id) is None and t.get(key(1)) is h
    assert (t.evicted, t.early_drops) == (1, 0)
    e = t.admit(key(5), seg_for(key(5), 1, SYN), now=5, **BACKEND)
    assert e is not None and t.by_id(h.id) is None and t.get(key(3)) is est
    assert (t.evicted, t.early_drops, len(t)) == (1, 1, 3)


def test_completed_handshake_leaves_the_half_open_index():
    t = ConnectionTable(max_connections=2)
    a = half_open(t, key(1), 0, cisn=1000)  # older, but it completes
    b = half_open(t, key(2), 1)
    for s, fc in handshake_segments(1000, 5000)[1:]:
        s.sport, s.dport = (1, VPORT) if fc else (VPORT, 1)
        t.observe(a, s, fc, 2)
    assert a.state is TcpState.ESTABLISHED
    assert t.admit(key(3), seg_for(key(3), 1, SYN), now=3, **BACKEND) is not None
    assert t.get(key(1)) is a and t.by_id(b.id) is None and t.early_drops == 1


def test_mid_stream_pickup_is_not_half_open_once_observed():
    t = ConnectionTable(max_connections=1)
    r = t.admit(key(1), seg_for(key(1), 50, ACK), now=0, **BACKEND)
    assert r is not None
    t.observe(r, seg_for(key(1), 50, ACK), True, 0)
    assert r.state is TcpState.ESTABLISHED
    assert t.admit(key(2), seg_for(key(2), 1, SYN), now=1, **BACKEND) is None
    assert t.get(key(1)) is r and t.early_drops == 0 and t.refused_full == 1


def test_restored_records_are_indexed_by_state():
    src = ConnectionTable()
    h = half_open(src, key(1), 0)
    e = open_conn(src, key(2), 0)
    f = open_conn(src, key(3), 0)
    close_rst(src, f, 0)
    t = ConnectionTable(max_connections=3)
    for rec in (e, h, f):
        assert t.restore(rec)
    assert t.admit(key(4), seg_for(key(4), 1, SYN), now=1, **BACKEND) is not None
    assert t.by_id(f.id) is None and t.evicted == 1
    assert t.admit(key(5), seg_for(key(5), 1, SYN), now=1, **BACKEND) is not None
    assert t.by_id(h.id) is None and t.early_drops == 1 and t.by_id(e.id) is e


def test_state_changed_behind_the_tables_back():
    """A caller that sets ``rec.state`` itself (the data plane resets a connection)
    does not confuse the indexes: reindex() or expire() make it evictable, and a
    half-open record that became established is not early-dropped."""
    t = ConnectionTable(max_connections=3)
    a = open_conn(t, key(1), 0)
    b = open_conn(t, key(2), 0)
    c = half_open(t, key(3), 0)
    c.established, c.state = True, TcpState.ESTABLISHED  # not through observe()
    assert t.admit(key(4), seg_for(key(4), 1, SYN), now=1, **BACKEND) is None
    assert t.early_drops == 0 and t.get(key(3)) is c
    a.state = TcpState.CLOSED
    t.reindex(a)
    assert t.admit(key(4), seg_for(key(4), 1, SYN), now=1, **BACKEND) is not None
    assert t.by_id(a.id) is None and t.evicted == 1
    t.get(key(4)).state = TcpState.ESTABLISHED  # type: ignore[union-attr]
    b.state = TcpState.TIME_WAIT
    assert t.expire(2) == []  # the scan notices b is finished
    assert t.admit(key(5), seg_for(key(5), 1, SYN), now=2, **BACKEND) is not None
    assert t.by_id(b.id) is None and t.evicted == 2
    # a half-open record reset without observe() is evicted as finished
    t2 = ConnectionTable(max_connections=1)
    h = half_open(t2, key(1), 0)
    h.state = TcpState.CLOSED
    assert t2.admit(key(2), seg_for(key(2), 1, SYN), now=1, **BACKEND) is not None
    assert (t2.evicted, t2.early_drops) == (1, 0)


def test_eviction_is_not_a_scan_per_syn():
    """65536 half-open records, then a flood of as many new SYNs, then as many
    refused against a table of established ones: a scan of the table per SYN
    would be ~4e9 steps; the indexes make it a few hundred milliseconds."""
    n = 65536
    t = ConnectionTable(max_connections=n)
    start = time.perf_counter()
    for i in range(2 * n):
        k = (f"192.0.2.{i % 250 + 1}", i // 250 + 1, VIP, VPORT)
        assert t.admit(k, seg_for(k, i, SYN), now=i, **BACKEND) is not None
    assert t.early_drops == n and len(t) == n
    for rec in t:  # all complete their handshakes (a quick stand-in for observe())
        rec.established, rec.state = True, TcpState.ESTABLISHED
        t.reindex(rec)
    for i in range(n):
        k = ("203.0.113.1", i + 1, VIP, VPORT)
        assert t.admit(k, seg_for(k, i, SYN), now=2 * n + i, **BACKEND) is None
    assert t.refused_full == n
    assert time.perf_counter() - start < 20  # generous: a scan per SYN takes hours


# --- property: bounded, and nothing established is ever evicted ------------------------------

OPS = st.lists(
    st.tuples(st.sampled_from(["syn", "synack", "ack", "fin", "rst", "midstream", "expire"]),
              st.integers(1, 8)),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(max_connections=st.integers(1, 5), ops=OPS)
def test_property_bounded_and_established_never_evicted(max_connections, ops):
    t = ConnectionTable(max_connections=max_connections, timeouts=Timeouts(opening=7, finished=3))
    cisn: dict[int, int] = {}
    for now, (op, port) in enumerate(ops):
        k = key(port)
        rec = t.get(k)
        if op in ("syn", "midstream"):
            before = {r.id: r for r in t}
            # established, closing (but a mid-stream pickup of this key is replaced by a new SYN)
            live = {cid for cid, r in before.items() if r.state not in OPENING + FINISHED
                    and not (op == "syn" and r.key == k and r.mid_stream)}
            counts = (t.evicted, t.early_drops, t.refused_full)
            isn = 1000 * now + port
            seg = seg_for(k, isn, SYN if op == "syn" else ACK)
            new = t.admit(k, seg, now=now, **BACKEND)
            assert len(t) <= max_connections
            assert all(t.by_id(cid) is before[cid] for cid in live), "a live record was evicted"
            gone = [r for cid, r in before.items() if t.by_id(cid) is not r]
            replaced = [r for r in gone if r.key == k]
            evicted = [r for r in gone if r.key != k]
            assert len(replaced) <= 1 and all(r.state in FINISHED or r.mid_stream for r in replaced)
            assert len(evicted) <= 1
            d_ev, d_early, d_refused = (a - b for a, b in zip((t.evicted, t.early_drops, t.refused_full), counts))
            if evicted:
                (victim,) = evicted
                if victim.state in FINISHED:
                    assert (d_ev, d_early) == (1, 0)
                else:
                    assert victim.state in OPENING and (d_ev, d_early) == (0, 1)
                    # no finished record was left, and the victim was the oldest half-open one
                    assert not any(r.state in FINISHED for r in t if r is not new)
                    assert victim.id == min(r.id for r in before.values() if r.state in OPENING)
            else:
                assert (d_ev, d_early) == (0, 0)
            if new is None:
                assert d_refused == 1 and len(before) == max_connections
                assert all(r.state not in OPENING + FINISHED for r in before.values())
            else:
                assert d_refused == 0
                t.observe(new, seg, True, now)
                if op == "syn" and new is not rec:
                    cisn[port] = isn
        elif op == "expire":
            t.expire(now)
        elif rec is not None and port in cisn and rec.client.isn == cisn[port]:
            c = cisn[port]
            if op == "synack":
                t.observe(rec, server_seg(k, 5000, SYN | ACK, c + 1), False, now)
            elif op == "ack" and rec.synack_seen:
                t.observe(rec, seg_for(k, c + 1, ACK, 5001), True, now)
            elif op == "fin" and rec.state is TcpState.ESTABLISHED:
                t.observe(rec, seg_for(k, c + 1, ACK | FIN, 5001), True, now)
            elif op == "rst":
                t.observe(rec, seg_for(k, c + 1, RST), True, now)
        assert len(t) <= max_connections
        assert set(t._opening) <= {r.id for r in t} and set(t._finished) <= {r.id for r in t}
