"""Portable checkpoints through the REST API: export from one gateway, import
into another, and every refusal naming its field (a real Gateway, no kernel)."""

from __future__ import annotations

import copy

from fastapi.testclient import TestClient
from scapy.all import IP, TCP, Raw

from appliance.config import Config, load, parse
from appliance.gateway import Gateway
from webui.app import create_app

TOKEN = "api-test-token"
KEY = "a-checkpoint-key-of-some-length"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
VIP, CLIENT, PRIMARY = "203.0.113.10", "192.0.2.10", "198.51.100.10"


def cfg(key: str | None = KEY) -> dict:
    d = {
        "api": {"token": TOKEN},
        "service": [{"name": "web", "vip": VIP, "port": 80,
                     "backend": [{"name": "primary", "address": PRIMARY},
                                 {"name": "backup", "address": "198.51.100.20"}]}],
    }
    if key:
        d["checkpoint"] = {"key": key}
    return d


def pkt(src: str, dst: str, sport: int, dport: int, flags: str, seq: int, ack: int = 0, data: bytes = b"",
        **kw) -> bytearray:
    p = IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, **kw)
    return bytearray(bytes(p / Raw(data) if data else p))


def gateway_with_a_connection(key: str | None = KEY, config: Config | None = None) -> Gateway:
    gw = Gateway(config or parse(cfg(key)))
    dp = gw.dataplane
    ts = lambda v, e: [("Timestamp", (v, e))]  # noqa: E731
    dp.handle(pkt(CLIENT, VIP, 40000, 80, "S", 1000, options=[("MSS", 1460), ("WScale", 7), *ts(100, 0)]), 1.0)
    dp.handle(pkt(PRIMARY, CLIENT, 80, 40000, "SA", 5000, 1001,
                  options=[("MSS", 1400), ("WScale", 7), *ts(9000, 100)]), 1.0)
    dp.handle(pkt(CLIENT, VIP, 40000, 80, "A", 1001, 5001, options=ts(101, 9000)), 1.1)
    dp.handle(pkt(CLIENT, VIP, 40000, 80, "PA", 1001, 5001, b"GET /x HTTP/1.1\r\n\r\n", options=ts(102, 9000)), 1.2)
    dp.handle(pkt(PRIMARY, CLIENT, 80, 40000, "PA", 5001, 1020, b"HTTP/1.1 200 OK\r\n", options=ts(9001, 102)), 1.3)
    return gw


def test_export_then_import_on_another_gateway() -> None:
    src = gateway_with_a_connection()
    a = TestClient(create_app(src))
    doc = a.get("/api/v1/connections/1/checkpoint", headers=AUTH).json()
    assert doc["format"] and doc["version"] == 2 and doc["signature"].startswith("hmac-sha256:")
    assert doc["connection"]["client"]["isn"] == 1000

    dst = Gateway(parse(cfg()))
    b = TestClient(create_app(dst))
    r = b.post("/api/v1/checkpoints", json=doc, headers=AUTH)
    assert r.status_code == 201, r.text
    rec = r.json()
    assert rec["client"] == f"{CLIENT}:40000" and rec["backend"] == "primary" and rec["log_bytes"] == 19
    assert rec["protected"], rec["unprotected_reason"]
    (mine,) = dst.dataplane.connections()
    assert bytes(mine.log.data) == b"GET /x HTTP/1.1\r\n\r\n" and mine.server.isn == 5000
    assert dst.events.last("checkpoint").reason == "imported"
    # the same connection twice is a conflict, not a second record
    assert b.post("/api/v1/checkpoints", json=doc, headers=AUTH).status_code == 409
    # and the audit trail has both attempts
    audit = b.get("/api/v1/audit", headers=AUTH).json()
    assert [e["result"][:3] for e in audit if e["action"] == "checkpoint.import"] in (["ok", "err"], ["err", "ok"])


def test_tampered_or_foreign_checkpoints_are_refused_naming_the_field() -> None:
    doc = TestClient(create_app(gateway_with_a_connection())).get("/api/v1/connections/1/checkpoint",
                                                                   headers=AUTH).json()
    b = TestClient(create_app(Gateway(parse(cfg()))))
    bad = copy.deepcopy(doc)
    bad["connection"]["client"]["mss"] = 9
    r = b.post("/api/v1/checkpoints", json=bad, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "signature"
    other = TestClient(create_app(Gateway(parse(cfg("another-key-entirely-0123")))))
    r = other.post("/api/v1/checkpoints", json=doc, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "signature"
    r = b.post("/api/v1/checkpoints", content=b"{not json", headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "document"


def test_a_checkpoint_older_than_the_msl_is_refused() -> None:
    doc = TestClient(create_app(gateway_with_a_connection())).get("/api/v1/connections/1/checkpoint",
                                                                   headers=AUTH).json()
    import time

    later = Gateway(parse(cfg()), clock=lambda: time.time() + 300)
    r = TestClient(create_app(later)).post("/api/v1/checkpoints", json=doc, headers=AUTH)
    assert r.status_code == 422
    d = r.json()["detail"][0]
    assert d["field"] == "checkpoint_time" and "MSL" in d["msg"]
    assert later.events.last("refusal") is not None


def test_export_needs_a_key_and_a_known_connection() -> None:
    c = TestClient(create_app(gateway_with_a_connection(key=None)))
    r = c.get("/api/v1/connections/1/checkpoint", headers=AUTH)
    assert r.status_code == 409 and "key" in r.json()["detail"]
    c = TestClient(create_app(gateway_with_a_connection()))
    assert c.get("/api/v1/connections/77/checkpoint", headers=AUTH).status_code == 404
    assert c.get("/api/v1/connections/1/checkpoint").status_code == 401


def test_store_status_and_commit_log_in_memory_mode() -> None:
    c = TestClient(create_app(gateway_with_a_connection()))
    st = c.get("/api/v1/store", headers=AUTH).json()
    assert st["mode"] == "memory" and st["held_acks"] == 0
    assert c.get("/api/v1/store/commits", headers=AUTH).json() == []
    (conn,) = c.get("/api/v1/connections", headers=AUTH).json()
    assert conn["commit_offset"] == 19 and conn["commit_lag"] == 0


def test_the_labs_configuration_can_export_checkpoints(tmp_path, monkeypatch) -> None:
    """The lab (demo) writes a checkpoint key: the panel's export and
    ``appliance checkpoint export`` work there."""
    from appliance.lab import topology as lab

    monkeypatch.setenv("APPLIANCE_LAB_DIR", str(tmp_path))
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    key = lab.checkpoint_key_file()
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_text().strip()) >= 32
    assert lab.checkpoint_key_file().read_text() == key.read_text()  # made once per lab
    conf = tmp_path / "gateway.toml"
    conf.write_text(lab.gateway_config(lab.topology(), token, lab.agent_key_file(), key))
    config = load(conf)
    assert config.checkpoint.key == key.read_text().strip().encode()
    assert config.service("web").vip == VIP and config.service("web").backend("primary").address == PRIMARY
    c = TestClient(create_app(gateway_with_a_connection(config=config)))
    r = c.get("/api/v1/connections/1/checkpoint", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["signature"].startswith("hmac-sha256:")
