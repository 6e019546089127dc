"""The checkpoint store and delayed ACKs (tcpcp 6.2, invariant I1), driven with
crafted packets and a real SQLite file (no root)."""

from __future__ import annotations

import copy
import time
from pathlib import Path

from scapy.all import IP, TCP, Raw

from appliance.config import parse
from appliance.dataplane import Dataplane
from appliance.gateway import Gateway
from checkpoint.ici import ConnectionRecord
from checkpoint.io.sqlite import SqliteBackend
from checkpoint.store import STORE_FULL, CommitPlanner
from checkpoint.streamlog import CHUNK
from nfq.queue import Verdict

VIP, CLIENT, PRIMARY = "203.0.113.10", "192.0.2.10", "198.51.100.10"


def config(tmp_path: Path, **store) -> dict:
    return {
        "api": {"token": "a-long-token"},
        "store": {"mode": "disk", "path": str(tmp_path / "cp.db"), **store},
        "service": [{"name": "web", "vip": VIP, "port": 80,
                     "backend": [{"name": "primary", "address": PRIMARY},
                                 {"name": "backup", "address": "198.51.100.20"}]}],
    }


def raw(pkt) -> bytearray:
    return bytearray(bytes(pkt))


def c2s(flags: str, seq: int, ack: int = 0, data: bytes = b"", **kw) -> bytearray:
    p = IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=80, flags=flags, seq=seq, ack=ack, **kw)
    return raw(p / Raw(data) if data else p)


def s2c(flags: str, seq: int, ack: int, data: bytes = b"", **kw) -> bytearray:
    p = IP(src=PRIMARY, dst=CLIENT) / TCP(sport=80, dport=40000, flags=flags, seq=seq, ack=ack, **kw)
    return raw(p / Raw(data) if data else p)


def commit(dp: Dataplane, backend: SqliteBackend | None = None) -> None:
    """One group commit, as the daemon's committer does it."""
    batch = dp.store.plan(time.time())
    if batch is None:
        return
    if backend is not None:
        backend.write(batch)
    else:
        batch.written = time.time()
    dp.committed(dp.store.done(batch))


def open_connection(dp: Dataplane, backend: SqliteBackend | None = None) -> None:
    ts = [("Timestamp", (100, 0))]
    assert dp.handle(c2s("S", 1000, options=[("MSS", 1460), *ts]), 1.0) is Verdict.REWRITTEN
    synack = s2c("SA", 5000, 1001, options=[("MSS", 1400), ("Timestamp", (7000, 100))])
    # nothing of the connection is durable yet: not even the SYN may be acknowledged
    assert dp.handle(synack, 1.0) is Verdict.DROP
    assert dp.counters.acks_held == 1 and not dp.raw_out
    commit(dp, backend)
    (sent,) = dp.raw_out
    p = IP(bytes(sent))
    # the held SYN-ACK goes out from the VIP, as the kernel's NAT would have sent it
    assert (p.src, p[TCP].sport, p[TCP].flags, p[TCP].ack) == (VIP, 80, "SA", 1001)
    dp.raw_out.clear()
    assert dp.handle(c2s("A", 1001, 5001, options=[("Timestamp", (101, 7000))]), 1.1) is Verdict.REWRITTEN


def test_memory_mode_commits_at_once_and_holds_nothing() -> None:
    cfg = config(Path("/nonexistent"))
    del cfg["store"]
    dp = Dataplane(parse(cfg))
    dp.handle(c2s("S", 1000), 1.0)
    assert dp.handle(s2c("SA", 5000, 1001), 1.0) is Verdict.ACCEPT
    dp.handle(c2s("PA", 1001, 5001, b"x" * 100), 1.1)
    (rec,) = dp.connections()
    assert rec.commit_offset == 100
    assert dp.handle(s2c("A", 5001, 1101), 1.2) is Verdict.ACCEPT


