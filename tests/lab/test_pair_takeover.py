"""The gateway pair carrying connections through the active gateway's own death (issue 13).

The two-gateway lab with both appliances in ``store.mode = "peer"``: every commit batch is
in the standby's Redis before the clients' ACKs pass.  The active gateway dies silently (every
process killed, its links down) during (a) a download, (b) an upload answered with the body's
sha256, (c) a connection already moved to the backup server; (d) after the takeover the primary
server dies too and the new active replays from the replicated log.  Also: the active frozen
and thawed (no frame from it for the service afterwards, and it rejoins as the standby); the sync
link cut (degraded, the standby ineligible) and restored (resync).  Real curl, nginx, keepalived,
Redis; every client capture passes the I1–I6 check."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.lab import pair
from appliance.lab import topology as lab
from appliance.pcap import packets

from .conftest import require_root
from .helpers import (
    Capture,
    expected_sha,
    sha256_file,
    start_download,
    start_upload,
    wait_for,
)
from .invariants import assert_clean, check

pytestmark = pytest.mark.lab


def api(ns: str, path: str, method: str = "GET", body: Any = None) -> Any:
    tok = (lab.run_dir() / "token").read_text().strip()
    req = urllib.request.Request(f"{pair.node(ns).api}{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {tok}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def pair_events(ns: str, what: str | None = None) -> list[dict]:
    return [e for e in api(ns, "/api/v1/events?kind=pair") if what is None or e["details"].get("what") == what]


@pytest.fixture(scope="module")
def pair_lab() -> Iterator[None]:
    require_root()
    lab.down()
    try:
        pair.up()
        yield
    finally:
        lab.down()


@pytest.fixture
def ready(pair_lab: None) -> dict[str, str]:
    """Both gateways alive, one active and one standby in sync: {"active": ns, "standby": ns}."""
    for host in ("primary", "backup"):
        lab.restore_link(host)
    pair.restore_sync()
    for n in pair.NODES:
        pair.thaw_gateway(n)
        alive = lab.pid_alive(lab.run_dir() / f"{n.appliance_name}.pid") and pair.keepalived_pid(n)
        if not alive:
            pair.restart_gateway(n)
    ready = pair.wait_pair_ready(timeout=60)
    for n in pair.NODES:  # an earlier test's failover leaves the backup in use: back to the primary
        wait_for(lambda ns=n.ns: primary_in_use(ns), timeout=30, what=f"{n.ns}'s services on their primary")
    return ready


def primary_in_use(ns: str) -> bool:
    for svc in api(ns, "/api/v1/services"):
        if svc["active_backend"] != "primary":
            try:
                api(ns, f"/api/v1/services/{svc['name']}/failover", "POST", {"to": "primary"})
            except urllib.error.HTTPError:
                return False  # the primary not up again yet
    return all(svc["active_backend"] == "primary" for svc in api(ns, "/api/v1/services"))


def took_over(ns: str) -> dict:
    # (a condition, not a speed check: the takeover's pause is a benchmark; a standby that was out
    # of sync for a moment at the death takes the role once its next check passes)
    try:
        return wait_for(lambda: (p := pair.pair_status(ns)) is not None and p["role"] == "active" and p["forwarding"]
                        and p, timeout=30, interval=0.02, what=f"{ns} active")
    except AssertionError:  # say where it stands: its role, sync, keepalived's view and the pair's events
        keys = ("role", "epoch", "vrrp", "forwarding", "in_sync", "eligible", "out_of_sync_reason", "lease_wait_ms")
        p = pair.pair_status(ns) or {}
        try:
            events = [e["details"] for e in api(ns, "/api/v1/events?kind=pair")][-6:]
        except OSError as exc:
            events = [f"(no answer: {exc})"]
        raise AssertionError(f"{ns} not active and forwarding in 30 s: {({k: p.get(k) for k in keys})}; "
                             f"keepalived {pair.vrrp_transitions(ns)[-4:]}; events {events}") from None


def conns(ns: str, service: str = "web") -> list[dict]:
    """The service's established connections on gateway ``ns`` (an earlier test's may linger, closed)."""
    return [c for c in api(ns, f"/api/v1/connections?service={service}") if c["state"] == "ESTABLISHED"]


def leg_macs(ns: str) -> list[str]:
    out = []
    for leg in (pair.CLIENT_IF, pair.SERVER_IF):
        (link,) = json.loads(subprocess.run(["ip", "-n", ns, "-j", "link", "show", leg], capture_output=True,
                                            text=True, check=True).stdout)
        out.append(link["address"])
    return out


def test_download_through_the_active_gateways_silent_death(ready: dict[str, str], tmp_path: Path) -> None:
    active, standby = ready["active"], ready["standby"]
    out = tmp_path / "100M.bin"
    with Capture("lab-client", tmp_path / "client.pcap", snaplen=65535) as cap:
        dl = start_download("100M.bin", out, rate="20M")
        wait_for(lambda: out.exists() and out.stat().st_size > 20 << 20, timeout=60, what="20 MiB received")
        (c,) = conns(active)
        pair.kill_gateway(active)
        st = took_over(standby)
        rc, port = dl.wait(timeout=120)
    assert rc == 0
    assert sha256_file(out) == expected_sha("100M.bin")
    reports = check(cap.path, lab.CLIENT, lab.VIP, lab.SERVICE_PORT)
    assert_clean(reports, expect_connections=1)
    assert st["epoch"] > 0 and st["last_takeover"]["reattached"] == 1
    after = api(standby, f"/api/v1/connections/{c['id']}")  # the same connection, same id, same backend
    assert after["client"] == c["client"] and after["backend"] == c["backend"] == "primary"
    assert pair_events(standby, "takeover")
    assert not api(standby, "/api/v1/events?kind=reset")


def test_an_ipv6_download_through_the_active_gateways_silent_death(ready: dict[str, str], tmp_path: Path) -> None:
    """The same over the IPv6 VIP: the floating IPv6 next hops move with the IPv4 ones, the
    replicated record is of the IPv6 connection."""
    active, standby = ready["active"], ready["standby"]
    out = tmp_path / "100M.bin"
    with Capture("lab-client", tmp_path / "client.pcap", snaplen=65535) as cap:
        dl = start_download("100M.bin", out, rate="20M", v6=True)
        wait_for(lambda: out.exists() and out.stat().st_size > 20 << 20, timeout=60, what="20 MiB received")
        (c,) = conns(active)
        assert c["family"] == "ipv6"
        pair.kill_gateway(active)
        took_over(standby)
        rc, _ = dl.wait(timeout=120)
    assert rc == 0
    assert sha256_file(out) == expected_sha("100M.bin")
    assert_clean(check(cap.path, lab.CLIENT6, lab.VIP6, lab.SERVICE_PORT), expect_connections=1)
    after = api(standby, f"/api/v1/connections/{c['id']}")
    assert after["client"] == c["client"] and after["family"] == "ipv6"


def test_upload_answered_with_its_sha256_through_the_active_gateways_death(ready: dict[str, str],
                                                                          tmp_path: Path) -> None:
    active, standby = ready["active"], ready["standby"]
    body = lab.cache_dir() / "www" / "10M.bin"
    out = tmp_path / "answer.txt"
    with Capture("lab-client", tmp_path / "client.pcap", bpf=f"tcp port {lab.UPLOAD_PORT}", snaplen=512) as cap:
        up = start_upload(body, out, rate="2M")
        wait_for(lambda: max((c["bytes_from_client"] for c in conns(active, "upload")), default=0) > 3 << 20,
                 timeout=60, what="3 MiB sent")
        pair.kill_gateway(active)
        took_over(standby)
        rc, port = up.wait(timeout=120)
    assert rc == 0, out.read_text() if out.exists() else "no answer"
    assert out.read_text().split() == [expected_sha("10M.bin"), str(10 << 20)]  # every byte once, in order
    assert_clean(check(cap.path, lab.CLIENT, lab.VIP, lab.UPLOAD_PORT), expect_connections=1)


def test_a_moved_connection_survives_the_active_gateways_death(ready: dict[str, str], tmp_path: Path) -> None:
    active, standby = ready["active"], ready["standby"]
    out = tmp_path / "100M.bin"
    with Capture("lab-client", tmp_path / "client.pcap", snaplen=65535) as cap:
        dl = start_download("100M.bin", out, rate="20M")
        wait_for(lambda: out.exists() and out.stat().st_size > 10 << 20, timeout=60, what="10 MiB received")
        (c,) = conns(active)
        api(active, f"/api/v1/connections/{c['id']}/migrate", "POST", {"to": "backup"})
        wait_for(lambda: api(active, "/api/v1/events?kind=migration"), timeout=30, what="the move verified")
        wait_for(lambda: out.stat().st_size > 30 << 20, timeout=60, what="30 MiB received")
        pair.kill_gateway(active)
        took_over(standby)
        rc, port = dl.wait(timeout=120)
    assert rc == 0
    assert sha256_file(out) == expected_sha("100M.bin")
    assert_clean(check(cap.path, lab.CLIENT, lab.VIP, lab.SERVICE_PORT), expect_connections=1)
    after = api(standby, f"/api/v1/connections/{c['id']}")
    assert after["backend"] == "backup"  # the translation came with the replicated checkpoint
    moved = subprocess.run(["ip", "netns", "exec", standby, "nft", "list", "set", "inet", "appliance_nat", "moved"],
                           capture_output=True, text=True, check=True).stdout
    assert f"{lab.BACKUP} . 80 . {lab.CLIENT} . {port}" in moved, moved


def test_the_primary_server_dies_after_the_takeover(ready: dict[str, str], tmp_path: Path) -> None:
    active, standby = ready["active"], ready["standby"]
    out = tmp_path / "100M.bin"
    with Capture("lab-client", tmp_path / "client.pcap", snaplen=65535) as cap:
        dl = start_download("100M.bin", out, rate="20M")
        wait_for(lambda: out.exists() and out.stat().st_size > 20 << 20, timeout=60, what="20 MiB received")
        (c,) = conns(active)
        pair.kill_gateway(active)
        took_over(standby)
        size = out.stat().st_size
        wait_for(lambda: out.stat().st_size > size + (5 << 20), timeout=30, what="5 MiB through the new active")
        lab.cut_link("primary")  # now the server dies too: replay from the replicated log
        rc, port = dl.wait(timeout=120)
    assert rc == 0
    assert sha256_file(out) == expected_sha("100M.bin")
    assert_clean(check(cap.path, lab.CLIENT, lab.VIP, lab.SERVICE_PORT), expect_connections=1)
    (mv,) = [e for e in api(standby, "/api/v1/events?kind=migration") if e["connection"] == c["id"]]
    assert mv["details"]["suppressed_bytes"] > 20 << 20  # the backup regenerated what the client had, unseen
    assert api(standby, f"/api/v1/connections/{mv['connection']}")["backend"] == "backup"


def test_a_move_caught_by_the_takeover_restarts(ready: dict[str, str], tmp_path: Path) -> None:
    """The primary server dies and, while the backup regenerates what the client has (slowed to
    50 Mbit/s), the active gateway dies too: the new active goes on with the primary, fences the
    backup's half-replayed socket and moves the connection again, from the start."""
    active, standby = ready["active"], ready["standby"]
    out = tmp_path / "100M.bin"
    tbf = ["ip", "netns", "exec", "lab-backup", "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate",
           "50mbit", "burst", "64kb", "latency", "100ms"]
    try:
        with Capture("lab-client", tmp_path / "client.pcap", snaplen=65535) as cap:
            dl = start_download("100M.bin", out, rate="40M")
            wait_for(lambda: out.exists() and out.stat().st_size > 20 << 20, timeout=60, what="20 MiB received")
            subprocess.run(tbf, check=True)
            lab.cut_link("primary")
            wait_for(lambda: api(active, "/api/v1/status")["moving"] == 1, timeout=10, interval=0.02,
                     what="the move under way")
            pair.kill_gateway(active)
            took_over(standby)
            wait_for(lambda: api(standby, "/api/v1/events?kind=migration"), timeout=30, what="the move restarted")
            subprocess.run(["ip", "netns", "exec", "lab-backup", "tc", "qdisc", "del", "dev", "eth0", "root"],
                           check=True)
            rc, port = dl.wait(timeout=120)
    finally:
        subprocess.run(["ip", "netns", "exec", "lab-backup", "tc", "qdisc", "del", "dev", "eth0", "root"],
                       capture_output=True)
    assert rc == 0
    assert sha256_file(out) == expected_sha("100M.bin")
    assert_clean(check(cap.path, lab.CLIENT, lab.VIP, lab.SERVICE_PORT), expect_connections=1)
    restarted = [e for e in api(standby, "/api/v1/events?kind=restart") if e["details"].get("restarted")]
    assert [e["details"]["restarted"] for e in restarted] == [1]
    moves = api(standby, "/api/v1/events?kind=migration")
    (mv,) = [e for e in moves if "mid-move" in e["reason"]]  # the move started again, once
    assert api(standby, f"/api/v1/connections/{mv['connection']}")["backend"] == "backup"


