"""The per-packet logic, driven with crafted packets (sans-I/O, no root)."""

from __future__ import annotations


import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.all import IP, TCP, Raw

from appliance.config import parse
from appliance.dataplane import Dataplane
from nfq.queue import Verdict

CFG = {
    "api": {"token": "a-long-token"},
    "service": [{"name": "web", "vip": "203.0.113.10", "port": 80,
                 "backend": [{"name": "primary", "address": "198.51.100.10"},
                             {"name": "backup", "address": "198.51.100.20"}]}],
}
CLIENT = "192.0.2.10"


def raw(pkt) -> bytearray:
    return bytearray(bytes(pkt))


def checksums_ok(buf: bytearray) -> bool:
    p = IP(bytes(buf))
    q = p.copy()
    del q.chksum
    del q[TCP].chksum
    q = IP(bytes(q))
    return p.chksum == q.chksum and p[TCP].chksum == q[TCP].chksum


def handshake(dp: Dataplane, now: float = 100.0) -> None:
    syn = raw(IP(src=CLIENT, dst="203.0.113.10") / TCP(sport=40000, dport=80, flags="S", seq=1000,
                                                      options=[("MSS", 1460), ("WScale", 7)]))
    assert dp.handle(syn, now) is Verdict.REWRITTEN
    assert IP(bytes(syn)).dst == "198.51.100.10" and checksums_ok(syn)
    synack = raw(IP(src="198.51.100.10", dst=CLIENT) / TCP(sport=80, dport=40000, flags="SA", seq=5000, ack=1001,
                                                          options=[("MSS", 1400), ("WScale", 9)]))
    before = bytes(synack)
    # the return path is observed, not rewritten: the kernel translates its source
    assert dp.handle(synack, now) is Verdict.ACCEPT
    assert bytes(synack) == before
    ack = raw(IP(src=CLIENT, dst="203.0.113.10") / TCP(sport=40000, dport=80, flags="A", seq=1001, ack=5001))
    assert dp.handle(ack, now) is Verdict.REWRITTEN


def test_connection_pinned_to_active_backend_and_tracked() -> None:
    dp = Dataplane(parse(CFG))
    handshake(dp)
    (rec,) = dp.connections()
    assert rec.backend == "primary" and rec.state.value == "ESTABLISHED"
    assert (rec.client.isn, rec.server.isn, rec.client.mss, rec.server.mss) == (1000, 5000, 1460, 1400)
    # switching the active backend does not move an existing connection
    dp.services["web"].active = "backup"
    data = raw(IP(src=CLIENT, dst="203.0.113.10") / TCP(sport=40000, dport=80, flags="PA", seq=1001, ack=5001)
               / Raw(b"GET / HTTP/1.1\r\n\r\n"))
    assert dp.handle(data, 101.0) is Verdict.REWRITTEN
    assert IP(bytes(data)).dst == "198.51.100.10"
    assert rec.client.bytes == 18
    # ... but a new one goes to the new active backend
    syn = raw(IP(src=CLIENT, dst="203.0.113.10") / TCP(sport=40001, dport=80, flags="S", seq=7))
    dp.handle(syn, 102.0)
    assert IP(bytes(syn)).dst == "198.51.100.20"


def test_a_new_connection_on_the_port_of_a_mid_stream_leftover_is_protected() -> None:
    """A stale packet (an earlier appliance's connection) makes a mid-stream record, unprotected;
    the client's next connection from that port is a new record with a log, and it can be moved."""
    dp = Dataplane(parse(CFG))
    stale = raw(IP(src=CLIENT, dst="203.0.113.10") / TCP(sport=40000, dport=80, flags="A", seq=77, ack=88))
    dp.handle(stale, 99.0)
    (old,) = dp.connections()
    assert old.mid_stream and old.log is None
    handshake(dp)
    (rec,) = dp.connections()
    assert rec.id != old.id and not rec.mid_stream and rec.log is not None
    assert rec.protected and rec.client.isn == 1000 and rec.state.value == "ESTABLISHED"


