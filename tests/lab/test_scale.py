"""Scale: ten thousand tracked connections open at once through the gateway (verify = "full":
every byte the server sent was digested), within the appliance's memory bound.

Here each has carried a 4 KiB object: what a connection costs the appliance does not grow with
a download's size (its client log holds the request, its digest 16 bytes per 64 KiB), and ten
thousand mebibytes take minutes on this lab machine, where the client, the servers and the
gateway share two cores.  The same run with 1 MiB each is the benchmark
(``python -m appliance.lab.crowd --connections 10000 --path /1M.bin``, docs/BENCHMARKS.md).  The
figures go to BENCHMARKS; only the bound is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.lab import crowd

pytestmark = pytest.mark.lab

N = 10_000
RSS_BOUND_MB = 500


def test_ten_thousand_connections_open_at_once_within_the_memory_bound(fresh: dict, tmp_path: Path) -> None:
    figures = crowd.measure(N, "/4K.bin", timeout=600)
    (tmp_path / "scale.json").write_text(json.dumps(figures, indent=1))
    print("scale:", json.dumps(figures))
    assert figures["failed"] == 0, figures["errors"]
    assert figures["opened"] == N and figures["bytes"] == N * 4096
    assert figures["established"] >= N, figures
    assert figures["table"]["evicted"] == 0 and figures["table"]["refused_full"] == 0
    assert figures["rss_mb"] <= RSS_BOUND_MB, figures
