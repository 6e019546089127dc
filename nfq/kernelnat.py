"""Stateless address translation in the kernel (nftables): both directions'
fast lane, and the fail-open fallback.

The appliance holds every client->service packet in its queue.  A client
packet of an ordinary connection pinned to the service's active backend
leaves the queue unchanged and the kernel rewrites its destination (VIP ->
the active backend; the data plane knows which backend the rule points to,
``ServiceRuntime.kernel_target``); any other (a connection pinned to another
backend, a moved one) the appliance rewrites itself.  Server->client
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
  service: the client rule.  While the appliance runs, a client packet it
  passed unchanged is rewritten here, and one it rewrote itself does not
  match; if the appliance died, ``--queue-bypass`` (``on_failure = "open"``)
  lets packets through unchanged and this rule sends them to the active
  backend (with ``"closed"`` nothing passes the queue without the appliance,
  so the rule is harmless there).

A second chain, at priority raw-10 (before the queues), marks the packets of
*moved* connections coming from their new backend (set ``moved``: backend
address . port . client address . port) with :data:`MOVED_MARK`, so that the
iptables chain sends them to the full-copy queue however the service's
return path is otherwise read: a moved connection's packets are translated,
and that needs every byte.

nftables fixes the IPv4 checksum and the TCP checksum's pseudo-header part;
the route lookup after the hook sends a packet by its new address.  (This
kernel has no tc ``act_nat``, so nftables rather than tc.)  The table is
replaced in one transaction and removed as a whole.

Both families live in one ``inet`` table (``inet appliance_nat``): IPv4
rules say ``ip saddr``/``ip daddr`` and IPv6 rules ``ip6 saddr``/``ip6
daddr`` (nftables adds the family check each implies), and the moved flows
are two sets, ``moved`` (``ipv4_addr . inet_service . ipv4_addr .
inet_service``) and ``moved6`` (the same with ``ipv6_addr``), each matched by
its own rule in ``markmoved``.  One table keeps every update one transaction
whatever the families involved.  The family of a :class:`ServiceNat` or a
:data:`Flow` is that of its addresses (``":"`` in them: IPv6), which must all
be of one family (there is no NAT46/64).  Installing also deletes a table
``ip appliance_nat`` that an older appliance may have left (same transaction).

Every update is one libnftables transaction made in process
(:mod:`nfq.nftables`), whatever the number of flows: these run on the event
loop that carries every packet, where starting an ``nft`` process per call
(let alone per flow) stalled the data path at a failover.  Deleting an
element the set does not hold fails a whole ``delete element`` batch (nft
1.0.6 has no ``destroy``), so :class:`MovedSet` keeps the flows this process
put in ``moved``: deletes name only present elements, adds skip present
ones, and a delete that fails anyway (the set changed behind our back)
re-reads the set from the kernel and retries once.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from typing import Final

from . import nftables
from .nftables import NftError

__all__ = [
    "FAMILY",
    "MOVED_MARK",
    "PRIORITY",
    "SETS",
    "TABLE",
    "Flow",
    "MovedSet",
    "NftError",
    "ServiceNat",
    "add_moved",
    "del_moved",
    "install",
    "moved",
    "parse_elements",
    "remove",
    "repoint",
    "ruleset",
]

TABLE: Final = "appliance_nat"
FAMILY: Final = "inet"
LEGACY_FAMILY: Final = "ip"  # the table's family before IPv6: removed when found
PRIORITY: Final = "raw + 10"
MOVED_MARK: Final = 0x4D56
SETS: Final = {False: "moved", True: "moved6"}  # v6 -> the set of moved flows of that family


def _is_v6(addr: str) -> bool:
    return ":" in addr


@dataclass(frozen=True, slots=True)
class ServiceNat:
    """One service's kernel NAT in one family: ``vip``, ``active`` and every
    backend's address are all IPv4 or all IPv6 (a dual-stack service is two of these)."""

    vip: str
    port: int
    active: tuple[str, int]              # (address, port) the client rule sends clients to
    backends: tuple[tuple[str, int], ...]  # every backend's (address, port)

    @property
    def v6(self) -> bool:
        return _is_v6(self.vip)


