"""A small namespace topology for moving TCP endpoints between hosts (tests, benchmark).

Theory of operation
-------------------
tcpcp's section 2.2 demonstrates passing with a static route on a gateway:
the service address lives on one server, the gateway routes it there, and
a move re-points the route.  This module builds exactly that, with its own
namespaces (named ``rp-<pid>-<host>``, shown below without the pid; never
the lab's ``lab-*``)::

    rp-c  192.0.2.10 ── c0 192.0.2.1   rp-g   a0 198.51.100.1 ── 198.51.100.2  rp-a
                                             b0 198.51.100.5 ── 198.51.100.6  rp-b
                                             d0 198.51.100.9 ── 198.51.100.10 rp-d

Every link is dual-stack (documentation prefixes only, ``nodad``): the
client ``2001:db8:2::10`` behind ``2001:db8:2::1``, server host ``x``'s
link ``2001:db8:100:N::1`` (router) ↔ ``2001:db8:100:N::2`` (host) with N
1, 5, 9 for a, b, d (the mirror of the /30s), and the IPv6 service
address ``2001:db8:113::10/128``.

The service address (``203.0.113.10/32`` and ``2001:db8:113::10/128``) sits on the loopback of the host
that owns the connection; ``rp-g`` routes it there.  A move is:

1. *hold*: ``rp-g`` blackholes the service address (the client's segments
   are dropped, it retransmits later: the gateway's hold, the cheap way);
2. ``get()`` on the origin, which then closes its isolated socket;
3. the address moves from the origin's loopback to the destination's;
4. ``create()`` on the destination;
5. *release*: ``rp-g`` routes the address to the destination;
6. ``activate()``.

Every veth is created from inside a namespace (``ip -n``), so nothing is
ever named in the host's namespace; :meth:`Topology.down` removes the
namespaces (and with them every veth and process in them).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from . import netns

SERVICE_ADDR = "203.0.113.10"
CLIENT_ADDR = "192.0.2.10"
GATEWAY_CLIENT_ADDR = "192.0.2.1"
SERVICE_ADDR6 = "2001:db8:113::10"
CLIENT_ADDR6 = "2001:db8:2::10"
GATEWAY_CLIENT_ADDR6 = "2001:db8:2::1"
SERVER_LINKS6 = {"a": ("2001:db8:100:1::1", "2001:db8:100:1::2"),
                 "b": ("2001:db8:100:5::1", "2001:db8:100:5::2"),
                 "d": ("2001:db8:100:9::1", "2001:db8:100:9::2")}
# server host name -> (gateway side, host side) of its /30
SERVER_LINKS = {"a": ("198.51.100.1", "198.51.100.2"),
                "b": ("198.51.100.5", "198.51.100.6"),
                "d": ("198.51.100.9", "198.51.100.10")}


def default_prefix() -> str:
    """``rp-<pid>-``: namespace names are the only names that are global, so
    each process gets its own and test runs (or a test run and the
    benchmark) never collide; everything else lives inside them."""
    return f"rp-{os.getpid()}-"


def reap_stale() -> list[str]:
    """Remove ``rp-<pid>-*`` namespaces whose process is gone (a killed run)."""
    gone = []
    for name in netns.listing():
        parts = name.split("-")
        if len(parts) == 3 and parts[0] == "rp" and parts[1].isdigit() and not os.path.exists(f"/proc/{parts[1]}"):
            netns.delete(name)
            gone.append(name)
    return gone


@dataclass
class Topology:
    prefix: str = field(default_factory=default_prefix)
    servers: tuple[str, ...] = ("a", "b")
    owner: str | None = None                  # server host holding the service address
    made: list[str] = field(default_factory=list)

    def ns(self, host: str) -> str:
        return self.prefix + host

    def addr(self, host: str, v6: bool = False) -> str:
        """A host's own address (the agents' channel runs over these)."""
        if v6:
            return CLIENT_ADDR6 if host == "c" else SERVER_LINKS6[host][1]
        return CLIENT_ADDR if host == "c" else SERVER_LINKS[host][1]

    # --- building ------------------------------------------------------------------

    def up(self, owner: str = "a") -> Topology:
        self.down()
        try:
            for host in ("g", "c", *self.servers):
                netns.add(self.ns(host))
                self.made.append(self.ns(host))
                netns.call_in(self.ns(host), _no_dad)
            g = self.ns("g")
            netns.ip("link", "add", "c0", "type", "veth", "peer", "name", "eth0", "netns", self.ns("c"), ns=g)
            netns.ip("addr", "add", f"{GATEWAY_CLIENT_ADDR}/24", "dev", "c0", ns=g)
            netns.ip("link", "set", "c0", "up", ns=g)
            c = self.ns("c")
            netns.ip("addr", "add", f"{CLIENT_ADDR}/24", "dev", "eth0", ns=c)
            netns.ip("link", "set", "eth0", "up", ns=c)
            netns.ip("route", "add", "default", "via", GATEWAY_CLIENT_ADDR, ns=c)
            netns.ip("addr", "add", f"{GATEWAY_CLIENT_ADDR6}/64", "dev", "c0", "nodad", ns=g)
            netns.ip("addr", "add", f"{CLIENT_ADDR6}/64", "dev", "eth0", "nodad", ns=c)
            netns.ip("-6", "route", "add", "default", "via", GATEWAY_CLIENT_ADDR6, ns=c)
            for host in self.servers:
                gw_side, host_side = SERVER_LINKS[host]
                h = self.ns(host)
                netns.ip("link", "add", f"{host}0", "type", "veth", "peer", "name", "eth0", "netns", h, ns=g)
                netns.ip("addr", "add", f"{gw_side}/30", "dev", f"{host}0", ns=g)
                netns.ip("link", "set", f"{host}0", "up", ns=g)
                netns.ip("addr", "add", f"{host_side}/30", "dev", "eth0", ns=h)
                netns.ip("link", "set", "eth0", "up", ns=h)
                netns.ip("route", "add", "default", "via", gw_side, ns=h)
                gw6, host6 = SERVER_LINKS6[host]
                netns.ip("addr", "add", f"{gw6}/64", "dev", f"{host}0", "nodad", ns=g)
                netns.ip("addr", "add", f"{host6}/64", "dev", "eth0", "nodad", ns=h)
                netns.ip("-6", "route", "add", "default", "via", gw6, ns=h)
            netns.call_in(g, _enable_forwarding)
            self.place(owner)
            self.route_to(owner)
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        for host in ("c", "g", "a", "b", "d"):
            netns.delete(self.ns(host))
        self.made.clear()
        self.owner = None

    # --- moving the service address ------------------------------------------------------

    def place(self, host: str) -> None:
        """The service address on ``host``'s loopback (and nowhere else)."""
        for other in self.servers:
            if other != host:
                netns.ip("addr", "del", f"{SERVICE_ADDR}/32", "dev", "lo", ns=self.ns(other), check=False)
                netns.ip("addr", "del", f"{SERVICE_ADDR6}/128", "dev", "lo", ns=self.ns(other), check=False)
        netns.ip("addr", "replace", f"{SERVICE_ADDR}/32", "dev", "lo", ns=self.ns(host))
        netns.ip("addr", "replace", f"{SERVICE_ADDR6}/128", "dev", "lo", "nodad", ns=self.ns(host))
        self.owner = host

    def hold(self) -> None:
        """Drop the client's segments for the service at the gateway (isolation)."""
        netns.ip("route", "replace", "blackhole", f"{SERVICE_ADDR}/32", ns=self.ns("g"))
        netns.ip("-6", "route", "replace", "blackhole", f"{SERVICE_ADDR6}/128", ns=self.ns("g"))

    def route_to(self, host: str) -> None:
        """Forward the service address to ``host`` (release)."""
        netns.ip("route", "replace", f"{SERVICE_ADDR}/32", "via", SERVER_LINKS[host][1], ns=self.ns("g"))
        netns.ip("-6", "route", "replace", f"{SERVICE_ADDR6}/128", "via", SERVER_LINKS6[host][1], ns=self.ns("g"))

    def socket(self, host: str, v6: bool = False) -> socket.socket:
        return netns.socket_in(self.ns(host), socket.AF_INET6 if v6 else socket.AF_INET)


