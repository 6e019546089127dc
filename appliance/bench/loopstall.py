"""The event loop's longest stall during a failover of several hundred connections, panel open.

``python -m appliance.bench.loopstall [--connections 300] [--rounds 3] [--batch 32 --batch 1000000]``

The gateway's one loop carries every packet, the API and the timers (see ``appliance.daemon``);
while it runs one long callback, packets wait in the kernel's queues.  This builds the lab, and
per round and per ``gateway.failover_batch`` value (32 is the default; a batch larger than the
table moves every connection in one callback, as before the loop had one owner): starts the
appliance, opens ``--connections`` slow keep-alive downloads from the client, opens the panel's
live streams (status, a page of connections, events), cuts the primary's link, waits until every
connection has moved (the moves verified), and reads the loop monitor's stalls of that window from
``GET /api/v1/loop?since=`` (every callback of 2 ms or more, with its time).
It prints one line per run and the medians; ``--json FILE`` keeps them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from ..apiclient import api_get
from ..lab import topology as lab

HOLDER = r"""
import select, signal, socket, sys, time
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
n, vip, port, path = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
socks = []
for i in range(n):
    s = socket.create_connection((vip, port), timeout=10)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {vip}\r\n\r\n".encode())
    s.setblocking(False)
    socks.append(s)
got = {s: 0 for s in socks}
dead = set()
print("open", flush=True)
end = time.time() + float(sys.argv[5])
while time.time() < end and not stop:
    for s in socks:  # about 80 KB/s a connection: they stay open through the failover
        if s in dead:
            continue
        try:
            b = s.recv(4096)
        except BlockingIOError:
            continue
        except OSError:
            dead.add(s); continue
        if not b:
            dead.add(s)
        got[s] += len(b)
    time.sleep(0.05)
print(f"alive {n - len(dead)} bytes {sum(got.values())}", flush=True)
for s in socks:  # close with a RST: no socket of this run lingers (FIN_WAIT) into the next one
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()
"""


def _sse(url: str, token: str, stop: threading.Event) -> None:
    """Read a server-sent event stream until told to stop (the panel's live pages)."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            while not stop.is_set() and r.readline():
                pass
    except OSError:
        pass


def one_run(n: int, batch: int, api: str, token: str, k: int) -> dict[str, Any]:
    lab.down_appliance_state()
    lab.restore_link("primary")
    # run k's client ports are its own: the last run's server sockets (their client gone, still
    # retransmitting) never meet a new connection with the same address pair
    lo = 20000 + (k % 20) * 2000
    lab.nsexec("lab-client", "sysctl", "-qw", f"net.ipv4.ip_local_port_range={lo} {lo + 1999}")
    config = lab.variant_config(f"stall-{batch}", gateway={"failover_batch": batch})
    lab.start_appliance(config)
    holder = subprocess.Popen(["ip", "netns", "exec", "lab-client", sys.executable, "-c", HOLDER, str(n), lab.VIP,
                               str(lab.SERVICE_PORT), "/1G.bin", "120"], stdout=subprocess.PIPE, text=True)
    stop = threading.Event()
    streams = [threading.Thread(target=_sse, args=(f"{api}{p}", token, stop), daemon=True) for p in (
        "/api/v1/status/stream", "/api/v1/connections/stream?limit=50", "/api/v1/events/stream")]
    try:
        assert holder.stdout is not None
        holder.stdout.readline()  # "open"
        for th in streams:
            th.start()
        deadline = time.monotonic() + 60
        while True:
            conns = api_get("/api/v1/connections?service=web&state=ESTABLISHED&limit=100000", api, token)
            if isinstance(conns, list) and sum(1 for c in conns if c["bytes_from_server"] > 0) >= n:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(conns)} connections established")
            time.sleep(0.2)
        t0 = time.time()
        lab.cut_link("primary")
        deadline = time.monotonic() + 120
        while True:  # the web service's failover, and every one of its moves verified
            fos = api_get("/api/v1/events?kind=failover&service=web", api, token)
            moves = api_get("/api/v1/events?kind=migration&service=web&limit=10000", api, token)
            st = api_get("/api/v1/status", api, token)
            assert isinstance(fos, list) and isinstance(moves, list) and isinstance(st, dict)
            if fos and len(moves) >= len(fos[0]["details"]["moved"]) and st["moving"] == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"moves not done: {len(moves)} of {fos and fos[0]['details']}")
            time.sleep(0.5)
        t1 = max(m["time"] for m in moves) if moves else time.time()
        fo = fos[0]
        loop = api_get(f"/api/v1/loop?since={t0}", api, token)
        assert isinstance(loop, dict)
        stalls = [s for s in loop["recent_stalls"] if s["time"] <= t1]
        worst = max(stalls, key=lambda s: s["ms"], default={"ms": 0.0, "callback": None})
        resets = api_get("/api/v1/events?kind=reset&service=web", api, token)
        assert isinstance(resets, list)
        holder.terminate()
        out, _ = holder.communicate(timeout=30)
        return {"batch": batch, "connections": n, "moved": len(fo["details"]["moved"]),
                "reset": len(fo["details"]["reset"]), "failover_ms": round((t1 - fo["time"]) * 1000, 1),
                "detect_ms": round((fo["time"] - t0) * 1000, 1), "max_stall_ms": worst["ms"], "worst": worst["callback"],
                "stalls_over_10ms": sum(1 for s in stalls if s["ms"] > 10), "holder": out.strip(),
                "resets": sorted({e["reason"] for e in resets})}
    finally:
        stop.set()
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        lab.restore_link("primary")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m appliance.bench.loopstall", description=__doc__.split("\n")[0])
    p.add_argument("--connections", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, action="append", help="gateway.failover_batch values (default: 32)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    batches = args.batch or [32]
    info = lab.up()
    api, token = str(info["api"]), str(info["token"])
    runs: list[dict[str, Any]] = []
    try:
        for r in range(args.rounds):
            for b in batches:  # alternating, so drift hits every variant alike
                res = one_run(args.connections, b, api, token, len(runs))
                runs.append(res)
                print(json.dumps(res), flush=True)
    finally:
        lab.nsexec("lab-client", "sysctl", "-qw", "net.ipv4.ip_local_port_range=32768 60999")
        lab.down_appliance_state()
        lab.up()
    for b in batches:
        mine = [r for r in runs if r["batch"] == b]
        print(f"failover_batch {b}: {args.connections} connections, median longest stall "
              f"{statistics.median(r['max_stall_ms'] for r in mine):.1f} ms, median failover "
              f"{statistics.median(r['failover_ms'] or 0 for r in mine):.0f} ms ({len(mine)} runs)")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