def test_pure_ack_above_the_commit_point_is_held_then_released(tmp_path: Path) -> None:
    dp = Dataplane(parse(config(tmp_path)))
    open_connection(dp)
    (rec,) = dp.connections()
    assert dp.handle(c2s("PA", 1001, 5001, b"a" * 1000, options=[("Timestamp", (102, 7000))]), 1.2) \
        is Verdict.REWRITTEN
    assert rec.commit_offset == 0 and rec.log.end == 1000
    ack = s2c("A", 5001, 2001, options=[("Timestamp", (7001, 102))])
    assert dp.handle(ack, 1.2) is Verdict.DROP  # would tell the client byte 999 is safe: it is not yet
    commit(dp)
    assert rec.commit_offset == 1000
    (sent,) = dp.raw_out
    p = IP(bytes(sent))
    assert p.src == VIP and p[TCP].ack == 2001 and dict(p[TCP].options)["Timestamp"] == (7001, 102)
    # a later ACK at or below the commit point passes untouched
    assert dp.handle(s2c("A", 5001, 2001, options=[("Timestamp", (7002, 102))]), 1.3) is Verdict.ACCEPT


def test_after_a_restart_the_client_hears_of_the_commit_point_at_once(tmp_path: Path) -> None:
    """What the client was told died with the old process (a restart, a pair's takeover): the
    first pure ACK above the commit point goes out lowered to it (the client may be behind it and
    resends from there), later ones are held as usual."""
    backend = SqliteBackend(tmp_path / "cp.db")
    dp = Dataplane(parse(config(tmp_path)))
    open_connection(dp, backend)
    dp.handle(c2s("PA", 1001, 5001, b"a" * 1000), 1.2)
    commit(dp, backend)
    gw = Gateway(parse(config(tmp_path)))
    gw.restore(backend.load(), takeover=True)
    (rec,) = gw.dataplane.connections()
    assert rec.commit_offset == 1000
    ack = s2c("A", 5001, 2501, options=[("SAck", (2601, 2701))])
    assert gw.dataplane.handle(ack, 2.0) is Verdict.REWRITTEN
    p = IP(bytes(ack))
    assert p[TCP].ack == 2001 and not [o for o in p[TCP].options if o[0] == "SAck"]
    assert gw.dataplane.handle(s2c("A", 5001, 2501), 2.0) is Verdict.DROP  # the client knows 2001 now: held


def test_data_segment_has_its_ack_clamped_and_sack_stripped(tmp_path: Path) -> None:
    dp = Dataplane(parse(config(tmp_path)))
    open_connection(dp)
    dp.handle(c2s("PA", 1001, 5001, b"GET / HTTP/1.1\r\n\r\n"), 1.2)
    commit(dp)
    dp.handle(c2s("PA", 1019, 5001, b"b" * 500), 1.3)  # logged, not yet committed
    resp = s2c("PA", 5001, 1519, b"HTTP/1.1 200 OK\r\n", options=[("SAck", (1600, 1700))])
    assert dp.handle(resp, 1.3) is Verdict.REWRITTEN
    p = IP(bytes(resp))
    assert p[TCP].ack == 1019  # the committed end: 18 bytes after ISN + 1
    assert not any(k == "SAck" for k, _ in p[TCP].options)
    assert dp.counters.acks_clamped == 1
    # the checksum is still right after the rewrite
    q = IP(bytes(resp))
    del q.chksum
    del q[TCP].chksum
    assert IP(bytes(q))[TCP].chksum == p[TCP].chksum


def test_a_held_ack_is_released_lowered_when_the_commit_covers_part_of_it(tmp_path: Path) -> None:
    dp = Dataplane(parse(config(tmp_path)))
    open_connection(dp)
    dp.handle(c2s("PA", 1001, 5001, b"a" * 100), 1.2)
    batch = dp.store.plan(time.time())  # cut: covers 100 bytes
    dp.handle(c2s("PA", 1101, 5001, b"b" * 100), 1.2)  # after the cut
    assert dp.handle(s2c("A", 5001, 1201), 1.2) is Verdict.DROP
    batch.written = time.time()
    dp.committed(dp.store.done(batch))
    (sent,) = dp.raw_out
    assert IP(bytes(sent))[TCP].ack == 1101  # what is durable, not what the backend said
    dp.raw_out.clear()
    commit(dp)
    (sent,) = dp.raw_out
    assert IP(bytes(sent))[TCP].ack == 1201


