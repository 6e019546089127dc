"""Connection history and the per-connection log line, over a real Gateway driven with crafted
packets (no kernel): what is kept when a connection is over, its bounds, and the API's answers."""

from __future__ import annotations

import io
import json

from fastapi.testclient import TestClient
from scapy.all import IP, TCP, Raw

from appliance import connlog, history, packetring
from appliance.config import ConfigError, parse
from appliance.gateway import Gateway
from checkpoint.segment import SYN
from webui.app import create_app

import pytest

TOKEN = "history-token-123456"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
C, VIP, P, B = "192.0.2.10", "203.0.113.10", "198.51.100.10", "198.51.100.20"
REQ = b"GET / HTTP/1.1\r\n\r\n"
RESP = b"HTTP/1.1 200 OK\r\n"


def config(**extra: object) -> dict:
    return {"api": {"token": TOKEN}, **extra,
            "service": [{"name": "web", "vip": VIP, "port": 80,
                         "backend": [{"name": "primary", "address": P}, {"name": "backup", "address": B}]}]}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def gateway(**extra: object) -> tuple[Gateway, Clock]:
    clock = Clock()
    gw = Gateway(parse(config(**extra)), clock=clock)
    packetring.attach(gw)
    return gw, clock


def send(gw: Gateway, pkt: object) -> None:
    buf = bytearray(bytes(pkt))  # type: ignore[call-overload]
    now = gw.clock()
    ring = packetring.of(gw)
    assert ring is not None
    ring.record(buf, now)
    gw.dataplane.handle(buf, now)
    gw.flush()


def cli(sport: int, flags: str, seq: int, ack: int = 0, data: bytes = b"") -> object:
    p = IP(src=C, dst=VIP) / TCP(sport=sport, dport=80, flags=flags, seq=seq, ack=ack)
    return p / Raw(data) if data else p


def srv(src: str, sport: int, flags: str, seq: int, ack: int, data: bytes = b"") -> object:
    p = IP(src=src, dst=C) / TCP(sport=80, dport=sport, flags=flags, seq=seq, ack=ack)
    return p / Raw(data) if data else p


def connect(gw: Gateway, sport: int) -> None:
    """Handshake, a request and the primary's answer (client ISN 1000, primary's 5000)."""
    send(gw, cli(sport, "S", 1000))
    send(gw, srv(P, sport, "SA", 5000, 1001))
    send(gw, cli(sport, "A", 1001, 5001))
    send(gw, cli(sport, "PA", 1001, 5001, REQ))
    send(gw, srv(P, sport, "PA", 5001, 1001 + len(REQ), RESP))


def client_closes(gw: Gateway, sport: int, src: str = P, srv_seq: int = 5001 + len(RESP)) -> None:
    fin = 1001 + len(REQ)
    send(gw, cli(sport, "FA", fin, 5001 + len(RESP)))
    server_fin(gw, sport, src, srv_seq, fin + 1)
    send(gw, cli(sport, "A", fin + 1, 5001 + len(RESP) + 1))


def server_fin(gw: Gateway, sport: int, src: str, seq: int, ack: int) -> None:
    """A backend's FIN is held until a probe says the backend lives (here: no health checker, let
    through at once); the backend retransmits it, and that one passes.  A moved connection's
    FIN from its new backend is not held."""
    held = gw.dataplane.counters.held_closes
    send(gw, srv(src, sport, "FA", seq, ack))
    if gw.dataplane.counters.held_closes > held:
        send(gw, srv(src, sport, "FA", seq, ack))


def move_to_backup(gw: Gateway, sport: int, clock: Clock) -> None:
    """Fail over and play the backup's side of the replay until the move is verified."""
    gw.failover("web")
    syn = next(o for o in gw.unsent if o.flags == SYN and o.dport == 80 and o.sport == sport)
    clock.t += 0.01
    send(gw, srv(B, sport, "SA", 9000, syn.seq + 1))
    clock.t += 0.01
    send(gw, srv(B, sport, "PA", 9001, 1001 + len(REQ), RESP))  # the same answer, regenerated
    gw.tick()


