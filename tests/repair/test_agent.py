"""The agent: its authenticated channel, passive export of another process's
connection, and the example application's download moved A→B→A."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.agent import protocol as proto
from appliance.agent import sdk as agent_sdk
from appliance.lab import netns
from appliance.lab.repair_topology import SERVICE_ADDR, Topology

from .helpers import Capture, check_capture

ROOT = Path(__file__).resolve().parents[2]
APPLIANCE = str(ROOT / ".venv" / "bin" / "appliance")
KEY = b"0123456789abcdef-test-key"


class Proc:
    """A child process in a namespace whose stdout lines are collected."""

    def __init__(self, ns: str, argv: list[str]) -> None:
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.p = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()

    def wait_for(self, text: str, timeout: float = 10.0, after: int = 0) -> str:
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines[after:]:
                    if text in line:
                        return line
                left = end - time.monotonic()
                if left <= 0 or self.p.poll() is not None and not any(text in x for x in self.lines[after:]):
                    raise TimeoutError(f"no {text!r} from {self.p.args}: {self.lines[-15:]}")
                self.cond.wait(min(left, 0.2))

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    try:
        yield started
    finally:
        for p in reversed(started):
            p.stop()


@pytest.fixture
def agents(topo: Topology, tmp_path: Path, procs: list[Proc]) -> dict[str, dict]:
    """An agent in rp-a and one in rp-b, sharing a key file."""
    keyfile = tmp_path / "agent.key"
    keyfile.write_bytes(KEY + b"\n")
    keyfile.chmod(0o600)
    out = {}
    for host in ("a", "b"):
        sock = str(tmp_path / f"agent-{host}.sock")
        p = Proc(topo.ns(host), [APPLIANCE, "agent", "run", "--listen", f"{topo.addr(host)}:7400",
                                 "--socket", sock, "--key-file", str(keyfile)])
        procs.append(p)
        p.wait_for("agent: listening")
        out[host] = {"addr": (topo.addr(host), 7400), "socket": sock, "keyfile": str(keyfile), "proc": p}
    return out


def in_client(topo: Topology, fn):  # type: ignore[no-untyped-def]
    return netns.call_in(topo.ns("c"), fn)


# --- the channel ------------------------------------------------------------------------

def test_channel_answers_only_authentic_fresh_messages(topo: Topology, agents: dict) -> None:
    addr = agents["a"]["addr"]
    assert in_client(topo, lambda: proto.request(addr, "ping", {}, KEY))["ok"] is True
    # wrong key: the agent answers nothing
    with pytest.raises((ConnectionError, OSError, proto.ProtocolError)):
        in_client(topo, lambda: proto.request(addr, "ping", {}, b"another-key-of-16-bytes", timeout=3))
    # a captured message replayed: refused the second time
    msg = proto.make("ping", {}, KEY)

    def send(m: dict) -> object:
        with socket.create_connection(addr, timeout=3) as s:
            proto.send_frame(s, m)
            try:
                return proto.recv_frame(s)[0]
            except ConnectionError:
                return None

    first = in_client(topo, lambda: send(msg))
    assert isinstance(first, dict) and first["body"]["ok"] is True
    assert in_client(topo, lambda: send(msg)) is None
    # an old message (outside the time window), even correctly signed
    old = proto.make("ping", {}, None)
    old["ts"] -= 3600
    old["mac"] = proto.mac(old, KEY)
    assert in_client(topo, lambda: send(old)) is None
    # altered after signing
    alt = proto.make("ping", {}, KEY)
    alt["body"] = {"x": 1}
    assert in_client(topo, lambda: send(alt)) is None
    # the agent logs each refusal after it has closed the connection: give its log a moment
    want = ("mac: bad or missing HMAC", "nonce: already seen", "ts: ")
    deadline = time.monotonic() + 5
    while not all(w in "\n".join(agents["a"]["proc"].lines) for w in want) and time.monotonic() < deadline:
        time.sleep(0.05)
    log = "\n".join(agents["a"]["proc"].lines)
    assert all(w in log for w in want), log


def test_replay_guard_and_frame_limits_are_named() -> None:
    g = proto.ReplayGuard(window=30)
    g.check("a" * 32, 1000.0, now=1000.0)
    with pytest.raises(proto.ProtocolError) as e1:
        g.check("a" * 32, 1000.0, now=1001.0)
    assert e1.value.field == "nonce"
    with pytest.raises(proto.ProtocolError) as e2:
        g.check("b" * 32, 900.0, now=1000.0)
    assert e2.value.field == "ts"
    with pytest.raises(proto.ProtocolError) as e3:
        proto.verify({"v": 1, "type": "ping", "body": {}, "mac": "hmac-sha256:00"}, KEY, None)
    assert e3.value.field == "mac"
    a, b = socket.socketpair()
    with a, b:
        a.sendall((proto.MAX_FRAME + 1).to_bytes(4, "big"))
        with pytest.raises(proto.ProtocolError) as e4:
            proto.recv_frame(b)
        assert e4.value.field == "length"
    with pytest.raises(proto.ProtocolError) as e5:
        proto.load_key("short")
    assert e5.value.field == "key"


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    from appliance.agent.server import load_config

    bad = tmp_path / "agent.toml"
    bad.write_text('[agent]\nkey = "0123456789abcdef0"\nlisten = "198.51.100.2:notaport"\n')
    with pytest.raises(proto.ProtocolError) as exc:
        load_config(str(bad))
    assert str(exc.value).startswith("agent.listen:")
    bad.write_text('[agent]\nkey = "0123456789abcdef0"\nwindow = -1\n')
    with pytest.raises(proto.ProtocolError) as exc:
        load_config(str(bad))
    assert str(exc.value).startswith("agent.window:")
    bad.write_text('[agent]\nkey = "0123456789abcdef0"\nbogus = 1\n')
    with pytest.raises(proto.ProtocolError) as exc:
        load_config(str(bad))
    assert str(exc.value).startswith("agent.bogus:")
    r = subprocess.run([APPLIANCE, "agent", "run", "--config", str(bad)], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 2 and "bad config: agent.bogus: unknown key" in r.stderr


# --- passive export ------------------------------------------------------------------------

OWNER = r"""
import os, socket, sys, time
lst = socket.socket(); lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lst.bind(("203.0.113.10", 7002)); lst.listen()
print("listening", os.getpid(), flush=True)
c, _ = lst.accept()
print("fd", c.fileno(), flush=True)
while True:
    try:
        data = c.recv(100)
    except OSError as exc:          # the socket was taken away (repair mode)
        print("lost", exc.errno, flush=True)
        break
    if not data:
        break
    c.sendall(data.upper())