def test_gateway_segments_to_the_client_are_clamped_too(tmp_path: Path) -> None:
    gw = Gateway(parse(config(tmp_path)))
    dp = gw.dataplane
    open_connection(dp)
    dp.handle(c2s("PA", 1001, 5001, b"a" * 100), 1.2)
    (rec,) = dp.connections()
    gw.reset_connection(rec.id)
    gw.flush()
    (rst,) = [o for o in gw.unsent if o.to == "client"]
    assert rst.ack == 1001  # the client's 100 bytes were logged but not committed


def test_client_fin_is_acknowledged_only_once_committed(tmp_path: Path) -> None:
    dp = Dataplane(parse(config(tmp_path)))
    open_connection(dp)
    dp.handle(c2s("FA", 1001, 5001, b"bye"), 1.2)
    commit(dp)
    (rec,) = dp.connections()
    assert rec.commit_offset == 3 and rec.commit_fin
    assert dp.handle(s2c("A", 5001, 1005), 1.3) is Verdict.ACCEPT


def test_total_limit_makes_a_connection_unprotected_with_a_reason(tmp_path: Path) -> None:
    dp = Dataplane(parse(config(tmp_path, max_total_bytes=65536)))
    open_connection(dp)
    dp.handle(c2s("PA", 1001, 5001, b"a" * 60000), 1.2)
    commit(dp)
    dp.handle(c2s("PA", 61001, 5001, b"b" * 10000), 1.3)
    commit(dp)
    (rec,) = dp.connections()
    assert rec.log.overflow == STORE_FULL
    assert rec.unprotected_reason == STORE_FULL
    assert rec.commit_offset == 60000  # what was durable stays so


def test_an_unprotected_connection_is_not_held_at_its_stuck_commit_point(tmp_path: Path) -> None:
    """Its log stopped (here the store full; also max_log_bytes): its commit point no longer
    moves, so the client's acknowledgments above it pass (held, the client would stall)."""
    dp = Dataplane(parse(config(tmp_path, max_total_bytes=65536)))
    open_connection(dp)
    dp.handle(c2s("PA", 1001, 5001, b"a" * 60000), 1.2)
    commit(dp)
    dp.handle(c2s("PA", 61001, 5001, b"b" * 10000), 1.3)
    first = s2c("A", 5001, 71001)
    assert dp.handle(first, 1.3) is Verdict.REWRITTEN  # not yet known to be over the limit: lowered to the
    assert IP(bytes(first))[TCP].ack == 61001           # commit point the client has not heard of yet
    assert dp.handle(s2c("A", 5001, 71001), 1.3) is Verdict.DROP  # then held
    commit(dp)
    (rec,) = dp.connections()
    assert rec.commit_offset == 60000 and not rec.protected
    assert dp.handle(s2c("A", 5001, 71001), 1.4) is Verdict.ACCEPT  # the client hears of its 70000 bytes
    data = s2c("PA", 5001, 71001, b"reply")
    assert dp.handle(data, 1.4) is Verdict.ACCEPT and IP(bytes(data))[TCP].ack == 71001  # not clamped
    assert dp.gate is not None and rec.id not in dp.gate.held


def test_sqlite_round_trip_restores_record_log_and_digest(tmp_path: Path) -> None:
    backend = SqliteBackend(tmp_path / "cp.db")
    dp = Dataplane(parse(config(tmp_path)))
    open_connection(dp, backend)
    body = bytes(range(256)) * 40
    dp.handle(c2s("PA", 1001, 5001, body), 1.2)
    commit(dp, backend)
    seq = 5001
    for i in range(0, CHUNK + 5000, 1000):  # a full chunk and a bit: one hash plus a blind partial
        dp.handle(s2c("PA", seq, 1001 + len(body), b"s" * 1000), 1.3)
        seq += 1000
    dp.store.ici_interval = 0
    commit(dp, backend)
    (rec,) = dp.connections()
    backend.close()

    again = SqliteBackend(tmp_path / "cp.db")
    (loaded,) = again.load()
    r = loaded.rec
    assert r.id == rec.id and r.key == rec.key and r.backend == "primary"
    assert (r.client.isn, r.server.isn, r.client.mss, r.server.mss) == (1000, 5000, 1460, 1400)
    assert bytes(r.log.data) == body
    assert r.digest.chunks[0] == rec.digest.chunks[0] and r.digest.end >= CHUNK
    assert abs(loaded.saved_at - time.time()) < 60


