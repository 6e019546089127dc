"""IPv6 end to end through the dual-stack lab (issue 14): the same services, reached at their
IPv6 VIP (2001:db8:113::10), served by the backends' IPv6 addresses.  Real curl and nginx,
the lab's upload app, tcpdump at the client; every capture passes the I1–I6 check."""

from __future__ import annotations

import subprocess
import urllib.request
from pathlib import Path

import pytest

from appliance.lab import topology as lab

from .helpers import Capture, api, curl, expected_sha, sha256_file, start_download, start_upload, wait_for
from .invariants import assert_clean, check

pytestmark = pytest.mark.lab


def events(kind: str, service: str = "web") -> list[dict]:
    return api(f"/api/v1/events?kind={kind}&service={service}")


def moved(n: int, service: str = "web") -> list[dict]:
    return wait_for(lambda: len(events("migration", service)) >= n and events("migration", service), timeout=30,
                    what=f"{n} completed moves of {service}")


def conns(service: str) -> list[dict]:
    return api(f"/api/v1/connections?service={service}&q=ipv6")


def test_download_through_the_primarys_silent_death(fresh: dict, tmp_path: Path) -> None:
    out = tmp_path / "100M.bin"
    with Capture("lab-client", tmp_path / "client.pcap", snaplen=65535) as cap:
        dl = start_download("100M.bin", out, rate="20M", v6=True)
        wait_for(lambda: out.exists() and out.stat().st_size > 20 << 20, timeout=60, what="20 MiB received")
        (c,) = conns("web")
        assert c["family"] == "ipv6" and c["client"].startswith(f"[{lab.CLIENT6}]:")
        assert c["service"] == f"[{lab.VIP6}]:80" and c["backend_address"] == f"[{lab.PRIMARY6}]:80"
        lab.cut_link("primary")  # no FIN, no RST: the primary is simply gone

        def moved_set(name: str) -> str:
            return subprocess.run(["ip", "netns", "exec", lab.GATEWAY, "nft", "list", "set", "inet", "appliance_nat",
                                   name], capture_output=True, text=True, check=True).stdout

        # the kernel marks the moved connection's packets from the backup through the IPv6 set
        def in_moved6() -> str | None:
            ls = moved_set("moved6")
            return ls if f"{lab.BACKUP6} . 80 . {lab.CLIENT6} . " in ls else None

        listing = wait_for(in_moved6, timeout=30, what="the moved connection in the moved6 set")
        rc, port = dl.wait(timeout=120)
    assert rc == 0
    assert sha256_file(out) == expected_sha("100M.bin")
    assert f"{lab.BACKUP6} . 80 . {lab.CLIENT6} . {port}" in listing, listing  # that very connection
    assert "elements" not in moved_set("moved")  # none over IPv4
    reports = check(cap.path, lab.CLIENT6, lab.VIP6, lab.SERVICE_PORT)
    assert_clean(reports, expect_connections=1)
    assert reports[port].server_bytes > 100 << 20
    (mv,) = moved(1)
    assert mv["details"]["suppressed_bytes"] > 10 << 20
    assert api(f"/api/v1/connections/{mv['connection']}")["backend_address"] == f"[{lab.BACKUP6}]:80"
    assert not events("divergence") and not events("reset")


def test_upload_answered_with_its_sha256_through_a_failover(fresh: dict, tmp_path: Path) -> None:
    body = lab.cache_dir() / "www" / "10M.bin"
    out = tmp_path / "answer.txt"
    with Capture("lab-client", tmp_path / "client.pcap", bpf=f"tcp port {lab.UPLOAD_PORT}", snaplen=512) as cap:
        up = start_upload(body, out, rate="2M", v6=True)
        wait_for(lambda: max((c["bytes_from_client"] for c in conns("upload")), default=0) > 3 << 20,
                 timeout=60, interval=0.1, what="3 MiB sent")
        lab.cut_link("primary")  # silent death in the middle of the body
        rc, port = up.wait(timeout=120)
    assert rc == 0, out.read_text() if out.exists() else "no answer"
    assert out.read_text().split() == [expected_sha("10M.bin"), str(10 << 20)]  # every byte once, in order (I5)
    assert_clean(check(cap.path, lab.CLIENT6, lab.VIP6, lab.UPLOAD_PORT), expect_connections=1)
    assert moved(1, "upload")[0]["details"]["replayed"] > 3 << 20


