"""Resume mode's orchestration, driven with crafted packets and scripted agents (no root).

The agents are replaced by a function that records every request and answers
as the real ones do (``appliance.agent.server``); the packets go through the real
data plane.  The lab tests (``tests/lab/test_resume.py``) run the same code
against real agents, the example server and a real client.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import threading
import time
from typing import Any

import pytest
from scapy.all import IP, TCP, Raw

from appliance.agent import protocol as proto
from appliance.config import parse
from appliance.errors import Conflict
from appliance.gateway import Gateway
from checkpoint.repair_ici import Ici
from nfq.queue import Verdict

CLIENT = "192.0.2.10"
VIP = "203.0.113.10"
KEY = "an-agent-key-0123456789"
CFG = {
    "api": {"token": "a-long-token"},
    "agent": {"key": KEY},
    "service": [{"name": "files", "vip": VIP, "port": 8000, "failover": {"mode": "resume"},
                 "backend": [{"name": "primary", "address": "198.51.100.10", "agent": "198.51.100.10:7070"},
                             {"name": "backup", "address": "198.51.100.20", "agent": "198.51.100.20:7070"}]}],
}
REQUEST = b"GET 10M.bin\n"


def raw(pkt) -> bytearray:
    return bytearray(bytes(pkt))


def cpkt(seq: int, ack: int, flags: str = "A", payload: bytes = b"", sport: int = 40000, options=None) -> bytearray:
    p = IP(src=CLIENT, dst=VIP) / TCP(sport=sport, dport=8000, flags=flags, seq=seq, ack=ack, options=options or [])
    return raw(p / Raw(payload) if payload else p)


def spkt(src: str, seq: int, ack: int, flags: str = "A", payload: bytes = b"", dport: int = 40000) -> bytearray:
    p = IP(src=src, dst=CLIENT) / TCP(sport=8000, dport=dport, flags=flags, seq=seq, ack=ack)
    return raw(p / Raw(payload) if payload else p)


class Agents:
    """Scripted agents: records requests, answers like appliance.agent.server; ``fail``
    maps a request type to the error its agent answers with; ``during`` runs
    inside a request (as packets would arrive while it is under way)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.fail: dict[str, str] = {}
        self.during: dict[str, Any] = {}
        self.reports: dict[str, list[dict[str, Any]]] = {}
        self.threads: set[str] = set()

    def __call__(self, agent: str, type_: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((agent, type_, copy.deepcopy(body)))
        self.threads.add(threading.current_thread().name)
        if type_ in self.during:
            self.during[type_]()
        if type_ in self.fail:
            raise proto.AgentError(self.fail[type_])
        if type_ == "export":
            return {"ok": True, "handle": "h-export", "active": False, "in_offset": len(REQUEST),
                    "out_offset": 3000}
        if type_ == "import":
            ici = Ici.from_dict(body["ici"])
            return {"ok": True, "handle": "h-import", "active": False, "in_offset": ici.in_offset,
                    "out_offset": ici.out_offset}
        if type_ == "reports":
            return {"ok": True, "reports": self.reports.get(agent, [])}
        return {"ok": True, "handle": body.get("handle"), type_: True}

    def types(self) -> list[tuple[str, str]]:
        return [(a, t) for a, t, _ in self.calls]


@pytest.fixture
def gw() -> Gateway:
    g = Gateway(parse(CFG))
    g.resume.rpc = Agents()
    return g


def established(g: Gateway, now: float, sport: int = 40000) -> Any:
    """Handshake with MSS/wscale/SACK, the request, 2000 bytes of answer."""
    dp = g.dataplane
    opts = [("MSS", 1460), ("SAckOK", b""), ("WScale", 7)]
    assert dp.handle(cpkt(1000, 0, "S", sport=sport, options=opts), now) is Verdict.REWRITTEN
    synack = IP(src="198.51.100.10", dst=CLIENT) / TCP(sport=8000, dport=sport, flags="SA", seq=5000, ack=1001,
                                                      options=[("MSS", 1460), ("SAckOK", b""), ("WScale", 7)])
    dp.handle(raw(synack), now)
    dp.handle(cpkt(1001, 5001, sport=sport), now)
    dp.handle(cpkt(1001, 5001, "PA", REQUEST, sport=sport), now)
    dp.handle(spkt("198.51.100.10", 5001, 1001 + len(REQUEST), "PA", b"x" * 2000, dport=sport), now)
    dp.handle(cpkt(1001 + len(REQUEST), 7001, sport=sport), now)
    (rec,) = [r for r in dp.connections() if r.client_port == sport]
    return rec


def test_planned_move_holds_exports_switches_activates_and_releases(gw: Gateway) -> None:
    now = time.time()
    rec = established(gw, now)
    dp, agents = gw.dataplane, gw.resume.rpc
    seen: dict[str, Verdict] = {}

    def while_exporting() -> None:   # packets arriving while the origin's socket is taken
        seen["client data"] = dp.handle(cpkt(1001 + len(REQUEST), 7001, "PA", b"MORE\n"), now)
        seen["client ack"] = dp.handle(cpkt(1001 + len(REQUEST) + 5, 7001), now)
        seen["origin"] = dp.handle(spkt("198.51.100.10", 7001, 1001 + len(REQUEST), "PA", b"y" * 100), now)

    agents.during["export"] = while_exporting
    ev = gw.migrate(rec.id, "backup", mode="resume", reason="test")
    assert seen == {"client data": Verdict.DROP, "client ack": Verdict.DROP, "origin": Verdict.DROP}
    assert rec.client.bytes == len(REQUEST) + 5          # the held data was logged all the same
    assert agents.types() == [("198.51.100.10:7070", "export"), ("198.51.100.20:7070", "activate"),
                              ("198.51.100.10:7070", "finish")]
    export = agents.calls[0][2]
    assert export == {"local": "198.51.100.10:8000", "remote": f"{CLIENT}:40000", "to": "198.51.100.20:7070",
                      "to_local": "198.51.100.20:8000", "activate": False, "port_choice": "same",
                      "send_base": 5001, "recv_base": 1001}
    assert agents.calls[1][2] == {"handle": "h-export"}
    assert agents.calls[2][2] == {"local": "198.51.100.10:8000", "remote": f"{CLIENT}:40000"}
    assert all(t.startswith("agent-rpc") for t in agents.threads)   # never on the caller's (loop's) thread
    # the record now points at the backup: address rewrite only, same sequence numbers
    assert (rec.backend, rec.backend_ip, rec.moves) == ("backup", "198.51.100.20", 1)
    assert not dp.resume_holds
    # the held data segment and the newest pure ACK were re-injected, to the backup
    reinjected = [IP(bytes(b)) for b in gw.unsent_raw]
    assert [(p.dst, p[TCP].seq, bytes(p[TCP].payload)) for p in reinjected] == [
        ("198.51.100.20", 1001 + len(REQUEST), b"MORE\n"), ("198.51.100.20", 1001 + len(REQUEST) + 5, b"")]
    nxt = cpkt(1001 + len(REQUEST) + 5, 7001)
    assert dp.handle(nxt, now) is Verdict.REWRITTEN
    p = IP(bytes(nxt))
    assert (p.dst, p[TCP].seq, p[TCP].ack) == ("198.51.100.20", 1001 + len(REQUEST) + 5, 7001)
    # the backup's packets pass (the kernel NAT gives them the VIP); the old primary's are fenced
    assert dp.handle(spkt("198.51.100.20", 7001, 1001 + len(REQUEST) + 5, "PA", b"z" * 10), now) is Verdict.ACCEPT
    assert dp.handle(spkt("198.51.100.10", 7001, 1001 + len(REQUEST), "A"), now) is Verdict.DROP
    d = ev["details"]
    assert ev["kind"] == "migration" and d["mode"] == "resume" and d["from"] == "primary" and d["reinjected"] == 2
    assert d["timings_ms"]["hold_to_release"] >= d["timings_ms"]["export"] > 0

    # and back (A -> B -> A): the backup's agent exports, the primary's creates
    agents.calls.clear()
    gw.migrate(rec.id, "primary", mode="resume")
    assert agents.types() == [("198.51.100.20:7070", "export"), ("198.51.100.10:7070", "activate"),
                              ("198.51.100.20:7070", "finish")]
    assert agents.calls[0][2]["to_local"] == "198.51.100.10:8000" and agents.calls[0][2]["send_base"] == 5001
    assert rec.backend == "primary" and rec.moves == 2


@pytest.mark.parametrize("step", ["export", "activate"])
def test_a_failed_step_rolls_back_and_forwarding_is_unchanged(gw: Gateway, step: str) -> None:
    now = time.time()
    rec = established(gw, now)
    agents = gw.resume.rpc
    agents.fail[step] = f"{step} refused by the test"
    with pytest.raises(Conflict, match=f"resume, {step}.*{step} refused by the test"):
        gw.migrate(rec.id, "backup", mode="resume")
    assert rec.backend == "primary" and rec.moves == 0 and not gw.dataplane.resume_holds
    types = [t for _, t, _ in agents.calls]
    if step == "activate":
        assert types == ["export", "activate", "release", "rollback"]
        assert agents.calls[2] == ("198.51.100.20:7070", "release", {"handle": "h-export"})
    else:
        assert types == ["export", "rollback"]
    assert agents.calls[-1] == ("198.51.100.10:7070", "rollback",
                                {"local": "198.51.100.10:8000", "remote": f"{CLIENT}:40000"})
    pkt = cpkt(1001 + len(REQUEST), 7001)
    assert gw.dataplane.handle(pkt, now) is Verdict.REWRITTEN and IP(bytes(pkt)).dst == "198.51.100.10"
    (ev,) = gw.events.list(kind="refusal")
    assert f"failed at {step}" in ev.reason and "rolled back" in ev.reason


def test_resume_refused_without_agents_or_for_a_closed_connection() -> None:
    cfg = copy.deepcopy(CFG)
    del cfg["service"][0]["backend"][1]["agent"]
    cfg["service"][0]["failover"] = {"mode": "replay"}
    g = Gateway(parse(cfg))
    rec = established(g, time.time())
    with pytest.raises(Conflict, match="'backup' of service 'files' has no agent"):
        g.migrate(rec.id, "backup", mode="resume")
    with pytest.raises(Conflict, match="'teleport' is not available"):
        g.migrate(rec.id, "backup", mode="teleport")


def test_failover_of_a_dead_backend_resumes_from_the_wire_checkpoint(gw: Gateway) -> None:
    now = time.time()
    rec = established(gw, now)
    agents = gw.resume.rpc
    # the application reported: request consumed, its state
    state = base64.b64encode(b'{"file": "10M.bin", "header": 12}').decode()
    agents.reports["198.51.100.10:7070"] = [{"local": "198.51.100.10:8000", "remote": f"{CLIENT}:40000",
                                             "in_offset": len(REQUEST), "app_state": state, "app": "default"}]
    asyncio.run(gw.resume.poll_reports())   # one heartbeat round
    # more client bytes the application has not read yet; the primary sends 2500 more bytes
    # that the client has not acknowledged yet when the primary dies
    gw.dataplane.handle(cpkt(1001 + len(REQUEST), 7001, "PA", b"NOTE\n"), now)
    gw.dataplane.handle(spkt("198.51.100.10", 7001, 1001 + len(REQUEST) + 5, "PA", b"w" * 2500), now)
    agents.calls.clear()
    ev = gw.failover("files", reason="health check: primary down", dead=True)
    assert ev["details"]["source"] == "wire"
    assert [t for _, t, _ in agents.calls] == ["import", "activate"]
    body = agents.calls[0][2]
    ici = Ici.from_dict(body["ici"])
    assert (ici.local_addr, ici.local_port, ici.remote_addr, ici.remote_port) == ("198.51.100.20", 8000, CLIENT, 40000)
    assert ici.recv_queue == b"NOTE\n" and ici.in_offset == len(REQUEST)   # the unconsumed bytes only
    assert ici.snd_nxt == ici.snd_una == 7001 and ici.out_offset == 2000   # from what the client acknowledged
    assert body["app_state"] == state and body["activate"] is False
    assert rec.backend == "backup" and rec.moves == 1
    (mv,) = gw.events.list(kind="migration")
    assert mv.details["consumed"] == len(REQUEST) and mv.details["consumed_from"] == "reported"
    assert gw.last_failover["duration_ms"] is not None

    # I6: the client had received more from the dead primary than it had acknowledged when it died
    dp = gw.dataplane
    ahead = cpkt(1001 + len(REQUEST) + 5, 8501, options=[("SAck", (9001, 9501))])
    assert dp.handle(ahead, now) is Verdict.REWRITTEN
    p = IP(bytes(ahead))
    assert p[TCP].ack == 7001 and dp.counters.acks_absorbed == 1      # lowered to the new sender's snd_nxt
    assert not any(o[0] == "SAck" for o in p[TCP].options)
    # the backup sends on; once past what the old sender had sent, ACKs pass unchanged
    dp.handle(spkt("198.51.100.20", 7001, 1001 + len(REQUEST) + 5, "PA", b"w" * 1000), now)
    assert rec.id in dp.resumed and dp.resumed[rec.id].snd_nxt == 8001
    again = cpkt(1001 + len(REQUEST) + 5, 8501)
    dp.handle(again, now)
    assert IP(bytes(again))[TCP].ack == 8001 and dp.counters.acks_absorbed == 2
    dp.handle(spkt("198.51.100.20", 8001, 1001 + len(REQUEST) + 5, "PA", b"w" * 1500), now)
    assert rec.id not in dp.resumed
    late = cpkt(1001 + len(REQUEST) + 5, 9501)
    dp.handle(late, now)
    assert IP(bytes(late))[TCP].ack == 9501 and dp.counters.acks_absorbed == 2


def test_wire_resume_without_a_report_hands_over_the_whole_input(gw: Gateway) -> None:
    rec = established(gw, time.time())
    gw.failover("files", dead=True)
    ici = Ici.from_dict(gw.resume.rpc.calls[0][2]["ici"])
    assert ici.in_offset == 0 and ici.recv_queue == REQUEST
    (mv,) = gw.events.list(kind="migration")
    assert mv.details["consumed"] == 0 and "re-reads" in mv.details["consumed_from"]
    assert rec.backend == "backup"


def test_wire_resume_that_the_backup_refuses_resets_cleanly(gw: Gateway) -> None:
    rec = established(gw, time.time())
    gw.resume.rpc.fail["import"] = "ValueError: ici.mss: refused"
    gw.failover("files", dead=True)
    assert rec.state.value == "CLOSED" and rec.rst_from == "gateway"
    (ev,) = gw.events.list(kind="reset")
    assert "not resumed on backup" in ev.reason and "ici.mss" in ev.reason
    assert any(o.flags & 0x04 and o.to == "client" for o in gw.unsent)   # the client gets a clean RST
    assert not gw.dataplane.resume_holds


def test_api_migrate_in_resume_mode(gw: Gateway) -> None:
    from fastapi.testclient import TestClient

    from webui.app import create_app

    rec = established(gw, time.time())
    c = TestClient(create_app(gw))
    h = {"Authorization": "Bearer a-long-token"}
    r = c.post(f"/api/v1/connections/{rec.id}/migrate", json={"to": "backup", "mode": "teleport"}, headers=h)
    assert r.status_code == 422 and "mode" in r.text
    r = c.post(f"/api/v1/connections/{rec.id}/migrate", json={"to": "backup", "mode": "resume"}, headers=h)
    assert r.status_code == 202, r.text
    assert r.json()["details"]["mode"] == "resume" and rec.backend == "backup"
    gw.resume.rpc.fail["export"] = "LookupError: no ESTABLISHED socket here"
    r = c.post(f"/api/v1/connections/{rec.id}/migrate", json={"to": "primary", "mode": "resume"}, headers=h)
    assert r.status_code == 409 and "no ESTABLISHED socket" in r.json()["detail"]
    assert rec.backend == "backup"
