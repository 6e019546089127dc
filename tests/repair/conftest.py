"""Fixtures for the endpoint-passing tests: their own namespaces (``rp-*``),
always removed again, also when a test fails; the tests that use them are
marked ``root``."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.lab.repair_topology import SERVICE_ADDR, Topology, reap_stale


ROOT_FIXTURES = {"topo"}  # the rp-* namespaces; ``connected`` and the modules' own fixtures build on it
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``root`` every test here that builds the namespaces (directly or
    through another fixture): without root it fails (tests/conftest.py), it
    is not skipped.  The pure checks (ICI validation, config, frames) stay
    unmarked and run unprivileged."""
    for item in items:
        if (Path(str(item.path)).is_relative_to(HERE) and ROOT_FIXTURES & set(getattr(item, "fixturenames", ()))
                and item.get_closest_marker("root") is None):
            item.add_marker("root")


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the TCP_REPAIR tests need root (namespaces, CAP_NET_ADMIN)")


@pytest.fixture
def topo() -> Iterator[Topology]:
    """rp-<pid>-c (client), -g (router), -a and -b (servers); the service address on -a.

    The pid in the names keeps parallel runs apart, so no lock is needed."""
    require_root()
    reap_stale()
    t = Topology()
    try:
        yield t.up(owner="a")
    finally:
        t.down()


@pytest.fixture
def connected(topo: Topology) -> Iterator[tuple[socket.socket, socket.socket]]:
    """(client socket in rp-c, accepted server socket in rp-a) on port 7000."""
    lst = topo.socket("a")
    lst.bind((SERVICE_ADDR, 7000))
    lst.listen()
    cli = topo.socket("c")
    cli.settimeout(10)
    cli.connect((SERVICE_ADDR, 7000))
    srv, _ = lst.accept()
    lst.close()
    try:
        yield cli, srv
    finally:
        cli.close()
        srv.close()


@pytest.fixture
def pcap(tmp_path: Path) -> Path:
    return tmp_path / "client.pcap"