def test_forgotten_connections_leave_the_store(tmp_path: Path) -> None:
    backend = SqliteBackend(tmp_path / "cp.db")
    dp = Dataplane(parse(config(tmp_path)))
    open_connection(dp, backend)
    (rec,) = dp.connections()
    dp.table.timeouts.established = 0.0
    dp.expire(10_000.0)
    commit(dp, backend)
    assert backend.load() == []


def test_restart_reattaches_and_refuses_stale_checkpoints(tmp_path: Path) -> None:
    backend = SqliteBackend(tmp_path / "cp.db")
    dp = Dataplane(parse(config(tmp_path)))
    open_connection(dp, backend)
    dp.handle(c2s("PA", 1001, 5001, b"a" * 100), 1.2)
    commit(dp, backend)
    loaded = backend.load()

    gw = Gateway(parse(config(tmp_path)))
    assert gw.restore(copy.deepcopy(loaded)) == {"reattached": 1, "reset": 0}
    (rec,) = gw.dataplane.connections()
    assert rec.commit_offset == 100 and bytes(rec.log.data) == b"a" * 100 and rec.protected
    assert 0 <= gw.connection(rec.id)["checkpoint_age"] < 60  # read back: as old as its last commit
    # the tracker takes it up from the wire: the server's next packet passes, new ids come after it
    assert gw.dataplane.handle(s2c("A", 5001, 1101), 2.0) is Verdict.ACCEPT

    old = Gateway(parse(config(tmp_path)), clock=lambda: time.time() + 500)  # 500 s later: over the MSL
    assert old.restore(copy.deepcopy(loaded)) == {"reattached": 0, "reset": 1}
    ev = old.events.last("reset")
    assert "MSL" in ev.reason
    assert any(o.to == "client" and o.flags & 0x04 for o in old.dataplane.outbox)


def test_open_mode_marks_connections_that_passed_unlogged_bytes(tmp_path: Path) -> None:
    backend = SqliteBackend(tmp_path / "cp.db")
    dp = Dataplane(parse(config(tmp_path)))
    open_connection(dp, backend)
    loaded = backend.load()
    gw = Gateway(parse(config(tmp_path)))  # on_failure = "open" is the default
    gw.restore(loaded)
    (rec,) = gw.dataplane.connections()
    # while the appliance was down 500 client bytes went straight to the backend
    gw.dataplane.handle(s2c("A", 5001, 1501), 2.0)
    assert not rec.protected and "unlogged" in rec.unprotected_reason


def taken_over(tmp_path: Path) -> tuple[Gateway, ConnectionRecord]:
    """A connection opened on one gateway, checkpointed, then re-attached by another at a pair's
    takeover (nothing logged yet: its commit point is ISN + 1)."""
    backend = SqliteBackend(tmp_path / "cp.db")
    open_connection(Dataplane(parse(config(tmp_path))), backend)
    gw = Gateway(parse(config(tmp_path)))
    gw.restore(backend.load(), takeover=True)
    (rec,) = gw.dataplane.connections()
    return gw, rec


def test_at_a_takeover_a_backend_ahead_of_the_log_holds_bytes_the_client_sends_again(tmp_path: Path) -> None:
    """A pair's takeover: the backend acknowledging more than the replicated log means bytes
    forwarded before their commit (nothing bypassed the new active's queues): the client was
    never told of them and sends them again, the log gets them, the connection stays protected."""
    gw, rec = taken_over(tmp_path)
    first = s2c("A", 5001, 1501)
    assert gw.dataplane.handle(first, 2.0) is Verdict.REWRITTEN  # lowered to the commit point (1001)
    assert IP(bytes(first))[TCP].ack == 1001 and rec.protected
    assert gw.dataplane.handle(c2s("PA", 1001, 5001, b"r" * 500), 2.1) is Verdict.REWRITTEN  # sent again
    assert rec.log.end == 500 and rec.protected


