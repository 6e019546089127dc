"""Stateless address translation in the kernel (nftables): the return path's
fast lane, and the fail-open fallback.

The appliance holds every client->service packet in its queue and rewrites
its destination itself (VIP -> the connection's backend).  Server->client
packets of an ordinary (not moved) connection need only their source
rewritten (backend -> VIP), which is the same for every connection of a
backend, so the kernel does it, statelessly, after the appliance has seen the
packet: the appliance only observes those (header-only copies, GSO
super-packets whole) and gives a verdict, which is what lets a download go
at a useful fraction of plain forwarding (DESIGN.md: hold what correctness
needs, observe the rest).

One nftables table, one chain on the prerouting hook at priority raw+10,
right after the iptables ``raw`` table (priority raw) where the queues are:

* ``ip saddr <backend> tcp sport P  ip saddr set VIP`` for every backend of
  every service (the return path, always; not for packets addressed to the
  gateway itself, such as the answers to its health checks);
* ``ip daddr VIP tcp dport P  ip daddr set <active backend>`` for every
  service: the fail-open fallback.  While the appliance runs, a client packet
  leaves the queue already rewritten and does not match; if the appliance
  died, ``--queue-bypass`` lets packets through unchanged and this rule sends
  them to the active backend.

nftables fixes the IPv4 checksum and the TCP checksum's pseudo-header part;
the route lookup after the hook sends a packet by its new address.  (This
kernel has no tc ``act_nat``, so nftables rather than tc.)  The table is
replaced in one ``nft -f`` transaction and removed as a whole.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

TABLE = "appliance_nat"
PRIORITY = "raw + 10"


@dataclass(frozen=True, slots=True)
class ServiceNat:
    vip: str
    port: int
    active: tuple[str, int]              # (address, port) the fallback sends clients to
    backends: tuple[tuple[str, int], ...]  # every backend's (address, port)


def ruleset(services: list[ServiceNat], fallback: bool = True) -> str:
    lines = [f"table ip {TABLE} {{}}", f"delete table ip {TABLE}", f"table ip {TABLE} {{",
             "  chain prerouting {",
             f"    type filter hook prerouting priority {PRIORITY}; policy accept;"]
    for s in services:
        for addr, port in s.backends:
            snat = f"ip saddr set {s.vip}" + (f" tcp sport set {s.port}" if port != s.port else "")
            lines.append(f'    ip saddr {addr} tcp sport {port} fib daddr type != local {snat} comment "return path"')
        if fallback:
            addr, port = s.active
            dnat = f"ip daddr set {addr}" + (f" tcp dport set {port}" if port != s.port else "")
            lines.append(f'    ip daddr {s.vip} tcp dport {s.port} {dnat} comment "fail-open fallback"')
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def install(services: list[ServiceNat], fallback: bool = True) -> None:
    """Replace the table with one for ``services`` (atomically)."""
    res = subprocess.run(["nft", "-f", "-"], input=ruleset(services, fallback), capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nft: {res.stderr.strip()}")


def remove() -> bool:
    """Delete the table; True when there was one."""
    res = subprocess.run(["nft", "delete", "table", "ip", TABLE], capture_output=True, text=True)
    return res.returncode == 0


def describe() -> str:
    res = subprocess.run(["nft", "list", "table", "ip", TABLE], capture_output=True, text=True)
    return res.stdout if res.returncode == 0 else ""
