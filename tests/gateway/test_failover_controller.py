"""The failover controller over a real Gateway and Dataplane, without a kernel:
what it decides, and what it would send (collected in ``unsent``)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from scapy.all import IP, TCP, Raw

from appliance.config import parse
from appliance.errors import Conflict, NotFound
from appliance.gateway import Gateway
from checkpoint.segment import ACK, RST, SYN
from webui.app import create_app

TOKEN = "controller-token"
C, VIP, P, B = "192.0.2.10", "203.0.113.10", "198.51.100.10", "198.51.100.20"


def config(**failover) -> dict:
    return {"api": {"token": TOKEN},
            "service": [{"name": "web", "vip": VIP, "port": 80, "failover": failover,
                         "backend": [{"name": "primary", "address": P}, {"name": "backup", "address": B},
                                     {"name": "spare", "address": "198.51.100.30", "admin_state": "maint"}]}]}


def connect(gw: Gateway, sport: int = 40000, request: bytes = b"GET / HTTP/1.1\r\n\r\n") -> None:
    h = gw.dataplane.handle
    ts = [("NOP", None), ("NOP", None)]
    h(bytearray(bytes(IP(src=C, dst=VIP) / TCP(sport=sport, dport=80, flags="S", seq=1000,
                                               options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (100, 0)),
                                                        ("WScale", 7)]))), 1.0)
    h(bytearray(bytes(IP(src=P, dst=C) / TCP(sport=80, dport=sport, flags="SA", seq=5000, ack=1001,
                                             options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (7000, 100)),
                                                      ("WScale", 7)]))), 1.0)
    h(bytearray(bytes(IP(src=C, dst=VIP) / TCP(sport=sport, dport=80, flags="A", seq=1001, ack=5001,
                                               options=ts + [("Timestamp", (101, 7000))]))), 1.0)
    h(bytearray(bytes(IP(src=C, dst=VIP) / TCP(sport=sport, dport=80, flags="PA", seq=1001, ack=5001,
                                               options=ts + [("Timestamp", (102, 7000))]) / Raw(request))), 1.0)
    h(bytearray(bytes(IP(src=P, dst=C) / TCP(sport=80, dport=sport, flags="PA", seq=5001, ack=1001 + len(request),
                                             options=ts + [("Timestamp", (7001, 102))]) / Raw(b"HTTP/1.1 200 OK\r\n"))),
      1.0)


def test_failover_moves_connections_and_sends_a_syn_as_the_client() -> None:
    gw = Gateway(parse(config()), clock=lambda: 2.0)
    connect(gw)
    ev = gw.failover("web")
    assert ev["backend"] == "backup" and ev["details"]["moved"] == [1]
    assert gw.dataplane.services["web"].active == "backup"
    syn = next(o for o in gw.unsent if o.flags == SYN)
    assert (syn.src, syn.sport, syn.dst, syn.seq) == (C, 40000, B, 1000)  # the client's address and ISN
    assert (syn.mss, syn.wscale, syn.sack_permitted, syn.tsval) == (1460, 7, True, 102)
    fence = next(o for o in gw.unsent if o.to == "old")
    assert fence.flags == RST and fence.dst == P and fence.seq == 1001 + 18  # the primary's rcv_nxt
    # new connections now go to the backup
    syn2 = bytearray(bytes(IP(src=C, dst=VIP) / TCP(sport=40001, dport=80, flags="S", seq=9)))
    gw.dataplane.handle(syn2, 3.0)
    assert IP(bytes(syn2)).dst == B


def test_unprotected_connection_is_reset_cleanly() -> None:
    gw = Gateway(parse(config(max_log_bytes=1024)), clock=lambda: 2.0)
    connect(gw, request=b"P" * 2000)  # more than the log may hold
    rec = gw.dataplane.table.by_id(1)
    assert not rec.protected and "log limit" in rec.unprotected_reason
    ev = gw.failover("web")
    assert ev["details"]["reset"] == [1] and ev["details"]["moved"] == []
    rst = next(o for o in gw.unsent if o.to == "client")
    assert rst.flags == RST | ACK and rst.seq == rec.client.ack  # exactly the client's rcv_nxt
    assert "log limit" in gw.events.last("reset").reason
    assert rec.state.value == "CLOSED"


def test_targets_are_chosen_and_refused_with_reasons() -> None:
    gw = Gateway(parse(config()), clock=lambda: 2.0)
    with pytest.raises(NotFound, match="no service"):
        gw.failover("nope")
    with pytest.raises(NotFound, match="no backend named"):
        gw.failover("web", to="nope")
    with pytest.raises(Conflict, match="already the backend in use"):
        gw.failover("web", to="primary")
    with pytest.raises(Conflict, match="admin state 'maint'"):
        gw.failover("web", to="spare")
    gw.failover("web", to="backup")
    gw.failover("web")  # back to the primary: the spare (maint) is never chosen
    assert gw.dataplane.services["web"].active == "primary"


def test_api_failover_migrate_and_events() -> None:
    gw = Gateway(parse(config()), clock=lambda: 2.0)
    connect(gw)
    c = TestClient(create_app(gw))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert c.post("/api/v1/services/web/failover", json={"to": "spare"}, headers=auth).status_code == 409
    r = c.post("/api/v1/services/web/failover", json={"colour": "red"}, headers=auth)
    assert r.status_code == 422 and "colour" in r.text
    r = c.post("/api/v1/connections/1/migrate", json={"to": "backup", "mode": "teleport"}, headers=auth)
    assert r.status_code == 422 and "mode" in r.text
    assert c.post("/api/v1/connections/99/migrate", json={"to": "backup"}, headers=auth).status_code == 404
    r = c.post("/api/v1/connections/1/migrate", json={"to": "backup"}, headers=auth)
    assert r.status_code == 202 and r.json()["details"]["outcome"] == "moved"
    assert c.get("/api/v1/connections/1", headers=auth).json()["move"]["phase"] == "CONNECTING"
    assert c.post("/api/v1/connections/1/migrate", json={"to": "primary"}, headers=auth).status_code == 409
    kinds = [e["kind"] for e in c.get("/api/v1/events", headers=auth).json()]
    assert kinds == ["migration"]
    assert c.post("/api/v1/services/web/failover", headers=auth).status_code == 202
    assert c.post("/api/v1/services/web/failover").status_code == 401
    assert c.delete("/api/v1/connections/1", headers=auth).json()["kind"] == "reset"


def test_a_reset_move_leaves_the_kernels_moved_set_and_is_reported_once() -> None:
    """Issue 10: a splice ended by a reset never said so — its flow stayed in the kernel's moved
    set for good.  Every way a move ends now takes its flow out, once."""
    gw = Gateway(parse(config()), clock=lambda: 2.0)
    moved: list[tuple[str, int, str, int]] = []
    unmoved: list[tuple[str, int, str, int]] = []
    gw.on_moved = moved.extend
    gw.on_unmoved = unmoved.extend
    connect(gw)
    gw.failover("web")
    assert moved == [(B, 80, C, 40000)] and unmoved == []
    gw.reset_connection(1)
    assert unmoved == [(B, 80, C, 40000)]
    assert [e.details.get("outcome") for e in gw.events.list(kind="migration", limit=None)] == ["ended"]
    gw.tick()
    gw.dataplane.expire(10_000.0)
    gw.flush()
    assert unmoved == [(B, 80, C, 40000)]  # once


def test_backend_packets_after_a_reset_through_the_splice_never_reach_the_client_untranslated() -> None:
    """A client that resets a moved connection ends its splice, and with it the translation:
    whatever the backup still had in flight (data, a FIN) is fenced, not passed on in the
    backup's own sequence space (found by a wrk crowd closing 100 moved connections)."""
    from appliance.dataplane.engine import NO_BACKEND
    from nfq.queue import Verdict

    gw = Gateway(parse(config()), clock=lambda: 2.0)
    connect(gw)
    gw.failover("web")
    h = gw.dataplane.handle
    ts = [("NOP", None), ("NOP", None)]
    # the backup answers the SYN, takes the replayed request, regenerates the 17 bytes
    h(bytearray(bytes(IP(src=B, dst=C) / TCP(sport=80, dport=40000, flags="SA", seq=70000, ack=1001,
                                             options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (500, 102)),
                                                      ("WScale", 7)]))), 2.0)
    req = b"GET / HTTP/1.1\r\n\r\n"
    h(bytearray(bytes(IP(src=B, dst=C) / TCP(sport=80, dport=40000, flags="A", seq=70001, ack=1001 + len(req),
                                             options=ts + [("Timestamp", (501, 102))]))), 2.0)
    regen = bytearray(bytes(IP(src=B, dst=C) / TCP(sport=80, dport=40000, flags="PA", seq=70001,
                                                   ack=1001 + len(req), options=ts + [("Timestamp", (502, 102))])
                            / Raw(b"HTTP/1.1 200 OK\r\n")))
    h(regen, 2.0)
    sp = gw.dataplane.splice_of(1)
    assert sp is not None and sp.verifier.done
    # the client resets: passed on (translated) to the backup, the splice is over
    assert h(bytearray(bytes(IP(src=C, dst=VIP) / TCP(sport=40000, dport=80, flags="R", seq=1001 + len(req)))),
             2.1) is Verdict.REWRITTEN
    assert gw.dataplane.splice_of(1) is None
    assert gw.dataplane.table.by_id(1).backend == NO_BACKEND
    # the backup's data and FIN still in flight: dropped, never forwarded in its own sequence space
    for flags, payload in (("PA", b"more bytes"), ("FA", b"")):
        late = bytearray(bytes(IP(src=B, dst=C) / TCP(sport=80, dport=40000, flags=flags, seq=70018,
                                                      ack=1001 + len(req), options=ts + [("Timestamp", (503, 102))])
                               / Raw(payload)))
        assert h(late, 2.2) is Verdict.DROP
