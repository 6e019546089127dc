"""Health checks: the up/down state machine, real probes, and the checker."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from appliance.health import BackendHealth, HealthChecker, HealthConfig, Target, probe_http, probe_tcp


# --- the state machine ---------------------------------------------------------------

def test_first_result_decides_then_fall_and_rise() -> None:
    h = BackendHealth(rise=2, fall=3)
    assert h.state == "unknown"
    assert h.record(True, 0.001, 0.0, "connected") == ("unknown", "up")
    assert h.record(False, None, 1.0, "refused") is None
    assert h.record(False, None, 2.0, "refused") is None
    assert h.record(True, 0.001, 3.0, "connected") is None          # resets the failure run
    assert h.record(False, None, 4.0, "refused") is None
    assert h.record(False, None, 5.0, "refused") is None
    assert h.record(False, None, 6.0, "timeout") == ("up", "down")  # third consecutive failure
    assert h.last_change == 6.0
    assert h.record(True, 0.002, 7.0, "connected") is None
    assert h.record(False, None, 8.0, "refused") is None           # resets the success run
    assert h.record(True, 0.002, 9.0, "connected") is None
    assert h.record(True, 0.003, 10.0, "connected") == ("down", "up")
    assert (h.checks, h.failures, h.transitions) == (11, 6, 3)
    assert (h.consecutive_ok, h.consecutive_fail) == (2, 0)
    assert (h.last_result, h.last_detail, h.last_latency, h.last_check) == ("ok", "connected", 0.003, 10.0)
    assert h.downtime(100.0) == pytest.approx(4.0)                  # down from 6 to 10


def test_first_failure_goes_down_and_downtime_counts_the_ongoing_period() -> None:
    h = BackendHealth(rise=1, fall=1)
    assert h.record(False, None, 10.0, "refused") == ("unknown", "down")
    assert h.downtime() == 0.0
    assert h.downtime(12.5) == pytest.approx(2.5)
    assert h.record(True, 0.001, 13.0, "connected") == ("down", "up")   # rise 1
    assert h.downtime_total == pytest.approx(3.0)
    assert h.record(False, None, 20.0, "refused") == ("up", "down")    # fall 1
    d = h.as_dict(now=21.0)
    assert d["state"] == "down" and d["downtime_total"] == pytest.approx(4.0)
    assert d["transitions"] == 3 and d["last_result"] == "fail" and d["last_detail"] == "refused"
    assert d["consecutive_fail"] == 1 and d["checks"] == 3 and d["failures"] == 2


# --- real sockets ------------------------------------------------------------------

def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield s
    s.close()


@pytest.fixture
def full_listener() -> Iterator[int]:
    """A listening socket whose accept queue (backlog 0) is full: SYNs go unanswered."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    for _ in range(8):
        c = socket.socket()
        c.settimeout(0.2)
        try:
            c.connect(("127.0.0.1", port))
        except TimeoutError:
            c.close()
            break
        fillers.append(c)
    else:
        pytest.fail("could not fill the accept queue")
    yield port
    for c in fillers:
        c.close()
    srv.close()


