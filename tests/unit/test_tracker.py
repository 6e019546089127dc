"""checkpoint.tracker.observe: folding segments into a ConnectionRecord."""

from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from checkpoint.ici import TcpState
from checkpoint.segment import ACK, FIN, PSH, RST, SYN, Segment, TcpOptions
from checkpoint.seqnum import MASK, MAX_JUMP, seq_add, seq_ge, seq_le
from checkpoint.tracker import derive_state, observe

from ._helpers import cseg, handshake, handshake_segments, make_record, sseg, to_view

C_ISN, S_ISN = 1000, 5000


# ----- handshake -----------------------------------------------------------------

def test_handshake_step_by_step(rec):
    syn, synack, ack = handshake_segments(C_ISN, S_ISN)
    observe(rec, *syn, 1.0)
    c, s = rec.client, rec.server
    assert rec.state is TcpState.SYN_SENT
    assert rec.syn_seen and not rec.synack_seen and not rec.established and not rec.mid_stream
    assert c.isn == C_ISN and c.data_base == C_ISN + 1 and c.next_seq == C_ISN + 1
    assert (c.mss, c.wscale, c.sack_permitted, c.ts_offered) == (1460, 7, True, True)
    assert c.tsval == 100 and c.ts_recent is None  # TSecr 0 on a SYN is not an echo
    assert c.window == c.window_raw == 64240  # never scaled on a SYN
    assert s.isn is None and s.next_seq is None and s.mss is None
    assert rec.last_seen == 1.0 and c.segments == 1

    observe(rec, *synack, 2.0)
    assert rec.state is TcpState.SYN_RECV
    assert rec.synack_seen and not rec.established
    assert s.isn == S_ISN and s.next_seq == S_ISN + 1 and s.data_base == S_ISN + 1
    assert (s.mss, s.wscale, s.sack_permitted, s.ts_offered) == (1400, 9, True, True)
    assert s.ack == C_ISN + 1
    assert s.tsval == 7000 and s.ts_recent == 100
    assert rec.wscale_ok and rec.sack_ok and rec.ts_ok
    # wscale_ok is now true, but the window of a SYN-ACK is never scaled
    assert s.window == s.window_raw == 65160

    observe(rec, *ack, 3.0)
    assert rec.state is TcpState.ESTABLISHED
    assert rec.established
    assert c.ack == S_ISN + 1 and c.ts_recent == 7000 and c.tsval == 101
    assert c.window_raw == 502 and c.window == 502 << 7 and c.max_window == 502 << 7
    assert c.next_seq == C_ISN + 1  # a bare ACK consumes no sequence space
    assert c.bytes == 0 and s.bytes == 0 and c.retransmissions == 0
    assert rec.last_seen == 3.0 and c.segments == 2 and s.segments == 1

    d = rec.to_dict(now=4.5)
    assert d["client_isn"] == C_ISN and d["server_isn"] == S_ISN
    assert d["state"] == "ESTABLISHED" and d["client_mss"] == 1460 and d["server_mss"] == 1400
    assert d["wscale_ok"] and d["sack_permitted"] and d["timestamps"]
    assert d["idle_seconds"] == 1.5
    assert d["client"] == "192.0.2.10:40000" and d["service"] == "198.51.100.1:80"


def test_syn_ack_does_not_establish_before_client_ack(rec):
    syn, synack, _ = handshake_segments(C_ISN, S_ISN)
    observe(rec, *syn, 0)
    observe(rec, *synack, 0)
    # a client ACK that does not cover the server's SYN does not complete the handshake
    observe(rec, cseg(C_ISN + 1, S_ISN), True, 0)
    assert not rec.established and rec.state is TcpState.SYN_RECV
    observe(rec, cseg(C_ISN + 1, S_ISN + 1), True, 0)
    assert rec.established and rec.state is TcpState.ESTABLISHED


