"""The agent requests the gateway's resume mode uses (phase 2), on real sockets
in the ``rp-*`` namespaces: the application's reports, a two-phase passive
export by address that is rolled back (the owner carries on), then one that
is finished (the owner's copy is disconnected silently and its address pair
is free again), as ``appliance.resume`` drives them."""

from __future__ import annotations

import base64
import socket
import sys
import threading
from pathlib import Path

from appliance.agent import protocol as proto
from appliance.agent import sdk as agent_sdk
from appliance.lab import netns
from appliance.agent.server import established_pairs
from appliance.lab.repair_topology import SERVICE_ADDR, Topology

from .helpers import Capture, check_capture
from .test_agent import KEY, Proc, agents, in_client, procs  # noqa: F401  (fixtures)

OWNER = r"""
import sys, socket
sys.path.insert(0, sys.argv[2])
from appliance.agent import sdk as agent_sdk
lst = socket.socket(); lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lst.bind(("203.0.113.10", 7005)); lst.listen()
print("listening", flush=True)
c, _ = lst.accept()
agent_sdk.report(c, b"state-1", in_offset=0, agent=sys.argv[1])
print("reported", flush=True)
while True:
    try:
        data = c.recv(100)
    except OSError as exc:
        outcome = agent_sdk.taken(c, exc, timeout=20)
        print("outcome", outcome, exc.errno, flush=True)
        if outcome == "back":
            continue
        break
    if not data:
        print("eof", flush=True)
        break
    c.sendall(data.upper())
"""


def test_report_rollback_then_finish(topo: Topology, agents: dict, procs: list[Proc], tmp_path: Path) -> None:
    root = str(Path(__file__).resolve().parents[2])
    owner = Proc(topo.ns("a"), [sys.executable, "-c", OWNER, agents["a"]["socket"], root])
    procs.append(owner)
    owner.wait_for("listening")
    cli = topo.socket("c")
    cli.settimeout(10)
    cli.connect((SERVICE_ADDR, 7005))
    cport = cli.getsockname()[1]
    local, remote = f"{SERVICE_ADDR}:7005", f"192.0.2.10:{cport}"
    pair = {"local": local, "remote": remote}
    a, b = agents["a"]["addr"], agents["b"]["addr"]
    pcap = tmp_path / "client.pcap"
    cap = Capture(topo.ns("c"), pcap, "tcp port 7005")
    got: list[agent_sdk.Resumed] = []
    waiter = threading.Thread(target=lambda: got.append(agent_sdk.accept_resumed(agent=agents["b"]["socket"],
                                                                                 timeout=30)))
    try:
        owner.wait_for("reported")
        (rep,) = in_client(topo, lambda: proto.request(a, "reports", {}, KEY))["reports"]
        assert (rep["local"], rep["remote"], rep["in_offset"]) == (local, remote, 0)
        assert base64.b64decode(rep["app_state"]) == b"state-1"
        cli.sendall(b"one")
        assert cli.recv(3) == b"ONE"
        waiter.start()

        # 1. a move that fails after the export: released at B, rolled back at A
        topo.hold()
        topo.place("b")
        reply = in_client(topo, lambda: proto.request(a, "export", {**pair, "to": f"{topo.addr('b')}:7400",
                                                                   "activate": False}, KEY))
        assert reply["active"] is False and reply["in_offset"] == 3
        in_client(topo, lambda: proto.request(b, "release", {"handle": reply["handle"]}, KEY))
        back = in_client(topo, lambda: proto.request(a, "rollback", pair, KEY))
        assert back["rollback"] is True
        topo.place("a")
        topo.route_to("a")
        cli.sendall(b"two")
        assert cli.recv(3) == b"TWO"                # the owner carries on (its blocked recv never noticed)
        # rollback refuses a socket that is not in repair mode
        try:
            in_client(topo, lambda: proto.request(a, "rollback", pair, KEY))
            raise AssertionError("rollback of a live socket was accepted")
        except proto.AgentError as exc:
            assert "not in repair mode" in str(exc)

        # 2. the move goes through: B activates, A's copy is disconnected silently
        mark = len(owner.lines)
        topo.hold()
        topo.place("b")
        reply = in_client(topo, lambda: proto.request(a, "export", {**pair, "to": f"{topo.addr('b')}:7400",
                                                                   "activate": False}, KEY))
        # the destination knows the state at once, before its application reports anything
        (brep,) = in_client(topo, lambda: proto.request(b, "reports", {}, KEY))["reports"]
        assert (brep["local"], brep["remote"], brep["in_offset"]) == (local, remote, 6)
        assert base64.b64decode(brep["app_state"]) == b"state-1"
        topo.route_to("b")
        in_client(topo, lambda: proto.request(b, "activate", {"handle": reply["handle"]}, KEY))
        fin = in_client(topo, lambda: proto.request(a, "finish", pair, KEY))
        assert fin["finish"] is True
        assert "outcome moved" in owner.wait_for("outcome", after=mark)
        assert (local, remote) not in netns.call_in(topo.ns("a"), established_pairs)   # the pair is free
        waiter.join(20)
        (r,) = got
        assert r.app_state == b"state-1" and r.in_offset == 6     # the reported state travelled with it
        cli.sendall(b"three")
        r.sock.settimeout(5)
        assert r.sock.recv(5) == b"three"
        r.sock.sendall(b"FROM B")
        assert cli.recv(6) == b"FROM B"
        r.sock.close()
        cli.recv(1)                                   # B's FIN: the end of the stream
    finally:
        cap.stop()
        cli.close()
    rep = check_capture(pcap, (SERVICE_ADDR, 7005), expect_fin=True)
    assert rep.rst == [] and rep.gaps == [] and rep.ts_back == [], rep.problems


def test_report_refuses_bad_input(topo: Topology, agents: dict) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(agents["a"]["socket"])
    proto.send_frame(s, proto.make("report", {"local": "203.0.113.10:7005", "remote": "192.0.2.10:1",
                                              "in_offset": -4}, None))
    raw, _ = proto.recv_frame(s)
    s.close()
    assert raw["body"]["ok"] is False and "in_offset" in raw["body"]["error"]