@contextlib.contextmanager
def http_server(response: bytes | None) -> Iterator[tuple[int, list[bytes]]]:
    """A one-thread server that reads a request and answers ``response`` (None: never).

    Yields its port and the list of requests it has read."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(0.05)
    stop = threading.Event()
    requests: list[bytes] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(1)
                data = b""
                with contextlib.suppress(OSError):
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                requests.append(data)
                if response is None:
                    stop.wait(1)
                else:
                    with contextlib.suppress(OSError):
                        conn.sendall(response)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1], requests
    finally:
        stop.set()
        t.join(2)
        srv.close()


def test_probe_tcp_connected(listener: socket.socket) -> None:
    ok, latency, detail = asyncio.run(probe_tcp("127.0.0.1", listener.getsockname()[1], 1.0))
    assert (ok, detail) == (True, "connected")
    assert latency is not None and 0 <= latency < 1
    conn, _ = listener.accept()          # the probe connected, then closed its side
    conn.settimeout(1)
    assert conn.recv(1) == b""
    conn.close()


def test_probe_tcp_refused() -> None:
    assert asyncio.run(probe_tcp("127.0.0.1", closed_port(), 1.0)) == (False, None, "refused")


def test_probe_tcp_timeout(full_listener: int) -> None:
    start = time.monotonic()
    assert asyncio.run(probe_tcp("127.0.0.1", full_listener, 0.2)) == (False, None, "timeout")
    assert time.monotonic() - start < 1


def test_probe_http_ok_and_request_shape() -> None:
    with http_server(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n") as (port, requests):
        ok, latency, detail = asyncio.run(probe_http("127.0.0.1", port, "/health", 1.0, (200, 399)))
    assert (ok, detail) == (True, "HTTP 200") and latency is not None
    assert requests[0] == (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                       b"User-Agent: appliance-health\r\n\r\n")


def test_probe_http_status_outside_expect_is_down() -> None:
    with http_server(b"HTTP/1.1 503 Service Unavailable\r\n\r\n") as (port, _):
        ok, _, detail = asyncio.run(probe_http("127.0.0.1", port, "/", 1.0, (200, 399)))
        assert (ok, detail) == (False, "HTTP 503")
        ok, _, detail = asyncio.run(probe_http("127.0.0.1", port, "/", 1.0, (200, 503)))
        assert (ok, detail) == (True, "HTTP 503")


def test_probe_http_garbage_refused_and_silence_are_down() -> None:
    with http_server(b"SSH-2.0-OpenSSH_9.2\r\n") as (port, _):
        ok, _, detail = asyncio.run(probe_http("127.0.0.1", port, "/", 1.0, (200, 399)))
    assert not ok and detail.startswith("bad status line")
    with http_server(b"") as (port, _):
        ok, _, detail = asyncio.run(probe_http("127.0.0.1", port, "/", 1.0, (200, 399)))
    assert not ok and detail == "closed without a response"
    assert asyncio.run(probe_http("127.0.0.1", closed_port(), "/", 1.0, (200, 399))) == (False, None, "refused")
    with http_server(None) as (port, _):
        start = time.monotonic()
        assert asyncio.run(probe_http("127.0.0.1", port, "/", 0.2, (200, 399))) == (False, None, "timeout")
        assert time.monotonic() - start < 1


# --- the checker ----------------------------------------------------------------------

def test_checker_reports_a_backend_going_down_and_probes_on_demand() -> None:
    steady = socket.socket()
    steady.bind(("127.0.0.1", 0))
    steady.listen(64)
    doomed = socket.socket()
    doomed.bind(("127.0.0.1", 0))
    doomed.listen(64)
    cfg = HealthConfig(interval=0.05, rise=2, fall=2)
    targets = [Target("web", "primary", "127.0.0.1", doomed.getsockname()[1], cfg),
               Target("web", "backup", "127.0.0.1", steady.getsockname()[1], cfg)]
    changes: list[tuple[str, str, str, str]] = []

    def on_change(t: Target, old: str, new: str, detail: str) -> None:
        changes.append((t.key, old, new, detail))
        raise RuntimeError("a broken callback must not stop the checks")

    async def wait_for(predicate, limit: float) -> None:
        deadline = time.monotonic() + limit
        while not predicate():
            assert time.monotonic() < deadline, f"timed out; changes so far: {changes}"
            await asyncio.sleep(0.01)

    async def main() -> None:
        checker = HealthChecker(targets, on_change)
        runner = asyncio.create_task(checker.run())
        await wait_for(lambda: len(changes) == 2, 0.5)
        assert sorted(changes) == [("web/backup", "unknown", "up", "connected"),
                                   ("web/primary", "unknown", "up", "connected")]
        assert checker.state("web", "primary") == "up"

        doomed.close()
        closed_at = time.monotonic()
        await wait_for(lambda: len(changes) == 3, 0.5)
        assert changes[2] == ("web/primary", "up", "down", "refused")
        assert time.monotonic() - closed_at < 4 * cfg.interval + 0.1   # fall 2 at 0.05 s

        assert await checker.probe_now("web", "backup") is True
        assert await checker.probe_now("web", "primary") is False
        status = checker.status()
        assert set(status) == {"web/primary", "web/backup"}
        assert status["web/primary"]["state"] == "down"
        assert status["web/backup"]["state"] == "up" and status["web/backup"]["failures"] == 0
        checks = status["web/backup"]["checks"]
        await asyncio.sleep(0.2)                                       # probes keep coming, on schedule
        assert 3 <= checker.status()["web/backup"]["checks"] - checks <= 6
        assert len(changes) == 3 and not runner.done()
        with pytest.raises(KeyError):
            await checker.probe_now("web", "nope")

        checker.stop()
        await asyncio.wait_for(runner, 1)                              # run() returns after stop()

    try:
        asyncio.run(main())
    finally:
        steady.close()
        doomed.close()


def test_checker_probe_now_reports_transitions_through_the_callback() -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    cfg = HealthConfig(check="tcp", interval=10.0, rise=1, fall=1)
    seen: list[tuple[str, str]] = []
    checker = HealthChecker([Target("db", "main", "127.0.0.1", port, cfg)],
                            lambda t, old, new, detail: seen.append((old, new)))

    async def main() -> None:
        assert checker.state("db", "main") == "unknown"
        assert await checker.probe_now("db", "main") is True
        srv.close()
        assert await checker.probe_now("db", "main") is False

    asyncio.run(main())
    assert seen == [("unknown", "up"), ("up", "down")]
    assert checker.state("db", "main") == "down"


def test_probes_start_every_interval_even_when_they_take_time(full_listener: int) -> None:
    # each probe times out after 0.08 s; with interval 0.1 a probe must still start every 0.1 s
    # (5 results in 0.55 s), not 0.1 s after the previous one ended (3 results)
    cfg = HealthConfig(interval=0.1, timeout=0.08, fall=1)
    checker = HealthChecker([Target("web", "slow", "127.0.0.1", full_listener, cfg)], lambda *a: None)

    async def main() -> dict:
        runner = asyncio.create_task(checker.run())
        await asyncio.sleep(0.55)
        checker.stop()
        await asyncio.wait_for(runner, 1)
        return checker.status()["web/slow"]

    st = asyncio.run(main())
    assert st["state"] == "down" and st["last_detail"] == "timeout"
    assert 4 <= st["checks"] <= 6


def test_down_from_unknown_needs_fall_failures_too() -> None:
    # a link still coming up when the appliance starts must not fail its service over
    from appliance.health import BackendHealth

    h = BackendHealth(rise=2, fall=3)
    assert h.record(False, None, 1.0, "timeout") is None
    assert h.record(False, None, 1.1, "timeout") is None
    assert h.state == "unknown"
    assert h.record(False, None, 1.2, "timeout") == ("unknown", "down")
    h2 = BackendHealth(rise=2, fall=3)
    h2.record(False, None, 1.0, "timeout")
    assert h2.record(True, 0.001, 1.1, "connected") == ("unknown", "up")


def test_a_dual_stack_backend_is_up_only_while_both_its_addresses_answer() -> None:
    """Its IPv4 and IPv6 clients are both served by it: one family's listener gone is a backend down,
    and the detail names the address that failed."""
    v6 = socket.socket(socket.AF_INET6)
    v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    v6.bind(("::1", 0))
    v6.listen(64)
    port = v6.getsockname()[1]
    v4 = socket.socket()
    v4.bind(("127.0.0.1", port))
    v4.listen(64)
    cfg = HealthConfig(interval=0.05, rise=1, fall=1)
    target = Target("web", "primary", "127.0.0.1", port, cfg, also=("::1",))
    changes: list[tuple[str, str, str]] = []

    async def main() -> None:
        checker = HealthChecker([target], lambda t, old, new, detail: changes.append((old, new, detail)))
        assert await checker.probe_now("web", "primary") is True
        v6.close()
        assert await checker.probe_now("web", "primary") is False
        assert changes[-1] == ("up", "down", "::1: refused")
        v4.close()

    asyncio.run(main())