def test_handshake_without_options(rec):
    handshake(rec, C_ISN, S_ISN, c_mss=None, s_mss=None, c_wscale=None, s_wscale=None,
              sack=False, c_ts=None, s_ts=None)
    assert rec.state is TcpState.ESTABLISHED
    for h in (rec.client, rec.server):
        assert h.mss is None and h.wscale is None and not h.sack_permitted and not h.ts_offered
        assert h.tsval is None and h.ts_recent is None and h.tick_rate is None
    assert not rec.wscale_ok and not rec.sack_ok and not rec.ts_ok


def test_handshake_isn_near_wrap(rec):
    handshake(rec, MASK, MASK - 1)
    assert rec.client.isn == MASK and rec.client.next_seq == 0 and rec.client.data_base == 0
    assert rec.server.isn == MASK - 1 and rec.server.next_seq == MASK
    assert rec.state is TcpState.ESTABLISHED  # ack 0xFFFFFFFF covers the server SYN
    observe(rec, cseg(0, MASK, payload=b"x" * 10), True, 1)
    assert rec.client.next_seq == 10 and rec.client.bytes == 10


# ----- data ------------------------------------------------------------------------

def test_data_both_ways(established):
    r = established
    observe(r, cseg(1001, 5001, ACK | PSH, b"a" * 100, window=500), True, 1)
    observe(r, sseg(5001, 1101, ACK | PSH, b"b" * 300, window=200), False, 2)
    observe(r, cseg(1101, 5301, ACK, window=400), True, 3)
    c, s = r.client, r.server
    assert c.next_seq == 1101 and s.next_seq == 5301
    assert c.data_high == 1101 and s.data_high == 5301
    assert c.bytes == 100 and s.bytes == 300
    assert c.ack == 5301 and s.ack == 1101
    assert s.window_raw == 200 and s.window == 200 << 9
    assert c.window == 400 << 7
    assert c.retransmissions == 0 and s.retransmissions == 0
    assert c.segments == 4 and s.segments == 2
    d = r.to_dict()
    assert d["bytes_from_client"] == 100 and d["bytes_from_server"] == 300
    assert d["client_next_seq"] == 1101 and d["server_ack"] == 1101 and d["idle_seconds"] is None


def test_retransmission_counted_once_bytes_not_double_counted(established):
    r = established
    data = cseg(1001, 5001, ACK, b"a" * 100)
    observe(r, data, True, 1)
    observe(r, data, True, 2)  # exact retransmission
    assert r.client.retransmissions == 1 and r.client.bytes == 100 and r.client.next_seq == 1101
    observe(r, cseg(1021, 5001, ACK, b"a" * 40), True, 3)  # inside what was seen
    assert r.client.retransmissions == 2 and r.client.bytes == 100 and r.client.next_seq == 1101
    observe(r, cseg(1051, 5001, ACK, b"a" * 100), True, 4)  # overlaps, then new data
    assert r.client.retransmissions == 2 and r.client.bytes == 150 and r.client.next_seq == 1151
    observe(r, cseg(1151, 5001), True, 5)  # pure ACK: no data, no retransmission
    assert r.client.retransmissions == 2


def test_reordered_segment_keeps_highest(established):
    r = established
    observe(r, cseg(1101, 5001, ACK, b"b" * 100), True, 1)  # second segment first
    assert r.client.next_seq == 1201 and r.client.bytes == 200  # offset of highest byte + 1
    observe(r, cseg(1001, 5001, ACK, b"a" * 100), True, 2)  # late first segment
    assert r.client.next_seq == 1201 and r.client.bytes == 200


def test_old_ack_does_not_move_ack_or_window_back(established):
    r = established
    observe(r, sseg(5001, 1001, ACK, b"x" * 1000), False, 1)
    observe(r, cseg(1001, 5501, ACK, window=300), True, 2)
    observe(r, cseg(1001, 6001, ACK, window=100), True, 3)
    assert r.client.ack == 6001 and r.client.window == 100 << 7
    observe(r, cseg(1001, 5501, ACK, window=7), True, 4)  # late, older ack
    assert r.client.ack == 6001 and r.client.window == 100 << 7 and r.client.window_raw == 100
    assert r.client.max_window == 502 << 7
    observe(r, cseg(1001, 6001, ACK, window=50), True, 5)  # same newest ack: window taken
    assert r.client.window == 50 << 7


