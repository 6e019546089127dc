"""A live connection moved between namespaces with get/create/activate
while the client keeps reading and writing (tcpcp section 2)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from appliance.lab.repair_topology import SERVICE_ADDR, Topology, move
from checkpoint.io import tcp_repair as repair

from .helpers import Capture, Client, ServerApp, check_capture, sha256, stream

OUT = 6 * 1024 * 1024      # server -> client
IN = 3 * 1024 * 1024       # client -> server
RATE = 4 * 1024 * 1024     # bytes/s each way: the transfer lasts ~1.5 s


def run_moves(topo: Topology, connected: tuple[socket.socket, socket.socket], pcap: Path,
              hops: list[str]) -> tuple[Client, ServerApp, list[dict]]:
    cli_sock, srv_sock = connected
    cap = Capture(topo.ns("c"), pcap, "tcp port 7000")
    try:
        server_out, client_out = stream(1, OUT), stream(2, IN)
        app = ServerApp(srv_sock, server_out, IN).start()
        client = Client(cli_sock, client_out, OUT, RATE).start()
        timings = []
        for hop in hops:
            time.sleep(0.35)
            sock = app.pause()
            new, t = move(topo, sock, hop)
            timings.append(t)
            app.resume(new)
        app.thread.join(30)
        client.join(30)
    finally:
        cap.stop()
    assert app.error is None, app.error
    assert not client.errors, client.errors
    assert app.sent == OUT and client.sent == IN
    # nothing lost, nothing duplicated, both ways
    assert len(client.buf) == OUT
    assert sha256(bytes(client.buf)) == sha256(server_out)
    assert app.received == IN and app.hash.hexdigest() == sha256(client_out)
    return client, app, timings


def test_move_a_to_b_while_streaming_both_ways(topo: Topology, connected, pcap: Path) -> None:
    _client, _app, timings = run_moves(topo, connected, pcap, ["b"])
    rep = check_capture(pcap, (SERVICE_ADDR, 7000), expect_fin=True)
    assert rep.problems == [], rep.problems
    assert rep.data_segments > 100
    assert rep.server_bytes >= OUT
    assert timings[0]["library"] < 1.0
    # the move caught data in the kernel's queues (else it proves less)
    assert timings[0]["sent_queue"] + timings[0]["unsent_queue"] > 0, timings


def test_move_a_to_b_and_back(topo: Topology, connected, pcap: Path) -> None:
    _client, _app, timings = run_moves(topo, connected, pcap, ["b", "a"])
    rep = check_capture(pcap, (SERVICE_ADDR, 7000), expect_fin=True)
    assert rep.problems == [], rep.problems
    assert len(timings) == 2


def test_origin_socket_is_isolated_and_closes_silently(topo: Topology, connected, pcap: Path) -> None:
    """With the peer's segments held, get() leaves a silent socket: it sends
    nothing (no data, no window update), refuses writes, and close() sends no
    FIN or RST."""
    cli, srv = connected
    cap = Capture(topo.ns("c"), pcap, "tcp port 7000")
    try:
        cli.sendall(b"ping")
        assert srv.recv(4) == b"ping"
        srv.sendall(b"in flight")
        assert cli.recv(9) == b"in flight"
        cli.sendall(b"unread by the server")
        time.sleep(0.1)
        before = check_capture(pcap, (SERVICE_ADDR, 7000)).segments
        topo.hold()
        ici = repair.get(srv)
        assert repair.in_repair(srv)
        try:
            srv.send(b"must not go out")
            raise AssertionError("an isolated socket accepted a write")
        except OSError:
            pass
        cli.sendall(b"held at the gateway")     # dropped on the way: the origin never sees it
        time.sleep(0.3)
        srv.close()
        time.sleep(0.3)
    finally:
        cap.stop()
    rep = check_capture(pcap, (SERVICE_ADDR, 7000))
    assert rep.rst == [] and rep.fin_early == []
    assert rep.segments == before, "the isolated socket sent something"
    assert ici.recv_queue == b"unread by the server"
    assert ici.in_offset == 4 and ici.out_offset == 9


def test_repair_mode_alone_still_acknowledges(topo: Topology, connected, pcap: Path) -> None:
    """Kernel behaviour the design depends on: TCP_REPAIR stops the socket's
    own output but the kernel still takes in arriving segments and ACKs them
    (so get()'s ICI would go stale).  Hence the hold before get(): the
    gateway (here rp-g) must keep the peer's segments away from the origin."""
    cli, srv = connected
    cap = Capture(topo.ns("c"), pcap, "tcp port 7000")
    try:
        repair.get(srv)
        before_ack = repair.tcp_info(srv)
        cli.sendall(b"arrives anyway")
        time.sleep(0.3)
    finally:
        cap.stop()
    rep = check_capture(pcap, (SERVICE_ADDR, 7000))
    assert rep.segments >= 1, "no ACK from a repair-mode socket: isolation got stronger, revisit the hold"
    assert before_ack["state"] == 1


def test_all_three_queues_move(topo: Topology, connected, pcap: Path) -> None:
    """Sent-but-unacknowledged, written-but-unsent and received-but-unread bytes
    all cross: the client does not read (its window closes, the server's
    queue backs up), the server does not read (the client's bytes wait in its
    receive queue); after the move both read everything, exactly once."""
    cli, srv = connected
    cli.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    down = stream(3, 3 * 1024 * 1024)
    up = stream(4, 100_000)
    cli.sendall(up)
    time.sleep(0.2)
    # held from here: the server's first window of bytes reaches the client
    # but the client's ACKs do not come back (sent, unacknowledged); the rest
    # waits behind the closed window (unsent)
    topo.hold()
    srv.setblocking(False)
    sent = 0
    while sent < len(down):
        try:
            sent += srv.send(down[sent:sent + 65536])
        except BlockingIOError:
            break       # the send buffer is full: the rest stays with the application
    time.sleep(0.3)
    cap = Capture(topo.ns("c"), pcap, "tcp port 7000")
    try:
        new, t = move(topo, srv, "b")
        assert t["sent_queue"] > 0 and t["unsent_queue"] > 0 and t["recv_queue"] == len(up), t
        new.setblocking(True)
        new.settimeout(10)
        got_up = b""
        while len(got_up) < len(up):
            got_up += new.recv(65536)
        got_down = bytearray()

        def read_all() -> None:
            while True:
                b = cli.recv(65536)
                if not b:
                    return
                got_down.extend(b)

        reader = threading.Thread(target=read_all, daemon=True)
        reader.start()
        new.sendall(down[sent:])
        new.shutdown(socket.SHUT_WR)
        reader.join(20)
        new.close()
    finally:
        cap.stop()
    assert got_up == up
    assert sha256(bytes(got_down)) == sha256(down)
    rep = check_capture(pcap, (SERVICE_ADDR, 7000), expect_fin=True)
    assert rep.problems == [], rep.problems


def test_port_choices(topo: Topology, connected) -> None:
    """tcpcp 2.1: 'prebound' uses the caller's socket and its port (here the
    same one, so the connection carries on), 'any' lets the kernel choose
    (only useful behind address translation: checked silent and bound)."""
    from appliance.lab import netns

    cli, srv = connected
    cli.sendall(b"x")
    assert srv.recv(1) == b"x"
    topo.hold()
    ici = repair.get(srv)
    srv.close()
    topo.place("b")
    # any: a different, kernel-chosen port, still silent (not activated)
    other = netns.call_in(topo.ns("b"), lambda: repair.create(ici, port_choice="any"))
    assert other.getsockname()[0] == SERVICE_ADDR and other.getsockname()[1] not in (0, 7000)
    assert repair.in_repair(other)
    other.close()
    # prebound: the caller bound it (the ICI's port is ignored)
    pre = topo.socket("b")
    pre.bind((SERVICE_ADDR, 7000))
    new = netns.call_in(topo.ns("b"), lambda: repair.create(ici, port_choice="prebound", sock=pre))
    assert new.getsockname() == (SERVICE_ADDR, 7000)
    topo.route_to("b")
    repair.activate(new)
    cli.sendall(b"after")
    new.settimeout(5)
    assert new.recv(5) == b"after"
    new.sendall(b"ok")
    assert cli.recv(2) == b"ok"
    new.close()
