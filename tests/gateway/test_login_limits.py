"""Sign-in attempts are limited per source address and per user, in a sliding window
(``[api] login_attempts`` within ``login_window`` seconds): beyond it 429 with a clear
message, audited, before the password is checked; a successful sign-in does not count; the
window expires; the token form counts too."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from appliance.config import ConfigError, parse
from appliance.gateway import Gateway
from webui import auth as webauth
from webui.app import create_app
from webui.auth import hash_password
from webui.security import LoginLimiter

ADMIN = "admin-token-123456"
PASSWORD = "correct horse battery"
WINDOW = 0.5


def config(**api: Any) -> dict:
    return {
        "api": {"token": ADMIN, "login_attempts": 3, "login_window": WINDOW,
                "user": [{"name": "olga", "role": "operator", "password_hash": hash_password(PASSWORD, n=1024)},
                         {"name": "vera", "role": "viewer", "password_hash": hash_password(PASSWORD, n=1024)}],
                **api},
        "service": [{"name": "web", "vip": "203.0.113.10", "port": 80,
                     "backend": [{"name": "primary", "address": "198.51.100.10"},
                                 {"name": "backup", "address": "198.51.100.20"}]}],
    }


def client(app: FastAPI, host: str = "192.0.2.7") -> TestClient:
    """A browser at ``host`` (one app: its limiter is shared, as in the appliance)."""
    return TestClient(app, client=(host, 50000))


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def sign_in(c: TestClient, user: str, password: str) -> int:
    return c.post("/login", data={"username": user, "password": password}, follow_redirects=False).status_code


@pytest.fixture
def app() -> FastAPI:
    return create_app(Gateway(parse(config())))


@pytest.fixture
def scrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every password check that ran (the limiter must refuse before scrypt)."""
    calls: list[str] = []
    real = webauth.check_password

    def counted(password: str, stored: str) -> bool:
        calls.append(password)
        return real(password, stored)

    monkeypatch.setattr(webauth, "check_password", counted)
    return calls


def test_config_defaults_and_errors() -> None:
    api = parse({k: v for k, v in config().items()} | {"api": {"token": ADMIN}}).api
    assert (api.login_attempts, api.login_window) == (5, 60.0)
    with pytest.raises(ConfigError) as e:
        parse(config(login_attempts=0))
    assert e.value.field == "api.login_attempts"
    with pytest.raises(ConfigError) as e:
        parse(config(login_window="soon"))
    assert e.value.field == "api.login_window"


def test_a_user_is_refused_after_the_limit_audited_and_accepted_after_the_window(app, scrypt_calls) -> None:
    c = client(app)
    assert [sign_in(c, "olga", "wrong") for _ in range(3)] == [401, 401, 401]
    assert len(scrypt_calls) == 3
    r = c.post("/login", data={"username": "olga", "password": PASSWORD}, follow_redirects=False)
    assert r.status_code == 429 and "appliance_session" not in r.headers.get("set-cookie", "")
    assert "too many sign-in attempts; try again in 1 s" in r.text          # the login page, with the message
    assert r.headers["content-type"].startswith("text/html") and int(r.headers["retry-after"]) >= 1
    assert len(scrypt_calls) == 3                                            # refused before the password check
    entries = [e for e in gw_audit(c) if e["action"] == "login"]
    assert entries[-1]["who"] == "olga" and entries[-1]["result"].startswith("error 429: too many sign-in attempts")
    assert entries[-1]["params"] == {"source": "192.0.2.7"}
    # the window slides past the failures: the right password is accepted again
    wait_for(lambda: sign_in(c, "olga", PASSWORD) == 303)


def test_per_user_across_sources_and_per_source_across_users(app, scrypt_calls) -> None:
    a, b, d = client(app, "192.0.2.1"), client(app, "192.0.2.2"), client(app, "192.0.2.3")
    # per user: failures for olga from one source lock olga from another
    assert [sign_in(a, "olga", "wrong") for _ in range(3)] == [401] * 3
    assert sign_in(b, "olga", PASSWORD) == 429
    assert sign_in(b, "vera", PASSWORD) == 303                  # another user from b: fine
    # per source: failures for many users from one source lock that source for every user
    assert [sign_in(d, user, "wrong") for user in ("x1", "x2", "x3")] == [401] * 3
    assert sign_in(d, "vera", PASSWORD) == 429
    r = d.post("/login", data={"token": ADMIN}, follow_redirects=False)
    assert r.status_code == 429                                  # the token form is limited by source too
    wait_for(lambda: sign_in(d, "vera", PASSWORD) == 303)


def test_successful_sign_ins_do_not_count(app) -> None:
    c = client(app)
    for _ in range(10):
        assert sign_in(c, "vera", PASSWORD) == 303
    assert [sign_in(c, "vera", "wrong") for _ in range(3)] == [401] * 3
    assert sign_in(c, "vera", PASSWORD) == 429


def test_the_token_form_counts(app) -> None:
    c = client(app)
    for _ in range(3):
        r = c.post("/login", data={"token": "not-the-token-at-all"}, follow_redirects=False)
        assert r.status_code == 401
    r = c.post("/login", data={"token": ADMIN}, follow_redirects=False)
    assert r.status_code == 429 and "too many sign-in attempts" in r.text
    assert gw_audit(c)[-1]["who"] == "(token)" and gw_audit(c)[-1]["result"].startswith("error 429")
    wait_for(lambda: c.post("/login", data={"token": ADMIN}, follow_redirects=False).status_code == 303)


def test_concurrent_attempts_never_check_more_than_the_limit() -> None:
    """Worker threads race: the limiter's count and check are one step under its lock."""
    lim = LoginLimiter(attempts=5, window=60.0)
    allowed: list[float] = []
    start = threading.Barrier(32)

    def one() -> None:
        start.wait()
        wait, stamp = lim.begin(["addr 192.0.2.9", "user olga"])
        if wait is None:
            allowed.append(stamp)

    threads = [threading.Thread(target=one) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(allowed) == 5


def test_the_window_slides() -> None:
    now = [100.0]
    lim = LoginLimiter(attempts=2, window=10.0, clock=lambda: now[0])
    assert lim.begin(["k"])[0] is None
    now[0] = 104.0
    assert lim.begin(["k"])[0] is None
    now[0] = 105.0
    wait, _ = lim.begin(["k"])
    assert wait == pytest.approx(5.0) and lim.message(wait) == "too many sign-in attempts; try again in 5 s"
    now[0] = 110.0                                               # the first left the window, the second has not
    assert lim.begin(["k"])[0] is None
    wait, _ = lim.begin(["k"])
    assert wait == pytest.approx(4.0)
    lim2 = LoginLimiter(attempts=1, window=10.0, clock=lambda: now[0])
    _, stamp = lim2.begin(["k"])
    lim2.succeeded(["k"], stamp)                                 # a success is taken back
    assert lim2.begin(["k"])[0] is None


def gw_audit(c: TestClient) -> list[dict]:
    r = c.get("/api/v1/audit", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200
    return r.json()
