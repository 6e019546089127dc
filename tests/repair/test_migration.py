"""A live connection moved between namespaces with get/create/activate
while the client keeps reading and writing (tcpcp section 2)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from appliance.repair_topology import SERVICE_ADDR, Topology, move
from checkpoint import repair

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
    client, app, timings = run_moves(topo, connected, pcap, ["b"])
    rep = check_capture(pcap, (SERVICE_ADDR, 7000), expect_fin=True)
    assert rep.problems == [], rep.problems
    assert rep.data_segments > 100
    assert rep.server_bytes >= OUT
    assert timings[0]["library"] < 1.0
    # the move caught data in the kernel's queues (else it proves less)
    assert timings[0]["sent_queue"] + timings[0]["unsent_queue"] > 0, timings


def test_move_a_to_b_and_back(topo: Topology, connected, pcap: Path) -> None:
    client, app, timings = run_moves(topo, connected, pcap, ["b", "a"])
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
