"""Fail-open fallback: stateless kernel NAT that carries a service while the
appliance process is gone.

The appliance rewrites addresses itself (VIP -> backend on the way in, backend
-> VIP on the way out).  If it dies, ``--queue-bypass`` lets the packets
through unchanged, which alone would leave them addressed to a VIP nobody
owns.  So the appliance keeps, for each service, a fallback in the kernel
that only ever matches packets it did not rewrite: an nftables chain on the
prerouting hook at priority raw+10, right after the iptables ``raw`` table
(priority raw) where the queue is, with stateless payload rewrites

* ``ip daddr VIP tcp dport P  ip daddr set <active backend>``
* ``ip saddr <active backend> tcp sport P'  ip saddr set VIP``

(nftables fixes the IPv4 checksum and the TCP checksum's pseudo-header part).
While the appliance runs, a packet leaves the queue already rewritten, so
neither rule matches it; the route lookup after the hook sends it by its new
address.  This kernel has no tc ``act_nat``, which is why nftables and not tc.

The table is replaced in one ``nft -f`` transaction and removed as a whole.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

TABLE = "appliance_failopen"
PRIORITY = "raw + 10"


@dataclass(frozen=True, slots=True)
class Fallback:
    vip: str
    port: int
    backend_ip: str
    backend_port: int


def ruleset(fallbacks: list[Fallback]) -> str:
    lines = [f"table ip {TABLE} {{}}", f"delete table ip {TABLE}", f"table ip {TABLE} {{",
             "  chain prerouting {",
             f"    type filter hook prerouting priority {PRIORITY}; policy accept;"]
    for fb in fallbacks:
        lines.append(f"    ip daddr {fb.vip} tcp dport {fb.port} ip daddr set {fb.backend_ip} comment \"fail-open in\"")
        lines.append(
            f"    ip saddr {fb.backend_ip} tcp sport {fb.backend_port} ip saddr set {fb.vip} comment \"fail-open out\""
        )
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def install(fallbacks: list[Fallback]) -> None:
    """Replace the fallback table with one for ``fallbacks`` (atomically)."""
    res = subprocess.run(["nft", "-f", "-"], input=ruleset(fallbacks), capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nft: {res.stderr.strip()}")


def remove() -> bool:
    """Delete the fallback table; True when there was one."""
    res = subprocess.run(["nft", "delete", "table", "ip", TABLE], capture_output=True, text=True)
    return res.returncode == 0


def describe() -> str:
    res = subprocess.run(["nft", "list", "table", "ip", TABLE], capture_output=True, text=True)
    return res.stdout if res.returncode == 0 else ""
