"""A connection moved by replay survives a restart of the gateway (issue 13 item 8), without a
kernel: a Gateway with a disk store in a temporary directory moves a connection of each family to
the backup, the store is flushed, a new Gateway reads it back, and the next packets of both sides
come out exactly as the first gateway would have sent them (scapy builds and reads every packet).
A connection caught mid-move is reset on both sides with an event; the old primary stays fenced;
the kernel's moved set is told of the restored flows; a store written before the move state
existed still opens."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from scapy.all import IP, TCP, IPv6, Raw

from appliance.config import parse
from appliance.gateway import Gateway
from checkpoint.io import sqlite as sqlite_io
from checkpoint.io.sqlite import SqliteBackend
from checkpoint.segment import RST
from checkpoint.splice import Phase
from nfq.queue import Verdict

VIP4, VIP6 = "203.0.113.10", "2001:db8:113::10"
P4, P6, B4, B6 = "198.51.100.10", "2001:db8:100::10", "198.51.100.20", "2001:db8:100::20"
C4, C6 = "192.0.2.10", "2001:db8:2::10"
REQUEST = b"GET /file HTTP/1.1\r\nHost: x\r\n\r\n"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
MORE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
TS = [("NOP", None), ("NOP", None)]
FAMILIES = [(C4, VIP4, P4, B4, 40000), (C6, VIP6, P6, B6, 40001)]


def config(tmp_path: Path) -> dict:
    return {"api": {"token": "a-long-token"}, "store": {"mode": "disk", "path": str(tmp_path / "cp.db")},
            "service": [{"name": "web", "vip": VIP4, "vip6": VIP6, "port": 80,
                         "backend": [{"name": "primary", "address": P4, "address6": P6},
                                     {"name": "backup", "address": B4, "address6": B6}]}]}


def pkt(src: str, dst: str, sport: int, dport: int, flags: str, seq: int, ack: int, ts: tuple[int, int],
        data: bytes = b"", syn_opts: bool = False) -> bytearray:
    opts = ([("MSS", 1400), ("SAckOK", b""), ("Timestamp", ts), ("WScale", 7)] if syn_opts
            else TS + [("Timestamp", ts)])
    ip = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
    p = ip / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=502, options=opts)
    return bytearray(bytes(p / Raw(data) if data else p))


def parsed(buf: bytes | bytearray):
    return IPv6(bytes(buf)) if buf[0] >> 4 == 6 else IP(bytes(buf))


def commit(gw: Gateway, backend: SqliteBackend) -> None:
    """One group commit, as the daemon's committer does it."""
    dp = gw.dataplane
    assert dp.store is not None
    batch = dp.store.plan(time.time())
    if batch is None:
        return
    backend.write(batch)
    dp.committed(dp.store.done(batch))
    gw.flush()


def connect(gw: Gateway, backend: SqliteBackend, client: str, vip: str, server: str, port: int) -> None:
    """Handshake, a request, the first 20 bytes of the answer and the client's ACK of them, each
    step committed so that no acknowledgment is held."""
    h = gw.dataplane.handle
    assert h(pkt(client, vip, port, 80, "S", 1000, 0, (100, 0), syn_opts=True), 1.0) is Verdict.REWRITTEN
    commit(gw, backend)
    assert h(pkt(server, client, 80, port, "SA", 5000, 1001, (7000, 100), syn_opts=True), 1.0) is Verdict.ACCEPT
    assert h(pkt(client, vip, port, 80, "A", 1001, 5001, (101, 7000)), 1.0) is Verdict.REWRITTEN
    assert h(pkt(client, vip, port, 80, "PA", 1001, 5001, (102, 7000), REQUEST), 1.0) is Verdict.REWRITTEN
    commit(gw, backend)
    assert h(pkt(server, client, 80, port, "PA", 5001, 1001 + len(REQUEST), (7001, 102), ANSWER[:20]),
             1.0) is Verdict.ACCEPT
    assert h(pkt(client, vip, port, 80, "A", 1001 + len(REQUEST), 5021, (103, 7001)), 1.0) is Verdict.REWRITTEN
    commit(gw, backend)


