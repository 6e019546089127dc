"""The agents carry IPv6 endpoints, connections in closing states and listeners
(root: the rp-* namespaces, two agents)."""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

import pytest

from appliance.agent import protocol as proto
from appliance.agent import sdk as agent_sdk
from appliance.lab.repair_topology import CLIENT_ADDR6, SERVICE_ADDR, SERVICE_ADDR6, Topology

from .test_agent import KEY, Proc, agents, in_client, procs  # noqa: F401  (fixtures)
from .test_states import read_to_eof

OWNER6 = r"""
import os, socket, time
lst = socket.socket(socket.AF_INET6); lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lst.bind(("2001:db8:113::10", 7002)); lst.listen()
print("listening", os.getpid(), flush=True)
c, _ = lst.accept()
print("fd", c.fileno(), flush=True)
while True:
    data = c.recv(100)
    if not data:
        print("eof", flush=True)     # the peer closed: CLOSE_WAIT, the socket kept open
        break
    c.sendall(data.upper())
time.sleep(3600)
"""


def test_ipv6_close_wait_export_by_address(topo: Topology, agents: dict, procs: list[Proc]) -> None:
    """The gateway's way (export by address, ``[IPv6]:port``, found in /proc/net/tcp6) of an
    IPv6 connection in CLOSE_WAIT: the application on B gets it with its state, reads EOF,
    answers and closes; the client sees the answer and EOF."""
    owner = Proc(topo.ns("a"), [sys.executable, "-c", OWNER6])
    procs.append(owner)
    owner.wait_for("listening")
    cli = topo.socket("c", True)
    cli.settimeout(10)
    cli.connect((SERVICE_ADDR6, 7002))
    owner.wait_for("fd ")
    cport = cli.getsockname()[1]
    try:
        cli.sendall(b"abc")
        assert cli.recv(3) == b"ABC"
        cli.shutdown(socket.SHUT_WR)
        owner.wait_for("eof")
        got: list[agent_sdk.Resumed] = []
        waiter = threading.Thread(target=lambda: got.append(agent_sdk.accept_resumed(agent=agents["b"]["socket"],
                                                                                     timeout=20)))
        waiter.start()
        topo.hold()
        topo.place("b")
        reply = in_client(topo, lambda: proto.request(agents["a"]["addr"], "export", {
            "local": f"[{SERVICE_ADDR6}]:7002", "remote": f"[{CLIENT_ADDR6}]:{cport}",
            "to": f"{topo.addr('b')}:7400", "activate": False}, KEY))
        assert reply["ok"] and reply["state"] == "CLOSE_WAIT" and reply["in_offset"] == 3
        topo.route_to("b")
        in_client(topo, lambda: proto.request(agents["b"]["addr"], "activate", {"handle": reply["handle"]}, KEY))
        waiter.join(20)
        assert got, "no resumed connection"
        r = got[0]
        assert (r.kind, r.state, r.local, r.remote) == ("connection", "CLOSE_WAIT", f"[{SERVICE_ADDR6}]:7002",
                                                        f"[{CLIENT_ADDR6}]:{cport}")
        r.sock.settimeout(10)
        assert r.sock.recv(10) == b""
        r.sock.sendall(b"bye")
        r.sock.close()
        assert read_to_eof(cli) == b"bye"
    finally:
        cli.close()


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_listener_handed_over_by_the_sdk(topo: Topology, agents: dict, family: str) -> None:
    """An application hands its listener to B (SockMi): B's application gets the listener
    (listening, same address and port) and, after it, the connection that waited in the
    accept queue; a client connecting afterwards reaches B."""
    v6 = family == "ipv6"
    svc = SERVICE_ADDR6 if v6 else SERVICE_ADDR
    lst = topo.socket("a", v6)
    lst.bind((svc, 7005))
    lst.listen(9)
    early = topo.socket("c", v6)
    early.settimeout(10)
    early.connect((svc, 7005))
    early.sendall(b"waiting in the queue")
    got: list[agent_sdk.Resumed] = []

    def accept_two() -> None:
        for _ in range(2):
            got.append(agent_sdk.accept_resumed(agent=agents["b"]["socket"], timeout=20))

    waiter = threading.Thread(target=accept_two)
    waiter.start()
    try:
        topo.hold()
        topo.place("b")
        reply = agent_sdk.export(lst, to=f"{topo.addr('b')}:7400", agent=agents["a"]["socket"])
        assert reply["kind"] == "listen" and [c["ok"] for c in reply["children"]] == [True]
        topo.route_to("b")
        waiter.join(20)
        assert [r.kind for r in got] == ["listen", "connection"]
        new_lst, child = got[0].sock, got[1].sock
        assert new_lst.getsockname()[:2] == (svc, 7005) and got[0].local.endswith(":7005")
        child.settimeout(10)
        assert child.recv(100) == b"waiting in the queue"
        child.sendall(b"from b")
        assert early.recv(100) == b"from b"
        late = topo.socket("c", v6)
        late.settimeout(10)
        late.connect((svc, 7005))
        new_lst.settimeout(10)
        acc, _ = new_lst.accept()
        acc.sendall(b"late, on b")
        acc.close()
        assert read_to_eof(late) == b"late, on b"
        late.close()
    finally:
        early.close()
        for r in got:
            r.sock.close()
