"""A move that catches a connection in each TCP state completes on the backup as it would have on
the primary (issue 14, item 4): scripted clients in ``lab-client`` (Python sockets; iptables rules
in the client's or the primary's namespace hold back one segment where a state needs crafting),
the lab's nginx as primary and backup, either a silent death of the primary (its link cut: the
health checks fail it over) or a planned move through the API.  Each run is captured at the client
and checked against I1-I6 (``invariants``); the client's own result (the body's SHA-256, its
socket's final state) and the backup's sockets (none left open) are checked too.

The states, and how the client gets there:

* ``syn_recv``: the client's handshake ACK dropped in its namespace (the gateway saw SYN and
  SYN-ACK only); after the move it sends its request.
* ``syn_recv_lost``: the primary's SYN-ACK dropped at the client: its SYN is retransmitted after
  the move and must be answered by the gateway.
* ``client_fin`` / ``client_fin_unacked``: an upload (the lab's upload app answers once it has the
  whole body), its last byte and ``shutdown(SHUT_WR)`` together; the FIN acknowledged by the
  primary (its application frozen, SIGSTOP: its kernel acknowledges the FIN alone, no answer
  comes), or sent once the primary is silent (never acknowledged by it).
* ``eof_reader``: the upload app as a server that reads to EOF (``X-Lab-Read-To-EOF``): its head
  at once, its answer only after the client's FIN.  The answer and its FIN reach the gateway, not
  the client (dropped at the client's input), then the move: the backup must get the FIN once it
  has regenerated the head, where the primary got it, or it would wait forever.
* ``server_fin``: a GET with a body: nginx answers, half-closes (lingering close) and reads on;
  the client uploads the rest of the body after the move, then closes.
* ``last_ack``: as ``server_fin``, but the client's FIN goes out once the primary is silent: its
  acknowledgment must come from the backup.
"""

from __future__ import annotations

import ipaddress
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.lab import topology as lab
from appliance.pcap import packets, tcp_fields

from .helpers import Capture, api, expected_sha, wait_for
from .invariants import assert_clean, check

pytestmark = pytest.mark.lab

# every state through a silent failover over both families, and through a planned move (the same
# path through the splice, started by the API) for the client's half-close, whose timing differs
# most: the suite's time is bounded
SCENARIOS = ["syn_recv", "syn_recv_lost", "client_fin", "client_fin_unacked", "eof_reader", "server_fin", "last_ack"]
CASES = ([(sc, fam, "failover") for sc in SCENARIOS for fam in ("ipv4", "ipv6")]
         + [("client_fin", "ipv4", "move")])
TCP_ESTABLISHED, TCP_TIME_WAIT, TCP_CLOSE = 1, 6, 7