# ----- closing -----------------------------------------------------------------------

def test_fin_client_first(established):
    r = established
    observe(r, cseg(1001, 5001, ACK | FIN), True, 1)
    assert r.client.fin_seq == 1001 and r.client.next_seq == 1002
    assert r.state is TcpState.FIN_WAIT
    observe(r, sseg(5001, 1002, ACK), False, 2)
    assert r.state is TcpState.CLOSE_WAIT
    observe(r, sseg(5001, 1002, ACK, b"late" * 5), False, 3)  # server may still send
    assert r.state is TcpState.CLOSE_WAIT and r.server.bytes == 20
    observe(r, sseg(5021, 1002, ACK | FIN), False, 4)
    assert r.server.fin_seq == 5021 and r.server.next_seq == 5022
    assert r.state is TcpState.LAST_ACK
    observe(r, cseg(1002, 5021), True, 5)  # does not cover the FIN yet
    assert r.state is TcpState.LAST_ACK
    observe(r, cseg(1002, 5022), True, 6)
    assert r.state is TcpState.TIME_WAIT
    assert r.to_dict()["client_fin_seq"] == 1001 and r.to_dict()["server_fin_seq"] == 5021


def test_fin_server_first_with_data(established):
    r = established
    observe(r, sseg(5001, 1001, ACK | FIN | PSH, b"bye" * 10), False, 1)
    assert r.server.fin_seq == 5031 and r.server.next_seq == 5032 and r.server.bytes == 30
    assert r.state is TcpState.FIN_WAIT
    observe(r, cseg(1001, 5032), True, 2)
    assert r.state is TcpState.CLOSE_WAIT
    observe(r, cseg(1001, 5032, ACK | FIN), True, 3)
    assert r.state is TcpState.LAST_ACK
    observe(r, sseg(5032, 1002), False, 4)
    assert r.state is TcpState.TIME_WAIT


def test_fin_state_derived_not_stepped(established):
    """The ACK of a FIN arriving before the FIN itself still ends in TIME_WAIT."""
    r = established
    observe(r, cseg(1001, 5002), True, 1)  # acks a server FIN not seen yet
    observe(r, sseg(5001, 1002), False, 2)  # acks a client FIN not seen yet
    assert r.state is TcpState.ESTABLISHED
    observe(r, sseg(5001, 1001, ACK | FIN), False, 3)
    observe(r, cseg(1001, 5002, ACK | FIN), True, 4)
    assert r.state is TcpState.TIME_WAIT
    # a retransmitted FIN changes nothing
    observe(r, sseg(5001, 1001, ACK | FIN), False, 5)
    assert r.state is TcpState.TIME_WAIT and r.server.fin_seq == 5001 and r.server.next_seq == 5002


def test_derive_state_matches_record(established):
    assert derive_state(established) is TcpState.ESTABLISHED
    fresh = make_record()
    assert derive_state(fresh) is TcpState.SYN_SENT


# ----- reset -------------------------------------------------------------------------

@pytest.mark.parametrize("from_client", [True, False])
def test_rst_closes(established, from_client):
    r = established
    seq = r.client.next_seq if from_client else r.server.next_seq
    mk = cseg if from_client else sseg
    observe(r, mk(seq, 0, RST), from_client, 7.5)
    assert r.state is TcpState.CLOSED
    assert r.rst_seen and r.rst_from == ("client" if from_client else "server")
    assert r.closed_at == 7.5
    # nothing afterwards reopens it, and closed_at keeps the first time
    observe(r, cseg(1001, 5001, ACK, b"zz"), True, 8)
    observe(r, mk(seq, 0, RST | ACK), from_client, 9)
    assert r.state is TcpState.CLOSED and r.closed_at == 7.5


def test_rst_within_window_accepted(established):
    observe(established, cseg(1001 + 30000, 0, RST), True, 1)
    assert established.state is TcpState.CLOSED and established.rst_from == "client"


