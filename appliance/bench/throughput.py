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

from ..lab import topology as lab


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
    from ..apiclient import api_get

    return api_get("/api/v1/status", api, token)["queues"]


def queue_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Per queue, between two reads of the status's ``queues``: packets, the appliance's time per
    packet (None without packets), GSO super-packets (the native binding counts them) and the
    packets the compiled fast path decided (counted in ``packets`` too)."""
    out = {}
    for q, st in after.items():
        b = before.get(q, {})
        n = st["packets"] - b.get("packets", 0)
        out[q] = {"packets": n,
                  "us_per_packet": round((st["busy_seconds"] - b.get("busy_seconds", 0.0)) / n * 1e6, 2) if n else None,
                  "gso": st.get("gso_packets", 0) - b.get("gso_packets", 0),
                  "fast": st.get("fast_path", 0) - b.get("fast_path", 0)}
    return out


def run_bench(rounds: int = 3, seconds: int = 8, profile: bool = False) -> dict[str, Any]:
    info = lab.up()
    api, token = str(info["api"]), str(info["token"])
    prim = "198.51.100.10"
    cases = {
        "iperf3 download, verify=sampled": (lambda: _iperf(prim, lab.PLAIN_IPERF_PORT, seconds, True),
                            lambda: _iperf(lab.VIP, lab.IPERF_PORT, seconds, True)),
        "iperf3 upload": (lambda: _iperf(prim, lab.PLAIN_IPERF_PORT, seconds, False),
                          lambda: _iperf(lab.VIP, lab.IPERF_PORT, seconds, False)),
        "curl 1 GiB download, verify=sampled": (lambda: _curl(f"http://{prim}:{lab.PLAIN_HTTP_PORT}/1G.bin"),
                                                lambda: _curl(f"http://{lab.VIP}:{lab.SAMPLED_HTTP_PORT}/1G.bin")),
        "curl 100 MiB download, verify=full": (lambda: _curl(f"http://{prim}:{lab.PLAIN_HTTP_PORT}/100M.bin"),
                                               lambda: _curl(f"http://{lab.VIP}:{lab.SERVICE_PORT}/100M.bin")),
    }
    results: dict[str, Any] = {"rounds": rounds, "seconds": seconds, "cases": {}}
    for name, (plain, through) in cases.items():
        before = _queue_stats(api, token)
        p, g = [], []
        for _ in range(rounds):
            p.append(plain())
            g.append(through())
        per_queue = queue_delta(before, _queue_stats(api, token))
        pm, gm = statistics.median(p), statistics.median(g)
        results["cases"][name] = {
            "plain_gbps": [round(x, 3) for x in p],
            "gateway_gbps": [round(x, 3) for x in g],
            "plain_median_gbps": round(pm, 3),
            "gateway_median_gbps": round(gm, 3),
            "ratio": round(gm / pm, 3),
            "queues": per_queue,
        }
    results["handler_microbench"] = handler_microbench()
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


def handler_microbench(packets: int = 2000, repeat: int = 20) -> dict[str, float]:
    """Pure-Python cost of ``Dataplane.handle`` (no kernel): microseconds per
    return-path data segment (observed) and per client ACK (held, rewritten)."""
    from scapy.all import Raw  # test-time packet builder, not the hot path
    from scapy.layers.inet import IP, TCP  # (scapy.all re-exports them where mypy cannot see)

    from ..config import parse
    from ..dataplane import Dataplane

    cfg = {"api": {"token": "bench-token"}, "service": [{"name": "web", "vip": "203.0.113.10", "port": 80,
           "backend": [{"name": "primary", "address": "198.51.100.10"}]}]}
    dp = Dataplane(parse(cfg))
    c, s, vip = "192.0.2.10", "198.51.100.10", "203.0.113.10"
    opts = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None), ("WScale", 7)]
    dp.handle(bytearray(bytes(IP(src=c, dst=vip) / TCP(sport=4, dport=80, flags="S", seq=1, options=opts))), 1.0)
    dp.handle(bytearray(bytes(IP(src=s, dst=c) / TCP(sport=80, dport=4, flags="SA", seq=100, ack=2,
                                                      options=opts))), 1.0)
    ts = [("NOP", None), ("NOP", None)]
    data = [bytes(IP(src=s, dst=c) / TCP(sport=80, dport=4, flags="A", seq=101 + 1448 * i, ack=2,
                                         options=ts + [("Timestamp", (6 + i, 1))]) / Raw(b"x" * 1448))[:128]
            for i in range(packets)]
    acks = [bytes(IP(src=c, dst=vip) / TCP(sport=4, dport=80, flags="A", seq=2, ack=101 + 2896 * i,
                                           options=ts + [("Timestamp", (9 + i, 6 + i))]))
            for i in range(packets)]
    out = {}
    for name, pkts in (("observed_data_us", data), ("held_ack_us", acks)):
        t0 = time.perf_counter()
        for _ in range(repeat):
            for p in pkts:
                dp.handle(bytearray(p), 2.0)
        out[name] = round((time.perf_counter() - t0) / (repeat * len(pkts)) * 1e6, 2)
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = ["| case | plain forwarding (Gbit/s) | through the gateway (Gbit/s) | ratio | appliance µs/packet (packets) |",
             "|---|---|---|---|---|"]
    for name, r in results["cases"].items():
        q = ", ".join(f"{k}: {v['us_per_packet']} ({v['packets']})" for k, v in r["queues"].items())
        lines.append(f"| {name} | {r['plain_median_gbps']} | {r['gateway_median_gbps']} | {r['ratio']:.1%} | {q} |")
    mb = results.get("handler_microbench")
    if mb:
        lines.append("")
        lines.append(f"Dataplane.handle alone (no kernel): {mb['observed_data_us']} µs per observed data segment, "
                     f"{mb['held_ack_us']} µs per held client ACK")
    return "\n".join(lines)


def save(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=1))


# --- failover time ------------------------------------------------------------------

def _first_backup_bytes(api: str, token: str, t0: float, service: str = "web") -> dict[int, float]:
    """Per moved connection: seconds from ``t0`` (the primary's death) to the
    gateway's first forwarding of a backup byte to the client (the failover
    event's time plus the move's ``first_forward_ms``; same clock, and the
    client is one veth away)."""
    from ..apiclient import api_get

    events = api_get(f"/api/v1/events?service={service}&limit=10000", api, token) or []
    starts = [e["time"] for e in events if e["kind"] == "failover"]
    if not starts:
        return {}
    start = starts[0]
    first: dict[int, float] = {}
    for e in events:
        if e["kind"] == "migration" and "first_forward_ms" in e["details"].get("timings_ms", {}):
            first[e["connection"]] = start + e["details"]["timings_ms"]["first_forward_ms"] / 1000 - t0
    return first


def failover_bench(runs: int = 10, connections: tuple[int, ...] = (1, 100)) -> dict[str, Any]:
    """Time from the primary's death (its link cut) to the first byte from the
    backup at the client, over ``runs`` runs for each number of connections."""
    results: dict[str, Any] = {"runs": runs, "cases": {}}
    for n in connections:
        per_run: list[dict[str, float]] = []
        for _ in range(runs):
            lab.down_appliance_state()
            info = lab.up()
            rate = "2M" if n == 1 else "100K"
            procs = [subprocess.Popen(["ip", "netns", "exec", "lab-client", "curl", "-s", "-o", "/dev/null",
                                       "--max-time", "60", "--limit-rate", rate,
                                       f"http://{lab.VIP}/10M.bin"]) for _ in range(n)]
            time.sleep(2.0)
            t0 = time.time()
            lab.cut_link("primary")
            time.sleep(6.0 if n == 1 else 15.0)
            for p in procs:
                p.kill()
            for p in procs:
                p.wait()
            first = _first_backup_bytes(str(info["api"]), str(info["token"]), t0)
            lab.restore_link("primary")
            if len(first) < n:
                per_run.append({"median_ms": float("nan"), "max_ms": float("nan"), "moved": len(first)})
                continue
            vals = sorted(first.values())
            per_run.append({"median_ms": round(statistics.median(vals) * 1000, 1),
                            "max_ms": round(vals[-1] * 1000, 1), "moved": len(vals)})
        ok = [r for r in per_run if r["moved"] >= n]
        results["cases"][f"{n} connection{'s' if n > 1 else ''}"] = {
            "runs": per_run,
            "complete_runs": len(ok),
            "median_of_medians_ms": round(statistics.median(r["median_ms"] for r in ok), 1) if ok else None,
            "median_of_max_ms": round(statistics.median(r["max_ms"] for r in ok), 1) if ok else None,
        }
    lab.down_appliance_state()
    lab.up()
    return results


# --- uploads per checkpoint store mode --------------------------------------------------

def _upload(url: str, body: Path) -> float:
    res = subprocess.run(
        ["ip", "netns", "exec", "lab-client", "curl", "-sS", "--fail", "-H", "Expect:", "--data-binary", f"@{body}",
         "-o", "/dev/null", "-w", "%{size_upload} %{time_total}", url],
        capture_output=True, text=True, timeout=600,
    )
    if res.returncode != 0:
        raise RuntimeError(f"curl upload {url}: {res.stderr.strip()}")
    size, secs = res.stdout.split()
    return int(size) * 8 / float(secs) / 1e9


def upload_bench(rounds: int = 3, body_name: str = "100M.bin") -> dict[str, Any]:
    """Upload throughput (curl POST to the upload app) plain and through the
    gateway, with the checkpoint store in memory and on disk (delayed ACKs)."""
    info = lab.up()
    api, token = str(info["api"]), str(info["token"])
    body = lab.cache_dir() / "www" / body_name
    plain = f"http://198.51.100.10:{lab.PLAIN_UPLOAD_PORT}/"
    vip = f"http://{lab.VIP}:{lab.UPLOAD_PORT}/"
    modes = {"memory": lab.run_dir() / "gateway.toml",
             "disk": lab.variant_config("bench-disk", store={"mode": "disk"})}
    results: dict[str, Any] = {"body": body_name, "rounds": rounds, "cases": {}}
    try:
        for mode, cfg in modes.items():
            lab.stop_appliance()
            lab.start_appliance(cfg)
            p, g = [], []
            for _ in range(rounds):
                p.append(_upload(plain, body))
                g.append(_upload(vip, body))
            from ..apiclient import api_get

            store = api_get("/api/v1/store", api, token)
            dp = api_get("/api/v1/status", api, token)["dataplane"]
            results["cases"][f"upload {body_name}, store={mode}"] = {
                "plain_median_gbps": round(statistics.median(p), 3),
                "gateway_median_gbps": round(statistics.median(g), 3),
                "ratio": statistics.median(g) / statistics.median(p),
                "batches": store.get("batches"), "max_batch_ms": store.get("max_batch_ms"),
                "acks_held": dp.get("acks_held"), "acks_clamped": dp.get("acks_clamped"),
            }
    finally:
        lab.stop_appliance()
        lab.start_appliance(lab.run_dir() / "gateway.toml")
    return results


def upload_markdown(results: dict[str, Any]) -> str:
    lines = ["| case | plain forwarding (Gbit/s) | through the gateway (Gbit/s) | ratio | group commits "
             "(slowest, ms) | ACKs held / clamped |", "|---|---|---|---|---|---|"]
    for name, r in results["cases"].items():
        lines.append(f"| {name} | {r['plain_median_gbps']} | {r['gateway_median_gbps']} | {r['ratio']:.1%} | "
                     f"{r['batches'] or '-'} ({r['max_batch_ms'] or '-'}) | {r['acks_held']} / {r['acks_clamped']} |")
    return "\n".join(lines)


# --- IPv4 against IPv6 ------------------------------------------------------------------------

def family_bench(rounds: int = 3) -> dict[str, Any]:
    """The same downloads over IPv4 and over IPv6, plain and through the gateway, alternating
    in one run (medians): what the second family costs the data path, if anything."""
    lab.up()
    cases = {
        "curl 100 MiB download, verify=full": (lab.PLAIN_HTTP_PORT, lab.SERVICE_PORT, "100M.bin"),
        "curl 1 GiB download, verify=sampled": (lab.PLAIN_HTTP_PORT, lab.SAMPLED_HTTP_PORT, "1G.bin"),
    }
    results: dict[str, Any] = {"rounds": rounds, "cases": {}}
    for name, (plain_port, port, file) in cases.items():
        runs: dict[str, list[float]] = {k: [] for k in ("plain4", "gateway4", "plain6", "gateway6")}
        for _ in range(rounds):
            runs["plain4"].append(_curl(lab.url(lab.PRIMARY, plain_port, f"/{file}")))
            runs["gateway4"].append(_curl(lab.url(lab.VIP, port, f"/{file}")))
            runs["plain6"].append(_curl(lab.url(lab.PRIMARY6, plain_port, f"/{file}")))
            runs["gateway6"].append(_curl(lab.url(lab.VIP6, port, f"/{file}")))
        med = {k: statistics.median(v) for k, v in runs.items()}
        results["cases"][name] = {
            "runs_gbps": {k: [round(x, 3) for x in v] for k, v in runs.items()},
            "median_gbps": {k: round(v, 3) for k, v in med.items()},
            "ratio4": round(med["gateway4"] / med["plain4"], 3),
            "ratio6": round(med["gateway6"] / med["plain6"], 3),
            "v6_over_v4": round(med["gateway6"] / med["gateway4"], 3),
        }
    return results


def family_markdown(results: dict[str, Any]) -> str:
    lines = ["| case | plain IPv4 | gateway IPv4 | ratio | plain IPv6 | gateway IPv6 | ratio | gateway IPv6 / IPv4 |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results["cases"].items():
        m = r["median_gbps"]
        lines.append(f"| {name} | {m['plain4']} | {m['gateway4']} | {r['ratio4']:.1%} | {m['plain6']} | "
                     f"{m['gateway6']} | {r['ratio6']:.1%} | {r['v6_over_v4']:.2f} |")
    lines.append("")
    lines.append(f"Gbit/s, medians of {results['rounds']} runs alternating the four paths.")
    return "\n".join(lines)
