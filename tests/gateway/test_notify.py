"""Notifications ([[notify]]): a real HTTP server on 127.0.0.1 and a real command, no root.

Every test runs the notifier on an asyncio loop of its own, adds events to a real
EventLog and waits (polling, with a deadline) for the audit entries the deliveries write.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from appliance.config import ConfigError, parse
from appliance.events import EventLog
from appliance.notify import NotifyConfig, Notifier, parse_notify, redact
from webui.audit import AuditEntry, AuditLog

BASE = {
    "api": {"token": "a-long-token"},
    "service": [{"name": "web", "vip": "203.0.113.10", "port": 80,
                 "backend": [{"name": "primary", "address": "198.51.100.10"},
                             {"name": "backup", "address": "198.51.100.20"}]}],
}


# --- configuration ----------------------------------------------------------------------------

def test_config_entries_parse_with_defaults() -> None:
    cfg = parse({**BASE, "notify": [
        {"events": ["failover", "health"], "command": ["/usr/local/bin/page", "--urgent"], "states": ["down"]},
        {"events": ["divergence"], "webhook": "https://hooks.example/x?y=1", "timeout": 2, "retries": 0,
         "headers": {"Authorization": "Bearer abc"}},
    ]})
    a, b = cfg.notify
    assert a == NotifyConfig(events=("failover", "health"), command=("/usr/local/bin/page", "--urgent"),
                             states=("down",))
    assert (a.timeout, a.retries, a.webhook) == (5.0, 2, None)
    assert b.webhook == "https://hooks.example/x?y=1" and b.timeout == 2.0 and b.retries == 0
    assert b.headers == (("Authorization", "Bearer abc"),)
    assert parse(BASE).notify == ()


@pytest.mark.parametrize("entry, field, words", [
    ({"command": ["true"]}, "notify[0].events", "required"),
    ({"events": [], "command": ["true"]}, "notify[0].events", "non-empty"),
    ({"events": ["takeover"], "command": ["true"]}, "notify[0].events[0]", "unknown event kind"),
    ({"events": ["failover", "failover"], "command": ["true"]}, "notify[0].events[1]", "twice"),
    ({"events": ["failover"]}, "notify[0].command", "command, a webhook or both"),
    ({"events": ["failover"], "command": "echo hi"}, "notify[0].command", "list of strings"),
    ({"events": ["failover"], "command": ["echo", ""]}, "notify[0].command[1]", "non-empty"),
    ({"events": ["failover"], "webhook": "ftp://x/"}, "notify[0].webhook", "http:// or https://"),
    ({"events": ["failover"], "webhook": "http:///path"}, "notify[0].webhook", "no host"),
    ({"events": ["failover"], "webhook": "http://h:99999/"}, "notify[0].webhook", "not a valid URL"),
    ({"events": ["failover"], "webhook": "http://h/", "timeout": 0}, "notify[0].timeout", "more than 0"),
    ({"events": ["failover"], "webhook": "http://h/", "retries": -1}, "notify[0].retries", "between"),
    ({"events": ["failover"], "webhook": "http://h/", "retry": 1}, "notify[0].retry", "unknown setting"),
    ({"events": ["failover"], "webhook": "http://h/", "headers": {"X": 1}}, "notify[0].headers.X", "string"),
    ({"events": ["failover"], "webhook": "http://h/", "headers": {"Bad Name": "v"}},
     "notify[0].headers.Bad Name", "header name"),
    ({"events": ["failover"], "command": ["true"], "headers": {"A": "b"}}, "notify[0].headers", "webhook"),
    ({"events": ["failover"], "command": ["true"], "states": ["down"]}, "notify[0].states", "health"),
    ({"events": ["health"], "command": ["true"], "states": ["sideways"]}, "notify[0].states[0]", "one of"),
])
def test_config_errors_name_the_field(entry: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse({**BASE, "notify": [entry]})
    assert err.value.field == field
    assert words in err.value.message


def test_notify_must_be_an_array_of_tables() -> None:
    with pytest.raises(ConfigError) as err:
        parse({**BASE, "notify": {"events": ["failover"]}})
    assert err.value.field == "notify"


def test_the_audited_url_has_no_password() -> None:
    assert redact("https://bot:s3cret@hooks.example:8443/x") == "https://bot:***@hooks.example:8443/x"
    assert redact("http://127.0.0.1:9/x") == "http://127.0.0.1:9/x"


# --- a real receiver --------------------------------------------------------------------------

class Receiver:
    """A threading HTTP server on 127.0.0.1: /good answers 200, /fail 500, /flaky 500 for its
    first ``flaky_failures`` requests then 200, /slow sleeps ``slow_for`` seconds first."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.flaky_failures = 2
        self.slow_for = 3.0
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with outer.lock:
                    outer.requests.append((self.path, dict(self.headers), body))
                    n = sum(1 for p, _, _ in outer.requests if p == self.path)
                status = 200
                if self.path == "/fail" or (self.path == "/flaky" and n <= outer.flaky_failures):
                    status = 500
                if self.path == "/slow":
                    outer.release.wait(outer.slow_for)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass            # the notifier gave up and closed the connection

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def bodies(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(b) for p, _, b in self.requests if p == path]

    def headers(self, path: str) -> list[dict[str, str]]:
        with self.lock:
            return [h for p, h, _ in self.requests if p == path]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.close()