@pytest.mark.parametrize("from_client", [True, False])
@pytest.mark.parametrize("offset", [10_000_000, -10_000_000, 1 << 31, 0x7FFFFFFF])
def test_rst_with_wild_seq_rejected(established, from_client, offset):
    r = established
    before = copy.deepcopy(r)
    me = r.client if from_client else r.server
    mk = cseg if from_client else sseg
    observe(r, mk(seq_add(me.next_seq, offset), 0, RST), from_client, 1)
    assert r.state is TcpState.ESTABLISHED
    assert not r.rst_seen and r.rst_from is None and r.closed_at is None
    assert me.out_of_window == 1
    assert me.next_seq == (before.client if from_client else before.server).next_seq


def test_rst_answering_syn_accepted(rec):
    syn, _, _ = handshake_segments(C_ISN, S_ISN)
    observe(rec, *syn, 0)
    observe(rec, sseg(0, C_ISN + 1, RST | ACK, window=0), False, 1)  # port closed
    assert rec.state is TcpState.CLOSED and rec.rst_from == "server"


# ----- mid-stream pickup -----------------------------------------------------------

def test_mid_stream_pickup(rec):
    observe(rec, cseg(123456, 987654, ACK | PSH, b"q" * 100, window=1000), True, 1)
    c, s = rec.client, rec.server
    assert rec.mid_stream and rec.state is TcpState.ESTABLISHED
    assert c.isn is None and s.isn is None
    assert c.data_base == 123456 and c.next_seq == 123556 and c.bytes == 100
    assert c.ack == 987654 and c.mss is None and c.wscale is None
    assert c.window == 1000  # scale unknown: unscaled
    assert not rec.syn_seen and not rec.established
    observe(rec, sseg(987654, 123556, ACK, b"r" * 50), False, 2)
    assert s.data_base == 987654 and s.next_seq == 987704 and s.bytes == 50
    assert s.ack == 123556 and s.isn is None
    assert rec.mid_stream and rec.state is TcpState.ESTABLISHED
    d = rec.to_dict()
    assert d["mid_stream"] is True and d["client_isn"] is None and d["server_isn"] is None


def test_mid_stream_pickup_server_first(rec):
    observe(rec, sseg(42, 99, ACK, b"hello"), False, 1)
    assert rec.mid_stream and rec.state is TcpState.ESTABLISHED
    assert rec.server.bytes == 5 and rec.server.next_seq == 47 and rec.client.next_seq is None


def test_mid_stream_fin_close(rec):
    observe(rec, cseg(10, 20, ACK | FIN), True, 1)
    assert rec.mid_stream and rec.state is TcpState.FIN_WAIT
    observe(rec, sseg(20, 11, ACK), False, 2)
    assert rec.state is TcpState.CLOSE_WAIT


# ----- window scaling --------------------------------------------------------------

def test_window_scaled_only_when_both_syns_carry_wscale(rec):
    handshake(rec, C_ISN, S_ISN, c_wscale=7, s_wscale=None)
    assert rec.client.wscale == 7 and rec.server.wscale is None and not rec.wscale_ok
    assert rec.client.window == 502  # not shifted by the client's own offer
    observe(rec, sseg(5001, 1001, ACK, window=300), False, 1)
    assert rec.server.window == 300


def test_window_scale_server_only(rec):
    handshake(rec, C_ISN, S_ISN, c_wscale=None, s_wscale=5)
    assert not rec.wscale_ok and rec.client.window == 502
    observe(rec, sseg(5001, 1001, ACK, window=300), False, 1)
    assert rec.server.window == 300


def test_wscale_zero_is_scaling_on(rec):
    handshake(rec, C_ISN, S_ISN, c_wscale=0, s_wscale=3)
    assert rec.wscale_ok and rec.client.window == 502
    observe(rec, sseg(5001, 1001, ACK, window=300), False, 1)
    assert rec.server.window == 300 << 3
    assert rec.server.max_window == 65160  # the (unscaled) SYN-ACK window was larger


def test_wscale_clamped_to_14(rec):
    handshake(rec, C_ISN, S_ISN, c_wscale=20, s_wscale=14)
    assert rec.client.wscale == 14
    assert rec.client.window == 502 << 14


