"""TLS for the panel and API: ``[api] tls_cert`` and ``tls_key`` (both or neither, checked when the
configuration is read), served by uvicorn with the daemon's own settings (``daemon.web_config``) on a
pre-opened socket as ``appliance run`` does; a listen address beyond localhost needs TLS unless
``allow_plain_http``; the session cookie is ``Secure`` with TLS.

The certificate is a throwaway self-signed one made by the ``openssl`` CLI for 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from appliance import daemon
from appliance.config import Config, ConfigError, parse
from appliance.gateway import Gateway
from webui.app import create_app

ADMIN = "admin-token-123456"
SERVICE = [{"name": "web", "vip": "203.0.113.10", "port": 80,
            "backend": [{"name": "primary", "address": "198.51.100.10"},
                        {"name": "backup", "address": "198.51.100.20"}]}]


def config(**api: Any) -> dict:
    return {"api": {"token": ADMIN, **api}, "service": SERVICE}


def make_cert(folder: Path, name: str = "panel") -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    assert openssl, "the openssl CLI is needed to make a test certificate (Debian: apt-get install openssl)"
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tls")
    make_cert(d, "panel")
    make_cert(d, "other")
    (d / "garbage.crt").write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    return d


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not met in {timeout} s"
        time.sleep(0.02)


@contextmanager
def served(cfg: Config) -> Iterator[tuple[str, Gateway]]:
    """The appliance's web app for a Gateway built from ``cfg``, under uvicorn with the daemon's
    settings, on a socket opened first (``serve(sockets=[...])``, as ``appliance run``), on its own
    loop in a thread; yields the socket's ``host:port``."""
    gw = Gateway(cfg)
    sock = daemon.listen_socket("127.0.0.1", 0)
    sock.setblocking(False)
    server = daemon._Server(daemon.web_config(create_app(gw), cfg))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    t = threading.Thread(target=run, name="uvicorn", daemon=True)
    t.start()
    try:
        wait_for(lambda: server.started or bool(errors) or not t.is_alive(), what="uvicorn started")
        assert not errors and server.started, errors
        host, port = sock.getsockname()[:2]
        yield f"{host}:{port}", gw
    finally:
        server.should_exit = True
        t.join(timeout=10)
        sock.close()
    assert not t.is_alive(), "uvicorn did not stop"


def https(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


def test_panel_and_api_over_https(certs: Path) -> None:
    cfg = parse(config(tls_cert="panel.crt", tls_key="panel.key"), certs)
    assert cfg.api.tls_cert == str(certs / "panel.crt") and cfg.api.tls_key == str(certs / "panel.key")
    ctx = https(certs / "panel.crt")
    with served(cfg) as (addr, gw):
        with urllib.request.urlopen(f"https://{addr}/healthz", context=ctx, timeout=10) as r:
            assert r.status == 200 and json.load(r) == {"status": "ok"}
        req = urllib.request.Request(f"https://{addr}/api/v1/status", headers={"Authorization": f"Bearer {ADMIN}"})
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            assert r.status == 200 and "uptime_seconds" in json.load(r)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"https://{addr}/api/v1/status", context=ctx, timeout=10)
        assert e.value.code == 401
        e.value.close()                 # its connection, else uvicorn's shutdown waits for it
        # the panel's session cookie is Secure under TLS
        conn = http.client.HTTPSConnection(addr.split(":")[0], int(addr.split(":")[1]), context=ctx, timeout=10)
        conn.request("POST", "/login", body=f"token={ADMIN}",
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        r = conn.getresponse()
        cookie = r.getheader("set-cookie") or ""
        conn.close()
        assert r.status == 303 and cookie.startswith("appliance_session=")
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
        # a certificate it does not present is refused by the client (the CA is really checked)
        with pytest.raises(urllib.error.URLError) as u:
            urllib.request.urlopen(f"https://{addr}/healthz", context=https(certs / "other.crt"), timeout=10)
        assert isinstance(u.value.reason, ssl.SSLCertVerificationError)
        # plain HTTP on the TLS port gets no HTTP answer
        with pytest.raises((urllib.error.URLError, http.client.HTTPException, ConnectionError)):
            urllib.request.urlopen(f"http://{addr}/healthz", timeout=10)


def test_without_tls_the_cookie_is_not_secure() -> None:
    c = TestClient(create_app(Gateway(parse(config()))))
    r = c.post("/login", data={"token": ADMIN}, follow_redirects=False)
    assert r.status_code == 303 and "appliance_session=" in r.headers["set-cookie"]
    assert "secure" not in r.headers["set-cookie"].lower()


@pytest.mark.parametrize("api, field", [
    ({"tls_cert": "panel.crt"}, "api.tls_key"),
    ({"tls_key": "panel.key"}, "api.tls_cert"),
    ({"tls_cert": "missing.crt", "tls_key": "panel.key"}, "api.tls_cert"),
    ({"tls_cert": "panel.crt", "tls_key": "missing.key"}, "api.tls_key"),
    ({"tls_cert": "garbage.crt", "tls_key": "panel.key"}, "api.tls_cert"),
    ({"tls_cert": "panel.crt", "tls_key": "other.key"}, "api.tls_key"),       # not its key
    ({"tls_cert": "panel.key", "tls_key": "panel.key"}, "api.tls_cert"),      # a key is no certificate
    ({"tls_cert": "", "tls_key": "panel.key"}, "api.tls_cert"),
    ({"listen": "0.0.0.0:8443"}, "api.listen"),
    ({"listen": "192.0.2.5:8080"}, "api.listen"),
    ({"listen": ":::8080"}, "api.listen"),
    ({"listen": "0.0.0.0:8443", "allow_plain_http": "yes"}, "api.allow_plain_http"),
])
def test_config_errors_name_the_field(certs: Path, api: dict, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(config(**api), certs)
    assert e.value.field == field, str(e.value)


def test_listen_beyond_localhost() -> None:
    with pytest.raises(ConfigError) as e:
        parse(config(listen="0.0.0.0:8443"))
    assert e.value.field == "api.listen" and "tls_cert" in str(e.value) and "allow_plain_http" in str(e.value)
    for local in ("127.0.0.1:8080", "127.3.4.5:80", "::1:8080"):
        assert parse(config(listen=local)).api.listen == local
    api = parse(config(listen="0.0.0.0:8080", allow_plain_http=True)).api
    assert api.allow_plain_http and api.tls_cert is None


def test_listen_beyond_localhost_with_tls(certs: Path) -> None:
    api = parse(config(listen="0.0.0.0:8443", tls_cert="panel.crt", tls_key="panel.key"), certs).api
    assert api.tls_cert and not api.allow_plain_http


def test_a_tls_port_refuses_a_plain_handshake_quickly(certs: Path) -> None:
    """A plain-HTTP client on the TLS port: the server answers no HTTP and closes the connection."""
    cfg = parse(config(tls_cert="panel.crt", tls_key="panel.key"), certs)
    with served(cfg) as (addr, gw):
        host, port = addr.split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            got = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
        assert not got.startswith(b"HTTP/1.1 200"), got[:100]
        assert b'{"status":"ok"}' not in got