def test_a_frozen_active_thawed_sends_nothing_and_rejoins_as_standby(ready: dict[str, str], tmp_path: Path) -> None:
    active, standby = ready["active"], ready["standby"]
    macs = leg_macs(active)
    out = tmp_path / "100M.bin"
    with Capture("lab-client", tmp_path / "client.pcap", snaplen=65535) as cap:
        dl = start_download("100M.bin", out, rate="20M")
        wait_for(lambda: out.exists() and out.stat().st_size > 10 << 20, timeout=60, what="10 MiB received")
        pair.freeze_gateway(active)
        took_over(standby)
        size = out.stat().st_size
        wait_for(lambda: out.stat().st_size > size + (10 << 20), timeout=30, what="10 MiB through the new active")
        # the service's frames from the old gateway: to the client from the VIP, to a server from the
        # client (its own health probes, from its own address, are not the service's)
        to_client = f"tcp and ether src {macs[0]} and src host {lab.VIP}"
        to_server = f"tcp and ether src {macs[1]} and src host {lab.CLIENT}"
        with Capture("lab-client", tmp_path / "old-client.pcap", bpf=to_client, snaplen=128) as old_c, \
                Capture("lab-primary", tmp_path / "old-primary.pcap", bpf=to_server, snaplen=128) as old_p, \
                Capture("lab-backup", tmp_path / "old-backup.pcap", bpf=to_server, snaplen=128) as old_b:
            pair.thaw_gateway(active)
            # fenced by the newer epoch, it forgets its connections and follows the new active's store
            wait_for(lambda: (p := pair.pair_status(active)) is not None and p["role"] == "standby" and p["in_sync"],
                     timeout=30, what=f"{active} a standby in sync again")
            rc, port = dl.wait(timeout=120)
    assert rc == 0
    assert sha256_file(out) == expected_sha("100M.bin")
    assert_clean(check(cap.path, lab.CLIENT, lab.VIP, lab.SERVICE_PORT), expect_connections=1)
    for c in (old_c, old_p, old_b):
        assert list(packets(c.path)) == [], f"the thawed gateway sent frames: {c.path}"
    assert pair_events(active, "fenced")
    assert pair.vrrp_master() == standby