def test_syn_window_never_scaled_even_when_retransmitted(established):
    r = established
    observe(r, sseg(S_ISN, C_ISN + 1, SYN | ACK, window=1234, mss=1400, wscale=9), False, 1)
    assert r.server.window == 1234  # same ack as before: taken, but not shifted


# ----- timestamps ------------------------------------------------------------------

def test_ts_recent_is_highest_tsecr(established):
    r = established
    for tsecr in (7005, 7003, 7010, 7001):
        observe(r, cseg(1001, 5001, tsval=200, tsecr=tsecr), True, 1)
    assert r.client.ts_recent == 7010
    observe(r, cseg(1001, 5001, tsval=201, tsecr=0), True, 1)  # 0: no echo
    assert r.client.ts_recent == 7010
    assert r.client.tsval == 201


def test_tsval_highest_across_wrap(rec):
    handshake(rec, C_ISN, S_ISN, c_ts=MASK - 2, s_ts=50)
    assert rec.client.tsval == MASK - 1  # the handshake ACK's tsval
    observe(rec, cseg(1001, 5001, tsval=3, tsecr=50), True, 1)
    observe(rec, cseg(1001, 5001, tsval=MASK, tsecr=50), True, 2)  # late, older
    assert rec.client.tsval == 3
    observe(rec, cseg(1001, 5001, tsval=3 + MAX_JUMP, tsecr=50), True, 3)  # implausible jump
    assert rec.client.tsval == 3


def test_tick_rate_estimate(rec):
    handshake(rec, C_ISN, S_ISN, c_ts=1_000_000, now=0.0)
    h = rec.client
    assert h.tick_rate is None
    observe(rec, cseg(1001, 5001, tsval=1_000_000 + 300, tsecr=7000), True, 0.3)
    assert h.tick_rate is None  # less than 0.5 s of samples
    for i in range(4, 21):
        t = i / 10
        observe(rec, cseg(1001, 5001, tsval=1_000_000 + int(1000 * t), tsecr=7000), True, t)
    assert h.tick_rate == pytest.approx(1000, rel=0.01)
    assert rec.to_dict()["client_tick_rate"] == pytest.approx(1000, rel=0.01)
    assert rec.server.tick_rate is None


def test_tick_rate_across_tsval_wrap(rec):
    base = MASK - 500
    handshake(rec, C_ISN, S_ISN, c_ts=base, now=10.0)
    for i in range(1, 21):
        t = i / 10
        observe(rec, cseg(1001, 5001, tsval=seq_add(base, int(1000 * t)), tsecr=7000), True, 10 + t)
    assert rec.client.tsval < 2000  # wrapped
    assert rec.client.tick_rate == pytest.approx(1000, rel=0.01)


# ----- implausible jumps -----------------------------------------------------------

@pytest.mark.parametrize("offset", [MAX_JUMP, MAX_JUMP + 12345, 1 << 31, -MAX_JUMP, -(MAX_JUMP + 1)])
def test_jump_of_2_30_or_more_is_out_of_window(established, offset):
    r = established
    observe(r, cseg(1001, 5001, ACK, b"a" * 100, window=400), True, 1)
    seq = seq_add(1101, offset)
    observe(r, cseg(seq, 5001 + 10, ACK | FIN, b"x" * 10, window=1, tsval=5000, tsecr=7001),
            True, 2)
    c = r.client
    assert c.out_of_window == 1
    assert c.next_seq == 1101 and c.bytes == 100 and c.fin_seq is None
    # the rest of the segment is ignored too
    assert c.ack == 5001 and c.window == 400 << 7 and c.tsval == 101 and c.ts_recent == 7000
    assert r.state is TcpState.ESTABLISHED


def test_jump_just_under_2_30_is_accepted(established):
    r = established
    seq = seq_add(1001, MAX_JUMP - 1)
    observe(r, cseg(seq, 5001), True, 1)
    assert r.client.out_of_window == 0 and r.client.next_seq == seq


def test_server_out_of_window(established):
    observe(established, sseg(seq_add(5001, 3 << 30), 1001, ACK, b"z"), False, 1)
    assert established.server.out_of_window == 1 and established.server.next_seq == 5001
    assert established.server.bytes == 0