def test_a_lowered_ack_echoes_the_clients_newest_tsval_not_the_backends_stale_one(tmp_path: Path) -> None:
    """After a takeover the backend holds bytes the log lacks: the client's resent segments are
    duplicates to it, which never refresh its TS.Recent, so its ACKs keep echoing a TSval from
    before the outage.  Lowered to the commit point, such an ACK must echo the client's newest
    TSval, or every one of them is an RTT sample of the whole outage and the client's
    retransmission timer backs off to a minute (the pair's upload test stalled so)."""
    gw, rec = taken_over(tmp_path)
    resent = c2s("PA", 1001, 5001, b"r" * 500, options=[("Timestamp", (900, 7000))])
    assert gw.dataplane.handle(resent, 2.0) is Verdict.REWRITTEN
    dup = s2c("A", 5001, 1801, options=[("Timestamp", (7100, 150)), ("SAck", (1001, 1501))])
    assert gw.dataplane.handle(dup, 2.0) is Verdict.REWRITTEN          # lowered to the commit point
    p = IP(bytes(dup))
    assert p[TCP].ack == 1001 and dict(p[TCP].options)["Timestamp"] == (7100, 900)
    q = IP(bytes(dup))
    del q.chksum
    del q[TCP].chksum
    assert IP(bytes(q))[TCP].chksum == p[TCP].chksum


def test_after_a_restart_an_overflowed_log_still_lets_the_backend_through(tmp_path: Path) -> None:
    """Issue 10's _check_reloaded bug: a connection whose log had overflowed before the restart
    had its first backend packet dropped, without a reset or a reason.  It passes (the connection
    stays, unprotected, with its reason)."""
    from appliance.dataplane import ResumeRefused

    backend = SqliteBackend(tmp_path / "cp.db")
    dp = Dataplane(parse(config(tmp_path)))
    open_connection(dp, backend)
    loaded = backend.load()
    loaded[0].rec.log.overflow = "client log over max_log_bytes"
    gw = Gateway(parse(config(tmp_path)))
    gw.restore(loaded)
    (rec,) = gw.dataplane.connections()
    assert gw.dataplane.handle(s2c("A", 5001, 1001, b"x" * 100), 2.0) is not Verdict.DROP
    assert not any(isinstance(e, ResumeRefused) for e in iter(gw.dataplane.next_event, None))
    assert rec.state.value != "CLOSED" and not rec.protected and "max_log_bytes" in rec.unprotected_reason


def test_planner_keeps_one_batch_in_flight() -> None:
    p = CommitPlanner()
    cfg = parse({"api": {"token": "a-long-token"}, "store": {"mode": "disk", "path": "/tmp/x.db"},
                 "service": [{"name": "web", "vip": VIP, "port": 80,
                              "backend": [{"name": "primary", "address": PRIMARY}]}]})
    dp = Dataplane(cfg)
    dp.store = p
    dp.handle(c2s("S", 1000), 1.0)
    first = p.plan(1.0)
    assert first is not None and p.plan(1.0) is None  # the next one waits for the first to be durable
    p.failed(first)
    assert p.plan(1.0) is not None  # a failed write leaves everything to write again


def test_a_backend_2_31_bytes_past_the_checkpoint_is_refused_on_its_first_packet(tmp_path: Path) -> None:
    backend = SqliteBackend(tmp_path / "cp.db")
    dp = Dataplane(parse(config(tmp_path)))
    open_connection(dp, backend)
    gw = Gateway(parse(config(tmp_path)))
    gw.restore(backend.load())
    (rec,) = gw.dataplane.connections()
    far = (5001 + (1 << 31) + 10) & 0xFFFFFFFF  # cannot be told from 2**31 - 10 bytes *behind*
    assert gw.dataplane.handle(s2c("A", far, 1001), 2.0) is Verdict.DROP
    gw.dataplane.poll(2.0)
    gw.tick()
    ev = gw.events.last("reset")
    assert "2**31" in ev.reason and rec.state.value == "CLOSED"