def move_to_backup(gw: Gateway, backend: SqliteBackend) -> None:
    """A failover of both connections, and the backup taking each over to the steady state:
    its SYN-ACK, its ACK of the replayed request, the whole answer regenerated (its first 20 bytes
    verified against what the client has, then all of it forwarded translated), the client's ACK."""
    h = gw.dataplane.handle
    ev = gw.failover("web")
    assert sorted(ev["details"]["moved"]) == [1, 2]
    for client, vip, _, bk, port in FAMILIES:
        assert h(pkt(bk, client, 80, port, "SA", 90000, 1001, (50, 102), syn_opts=True), 2.0) is Verdict.DROP
        assert h(pkt(bk, client, 80, port, "A", 90001, 1001 + len(REQUEST), (51, 102)), 2.0) is Verdict.DROP
        v = h(pkt(bk, client, 80, port, "PA", 90001, 1001 + len(REQUEST), (52, 102), ANSWER), 2.0)
        assert v is Verdict.REWRITTEN  # verified (the 20 bytes the client has), translated, to the client
        gw.flush()
        assert h(pkt(client, vip, port, 80, "A", 1001 + len(REQUEST), 5001 + len(ANSWER), (104, 0)),
                 2.1) is Verdict.REWRITTEN
    commit(gw, backend)
    for rec in gw.dataplane.connections():
        sp = gw.dataplane.splice_of(rec.id)
        assert sp is not None and sp.steady and rec.backend == "backup" and rec.moves == 1


def restarted(tmp_path: Path) -> tuple[Gateway, list[tuple[str, int, str, int]], dict]:
    """A new gateway reading the store back (as ``appliance run`` does before its queues), on the
    wall clock the store's commit times are in (a checkpoint older than the MSL is refused)."""
    gw = Gateway(parse(config(tmp_path)))
    flows: list[tuple[str, int, str, int]] = []
    loaded = SqliteBackend(tmp_path / "cp.db").load()
    result = gw.restore(loaded)
    gw.on_moved = flows.extend  # the kernel comes up after the restore (appliance.daemon)
    gw.flush()
    return gw, flows, result


def test_a_moved_connection_of_each_family_survives_a_restart(tmp_path: Path) -> None:
    backend = SqliteBackend(tmp_path / "cp.db")
    old = Gateway(parse(config(tmp_path)), clock=lambda: 2.0)
    for client, vip, server, _, port in FAMILIES:
        connect(old, backend, client, vip, server, port)
    move_to_backup(old, backend)
    rows = dict(sqlite3.connect(tmp_path / "cp.db").execute("SELECT id, move FROM conn").fetchall())
    assert all('"phase":"spliced"' in rows[cid] for cid in (1, 2))

    gw, flows, result = restarted(tmp_path)
    assert result == {"reattached": 2, "reset": 0}
    ev = gw.events.last("restart")
    assert ev is not None and ev.details["moved"] == 2
    # the kernel's moved set holds both flows again (backend address, port, client address, port)
    assert sorted(flows) == sorted([(B4, 80, C4, 40000), (B6, 80, C6, 40001)])
    for client, vip, server, bk, port in FAMILIES:
        rec = gw.dataplane.table.get((client, port, vip, 80))
        assert rec is not None and rec.backend == "backup" and rec.moves == 1
        doc = gw.connection(rec.id)
        assert doc is not None and doc["move"]["phase"] == "SPLICED" and doc["move"]["to"] == "backup"
        sp_new, sp_old = gw.dataplane.splice_of(rec.id), old.dataplane.splice_of(rec.id)
        assert sp_new is not None and sp_old is not None and sp_new.tr == sp_old.tr
        # the backup's next bytes: the same packet out of both gateways, to the byte
        seg = 90001 + len(ANSWER)
        outs = []
        for g in (old, gw):
            buf = pkt(bk, client, 80, port, "PA", seg, 1001 + len(REQUEST), (60, 104), MORE)
            assert g.dataplane.handle(buf, 3.0) is Verdict.REWRITTEN
            outs.append(bytes(buf))
        assert outs[0] == outs[1]
        p = parsed(outs[1])
        assert (p.src, p[TCP].sport, p[TCP].seq) == (vip, 80, 5001 + len(ANSWER)) and bytes(p[Raw].load) == MORE
        tsval = dict(p[TCP].options)["Timestamp"][0]
        assert tsval == (60 + sp_old.tr.ts_delta) & 0xFFFFFFFF
        # the client's acknowledgment of them: translated into the backup's space, both the same
        outs = []
        for g in (old, gw):
            buf = pkt(client, vip, port, 80, "A", 1001 + len(REQUEST), 5001 + len(ANSWER) + len(MORE),
                      (105, tsval))
            assert g.dataplane.handle(buf, 3.0) is Verdict.REWRITTEN
            outs.append(bytes(buf))
        assert outs[0] == outs[1]
        p = parsed(outs[1])
        assert (p.dst, p[TCP].dport, p[TCP].ack) == (bk, 80, seg + len(MORE))
        assert dict(p[TCP].options)["Timestamp"] == (105, 60)
        # the old primary is still fenced: dropped, and answered with a RST on the client's behalf
        gw.unsent.clear()
        late = pkt(server, client, 80, port, "PA", 5021, 1001 + len(REQUEST), (7002, 103), b"late")
        assert gw.dataplane.handle(late, 3.0) is Verdict.DROP
        gw.flush()
        assert [(o.dst, o.flags) for o in gw.unsent if o.to == "old"] == [(server, RST)]
        assert not [o for o in gw.unsent if o.to == "client"]