CLIENT_SCRIPT = r'''
import hashlib, json, random, select, socket, sys, time
scenario, vip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
fam = socket.AF_INET6 if ":" in vip else socket.AF_INET

def say(**kw):
    print(json.dumps(kw), flush=True)

def wait(cmd):
    line = sys.stdin.readline().strip()
    if line != cmd:
        raise SystemExit(f"expected {cmd!r}, got {line!r}")

def command():
    r, _, _ = select.select([sys.stdin], [], [], 0)
    return sys.stdin.readline().strip() if r else None

def state(s):
    return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]

def wait_state(s, states, timeout=30.0):
    end = time.monotonic() + timeout
    while state(s) not in states and time.monotonic() < end:
        time.sleep(0.02)
    return state(s)

def parse(resp):
    head, _, body = resp.partition(b"\r\n\r\n")
    status = head.split(b"\r\n")[0].decode()
    return status, len(body), hashlib.sha256(body).hexdigest()

s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", 0))
say(port=s.getsockname()[1])
wait("connect")
s.settimeout(60)
s.connect((vip, port))
say(connected=True)
host = f"[{vip}]" if fam == socket.AF_INET6 else vip

if scenario.startswith("syn_recv"):
    if scenario == "syn_recv":
        wait("go")
    s.sendall(f"GET /1M.bin HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    resp = bytearray()
    while chunk := s.recv(65536):
        resp += chunk
    s.shutdown(socket.SHUT_WR)  # the server closed first: the client's FIN must be acknowledged
    st = wait_state(s, (7,), 10)
    say(result=parse(bytes(resp)), state=st)

elif scenario.startswith("client_fin"):  # the upload app: answers once it has the whole body
    body = random.Random(port).randbytes(1 << 20)
    s.sendall(f"POST /up HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
              + body[:-1])
    say(sent=True)
    wait("last")
    s.sendall(body[-1:])
    s.shutdown(socket.SHUT_WR)
    say(fin=True)
    resp = bytearray()
    while chunk := s.recv(65536):
        resp += chunk
    st = wait_state(s, (7,), 10)  # its FIN acknowledged, the server's received (TIME_WAIT: the fd says CLOSE)
    want = f"{hashlib.sha256(body).hexdigest()}  {len(body)}\n".encode()
    say(result=[resp.split(b"\r\n")[0].decode(), resp.endswith(b"\r\n\r\n" + want)], state=st)

elif scenario == "eof_reader":
    body = random.Random(port).randbytes(1 << 16)
    s.sendall(f"POST /up HTTP/1.1\r\nHost: {host}\r\nX-Lab-Read-To-EOF: 1\r\nContent-Length: {len(body)}\r\n\r\n"
              .encode() + body)
    resp = bytearray()
    while b"\r\n\r\n" not in resp and (chunk := s.recv(65536)):
        resp += chunk
    say(head=len(resp))
    wait("fin")
    s.shutdown(socket.SHUT_WR)
    while chunk := s.recv(65536):
        resp += chunk
    st = wait_state(s, (7,), 10)
    want = f"{hashlib.sha256(body).hexdigest()}  {len(body)}\n".encode()
    say(result=[resp.split(b"\r\n")[0].decode(), resp.endswith(b"\r\n\r\n" + want)], state=st)

else:  # server_fin, last_ack: nginx answers and closes
    if scenario == "server_fin":
        wait("req")
    s.sendall(f"GET /4K.bin HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    resp = bytearray()
    while chunk := s.recv(65536):
        resp += chunk
    say(eof=len(resp))
    wait("fin")
    s.shutdown(socket.SHUT_WR)
    st = wait_state(s, (7,), 30)  # the server closed first: closed once its FIN is acknowledged
    say(result=parse(bytes(resp)), state=st)
'''