def test_the_kernel_rewrites_client_packets_for_the_backend_its_rule_points_to() -> None:
    """With the kernel's client rule pointing at the primary (``kernel_target``), a client packet
    of a connection pinned to the primary passes unchanged (logged all the same); once the rule
    points elsewhere, the appliance rewrites it itself."""
    dp = Dataplane(parse(CFG))
    handshake(dp)
    (rec,) = dp.connections()
    svc = dp.services["web"]
    svc.kernel_target = "primary"
    req = raw(IP(src=CLIENT, dst="203.0.113.10") / TCP(sport=40000, dport=80, flags="PA", seq=1001, ack=5001)
              / Raw(b"GET / HTTP/1.1\r\n\r\n"))
    before = bytes(req)
    assert dp.handle(req, 101.0) is Verdict.ACCEPT
    assert bytes(req) == before and rec.log.end == 18 and dp.counters.kernel_rewrites == 1
    svc.kernel_target = "backup"  # the rule now sends the VIP's packets to the backup
    more = raw(IP(src=CLIENT, dst="203.0.113.10") / TCP(sport=40000, dport=80, flags="PA", seq=1019, ack=5001)
               / Raw(b"x"))
    assert dp.handle(more, 102.0) is Verdict.REWRITTEN
    assert IP(bytes(more)).dst == "198.51.100.10" and checksums_ok(more) and rec.log.end == 19


def test_packets_from_a_backend_not_serving_the_connection_are_dropped() -> None:
    dp = Dataplane(parse(CFG))
    handshake(dp)
    stray = raw(IP(src="198.51.100.20", dst=CLIENT) / TCP(sport=80, dport=40000, flags="A", seq=5001, ack=1001))
    assert dp.handle(stray, 101.0) is Verdict.DROP
    assert dp.counters.fenced_drops == 1


def test_backend_port_differs_from_service_port() -> None:
    cfg = {"api": CFG["api"], "service": [{"name": "web", "vip": "203.0.113.10", "port": 80,
                                           "backend": [{"name": "p", "address": "198.51.100.10", "port": 8080}]}]}
    dp = Dataplane(parse(cfg))
    syn = raw(IP(src=CLIENT, dst="203.0.113.10") / TCP(sport=5, dport=80, flags="S", seq=1))
    assert dp.handle(syn, 1.0) is Verdict.REWRITTEN
    p = IP(bytes(syn))
    assert (p.dst, p[TCP].dport) == ("198.51.100.10", 8080) and checksums_ok(syn)
    synack = raw(IP(src="198.51.100.10", dst=CLIENT) / TCP(sport=8080, dport=5, flags="SA", seq=9, ack=2))
    assert dp.handle(synack, 1.0) is Verdict.ACCEPT
    assert dp.connections()[0].server.isn == 9


def test_header_only_copies_of_the_return_path_are_tracked() -> None:
    dp = Dataplane(parse(CFG))
    handshake(dp)
    # a GSO super-packet of 20 segments, of which the queue copied 128 bytes
    big = bytes(IP(src="198.51.100.10", dst=CLIENT) / TCP(sport=80, dport=40000, flags="A", seq=5001, ack=1001)
                / Raw(b"y" * 28960))
    assert dp.handle(bytearray(big[:128]), 101.0) is Verdict.ACCEPT
    rec = dp.connections()[0]
    assert rec.server.bytes == 28960 and rec.server.next_seq == 5001 + 28960
    # a truncated client packet cannot be rewritten: counted, passed per policy
    cl = bytes(IP(src=CLIENT, dst="203.0.113.10") / TCP(sport=40000, dport=80, flags="A", seq=1001, ack=5001)
               / Raw(b"z" * 5000))
    assert dp.handle(bytearray(cl[:4016]), 102.0) is Verdict.ACCEPT
    assert dp.counters.malformed == 1 and rec.client.bytes == 0


def test_foreign_traffic_is_left_alone() -> None:
    dp = Dataplane(parse(CFG))
    other = raw(IP(src=CLIENT, dst="203.0.113.99") / TCP(sport=1, dport=22, flags="S"))
    before = bytes(other)
    assert dp.handle(other, 1.0) is Verdict.ACCEPT
    assert bytes(other) == before and dp.counters.foreign == 1 and len(dp.table) == 0


