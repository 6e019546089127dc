"""The operator API and panel over a real Gateway (no kernel): roles, CSRF, audit,
backend admin states, config versions, events, tokens, metrics, pcap."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from scapy.all import IP, TCP

from webui.auth import hash_password, token_digest
from appliance.config import parse
from appliance.gateway import Gateway
from appliance import packetring
from webui.app import create_app

ADMIN = "admin-token-123456"
OPERATOR = "operator-token-123456"
VIEWER = "viewer-token-1234567"
PASSWORD = "correct horse battery"


def config() -> dict:
    return {
        "api": {"token": ADMIN,
                "user": [{"name": "olga", "role": "operator", "password_hash": hash_password(PASSWORD, n=1024)},
                         {"name": "vera", "role": "viewer", "password_hash": hash_password(PASSWORD, n=1024)}],
                "tokens": [{"name": "ops", "role": "operator", "token": OPERATOR},
                           {"name": "grafana", "role": "viewer", "sha256": token_digest(VIEWER)}]},
        "service": [{"name": "web", "vip": "203.0.113.10", "port": 80,
                     "backend": [{"name": "primary", "address": "198.51.100.10"},
                                 {"name": "backup", "address": "198.51.100.20"},
                                 {"name": "spare", "address": "198.51.100.30"}]}],
    }


def auth(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


def syn(gw: Gateway, port: int) -> None:
    pkt = bytearray(bytes(IP(src="192.0.2.10", dst="203.0.113.10") / TCP(sport=port, dport=80, flags="S", seq=1000)))
    ring = packetring.of(gw)
    if ring is not None:
        ring.record(pkt, 1.0)
    gw.dataplane.handle(pkt, 1.0)


@pytest.fixture
def setup() -> tuple[TestClient, Gateway]:
    gw = Gateway(parse(config()))
    packetring.attach(gw)
    for port in (40000, 40001, 40002):
        syn(gw, port)
    return TestClient(create_app(gw)), gw


def login(c: TestClient, user: str) -> str:
    r = c.post("/login", data={"username": user, "password": PASSWORD}, follow_redirects=False)
    assert r.status_code == 303, r.text
    page = c.get("/").text
    return page.split('name="csrf-token" content="')[1].split('"')[0]


def test_roles_decide_what_a_token_may_do(setup) -> None:
    c, gw = setup
    assert c.post("/api/v1/services/web/failover").status_code == 401
    assert c.post("/api/v1/services/web/failover", headers=auth("nope-nope-nope")).status_code == 401
    r = c.post("/api/v1/services/web/failover", headers=auth(VIEWER))
    assert r.status_code == 403 and "operator" in r.json()["detail"]
    assert gw.dataplane.services["web"].active == "primary"          # nothing happened
    assert c.get("/api/v1/connections", headers=auth(VIEWER)).status_code == 200
    r = c.post("/api/v1/services/web/failover", headers=auth(OPERATOR))
    assert r.status_code == 202 and gw.dataplane.services["web"].active == "backup"
    assert c.post("/api/v1/tokens", headers=auth(OPERATOR), json={"name": "x", "role": "viewer"}).status_code == 403
    assert c.get("/api/v1/whoami", headers=auth(ADMIN)).json() == {"name": "api-token", "role": "admin", "via": "token"}


def test_every_change_is_audited_with_who_and_result(setup) -> None:
    c, _ = setup
    c.post("/api/v1/services/web/failover", headers=auth(VIEWER))
    c.post("/api/v1/services/web/failover", headers=auth(OPERATOR))
    c.post("/api/v1/services/nosuch/failover", headers=auth(OPERATOR))
    trail = c.get("/api/v1/audit", headers=auth(VIEWER)).json()
    results = [(a["who"], a["result"].split(":")[0]) for a in trail]
    assert ("grafana", "error 403") in results
    assert ("ops", "ok") in results and ("ops", "error 404") in results
    ok = next(a for a in trail if a["result"] == "ok" and a["action"] == "failover")
    assert ok["target"] == "service web" and ok["role"] == "operator" and ok["time"] > 0


def test_panel_posts_need_the_csrf_token(setup) -> None:
    c, gw = setup
    csrf = login(c, "olga")
    # the session cookie alone does not authorise a change: a cross-site form could send it
    assert c.post("/api/v1/services/web/failover").status_code == 403
    r = c.put("/api/v1/backends/spare", json={"admin_state": "drain"}, headers={"X-CSRF-Token": "wrong"})
    assert r.status_code == 403
    assert gw.dataplane.services["web"].backends["spare"].admin_state == "ready"
    assert c.post("/logout", data={}).status_code == 403                 # a form post without the field
    r = c.post("/api/v1/services/web/failover", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 202 and gw.dataplane.services["web"].active == "backup"
    assert c.post("/logout", data={"csrf_token": csrf}, follow_redirects=False).status_code == 303
    assert c.get("/api/v1/status").status_code == 401                  # the session is gone


def test_a_viewer_session_cannot_act(setup) -> None:
    c, gw = setup
    csrf = login(c, "vera")
    assert c.post("/api/v1/services/web/failover", headers={"X-CSRF-Token": csrf}).status_code == 403
    assert c.get("/admin").status_code == 403
    assert c.post("/login", data={"username": "vera", "password": "wrong"}).status_code == 401


def test_drain_moves_new_connections_and_never_targets_a_drained_backend(setup) -> None:
    c, gw = setup
    info = c.get("/api/v1/backends/primary?admin_state=drain", headers=auth(VIEWER)).json()
    assert info["impact"]["connections"] == 3 and info["impact"]["moved"] == 0
    r = c.put("/api/v1/backends/backup", json={"admin_state": "drain"}, headers=auth(OPERATOR))
    assert r.status_code == 200, r.text
    # drained backup: a failover skips it
    r = c.post("/api/v1/services/web/failover", json={"to": "backup"}, headers=auth(OPERATOR))
    assert r.status_code == 409 and "drain" in r.json()["detail"]
    # draining the active backend: new connections go elsewhere, existing ones stay
    r = c.put("/api/v1/backends/primary", json={"admin_state": "drain"}, headers=auth(OPERATOR))
    assert r.status_code == 200, r.text
    assert gw.dataplane.services["web"].active == "spare"
    assert sorted(r.json()["services"]["web"]["staying"]) == [1, 2, 3]
    syn(gw, 40010)
    newest = max(gw.dataplane.table, key=lambda rec: rec.id)
    assert newest.backend == "spare"
    assert {rec.backend for rec in gw.dataplane.table if rec.id <= 3} == {"primary"}
    # no backend left ready: refused, nothing changed
    r = c.put("/api/v1/backends/spare", json={"admin_state": "maint"}, headers=auth(OPERATOR))
    assert r.status_code == 409
    assert gw.dataplane.services["web"].backends["spare"].admin_state == "ready"
    assert c.put("/api/v1/backends/nosuch", json={"admin_state": "drain"}, headers=auth(OPERATOR)).status_code == 404
    r = c.put("/api/v1/backends/spare", json={"admin_state": "sleepy"}, headers=auth(OPERATOR))
    assert r.status_code == 422 and "admin_state" in json.dumps(r.json()["detail"])
    kinds = [e["kind"] for e in c.get("/api/v1/events?kind=admin", headers=auth(VIEWER)).json()]
    assert kinds == ["admin", "admin"]


def test_maint_on_the_active_backend_fails_over(setup) -> None:
    c, gw = setup
    r = c.put("/api/v1/backends/primary", json={"admin_state": "maint", "service": "web"}, headers=auth(OPERATOR))
    assert r.status_code == 200, r.text
    entry = r.json()["services"]["web"]
    assert entry["active"] in ("backup", "spare") and gw.dataplane.services["web"].active == entry["active"]
    assert c.get("/api/v1/events?kind=failover", headers=auth(VIEWER)).json()[-1]["reason"].startswith("admin")


def test_config_has_a_version_and_names_the_bad_field(setup) -> None:
    c, gw = setup
    doc = c.get("/api/v1/config", headers=auth(VIEWER)).json()
    assert doc["version"] == 1 and "api" not in doc["config"]
    cfg = doc["config"]
    cfg["service"][0]["backend"][2]["admin_state"] = "maint"
    cfg["service"][0]["failover"]["auto"] = False
    assert c.put("/api/v1/config", json={"version": 1, "config": cfg}, headers=auth(OPERATOR)).status_code == 403
    r = c.put("/api/v1/config", json={"version": 1, "config": cfg}, headers=auth(ADMIN))
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 2
    assert sorted(r.json()["changed"]) == ["service[0].backend[2].admin_state", "service[0].failover.auto"]
    assert gw.dataplane.services["web"].backends["spare"].admin_state == "maint"
    assert gw.dataplane.services["web"].failover.auto is False
    # a write from the old version is a conflict
    r = c.put("/api/v1/config", json={"version": 1, "config": cfg}, headers=auth(ADMIN))
    assert r.status_code == 409 and "stale" in r.json()["detail"]
    bad = json.loads(json.dumps(cfg))
    bad["service"][0]["backend"][1]["address"] = "198.51.100.300"
    r = c.put("/api/v1/config", json={"version": 2, "config": bad}, headers=auth(ADMIN))
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "service[0].backend[1].address"
    bad = json.loads(json.dumps(cfg))
    bad["service"][0]["vip"] = "203.0.113.99"
    r = c.put("/api/v1/config", json={"version": 2, "config": bad}, headers=auth(ADMIN))
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "service[0].vip"
    assert c.get("/api/v1/config", headers=auth(VIEWER)).json()["version"] == 2


def test_tokens_are_shown_once_and_work_until_revoked(setup) -> None:
    c, _ = setup
    r = c.post("/api/v1/tokens", headers=auth(ADMIN), json={"name": "ci", "role": "viewer"})
    assert r.status_code == 201
    tok = r.json()["token"]
    listed = c.get("/api/v1/tokens", headers=auth(ADMIN)).json()
    assert any(t["name"] == "ci" for t in listed) and tok not in json.dumps(listed)
    assert c.get("/api/v1/whoami", headers=auth(tok)).json()["role"] == "viewer"
    assert c.post("/api/v1/tokens", headers=auth(ADMIN), json={"name": "ci", "role": "viewer"}).status_code == 409
    r = c.post("/api/v1/tokens", headers=auth(ADMIN), json={"name": "bad name!", "role": "viewer"})
    assert r.status_code == 422 and "name" in json.dumps(r.json()["detail"])
    assert c.delete("/api/v1/tokens/ci", headers=auth(ADMIN)).status_code == 200
    assert c.get("/api/v1/whoami", headers=auth(tok)).status_code == 401


def test_events_filter_and_stream(setup) -> None:
    c, gw = setup
    gw.events.add("health", "backup up -> down: refused", service="web", backend="backup")
    c.post("/api/v1/services/web/failover", headers=auth(OPERATOR))
    got = c.get("/api/v1/events?kind=health&backend=backup", headers=auth(VIEWER)).json()
    assert [e["reason"] for e in got] == ["backup up -> down: refused"]
    assert c.get("/api/v1/events?kind=bogus", headers=auth(VIEWER)).status_code == 422
    with c.stream("GET", "/api/v1/events/stream?since_id=0&timeout=0.5&kind=failover", headers=auth(VIEWER)) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        body = "".join(r.iter_text())
    assert "event: failover" in body and "event: health" not in body
    data = json.loads(next(line for line in body.splitlines() if line.startswith("data: "))[6:])
    assert data["kind"] == "failover" and data["service"] == "web"


def test_connections_search_filter_and_paginate(setup) -> None:
    c, gw = setup
    r = c.get("/api/v1/connections?limit=2&offset=1", headers=auth(VIEWER))
    assert r.headers["x-total-count"] == "3" and [x["id"] for x in r.json()] == [2, 3]
    assert [x["client"] for x in c.get("/api/v1/connections?q=40001", headers=auth(VIEWER)).json()] == ["192.0.2.10:40001"]
    assert c.get("/api/v1/connections?protected=false", headers=auth(VIEWER)).json() == []
    one = c.get("/api/v1/connections/1", headers=auth(VIEWER)).json()
    assert "commit_lag" in one and "checkpoint_age" in one
    with c.stream("GET", "/api/v1/connections/stream?timeout=0.2&interval=0.1&backend=primary",
                  headers=auth(VIEWER)) as s:
        body = "".join(s.iter_text())
    snap = json.loads(next(line for line in body.splitlines() if line.startswith("data: "))[6:])
    assert snap["total"] == 3 and len(snap["connections"]) == 3


def test_pcap_download_holds_the_connections_packets(setup) -> None:
    c, _ = setup
    r = c.get("/api/v1/connections/2/pcap", headers=auth(VIEWER))
    assert r.status_code == 200
    from appliance.pcap import packets, tcp_fields
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".pcap") as f:
        f.write(r.content)
        f.flush()
        got = [tcp_fields(p) for _, p in packets(f.name)]
    assert len(got) == 1 and got[0][2] == 40001 and got[0][6] & 0x02   # the SYN from port 40001
    assert c.get("/api/v1/connections/99/pcap", headers=auth(VIEWER)).status_code == 404


def test_metrics_parse_and_count_failovers(setup) -> None:
    c, _ = setup

    def scrape() -> dict[str, list]:
        r = c.get("/metrics", headers=auth(VIEWER))
        assert r.status_code == 200
        return {f.name: f.samples for f in text_string_to_metric_families(r.text)}

    assert c.get("/metrics").status_code == 401
    before = scrape()
    for name in ("gateway_tracked_connections", "gateway_failovers", "gateway_backend_up", "gateway_checkpoint_lag_bytes",
                 "gateway_packets", "gateway_queue_drops", "gateway_divergences"):
        assert name in before, name
    tracked = sum(s.value for s in before["gateway_tracked_connections"])
    assert tracked == 3
    failovers = lambda fams: sum(s.value for s in fams["gateway_failovers"] if s.name.endswith("_total"))
    assert failovers(before) == 0
    c.post("/api/v1/services/web/failover", headers=auth(OPERATOR))
    after = scrape()
    assert failovers(after) == 1
    (s,) = [s for s in after["gateway_failovers"] if s.value == 1]
    assert s.labels == {"service": "web", "reason": "manual"}


def test_panel_pages_render(setup) -> None:
    c, _ = setup
    login(c, "olga")
    for path, needle in (("/", "Connections"), ("/services", "spare"), ("/connections?backend=primary", "192.0.2.10:40002"),
                         ("/connections/1", "client_isn"), ("/events", "kind"), ("/audit", "login")):
        r = c.get(path)
        assert r.status_code == 200 and needle in r.text, path
    assert c.get("/connections/999").status_code == 404
    assert c.get("/static/panel.js").status_code == 200


def test_banner_says_health_and_the_last_failover(setup) -> None:
    c, gw = setup
    st = c.get("/api/v1/status", headers=auth(VIEWER)).json()
    assert st["node"]["health"] == "unknown" and st["node"]["last_failover"] is None   # nothing probed yet
    from appliance.health import HealthChecker

    # the real checker, not started: its state machines are fed the results a probe would give
    gw.health = HealthChecker(gw.health_targets(), gw.on_health)
    for b in gw.health.health.values():
        b.record(True, 0.001, 1.0, "ok")
    assert c.get("/api/v1/status", headers=auth(VIEWER)).json()["node"]["health"] == "ok"
    for _ in range(3):
        gw.health.health["web/primary"].record(False, None, 2.0, "timeout")
    node = c.get("/api/v1/status", headers=auth(VIEWER)).json()["node"]
    assert node["health"] == "degraded" and "primary is not up" in node["problems"][0]
    c.post("/api/v1/services/web/failover", headers=auth(OPERATOR))
    lf = c.get("/api/v1/status", headers=auth(VIEWER)).json()["node"]["last_failover"]
    assert (lf["service"], lf["from"], lf["to"]) == ("web", "primary", "backup") and "manual" in lf["reason"]
    row = next(b for b in c.get("/api/v1/backends", headers=auth(VIEWER)).json() if b["name"] == "primary")
    assert row["state"] == "down" and row["transitions"] == 2 and row["last_detail"] == "timeout"


def test_audit_trail_is_appended_to_its_file(tmp_path) -> None:
    cfg = config()
    cfg["api"]["audit_file"] = str(tmp_path / "audit.jsonl")
    gw = Gateway(parse(cfg))
    c = TestClient(create_app(gw))
    c.put("/api/v1/backends/spare", json={"admin_state": "drain"}, headers=auth(OPERATOR))
    c.put("/api/v1/backends/spare", json={"admin_state": "drain"}, headers=auth(VIEWER))
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(x["who"], x["action"], x["result"][:9]) for x in lines] == [
        ("ops", "backend.admin_state", "ok"), ("grafana", "PUT /api/v1/backends/spare", "error 403")]
    assert lines[0]["params"] == {"admin_state": "drain", "service": None}
