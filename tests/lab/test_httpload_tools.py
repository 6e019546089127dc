"""The HTTP measurement tools (appliance.lab.httpload) in the real lab: a short
wrk crowd on the plainly routed port, and paced downloads through the
gateway with a capture at the client, whose pauses the tool reads back."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.lab import httpload as hl
from appliance.lab import topology as lab

from .helpers import Capture, expected_sha

pytestmark = pytest.mark.lab


PRIMARY = next(h.address for h in lab.topology() if h.role == "primary")


def test_crowd_on_the_plain_port(fresh: dict) -> None:
    # the plain port is no service: the client talks to the primary's own address, which
    # the gateway's kernel routes (the VIP has nothing on that port)
    res = hl.crowd(f"http://{PRIMARY}:{lab.PLAIN_HTTP_PORT}/4K.bin", connections=20, duration=3,
                   ns="lab-client")
    assert res.wrk_exit == 0, res.wrk_stderr
    assert res.errors == {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    assert res.non_2xx == 0 and res.wrk_status_errors == 0 and res.unanswered_over_timeout == 0
    assert res.requests == res.recorded > 0 and res.rate > 0
    # the lab's nginx echoes the request id: every response has its own request's latency
    assert res.latency_source == "per-request"
    assert res.max_latency_ms is not None and 0 < res.max_latency_ms < 2000
    assert sum(n for _, n in res.timeline) == res.recorded
    assert all(r.status == 200 for r in res.responses)


def test_paced_downloads_through_the_gateway(fresh: dict, tmp_path: Path) -> None:
    want = expected_sha("1M.bin")
    with Capture("lab-client", tmp_path / "client.pcap", bpf=f"tcp and src host {lab.VIP} and src port "
                 f"{lab.SERVICE_PORT}", snaplen=96) as cap:
        res = hl.paced(f"http://{lab.VIP}:{lab.SERVICE_PORT}/1M.bin", count=50, rate="256k", ns="lab-client",
                       timeout=90, idle_timeout=20)
    assert res.ok == 50 and res.failed == 0, res.errors
    for d in res.downloads:
        assert (d.status, d.bytes, d.sha256) == (200, 1 << 20, want), d
    pauses = {c.client_port: c for c in hl.pcap_pauses(cap.path, server=lab.VIP, server_port=lab.SERVICE_PORT)}
    ports = {d.local_port for d in res.downloads}
    assert len(ports) == 50 and ports <= set(pauses)
    for d in res.downloads:
        c = pauses[d.local_port]
        assert c.client == "192.0.2.10" and c.fin and not c.rst
        assert c.new_bytes > 1 << 20  # the header and the body
        # the kernel's arrival gap, sampled at the reads, is never shorter than the wire's
        # (give or take a jiffy); the reader's own gap never longer than it by more than a tick
        assert d.max_arrival_gap_s is not None and c.max_gap_s <= d.max_arrival_gap_s + 0.02, (c, d)
        assert d.max_gap_s <= d.max_arrival_gap_s + res.tick + 0.05, d
