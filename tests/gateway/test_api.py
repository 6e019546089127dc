"""The REST API and the first panel page over a real Gateway object (no kernel)."""

from __future__ import annotations

from fastapi.testclient import TestClient
from scapy.all import IP, TCP

from appliance.config import parse
from appliance.gateway import Gateway
from webui.app import create_app

TOKEN = "api-test-token"
CFG = {
    "api": {"token": TOKEN},
    "service": [{"name": "web", "vip": "203.0.113.10", "port": 80,
                 "backend": [{"name": "primary", "address": "198.51.100.10"}]}],
}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def client_with_one_connection() -> tuple[TestClient, Gateway]:
    gw = Gateway(parse(CFG))
    syn = bytearray(bytes(IP(src="192.0.2.10", dst="203.0.113.10") / TCP(sport=40000, dport=80, flags="S", seq=42)))
    gw.dataplane.handle(syn, 1.0)
    return TestClient(create_app(gw)), gw


def test_endpoints_need_the_token() -> None:
    c, _ = client_with_one_connection()
    for path in ("/api/v1/status", "/api/v1/services", "/api/v1/connections", "/api/v1/connections/1"):
        assert c.get(path).status_code == 401
        assert c.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.get(path, headers=AUTH).status_code == 200
    assert c.get("/healthz").json() == {"status": "ok"}


def test_status_names_the_digests_search() -> None:
    c, _ = client_with_one_connection()
    assert c.get("/api/v1/status", headers=AUTH).json()["digest_search"] == "memfind"  # the SIMD one, built


def test_connection_json_has_the_documented_fields() -> None:
    c, _ = client_with_one_connection()
    (conn,) = c.get("/api/v1/connections", headers=AUTH).json()
    for field in ("id", "client", "service", "backend", "state", "client_isn", "server_isn", "client_next_seq",
                  "server_next_seq", "client_ack", "server_ack", "client_wscale", "server_wscale", "client_mss",
                  "server_mss", "sack_permitted", "client_tsval", "server_tsval", "bytes_from_client",
                  "bytes_from_server"):
        assert field in conn, field
    assert conn["client"] == "192.0.2.10:40000" and conn["service"] == "203.0.113.10:80"
    assert conn["state"] == "SYN_SENT" and conn["client_isn"] == 42
    assert c.get(f"/api/v1/connections/{conn['id']}", headers=AUTH).json()["client_isn"] == 42
    r = c.get("/api/v1/connections/999", headers=AUTH)
    assert r.status_code == 404 and "999" in r.json()["detail"]
    assert c.get("/api/v1/connections/abc", headers=AUTH).status_code == 422
    assert c.get("/api/v1/connections?state=established", headers=AUTH).json() == []


def test_panel_login_lists_services_and_connections() -> None:
    c, _ = client_with_one_connection()
    r = c.get("/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert c.post("/login", data={"token": "wrong"}).status_code == 401
    r = c.post("/login", data={"token": TOKEN}, follow_redirects=False)
    assert r.status_code == 303
    assert TOKEN not in r.headers["set-cookie"]  # the cookie is not the token
    page = c.get("/").text
    assert "203.0.113.10:80" in page and "192.0.2.10:40000" in page and "primary" in page
    # the cookie authorises reads for the page's live refresh, never writes
    assert c.get("/api/v1/connections").status_code == 200