def test_a_cut_sync_link_degrades_and_a_restored_one_resyncs(ready: dict[str, str], tmp_path: Path) -> None:
    active, standby = ready["active"], ready["standby"]
    out = tmp_path / "10M.bin"
    pair.cut_sync()
    st = wait_for(lambda: (p := pair.pair_status(active)) is not None and p["degraded"] and p, timeout=10,
                  what="the active degraded")
    assert st["alone"] and st["forwarding"]
    wait_for(lambda: (p := pair.pair_status(standby)) is not None and not p["eligible"], timeout=10,
             what="the standby ineligible")
    wait_for(lambda: pair.vrrp_state(standby) == "FAULT", timeout=10, what="the standby's keepalived in FAULT")
    assert pair_events(active, "degraded") and pair_events(standby, "out-of-sync")
    with Capture("lab-client", tmp_path / "client.pcap", snaplen=65535) as cap:  # the service goes on, alone
        rc, _ = start_download("10M.bin", out).wait(timeout=60)
    assert rc == 0 and sha256_file(out) == expected_sha("10M.bin")
    assert_clean(check(cap.path, lab.CLIENT, lab.VIP, lab.SERVICE_PORT), expect_connections=1)
    metrics = urllib.request.urlopen(urllib.request.Request(
        f"{pair.node(active).api}/metrics",
        headers={"Authorization": f"Bearer {(lab.run_dir() / 'token').read_text().strip()}"}), timeout=10).read().decode()
    assert "gateway_replication_alone 1" in metrics
    pair.restore_sync()
    assert pair.wait_pair_ready(timeout=30, active=active) == {"active": active, "standby": standby}
    assert not pair.pair_status(active)["alone"]
    # keepalived leaves FAULT once the appliance marks its node eligible; its notify record follows
    wait_for(lambda: pair.vrrp_state(standby) == "BACKUP", timeout=10, what="the standby's keepalived in BACKUP")
