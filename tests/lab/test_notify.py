"""Notifications in the lab: a failover while a download runs reaches a command on the gateway and
webhooks served in lab-client (good, slow, failing), and the packets never wait for them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from appliance.lab import topology as lab

from .helpers import api, expected_sha, sha256_file, start_download, wait_for

pytestmark = pytest.mark.lab

HOOK_HOST = "192.0.2.10"   # lab-client, reachable from the appliance in lab-gateway through br-client
HOOK_PORT = 18080

# /good answers 200, /fail 500, /slow sleeps past the notifier's timeout first; every request
# is one JSON line in the log: path and body
RECEIVER = r"""
import json, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

host, port, log, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
lock = threading.Lock()

class H(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with lock, open(log, "a") as f:
            f.write(json.dumps({"path": self.path, "body": body.decode(),
                                "auth": self.headers.get("Authorization")}) + "\n")
        if self.path == "/slow":
            time.sleep(5)
        try:
            self.send_response(500 if self.path == "/fail" else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()
        except OSError:
            pass

    def log_message(self, *a):
        pass

srv = ThreadingHTTPServer((host, port), H)
srv.daemon_threads = True
open(ready, "w").write("ready\n")
srv.serve_forever()
"""

WRITER = "import sys\nopen(sys.argv[1], 'a').write(sys.stdin.read() + '\\n')\n"


def notify_toml(out: Path) -> str:
    def entry(body: str) -> str:
        return f"\n[[notify]]\nevents = [\"failover\"]\n{body}"

    url = f"http://{HOOK_HOST}:{HOOK_PORT}"
    return (entry(f"command = {json.dumps([sys.executable, '-c', WRITER, str(out)])}\ntimeout = 5.0\n")
            + entry(f'webhook = "{url}/good"\ntimeout = 2.0\nretries = 2\n'
                    '[notify.headers]\nAuthorization = "Bearer lab-hook"\n')
            + entry(f'webhook = "{url}/slow"\ntimeout = 0.5\nretries = 2\nbackoff = 0.2\n')
            + entry(f'webhook = "{url}/fail"\ntimeout = 2.0\nretries = 2\nbackoff = 0.2\n'))


def received(log: Path, path: str) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [r for r in map(json.loads, log.read_text().splitlines()) if r["path"] == path]


def notify_audit() -> list[dict[str, Any]]:
    return api("/api/v1/audit?who=notify&limit=100")


def test_failover_notifies_command_and_webhooks_while_the_download_goes_on(fresh: dict, tmp_path: Path) -> None:
    out = lab.run_dir() / "notify-command.jsonl"
    out.unlink(missing_ok=True)
    hook_log, ready = tmp_path / "hooks.jsonl", tmp_path / "ready"
    receiver = subprocess.Popen(
        ["ip", "netns", "exec", "lab-client", sys.executable, "-c", RECEIVER, HOOK_HOST, str(HOOK_PORT),
         str(hook_log), str(ready)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dl = None
    try:
        wait_for(lambda: ready.exists() or receiver.poll() is not None, what="the webhook receiver listening")
        assert receiver.poll() is None, receiver.stderr.read() if receiver.stderr else ""
        lab.stop_appliance()
        lab.start_appliance(lab.variant_config("notify", extra=notify_toml(out)))

        data = tmp_path / "100M.bin"
        dl = start_download("100M.bin", data, rate="20M")
        wait_for(lambda: data.exists() and data.stat().st_size > 10 << 20, timeout=30, what="10 MiB received")
        lab.cut_link("primary")
        rc, _ = dl.wait(timeout=60)
        assert rc == 0
        assert sha256_file(data) == expected_sha("100M.bin")     # the packets did not wait for anyone

        # every service of the lab has the primary as its active backend: each fails over
        fos = api("/api/v1/events?kind=failover&limit=100")
        (web,) = [e for e in fos if e["service"] == "web"]
        assert web["details"]["from"] == "primary" and web["backend"] == "backup"
        ids = [e["id"] for e in fos]

        # the command, run in lab-gateway, got each failover event's JSON on stdin, in order
        got = wait_for(lambda: out.exists() and len(out.read_text().splitlines()) >= len(fos) and
                       out.read_text().splitlines(), timeout=10, what="the command's output")
        assert [json.loads(x) for x in got] == fos
        # the good receiver in lab-client got each once, with the configured header
        good = wait_for(lambda: len(received(hook_log, "/good")) >= len(fos) and received(hook_log, "/good"),
                        timeout=10, what="the good webhook")
        assert [json.loads(r["body"]) for r in good] == fos and {r["auth"] for r in good} == {"Bearer lab-hook"}

        # every series of attempts audited, one entry per target and event; the slow receiver ends
        # last (per event: 3 timeouts of 0.5 s and backoffs of 0.2 + 0.4 s)
        wait_for(lambda: len(notify_audit()) == 4 * len(fos), timeout=10 + 3 * len(fos),
                 what="an audit entry per target and event")
        audit = notify_audit()
        url = f"http://{HOOK_HOST}:{HOOK_PORT}"

        def of(action: str, target: str | None = None) -> list[dict[str, Any]]:
            found = [e for e in audit if e["action"] == action and (target is None or e["target"] == target)]
            assert [e["params"]["event"] for e in found] == ids and {e["who"] for e in found} == {"notify"}
            return found

        assert {e["result"] for e in of("notify.command")} == {"ok"}
        assert {(e["result"], e["params"]["attempts"]) for e in of("notify.webhook", f"{url}/good")} == {("ok", 1)}
        for e in of("notify.webhook", f"{url}/slow"):
            assert e["result"] == "error: timeout after 0.5 s (3 attempts)"
            assert e["params"]["errors"] == ["timeout after 0.5 s"] * 3
        for e in of("notify.webhook", f"{url}/fail"):
            assert e["result"] == "error: HTTP 500 (3 attempts)" and e["params"]["errors"] == ["HTTP 500"] * 3
        assert len(received(hook_log, "/slow")) == 3 * len(fos) and len(received(hook_log, "/fail")) == 3 * len(fos)
        # and the status says so per target
        targets = {t["target"].rsplit("/", 1)[-1]: t for t in api("/api/v1/status")["notify"]}
        assert targets["good"]["delivered"] == len(fos) and targets["good"]["failed"] == 0
        assert targets["fail"]["failed"] == len(fos) and targets["fail"]["attempts"] == 3 * len(fos)
    finally:
        if dl is not None and dl.proc.poll() is None:
            dl.proc.kill()
            dl.proc.wait()
        receiver.terminate()
        try:
            receiver.wait(timeout=5)
        except subprocess.TimeoutExpired:
            receiver.kill()
            receiver.wait()
        lab.restore_link("primary")
        lab.stop_appliance()
        out.unlink(missing_ok=True)