def test_a_connection_caught_mid_move_is_reset_on_both_sides_with_a_reason(tmp_path: Path) -> None:
    backend = SqliteBackend(tmp_path / "cp.db")
    old = Gateway(parse(config(tmp_path)), clock=lambda: 2.0)
    client, vip, server, bk, port = FAMILIES[1]
    connect(old, backend, client, vip, server, port)
    old.failover("web")  # the SYN to the backup is out, its SYN-ACK never comes before the restart
    commit(old, backend)
    (row,) = sqlite3.connect(tmp_path / "cp.db").execute("SELECT move FROM conn").fetchall()
    assert '"phase":"moving"' in row[0]

    gw, flows, result = restarted(tmp_path)
    assert result == {"reattached": 0, "reset": 1} and flows == []
    ev = gw.events.last("reset")
    assert ev is not None and "mid-move to backup" in ev.reason and "not restarted" in ev.reason
    rsts = [o for o in gw.unsent if o.flags & RST]
    assert {o.dst for o in rsts} == {client, bk}  # the client, and the backup's half-replayed socket
    assert gw.dataplane.connections() == []
    commit(gw, SqliteBackend(tmp_path / "cp.db"))  # its rows go with the next batch: not reset again next time
    assert SqliteBackend(tmp_path / "cp.db").load() == []


def test_a_moved_connection_whose_backup_is_gone_from_the_configuration_is_reset(tmp_path: Path) -> None:
    backend = SqliteBackend(tmp_path / "cp.db")
    old = Gateway(parse(config(tmp_path)), clock=lambda: 2.0)
    for client, vip, server, _, port in FAMILIES:
        connect(old, backend, client, vip, server, port)
    move_to_backup(old, backend)
    cfg = config(tmp_path)
    cfg["service"][0]["backend"][1]["address"] = "198.51.100.30"  # the backup renumbered (IPv4 only)
    gw = Gateway(parse(cfg))
    assert gw.restore(SqliteBackend(tmp_path / "cp.db").load()) == {"reattached": 1, "reset": 1}
    assert "no longer configured" in gw.events.last("reset").reason
    assert [r.client_ip for r in gw.dataplane.connections() if r.state.value == "ESTABLISHED"] == [C6]


def test_a_store_written_before_move_states_existed_opens_and_resets_moved_connections(tmp_path: Path) -> None:
    old_schema = sqlite_io.SCHEMA.replace(",\n    move TEXT", "")
    assert old_schema != sqlite_io.SCHEMA
    db = sqlite3.connect(tmp_path / "cp.db")
    db.executescript(old_schema)
    db.execute("INSERT INTO meta VALUES ('format', ?)", (sqlite_io.FORMAT,))
    db.commit()
    db.close()
    backend = SqliteBackend(tmp_path / "cp.db")
    old = Gateway(parse(config(tmp_path)), clock=lambda: 2.0)
    connect(old, backend, *FAMILIES[0][:3], FAMILIES[0][4])  # written through the migrated store
    columns = {r[1] for r in sqlite3.connect(tmp_path / "cp.db").execute("PRAGMA table_info(conn)")}
    assert "move" in columns
    (loaded,) = SqliteBackend(tmp_path / "cp.db").load()
    assert loaded.move is None
    # a row an older appliance wrote for a moved connection: no move state, so reset as before
    loaded.rec.moves = 1
    gw = Gateway(parse(config(tmp_path)))
    assert gw.restore([loaded]) == {"reattached": 0, "reset": 1}
    assert "not in the checkpoint" in gw.events.last("reset").reason


