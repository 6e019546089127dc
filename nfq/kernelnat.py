"""Stateless address translation in the kernel (nftables): the return path's
fast lane, and the fail-open fallback.

The appliance holds every client->service packet in its queue and rewrites
its destination itself (VIP -> the connection's backend).  Server->client
packets of an ordinary (not moved) connection need only their source
rewritten (backend -> VIP), which is the same for every connection of a
backend, so the kernel does it, statelessly, after the appliance has seen the
packet: the appliance never rewrites those, and for a service with
``verify = "sampled"`` it only observes them (prefix copies, GSO
super-packets whole), which is what lets a download go at a useful fraction
of plain forwarding (DESIGN.md: hold what correctness needs, observe the
rest).

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

A second chain, at priority raw-10 (before the queues), marks the packets of
*moved* connections coming from their new backend (set ``moved``: backend
address . port . client address . port) with :data:`MOVED_MARK`, so that the
iptables chain sends them to the full-copy queue however the service's
return path is otherwise read: a moved connection's packets are translated,
and that needs every byte.

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
MOVED_MARK = 0x4D56


@dataclass(frozen=True, slots=True)
class ServiceNat:
    vip: str
    port: int
    active: tuple[str, int]              # (address, port) the fallback sends clients to
    backends: tuple[tuple[str, int], ...]  # every backend's (address, port)


def _nat_rules(services: list[ServiceNat], fallback: bool) -> list[str]:
    lines = []
    for s in services:
        for addr, port in s.backends:
            snat = f"ip saddr set {s.vip}" + (f" tcp sport set {s.port}" if port != s.port else "")
            lines.append(f'    ip saddr {addr} tcp sport {port} fib daddr type != local {snat} comment "return path"')
        if fallback:
            addr, port = s.active
            dnat = f"ip daddr set {addr}" + (f" tcp dport set {port}" if port != s.port else "")
            lines.append(f'    ip daddr {s.vip} tcp dport {s.port} {dnat} comment "fail-open fallback"')
    return lines


def ruleset(services: list[ServiceNat], fallback: bool = True) -> str:
    lines = [f"table ip {TABLE} {{}}", f"delete table ip {TABLE}", f"table ip {TABLE} {{",
             "  set moved { type ipv4_addr . inet_service . ipv4_addr . inet_service; }",
             "  chain markmoved {",
             "    type filter hook prerouting priority raw - 10; policy accept;",
             f'    ip saddr . tcp sport . ip daddr . tcp dport @moved meta mark set {MOVED_MARK:#x} comment "moved"',
             "  }",
             "  chain prerouting {",
             f"    type filter hook prerouting priority {PRIORITY}; policy accept;",
             *_nat_rules(services, fallback),
             "  }", "}"]
    return "\n".join(lines) + "\n"


def _nft(script: str) -> None:
    res = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nft: {res.stderr.strip()}")


def repoint(services: list[ServiceNat], fallback: bool = True) -> None:
    """Rewrite the NAT rules (the active backend changed), leaving the set alone."""
    _nft(f"flush chain ip {TABLE} prerouting\n"
         + "".join(f"add rule ip {TABLE} prerouting {r.strip()}\n" for r in _nat_rules(services, fallback)))


Flow = tuple[str, int, str, int]  # backend address, backend port, client address, client port


def _elements(flows: list[Flow]) -> str:
    return ", ".join(f"{b} . {bp} . {c} . {cp}" for b, bp, c, cp in flows)


def add_moved(flows: list[Flow]) -> None:
    if flows:
        _nft(f"add element ip {TABLE} moved {{ {_elements(flows)} }}\n")


def del_moved(flows: list[Flow]) -> None:
    for f in flows:  # one at a time: deleting an absent element fails the whole batch
        subprocess.run(["nft", "delete", "element", "ip", TABLE, "moved", f"{{ {_elements([f])} }}"],
                       capture_output=True, text=True)


def install(services: list[ServiceNat], fallback: bool = True) -> None:
    """Replace the table with one for ``services`` (atomically)."""
    _nft(ruleset(services, fallback))


def remove() -> bool:
    """Delete the table; True when there was one."""
    res = subprocess.run(["nft", "delete", "table", "ip", TABLE], capture_output=True, text=True)
    return res.returncode == 0
