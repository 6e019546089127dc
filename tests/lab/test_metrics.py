"""The failover-time histograms of ``GET /metrics`` over a real failover: five paced curl
downloads, the primary's link cut (a silent death), the moves, then one scrape."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.config import load
from appliance.lab import topology as lab

from .helpers import api, expected_sha, sha256_file, start_download, wait_for

pytestmark = pytest.mark.lab

N = 5
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape() -> Samples:
    tok = (lab.run_dir() / "token").read_text().strip()
    req = urllib.request.Request(f"http://{lab.API_HOST}:{lab.API_PORT}/metrics",
                                 headers={"Authorization": f"Bearer {tok}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        if fam.name.startswith(("gateway_failover_decision", "gateway_move_")):
            assert fam.type == "histogram"
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(s: Samples, name: str, **labels: str) -> float:
    return s.get((name, tuple(sorted(labels.items()))), 0.0)


def moved() -> list[dict]:
    return [e for e in api("/api/v1/events?kind=migration&service=web&limit=100") if e["reason"] == "moved"]


def test_failover_time_histograms(fresh: dict, tmp_path: Path) -> None:
    health = load(lab.run_dir() / "gateway.toml").service("web").health  # type: ignore[union-attr]
    before = scrape()
    downloads = [start_download("10M.bin", tmp_path / f"m{i}.bin", rate="2M") for i in range(N)]
    wait_for(lambda: all(d.out.exists() and d.out.stat().st_size > 1 << 20 for d in downloads)
             and sum(c["state"] == "ESTABLISHED" for c in api("/api/v1/connections?service=web")) >= N,
             timeout=30, interval=0.1, what=f"{N} downloads 1 MiB in")
    lab.cut_link("primary")  # no FIN, no RST: only the health check can tell
    evs = wait_for(lambda: len(moved()) >= N and moved(), timeout=30, interval=0.2, what=f"{N} verified moves")
    after = scrape()
    assert [d.wait(timeout=60)[0] for d in downloads] == [0] * N
    for d in downloads:
        assert sha256_file(d.out) == expected_sha("10M.bin")

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # one decision, by the health check, no sooner than the check can see a silent death
    dec = "gateway_failover_decision_seconds"
    assert delta(dec + "_count", service="web", reason="health") == 1
    assert delta(dec + "_count", service="web", reason="backend_closed") == 0
    seconds = delta(dec + "_sum", service="web", reason="health")
    # fall probes, the last timing out (a probe that times out delays the next: each starts after the
    # one before it began plus min(interval, timeout), so this holds from the first one's start)
    bound = (health.fall - 1) * health.interval + health.probe_timeout
    assert bound <= seconds < 3.0, (seconds, bound)
    # one first byte and one catch-up per moved connection
    fb = "gateway_move_first_byte_seconds"
    assert delta(fb + "_count", service="web", mode="replay") == N
    assert 0 < delta(fb + "_sum", service="web", mode="replay") < N * 5.0
    assert delta(fb + "_bucket", service="web", mode="replay", le="+Inf") == N
    cu = "gateway_move_catchup_bytes"
    assert delta(cu + "_count", service="web") == N
    catchup = delta(cu + "_sum", service="web")
    assert catchup >= N << 20  # each client had more than 1 MiB when the link was cut
    assert catchup == sum(e["details"]["suppressed_bytes"] for e in evs[:N])
    print(f"decision {seconds:.3f} s (bound {bound:.3f}), first bytes {delta(fb + '_sum', service='web', mode='replay'):.3f} s "
          f"in all, catch-up {catchup / (1 << 20):.1f} MiB in all")


def test_the_queue_bindings_losses_are_series_from_the_start(fresh: dict) -> None:
    """ENOBUFS and the kernel's per-queue drops are counters in /metrics for each queue of the
    native binding (zero on an idle lab), and the status says which binding reads each queue."""
    tok = (lab.run_dir() / "token").read_text().strip()
    req = urllib.request.Request(f"http://{lab.API_HOST}:{lab.API_PORT}/metrics",
                                 headers={"Authorization": f"Bearer {tok}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        fams = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    queues = api("/api/v1/status")["queues"]
    assert {q["binding"] for q in queues.values()} == {"native"}
    enobufs = {s.labels["queue"]: s.value for s in fams["gateway_queue_enobufs"].samples}
    assert set(enobufs) == set(queues) and all(v == 0 for v in enobufs.values())
    drops = {(s.labels["queue"], s.labels["cause"]) for s in fams["gateway_queue_kernel_drops"].samples}
    assert drops == {(q, c) for q in queues for c in ("queue", "user")}
