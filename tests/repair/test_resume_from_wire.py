"""Resume after failure from a checkpoint taken on the wire (tcpcp section 6).

The server dies silently mid-download (its link is cut).  Nothing is read
from its socket: the project's own tracker (``checkpoint.tracker``) folds a
capture taken where the gateway sits into a :class:`ConnectionRecord`, the
client bytes come from that capture too, and ``ici_from_record()`` turns
record + the bytes the application had not consumed into an ICI that
``create()`` accepts on the backup.  The application there resumes from the
stream offset (a file position).  The client's download completes with the
right sha256, no RST, no TSval going back.  This is what the gateway's
resume mode (phase 2) will do with its live record and client log.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from pathlib import Path

from appliance.lab import netns
from appliance.pcap import packets
from appliance.lab.repair_topology import CLIENT_ADDR, SERVICE_ADDR, Topology
from checkpoint import tracker
from checkpoint.io import tcp_repair as repair
from checkpoint.ici import ConnectionRecord
from checkpoint.repair_ici import ici_from_record
from checkpoint.seqnum import seq_diff
from nfq.packet import PacketView

from .helpers import Capture, check_capture, stream

PORT = 7003
FILE = stream(9, 8 * 1024 * 1024)
HEADER = f"OK {len(FILE)}\n".encode()
REQUEST = b"GET file\n"
NOTE = b"NOTE read me after the move\n"
RATE = 4 * 1024 * 1024


def serve(sock: socket.socket, position: int, stop: threading.Event) -> None:
    """Send FILE from ``position`` on, paced (the server application)."""
    t0, start = time.monotonic(), position
    try:
        while position < len(FILE) and not stop.is_set():
            n = sock.send(FILE[position:position + 16384])
            position += n
            ahead = (position - start) / RATE - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
    except OSError:
        pass                      # the dead server's thread just ends


def record_from_capture(pcap: Path, client_port: int) -> tuple[ConnectionRecord, bytes]:
    """The wire checkpoint: the tracker's record and the client's byte stream."""
    rec = ConnectionRecord(id=1, client_ip=CLIENT_ADDR, client_port=client_port, vip=SERVICE_ADDR, vport=PORT,
                           service="t", backend="a", backend_ip=SERVICE_ADDR, backend_port=PORT,
                           created=0.0, last_seen=0.0)
    chunks: dict[int, bytes] = {}
    for ts, raw in packets(pcap):
        try:
            p = PacketView(bytearray(raw))
        except ValueError:
            continue
        if PORT not in (p.sport, p.dport):
            continue
        from_client = p.sport == client_port
        tracker.observe(rec, p, from_client, ts)
        if from_client and p.payload_len and rec.client.data_base is not None:
            chunks[seq_diff(p.seq, rec.client.data_base)] = bytes(p.payload)
    log = bytearray()
    for off in sorted(chunks):
        data = chunks[off]
        if off <= len(log):
            log += data[len(log) - off:]
    return rec, bytes(log)


def test_backup_resumes_a_dead_servers_download_from_the_wire_checkpoint(topo: Topology, tmp_path: Path) -> None:
    wire = tmp_path / "gateway.pcap"
    gw_cap = Capture(topo.ns("g"), wire, f"tcp port {PORT}", iface="c0", snaplen=0)   # whole packets
    cli_pcap = tmp_path / "client.pcap"
    cli_cap = Capture(topo.ns("c"), cli_pcap, f"tcp port {PORT}")
    lst = topo.socket("a")
    lst.bind((SERVICE_ADDR, PORT))
    lst.listen()
    cli = topo.socket("c")
    cli.settimeout(15)
    cli.connect((SERVICE_ADDR, PORT))
    srv, _ = lst.accept()
    lst.close()
    got = bytearray()
    errors: list[BaseException] = []

    def client() -> None:
        try:
            cli.sendall(REQUEST)
            sent_note = False
            while len(got) < len(HEADER) + len(FILE):
                b = cli.recv(65536)
                if not b:
                    break
                got.extend(b)
                if not sent_note and len(got) > 1_000_000:
                    cli.sendall(NOTE)        # the application reads it only at the end
                    sent_note = True
            cli.sendall(b"BYE\n")
        except BaseException as exc:  # noqa: BLE001  (asserted below)
            errors.append(exc)

    stop_a = threading.Event()
    try:
        reader = threading.Thread(target=client, daemon=True)
        reader.start()
        # the application on A consumes the request and streams the file
        req = b""
        while not req.endswith(b"\n"):
            req += srv.recv(1)
        consumed = len(req)
        srv.sendall(HEADER)
        a = threading.Thread(target=serve, args=(srv, 0, stop_a), daemon=True)
        a.start()
        time.sleep(0.8)
        # silent death of A: its link is cut (no FIN, no RST ever leaves it)
        netns.ip("link", "del", "a0", ns=topo.ns("g"))
        time.sleep(0.3)
        gw_cap.stop()
        stop_a.set()

        rec, client_log = record_from_capture(wire, cli.getsockname()[1])
        assert rec.client.data_base is not None and rec.client.bytes == len(client_log)
        assert client_log.startswith(REQUEST + NOTE)
        # the application's last reported input offset: it had consumed the request
        ici = ici_from_record(rec, client_bytes=client_log[consumed:], consumed=consumed)
        assert ici.in_offset == consumed
        position = ici.out_offset - len(HEADER)
        assert 0 < position < len(FILE)
        topo.place("b")
        new = netns.call_in(topo.ns("b"), lambda: repair.create(ici))
        topo.route_to("b")
        repair.activate(new)
        new.settimeout(15)
        note = b""
        while len(note) < len(NOTE):
            note += new.recv(len(NOTE) - len(note))
        assert note == NOTE
        b = threading.Thread(target=serve, args=(new, position, threading.Event()), daemon=True)
        b.start()
        b.join(30)
        reader.join(30)
        bye = new.recv(16)
        assert bye == b"BYE\n"
        new.close()
    finally:
        stop_a.set()
        gw_cap.stop()
        cli_cap.stop()
        cli.close()
        srv.close()
    assert not errors, errors
    assert bytes(got) == HEADER + FILE, f"{len(got)} bytes, sha256 {hashlib.sha256(got).hexdigest()}"
    rep = check_capture(cli_pcap, (SERVICE_ADDR, PORT), expect_fin=True)
    assert rep.rst == [] and rep.gaps == [] and rep.ts_back == [], rep.problems
