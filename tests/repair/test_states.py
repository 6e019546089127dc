"""Endpoints passed in every state, over IPv4 and IPv6 (root: the rp-* namespaces).

A scripted client in rp-c talks to the service address; the server end is
taken on rp-a (the client's segments held at rp-g), re-created on rp-b and
activated.  Each test asserts the exact bytes and the FIN/EOF the client
sees after the move, and the client-side capture shows no RST.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.lab import netns
from appliance.lab.repair_topology import CLIENT_ADDR, CLIENT_ADDR6, SERVICE_ADDR, SERVICE_ADDR6, Topology, move
from checkpoint.io import tcp_repair as repair
from checkpoint.repair_ici import Ici, socket_doc_from_dict

from .helpers import Capture, Client, ServerApp, check_capture, sha256, stream

PORT = 7000


@pytest.fixture(params=["ipv4", "ipv6"])
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def svc(family: str) -> str:
    return SERVICE_ADDR6 if family == "ipv6" else SERVICE_ADDR


def state(sock: socket.socket) -> str:
    return repair.TCP_STATES[repair.tcp_info(sock)["state"]]


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def wait_state(sock: socket.socket, want: str, timeout: float = 10.0) -> None:
    wait_for(lambda: state(sock) == want, f"state {want} (is {state(sock)})", timeout)


def read_to_eof(sock: socket.socket) -> bytes:
    out = bytearray()
    while True:
        b = sock.recv(65536)
        if not b:
            return bytes(out)
        out += b


@pytest.fixture
def conn(topo: Topology, family: str, tmp_path: Path) -> Iterator[tuple[socket.socket, socket.socket, Capture]]:
    """(client in rp-c, accepted server end in rp-a, capture on the client) over ``family``."""
    v6 = family == "ipv6"
    lst = topo.socket("a", v6)
    lst.bind((svc(family), PORT))
    lst.listen()
    cap = Capture(topo.ns("c"), tmp_path / "client.pcap", f"tcp port {PORT}")
    cli = topo.socket("c", v6)
    cli.settimeout(10)
    cli.connect((svc(family), PORT))
    srv, _ = lst.accept()
    lst.close()
    cli.sendall(b"hello")
    assert srv.recv(5) == b"hello"
    try:
        yield cli, srv, cap
    finally:
        cap.stop()
        cli.close()
        srv.close()


def move_to_b(topo: Topology, srv: socket.socket) -> tuple[repair.RepairedSocket, Ici]:
    """hold, get, (document crosses as JSON), create on b, release, activate."""
    topo.hold()
    ici = repair.get(srv)
    doc = json.dumps(ici.to_dict())
    srv.close()                       # repair mode: silent
    topo.place("b")
    new = netns.call_in(topo.ns("b"), lambda: repair.create(Ici.from_dict(json.loads(doc))))
    topo.route_to("b")
    repair.activate(new)
    new.settimeout(10)
    return new, ici


def no_rst(cap: Capture, family: str) -> None:
    cap.stop()
    rep = check_capture(cap.path, (svc(family), PORT), expect_fin=True)
    assert rep.rst == [], rep.rst
    assert rep.gaps == [] and rep.ack_back == [] and rep.ts_back == [], rep.problems


# --- IPv6 connected ------------------------------------------------------------------

def test_ipv6_move_while_streaming_both_ways(topo: Topology, tmp_path: Path) -> None:
    """A live IPv6 connection moved a→b→a mid-transfer: every byte both ways, in order, no RST."""
    lst = topo.socket("a", True)
    lst.bind((SERVICE_ADDR6, PORT))
    lst.listen()
    cli = topo.socket("c", True)
    cli.settimeout(10)
    cli.connect((SERVICE_ADDR6, PORT))
    srv, peer = lst.accept()
    lst.close()
    assert peer[0] == CLIENT_ADDR6
    cap = Capture(topo.ns("c"), tmp_path / "c.pcap", f"tcp port {PORT}")
    out, inp = stream(11, 4 << 20), stream(12, 2 << 20)
    try:
        app = ServerApp(srv, out, len(inp)).start()
        client = Client(cli, inp, len(out), 4 << 20).start()
        fams = []
        for hop in ("b", "a"):
            time.sleep(0.3)
            sock = app.pause()
            new, t = move(topo, sock, hop)
            fams.append(new.family)
            app.resume(new)
        app.thread.join(30)
        client.join(30)
    finally:
        cap.stop()
        cli.close()
    assert fams == [socket.AF_INET6, socket.AF_INET6]
    assert app.error is None and not client.errors, (app.error, client.errors)
    assert sha256(bytes(client.buf)) == sha256(out)
    assert app.received == len(inp) and app.hash.hexdigest() == sha256(inp)
    rep = check_capture(cap.path, (SERVICE_ADDR6, PORT), expect_fin=True)
    assert rep.problems == [], rep.problems
    assert rep.data_segments > 50


def test_create_binds_before_the_address_arrives(topo: Topology, family: str) -> None:
    """create() binds with IP_FREEBIND/IPV6_FREEBIND: the destination may re-create the
    endpoint before the service address is moved to it."""
    v6 = family == "ipv6"
    lst = topo.socket("a", v6)
    lst.bind((svc(family), PORT))
    lst.listen()
    cli = topo.socket("c", v6)
    cli.settimeout(10)
    cli.connect((svc(family), PORT))
    srv, _ = lst.accept()
    lst.close()
    topo.hold()
    ici = repair.get(srv)
    srv.close()
    new = netns.call_in(topo.ns("b"), lambda: repair.create(ici))     # svc not on b yet
    assert new.getsockname()[:2] == (svc(family), PORT)
    topo.place("b")
    topo.route_to("b")
    repair.activate(new)
    cli.sendall(b"ping")
    new.settimeout(10)
    assert new.recv(4) == b"ping"
    new.sendall(b"pong")
    assert cli.recv(4) == b"pong"
    new.close()
    cli.close()


# --- the closing states ------------------------------------------------------------------

def test_fin_wait2(topo: Topology, family: str, conn: tuple[socket.socket, socket.socket, Capture]) -> None:
    """We shut down and the peer acknowledged: after the move the peer has our bytes and
    our FIN exactly once, and we still receive its bytes and its FIN."""
    cli, srv, cap = conn
    srv.sendall(b"our last bytes")
    srv.shutdown(socket.SHUT_WR)
    assert cli.recv(100) == b"our last bytes"
    wait_state(srv, "FIN_WAIT2")
    cli.sendall(b"unread at the origin")
    wait_for(lambda: repair._ioctl(srv, repair.SIOCINQ, "SIOCINQ") == 20, "the bytes at the origin")
    new, ici = move_to_b(topo, srv)
    assert (ici.state, ici.fin, ici.peer_fin, ici.family) == ("FIN_WAIT2", "acked", False, family)
    assert ici.recv_queue == b"unread at the origin" and ici.in_offset == 5 and ici.out_offset == 14
    assert state(new) == "FIN_WAIT2"
    assert cli.recv(100) == b""                      # our FIN, once: EOF
    cli.sendall(b" and more")
    cli.shutdown(socket.SHUT_WR)
    assert read_to_eof(new) == b"unread at the origin and more"
    wait_state(new, "CLOSE")
    no_rst(cap, family)


def test_fin_wait1_fin_in_flight(topo: Topology, family: str,
                                 conn: tuple[socket.socket, socket.socket, Capture]) -> None:
    """Our FIN sent but its ACK held: restored as sent, the peer acknowledges it to the new host."""
    cli, srv, cap = conn
    topo.hold()
    srv.sendall(b"tail")
    srv.shutdown(socket.SHUT_WR)
    wait_for(lambda: repair._ioctl(srv, repair.SIOCOUTQNSD, "SIOCOUTQNSD") == 0, "the FIN sent")
    assert state(srv) == "FIN_WAIT1"
    new, ici = move_to_b(topo, srv)
    assert (ici.state, ici.fin, ici.sent_queue) == ("FIN_WAIT1", "sent", b"tail")
    assert read_to_eof(cli) == b"tail"
    wait_state(new, "FIN_WAIT2")
    cli.sendall(b"still flowing")
    cli.shutdown(socket.SHUT_WR)
    assert read_to_eof(new) == b"still flowing"
    no_rst(cap, family)


def test_fin_wait1_fin_never_sent(topo: Topology, family: str,
                                  conn: tuple[socket.socket, socket.socket, Capture]) -> None:
    """The peer's window is closed: bytes and our FIN wait unsent at the origin; the new
    host sends the bytes, then the FIN (activate)."""
    cli, srv, cap = conn
    cli.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    data = stream(21, 2 << 20)
    srv.setblocking(False)
    sent = 0
    while True:
        try:
            sent += srv.send(data[sent:sent + 65536])
        except BlockingIOError:
            break
    srv.setblocking(True)
    srv.shutdown(socket.SHUT_WR)
    time.sleep(0.2)               # let the window close (a condition we then assert)
    new, ici = move_to_b(topo, srv)
    assert (ici.state, ici.fin) == ("FIN_WAIT1", "unsent") and ici.unsent_queue, (ici.state, ici.fin)
    got = read_to_eof(cli)
    assert sha256(got) == sha256(data[:sent])
    wait_state(new, "FIN_WAIT2")
    cli.shutdown(socket.SHUT_WR)
    assert read_to_eof(new) == b""
    no_rst(cap, family)


def test_close_wait(topo: Topology, family: str, conn: tuple[socket.socket, socket.socket, Capture]) -> None:
    """The peer closed its side: the new host reads the peer's last bytes then EOF, can
    still send, and its close ends the connection."""
    cli, srv, cap = conn
    cli.sendall(b"request, then FIN")
    cli.shutdown(socket.SHUT_WR)
    wait_state(srv, "CLOSE_WAIT")
    new, ici = move_to_b(topo, srv)
    assert (ici.state, ici.fin, ici.peer_fin) == ("CLOSE_WAIT", "none", True)
    assert ici.recv_queue == b"request, then FIN"
    assert state(new) == "CLOSE_WAIT"
    assert read_to_eof(new) == b"request, then FIN"
    new.sendall(b"the response")
    new.close()
    assert read_to_eof(cli) == b"the response"
    no_rst(cap, family)


def test_last_ack(topo: Topology, family: str, conn: tuple[socket.socket, socket.socket, Capture]) -> None:
    """Both FINs, ours not acknowledged yet: the peer gets our bytes and FIN, the new host's
    socket completes the close."""
    cli, srv, cap = conn
    cli.shutdown(socket.SHUT_WR)
    wait_state(srv, "CLOSE_WAIT")
    topo.hold()
    srv.sendall(b"last words")
    srv.shutdown(socket.SHUT_WR)
    wait_state(srv, "LAST_ACK")
    new, ici = move_to_b(topo, srv)
    assert (ici.state, ici.fin, ici.peer_fin) == ("LAST_ACK", "sent", True)
    assert read_to_eof(cli) == b"last words"
    assert read_to_eof(new) == b""
    wait_state(new, "CLOSE")
    no_rst(cap, family)


def test_closing(topo: Topology, family: str, conn: tuple[socket.socket, socket.socket, Capture]) -> None:
    """Simultaneous close: each FIN crossed the other (the ACKs held)."""
    cli, srv, cap = conn
    v6 = family == "ipv6"
    client = f"{CLIENT_ADDR6}/128" if v6 else f"{CLIENT_ADDR}/32"
    af = ["-6"] if v6 else []
    netns.ip(*af, "route", "replace", "blackhole", client, ns=topo.ns("g"))   # our FIN lost on the way
    srv.sendall(b"crossing")
    srv.shutdown(socket.SHUT_WR)
    cli.shutdown(socket.SHUT_WR)                                            # the peer's FIN arrives
    wait_state(srv, "CLOSING")
    topo.hold()
    netns.ip(*af, "route", "del", "blackhole", client, ns=topo.ns("g"))
    new, ici = move_to_b(topo, srv)
    assert (ici.state, ici.fin, ici.peer_fin) == ("CLOSING", "sent", True)
    assert read_to_eof(cli) == b"crossing"
    assert read_to_eof(new) == b""
    wait_state(new, "CLOSE")
    no_rst(cap, family)


# --- listening and bound sockets -------------------------------------------------------

def test_listener_moves_with_its_accept_queue(topo: Topology, family: str, tmp_path: Path) -> None:
    """A listener handed to another host: same address, port, backlog and options; a
    connection completed but not accepted at the origin moves too; a client that connects
    afterwards reaches the new host."""
    v6 = family == "ipv6"
    lst = topo.socket("a", v6)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if v6:
        lst.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    lst.bind((svc(family), 7100))
    lst.listen(17)
    cap = Capture(topo.ns("c"), tmp_path / "l.pcap", "tcp port 7100")
    early = topo.socket("c", v6)
    early.settimeout(10)
    early.connect((svc(family), 7100))                 # completed, never accepted at a
    early.sendall(b"queued before the move")
    wait_for(lambda: struct.unpack_from("=I", lst.getsockopt(socket.IPPROTO_TCP, repair.TCP_INFO, 104), 24)[0] == 1,
             "the connection in the accept queue")
    topo.hold()
    doc, children = repair.get_socket(lst)
    assert (doc.kind, doc.local_addr, doc.local_port, doc.backlog, doc.family) == ("listen", svc(family), 7100, 17,
                                                                                   family)
    assert doc.options["SO_REUSEADDR"] == 1 and doc.options["TCP_NODELAY"] == 1
    assert len(children) == 1
    child_ici = repair.get(children[0])
    children[0].close()
    lst.close()
    wire = json.dumps(doc.to_dict())
    new_lst = netns.call_in(topo.ns("b"), lambda: repair.create_socket(socket_doc_from_dict(json.loads(wire))))
    new_child = netns.call_in(topo.ns("b"), lambda: repair.create(child_ici))
    topo.place("b")
    topo.route_to("b")
    repair.activate(new_lst)
    repair.activate(new_child)
    try:
        raw = new_lst.getsockopt(socket.IPPROTO_TCP, repair.TCP_INFO, 104)
        assert repair.TCP_STATES[raw[0]] == "LISTEN" and struct.unpack_from("=I", raw, 28)[0] == 17
        assert new_lst.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        if v6:
            assert new_lst.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        new_child.settimeout(10)
        assert new_child.recv(100) == b"queued before the move"
        new_child.sendall(b"served by b")
        assert early.recv(100) == b"served by b"
        late = topo.socket("c", v6)
        late.settimeout(10)
        late.connect((svc(family), 7100))
        new_lst.settimeout(10)
        acc, peer = new_lst.accept()
        assert peer[1] == late.getsockname()[1]
        assert acc.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1      # inherited
        late.sendall(b"after")
        assert acc.recv(5) == b"after"
        acc.sendall(b"hi from b")
        acc.close()
        assert read_to_eof(late) == b"hi from b"
        late.close()
        new_child.close()
        assert read_to_eof(early) == b""
    finally:
        cap.stop()
        early.close()
        new_lst.close()
    rep = check_capture(cap.path, (svc(family), 7100), expect_fin=True)
    assert rep.rst == [], rep.rst


def test_bound_socket(topo: Topology, family: str) -> None:
    """A bound socket (neither listening nor connected) re-made on another host before the
    address is there; the application listens on it there and a client reaches it."""
    v6 = family == "ipv6"
    s = topo.socket("a", v6)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    s.bind((svc(family), 7200))
    doc, children = repair.get_socket(s)
    assert (doc.kind, doc.local_port, children) == ("bound", 7200, [])
    assert doc.options["SO_KEEPALIVE"] == 1
    s.close()
    new = netns.call_in(topo.ns("b"), lambda: repair.create_socket(doc))   # FREEBIND: svc not on b yet
    try:
        assert new.getsockname()[:2] == (svc(family), 7200)
        assert repair.TCP_STATES[repair.tcp_info(new)["state"]] == "CLOSE"
        assert new.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        topo.place("b")
        topo.route_to("b")
        new.listen()
        cli = topo.socket("c", v6)
        cli.settimeout(10)
        cli.connect((svc(family), 7200))
        new.settimeout(10)
        acc, _ = new.accept()
        acc.sendall(b"bound on b")
        acc.close()
        assert read_to_eof(cli) == b"bound on b"
        cli.close()
    finally:
        new.close()


def test_listening_and_bound_refused_by_get(topo: Topology, family: str) -> None:
    s = topo.socket("a", family == "ipv6")
    s.bind((svc(family), 7300))
    s.listen()
    with pytest.raises(repair.IciError) as exc:
        repair.get(s)
    assert exc.value.field == "state" and "get_socket" in str(exc.value)
    s.close()