def test_keepalive_failover_during_a_later_response(fresh: dict, tmp_path: Path) -> None:
    names = ["1M.bin", "10M.bin", "100M.bin"]
    outs = [tmp_path / f"k{i}-{n}" for i, n in enumerate(names)]
    args = ["-sS", "--fail", "--limit-rate", "20M"]
    cmd = curl("lab-client", lab.VIP6, lab.SERVICE_PORT, f"/{names[0]}", *args, "-o", str(outs[0]))
    for n, o in zip(names[1:], outs[1:]):
        cmd += ["-o", str(o), lab.url(lab.VIP6, lab.SERVICE_PORT, f"/{n}")]
    with Capture("lab-client", tmp_path / "client.pcap", snaplen=65535) as cap:
        proc = subprocess.Popen(cmd)
        wait_for(lambda: outs[2].exists() and outs[2].stat().st_size > 10 << 20, timeout=60,
                 what="the third response under way")
        lab.cut_link("primary")
        assert proc.wait(timeout=120) == 0
    for n, o in zip(names, outs):
        assert sha256_file(o) == expected_sha(n), n
    assert_clean(check(cap.path, lab.CLIENT6, lab.VIP6, lab.SERVICE_PORT), expect_connections=1)
    (mv,) = moved(1)
    assert mv["details"]["log_bytes"] > 200  # all three requests were replayed


def test_divergent_backup_resets_never_corrupts(fresh: dict, tmp_path: Path) -> None:
    lab.serve_divergent("backup")
    out = tmp_path / "100M.bin"
    with Capture("lab-client", tmp_path / "client.pcap", snaplen=65535) as cap:
        dl = start_download("100M.bin", out, rate="20M", v6=True)
        wait_for(lambda: out.exists() and out.stat().st_size > 5 << 20, timeout=30, what="5 MiB received")
        lab.cut_link("primary")
        rc, port = dl.wait(timeout=60)
    assert rc != 0  # the client sees a reset ...
    good = (lab.cache_dir() / "www" / "100M.bin").read_bytes()
    got = out.read_bytes()
    assert got == good[:len(got)]  # ... and never a wrong byte
    (dv,) = wait_for(lambda: events("divergence"), what="divergence event")
    assert dv["connection"]
    reports = check(cap.path, lab.CLIENT6, lab.VIP6, lab.SERVICE_PORT)
    assert reports[port].rsts >= 1
    assert not [v for v in reports[port].violations if v.startswith(("I1", "I2", "I3"))]


def test_delayed_acks_never_run_ahead_of_the_commit(fresh: dict, tmp_path: Path) -> None:
    # a disk store whose every commit takes 50 ms: the backend acknowledges long before the
    # bytes are safe, so the gate holds the IPv6 ACKs too
    lab.stop_appliance()
    lab.start_appliance(lab.variant_config("disk6", store={"mode": "disk"}, testing={"store_commit_delay": 0.05}))
    body = lab.cache_dir() / "www" / "10M.bin"
    out = tmp_path / "answer.txt"
    with Capture("lab-client", tmp_path / "client.pcap", bpf=f"tcp port {lab.UPLOAD_PORT}", snaplen=512) as cap:
        rc, port = start_upload(body, out, v6=True).wait(timeout=120)
    assert rc == 0
    assert out.read_text().split() == [expected_sha("10M.bin"), str(10 << 20)]
    (conn,) = [c for c in conns("upload") if c["client"] == f"[{lab.CLIENT6}]:{port}"]
    commits = {port: api(f"/api/v1/store/commits?connection={conn['id']}")}
    reports = check(cap.path, lab.CLIENT6, lab.VIP6, lab.UPLOAD_PORT, commits=commits)
    assert_clean(reports, expect_connections=1)
    assert reports[port].commit_checks > 10
    dp = api("/api/v1/status")["dataplane"]
    assert dp["acks_held"] > 0 and dp["acks_released"] > 0  # the gate was really in the way


