"""`appliance lab up` is idempotent and `appliance lab down` leaves nothing behind,
even after a crash; the lab is dual-stack (every host reaches its peers over
IPv6 through the gateway, the appliance's IPv6 rules come and go with it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from appliance.lab import topology as lab

from .conftest import require_root
from .helpers import (
    Capture,
    api,
    curl,
    expected_sha,
    sha256_file,
    start_download,
    wait_for,
)
from .invariants import assert_clean, check

pytestmark = pytest.mark.lab


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True, text=True, timeout=120)


def leftovers() -> list[str]:
    found = [ns for ns in lab.namespaces() if ns.startswith("lab-")]
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        raw = subprocess.run([tool, "-t", "raw", "-S"], check=False, capture_output=True, text=True).stdout
        if "APPLIANCE" in raw:
            found.append(f"host {tool} chain APPLIANCE")
    nft = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    if "appliance_nat" in nft:
        found.append("host nft table appliance_nat")
    if lab.run_dir().exists():
        found.append(str(lab.run_dir()))
    return found


@pytest.fixture
def clean() -> None:
    require_root()
    lab.down()
    yield
    lab.down()


def test_up_twice_then_down_removes_everything(clean: None) -> None:
    first = cli("lab", "up", "--clients", "2", "--backups", "2")
    assert first.returncode == 0, first.stderr
    assert "token:" in first.stdout
    again = cli("lab", "up", "--clients", "2", "--backups", "2")  # idempotent: no error, same lab
    assert again.returncode == 0, again.stderr
    st = json.loads(cli("lab", "status").stdout)
    assert sorted(st["namespaces"]) == sorted(
        ["lab-client", "lab-client2", "lab-gateway", "lab-primary", "lab-backup", "lab-backup2"])
    assert st["appliance_pid"]
    # the second client reaches the service through the gateway
    r = subprocess.run(["ip", "netns", "exec", "lab-client2", "curl", "-sS", "--fail", "-o", "/dev/null",
                        "-w", "%{size_download}", f"http://{lab.VIP}/1M.bin"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == str(1 << 20)
    # the rules sit in the gateway namespace, commented, with --queue-bypass
    rules = subprocess.run(["ip", "netns", "exec", "lab-gateway", "iptables-legacy", "-t", "raw", "-S", "APPLIANCE"],
                           capture_output=True, text=True).stdout
    assert "--queue-bypass" in rules and "appliance:" in rules and "--notrack" in rules
    down = cli("lab", "down")
    assert down.returncode == 0, down.stderr
    assert leftovers() == []


def test_down_after_crash(clean: None) -> None:
    lab.up()
    pid = lab.pid_alive(lab.run_dir() / "appliance.pid")
    os.kill(pid, signal.SIGKILL)  # the appliance dies without cleaning up
    (lab.run_dir() / "appliance.pid").unlink()  # and its pid file is lost
    # an extra stray process in a lab namespace
    stray = subprocess.Popen(["ip", "netns", "exec", "lab-primary", "sleep", "300"])
    try:
        assert cli("lab", "down").returncode == 0
        assert leftovers() == []
        stray.wait(timeout=10)
    finally:
        if stray.poll() is None:
            stray.kill()


def gateway(*args: str) -> str:
    return subprocess.run(["ip", "netns", "exec", lab.GATEWAY, *args], check=False, capture_output=True, text=True).stdout


def test_mirror6() -> None:
    assert lab.mirror6("192.0.2.10") == lab.CLIENT6 == "2001:db8:2::10"
    assert lab.mirror6("198.51.100.20") == lab.BACKUP6 == "2001:db8:100::20"
    assert lab.mirror6(lab.PRIMARY) == lab.PRIMARY6 and lab.mirror6(lab.VIP) == lab.VIP6
    assert lab.mirror6(lab.VIP6) == lab.VIP6
    with pytest.raises(ValueError):
        lab.mirror6("10.0.0.1")
    assert lab.url(lab.VIP6, 80, "/1M.bin") == "http://[2001:db8:113::10]:80/1M.bin"


def test_dual_stack_lab_and_the_appliances_ipv6_rules(clean: None) -> None:
    lab.up(clients=2, backups=2)
    hosts = lab.topology(clients=2, backups=2)
    assert [h.address6 for h in hosts] == ["2001:db8:2::10", "2001:db8:2::11", "2001:db8:100::10",
                                           "2001:db8:100::20", "2001:db8:100::21"]
    for h in hosts:
        addrs = subprocess.run(["ip", "-n", h.ns, "-6", "addr", "show", "dev", "eth0"],
                               check=False, capture_output=True, text=True).stdout
        assert f"inet6 {h.address6}/64" in addrs, addrs
    # every client reaches every server over IPv6, routed by the gateway (a plainly forwarded port)
    for c in (h for h in hosts if h.role == "client"):
        for srv in (h for h in hosts if h.role != "client"):
            r = subprocess.run(curl(c.ns, srv.address6, lab.PLAIN_HTTP_PORT, "/1M.bin", "-sS", "--fail",
                                    "-o", "/dev/null", "-w", "%{size_download} %{remote_ip}"),
                               check=False, capture_output=True, text=True, timeout=30)
            assert r.returncode == 0 and r.stdout == f"{1 << 20} {srv.address6}", (c.ns, srv.ns, r.stderr)
    # the upload app listens on both families
    r = subprocess.run(curl("lab-client", lab.PRIMARY6, lab.PLAIN_UPLOAD_PORT, "/", "-sS", "--fail",
                            "-H", "Expect:", "--data-binary", "abc"), check=False, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith(
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad  3"), r.stdout + r.stderr
    # the gateway's config: a vip6 next to every service's vip, an address6 per backend
    cfg = tomllib.loads((lab.run_dir() / "gateway.toml").read_text())
    for svc in cfg["service"]:
        assert svc["vip6"] == lab.VIP6, svc["name"]
        assert [b["address6"] for b in svc["backend"]] == [lab.mirror6(b["address"]) for b in svc["backend"]]
    # the appliance's IPv6 rules: the VIP6 queued, each backend's return path queued and NATed
    rules6 = gateway("ip6tables-legacy", "-t", "raw", "-S", "APPLIANCE")
    assert (f"-A APPLIANCE -d {lab.VIP6}/128 -p tcp -m tcp --dport 80 -m comment --comment "
            '"appliance: web client->vip" -j NFQUEUE --queue-num 0 --queue-bypass') in rules6, rules6
    assert (f"-A APPLIANCE -s {lab.BACKUP6}/128 -p tcp -m tcp --sport 80 -m addrtype ! --dst-type LOCAL") in rules6
    assert "-A PREROUTING -j APPLIANCE" in gateway("ip6tables-legacy", "-t", "raw", "-S", "PREROUTING")
    nat = gateway("nft", "list", "table", "inet", "appliance_nat")
    assert (f'ip6 saddr {lab.PRIMARY6} tcp sport 80 fib daddr type != local ip6 saddr set {lab.VIP6} '
            'comment "return path"') in nat, nat
    assert f'ip6 daddr {lab.VIP6} tcp dport 80 ip6 daddr set {lab.PRIMARY6} comment "fail-open fallback"' in nat
    # ... and they go away with the appliance
    lab.stop_appliance()
    assert "APPLIANCE" not in gateway("ip6tables-legacy", "-t", "raw", "-S")
    assert "APPLIANCE" not in gateway("iptables-legacy", "-t", "raw", "-S")
    assert "appliance_nat" not in gateway("nft", "list", "tables")
    assert cli("lab", "down").returncode == 0
    assert leftovers() == []


def test_download_through_the_ipv6_vip(clean: None, tmp_path: Path) -> None:
    """A download through [VIP6]:80: the right bytes, a clean client capture (I1-I6),
    and the appliance tracked it as an IPv6 connection to the primary."""
    lab.up()
    out = tmp_path / "10M.bin"
    with Capture("lab-client", tmp_path / "client.pcap", snaplen=65535) as cap:
        rc, port = start_download("10M.bin", out, v6=True).wait(timeout=120)
    assert rc == 0 and sha256_file(out) == expected_sha("10M.bin")
    reports = check(cap.path, lab.CLIENT6, lab.VIP6, lab.SERVICE_PORT)
    assert_clean(reports, expect_connections=1)
    assert reports[port].server_bytes > 10 << 20
    conn = wait_for(lambda: next((c for c in api("/api/v1/connections")
                                  if c["client"] == f"[{lab.CLIENT6}]:{port}"), None),
                    what="the connection in the API")
    assert conn["backend_address"] == f"[{lab.PRIMARY6}]:80" and conn["service"] == f"[{lab.VIP6}]:80"