def test_a_closed_connection_is_kept_with_its_record_timeline_and_packets() -> None:
    gw, clock = gateway()
    connect(gw, 40000)
    clock.t += 2.5
    client_closes(gw, 40000)
    h = history.of(gw)
    assert h is not None
    entry = h.get(1)
    assert entry is not None and not entry.moved
    d = entry.doc
    assert d["closed"] is True and d["why"] == "closed" and d["closed_at"] == clock.t
    assert d["state"] == "TIME_WAIT" and d["bytes_from_client"] == len(REQ) and d["bytes_from_server"] == len(RESP)
    assert d["backends"] == ["primary"] and entry.first_fin == "client"
    # the pcap copy: a pcap header and the connection's 9 packets
    assert entry.pcap[:4] == bytes.fromhex("d4c3b2a1") and len(packetring_records(entry.pcap)) == 9
    # the live record is still in the table (finished timeout); shown once, from the history
    assert gw.dataplane.table.by_id(1) is not None
    c = TestClient(create_app(gw))
    r = c.get("/api/v1/connections", headers=AUTH)
    assert [x["id"] for x in r.json()] == [1] and r.json()[0]["closed"] is True
    # it expires from the table: the API still answers, 200 with closed
    clock.t += 60
    gw.service()
    assert gw.dataplane.table.by_id(1) is None
    one = c.get("/api/v1/connections/1", headers=AUTH)
    assert one.status_code == 200 and one.json()["closed"] is True and one.json()["why"] == "closed"
    pcap = c.get("/api/v1/connections/1/pcap", headers=AUTH)
    assert pcap.status_code == 200 and pcap.content == entry.pcap
    assert c.get("/api/v1/connections/2", headers=AUTH).status_code == 404


def packetring_records(pcap: bytes) -> list[bytes]:
    out, off = [], 24
    while off < len(pcap):
        incl = int.from_bytes(pcap[off + 8:off + 12], "little")
        out.append(pcap[off + 16:off + 16 + incl])
        off += 16 + incl
    return out


def test_moved_connection_keeps_its_moves_timings_and_filters() -> None:
    gw, clock = gateway()
    connect(gw, 40000)
    connect(gw, 40001)
    server_fin(gw, 40001, P, 5001 + len(RESP), 1001 + len(REQ))  # the server closes the second one
    send(gw, cli(40001, "FA", 1001 + len(REQ), 5001 + len(RESP) + 1))
    send(gw, srv(P, 40001, "A", 5001 + len(RESP) + 1, 1001 + len(REQ) + 1))
    move_to_backup(gw, 40000, clock)
    mig = [e for e in gw.events.list(kind="migration", limit=None) if e.connection == 1]
    assert mig and mig[-1].reason == "moved", [e.to_dict() for e in gw.events.list(limit=None)]
    clock.t += 1
    client_closes(gw, 40000, src=B, srv_seq=9001 + len(RESP))
    h = history.of(gw)
    assert h is not None
    moved = h.get(1)
    assert moved is not None and moved.moved and moved.doc["backends"] == ["primary", "backup"]
    kinds = [e["kind"] for e in moved.events]
    assert kinds[:2] == ["failover", "migration"]
    assert moved.doc["move"] is not None and moved.doc["move"]["timings_ms"]
    second = h.get(2)
    assert second is not None and not second.moved and second.first_fin == "server"
    c = TestClient(create_app(gw))
    ids = lambda q: [x["id"] for x in c.get(f"/api/v1/connections?{q}", headers=AUTH).json()]  # noqa: E731
    assert ids("closed=true") == [1, 2] and ids("moved=true") == [1] and ids("moved=false") == [2]
    assert ids("closed=false") == []
    connect(gw, 40002)  # a live one (to the backup now)
    assert ids("closed=false") == [3] and ids("closed=false&moved=true") == []
    assert ids("") == [1, 2, 3]
    # the panel: the closed, moved connection's page and the list's filters
    token_login(c)
    page = c.get("/connections/1")
    assert page.status_code == 200 and "Closed" in page.text and 'id="moves"' in page.text
    assert "primary → backup" in page.text and "replay" in page.text
    listing = c.get("/connections?closed=true&moved=true")
    assert listing.status_code == 200 and '<a href="/connections/1">' in listing.text
    assert '<a href="/connections/2">' not in listing.text
    # the log lines: a client FIN, a server FIN, the move
    lines = [connlog.connection_record(e.doc, e.doc["why"], e.events, e.first_fin) for e in (moved, second)]
    assert [r["termination_state"] for r in lines] == ["CF", "SF"]
    assert lines[0]["backends"] == ["primary", "backup"] and lines[0]["moves"][0]["strategy"] == "replay"
    assert lines[0]["moves"][0]["timings_ms"] and lines[0]["bytes_from_server"] == len(RESP)
    assert "CF" in connlog.text_line(lines[0]) and "moves=replay:primary>backup" in connlog.text_line(lines[0])