def writer(out: Path) -> list[str]:
    """A command that appends its stdin and its event environment to ``out`` as one JSON line."""
    script = ("import json, os, sys\n"
              "env = {k: v for k, v in os.environ.items() if k.startswith('APPLIANCE_EVENT_')}\n"
              "line = json.dumps({'stdin': sys.stdin.read(), 'env': env})\n"
              "open(sys.argv[1], 'a').write(line + '\\n')\n")
    return [sys.executable, "-c", script, str(out)]


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


async def until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def entries(audit: AuditLog, action: str | None = None, target: str | None = None) -> list[AuditEntry]:
    return [e for e in audit.list(action=action, limit=10000) if target is None or e.target == target]


def run(scenario: Callable[[EventLog, AuditLog], Awaitable[None]]) -> None:
    async def main() -> None:
        await scenario(EventLog(), AuditLog())

    asyncio.run(main())


def failover(events: EventLog) -> int:
    return events.add("failover", "health check: primary down (timeout)", service="web", backend="backup",
                      **{"from": "primary", "moved": [1, 2]}).id


# --- delivery ---------------------------------------------------------------------------------

def test_command_and_webhook_get_the_event_and_other_kinds_are_not_delivered(
        receiver: Receiver, tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    cfg = NotifyConfig(events=("failover", "reset"), command=tuple(writer(out)), webhook=receiver.url("/good"),
                       timeout=5.0, retries=0, headers=(("Authorization", "Bearer hook-token"),))

    async def scenario(events: EventLog, audit: AuditLog) -> None:
        n = Notifier.start((cfg,), events, audit)
        try:
            # events of kinds the entry did not ask for come first: a target delivers in order,
            # so had they been delivered they would be there before the failover
            events.add("migration", "moved", service="web", backend="backup", connection=1)
            events.add("health", "primary up -> down: timeout", service="web", backend="primary")
            events.add("admin", "backup ready -> drain", service="web", backend="backup")
            fid = failover(events)
            rid = events.add("reset", "cannot move", service="web", backend="backup", connection=7).id
            await until(lambda: len(entries(audit)) == 4, what="4 audit entries")
        finally:
            await n.stop()
        got = lines(out)
        assert [json.loads(x["stdin"])["id"] for x in got] == [fid, rid]
        first = json.loads(got[0]["stdin"])
        assert first["kind"] == "failover" and first["details"] == {"from": "primary", "moved": [1, 2]}
        env = got[0]["env"]
        assert env["APPLIANCE_EVENT_KIND"] == "failover" and env["APPLIANCE_EVENT_ID"] == str(fid)
        assert env["APPLIANCE_EVENT_SERVICE"] == "web" and env["APPLIANCE_EVENT_BACKEND"] == "backup"
        assert env["APPLIANCE_EVENT_CONNECTION"] == ""
        assert json.loads(env["APPLIANCE_EVENT_JSON"]) == first
        assert got[1]["env"]["APPLIANCE_EVENT_CONNECTION"] == "7"

        assert [b["id"] for b in receiver.bodies("/good")] == [fid, rid]
        assert receiver.bodies("/good")[0] == first
        h = receiver.headers("/good")[0]
        assert h["Authorization"] == "Bearer hook-token" and h["Content-Type"] == "application/json"
        assert h["X-Appliance-Event"] == str(fid)

        cmd = entries(audit, "notify.command")
        hook = entries(audit, "notify.webhook")
        assert [(e.who, e.result, e.params["event"], e.params["attempts"]) for e in cmd] == [
            ("notify", "ok", fid, 1), ("notify", "ok", rid, 1)]
        assert [(e.result, e.params["event"]) for e in hook] == [("ok", fid), ("ok", rid)]
        assert hook[0].target == receiver.url("/good")
        assert cmd[0].target.startswith(sys.executable)
        assert n.stats()[1]["delivered"] == 2 and n.stats()[0]["failed"] == 0

    run(scenario)


def test_retried_on_500_then_delivered(receiver: Receiver) -> None:
    receiver.flaky_failures = 2
    cfg = NotifyConfig(events=("failover",), webhook=receiver.url("/flaky"), timeout=5.0, retries=3, backoff=0.05)

    async def scenario(events: EventLog, audit: AuditLog) -> None:
        n = Notifier.start((cfg,), events, audit)
        try:
            fid = failover(events)
            await until(lambda: len(entries(audit)) == 1, what="the audit entry")
        finally:
            await n.stop()
        (e,) = entries(audit, "notify.webhook")
        assert e.result == "ok" and e.target == receiver.url("/flaky")
        assert e.params["attempts"] == 3 and e.params["errors"] == ["HTTP 500", "HTTP 500"]
        assert [b["id"] for b in receiver.bodies("/flaky")] == [fid, fid, fid]

    run(scenario)


def test_always_500_fails_after_the_retries(receiver: Receiver) -> None:
    cfg = NotifyConfig(events=("failover",), webhook=receiver.url("/fail"), timeout=5.0, retries=2, backoff=0.05)

    async def scenario(events: EventLog, audit: AuditLog) -> None:
        n = Notifier.start((cfg,), events, audit)
        try:
            failover(events)
            await until(lambda: len(entries(audit)) == 1, what="the audit entry")
        finally:
            await n.stop()
        (e,) = entries(audit, "notify.webhook")
        assert e.result == "error: HTTP 500 (3 attempts)"
        assert e.params["attempts"] == 3 and n.stats()[0]["failed"] == 1
        assert len(receiver.bodies("/fail")) == 3

    run(scenario)


def test_a_slow_receiver_times_out_and_delays_neither_the_loop_nor_other_targets(receiver: Receiver) -> None:
    receiver.slow_for = 30.0
    slow = NotifyConfig(events=("failover",), webhook=receiver.url("/slow"), timeout=0.3, retries=1, backoff=0.05)
    good = NotifyConfig(events=("failover",), webhook=receiver.url("/good"), timeout=5.0, retries=0)

    async def scenario(events: EventLog, audit: AuditLog) -> None:
        gaps: list[float] = []

        async def ticker() -> None:     # the packets' loop: how long does it ever wait for a turn?
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.005)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        n = Notifier.start((slow, good), events, audit)
        try:
            started = time.monotonic()
            fid = failover(events)
            await until(lambda: bool(entries(audit, target=receiver.url("/good"))), what="the good receiver")
            good_after = time.monotonic() - started
            assert not entries(audit, target=receiver.url("/slow")), "the slow one is still on its attempts"
            await until(lambda: bool(entries(audit, target=receiver.url("/slow"))), what="the slow one given up")
            slow_after = time.monotonic() - started
        finally:
            await n.stop()
            tick.cancel()
        assert good_after < 0.3, f"the good receiver waited for the slow one ({good_after:.2f} s)"
        # two attempts of 0.3 s and a 0.05 s backoff; the abort ends each attempt at its timeout
        assert 0.6 <= slow_after < 2.0
        (e,) = entries(audit, target=receiver.url("/slow"))
        assert e.result == "error: timeout after 0.3 s (2 attempts)"
        assert e.params == {"notify": 0, "event": fid, "kind": "failover", "attempts": 2,
                            "errors": ["timeout after 0.3 s", "timeout after 0.3 s"]}
        assert len(receiver.bodies("/slow")) == 2
        assert max(gaps) < 0.1, f"the loop stalled {max(gaps):.3f} s"

    run(scenario)