def test_syn_with_other_isn_does_not_corrupt_record(established):
    """A SYN with another ISN is counted, and the first incarnation is kept
    (_observe_syn's comment): it must not drag next_seq or the window along."""
    r = established
    observe(r, cseg(1001, 5001, ACK, b"a" * 100), True, 1)
    before = copy.deepcopy(r.client)
    observe(r, cseg(1001 + 50_000, 0, SYN, window=3, mss=536, wscale=2, tsval=900, tsecr=0), True, 2)
    c = r.client
    assert c.retransmissions == before.retransmissions + 1
    assert c.isn == C_ISN and c.mss == 1460 and c.wscale == 7
    assert c.next_seq == before.next_seq and c.bytes == 100
    assert c.window == before.window and c.tsval == before.tsval
    assert r.state is TcpState.ESTABLISHED


def test_synack_with_other_isn_does_not_corrupt_record(established):
    r = established
    before = copy.deepcopy(r.server)
    observe(r, sseg(S_ISN + 777, C_ISN + 1, SYN | ACK, window=9, mss=536, wscale=1, tsval=7500,
                    tsecr=100), False, 1)
    s = r.server
    assert s.retransmissions == 1 and s.isn == S_ISN and s.mss == 1400 and s.wscale == 9
    assert s.next_seq == before.next_seq and s.window == before.window and s.tsval == before.tsval


# ----- scapy packets through PacketView ----------------------------------------------

def _conversation() -> list[tuple[Segment, bool]]:
    convo = handshake_segments(C_ISN, S_ISN)
    convo += [
        (cseg(1001, 5001, ACK | PSH, b"GET / HTTP/1.0\r\n\r\n", window=501, tsval=102, tsecr=7000), True),
        (sseg(5001, 1019, ACK, b"H" * 1400, window=509, tsval=7001, tsecr=102), False),
        (sseg(6401, 1019, ACK | PSH, b"T" * 600, window=509, tsval=7002, tsecr=102), False),
        (cseg(1019, 7001, ACK, window=480, tsval=103, tsecr=7002,
              sack_blocks=((6401, 7001),)), True),
        (sseg(6401, 1019, ACK | PSH, b"T" * 600, window=509, tsval=7004, tsecr=102), False),  # rtx
        (sseg(7001, 1019, ACK | FIN, window=509, tsval=7005, tsecr=103), False),
        (cseg(1019, 7002, ACK | FIN, window=480, tsval=104, tsecr=7005), True),
        (sseg(7002, 1020, ACK, window=509, tsval=7006, tsecr=104), False),
    ]
    return convo


@pytest.mark.parametrize("linux_layout", [True, False])
def test_packetview_drives_tracker_like_segment(linux_layout):
    by_seg, by_view = make_record(), make_record()
    for i, (seg, fc) in enumerate(_conversation()):
        observe(by_seg, seg, fc, float(i))
        v = to_view(seg, linux_layout)
        assert (v.seq, v.ack, v.flags, v.payload_len) == (seg.seq, seg.ack, seg.flags, len(seg.payload))
        assert (v.tsval, v.tsecr) == (seg.tsval, seg.tsecr)
        observe(by_view, v, fc, float(i))
    assert by_view.to_dict() == by_seg.to_dict()
    d = by_view.to_dict()
    assert d["state"] == "TIME_WAIT"
    assert (d["client_mss"], d["server_mss"], d["client_wscale"], d["server_wscale"]) == (1460, 1400, 7, 9)
    assert d["sack_permitted"] and d["timestamps"]
    assert d["bytes_from_client"] == 18 and d["bytes_from_server"] == 2000
    assert d["retransmissions_from_server"] == 1
    assert d["server_tsval"] == 7006 and d["client_ts_recent"] == 7005 and d["server_ts_recent"] == 104
    assert d["server_window"] == 509 << 9


def test_packetview_mid_stream():
    rec = make_record()
    observe(rec, to_view(cseg(0xFFFFFF00, 77, ACK | PSH, b"d" * 0x200)), True, 0)
    assert rec.mid_stream and rec.state is TcpState.ESTABLISHED and rec.client.isn is None
    assert rec.client.next_seq == 0x100 and rec.client.bytes == 0x200


