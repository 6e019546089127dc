"""HTTP-aware replay against stream replay, side by side in one run (``appliance lab bench --http``).

The lab serves the same files through two services that differ only in ``replay``: ``web``
(port 80, ``stream``: a move replays from the connection's first byte) and ``web-http``
(``HTTP_REPLAY_PORT``, ``http``: from the last finished exchange, the response in flight
range-resumed).  Each case runs on both, alternately (stream, http, stream, http, ...), with a
fresh appliance each time, and the primary's link cut mid-run (no FIN, no RST).

* **long download**: one download paced by curl, cut once ``cut_after`` bytes have arrived;
  the client's pause is the longest gap in new data in a capture at the client (headers
  only) around the cut: from the death to the first new byte; the sha256 of what the client
  got is checked.
* **keep-alive crowd**: wrk (``appliance.lab.httpload``), ``connections`` keep-alive
  connections fetching a small object, ``--timeout 2s``, the link cut ``cut_at`` seconds in:
  socket errors, timeouts, non-2xx, the slowest request across the failover and the time for
  the request rate to come back to 90 % of its level before the cut.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from ..lab import topology as lab

SERVICES = {"stream": ("web", lab.SERVICE_PORT), "http": ("web-http", lab.HTTP_REPLAY_PORT)}


def _events(api: str, token: str, service: str, kind: str) -> list[dict[str, Any]]:
    from ..apiclient import api_get

    return list(api_get(f"/api/v1/events?service={service}&kind={kind}&limit=10000", api, token) or [])


def _wait(pred: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def long_download_once(replay: str, name: str, cut_after: int, rate: str, out: Path) -> dict[str, Any]:
    service, port = SERVICES[replay]
    lab.down_appliance_state()
    info = lab.up()
    api, token = str(info["api"]), str(info["token"])
    out.unlink(missing_ok=True)
    pcap = lab.run_dir() / f"bench-download-{replay}.pcap"
    cap = subprocess.Popen(["ip", "netns", "exec", "lab-client", "tcpdump", "-i", "eth0", "-s", "96", "-U", "-w",
                            str(pcap), f"tcp and src port {port}"], stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # tcpdump up
    proc = subprocess.Popen(["ip", "netns", "exec", "lab-client", "curl", "-sS", "--fail", "--max-time", "600",
                             "--limit-rate", rate, "-o", str(out), f"http://{lab.VIP}:{port}/{name}"],
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: out.exists() and out.stat().st_size >= cut_after, 300, f"{cut_after} bytes")
        delivered = out.stat().st_size
        cut = time.time()
        lab.cut_link("primary")
        proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        cap.terminate()
        cap.wait()
    from ..lab import httpload

    ok = proc.returncode == 0 and lab.sha256_file(out) == lab.expected_sha(name)
    # the pause at the client: the longest gap in new data around the death, from the capture
    gaps = [p.max_gap_s for p in httpload.pcap_pauses(pcap, server_port=port, server=lab.VIP, around=cut,
                                                      window_s=60) if p.data_packets > 10]
    moves = _events(api, token, service, "migration")
    d = moves[0]["details"] if moves else {}
    lab.restore_link("primary")
    out.unlink(missing_ok=True)
    pcap.unlink(missing_ok=True)
    return {"replay": replay, "ok": ok, "delivered_at_cut": delivered,
            "pause_ms": round(max(gaps) * 1000, 1) if gaps else None,
            "strategy": d.get("strategy"), "regenerated_bytes": d.get("regenerated_bytes"),
            "suppressed_bytes": d.get("suppressed_bytes")}


def _alternate(runs: int, once: Any) -> dict[str, list[dict[str, Any]]]:
    """``once(replay)`` for stream and http alternately, ``runs`` times; the lab healed after."""
    per: dict[str, list[dict[str, Any]]] = {"stream": [], "http": []}
    try:
        for _ in range(runs):
            for replay in ("stream", "http"):
                per[replay].append(once(replay))
    finally:
        lab.restore_link("primary")
        lab.down_appliance_state()
        lab.up()
    return per


def long_download_bench(runs: int = 3, name: str = "1G.bin", cut_after: int = 500 << 20,
                        rate: str = "40M") -> dict[str, Any]:
    out = lab.run_dir() / "bench-http-download.bin"
    per = _alternate(runs, lambda replay: long_download_once(replay, name, cut_after, rate, out))
    summary = {}
    for replay, rs in per.items():
        pauses = [r["pause_ms"] for r in rs if r["ok"] and r["pause_ms"] is not None]
        summary[replay] = {"runs": rs, "complete": sum(r["ok"] for r in rs),
                           "median_pause_ms": statistics.median(pauses) if pauses else None,
                           "max_pause_ms": max(pauses) if pauses else None,
                           "median_regenerated": statistics.median(
                               [r["regenerated_bytes"] or 0 for r in rs]) if rs else None}
    return {"case": f"{name}, cut after {cut_after >> 20} MiB, curl --limit-rate {rate}", "runs": runs,
            "results": summary}


def crowd_once(replay: str, connections: int, duration: int, cut_at: float, obj: str) -> dict[str, Any]:
    from ..lab import httpload

    service, port = SERVICES[replay]
    lab.down_appliance_state()
    lab.up()
    run = httpload.start_crowd(f"http://{lab.VIP}:{port}/{obj}", connections=connections, duration=duration,
                               ns="lab-client", timeout=2)
    try:
        time.sleep(cut_at)  # the load's own clock: the cut comes cut_at seconds into the run
        cut = time.time()
        lab.cut_link("primary")
        res = run.wait(timeout=duration + 30)
    finally:
        run.close()
        lab.restore_link("primary")
    rec = res.recovery_at(cut)
    return {"replay": replay, "requests": res.requests, "socket_errors": res.socket_errors,
            "timeouts": res.errors.get("timeout", 0) + res.unanswered_over_timeout, "non_2xx": res.non_2xx,
            "slowest_after_cut_ms": None if rec.slowest_after_cut_ms is None else round(rec.slowest_after_cut_ms, 1),
            "rate_before": round(rec.rate_before, 1),
            "rate_settled": None if rec.rate_end is None else round(rec.rate_end, 1),
            "back_to_90pct_s": None if rec.recovery_s is None else round(rec.recovery_s, 2)}


def crowd_bench(runs: int = 3, connections: int = 100, duration: int = 20, cut_at: float = 6.0,
                obj: str = "4K.bin") -> dict[str, Any]:
    per = _alternate(runs, lambda replay: crowd_once(replay, connections, duration, cut_at, obj))
    return {"case": f"wrk, {connections} keep-alive connections, {obj}, {duration} s, cut at {cut_at} s, "
                    f"--timeout 2s", "runs": runs, "results": per}


def paced_once(replay: str, count: int, rate: str, obj: str, cut_after: float) -> dict[str, Any]:
    """``count`` paced downloads at once through one failover; the pause per connection is read
    from a client capture (headers only): the longest gap between new data around the cut."""
    import threading

    from ..lab import httpload

    service, port = SERVICES[replay]
    lab.down_appliance_state()
    lab.up()
    pcap = lab.run_dir() / f"bench-paced-{replay}.pcap"
    cap = subprocess.Popen(["ip", "netns", "exec", "lab-client", "tcpdump", "-i", "eth0", "-s", "96", "-U", "-w",
                            str(pcap), f"tcp and src port {port}"], stderr=subprocess.DEVNULL)
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(httpload.paced(
        f"http://{lab.VIP}:{port}/{obj}", count=count, rate=rate, ns="lab-client", timeout=400, idle_timeout=60)))
    try:
        time.sleep(1.0)  # tcpdump up
        t.start()
        time.sleep(cut_after)
        cut = time.time()
        lab.cut_link("primary")
        t.join(timeout=460)
    finally:
        cap.terminate()
        cap.wait()
        lab.restore_link("primary")
    res = out[0] if out else None
    want = lab.expected_sha(obj)
    pauses = [p.max_gap_s for p in httpload.pcap_pauses(pcap, server_port=port, server=lab.VIP, around=cut,
                                                        window_s=30)
              if p.data_packets > 10]
    pcap.unlink(missing_ok=True)
    ok = 0 if res is None else sum(1 for d in res.downloads if d.ok and d.sha256 == want)
    pauses.sort()
    return {"replay": replay, "count": count, "complete_right_sha": ok,
            "pause_median_s": round(statistics.median(pauses), 2) if pauses else None,
            "pause_p99_s": round(pauses[int(len(pauses) * 0.99) - 1], 2) if pauses else None,
            "pause_max_s": round(pauses[-1], 2) if pauses else None}


def paced_bench(runs: int = 1, count: int = 500, rate: str = "32k", obj: str = "1M.bin",
                cut_after: float = 12.0) -> dict[str, Any]:
    per = _alternate(runs, lambda replay: paced_once(replay, count, rate, obj, cut_after))
    return {"case": f"{count} paced downloads of {obj} at {rate}/s each, cut {cut_after} s in", "runs": runs,
            "results": per}


def markdown(dl: dict[str, Any] | None, crowd: dict[str, Any] | None, paced: dict[str, Any] | None = None) -> str:
    lines = []
    if paced is not None:
        lines += [f"Paced crowd ({paced['case']}):", "",
                  "| replay | complete, right sha256 | pause at the client, median (s) | 99th percentile (s) | "
                  "longest (s) |", "|---|---|---|---|---|"]
        for replay, rs in paced["results"].items():
            for r in rs:
                lines.append(f"| {replay} | {r['complete_right_sha']} of {r['count']} | {r['pause_median_s']} | "
                             f"{r['pause_p99_s']} | {r['pause_max_s']} |")
        lines.append("")
    if dl is not None:
        lines += [f"Long download ({dl['case']}, {dl['runs']} runs each):", "",
                  "| replay | complete | pause, median (ms) | pause, worst (ms) | regenerated bytes, median |",
                  "|---|---|---|---|---|"]
        for replay, r in dl["results"].items():
            lines.append(f"| {replay} | {r['complete']} of {len(r['runs'])} | {r['median_pause_ms']} | "
                         f"{r['max_pause_ms']} | {r['median_regenerated']} |")
        lines.append("")
    if crowd is not None:
        lines += [f"Keep-alive crowd ({crowd['case']}):", "",
                  "| replay | requests | socket errors | timeouts | non-2xx | slowest after the cut (ms) | "
                  "rate before (req/s) | rate settled after (req/s) | back to 90 % after (s) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for replay, rs in crowd["results"].items():
            for r in rs:
                lines.append(f"| {replay} | {r['requests']} | {r['socket_errors']} | {r['timeouts']} | "
                             f"{r['non_2xx']} | {r['slowest_after_cut_ms']} | {r['rate_before']} | "
                             f"{r['rate_settled']} | {r['back_to_90pct_s']} |")
    return "\n".join(lines)
