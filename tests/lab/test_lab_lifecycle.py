"""`appliance lab up` is idempotent and `appliance lab down` leaves nothing behind,
even after a crash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from appliance.lab import topology as lab

from .conftest import require_root

pytestmark = pytest.mark.lab


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True, text=True, timeout=120)


def leftovers() -> list[str]:
    found = [ns for ns in lab.namespaces() if ns.startswith("lab-")]
    raw = subprocess.run(["iptables-legacy", "-t", "raw", "-S"], capture_output=True, text=True).stdout
    if "APPLIANCE" in raw:
        found.append("host iptables chain APPLIANCE")
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
