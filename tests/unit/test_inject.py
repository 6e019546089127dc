"""nfq.inject.Injector on the wire, both families, in a network namespace of the test's own.

The namespace holds a veth pair: the injector sends out of ``t6a`` (static neighbour entries,
so nothing waits on ARP or neighbour discovery) and a raw ``AF_PACKET`` socket on ``t6b``
sees what left.  Each packet carries a source address the namespace does not own (as replay
and fencing send the client's or the VIP's), and the injection mark (an nftables counter on
the output hook counts marked packets per family).  The scenario runs in a child started with
``ip netns exec`` (as in test_kernelnat); the parent makes and deletes the namespace.

    sudo .venv/bin/python -m pytest tests/unit/test_inject.py

Marked ``root``: run unprivileged it fails saying so (tests/conftest.py).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def scenario_inject_both_families() -> None:
    from checkpoint.segment import ACK, PSH
    from nfq.build import tcp_packet
    from nfq.inject import INJECT_MARK, SO_MARK, Injector

    _sh("ip", "link", "set", "lo", "up")
    _sh("ip", "link", "add", "t6a", "type", "veth", "peer", "name", "t6b")
    for dev in ("t6a", "t6b"):
        _sh("ip", "link", "set", dev, "up")
    _sh("ip", "addr", "add", "2001:db8:2::1/64", "dev", "t6a", "nodad")
    _sh("ip", "addr", "add", "192.0.2.1/24", "dev", "t6a")
    _sh("ip", "-6", "neigh", "replace", "2001:db8:2::10", "lladdr", "02:00:00:00:00:10", "dev", "t6a",
        "nud", "permanent")
    _sh("ip", "neigh", "replace", "192.0.2.10", "lladdr", "02:00:00:00:00:10", "dev", "t6a", "nud", "permanent")
    _sh("nft", "add table inet t6mark; "
        "add chain inet t6mark out { type filter hook output priority 0; }; "
        f"add rule inet t6mark out meta nfproto ipv6 meta mark {INJECT_MARK:#x} counter; "
        f"add rule inet t6mark out meta nfproto ipv4 meta mark {INJECT_MARK:#x} counter")

    cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    cap.bind(("t6b", 0))
    cap.settimeout(0.5)

    # sources the namespace does not own: the VIP's, as replay and fencing send
    p6 = tcp_packet("2001:db8:113::10", "2001:db8:2::10", 80, 40000, 5001, 1001, PSH | ACK, 500,
                    payload=b"injected over IPv6", ttl=61)
    p4 = tcp_packet("203.0.113.10", "192.0.2.10", 80, 40000, 5001, 1001, PSH | ACK, 500,
                    payload=b"injected over IPv4", ttl=61, ident=77)
    inj = Injector()
    assert inj.sock6 is None  # opened at the first IPv6 packet
    inj.send(p6)
    inj.send(p4)
    assert (inj.sent, inj.errors) == (2, 0), inj.last_error
    assert inj.sock6 is not None and inj.sock6.getsockopt(socket.SOL_SOCKET, SO_MARK) == INJECT_MARK

    seen6 = seen4 = False
    deadline = time.monotonic() + 10
    while not (seen6 and seen4) and time.monotonic() < deadline:
        try:
            frame = cap.recv(65535)
        except TimeoutError:
            continue
        etype, ip = frame[12:14], frame[14:]
        if etype == b"\x86\xdd" and ip == p6:  # the IPv6 packet as built, byte for byte
            seen6 = True
            assert frame[:6] == bytes.fromhex("020000000010")
        elif etype == b"\x08\x00" and len(ip) == len(p4) and ip[12:] == p4[12:] and ip[:10] == p4[:10]:
            seen4 = True  # (the kernel may rewrite the IPv4 header checksum)
    assert seen6, "the injected IPv6 packet did not leave t6a"
    assert seen4, "the injected IPv4 packet did not leave t6a"

    # a packet without a route: counted, never raised
    inj.send(tcp_packet("2001:db8:113::10", "2001:db8:999::1", 80, 40000, 1, 1, ACK, 500))
    assert inj.errors == 1 and inj.last_error is not None and inj.last_error.startswith("2001:db8:999::1: ")
    # not an IP packet at all: counted too
    inj.send(b"\x50" + bytes(59))
    assert inj.errors == 2 and "version 5" in (inj.last_error or "")
    inj.close()

    counters = [int(n) for n in re.findall(r"counter packets (\d+)", _sh("nft", "list", "table", "inet", "t6mark"))]
    assert counters[0] >= 1 and counters[1] >= 1, f"marked packets (ipv6, ipv4): {counters}"


# -- pytest side ---------------------------------------------------------------

@pytest.fixture
def netns() -> Iterator[str]:
    name = f"t6-{os.getpid()}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _run_in(ns: str, scenario: str) -> None:
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
            f"from tests.unit.test_inject import {scenario}; {scenario}()")
    res = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code],
                         check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{scenario} in {ns}:\n{res.stdout}{res.stderr}"


@pytest.mark.root
def test_injector_sends_ipv6_and_ipv4(netns: str) -> None:
    """Both families leave the interface as built, with the injection mark; failures are counted."""
    _run_in(netns, "scenario_inject_both_families")
