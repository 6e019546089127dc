"""The repair topology's IPv6 is usable the moment ``up()`` returns (root: the rp-* namespaces)."""

from __future__ import annotations

from appliance.lab import netns
from appliance.lab.repair_topology import Topology


def test_no_tentative_ipv6_address_after_up(topo: Topology) -> None:
    """No address is left in duplicate address detection, the veths' link-local ones
    included: while those are tentative the gateway cannot solicit a server host for
    the client's segments (nor a host the gateway for the service address's), so a
    connection moved there right after up() would be cut off for seconds."""
    tentative = {}
    for host in ("g", "c", *topo.servers):
        out = netns.ip("-6", "addr", "show", "tentative", ns=topo.ns(host)).stdout.strip()
        if out:
            tentative[host] = out
    assert tentative == {}
    links = netns.ip("-6", "addr", "show", "dev", "b0", "scope", "link", ns=topo.ns("g")).stdout
    assert "fe80::" in links            # the link-local address exists, and is valid