def test_a_fin_acknowledged_before_its_commit_is_acknowledged_again_after_it(tmp_path: Path) -> None:
    """The backend's FIN carries the ACK of the client's FIN: clamped, the client
    is still owed it, and gets it from the gateway once the FIN is durable
    (a passive closer that saw its FIN acknowledged has no socket to answer a
    retransmitted client FIN but a RST)."""
    dp = Dataplane(parse(config(tmp_path)))
    open_connection(dp)
    dp.handle(c2s("FA", 1001, 5001, options=[("Timestamp", (103, 7000))]), 1.2)
    (rec,) = dp.connections()
    rec.server_close_ok = True  # a probe found the backend alive: its FIN is genuine
    fin = s2c("FA", 5001, 1002, options=[("Timestamp", (7005, 103))])
    assert dp.handle(fin, 1.2) is Verdict.REWRITTEN
    assert IP(bytes(fin))[TCP].ack == 1001 and IP(bytes(fin))[TCP].flags == "FA"
    commit(dp)
    (owed,) = dp.raw_out
    p = IP(bytes(owed))
    assert (p.src, p[TCP].sport, p[TCP].flags, p[TCP].seq, p[TCP].ack) == (VIP, 80, "A", 5002, 1002)
    assert dict(p[TCP].options)["Timestamp"] == (7005, 103)


def test_a_restored_digest_follows_the_server_over_the_gap_then_settles(tmp_path: Path) -> None:
    """After a restart the server retransmits across the restore point, then leaps
    past what the client already holds: the digest must follow (not fill up with
    out-of-order segments and leave the connection unprotected), and stop jumping
    once it has passed what the client acknowledged."""
    backend = SqliteBackend(tmp_path / "cp.db")
    dp = Dataplane(parse(config(tmp_path)))
    open_connection(dp, backend)
    (rec,) = dp.connections()
    rec.server_close_ok = True
    dp.store.ici_interval = 0
    seq = 5001
    for _ in range(100):  # 144 800 bytes: two full chunks and a partial one
        dp.handle(s2c("A", seq, 1001, b"s" * 1448), 1.3)
        seq += 1448
    commit(dp, backend)
    gw = Gateway(parse(config(tmp_path)))
    gw.restore(backend.load())
    dp2 = gw.dataplane
    (r,) = dp2.connections()
    # the old process forwarded 300 more segments the store never saw; the client has them all
    far = seq + 300 * 1448
    dp2.handle(s2c("A", seq - 1448, 1001, b"s" * 1448), 2.0)  # a retransmission across the restore point
    dp2.handle(c2s("A", 1001, far), 2.0)                       # the client: "I have everything up to far"
    for i in range(300):                                       # new data, far past the restore point
        dp2.handle(s2c("A", far + i * 1448, 1001, b"t" * 1448), 2.1)
    assert r.protected, r.unprotected_reason
    assert not r.digest.resync and r.digest.end == seq_off(far, 5000) + 300 * 1448
    dp2.handle(s2c("A", far + 302 * 1448, 1001, b"t" * 1448), 2.2)  # settled: a real gap now waits
    assert len(r.digest.ooo) == 1


def seq_off(seq: int, isn: int) -> int:
    return seq - isn - 1


def test_metrics_count_delayed_acks_and_group_commits(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from webui.app import create_app

    gw = Gateway(parse(config(tmp_path)))
    open_connection(gw.dataplane)  # one SYN-ACK held, one commit
    r = TestClient(create_app(gw)).get("/metrics", headers={"Authorization": "Bearer a-long-token"})
    fams = {f.name: f.samples for f in text_string_to_metric_families(r.text)}
    held = {s.labels["action"]: s.value for s in fams["gateway_delayed_acks"] if s.name.endswith("_total")}
    assert held == {"held": 1, "clamped": 0, "released": 1}
    (commits,) = [s for s in fams["gateway_store_commits"] if s.name.endswith("_total")]
    assert commits.labels == {"mode": "disk"} and commits.value == 1
