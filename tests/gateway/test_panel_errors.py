"""Errors in a browser are pages of the panel, never raw JSON; the API keeps its JSON ``detail``.

A request to a panel path, or one whose ``Accept`` prefers ``text/html`` (a browser navigating),
gets the panel's error page with the status code kept, the message and a link back; ``/api/...``
with a client's ``Accept`` (``*/*``, ``application/json``: what the panel's ``fetch`` sends) keeps
``{"detail": ...}``."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from scapy.all import IP, TCP

from appliance.config import parse
from appliance.gateway import Gateway
from webui.app import create_app
from webui.auth import hash_password

ADMIN = "admin-token-123456"
VIEWER = "viewer-token-1234567"
PASSWORD = "correct horse battery"
BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"}
FETCH = {"Accept": "application/json"}


def config() -> dict:
    return {
        "api": {"token": ADMIN,
                "user": [{"name": "olga", "role": "operator", "password_hash": hash_password(PASSWORD, n=1024)},
                         {"name": "vera", "role": "viewer", "password_hash": hash_password(PASSWORD, n=1024)}],
                "tokens": [{"name": "grafana", "role": "viewer", "token": VIEWER}]},
        "service": [{"name": "web", "vip": "203.0.113.10", "port": 80,
                     "backend": [{"name": "primary", "address": "198.51.100.10"},
                                 {"name": "backup", "address": "198.51.100.20"}]}],
    }


@pytest.fixture
def setup() -> tuple[TestClient, Gateway]:
    gw = Gateway(parse(config()))
    pkt = bytearray(bytes(IP(src="192.0.2.10", dst="203.0.113.10") / TCP(sport=40000, dport=80, flags="S", seq=1)))
    gw.dataplane.handle(pkt, 1.0)
    return TestClient(create_app(gw)), gw


def login(c: TestClient, user: str) -> str:
    r = c.post("/login", data={"username": user, "password": PASSWORD}, follow_redirects=False)
    assert r.status_code == 303, r.text
    return c.get("/").text.split('name="csrf-token" content="')[1].split('"')[0]


def assert_page(r, status: int, *texts: str) -> str:
    """The panel's error page: the status kept, HTML (not a JSON document), the message, a link back."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("text/html"), r.headers["content-type"]
    body = r.text
    assert body.lstrip().lower().startswith("<!doctype html>")
    with pytest.raises(ValueError):
        json.loads(body)
    assert f'data-status="{status}"' in body and f'id="error-code">{status}<' in body
    assert 'id="back"' in body
    for t in texts:
        assert t in body, (t, body)
    return body


def test_unknown_connection_page_is_the_panels_404(setup) -> None:
    c, gw = setup
    login(c, "olga")
    body = assert_page(c.get("/connections/999", headers=BROWSER), 404, "no connection with id 999",
                       'href="/connections"')
    assert '<nav>' in body and 'id="banner"' in body          # in the panel's layout, signed in
    # whatever the Accept: a panel path is a page
    assert_page(c.get("/connections/999", headers=FETCH), 404, "no connection with id 999")
    assert_page(c.get("/no/such/page"), 404, "Not Found")
    assert c.get("/connections/1", headers=BROWSER).status_code == 200     # a known one is its page


def test_a_viewers_action_from_a_browser_is_the_panels_403(setup) -> None:
    c, gw = setup
    csrf = login(c, "vera")
    # a browser's form post of the action (Accept: text/html): the page, with the reason
    r = c.post("/api/v1/services/web/failover", data={"csrf_token": csrf}, headers=BROWSER)
    assert_page(r, 403, "vera has role viewer; this needs operator")
    assert gw.dataplane.services["web"].active == "primary"
    last = c.get("/api/v1/audit", headers={"Authorization": f"Bearer {ADMIN}"}).json()[-1]
    assert last["who"] == "vera" and last["result"].startswith("error 403")
    # the panel's fetch keeps the API's JSON detail (panel.js shows it in the page)
    r = c.post("/api/v1/services/web/failover", headers={"X-CSRF-Token": csrf, **FETCH})
    assert r.status_code == 403 and r.json() == {"detail": "vera has role viewer; this needs operator"}
    # a panel page the role may not see
    assert_page(c.get("/admin", headers=BROWSER), 403, "vera has role viewer; this page needs admin")
    # a missing CSRF token, from a browser
    assert_page(c.post("/logout", data={}, headers=BROWSER), 403, "CSRF")


def test_a_refused_action_is_the_panels_409(setup) -> None:
    c, gw = setup
    csrf = login(c, "olga")
    r = c.post("/api/v1/services/web/failover", json={"to": "primary"}, headers={"X-CSRF-Token": csrf, **BROWSER})
    assert_page(r, 409, "already the backend in use")
    r = c.post("/api/v1/services/web/failover", json={"to": "primary"}, headers={"X-CSRF-Token": csrf, **FETCH})
    assert r.status_code == 409 and "already the backend in use" in r.json()["detail"]


def test_invalid_input_is_the_panels_422_naming_the_field(setup) -> None:
    c, gw = setup
    login(c, "olga")
    assert_page(c.get("/connections/abc", headers=BROWSER), 422, "cid: ")
    assert_page(c.get("/connections?offset=-5", headers=BROWSER), 422, "offset: ")
    assert_page(c.get("/connections?protected=maybe"), 422, "protected: ")
    # the API's 422 stays JSON for API clients, naming the field
    r = c.get("/api/v1/connections?offset=-5", headers={"Authorization": f"Bearer {VIEWER}"})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "offset"


def test_the_api_keeps_json_unless_a_browser_navigates(setup) -> None:
    c, gw = setup
    tok = {"Authorization": f"Bearer {VIEWER}"}
    r = c.get("/api/v1/connections/999", headers=tok)
    assert r.status_code == 404 and "999" in r.json()["detail"]
    r = c.get("/api/v1/connections/999", headers={**tok, **FETCH})
    assert r.status_code == 404 and "999" in r.json()["detail"]
    assert c.get("/api/v1/nothing", headers=tok).json() == {"detail": "Not Found"}
    r = c.get("/api/v1/status")
    assert r.status_code == 401 and r.json()["detail"] and r.headers["www-authenticate"] == "Bearer"
    assert c.get("/metrics").status_code == 401 and "detail" in c.get("/metrics").json()
    assert c.get("/healthz").json() == {"status": "ok"}
    # a browser navigating to an API URL gets a page: signed out, with the way to sign in
    assert_page(c.get("/api/v1/status", headers=BROWSER), 401, "missing bearer token or session", 'href="/login"')
    login(c, "vera")
    body = assert_page(c.get("/api/v1/connections/999", headers=BROWSER), 404, "999")
    assert "<nav>" in body


def test_error_page_escapes_the_message(setup) -> None:
    c, gw = setup
    login(c, "olga")
    r = c.get("/connections?q=" + "x" * 300, headers=BROWSER)  # max_length 200
    body = assert_page(r, 422, "q: ")
    r = c.get("/api/v1/services/<script>alert(1)</script>/failover", headers={**BROWSER})
    body = assert_page(r, 404)
    assert "<script>alert(1)</script>" not in body