def _nat_rules(services: list[ServiceNat]) -> list[str]:
    lines: list[str] = []
    for s in services:
        v6 = s.v6
        ip = "ip6" if v6 else "ip"
        for addr in (s.active[0], *(a for a, _ in s.backends)):
            if _is_v6(addr) != v6:
                raise ValueError(f"service {s.vip}:{s.port}: backend {addr} is not of the VIP's family")
        for addr, port in s.backends:
            snat = f"{ip} saddr set {s.vip}" + (f" tcp sport set {s.port}" if port != s.port else "")
            lines.append(f'    {ip} saddr {addr} tcp sport {port} fib daddr type != local {snat} comment "return path"')
        addr, port = s.active  # the client rule (see the module's doc; its comment is its older name)
        dnat = f"{ip} daddr set {addr}" + (f" tcp dport set {port}" if port != s.port else "")
        lines.append(f'    {ip} daddr {s.vip} tcp dport {s.port} {dnat} comment "fail-open fallback"')
    return lines


def ruleset(services: list[ServiceNat]) -> str:
    lines = [f"table {LEGACY_FAMILY} {TABLE} {{}}", f"delete table {LEGACY_FAMILY} {TABLE}",
             f"table {FAMILY} {TABLE} {{}}", f"delete table {FAMILY} {TABLE}", f"table {FAMILY} {TABLE} {{",
             f"  set {SETS[False]} {{ type ipv4_addr . inet_service . ipv4_addr . inet_service; }}",
             f"  set {SETS[True]} {{ type ipv6_addr . inet_service . ipv6_addr . inet_service; }}",
             "  chain markmoved {",
             "    type filter hook prerouting priority raw - 10; policy accept;",
             (f"    ip saddr . tcp sport . ip daddr . tcp dport @{SETS[False]} meta mark set {MOVED_MARK:#x}"
              ' comment "moved"'),
             (f"    ip6 saddr . tcp sport . ip6 daddr . tcp dport @{SETS[True]} meta mark set {MOVED_MARK:#x}"
              ' comment "moved"'),
             "  }",
             "  chain prerouting {",
             f"    type filter hook prerouting priority {PRIORITY}; policy accept;",
             *_nat_rules(services),
             "  }", "}"]
    return "\n".join(lines) + "\n"


def repoint(services: list[ServiceNat]) -> None:
    """Rewrite the NAT rules (the active backend changed), leaving the sets alone."""
    rules = _nat_rules(services)
    nftables.run(f"flush chain {FAMILY} {TABLE} prerouting\n"
                 + "".join(f"add rule {FAMILY} {TABLE} prerouting {r.strip()}\n" for r in rules))


Flow = tuple[str, int, str, int]  # backend address, backend port, client address, client port (one family)

_ELEMENT = re.compile(r"(?<![\w:.])([0-9A-Fa-f:.]+) \. (\d+) \. ([0-9A-Fa-f:.]+) \. (\d+)")


def _addr(a: str) -> str:
    """``a`` as nft prints it (IPv4 dotted, IPv6 compressed, as ``inet_ntop``)."""
    family = socket.AF_INET6 if isinstance(a, str) and ":" in a else socket.AF_INET
    try:  # C calls: a tenth of ipaddress's cost, which was half of a 500-flow update
        return socket.inet_ntop(family, socket.inet_pton(family, a))
    except (OSError, TypeError):
        raise ValueError(f"not an IP address: {a!r}") from None


def _port(p: int) -> int:
    if not 0 <= int(p) <= 0xFFFF:
        raise ValueError(f"not a port: {p!r}")
    return int(p)