def test_a_full_queue_drops_counts_and_audits_without_blocking(receiver: Receiver) -> None:
    receiver.slow_for = 30.0
    cfg = NotifyConfig(events=("failover",), webhook=receiver.url("/slow"), timeout=0.5, retries=0, queue=2)

    async def scenario(events: EventLog, audit: AuditLog) -> None:
        n = Notifier.start((cfg,), events, audit)
        try:
            first = failover(events)
            await until(lambda: len(receiver.bodies("/slow")) == 1, what="the first event in flight")
            t0 = time.monotonic()
            ids = [failover(events) for _ in range(6)]      # 2 wait in the queue, 4 are dropped
            assert time.monotonic() - t0 < 0.05
            await until(lambda: n.stats()[0]["dropped"] == 4, what="4 drops counted")
            drops = [e for e in entries(audit) if "queue full" in e.result]
            assert len(drops) == 1, "one audit entry for a run of drops, not one per event"
            assert drops[0].result == f"error: queue full (2 events waiting), event {ids[2]} dropped"
            await until(lambda: any(e.result.startswith("error: timeout") for e in entries(audit)),
                        what="the first event given up on")
            receiver.release.set()          # the receiver recovers: the queue drains
            await until(lambda: n.stats()[0]["delivered"] == 2, what="the queued events delivered")
            last = failover(events)         # the queue takes events again: the run of drops is summed up
            await until(lambda: n.stats()[0]["delivered"] == 3, what="the last event delivered")
        finally:
            await n.stop()
        delivered = [e.params["event"] for e in entries(audit) if e.result == "ok"]
        assert delivered == [ids[0], ids[1], last]
        (timeout,) = [e for e in entries(audit) if e.result.startswith("error: timeout")]
        assert timeout.params["event"] == first
        summary = [e for e in entries(audit) if "dropped before" in e.result]
        assert [e.result for e in summary] == [f"error: queue full: 4 event(s) dropped before event {last}"]
        assert summary[0].params["dropped"] == 4

    run(scenario)