def test_both_families_at_once_one_failover(fresh: dict, tmp_path: Path) -> None:
    """An IPv4 and an IPv6 download of the same service, one failover moves both."""
    out4, out6 = tmp_path / "4.bin", tmp_path / "6.bin"
    d4 = start_download("100M.bin", out4, rate="20M")
    d6 = start_download("100M.bin", out6, rate="20M", v6=True)
    wait_for(lambda: all(o.exists() and o.stat().st_size > 10 << 20 for o in (out4, out6)), timeout=60,
             what="both downloads 10 MiB in")
    tok = (lab.run_dir() / "token").read_text().strip()
    req = urllib.request.Request(f"http://{lab.API_HOST}:{lab.API_PORT}/metrics",
                                 headers={"Authorization": f"Bearer {tok}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        metrics = r.read().decode()
    for fam in ("ipv4", "ipv6"):
        assert f'gateway_tracked_connections_by_family{{service="web",family="{fam}"}} 1.0' in metrics, metrics
    lab.cut_link("primary")
    assert d4.wait(timeout=120)[0] == 0 and d6.wait(timeout=120)[0] == 0
    assert sha256_file(out4) == sha256_file(out6) == expected_sha("100M.bin")
    (fo,) = events("failover")
    assert len(fo["details"]["moved"]) == 2, fo
    assert len(moved(2)) == 2


def test_planned_resume_move_of_an_ipv6_connection(fresh: dict, tmp_path: Path) -> None:
    """Resume mode: the agents move the live IPv6 socket (TCP_REPAIR over IPv6) primary -> backup
    -> primary while the example client downloads through the IPv6 VIP."""
    import sys

    client_py = Path(__file__).resolve().parents[2] / "examples" / "resumable_fileserver" / "client.py"
    with Capture("lab-client", tmp_path / "client.pcap", bpf=f"tcp port {lab.RESUME_PORT}", snaplen=65535) as cap:
        cl = subprocess.Popen(["ip", "netns", "exec", "lab-client", sys.executable, str(client_py),
                               f"[{lab.VIP6}]:{lab.RESUME_PORT}", "10M.bin", "--rate", "2000000", "--timeout", "60"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        conn = wait_for(lambda: next((c for c in conns("resumable")
                                      if c["state"] == "ESTABLISHED" and c["bytes_from_server"] > 1 << 20), None),
                        timeout=30, what="an IPv6 resumable download past 1 MiB")
        cid = conn["id"]
        for to in ("backup", "primary"):
            before = api(f"/api/v1/connections/{cid}")["bytes_from_server"]
            ev = api(f"/api/v1/connections/{cid}/migrate", "POST", {"to": to, "mode": "resume"})
            assert ev["kind"] == "migration" and ev["details"]["mode"] == "resume" and ev["backend"] == to, ev
            c = wait_for(lambda: (c := api(f"/api/v1/connections/{cid}"))["bytes_from_server"] > before + (1 << 20)
                         and c, timeout=20, what=f"progress on {to}")
            assert c["backend"] == to
        out, err = cl.communicate(timeout=90)
    assert cl.returncode == 0, err
    digest, size = out.split()
    assert digest == expected_sha("10M.bin") and int(size) == 10 << 20
    assert_clean(check(cap.path, lab.CLIENT6, lab.VIP6, lab.RESUME_PORT), expect_connections=1)
    assert api(f"/api/v1/connections/{cid}")["moves"] == 2