class Client:
    """The scripted client: JSON lines out, commands in."""

    def __init__(self, scenario: str, vip: str, vport: int) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", "lab-client", sys.executable, "-c", CLIENT_SCRIPT, scenario, vip, str(vport)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.buf = b""
        self.port = int(self.read()["port"])

    def read(self, timeout: float = 90.0) -> dict:
        """The next line (read from the pipe itself: two lines may come in one read)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            assert r, "the client said nothing"
            chunk = os.read(fd, 65536)
            assert chunk, f"the client ended (rc {self.proc.wait()})"
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def tell(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Rules:
    """iptables rules in lab namespaces, removed again whatever happens."""

    def __init__(self, v6: bool) -> None:
        self.cmd = "ip6tables" if v6 else "iptables"
        self.rules: list[tuple[str, list[str]]] = []

    def add(self, ns: str, *rule: str) -> None:
        lab.sh("ip", "netns", "exec", ns, self.cmd, "-I", *rule)
        self.rules.append((ns, list(rule)))

    def remove(self, ns: str, *rule: str) -> None:
        lab.sh("ip", "netns", "exec", ns, self.cmd, "-D", *rule)
        self.rules.remove((ns, list(rule)))

    def clear(self) -> None:
        for ns, rule in list(self.rules):
            lab.sh("ip", "netns", "exec", ns, self.cmd, "-D", *rule, check=False)
        self.rules.clear()


def conn_of(port: int, client_ip: str, svc: str = "web") -> dict | None:
    for c in api(f"/api/v1/connections?service={svc}"):
        if c["client"] in (f"{client_ip}:{port}", f"[{client_ip}]:{port}"):
            return c
    return None


def go_to_backup(how: str, port: int, client_ip: str, svc: str = "web", cut: bool = True) -> None:
    """A failover (the primary's link cut, unless ``silence_primary`` did it already; the health
    checks fail the service over) or a planned move through the API."""
    if how == "failover":
        if cut:
            lab.cut_link("primary")
    else:
        cid = conn_of(port, client_ip, svc)["id"]
        api(f"/api/v1/connections/{cid}/migrate", "POST", {"to": "backup", "mode": "replay"})
    wait_for(lambda: (c := conn_of(port, client_ip, svc)) is not None and c["backend"] == "backup", timeout=30,
             what="the connection on the backup")


def silence_primary(how: str, rules: Rules, client_ip: str) -> None:
    """Nothing more from the primary reaches the client (before a planned move: its packets to
    the client dropped in its own namespace; for a failover: its link cut)."""
    if how == "failover":
        lab.cut_link("primary")
    else:
        rules.add("lab-primary", "OUTPUT", "-p", "tcp", "-d", client_ip, "-j", "DROP")


def fin_acked(pcap: Path, client_ip: str, port: int) -> bool:
    """The client's FIN is acknowledged by the service in the capture."""
    cip = ipaddress.ip_address(client_ip).packed
    fin_end = None
    acked = False
    for _, p in packets(pcap):
        f = tcp_fields(p)
        if f is None:
            continue
        src, dst, sport, dport, seq, ack, flags, n = f
        if src == cip and sport == port and flags & 1:
            fin_end = (seq + n + 1) & 0xFFFFFFFF
        elif dst == cip and dport == port and flags & 0x10 and fin_end is not None:
            acked = acked or ((ack - fin_end) & 0xFFFFFFFF) < (1 << 31)
    return acked


def backup_resets(pcap: Path, client_ip: str, port: int) -> int:
    """RSTs the backup sent to the moved connection (in the backup's capture)."""
    cip = ipaddress.ip_address(client_ip).packed
    n = 0
    for _, p in packets(pcap):
        f = tcp_fields(p)
        if f is not None and f[1] == cip and f[3] == port and f[6] & 4:
            n += 1
    return n


class Frozen:
    """The primary's upload app stopped (SIGSTOP) and always continued again."""

    def __init__(self) -> None:
        self.pid: int | None = None

    def freeze(self) -> None:
        self.pid = lab.pid_alive(lab.run_dir() / "upload-primary.pid")
        assert self.pid, "the primary's upload app is not running"
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.pid is not None:
            os.kill(self.pid, signal.SIGCONT)
            self.pid = None


def backup_sockets(client_ip: str, port: int) -> list[str]:
    """The backup's sockets of the moved connection, but TIME-WAIT (closed) ones."""
    out = lab.sh("ip", "netns", "exec", "lab-backup", "ss", "-Htan", check=False).stdout
    return [ln for ln in out.splitlines() if f"{client_ip}:{port}" in ln.replace("[", "").replace("]", "")
            and not ln.startswith("TIME-WAIT")]


