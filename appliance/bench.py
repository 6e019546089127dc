"""``appliance lab bench``: throughput through the gateway against plain kernel
forwarding, measured in one run on the same lab.

Both paths cross the same gateway namespace, bridges and veths; only the
port differs.  "Plain" goes to a server port that is not a service (the
gateway's kernel routes it: nginx on 8080, iperf3 on 5202); "gateway" goes to
the VIP (the appliance tracks and translates it: nginx on 80, iperf3 on
5201).  Runs alternate plain/gateway so drift hits both alike; the medians and
their ratio are reported, with the appliance's own per-packet cost per queue
(from its counters) and, with ``--profile``, where its time goes.
"""

from __future__ import annotations

import json
import pstats
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from . import lab


def _iperf(host: str, port: int, seconds: int, reverse: bool) -> float:
    cmd = ["ip", "netns", "exec", "lab-client", "iperf3", "-J", "-c", host, "-p", str(port), "-t", str(seconds)]
    if reverse:
        cmd.append("-R")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    data = json.loads(res.stdout)
    if "error" in data:
        raise RuntimeError(f"iperf3: {data['error']}")
    return data["end"]["sum_received"]["bits_per_second"] / 1e9


def _curl(url: str) -> float:
    res = subprocess.run(
        ["ip", "netns", "exec", "lab-client", "curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", url],
        capture_output=True, text=True, timeout=300,
    )
    if res.returncode != 0:
        raise RuntimeError(f"curl {url}: {res.stderr.strip()}")
    size, secs = res.stdout.split()
    return int(size) * 8 / float(secs) / 1e9


def _queue_stats(api: str, token: str) -> dict[str, Any]:
    from .cli import api_get

    return api_get("/api/v1/status", api, token)["queues"]


def run_bench(rounds: int = 3, seconds: int = 8, profile: bool = False) -> dict[str, Any]:
    info = lab.up()
    api, token = info["api"], info["token"]
    prim = "198.51.100.10"
    cases = {
        "iperf3 download": (lambda: _iperf(prim, lab.PLAIN_IPERF_PORT, seconds, True),
                            lambda: _iperf(lab.VIP, lab.IPERF_PORT, seconds, True)),
        "iperf3 upload": (lambda: _iperf(prim, lab.PLAIN_IPERF_PORT, seconds, False),
                          lambda: _iperf(lab.VIP, lab.IPERF_PORT, seconds, False)),
        "curl 1 GiB download": (lambda: _curl(f"http://{prim}:{lab.PLAIN_HTTP_PORT}/1G.bin"),
                                lambda: _curl(f"http://{lab.VIP}:{lab.SERVICE_PORT}/1G.bin")),
    }
    results: dict[str, Any] = {"rounds": rounds, "seconds": seconds, "cases": {}}
    for name, (plain, through) in cases.items():
        before = _queue_stats(api, token)
        p, g = [], []
        for _ in range(rounds):
            p.append(plain())
            g.append(through())
        after = _queue_stats(api, token)
        per_queue = {}
        for q, st in after.items():
            b = before.get(q, {"packets": 0, "busy_seconds": 0.0})
            n = st["packets"] - b["packets"]
            per_queue[q] = {
                "packets": n,
                "us_per_packet": round((st["busy_seconds"] - b["busy_seconds"]) / n * 1e6, 2) if n else None,
            }
        pm, gm = statistics.median(p), statistics.median(g)
        results["cases"][name] = {
            "plain_gbps": [round(x, 3) for x in p],
            "gateway_gbps": [round(x, 3) for x in g],
            "plain_median_gbps": round(pm, 3),
            "gateway_median_gbps": round(gm, 3),
            "ratio": round(gm / pm, 3),
            "queues": per_queue,
        }
    if profile:
        results["profile"] = profile_gateway(seconds)
    return results


def profile_gateway(seconds: int) -> list[str]:
    """Restart the appliance under cProfile for one gateway download and return
    the top functions by own time."""
    rd = lab.run_dir()
    out = rd / "appliance.prof"
    lab.stop_appliance()
    lab.start_appliance(rd / "gateway.toml", ["--profile", str(out)])
    try:
        _iperf(lab.VIP, lab.IPERF_PORT, seconds, True)
    finally:
        lab.stop_appliance()
        lab.start_appliance(rd / "gateway.toml")
    deadline = time.monotonic() + 10
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    import io

    buf = io.StringIO()
    pstats.Stats(str(out), stream=buf).sort_stats("tottime").print_stats(15)
    return buf.getvalue().splitlines()


def markdown(results: dict[str, Any]) -> str:
    lines = ["| case | plain forwarding (Gbit/s) | through the gateway (Gbit/s) | ratio | appliance µs/packet (packets) |",
             "|---|---|---|---|---|"]
    for name, r in results["cases"].items():
        q = ", ".join(f"{k}: {v['us_per_packet']} ({v['packets']})" for k, v in r["queues"].items())
        lines.append(f"| {name} | {r['plain_median_gbps']} | {r['gateway_median_gbps']} | {r['ratio']:.1%} | {q} |")
    return "\n".join(lines)


def save(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=1))