@pytest.mark.parametrize("bad", ['{"version": 2, "phase": "spliced"}', "not json"])
def test_an_unreadable_move_state_resets_the_connection_with_the_reason(tmp_path: Path, bad: str) -> None:
    backend = SqliteBackend(tmp_path / "cp.db")
    old = Gateway(parse(config(tmp_path)), clock=lambda: 2.0)
    for client, vip, server, _, port in FAMILIES:
        connect(old, backend, client, vip, server, port)
    move_to_backup(old, backend)
    db = sqlite3.connect(tmp_path / "cp.db")
    db.execute("UPDATE conn SET move = ? WHERE id = 1", (bad,))
    db.commit()
    gw, flows, result = restarted(tmp_path)
    assert result == {"reattached": 1, "reset": 1} and flows == [(B6, 80, C6, 40001)]
    assert "move state cannot be read back" in gw.events.last("reset").reason
    assert gw.dataplane.splice_of(2) is not None and gw.dataplane.splice_of(2).phase is Phase.SPLICED


def test_a_takeover_restarts_a_move_it_caught_midway(tmp_path: Path) -> None:
    """The pair's rule (``takeover=True``): the connection goes on with the backend it was
    leaving, the backup's half-replayed socket is drawn out by a probe and reset at exactly its
    rcv_nxt, then the move starts again with a new SYN to the backup."""
    import asyncio

    backend = SqliteBackend(tmp_path / "cp.db")
    old = Gateway(parse(config(tmp_path)), clock=lambda: 2.0)
    client, vip, server, bk, port = FAMILIES[0]
    connect(old, backend, client, vip, server, port)
    old.failover("web")  # the SYN to the backup is out, the takeover comes before its SYN-ACK
    commit(old, backend)

    gw = Gateway(parse(config(tmp_path)))
    result = gw.restore(SqliteBackend(tmp_path / "cp.db").load(), takeover=True)
    gw.flush()
    assert result == {"reattached": 1, "reset": 0, "restart": [(1, "backup")]}
    rec = gw.dataplane.table.by_id(1)
    assert rec is not None and rec.backend == "primary" and rec.backend_ip == server and rec.moves == 0
    ev = gw.events.last("restart")
    assert ev is not None and ev.details["restarted"] == 1 and "the takeover" in ev.reason
    # the probe: far below the backup's window, on the client's 4-tuple
    (probe,) = [o for o in gw.unsent if o.dst == bk]
    assert (probe.src, probe.sport, probe.dport, probe.flags) == (client, port, 80, 0x10)
    assert (1001 - probe.seq) % (1 << 32) == (1 << 30) + 1
    gw.unsent.clear()
    # the half-replayed socket answers with a duplicate ACK at its rcv_nxt: dropped, and reset there
    dup = pkt(bk, client, 80, port, "A", 90001, 1001 + 7, (55, 102))
    assert gw.dataplane.handle(dup, 3.0) is Verdict.DROP
    gw.flush()
    assert [(o.dst, o.seq, o.flags) for o in gw.unsent] == [(bk, 1001 + 7, RST)]
    assert gw.dataplane.fenced_at(1) is not None
    gw.unsent.clear()
    # the client's next segment still reaches the primary (the connection goes on there)
    buf = pkt(client, vip, port, 80, "A", 1001 + len(REQUEST), 5021, (104, 7001))
    assert gw.dataplane.handle(buf, 3.0) is Verdict.REWRITTEN and parsed(buf).dst == server
    # then the move starts again: a SYN to the backup with the client's ISN
    asyncio.run(gw.restart_move(1, "backup"))
    syns = [o for o in gw.unsent if o.dst == bk and o.flags & 0x02]
    assert [(o.seq, o.sport) for o in syns] == [(1000, port)]
    assert gw.dataplane.splice_of(1) is not None and rec.backend == "backup" and rec.moves == 1
    assert gw.events.last("migration") is not None and "mid-move" in gw.events.last("migration").reason


def test_a_takeover_resets_a_connection_caught_in_its_second_move(tmp_path: Path) -> None:
    """Moved once already, the old backend's sequence space is not the client's: not restarted."""
    backend = SqliteBackend(tmp_path / "cp.db")
    old = Gateway(parse(config(tmp_path)), clock=lambda: 2.0)
    for client, vip, server, _, port in FAMILIES:
        connect(old, backend, client, vip, server, port)
    move_to_backup(old, backend)
    old.failover("web", to="primary")  # moving back: caught midway
    commit(old, backend)
    gw = Gateway(parse(config(tmp_path)))
    result = gw.restore(SqliteBackend(tmp_path / "cp.db").load(), takeover=True)
    assert result == {"reattached": 0, "reset": 2, "restart": []}
    ev = gw.events.last("reset")
    assert ev is not None and "the takeover caught it mid-move to primary" in ev.reason
