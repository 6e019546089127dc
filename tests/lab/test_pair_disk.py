"""Peer plus disk (issue 13): both gateways die at once and the connections survive on their disks.

The two-gateway lab up with ``disk``: each gateway's Redis keeps an append-only file fsynced on
every write (``appendonly yes``, ``appendfsync always``) and both appliances have
``[pair] disk = true``.  An upload answered with its body's sha256 is under way when both gateways
die silently, one right after the other (every process killed, links down).  Both come back
(Redis reloads its file, keepalived and the appliance start again): the store with the newest data
takes the role, the other follows it, and the upload goes on.  Then the primary server dies too,
and the new active replays the whole upload to the backup from the log that came back from disk:
the answer is the body's sha256, and the client's capture passes I1–I6.  Real curl, the upload
app, keepalived, Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.lab import pair
from appliance.lab import topology as lab

from .conftest import require_root
from .helpers import Capture, expected_sha, start_upload, wait_for
from .invariants import assert_clean, check
from .test_pair_takeover import api, conns

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def disk_pair() -> Iterator[dict[str, str]]:
    require_root()
    lab.down()
    try:
        info = pair.up(disk=True)
        ready = info["pair"]
        assert isinstance(ready, dict)
        yield ready
    finally:
        lab.down()


def test_the_pairs_stores_fsync_every_write(disk_pair: dict[str, str]) -> None:
    for ns in disk_pair.values():
        st = api(ns, "/api/v1/status")["pair"]
        assert st["disk"] is True, st
    # a node whose Redis stops fsyncing is never eligible, and says why
    standby = disk_pair["standby"]
    nd = pair.node(standby)
    lab.sh("ip", "netns", "exec", nd.ns, "redis-cli", "-h", nd.sync_ip, "-p", str(pair.REDIS_PORT),
           "CONFIG", "SET", "appendfsync", "everysec")
    try:
        st = wait_for(lambda: (p := pair.pair_status(standby)) is not None and not p["eligible"] and p, timeout=10,
                      what=f"{standby} ineligible")
        assert "appendfsync" in (st["out_of_sync_reason"] or ""), st
    finally:
        lab.sh("ip", "netns", "exec", nd.ns, "redis-cli", "-h", nd.sync_ip, "-p", str(pair.REDIS_PORT),
               "CONFIG", "SET", "appendfsync", "always")
    assert pair.wait_pair_ready(timeout=30) == disk_pair


def test_an_upload_survives_both_gateways_dying_at_once_then_the_primary(disk_pair: dict[str, str],
                                                                         tmp_path: Path) -> None:
    active = disk_pair["active"]
    body = lab.cache_dir() / "www" / "10M.bin"
    out = tmp_path / "answer.txt"
    # an even 2 MB/s from the client's link (curl's own limit catches up after a pause, and the upload
    # would end before the primary's death below)
    lab.nsexec("lab-client", "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", "16mbit",
               "burst", "16kb", "latency", "50ms")
    try:
        mv = upload_through_both_deaths(active, body, out, tmp_path)
    finally:
        lab.nsexec("lab-client", "tc", "qdisc", "del", "dev", "eth0", "root")
    assert mv["backend"] == "backup"


def upload_through_both_deaths(active: str, body: Path, out: Path, tmp_path: Path) -> dict:
    with Capture("lab-client", tmp_path / "client.pcap", bpf=f"tcp port {lab.UPLOAD_PORT}", snaplen=512) as cap:
        up = start_upload(body, out)
        wait_for(lambda: max((c["bytes_from_client"] for c in conns(active, "upload")), default=0) > 3 << 20,
                 timeout=60, what="3 MiB sent")
        (c,) = conns(active, "upload")
        for n in pair.NODES:          # both at once: no standby is left to take over from memory
            pair.kill_gateway(n)
        for n in pair.NODES:
            pair.restart_gateway(n)
        ready = pair.wait_pair_ready(timeout=60)
        new = ready["active"]
        # re-attached from the store that came back from disk (not picked up again mid-stream)
        assert api(new, "/api/v1/status")["pair"]["last_takeover"]["reattached"] == 1
        # in any state: a connection that ends between two looks is still the one to read
        def record() -> list[dict]:
            return [x for x in api(new, "/api/v1/connections?service=upload") if x["client"] == c["client"]]
        back = wait_for(record, timeout=30, what="the upload re-attached from the store on disk")
        sent = back[0]["bytes_from_client"]
        wait_for(lambda: record()[0]["bytes_from_client"] > sent + (1 << 20), timeout=60,
                 what="1 MiB more after the restart")
        lab.cut_link("primary")       # and now the server too: the log from disk is replayed to the backup
        try:
            rc, _ = up.wait(timeout=120)
        finally:
            lab.restore_link("primary")
    assert rc == 0, out.read_text() if out.exists() else "no answer"
    assert out.read_text().split() == [expected_sha("10M.bin"), str(10 << 20)]  # every byte once, in order
    assert_clean(check(cap.path, lab.CLIENT, lab.VIP, lab.UPLOAD_PORT), expect_connections=1)
    (mv,) = [e for e in api(new, "/api/v1/events?kind=migration") if e["connection"] == c["id"]]
    return mv