def _flow(f: Flow) -> Flow:
    """``f`` in the form nft prints it (so bookkeeping and kernel agree), validated:
    anything else would be nft syntax in the script and fail the whole batch."""
    b, bp, c, cp = f
    flow = _addr(b), _port(bp), _addr(c), _port(cp)
    if _is_v6(flow[0]) != _is_v6(flow[2]):
        raise ValueError(f"a flow of two families: {f!r}")
    return flow


def _elements(flows: list[Flow]) -> str:
    return ", ".join(f"{b} . {bp} . {c} . {cp}" for b, bp, c, cp in flows)


def _element_commands(verb: str, flows: list[Flow]) -> str:
    """``add``/``delete element`` commands for ``flows``, one per family's set (one script: one transaction)."""
    out = ""
    for v6 in (False, True):
        these = [f for f in flows if _is_v6(f[0]) == v6]
        if these:
            out += f"{verb} element {FAMILY} {TABLE} {SETS[v6]} {{ {_elements(these)} }}\n"
    return out


def parse_elements(listing: str) -> set[Flow]:
    """The flows in ``nft list set inet appliance_nat moved`` (or ``moved6``) output."""
    flows: set[Flow] = set()
    for b, bp, c, cp in _ELEMENT.findall(listing):
        try:
            flows.add(_flow((b, int(bp), c, int(cp))))
        except ValueError:
            continue  # not an element (a type line, say)
    return flows


class MovedSet:
    """The flows in the kernel's ``moved`` and ``moved6`` sets, kept by the process that fills them.

    One owner (the event loop), like the libnftables context it uses.
    """

    def __init__(self) -> None:
        self._present: set[Flow] = set()

    @property
    def flows(self) -> frozenset[Flow]:
        return frozenset(self._present)

    def __len__(self) -> int:
        return len(self._present)

    def reset(self) -> None:
        """The sets are empty (a fresh table) or gone."""
        self._present.clear()

    def sync(self) -> None:
        """Re-read the sets from the kernel (empty when the table is gone)."""
        try:  # one command a run: nft 1.0.6 fails the second of two ``list set`` in one script
            listing = "".join(nftables.run(f"list set {FAMILY} {TABLE} {name}\n") for name in SETS.values())
        except NftError:
            if _table_present():
                raise
            listing = ""
        self._present = parse_elements(listing)

    def add(self, flows: list[Flow]) -> None:
        """Add the flows not yet present, in one transaction."""
        new = [f for f in dict.fromkeys(map(_flow, flows)) if f not in self._present]
        if new:
            nftables.run(_element_commands("add", new))
            self._present.update(new)

    def delete(self, flows: list[Flow]) -> None:
        """Delete the flows that are present, in one transaction; absent ones are no error."""
        for attempt in (1, 2):
            gone = [f for f in dict.fromkeys(map(_flow, flows)) if f in self._present]
            if not gone:
                return
            try:
                nftables.run(_element_commands("delete", gone))
            except NftError:
                if attempt == 2:
                    raise
                self.sync()  # someone else changed the set: believe the kernel, retry once
                continue
            self._present.difference_update(gone)
            return


moved = MovedSet()  # the process's view of the kernel's sets


def add_moved(flows: list[Flow]) -> None:
    moved.add(flows)


def del_moved(flows: list[Flow]) -> None:
    moved.delete(flows)


def install(services: list[ServiceNat]) -> None:
    """Replace the table with one for ``services`` (atomically); its sets start empty."""
    nftables.run(ruleset(services))
    moved.reset()


def _tables() -> set[tuple[str, str]]:
    """(family, name) of every table."""
    out = set()
    for line in nftables.run("list tables\n").splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "table":
            out.add((words[1], words[2]))
    return out


def _table_present() -> bool:
    return (FAMILY, TABLE) in _tables()


def remove() -> bool:
    """Delete the table (and an older appliance's ``ip`` one); True when there was one."""
    present = [f for f in (FAMILY, LEGACY_FAMILY) if (f, TABLE) in _tables()]
    if present:
        nftables.run("".join(f"delete table {f} {TABLE}\n" for f in present))
    moved.reset()
    return bool(present)