def token_login(c: TestClient) -> None:
    r = c.post("/login", data={"token": TOKEN}, follow_redirects=False)
    assert r.status_code == 303


def test_history_is_bounded_by_count_and_by_bytes() -> None:
    gw, clock = gateway(history={"max_connections": 3})
    for port in range(40000, 40005):
        connect(gw, port)
        client_closes(gw, port)
    h = history.of(gw)
    assert h is not None
    assert [e.id for e in h] == [3, 4, 5] and h.dropped == 2 and h.dropped_bytes > 0
    one = h.get(5)
    assert one is not None
    per = one.size
    gw2, _ = gateway(history={"max_bytes": per * 2 + per // 2})
    for port in range(40000, 40005):
        connect(gw2, port)
        client_closes(gw2, port)
    h2 = history.of(gw2)
    assert h2 is not None
    assert [e.id for e in h2] == [4, 5] and h2.dropped == 3 and h2.bytes <= per * 2 + per // 2
    # dropped from the history and expired from the table: 404
    clock.t += 60
    gw.service()
    c = TestClient(create_app(gw))
    assert c.get("/api/v1/connections/1", headers=AUTH).status_code == 404
    assert c.get("/api/v1/connections/5", headers=AUTH).json()["closed"] is True


def test_reset_from_the_api_is_a_gateway_reset_in_history_and_log() -> None:
    gw, clock = gateway(log={"connections": "stdout", "format": "json"})
    out = io.StringIO()
    cl = connlog.attach(gw, stream=out)
    try:
        connect(gw, 40000)
        c = TestClient(create_app(gw))
        assert c.delete("/api/v1/connections/1", headers=AUTH).status_code == 200
        entry = history.of(gw).get(1)  # type: ignore[union-attr]
        assert entry is not None and entry.doc["why"] == "reset" and entry.doc["backends"] == ["primary"]
        # the reset event, added just after the reset, joins the timeline
        assert any(e["kind"] == "reset" for e in entry.events)
    finally:
        cl.close()
    (line,) = [json.loads(x) for x in out.getvalue().splitlines()]
    assert line["type"] == "connection" and line["termination_state"] == "GR" and line["id"] == 1
    assert line["backends"] == ["primary"] and line["bytes_from_client"] == len(REQ)
    assert line["bytes_from_server"] == len(RESP) and line["moved"] is False


def test_unprotected_connection_reset_at_failover_is_U_and_failover_line() -> None:
    gw, clock = gateway()
    out = io.StringIO()
    cl = connlog.ConnLog(gw, "stdout", "json", stream=out)
    try:
        # picked up mid-stream: unprotected
        send(gw, cli(40000, "PA", 1001, 5001, REQ))
        send(gw, srv(P, 40000, "A", 5001, 1001 + len(REQ)))
        ev = gw.failover("web")
        cl.on_event(ev)  # (the daemon's task follows the event log: follow_events)
    finally:
        cl.close()
    rows = [json.loads(x) for x in out.getvalue().splitlines()]
    conn = next(r for r in rows if r["type"] == "connection")
    assert conn["termination_state"] == "UR" and conn["backends"] == ["primary"]
    fo = next(r for r in rows if r["type"] == "failover")
    assert fo["from"] == "primary" and fo["to"] == "backup"


def test_idle_and_text_format_and_off() -> None:
    gw, clock = gateway(gateway={"timeouts": {"established": 5}})
    out = io.StringIO()
    cl = connlog.ConnLog(gw, "stdout", "text", stream=out)
    off = connlog.ConnLog(gw, "off")
    try:
        connect(gw, 40000)
        clock.t += 30
        gw.service()
    finally:
        cl.close()
        off.close()
    (line,) = out.getvalue().splitlines()
    assert " conn 1 192.0.2.10:40000 web/primary IT " in line and "why=idle" in line and "up=18" in line
    assert off.lines == 0


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"history\.max_connections"):
        parse(config(history={"max_connections": -1}))
    with pytest.raises(ConfigError, match=r"log\.connections"):
        parse(config(log={"connections": "syslog"}))
    with pytest.raises(ConfigError, match=r"log\.format"):
        parse(config(log={"format": "xml"}))
    with pytest.raises(ConfigError, match=r"history\.bogus"):
        parse(config(history={"bogus": 1}))
    cfg = parse(config(log={"connections": "file", "path": "conn.log"}))
    assert cfg.log.connections == "file" and cfg.log.path.endswith("conn.log")
    assert cfg.history.max_connections == 10000 and cfg.history.max_bytes == 64 << 20