def test_a_hanging_command_is_killed_at_its_timeout_and_fails_after_the_retries(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = ("import os, sys, time\n"
              "open(sys.argv[1], 'a').write(f'{os.getpid()}\\n')\n"
              "time.sleep(60)\n")
    cfg = NotifyConfig(events=("divergence",), command=(sys.executable, "-c", script, str(pids)),
                       timeout=0.3, retries=1, backoff=0.05)

    async def scenario(events: EventLog, audit: AuditLog) -> None:
        n = Notifier.start((cfg,), events, audit)
        try:
            did = events.add("divergence", "bytes differ at 1234", service="web", backend="backup", connection=3).id
            await until(lambda: len(entries(audit)) == 1, what="the audit entry")
        finally:
            await n.stop()
        (e,) = entries(audit, "notify.command")
        assert e.result == "error: timeout after 0.3 s (killed) (2 attempts)"
        assert e.params["event"] == did and e.params["attempts"] == 2
        started = [int(p) for p in pids.read_text().split()]
        assert len(started) == 2
        for pid in started:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()

    run(scenario)


def test_a_failing_command_reports_its_status_and_stderr() -> None:
    cfg = NotifyConfig(events=("overload",), command=(sys.executable, "-c", "import sys; sys.exit('no pager')"),
                       timeout=5.0, retries=0)
    missing = NotifyConfig(events=("overload",), command=("/nonexistent/notify-hook",), timeout=5.0, retries=1,
                           backoff=0.01)

    async def scenario(events: EventLog, audit: AuditLog) -> None:
        n = Notifier.start((cfg, missing), events, audit)
        try:
            events.add("overload", "connection table full")
            await until(lambda: len(entries(audit)) == 2, what="two audit entries")
        finally:
            await n.stop()
        results = {e.params["notify"]: e.result for e in entries(audit)}
        assert results[0] == "error: exit status 1: no pager (1 attempt)"
        assert results[1].startswith("error: cannot run: ") and results[1].endswith("(2 attempts)")

    run(scenario)


def test_health_events_filtered_by_their_new_state(tmp_path: Path) -> None:
    out = tmp_path / "health.jsonl"
    cfg = NotifyConfig(events=("health", "failover"), command=tuple(writer(out)), timeout=5.0, retries=0,
                       states=("down",))

    async def scenario(events: EventLog, audit: AuditLog) -> None:
        n = Notifier.start((cfg,), events, audit)
        try:
            events.add("health", "primary unknown -> up: ok", service="web", backend="primary")
            down = events.add("health", "primary up -> down: timeout", service="web", backend="primary").id
            events.add("health", "primary down -> up: ok", service="web", backend="primary")
            fid = failover(events)
            await until(lambda: len(entries(audit)) == 2, what="two deliveries")
        finally:
            await n.stop()
        assert [json.loads(x["stdin"])["id"] for x in lines(out)] == [down, fid]

    run(scenario)


def test_stop_ends_a_command_in_flight(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = "import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(60)\n"
    cfg = NotifyConfig(events=("failover",), command=(sys.executable, "-c", script, str(pids)), timeout=30.0)

    async def scenario(events: EventLog, audit: AuditLog) -> None:
        n = Notifier.start((cfg,), events, audit)
        try:
            failover(events)
            await until(lambda: pids.exists() and pids.read_text() != "", what="the command started")
        finally:
            await n.stop()
        pid = int(pids.read_text())
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        assert events._subscribers == []

    run(scenario)


def test_no_entries_no_subscription() -> None:
    async def scenario(events: EventLog, audit: AuditLog) -> None:
        n = Notifier.start(parse_notify(None), events, audit)
        assert n.targets == [] and events._subscribers == []
        await n.stop()

    run(scenario)


def test_environment_is_the_appliances_plus_the_event(tmp_path: Path) -> None:
    out = tmp_path / "env.jsonl"
    os.environ["NOTIFY_TEST_MARK"] = "kept"
    script = ("import json, os, sys\n"
              "open(sys.argv[1], 'w').write(json.dumps(dict(os.environ)))\n")
    cfg = NotifyConfig(events=("reset",), command=(sys.executable, "-c", script, str(out)), timeout=5.0)

    async def scenario(events: EventLog, audit: AuditLog) -> None:
        n = Notifier.start((cfg,), events, audit)
        try:
            events.add("reset", "admin reset", service="web", backend="primary", connection=42)
            await until(lambda: len(entries(audit)) == 1, what="the delivery")
        finally:
            await n.stop()
            del os.environ["NOTIFY_TEST_MARK"]
        env = json.loads(out.read_text())
        assert env["NOTIFY_TEST_MARK"] == "kept"
        assert env["APPLIANCE_EVENT_REASON"] == "admin reset" and env["APPLIANCE_EVENT_CONNECTION"] == "42"

    run(scenario)