@pytest.mark.parametrize("policy,verdict", [("accept", Verdict.ACCEPT), ("drop", Verdict.DROP)])
def test_malformed_packets_counted_and_handled_per_policy(policy: str, verdict: Verdict) -> None:
    dp = Dataplane(parse(CFG | {"gateway": {"on_malformed": policy}}))
    good = bytes(IP(src=CLIENT, dst="203.0.113.10") / TCP(sport=1, dport=80))
    for bad in (b"", b"\x45" * 10, good[:30], b"\x60" + good[1:], bytes(IP(dst="203.0.113.10", proto=17) / Raw(b"x" * 30))):
        assert dp.handle(bytearray(bad), 1.0) is verdict
    assert dp.counters.malformed == 5
    assert len(dp.table) == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_random_bytes_never_raise(blob: bytes) -> None:
    dp = Dataplane(parse(CFG))
    assert dp.handle(bytearray(blob), 1.0) in (Verdict.ACCEPT, Verdict.DROP, Verdict.REWRITTEN)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=80), st.integers(0, 39))
def test_mutated_real_packets_never_raise(noise: bytes, at: int) -> None:
    dp = Dataplane(parse(CFG))
    pkt = bytearray(bytes(IP(src=CLIENT, dst="203.0.113.10") / TCP(sport=9, dport=80, flags="S",
                                                                 options=[("MSS", 1460), ("Timestamp", (1, 0))])))
    pkt[at:at + len(noise)] = noise
    dp.handle(pkt, 1.0)


def _established(dp: Dataplane, port: int, now: float) -> None:
    for pkt in (IP(src=CLIENT, dst="203.0.113.10") / TCP(sport=port, dport=80, flags="S", seq=port),
                IP(src="198.51.100.10", dst=CLIENT) / TCP(sport=80, dport=port, flags="SA", seq=7, ack=port + 1),
                IP(src=CLIENT, dst="203.0.113.10") / TCP(sport=port, dport=80, flags="A", seq=port + 1, ack=8)):
        dp.handle(raw(pkt), now)


def test_full_table_of_established_connections_refuses_new_ones_and_counts() -> None:
    dp = Dataplane(parse(CFG | {"gateway": {"max_connections": 2}}))
    for port in (1, 2):
        _established(dp, port, 1.0)
    syn = raw(IP(src=CLIENT, dst="203.0.113.10") / TCP(sport=3, dport=80, flags="S", seq=3))
    assert dp.handle(syn, 1.0) is Verdict.DROP
    assert dp.counters.table_full_drops == 1 and dp.table.refused_full == 1


def test_full_table_of_half_open_records_makes_room_and_says_so() -> None:
    """A SYN flood: the oldest half-open record goes for a new connection, and one event says so."""
    from appliance.dataplane import ConnectionClosed, HalfOpenEvicted

    dp = Dataplane(parse(CFG | {"gateway": {"max_connections": 2}}))
    verdicts = [dp.handle(raw(IP(src=CLIENT, dst="203.0.113.10") / TCP(sport=port, dport=80, flags="S", seq=port)),
                          1.0 + port / 10) for port in (1, 2, 3, 4)]
    assert verdicts == [Verdict.REWRITTEN] * 4
    assert sorted(r.client_port for r in dp.table) == [3, 4]  # the oldest went first
    assert dp.table.early_drops == 2 and dp.counters.table_full_drops == 0
    events = []
    while (ev := dp.next_event()) is not None:
        events.append(ev)
    # each evicted record is over (said once), and the eviction is one event a second, not one a SYN
    assert [(e.rec.client_port, e.why) for e in events if isinstance(e, ConnectionClosed)] == [(1, "evicted"),
                                                                                             (2, "evicted")]
    (ev,) = [e for e in events if isinstance(e, HalfOpenEvicted)]
    assert ev.count == 1
    dp.expire(3.0)  # the rest of the story, a second later
    (tail,) = [dp.next_event()]
    assert isinstance(tail, HalfOpenEvicted) and tail.count == 1 and tail.total == 2




