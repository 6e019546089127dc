"""checkpoint.table.ConnectionTable: admission, lookup, replacement, eviction, expiry."""

from __future__ import annotations

import pytest

from checkpoint.ici import TcpState
from checkpoint.segment import ACK, FIN, RST, SYN, Segment
from checkpoint.table import ConnectionTable, Timeouts

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


def test_full_table_without_finished_refuses():
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
