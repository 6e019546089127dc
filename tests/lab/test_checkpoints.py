"""Nothing acknowledged is ever lost: uploads through a failover, delayed ACKs
with a disk store, and an appliance killed and started again (issue 4).
Real curl, the lab's upload app, tcpdump at the client."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from appliance.lab import topology as lab

from .helpers import Capture, api, expected_sha, sha256_file, start_download, start_upload, wait_for
from .invariants import assert_clean, check

pytestmark = pytest.mark.lab


def disk_config(testing: dict[str, object] | None = None, **settings: object) -> Path:
    """The lab's configuration with a disk store (a fresh file), these settings
    and test-only ones (``[testing]``: the lab then sets APPLIANCE_TESTING=1)."""
    gw = {k: v for k, v in settings.items() if k == "on_failure"}
    st = {k: v for k, v in settings.items() if k != "on_failure"}
    return lab.variant_config("disk", gateway=gw, store={"mode": "disk", **st}, testing=testing)


def restart_with(cfg: Path) -> int:
    lab.stop_appliance()
    return lab.start_appliance(cfg)


def service_conns(service: str) -> list[dict]:
    return api(f"/api/v1/connections?service={service}")


def client_bytes(service: str) -> int:
    return max((c["bytes_from_client"] for c in service_conns(service)), default=0)


def test_upload_survives_the_primary_dying_mid_body(fresh: dict, tmp_path: Path) -> None:
    body, digest = lab.make_upload_file()
    out = tmp_path / "answer.txt"
    with Capture("lab-client", tmp_path / "client.pcap", bpf=f"tcp port {lab.UPLOAD_PORT}", snaplen=512) as cap:
        up = start_upload(body, out)
        wait_for(lambda: client_bytes("upload") > 60 << 20, timeout=120, interval=0.2, what="60 MiB sent")
        lab.cut_link("primary")  # silent death in the middle of the body
        rc, port = up.wait(timeout=280)
    assert rc == 0, out.read_text() if out.exists() else "no answer"
    # the backup got every byte exactly once, in order (I5)
    assert out.read_text().split() == [digest, str(lab.UPLOAD_SIZE)]
    assert_clean(check(cap.path, "192.0.2.10", lab.VIP, lab.UPLOAD_PORT), expect_connections=1)
    (fo,) = api("/api/v1/events?kind=failover&service=upload")
    assert fo["backend"] == "backup"
    moved = wait_for(lambda: api("/api/v1/events?kind=migration&service=upload"), timeout=30, what="the move")
    assert moved[0]["details"]["replayed"] > 60 << 20


def test_delayed_acks_never_run_ahead_of_the_commit(fresh: dict, tmp_path: Path) -> None:
    # every commit takes 50 ms: the backend acknowledges long before the bytes are safe
    restart_with(disk_config(testing={"store_commit_delay": 0.05}))
    body = lab.cache_dir() / "www" / "10M.bin"
    out = tmp_path / "answer.txt"
    with Capture("lab-client", tmp_path / "client.pcap", bpf=f"tcp port {lab.UPLOAD_PORT}", snaplen=512) as cap:
        rc, port = start_upload(body, out).wait(timeout=120)
    assert rc == 0
    assert out.read_text().split() == [expected_sha("10M.bin"), str(10 << 20)]
    (conn,) = [c for c in service_conns("upload") if c["client"] == f"192.0.2.10:{port}"]
    # the checker gets the commit log: no ACK or SACK edge above what was committed when it was captured
    commits = {port: api(f"/api/v1/store/commits?connection={conn['id']}")}
    reports = check(cap.path, "192.0.2.10", lab.VIP, lab.UPLOAD_PORT, commits=commits)
    assert_clean(reports, expect_connections=1)
    assert reports[port].commit_checks > 10
    dp = api("/api/v1/status")["dataplane"]
    assert dp["acks_held"] > 0 and dp["acks_released"] > 0  # the gate was really in the way
    store = api("/api/v1/store")
    assert store["mode"] == "disk" and store["batches"] > 10


def test_sigkill_and_restart_keep_protecting_a_download(fresh: dict, tmp_path: Path) -> None:
    cfg = disk_config(on_failure="closed")
    restart_with(cfg)
    out = tmp_path / "100M.bin"
    with Capture("lab-client", tmp_path / "client.pcap", snaplen=65535) as cap:
        dl = start_download("100M.bin", out, rate="10M")
        wait_for(lambda: out.exists() and out.stat().st_size > 15 << 20, timeout=60, what="15 MiB received")
        pid = int((lab.run_dir() / "appliance.pid").read_text())
        os.kill(pid, signal.SIGKILL)  # no clean-up: rules stay, held traffic waits (closed)
        wait_for(lambda: not lab.pid_alive(lab.run_dir() / "appliance.pid"), timeout=10, what="the appliance gone")
        lab.start_appliance(cfg)
        restart = wait_for(lambda: api("/api/v1/events?kind=restart"), timeout=10, what="the restart event")
        assert restart[0]["details"]["reattached"] >= 1
        (conn,) = [c for c in service_conns("web") if c["state"] == "ESTABLISHED"]
        assert conn["protected"], conn["unprotected_reason"]
        size = out.stat().st_size
        wait_for(lambda: out.stat().st_size > size + (5 << 20), timeout=30, what="the download going on")
        lab.cut_link("primary")  # and now the primary dies: the re-attached connection moves
        rc, port = dl.wait(timeout=200)
    assert rc == 0, [(e["kind"], e["reason"], e["details"].get("failure")) for e in api("/api/v1/events?limit=50")]
    assert sha256_file(out) == expected_sha("100M.bin")
    assert_clean(check(cap.path, "192.0.2.10", lab.VIP, lab.SERVICE_PORT), expect_connections=1)
    moved = wait_for(lambda: api("/api/v1/events?kind=migration&service=web"), timeout=30, what="the move")
    assert moved[0]["connection"] == conn["id"]


# over IPv6 in the lab (the suite's time is bounded); both families at gateway level
# (tests/gateway/test_restart_moved.py), and the IPv4 restart of an unmoved download above
@pytest.mark.parametrize("v6", [True], ids=["ipv6"])
def test_a_moved_download_survives_sigkill_and_restart(fresh: dict, tmp_path: Path, v6: bool) -> None:
    """Issue 13 item 8: a connection moved to the backup by replay keeps going after the
    appliance is SIGKILLed and started again (its translation is in the checkpoint)."""
    import sqlite3

    cfg = disk_config(on_failure="closed")
    restart_with(cfg)
    client, vip = (lab.CLIENT6, lab.VIP6) if v6 else ("192.0.2.10", lab.VIP)
    db = lab.run_dir() / "checkpoints-disk.db"
    out = tmp_path / "100M.bin"
    with Capture("lab-client", tmp_path / "client.pcap", snaplen=65535) as cap:
        dl = start_download("100M.bin", out, rate="10M", v6=v6)
        wait_for(lambda: out.exists() and out.stat().st_size > 10 << 20, timeout=60, what="10 MiB received")
        (conn,) = [c for c in service_conns("web") if c["state"] == "ESTABLISHED"]
        api("/api/v1/services/web/failover", "POST", {"to": "backup"})  # a planned move, by replay

        def spliced_and_durable() -> bool:
            move = (api(f"/api/v1/connections/{conn['id']}").get("move") or {})
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as ro:
                row = ro.execute("SELECT move FROM conn WHERE id = ?", (conn["id"],)).fetchone()
            return move.get("phase") == "SPLICED" and row is not None and '"phase":"spliced"' in (row[0] or "")

        wait_for(spliced_and_durable, timeout=30, what="the move completed and in the checkpoint")
        size = out.stat().st_size
        wait_for(lambda: out.stat().st_size > size + (2 << 20), timeout=30, what="the download going on, moved")
        pid = int((lab.run_dir() / "appliance.pid").read_text())
        os.kill(pid, signal.SIGKILL)  # no clean-up: rules and the kernel's moved set stay, traffic waits
        wait_for(lambda: not lab.pid_alive(lab.run_dir() / "appliance.pid"), timeout=10, what="the appliance gone")
        lab.start_appliance(cfg)
        restart = wait_for(lambda: api("/api/v1/events?kind=restart"), timeout=10, what="the restart event")
        assert restart[0]["details"]["reattached"] == 1 and restart[0]["details"]["moved"] == 1, restart
        after = api(f"/api/v1/connections/{conn['id']}")
        assert (after["backend"], after["moves"], after["move"]["phase"]) == ("backup", 1, "SPLICED"), after
        size = out.stat().st_size
        wait_for(lambda: out.stat().st_size > size + (5 << 20), timeout=30, what="the download going on after")
        rc, port = dl.wait(timeout=200)
    assert rc == 0, [(e["kind"], e["reason"], e["details"].get("failure")) for e in api("/api/v1/events?limit=50")]
    assert sha256_file(out) == expected_sha("100M.bin")
    assert_clean(check(cap.path, client, vip, lab.SERVICE_PORT), expect_connections=1)
    assert not api("/api/v1/events?kind=reset"), "nothing was reset"
