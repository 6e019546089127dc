"""Fixtures that build the real lab (namespaces, nginx, the appliance) and
always take it down again, also when a test fails."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator

import pytest

from appliance.lab import topology as lab


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("lab tests need root (namespaces, iptables, NFQUEUE): use the README's test command")


LOCK = "/run/appliance-lab.lock"


@pytest.fixture(scope="session", autouse=True)
def lab_lock() -> Iterator[None]:
    """One lab per machine: the namespaces have fixed names, so two test runs
    (or a test run and a demo) must not build and tear down the lab at once."""
    require_root()
    with open(LOCK, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="module")
def lab_up() -> Iterator[dict]:
    """A lab with one client, primary and backup, and the appliance running."""
    require_root()
    lab.down()  # whatever an earlier run left behind
    try:
        info = lab.up(clients=1, backups=1)
        yield info
    finally:
        lab.down()


@pytest.fixture
def appliance_running(lab_up: dict) -> Iterator[dict]:
    """The lab's appliance, (re)started if a test killed it."""
    lab.start_appliance(lab.run_dir() / "gateway.toml")
    yield lab_up
    lab.start_appliance(lab.run_dir() / "gateway.toml")


def heal() -> None:
    """Links up, no loss, servers serving their own content, no appliance."""
    for host in ("primary", "backup"):
        lab.set_loss(host, 0)
    lab.down_appliance_state()


@pytest.fixture
def fresh(lab_up: dict) -> Iterator[dict]:
    """A healed lab and a freshly started appliance with the lab's own
    configuration (primary active, no events); healed again afterwards, so a
    test's cut link, loss or variant configuration never reaches the next."""
    heal()
    lab.up()
    yield lab_up
    heal()
