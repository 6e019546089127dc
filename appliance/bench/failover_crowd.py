"""``appliance lab bench --failover-crowd N``: the primary dies under N open downloads, each
with 1 MiB or more delivered; every one must go on with the right bytes, and the figure is the
longest pause any client saw.

A client in ``lab-client`` opens N connections (in waves), sends ``GET /10M.bin`` on each and
reads the first 1 MiB at full speed; once all N have it, it says so, and the bench cuts the
primary's link.  Each connection then reads on at a paced 100 KB/s in 8 KiB pieces for
``window`` seconds, comparing every byte with the file (the lab's copy) at its offset, and
records the longest gap between two arrivals.  A connection *kept* got bytes after the cut, all
of them right, and no error; its *pause* is its longest gap during the window (the pacing's own
gap is about 80 ms).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap
import time
from typing import Any

from ..lab import topology as lab

CLIENT = textwrap.dedent("""
    import asyncio, json, resource, sys, time
    host, port, n, window, ref = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    resource.setrlimit(resource.RLIMIT_NOFILE, (n + 1024, n + 1024))
    data = open(ref, "rb").read()
    HEAD = 1 << 20

    async def conn(i, ready, go, out):
        rec = {"bytes": 0, "bad": 0, "error": None, "max_gap": 0.0, "after_cut": 0}
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
            w.write(f"GET /10M.bin HTTP/1.1\\r\\nHost: {host}\\r\\n\\r\\n".encode())
            await asyncio.wait_for(r.readuntil(b"\\r\\n\\r\\n"), 60)
            off = 0
            while off < HEAD:
                chunk = await asyncio.wait_for(r.read(HEAD - off), 60)
                if not chunk:
                    raise ConnectionError("closed early")
                rec["bad"] += chunk != data[off:off + len(chunk)]
                off += len(chunk)
            ready.append(i)
            cut = await go
            end = cut + window
            last = time.monotonic()
            while time.monotonic() < end and off < len(data):
                chunk = await asyncio.wait_for(r.read(8192), window + 30)
                now = time.monotonic()
                if not chunk:
                    raise ConnectionError("closed")
                rec["max_gap"] = max(rec["max_gap"], now - last)
                last = now
                rec["bad"] += chunk != data[off:off + len(chunk)]
                off += len(chunk)
                if now > cut:
                    rec["after_cut"] += len(chunk)
                await asyncio.sleep(8192 / 100e3)
            w.close()
        except Exception as exc:
            rec["error"] = f"{type(exc).__name__}: {exc}"
        rec["bytes"] = off if rec["error"] is None else rec["bytes"]
        out.append(rec)

    async def main():
        loop = asyncio.get_running_loop()
        go = loop.create_future()
        ready, out, tasks = [], [], []
        for start in range(0, n, 250):
            tasks += [asyncio.ensure_future(conn(i, ready, go, out)) for i in range(start, min(n, start + 250))]
            await asyncio.sleep(0.2)
        while len(ready) + len(out) < n:
            await asyncio.sleep(0.05)
        print(json.dumps({"ready": len(ready)}), flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)  # the cut
        go.set_result(time.monotonic())
        await asyncio.gather(*tasks)
        print(json.dumps(out), flush=True)

    asyncio.run(main())
""")


def run_once(n: int, port: int, window: float = 10.0) -> dict[str, Any]:
    lab.down_appliance_state()
    lab.up()
    ref = lab.cache_dir() / "www" / "10M.bin"
    proc = subprocess.Popen(["ip", "netns", "exec", "lab-client", sys.executable, "-c", CLIENT, lab.VIP, str(port),
                             str(n), str(window), str(ref)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        ready = json.loads(proc.stdout.readline() or "{}").get("ready", 0)
        lab.cut_link("primary")
        t0 = time.monotonic()
        proc.stdin.write("cut\n")
        proc.stdin.flush()
        recs = json.loads(proc.stdout.readline() or "[]")
        took = time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()
        lab.restore_link("primary")
    kept = [r for r in recs if r["error"] is None and r["bad"] == 0 and r["after_cut"] > 0]
    gaps = sorted(r["max_gap"] for r in kept)
    return {"connections": n, "ready": ready, "kept": len(kept),
            "errors": sorted({r["error"] for r in recs if r["error"]})[:5],
            "wrong_bytes": sum(r["bad"] > 0 for r in recs),
            "longest_pause_s": round(gaps[-1], 3) if gaps else None,
            "median_longest_pause_s": round(statistics.median(gaps), 3) if gaps else None,
            "window_s": round(took, 1)}


def failover_crowd_bench(n: int = 1000, runs: int = 3) -> dict[str, Any]:
    cases = {"web (verify=full, stream replay)": lab.SERVICE_PORT, "web-http (replay=http)": lab.HTTP_REPLAY_PORT}
    out: dict[str, Any] = {"connections": n, "runs": runs, "cases": {}}
    try:
        for name, port in cases.items():
            out["cases"][name] = [run_once(n, port) for _ in range(runs)]
    finally:
        lab.down_appliance_state()
        lab.up()
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = ["| service | run | kept / connections | wrong bytes | longest pause (s) | median of the longest "
             "pauses (s) |", "|---|---|---|---|---|---|"]
    for name, runs in results["cases"].items():
        for i, r in enumerate(runs, 1):
            lines.append(f"| {name} | {i} | {r['kept']} / {r['connections']} | {r['wrong_bytes']} | "
                         f"{r['longest_pause_s']} | {r['median_longest_pause_s']} |")
    return "\n".join(lines)