time.sleep(3600)
"""


def test_passive_export_of_another_process_connection(topo: Topology, agents: dict, procs: list[Proc],
                                                      tmp_path: Path) -> None:
    """SockMi's passive export: `appliance agent export --pid P --fd N` takes the
    connection of a process that knows nothing about it; an application on B
    gets it through accept_resumed() and carries on the conversation."""
    owner = Proc(topo.ns("a"), [sys.executable, "-c", OWNER])
    procs.append(owner)
    pid = int(owner.wait_for("listening").split()[1])
    cli = topo.socket("c")
    cli.settimeout(10)
    cli.connect((SERVICE_ADDR, 7002))
    fd = int(owner.wait_for("fd ").split()[1])
    pcap = tmp_path / "client.pcap"
    cap = Capture(topo.ns("c"), pcap, "tcp port 7002")
    try:
        cli.sendall(b"hello")
        assert cli.recv(5) == b"HELLO"
        got: list[agent_sdk.Resumed] = []
        waiter = threading.Thread(target=lambda: got.append(agent_sdk.accept_resumed(agent=agents["b"]["socket"],
                                                                                     timeout=20)))
        waiter.start()
        topo.hold()
        topo.place("b")
        r = subprocess.run(["ip", "netns", "exec", topo.ns("a"), APPLIANCE, "agent", "export", "--pid", str(pid),
                            "--fd", str(fd), "--to", f"{topo.addr('b')}:7400", "--key-file",
                            agents["a"]["keyfile"]], capture_output=True, text=True, check=False, timeout=30)
        assert r.returncode == 0, r.stderr
        reply = json.loads(r.stdout)
        assert reply["ok"] and reply["active"] and reply["in_offset"] == 5 and reply["out_offset"] == 5
        topo.route_to("b")
        waiter.join(20)
        assert got, "no resumed connection on B"
        res = got[0]
        assert (res.in_offset, res.out_offset) == (5, 5)
        assert res.remote == f"192.0.2.10:{cli.getsockname()[1]}"
        cli.sendall(b"again")
        res.sock.settimeout(10)
        assert res.sock.recv(100) == b"again"
        res.sock.sendall(b"FROM B")
        assert cli.recv(100) == b"FROM B"
        # the owner lost its socket; its exit closes it without a word to the client
        owner.stop()
        time.sleep(0.3)
        cli.sendall(b"still here")
        assert res.sock.recv(100) == b"still here"
        res.sock.close()
    finally:
        cap.stop()
        cli.close()
    rep = check_capture(pcap, (SERVICE_ADDR, 7002), expect_fin=True)
    assert rep.rst == [] and rep.gaps == [] and rep.ts_back == [], rep.problems


def test_export_to_a_missing_application_rolls_back(topo: Topology, agents: dict, procs: list[Proc]) -> None:
    """No application waits on B: the import fails (naming why) and the origin
    socket is put back to work, so the connection goes on at A."""
    owner = Proc(topo.ns("a"), [sys.executable, "-c", OWNER])
    procs.append(owner)
    pid = int(owner.wait_for("listening").split()[1])
    cli = topo.socket("c")
    cli.settimeout(10)
    cli.connect((SERVICE_ADDR, 7002))
    fd = int(owner.wait_for("fd ").split()[1])
    try:
        cli.sendall(b"one")
        assert cli.recv(3) == b"ONE"
        topo.hold()
        topo.place("b")
        r = subprocess.run(["ip", "netns", "exec", topo.ns("a"), APPLIANCE, "agent", "export", "--pid", str(pid),
                            "--fd", str(fd), "--to", f"{topo.addr('b')}:7400", "--app", "nobody-waits",
                            "--key-file", agents["a"]["keyfile"]],
                           capture_output=True, text=True, check=False, timeout=60)
        assert r.returncode == 1
        assert "app: no application 'nobody-waits' is waiting" in r.stderr and "rolled back" in r.stderr
        topo.place("a")
        topo.route_to("a")
        cli.sendall(b"two")
        assert cli.recv(3) == b"TWO"
    finally:
        cli.close()


# --- the example application ------------------------------------------------------------------

def test_example_download_moves_there_and_back(topo: Topology, agents: dict, procs: list[Proc],
                                              tmp_path: Path) -> None:
    """The resumable file server's download is exported A→B and B→A mid-transfer;
    the client's sha256 matches the file and its capture shows no RST, no hole."""
    files = tmp_path / "files"
    files.mkdir()
    data = random.Random(5).randbytes(12 * 1024 * 1024)
    (files / "12M.bin").write_bytes(data)
    server = str(ROOT / "examples" / "resumable_fileserver" / "server.py")
    client = str(ROOT / "examples" / "resumable_fileserver" / "client.py")
    srv = {}
    for host, other in (("a", "b"), ("b", "a")):
        srv[host] = Proc(topo.ns(host), [sys.executable, server, "--listen", "0.0.0.0:8000", "--root", str(files),
                                         "--agent", agents[host]["socket"],
                                         "--export-to", f"{topo.addr(other)}:7400"])
        procs.append(srv[host])
        srv[host].wait_for('"listening"')
    pcap = tmp_path / "client.pcap"
    cap = Capture(topo.ns("c"), pcap, "tcp port 8000")
    try:
        cl = Proc(topo.ns("c"), [sys.executable, client, f"{SERVICE_ADDR}:8000", "12M.bin", "--rate", "6000000"])
        procs.append(cl)
        srv["a"].wait_for('"started"')
        for origin, dest in (("a", "b"), ("b", "a")):
            time.sleep(0.6)
            mark = len(srv[origin].lines)
            topo.hold()
            topo.place(dest)
            srv[origin].p.send_signal(signal.SIGUSR1)
            exported = json.loads(srv[origin].wait_for('"exported"', after=mark))
            topo.route_to(dest)
            srv[origin].p.send_signal(signal.SIGUSR2)
            resumed = json.loads(srv[dest].wait_for('"resumed"', after=len(srv[dest].lines) - 5 if
                                                     len(srv[dest].lines) > 5 else 0))
            assert resumed["out_offset"] == exported["out_offset"]
            assert 0 < exported["position"] < len(data)
        cl.p.wait(60)
    finally:
        cap.stop()
    assert cl.p.returncode == 0, cl.lines
    line = cl.wait_for("  ")
    assert line.split() == [hashlib.sha256(data).hexdigest(), str(len(data))]
    rep = check_capture(pcap, (SERVICE_ADDR, 8000), expect_fin=True)
    assert rep.problems == [], rep.problems
    done = srv["a"].wait_for('"done"')
    assert json.loads(done)["out_offset"] == len(data) + len(f"OK {len(data)}\n")
    assert os.path.exists(agents["a"]["socket"])


