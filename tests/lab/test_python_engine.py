"""The python engine (``[gateway] engine = "python"``: NetfilterQueue, the reference binding)
kept green on a representative subset of the lab suite, which otherwise runs on the native
engine: a download and an upload (disk store, delayed ACKs) through the primary's silent death."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.lab import topology as lab

from .helpers import (
    Capture,
    api,
    expected_sha,
    sha256_file,
    start_download,
    start_upload,
    wait_for,
)
from .invariants import assert_clean, check

pytestmark = pytest.mark.lab


def python_engine(store: dict[str, object] | None = None) -> None:
    lab.stop_appliance()
    lab.start_appliance(lab.variant_config("python-engine", gateway={"engine": "python"}, store=store))
    assert {q["binding"] for q in api("/api/v1/status")["queues"].values()} == {"python"}


def test_download_through_the_primarys_death_on_the_python_engine(fresh: dict, tmp_path: Path) -> None:
    python_engine()
    out = tmp_path / "10M.bin"
    with Capture("lab-client", tmp_path / "client.pcap", snaplen=65535) as cap:
        dl = start_download("10M.bin", out, rate="2M")
        wait_for(lambda: out.exists() and out.stat().st_size > 2 << 20, timeout=60, what="2 MiB received")
        lab.cut_link("primary")
        rc, _ = dl.wait(timeout=120)
    assert rc == 0 and sha256_file(out) == expected_sha("10M.bin")
    assert_clean(check(cap.path, "192.0.2.10", lab.VIP, lab.SERVICE_PORT), expect_connections=1)
    moved = wait_for(lambda: [e for e in api("/api/v1/events?kind=migration&service=web") if e["reason"] == "moved"],
                     timeout=30, what="the move")
    assert moved[0]["details"]["suppressed_bytes"] > 2 << 20


def test_upload_with_delayed_acks_through_the_primarys_death_on_the_python_engine(fresh: dict,
                                                                                    tmp_path: Path) -> None:
    python_engine(store={"mode": "disk"})
    body, digest = lab.make_upload_file()
    out = tmp_path / "answer.txt"
    with Capture("lab-client", tmp_path / "client.pcap", bpf=f"tcp port {lab.UPLOAD_PORT}", snaplen=512) as cap:
        up = start_upload(body, out)
        wait_for(lambda: max((c["bytes_from_client"] for c in api("/api/v1/connections?service=upload")),
                             default=0) > 30 << 20, timeout=120, interval=0.2, what="30 MiB sent")
        lab.cut_link("primary")
        rc, _ = up.wait(timeout=280)
    assert rc == 0, out.read_text() if out.exists() else "no answer"
    assert out.read_text().split() == [digest, str(lab.UPLOAD_SIZE)]
    assert_clean(check(cap.path, "192.0.2.10", lab.VIP, lab.UPLOAD_PORT), expect_connections=1)
    assert api("/api/v1/status")["dataplane"]["acks_held"] + api("/api/v1/status")["dataplane"]["acks_clamped"] > 0
