"""``appliance lab bench --engines``: plain forwarding, the native engine and the python engine,
alternating in one run on the same lab (issue 12's targets).

Each round measures every case over plain kernel forwarding (a server port that is no service),
then restarts the appliance with each variant — engine ``native`` or ``python``, store
``memory`` or ``disk``, the native engine without its compiled fast path (``no-fastpath``) and
with the digest's former search (``memmem``) — and measures the cases that variant is about
through the VIP.  Medians over the rounds and their ratios to plain forwarding are reported,
with the appliance's own time per packet and per queue (its counters: ``busy_seconds`` /
``packets``, the verdict system call included), the binding's GSO share and the packets the
fast path decided.

Cases:

* ``download, verify=full``: curl of 100 MiB from nginx (plain :8080, the ``web`` service :80);
* ``upload``: curl POST of 100 MiB to the upload app, which answers with its sha256;
* ``latency``: a keep-alive HTTP connection fetching a 1-byte object 2,000 times (a request
  of 40 bytes, a response of 1 byte of body after its headers), the median round trip; the
  gateway's added latency is its median minus plain forwarding's.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap
from typing import Any

from ..apiclient import api_get
from ..lab import topology as lab
from .throughput import _curl, _queue_stats, _upload, queue_delta

PRIMARY = "198.51.100.10"

LATENCY_PROBE = textwrap.dedent("""
    import socket, sys, time, json
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    s = socket.create_connection((host, port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    req = f"GET /1B.bin HTTP/1.1\\r\\nHost: {host}\\r\\n\\r\\n".encode()
    rtts = []
    for i in range(n + 50):
        t0 = time.perf_counter()
        s.sendall(req)
        buf = b""
        while b"\\r\\n\\r\\n" not in buf:
            buf += s.recv(4096)
        head, _, body = buf.partition(b"\\r\\n\\r\\n")
        length = int(next(l.split(b":")[1] for l in head.split(b"\\r\\n") if l.lower().startswith(b"content-length")))
        while len(body) < length:
            body += s.recv(4096)
        if i >= 50:  # warm-up
            rtts.append(time.perf_counter() - t0)
    rtts.sort()
    print(json.dumps({"median_us": rtts[len(rtts) // 2] * 1e6, "p99_us": rtts[int(len(rtts) * 0.99)] * 1e6}))
""")


def _latency(host: str, port: int, n: int = 2000) -> dict[str, float]:
    res = subprocess.run(["ip", "netns", "exec", "lab-client", sys.executable, "-c", LATENCY_PROBE, host, str(port),
                          str(n)], capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise RuntimeError(f"latency probe: {res.stderr.strip()}")
    out: dict[str, float] = json.loads(res.stdout)
    return out


VARIANTS: dict[str, tuple[str, str, tuple[str, ...], dict[str, object], dict[str, object]]] = {
    # name: (engine, store mode, the cases it runs, [testing] settings, more [gateway] settings)
    "native": ("native", "memory", ("download, verify=full", "upload, store=memory", "latency"), {}, {}),
    # the native engine without its compiled fast path: every packet runs the Python engine
    "native no-fastpath": ("native", "memory", ("download, verify=full", "upload, store=memory", "latency"), {},
                           {"fastpath": False}),
    # the native engine with the digest's search before our SIMD one (glibc's memmem): old path, new path
    "native memmem": ("native", "memory", ("download, verify=full",), {"memsearch": "memmem"}, {}),
    "python": ("python", "memory", ("download, verify=full", "upload, store=memory", "latency"), {}, {}),
    "native disk": ("native", "disk", ("upload, store=disk",), {}, {}),
    "python disk": ("python", "disk", ("upload, store=disk",), {}, {}),
}


def engines_bench(rounds: int = 3, body_name: str = "100M.bin") -> dict[str, Any]:
    info = lab.up()
    api, token = str(info["api"]), str(info["token"])
    body = lab.cache_dir() / "www" / body_name
    plain_cases = {
        "download, verify=full": lambda: _curl(f"http://{PRIMARY}:{lab.PLAIN_HTTP_PORT}/{body_name}"),
        "upload, store=memory": lambda: _upload(f"http://{PRIMARY}:{lab.PLAIN_UPLOAD_PORT}/", body),
        "latency": lambda: _latency(PRIMARY, lab.PLAIN_HTTP_PORT)["median_us"],
    }
    through = {
        "download, verify=full": lambda: _curl(f"http://{lab.VIP}:{lab.SERVICE_PORT}/{body_name}"),
        "upload, store=memory": lambda: _upload(f"http://{lab.VIP}:{lab.UPLOAD_PORT}/", body),
        "upload, store=disk": lambda: _upload(f"http://{lab.VIP}:{lab.UPLOAD_PORT}/", body),
        "latency": lambda: _latency(lab.VIP, lab.SERVICE_PORT)["median_us"],
    }
    configs = {name: lab.variant_config(f"bench-{name.replace(' ', '-')}", gateway={"engine": engine, **more},
                                        store={"mode": store}, testing=testing or None)
               for name, (engine, store, _, testing, more) in VARIANTS.items()}
    plain: dict[str, list[float]] = {c: [] for c in plain_cases}
    got: dict[tuple[str, str], list[float]] = {}
    queues: dict[tuple[str, str], dict[str, Any]] = {}
    try:
        for _ in range(rounds):
            for case, fn in plain_cases.items():
                plain[case].append(fn())
            for name, (engine, _, cases, testing, more) in VARIANTS.items():
                lab.stop_appliance()
                lab.start_appliance(configs[name])
                status = api_get("/api/v1/status", api, token)
                search = status["digest_search"]
                want = testing.get("memsearch", "memfind")
                if search != want:  # a variant that silently ran the other path would flatter one of them
                    raise RuntimeError(f"variant {name!r}: the appliance searches with {search}, not {want}")
                fast_on = engine == "native" and more.get("fastpath", True)
                if (status["fastpath"] is not None) != fast_on:
                    raise RuntimeError(f"variant {name!r}: the fast path is {'off' if fast_on else 'on'}")
                for case in cases:
                    before = _queue_stats(api, token)
                    got.setdefault((name, case), []).append(through[case]())
                    queues[(name, case)] = {q: v for q, v in queue_delta(before, _queue_stats(api, token)).items()
                                            if v["packets"]}
    finally:
        lab.stop_appliance()
        lab.start_appliance(lab.run_dir() / "gateway.toml")
    results: dict[str, Any] = {"rounds": rounds, "body": body_name, "cases": {}}
    for (name, case), values in got.items():
        base = plain["upload, store=memory" if case.startswith("upload") else case]
        pm, gm = statistics.median(base), statistics.median(values)
        r: dict[str, Any] = {"variant": name, "case": case, "plain": [round(x, 3) for x in base],
                             "gateway": [round(x, 3) for x in values], "plain_median": round(pm, 3),
                             "gateway_median": round(gm, 3), "queues": queues[(name, case)]}
        if case == "latency":
            r["added_us"] = round(gm - pm, 1)
        else:
            r["ratio"] = round(gm / pm, 4)
        results["cases"][f"{case} [{name}]"] = r
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = ["| case | engine | plain | through the gateway | ratio (latency: added) | appliance µs/packet "
             "(packets, GSO) |", "|---|---|---|---|---|---|"]
    for r in results["cases"].values():
        unit = " µs" if r["case"] == "latency" else " Gbit/s"
        ratio = f"+{r['added_us']} µs" if r["case"] == "latency" else f"**{r['ratio']:.1%}**"
        qs = ", ".join(f"{q} {v['us_per_packet']} ({v['packets']}, {v['gso']}"
                       + (f", fast {v['fast']}" if v.get("fast") else "") + ")" for q, v in r["queues"].items())
        lines.append(f"| {r['case']} | {r['variant']} | {r['plain_median']}{unit} | {r['gateway_median']}{unit} | "
                     f"{ratio} | {qs} |")
    return "\n".join(lines)