# ----- properties: reordering, duplication, overlap, retransmission ----------------

u32 = st.one_of(st.integers(0, MASK), st.integers(MASK - 20_000, MASK))


def _build(cisn, sisn, cdata, sdata, mss, c_ts, s_ts, fin, rnd):
    """An in-order conversation.  Returns (segments, meta) where meta[i] is
    (side, data_range or None, index of the segment's "time")."""
    convo = list(handshake_segments(cisn, sisn, c_ts=c_ts, s_ts=s_ts))
    meta = [(True, None), (False, None), (True, None)]
    side = {
        True: {"base": seq_add(cisn, 1), "data": cdata, "off": 0, "ts": seq_add(c_ts, 1), "mk": cseg},
        False: {"base": seq_add(sisn, 1), "data": sdata, "off": 0, "ts": s_ts, "mk": sseg},
    }

    def send(fc, n=0, flags=ACK):
        me, peer = side[fc], side[not fc]
        me["ts"] = seq_add(me["ts"], rnd.randint(0, 3))
        off = me["off"]
        payload = me["data"][off:off + n]
        seg = me["mk"](seq_add(me["base"], off), seq_add(peer["base"], peer["off"]), flags,
                       payload, window=1000, tsval=me["ts"], tsecr=peer["ts"])
        me["off"] += len(payload)
        convo.append((seg, fc))
        meta.append((fc, (off, off + len(payload)) if payload else None))

    while side[True]["off"] < len(cdata) or side[False]["off"] < len(sdata):
        fc = rnd.random() < 0.5
        if side[fc]["off"] >= len(side[fc]["data"]):
            fc = not fc
        send(fc, rnd.randint(1, mss))
    send(True)
    send(False)
    if fin:
        send(True, flags=ACK | FIN)
        side[True]["off"] += 1  # the FIN's sequence number, for the peer's ack
        send(False, flags=ACK | FIN)
        side[False]["off"] += 1
        send(True)
    return convo, meta


def _snapshot(rec):
    return {
        name: (h.next_seq, h.data_high, h.ack, h.tsval, h.ts_recent)
        for name, h in (("c", rec.client), ("s", rec.server))
    }


def _assert_not_backwards(old, new):
    for name in old:
        for o, n in zip(old[name], new[name]):
            if o is not None:
                assert n is not None and seq_ge(n, o), (name, o, n)