def _no_dad() -> None:
    """No duplicate address detection on the links made after this (call it
    inside the namespace, before its veths exist: they take ``default``).

    ``nodad`` covers the addresses we add, but not the link-local address
    the kernel gives each veth when it comes up.  That one stays tentative
    for 1-2 s (a random delay up to 1 s, then one probe and 1 s of waiting),
    and until it is valid the namespace sends no neighbour solicitation for
    a packet whose source is not on that link: the gateway forwarding the
    client's segments, or a server answering from the service address on
    its loopback.  Such packets wait in an INCOMPLETE neighbour entry (and
    are dropped after three tries), so a connection moved to a host right
    after :meth:`Topology.up` could be cut off for seconds while TCP's
    retransmission timers backed off: the IPv6 test's 10 s silence.  The
    links are point-to-point veths we number ourselves: nothing to detect.
    """
    for conf in ("all", "default"):
        with open(f"/proc/sys/net/ipv6/conf/{conf}/accept_dad", "w") as f:
            f.write("0\n")


def _enable_forwarding() -> None:
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
        f.write("1\n")
    with open("/proc/sys/net/ipv6/conf/all/forwarding", "w") as f:
        f.write("1\n")


def move(topo: Topology, sock: socket.socket, to: str, *,
         port_choice: str = "same") -> tuple[socket.socket, dict[str, float | int]]:
    """Move the connection of ``sock`` (on ``topo.owner``) to host ``to``.

    The ICI crosses as its JSON document, as it would between hosts.
    Returns the new, active socket and the phases' durations in seconds
    (``hold_to_release`` is what the client can notice).
    """
    import json
    import time

    from checkpoint.io import tcp_repair as repair

    t0 = time.perf_counter()
    topo.hold()
    t1 = time.perf_counter()
    ici = repair.get(sock)
    doc = json.dumps(ici.to_dict())
    sock.close()                       # isolated: no FIN, no RST
    t2 = time.perf_counter()
    topo.place(to)
    t3 = time.perf_counter()
    new = netns.call_in(topo.ns(to), lambda: repair.create(repair.Ici.from_dict(json.loads(doc)),
                                                           port_choice=port_choice))
    t4 = time.perf_counter()
    topo.route_to(to)
    t5 = time.perf_counter()
    repair.activate(new)
    t6 = time.perf_counter()
    return new, {"hold": t1 - t0, "get": t2 - t1, "address": t3 - t2, "create": t4 - t3,
                 "release": t5 - t4, "activate": t6 - t5, "library": (t2 - t1) + (t4 - t3) + (t6 - t5),
                 "hold_to_release": t6 - t0, "sent_queue": len(ici.sent_queue),
                 "unsent_queue": len(ici.unsent_queue), "recv_queue": len(ici.recv_queue)}
