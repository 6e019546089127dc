"""Benchmark: a resume-mode move through the gateway, hold to release, over many moves.

Theory of operation
-------------------
Builds the lab (``appliance.lab.topology.up``: the example resumable file server and
an agent on primary and backup, the ``resumable`` service in resume mode),
starts one download through the VIP with the example client (paced at
``--rate``), and moves its connection ``--migrations`` times through the
REST API (``POST /api/v1/connections/{id}/migrate {"to", "mode":
"resume"}``), alternately to the backup and back, ``--interval`` seconds
apart.  Each answer is the move's ``migration`` event, whose
``timings_ms`` the gateway measured itself: ``hold_to_release`` (from the
data plane holding the connection to the hold's end), and within it
``export`` (the origin agent's export and the destination agent's silent
import, one request), ``switch`` and ``activate``; ``finish`` (the origin's
copy disconnected) comes after the release.  The API round trip is
reported too.  At the end the client's sha256 must equal the file's, so
every figure is of a move that lost and duplicated nothing.

    sudo flock /run/appliance-lab.lock .venv/bin/python -m appliance.bench.resume --migrations 100
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ..lab import topology as lab

ROOT = Path(__file__).resolve().parents[2]


def _api(path: str, method: str = "GET", body: Any = None) -> Any:
    tok = (lab.run_dir() / "token").read_text().strip()
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{lab.API_HOST}:{lab.API_PORT}{path}", data=data, method=method,
                                 headers={"Authorization": f"Bearer {tok}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(p * (len(s) - 1))))]


def run(migrations: int, interval: float, rate: int, name: str) -> dict[str, Any]:
    lab.up()
    proc = subprocess.Popen(["ip", "netns", "exec", "lab-client", sys.executable,
                             str(ROOT / "examples" / "resumable_fileserver" / "client.py"),
                             f"{lab.VIP}:{lab.RESUME_PORT}", name, "--rate", str(rate), "--timeout", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        cid = None
        while cid is None and time.monotonic() < deadline:
            conns = [c for c in _api("/api/v1/connections?service=resumable")
                     if c["state"] == "ESTABLISHED" and c["bytes_from_server"] > 1 << 20]
            cid = conns[0]["id"] if conns else None
            time.sleep(0.1)
        if cid is None:
            raise RuntimeError("no download under way through the resumable service")
        rows: list[dict[str, Any]] = []
        failures: list[str] = []
        to = "backup"
        for _ in range(migrations):
            t0 = time.perf_counter()
            try:
                ev = _api(f"/api/v1/connections/{cid}/migrate", "POST", {"to": to, "mode": "resume"})
            except urllib.error.HTTPError as exc:
                failures.append(f"{exc.code}: {exc.read().decode(errors='replace')[:300]}")
                time.sleep(interval)
                continue
            api_ms = (time.perf_counter() - t0) * 1000
            rows.append({**ev["details"]["timings_ms"], "api": api_ms, "queued": ev["details"].get("queued") or 0})
            to = "primary" if to == "backup" else "backup"
            time.sleep(interval)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    digest = out.split()[0] if out.split() else ""
    want = next(line.split()[0] for line in (lab.cache_dir() / "www" / "SHA256SUMS").read_text().splitlines()
                if line.split()[1] == name)
    keys = ["hold_to_release", "export", "switch", "activate", "finish", "api", "queued"]
    stats = {k: {"median": statistics.median(r[k] for r in rows), "p90": _pct([r[k] for r in rows], 0.9),
                 "max": max(r[k] for r in rows)} for k in keys} if rows else {}
    return {"migrations": len(rows), "failed": failures, "client_rc": proc.returncode,
            "sha256_ok": digest == want, "client_stderr": err.strip()[-500:], "stats": stats, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--migrations", type=int, default=100)
    ap.add_argument("--interval", type=float, default=0.05, help="seconds between moves")
    ap.add_argument("--rate", type=int, default=5_000_000, help="the download's pace, bytes per second")
    ap.add_argument("--file", default="100M.bin")
    ap.add_argument("--json", help="write every move's timings here")
    a = ap.parse_args()
    res = run(a.migrations, a.interval, a.rate, a.file)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    print(f"{res['migrations']} moves ({len(res['failed'])} refused), client exit {res['client_rc']}, "
          f"sha256 {'matches' if res['sha256_ok'] else 'DIFFERS'}")
    for k, s in res["stats"].items():
        unit = "B " if k == "queued" else "ms"
        print(f"  {k:<16} median {s['median']:8.2f} {unit}   p90 {s['p90']:8.2f} {unit}   max {s['max']:8.2f} {unit}")
    for f in res["failed"][:5]:
        print("  refused:", f)
    if not res["sha256_ok"] or res["client_rc"] != 0 or res["failed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
