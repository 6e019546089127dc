"""Benchmarks of the gateway pair (issue 13; docs/BENCHMARKS.md, "The gateway pair")::

    python -m appliance.bench.pair takeover --runs 10     # the active's silent death -> next byte at the client
    python -m appliance.bench.pair upload --rounds 3      # upload: store=peer against store=memory, commit latency
    python -m appliance.bench.pair resync --conns 10000   # a rejoining standby: bulk resync + table rebuilt

``takeover`` and ``upload`` bring up the two-gateway lab (root; it is taken down afterwards);
``resync`` runs two redis-server processes on 127.0.0.1 (no root).

*takeover*: a download at 20 MiB/s (curl's rate) through the VIP, tcpdump at the client; once
30 MiB are in, the active gateway is killed silently (:func:`appliance.lab.pair.kill_gateway`:
every process stopped at once and killed, its links down); the client's pause: the longest gap
between data segments around the kill (from the last byte before the death to the next one).  Then the dead gateway is
restarted and rejoins, and the next run kills whichever is active.

*upload*: curl POSTs ``100M.bin`` to the upload service, alternating rounds with both appliances
in ``store.mode = "memory"`` and in ``"peer"`` (restarted between modes), medians; and the
active's own commit latency (script + ``WAIT 1`` over the sync link) from its status.

*resync*: a master Redis filled, through :class:`~appliance.replication_redis.RedisPrimary`, with
``conns`` connections (each an ICI record and ``log_bytes`` of client log); a fresh Redis is made
its replica and a :class:`~appliance.replication_redis.RedisStandby` rebuilds its table: the time
from ``REPLICAOF`` to a table holding every connection.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from appliance.pcap import packets, tcp_fields


def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(p / 100 * len(s) + 0.5)) - 1))]


# --- takeover ----------------------------------------------------------------------------------

def _pause(pcap: Path, vip: str, t_kill: float) -> float | None:
    """The client's pause: the longest gap between data segments from the VIP around ``t_kill``
    (from a second before it to five after); None when no data came before or after the kill."""
    import socket

    want = socket.inet_pton(socket.AF_INET6 if ":" in vip else socket.AF_INET, vip)
    last: float | None = None
    longest = 0.0
    before = after = False
    for ts, p in packets(pcap):
        f = tcp_fields(p)
        if f is None or f[0] != want or f[7] == 0 or not t_kill - 1 <= ts <= t_kill + 5:
            continue
        before, after = before or ts < t_kill, after or ts > t_kill
        if last is not None:
            longest = max(longest, ts - last)
        last = ts
    return longest if before and after else None


def takeover(runs: int = 10, rate: str = "20M") -> dict[str, Any]:
    from appliance.lab import pair
    from appliance.lab import topology as lab

    lab.down()
    out_dir = Path("/tmp/pair-bench")
    out_dir.mkdir(exist_ok=True)
    rows: list[dict[str, Any]] = []
    try:
        pair.up()
        for i in range(runs):
            ready = pair.wait_pair_ready(timeout=60)
            active, standby = ready["active"], ready["standby"]
            pcap = out_dir / f"run{i}.pcap"
            cap = subprocess.Popen(["ip", "netns", "exec", "lab-client", "tcpdump", "-i", "eth0", "-U", "-n", "-s",
                                    "96", "-w", str(pcap), "tcp port 80"], stderr=subprocess.PIPE, text=True)
            assert cap.stderr is not None
            cap.stderr.readline()
            got = out_dir / "dl.bin"
            got.unlink(missing_ok=True)
            dl = subprocess.Popen(["ip", "netns", "exec", "lab-client", "curl", "-sS", "-o", str(got),
                                   "--limit-rate", rate, f"http://{lab.VIP}/1G.bin"])
            deadline = time.monotonic() + 20
            while not (got.exists() and got.stat().st_size > 30 << 20) and time.monotonic() < deadline:
                time.sleep(0.05)   # flowing (30 MiB in), whatever the previous run's rejoin took
            t_kill = time.time()
            pair.kill_gateway(active)
            deadline = time.monotonic() + 10
            st = None
            while time.monotonic() < deadline:
                st = pair.pair_status(standby, timeout=1)
                if st is not None and st.get("role") == "active":
                    break
                time.sleep(0.02)
            time.sleep(3)
            dl.kill()
            dl.wait()
            time.sleep(0.3)
            cap.terminate()
            cap.wait()
            pause = _pause(pcap, lab.VIP, t_kill)
            got.unlink(missing_ok=True)
            lt = (st or {}).get("last_takeover") or {}
            rows.append({"run": i, "killed": active, "pause_ms": None if pause is None else round(pause * 1000, 1),
                         "takeover_ms": lt.get("duration_ms"), "reattached": lt.get("reattached")})
            print(json.dumps(rows[-1]), file=sys.stderr)
            pcap.unlink(missing_ok=True)
            pair.restart_gateway(active)
    finally:
        lab.down()
    ps = [r["pause_ms"] for r in rows if r["pause_ms"] is not None]
    return {"runs": rows, "pause_ms": {"median": statistics.median(ps), "p99": _pct(ps, 99), "max": max(ps)},
            "takeover_ms": {"median": statistics.median(r["takeover_ms"] or 0 for r in rows)},
            "runs_without_data_around_the_kill": runs - len(ps)}


# --- upload: peer against memory -----------------------------------------------------------------

def _upload_once(body: Path) -> float:
    from appliance.lab import topology as lab

    r = subprocess.run(["ip", "netns", "exec", "lab-client", "curl", "-sS", "--fail", "-H", "Expect:",
                        "--data-binary", f"@{body}", "-o", "/dev/null", "-w", "%{time_total}",
                        f"http://{lab.VIP}:{lab.UPLOAD_PORT}/"], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"upload failed: {r.stderr}")
    return body.stat().st_size * 8 / float(r.stdout) / 1e9


def upload(rounds: int = 3, body_name: str = "100M.bin") -> dict[str, Any]:
    from appliance.lab import pair
    from appliance.lab import topology as lab

    lab.down()
    res: dict[str, list[float]] = {"memory": [], "peer": []}
    commit: dict[str, Any] = {}
    try:
        pair.up()
        body = lab.cache_dir() / "www" / body_name
        base = pair.config_path(pair.NODES[0]).read_text()
        plain = {n.ns: pair.plain_config(n, base.split("\n[store]\n")[0]) for n in pair.NODES}
        peered = {n.ns: pair.config_path(n).read_text() for n in pair.NODES}

        def switch(mode: str) -> None:
            for n in pair.NODES:
                pair.stop_appliance(n)
            for n in pair.NODES:
                pair.config_path(n).write_text(plain[n.ns] if mode == "memory" else peered[n.ns])
                pair.set_eligible(n, True)
            for n in pair.NODES:
                pair.start_appliance(n)
            if mode == "peer":
                pair.wait_pair_ready(timeout=60)

        for _ in range(rounds):
            for mode in ("memory", "peer"):
                switch(mode)
                res[mode].append(_upload_once(body))
                if mode == "peer":
                    st = pair.pair_status(pair.wait_pair_ready(timeout=60)["active"]) or {}
                    cu = st.get("commit_us")
                    commit = cu if isinstance(cu, dict) else {}
    finally:
        lab.down()
    med = {m: statistics.median(v) for m, v in res.items()}
    return {"gbit_s": res, "median_gbit_s": med, "ratio_peer_memory": med["peer"] / med["memory"],
            "commit_us": commit}


# --- resync of a rejoining standby ------------------------------------------------------------

async def _resync(conns: int, log_bytes: int) -> dict[str, Any]:
    from appliance.replication_redis import (
        LocalRedis,
        RedisClient,
        RedisPrimary,
        RedisStandby,
        demote,
        promote,
        wait_link,
    )
    from checkpoint.replication import Append, Op, Record

    from .replication import typical_record

    m = LocalRedis()
    r = LocalRedis()
    try:
        p = RedisPrimary(*m.addr, epoch=1, wait_ms=1)
        await promote(p.client, 1)
        payload = os.urandom(log_bytes)
        seq = 0
        per = 100
        for first in range(1, conns + 1, per):
            seq += 1
            ops: list[Op] = []
            for cid in range(first, min(conns + 1, first + per)):
                ops += [Record(cid, typical_record(cid)), Append(cid, 0, payload)]
            await p.commit(seq, ops, check_peer=False)
        await p.close()
        q = RedisClient(*r.addr, timeout=30)
        t0 = time.perf_counter()
        await demote(q, *m.addr)
        await asyncio.get_running_loop().run_in_executor(None, wait_link, r.port, 120.0)
        t_link = time.perf_counter() - t0
        sb = RedisStandby(*r.addr, timeout=30)
        await sb.start()
        while sb.need_rebuild or len(sb.table) < conns:
            await asyncio.sleep(0.01)
        t_table = time.perf_counter() - t0
        await sb.stop()
        await q.aclose()
        return {"conns": conns, "log_bytes": log_bytes, "bulk_resync_s": round(t_link, 3),
                "table_rebuilt_s": round(t_table, 3), "data_mb": round(conns * log_bytes / 1e6, 1)}
    finally:
        m.close()
        r.close()


def resync(conns: int = 10_000, log_bytes: int = 16384) -> dict[str, Any]:
    return asyncio.run(_resync(conns, log_bytes))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m appliance.bench.pair", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("takeover")
    t.add_argument("--runs", type=int, default=10)
    u = sub.add_parser("upload")
    u.add_argument("--rounds", type=int, default=3)
    r = sub.add_parser("resync")
    r.add_argument("--conns", type=int, default=10_000)
    r.add_argument("--log-bytes", type=int, default=16384)
    a = ap.parse_args(argv)
    if a.what == "takeover":
        out = takeover(a.runs)
    elif a.what == "upload":
        out = upload(a.rounds)
    else:
        out = resync(a.conns, a.log_bytes)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