def test_backend_byte_counters_are_cumulative() -> None:
    """As HAProxy's bytes in/out: a backend's counters keep what its connections carried after
    those connections are gone from the table."""
    from appliance.gateway import Gateway

    now = [100.0]
    gw = Gateway(parse(CFG), clock=lambda: now[0])
    dp = gw.dataplane
    handshake(dp, now[0])
    dp.handle(raw(IP(src=CLIENT, dst="203.0.113.10") / TCP(sport=40000, dport=80, flags="PA", seq=1001, ack=5001)
                  / Raw(b"G" * 100)), now[0])
    dp.handle(raw(IP(src="198.51.100.10", dst=CLIENT) / TCP(sport=80, dport=40000, flags="PA", seq=5001, ack=1101)
                  / Raw(b"x" * 1000)), now[0])
    for flags, src, dst, sport, dport, seq, ack in (
            ("FA", CLIENT, "203.0.113.10", 40000, 80, 1101, 6001),
            ("FA", "198.51.100.10", CLIENT, 80, 40000, 6001, 1102),
            ("A", CLIENT, "203.0.113.10", 40000, 80, 1102, 6002)):
        dp.handle(raw(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack)), now[0])
    now[0] += 10_000
    dp.expire(now[0])
    assert len(dp.table) == 0
    (primary,) = [b for s in gw.services() for b in s["backends"] if b["name"] == "primary"]
    assert primary["bytes_from_client"] == 100 and primary["bytes_from_server"] == 1000


def test_every_connection_is_said_to_be_over_exactly_once() -> None:
    from appliance.dataplane import CloseSuspected, ConnectionClosed

    suspects = []

    def closed(dp: Dataplane) -> list[tuple[int, str]]:
        out = []
        while (ev := dp.next_event()) is not None:
            if isinstance(ev, ConnectionClosed):
                out.append((ev.rec.client_port, ev.why))
            elif isinstance(ev, CloseSuspected):
                suspects.append(ev.suspect)
        return out

    def seg(flags: str, from_client: bool, port: int, seq: int, ack: int) -> bytearray:
        ip = IP(src=CLIENT, dst="203.0.113.10") if from_client else IP(src="198.51.100.10", dst=CLIENT)
        tcp = TCP(sport=port, dport=80, flags=flags, seq=seq, ack=ack) if from_client else \
            TCP(sport=80, dport=port, flags=flags, seq=seq, ack=ack)
        return raw(ip / tcp)

    dp = Dataplane(parse(CFG))
    for port in (1, 2, 3):  # 1 closes with FINs both ways, 2 is reset by the gateway, 3 goes idle
        _established(dp, port, 1.0)
    dp.handle(seg("FA", True, 1, 2, 8), 2.0)
    assert dp.handle(seg("FA", False, 1, 8, 3), 2.0) is Verdict.DROP  # held: is the backend dying?
    assert closed(dp) == [] and len(suspects) == 1
    dp.release_suspect(suspects[0])  # a probe says it is alive: its FIN (retransmitted) passes
    assert dp.handle(seg("FA", False, 1, 8, 3), 2.1) is Verdict.ACCEPT
    dp.handle(seg("A", True, 1, 3, 9), 2.1)
    assert closed(dp) == [(1, "closed")]
    dp.reset(next(r for r in dp.table if r.client_port == 2), 2.0)
    assert closed(dp) == [(2, "reset")]
    dp.expire(10_000.0)
    assert closed(dp) == [(3, "idle")]  # 1 and 2 were said to be over already
    assert len(dp.table) == 0 and closed(dp) == []


def test_a_client_still_talking_after_a_reset_gets_a_rst_it_accepts() -> None:
    """RFC 5961: the RST sent at the reset carries the client's ACK from before, in the window
    but maybe not at rcv_nxt; the client answers with a challenge ACK, and the gateway's answer
    to that is a RST at exactly the acknowledged sequence."""
    dp = Dataplane(parse(CFG))
    _established(dp, 1, 1.0)
    rec = next(iter(dp.table))
    dp.reset(rec, 2.0)
    dp.outbox.clear()
    challenge = raw(IP(src=CLIENT, dst="203.0.113.10") / TCP(sport=1, dport=80, flags="A", seq=2, ack=5000))
    assert dp.handle(challenge, 2.5) is Verdict.DROP
    (rst,) = dp.outbox
    assert (rst.flags, rst.seq, rst.src, rst.dst, rst.dport) == (0x04, 5000, "203.0.113.10", CLIENT, 1)
    dp.outbox.clear()
    dp.handle(challenge, 2.51)  # rate-limited per connection
    assert not dp.outbox