def test_gateway_style_export_by_address_two_phase(topo: Topology, agents: dict, procs: list[Proc]) -> None:
    """What the gateway will do: ask the origin's agent over the authenticated
    channel to export the connection it knows by its addresses, have it
    created silent at B (activate: false), switch, then activate by handle."""
    owner = Proc(topo.ns("a"), [sys.executable, "-c", OWNER])
    procs.append(owner)
    owner.wait_for("listening")
    cli = topo.socket("c")
    cli.settimeout(10)
    cli.connect((SERVICE_ADDR, 7002))
    owner.wait_for("fd ")
    cport = cli.getsockname()[1]
    try:
        cli.sendall(b"abc")
        assert cli.recv(3) == b"ABC"
        got: list[agent_sdk.Resumed] = []
        waiter = threading.Thread(target=lambda: got.append(agent_sdk.accept_resumed(agent=agents["b"]["socket"],
                                                                                     timeout=20)))
        waiter.start()
        topo.hold()
        topo.place("b")
        reply = in_client(topo, lambda: proto.request(agents["a"]["addr"], "export", {
            "local": f"{SERVICE_ADDR}:7002", "remote": f"192.0.2.10:{cport}",
            "to": f"{topo.addr('b')}:7400", "activate": False}, KEY))
        assert reply["ok"] and reply["active"] is False and reply["in_offset"] == 3
        time.sleep(0.3)
        assert not got, "accept_resumed() returned before activation"
        topo.route_to("b")
        act = in_client(topo, lambda: proto.request(agents["b"]["addr"], "activate",
                                                    {"handle": reply["handle"]}, KEY))
        assert act["active"] is True
        waiter.join(20)
        assert got and got[0].handle == reply["handle"]
        cli.sendall(b"def")
        got[0].sock.settimeout(5)
        assert got[0].sock.recv(3) == b"def"
        # a handle is used once
        with pytest.raises(proto.AgentError, match="handle"):
            in_client(topo, lambda: proto.request(agents["b"]["addr"], "activate",
                                                  {"handle": reply["handle"]}, KEY))
        got[0].sock.close()
    finally:
        cli.close()
