"""Kernel NAT through libnftables, in a network namespace of the test's own.

libnftables talks netlink in the namespace its context was made in, so each
scenario runs in a child process started with ``ip netns exec`` (the whole
process, its libnftables context and the ``nft`` command it checks with, in
the namespace); the parent only makes and deletes the namespace.  The
scenario functions below are that child's body: plain ``assert``s, a failure
shows as the child's traceback.

    sudo .venv/bin/python -m pytest tests/unit/test_kernelnat.py

Marked ``root``: run unprivileged they fail saying so (tests/conftest.py),
deselect them with ``-m 'not root'``.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nfq import kernelnat, nftables
from nfq.kernelnat import ServiceNat

ROOT = Path(__file__).resolve().parents[2]

SERVICES = [
    ServiceNat("192.0.2.10", 80, ("198.51.100.10", 80), (("198.51.100.10", 80), ("198.51.100.11", 8080))),
    ServiceNat("192.0.2.11", 443, ("198.51.100.20", 443), (("198.51.100.20", 443), ("198.51.100.21", 443))),
    # the first service's IPv6 twin (a dual-stack service is one ServiceNat per family)
    ServiceNat("2001:db8:2::10", 80, ("2001:db8:100::10", 80),
               (("2001:db8:100::10", 80), ("2001:db8:100::11", 8080))),
]


def _flows(n: int, client_port: int = 40000) -> list[kernelnat.Flow]:
    """``n`` flows, every third one IPv6."""
    return [("2001:db8:100::10", 80, f"2001:db8:113::{1 + i % 250:x}", client_port + i) if i % 3 == 2 else
            ("198.51.100.10" if i % 2 else "198.51.100.20", 80 if i % 2 else 443,
             f"203.0.113.{1 + i % 250}", client_port + i) for i in range(n)]


# -- run in the namespace ------------------------------------------------------

def _nft(*args: str) -> str:
    return subprocess.run(["nft", *args], check=True, capture_output=True, text=True).stdout


def _kernel_moved() -> set[kernelnat.Flow]:
    return (kernelnat.parse_elements(_nft("list", "set", "inet", kernelnat.TABLE, "moved"))
            | kernelnat.parse_elements(_nft("list", "set", "inet", kernelnat.TABLE, "moved6")))


def _counting() -> list[str]:
    """Record every libnftables command from here on (kernelnat calls nftables.run)."""
    calls: list[str] = []
    real = nftables.run

    def run(script: str) -> str:
        calls.append(script)
        return real(script)

    nftables.run = run  # type: ignore[assignment]  # the child process only
    return calls


def scenario_lifecycle() -> None:
    assert _nft("list", "tables") == "", "the namespace is not fresh"
    calls = _counting()

    kernelnat.install(SERVICES)
    assert len(calls) == 1
    assert _nft("list", "tables") == f"table inet {kernelnat.TABLE}\n"
    assert len(calls) == 1
    marks = _nft("list", "chain", "inet", kernelnat.TABLE, "markmoved")
    assert "ip saddr . tcp sport . ip daddr . tcp dport @moved meta mark set 0x00004d56" in marks, marks
    assert "ip6 saddr . tcp sport . ip6 daddr . tcp dport @moved6 meta mark set 0x00004d56" in marks, marks
    chain = _nft("list", "chain", "inet", kernelnat.TABLE, "prerouting")
    assert ('ip6 saddr 2001:db8:100::11 tcp sport 8080 fib daddr type != local ip6 saddr set 2001:db8:2::10 '
            'tcp sport set 80 comment "return path"') in chain, chain
    assert ('ip6 daddr 2001:db8:2::10 tcp dport 80 ip6 daddr set 2001:db8:100::10 '
            'comment "fail-open fallback"') in chain, chain

    flows = _flows(500)
    del calls[:]
    kernelnat.add_moved(flows)
    assert len(calls) == 1, f"add_moved: {len(calls)} transactions"
    assert _kernel_moved() == set(flows)
    assert len(kernelnat.parse_elements(_nft("list", "set", "inet", kernelnat.TABLE, "moved6"))) == 500 // 3
    assert kernelnat.moved.flows == set(flows)

    del calls[:]
    kernelnat.add_moved(flows[:100])  # all present: nothing to do
    assert calls == []

    absent = _flows(10, client_port=60000)
    del calls[:]
    kernelnat.del_moved(flows[:250] + absent)
    assert len(calls) == 1, f"del_moved: {len(calls)} transactions"
    assert "60000" not in calls[0], "an absent element was named in the delete"
    remaining = _kernel_moved()
    assert len(remaining) == 250 and remaining == set(flows[250:]), len(remaining)
    assert kernelnat.moved.flows == remaining

    # the set changed behind the bookkeeping's back: the delete re-reads and still succeeds
    b, bp, c, cp = flows[250]
    _nft("delete", "element", "inet", kernelnat.TABLE, "moved", f"{{ {b} . {bp} . {c} . {cp} }}")
    kernelnat.del_moved(flows[250:260])
    assert _kernel_moved() == set(flows[260:])
    b, bp, c, cp = flows[263]  # the same in the IPv6 set
    assert ":" in b
    _nft("delete", "element", "inet", kernelnat.TABLE, "moved6", f"{{ {b} . {bp} . {c} . {cp} }}")
    kernelnat.del_moved(flows[260:270])
    assert _kernel_moved() == set(flows[270:])

    # the active backend of the first service changed
    moved_before = _kernel_moved()
    s = SERVICES[0]
    s6 = SERVICES[2]
    kernelnat.repoint([ServiceNat(s.vip, s.port, ("198.51.100.11", 8080), s.backends), SERVICES[1],
                       ServiceNat(s6.vip, s6.port, ("2001:db8:100::11", 8080), s6.backends)])
    chain = _nft("list", "chain", "inet", kernelnat.TABLE, "prerouting")
    assert ('ip6 daddr 2001:db8:2::10 tcp dport 80 ip6 daddr set 2001:db8:100::11 tcp dport set 8080 '
            'comment "fail-open fallback"') in chain, chain
    assert "ip6 daddr set 2001:db8:100::10" not in chain, chain
    assert ('ip daddr 192.0.2.10 tcp dport 80 ip daddr set 198.51.100.11 tcp dport set 8080 '
            'comment "fail-open fallback"') in chain, chain
    assert "ip daddr set 198.51.100.10" not in chain, chain
    assert 'ip daddr 192.0.2.11 tcp dport 443 ip daddr set 198.51.100.20 comment "fail-open fallback"' in chain
    assert ('ip saddr 198.51.100.11 tcp sport 8080 fib daddr type != local ip saddr set 192.0.2.10 '
            'tcp sport set 80 comment "return path"') in chain, chain
    assert _kernel_moved() == moved_before, "repoint touched the moved set"

    # install again: a fresh, empty set, and bookkeeping to match
    kernelnat.install(SERVICES)
    assert _kernel_moved() == set() and len(kernelnat.moved) == 0
    kernelnat.add_moved(flows[:5])

    assert kernelnat.remove() is True
    assert _nft("list", "tables") == ""
    assert len(kernelnat.moved) == 0
    assert kernelnat.remove() is False
    kernelnat.del_moved(flows[:5])  # no table, nothing recorded: no error


def scenario_errors() -> None:
    try:
        nftables.run(f"table inet {kernelnat.TABLE} {{ chain c {{ bogus; }} }}\n")
    except nftables.NftError as e:
        assert "Error: syntax error" in str(e) and "bogus" in str(e), str(e)
    else:
        raise AssertionError("a bad ruleset did not raise")

    kernelnat.install(SERVICES)
    before = _nft("list", "table", "inet", kernelnat.TABLE)
    bad = ServiceNat("192.0.2.10", 80, ("198.51.100.10", 70000), SERVICES[0].backends)
    try:
        kernelnat.install([bad])
    except nftables.NftError as e:
        assert "Error:" in str(e) and "out of range" in str(e), str(e)
    else:
        raise AssertionError("a port out of range did not raise")
    assert _nft("list", "table", "inet", kernelnat.TABLE) == before, "a failed install changed the table"
    assert kernelnat.remove()

    # an older appliance's IPv4-only table is replaced by an install and removed by a remove
    for act in (lambda: kernelnat.install(SERVICES), kernelnat.remove):
        _nft("add", "table", "ip", kernelnat.TABLE)
        act()
        assert f"table ip {kernelnat.TABLE}" not in _nft("list", "tables")
    assert _nft("list", "tables") == ""


# -- pytest side ---------------------------------------------------------------

@pytest.fixture
def netns() -> Iterator[str]:
    name = f"kn-{os.getpid()}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _run_in(ns: str, scenario: str) -> None:
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
            f"from tests.unit.test_kernelnat import {scenario}; {scenario}()")
    res = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code],
                         check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{scenario} in {ns}:\n{res.stdout}{res.stderr}"


@pytest.mark.root
def test_batched_lifecycle(netns: str) -> None:
    """install, 500 moved flows in one transaction, delete 250 + 10 absent in one, repoint, remove."""
    _run_in(netns, "scenario_lifecycle")


@pytest.mark.root
def test_bad_ruleset_raises_nft_message(netns: str) -> None:
    _run_in(netns, "scenario_errors")


def test_parse_elements_and_validation() -> None:
    listing = """table ip appliance_nat {
\tset moved {
\t\ttype ipv4_addr . inet_service . ipv4_addr . inet_service
\t\telements = { 198.51.100.10 . 80 . 203.0.113.5 . 40000,
\t\t\t     198.51.100.20 . 443 . 203.0.113.6 . 40001 }
\t}
}
"""
    assert kernelnat.parse_elements(listing) == {("198.51.100.10", 80, "203.0.113.5", 40000),
                                                 ("198.51.100.20", 443, "203.0.113.6", 40001)}
    with pytest.raises(ValueError):
        kernelnat.add_moved([("198.51.100.10; flush ruleset", 80, "203.0.113.5", 1)])
    with pytest.raises(ValueError):
        kernelnat.add_moved([("198.51.100.10", 80, "203.0.113.5", 70000)])
    listing6 = """table inet appliance_nat {
\tset moved6 {
\t\ttype ipv6_addr . inet_service . ipv6_addr . inet_service
\t\telements = { 2001:db8:100::10 . 80 . 2001:db8:2::10 . 40000,
\t\t\t     2001:db8:100::20 . 443 . 2001:db8:2::a . 40001 }
\t}
}
"""
    assert kernelnat.parse_elements(listing6) == {("2001:db8:100::10", 80, "2001:db8:2::10", 40000),
                                                  ("2001:db8:100::20", 443, "2001:db8:2::a", 40001)}
    with pytest.raises(ValueError, match="two families"):  # no NAT46/64
        kernelnat.add_moved([("2001:db8:100::10", 80, "203.0.113.5", 1)])
    with pytest.raises(ValueError):
        kernelnat.add_moved([("2001:db8:100::zz", 80, "2001:db8:2::10", 1)])


def test_ruleset_text_for_both_families() -> None:
    text = kernelnat.ruleset(SERVICES)
    assert "table inet appliance_nat {" in text
    assert "delete table ip appliance_nat" in text  # an older appliance's IPv4-only table goes
    assert "set moved6 { type ipv6_addr . inet_service . ipv6_addr . inet_service; }" in text
    assert ('ip6 saddr 2001:db8:100::11 tcp sport 8080 fib daddr type != local ip6 saddr set 2001:db8:2::10 '
            'tcp sport set 80 comment "return path"') in text
    assert 'ip6 daddr 2001:db8:2::10 tcp dport 80 ip6 daddr set 2001:db8:100::10 comment "fail-open fallback"' in text
    assert 'ip saddr 198.51.100.10 tcp sport 80 fib daddr type != local ip saddr set 192.0.2.10 comment' in text
    with pytest.raises(ValueError, match="not of the VIP's family"):
        kernelnat.ruleset([ServiceNat("2001:db8:2::10", 80, ("198.51.100.10", 80), (("198.51.100.10", 80),))])