@pytest.mark.parametrize("scenario, family, how", CASES)
def test_move_in_state(scenario: str, family: str, how: str, fresh: dict, tmp_path: Path) -> None:
    v6 = family == "ipv6"
    vip = lab.VIP6 if v6 else lab.VIP
    client_ip = lab.mirror6(f"{lab.CLIENT_NET}.10") if v6 else f"{lab.CLIENT_NET}.10"
    svc, vport = (("upload", lab.UPLOAD_PORT) if scenario.startswith("client_fin") or scenario == "eof_reader"
                  else ("web", lab.SERVICE_PORT))
    pure_ack = 84 if v6 else 64  # the longest packet without payload (header and options)
    rules = Rules(v6)
    frozen = Frozen()
    client = None
    pcap, backup_pcap = tmp_path / "client.pcap", tmp_path / "backup.pcap"
    try:
        with Capture("lab-client", pcap, bpf=f"tcp port {vport}", snaplen=65535), \
                Capture("lab-backup", backup_pcap, bpf=f"tcp and host {client_ip}", snaplen=200):
            client = Client(scenario, vip, vport)
            port = client.port
            tcp_to_vip = ["-p", "tcp", "-d", vip, "--dport", str(vport), "--sport", str(port)]
            tcp_from_vip = ["-p", "tcp", "-s", vip, "--sport", str(vport), "--dport", str(port)]
            if scenario == "syn_recv":
                # the handshake's ACK (everything but the SYN) never leaves the client
                rule = ["OUTPUT", *tcp_to_vip, "!", "--syn", "-j", "DROP"]
                rules.add("lab-client", *rule)
            elif scenario == "syn_recv_lost":
                rule = ["INPUT", *tcp_from_vip, "--tcp-flags", "SYN,ACK", "SYN,ACK", "-j", "DROP"]
                rules.add("lab-client", *rule)
            client.tell("connect")
            cid = wait_for(lambda: conn_of(port, client_ip, svc), timeout=10, what="the connection tracked")["id"]
            if scenario.startswith("syn_recv"):
                if scenario == "syn_recv":
                    assert client.read()["connected"]
                wait_for(lambda: (c := conn_of(port, client_ip)) is not None and c["state"] == "SYN_RECV",
                         timeout=10, what="the gateway's record in SYN_RECV")
                go_to_backup(how, port, client_ip)
                rules.remove("lab-client", *rule)
                if scenario == "syn_recv":
                    client.tell("go")
                else:
                    assert client.read()["connected"]
                final = client.read()
                assert final["result"] == ["HTTP/1.1 200 OK", 1 << 20, expected_sha("1M.bin")]
                assert final["state"] == TCP_CLOSE  # the server's FIN came, the client's was acknowledged
            elif scenario.startswith("client_fin"):
                assert client.read()["connected"] and client.read()["sent"]
                wait_for(lambda: conn_of(port, client_ip, svc)["log_bytes"] > 1 << 20, timeout=10,
                         what="the body logged")
                if scenario == "client_fin":
                    # the primary's application frozen: its kernel takes the last byte and the FIN
                    # and acknowledges them alone (its delayed ACK), no answer comes
                    frozen.freeze()
                    client.tell("last")
                    assert client.read()["fin"]
                    wait_for(lambda: conn_of(port, client_ip, svc)["state"] == "CLOSE_WAIT", timeout=10,
                             what="the client's FIN acknowledged by the primary")
                    go_to_backup(how, port, client_ip, svc)
                    frozen.thaw()  # its answer now meets a fenced (or cut off) connection
                else:
                    silence_primary(how, rules, client_ip)
                    client.tell("last")
                    assert client.read()["fin"]
                    wait_for(lambda: conn_of(port, client_ip, svc)["state"] == "FIN_WAIT", timeout=10,
                             what="the client's FIN seen, not acknowledged")
                    go_to_backup(how, port, client_ip, svc, cut=False)
                final = client.read(timeout=60)
                assert final["result"] == ["HTTP/1.1 200 OK", True]  # the digest of every byte it sent
                assert final["state"] == TCP_CLOSE  # both FINs acknowledged (TIME_WAIT, which the fd shows as CLOSE)
            elif scenario == "eof_reader":
                assert client.read()["connected"] and client.read()["head"]
                wait_for(lambda: conn_of(port, client_ip, svc)["log_bytes"] > 1 << 16, timeout=10,
                         what="the body logged")
                # the answer after EOF and the server's FIN: seen by the gateway, lost to the client
                held = [["INPUT", *tcp_from_vip, "-m", "length", "!", "--length", f"0:{pure_ack}", "-j", "DROP"],
                        ["INPUT", *tcp_from_vip, "--tcp-flags", "FIN", "FIN", "-j", "DROP"]]
                for rule in held:
                    rules.add("lab-client", *rule)
                client.tell("fin")
                wait_for(lambda: conn_of(port, client_ip, svc)["state"] == "LAST_ACK", timeout=10,
                         what="the answer and the server's FIN seen, the client's FIN acknowledged")
                go_to_backup(how, port, client_ip, svc)
                for rule in held:
                    rules.remove("lab-client", *rule)
                final = client.read(timeout=60)
                assert final["result"] == ["HTTP/1.1 200 OK", True]  # the backup's answer: the digest of the body
                assert final["state"] == TCP_CLOSE
            else:
                assert client.read()["connected"]
                if scenario == "server_fin":
                    # the client's pure ACKs are held back: it gets the answer and the FIN, the
                    # gateway never sees them acknowledged
                    rule = ["OUTPUT", *tcp_to_vip, "-m", "length", "--length", f"0:{pure_ack}", "-j", "DROP"]
                    rules.add("lab-client", *rule)
                    client.tell("req")
                assert client.read()["eof"] > 4096
                if scenario == "server_fin":
                    wait_for(lambda: conn_of(port, client_ip, svc)["state"] == "FIN_WAIT", timeout=10,
                             what="the server's FIN seen, not acknowledged")
                    go_to_backup(how, port, client_ip, svc)
                    rules.remove("lab-client", *rule)
                else:
                    wait_for(lambda: conn_of(port, client_ip, svc)["state"] == "CLOSE_WAIT", timeout=10,
                             what="the server's FIN acknowledged")
                    silence_primary(how, rules, client_ip)
                client.tell("fin")
                if scenario == "last_ack":
                    wait_for(lambda: conn_of(port, client_ip, svc)["state"] == "LAST_ACK", timeout=10,
                             what="the client's FIN seen, not acknowledged")
                    go_to_backup(how, port, client_ip, svc, cut=False)
                final = client.read(timeout=60)
                assert final["result"] == ["HTTP/1.1 200 OK", 4096, expected_sha("4K.bin")]
                assert final["state"] == TCP_CLOSE  # its FIN acknowledged: closed, no reset
            # the backup's side closed too: nothing of it left but TIME-WAIT
            wait_for(lambda: not backup_sockets(client_ip, port), timeout=15,
                     what=f"no open backup socket: {backup_sockets(client_ip, port)}")
    finally:
        frozen.thaw()
        rules.clear()
        if client is not None:
            client.close()
            # the primary's socket of it (cut off, not fenced, after a failover) is destroyed: healed,
            # its retransmissions would draw answers from the client that the next test's gateway
            # picks up mid-stream
            lab.sh("ip", "netns", "exec", "lab-primary", "ss", "-K", "dst", client_ip, "dport", "=",
                   str(client.port), check=False)
    reports = check(pcap, client_ip, vip, vport)
    assert_clean(reports, expect_connections=1)
    assert fin_acked(pcap, client_ip, port)
    # the backup's socket closed cleanly: no duplicate ACK after its close drew a RST from it
    assert backup_resets(backup_pcap, client_ip, port) == 0
    # the move verified (the backup regenerated what the client had), nothing reset
    wait_for(lambda: [e for e in api(f"/api/v1/events?kind=migration&service={svc}")
                      if e.get("connection") == cid and e["reason"] == "moved"], timeout=10, what="the move verified")
    assert not [e for e in api(f"/api/v1/events?kind=reset&service={svc}") if e.get("connection") == cid]
    assert not api(f"/api/v1/events?kind=divergence&service={svc}")