def _summary(rec):
    out = {"state": rec.state, "established": rec.established, "mid_stream": rec.mid_stream}
    for name, h in (("c", rec.client), ("s", rec.server)):
        out[name] = (h.isn, h.data_base, h.next_seq, h.data_high, h.bytes, h.ack, h.tsval,
                     h.ts_recent, h.fin_seq, h.mss, h.wscale, h.out_of_window)
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cisn=u32, sisn=u32,
    c_ts=u32, s_ts=u32,
    clen=st.integers(0, 3000), slen=st.integers(0, 3000),
    mss=st.integers(8, 1460),
    fin=st.booleans(),
    window=st.integers(1, 12),
    rnd=st.randoms(use_true_random=False),
)
def test_delivery_order_does_not_matter(cisn, sisn, c_ts, s_ts, clen, slen, mss, fin, window, rnd):
    cdata = bytes(rnd.getrandbits(8) for _ in range(clen))
    sdata = bytes(rnd.getrandbits(8) for _ in range(slen))
    convo, meta = _build(cisn, sisn, cdata, sdata, mss, c_ts, s_ts, fin, rnd)

    ref = make_record()
    prev = _snapshot(ref)
    for i, (seg, fc) in enumerate(convo):
        observe(ref, seg, fc, float(i))
        cur = _snapshot(ref)
        _assert_not_backwards(prev, cur)
        prev = cur

    # independent oracle for in-order delivery
    assert ref.client.next_seq == seq_add(cisn, 1 + clen + fin)
    assert ref.server.next_seq == seq_add(sisn, 1 + slen + fin)
    assert ref.client.bytes == clen and ref.server.bytes == slen
    assert ref.client.ack == ref.server.next_seq and ref.server.ack == seq_add(cisn, 1 + clen + fin)
    assert ref.client.retransmissions == 0 and ref.server.retransmissions == 0
    assert ref.state is (TcpState.TIME_WAIT if fin else TcpState.ESTABLISHED)
    assert ref.client.tsval == convo[-1][0].tsval if fin else True

    # the perturbed delivery: all originals, plus duplicates, overlapping re-cuts
    # and retransmissions carrying a later segment's ack and timestamps
    head, rest, rest_meta = convo[:3], convo[3:], meta[3:]
    extra: list[tuple[Segment, bool]] = []
    by_side = {fc: [i for i, m in enumerate(rest_meta) if m[0] == fc] for fc in (True, False)}
    for _ in range(rnd.randint(0, len(rest) + 2)):
        kind = rnd.randrange(4)
        if kind == 0 and rest:  # duplicate
            extra.append(rest[rnd.randrange(len(rest))])
        elif kind == 1:  # a SYN or SYN-ACK retransmitted late
            extra.append(head[rnd.randrange(2)])
        else:  # re-cut overlap (kind 2: old ack/ts) or retransmission (kind 3: later ack/ts)
            fc = rnd.random() < 0.5
            data = cdata if fc else sdata
            if not data:
                continue
            a = rnd.randrange(len(data))
            b = min(len(data), a + rnd.randint(1, 2 * mss))
            # the original segment that first carried byte b-1
            k = next(i for i in by_side[fc]
                     if rest_meta[i][1] is not None and rest_meta[i][1][0] < b <= rest_meta[i][1][1])
            if kind == 3:
                k = rnd.choice([i for i in by_side[fc] if i >= k])
            tmpl = rest[k][0]
            isn = cisn if fc else sisn
            extra.append((Segment(tmpl.src, tmpl.dst, tmpl.sport, tmpl.dport,
                                  seq_add(isn, 1 + a), tmpl.ack, ACK, 999, data[a:b],
                                  TcpOptions(tsval=tmpl.tsval, tsecr=tmpl.tsecr)), fc))
    mixed = list(rest)
    for e in extra:
        mixed.insert(rnd.randint(0, len(mixed)), e)
    keyed = sorted(range(len(mixed)), key=lambda i: i + rnd.uniform(0, window))
    delivered = head + [mixed[i] for i in keyed]

    got = make_record()
    prev = _snapshot(got)
    for i, (seg, fc) in enumerate(delivered):
        observe(got, seg, fc, float(i))
        cur = _snapshot(got)
        _assert_not_backwards(prev, cur)
        # nothing ever goes past what the in-order delivery ends with
        for h, r in ((got.client, ref.client), (got.server, ref.server)):
            if h.next_seq is not None:
                assert seq_le(h.next_seq, r.next_seq)
            if h.ack is not None:
                assert seq_le(h.ack, r.ack)
        prev = cur

    assert _summary(got) == _summary(ref)
    assert got.client.segments == sum(1 for _, fc in delivered if fc)


@settings(max_examples=200, deadline=None)
@given(isn=u32, start=st.integers(0, 1 << 20), chunks=st.lists(st.integers(0, 3000), min_size=1, max_size=20),
       rnd=st.randoms(use_true_random=False))
def test_mid_stream_any_order_within_window_bytes_bounded(isn, start, chunks, rnd):
    """Picked up mid-stream: next_seq ends at the stream's highest end whatever
    the order, and bytes never exceed what lies above the first segment seen."""
    segs, off = [], start
    for n in chunks:
        segs.append(cseg(seq_add(isn, off), 1, ACK, b"x" * n))
        off += n
    rnd.shuffle(segs)
    rec = make_record()
    for i, s in enumerate(segs):
        observe(rec, s, True, float(i))
    assert rec.mid_stream and rec.client.isn is None
    assert rec.client.next_seq == seq_add(isn, off)
    first = segs[0].seq
    assert rec.client.data_base == first
    assert rec.client.bytes == (off - (first - isn) % (1 << 32))
    assert rec.client.out_of_window == 0
