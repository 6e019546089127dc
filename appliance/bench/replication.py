"""Benchmark: the commit overhead of peer mode — our replication stream against Redis WAIT.

Theory of operation
-------------------
Two network namespaces of its own, ``rb-a`` (the active gateway) and ``rb-b`` (the standby),
joined by a veth pair with documentation addresses (203.0.113.249/30 and .250/30); both are
deleted at the end, and stale ones from an interrupted run at the start.

*Ours*: in ``rb-b`` a :class:`~checkpoint.replication.Replica` behind a
:class:`~appliance.replication_link.ReplicationLink` dials the active; in ``rb-a`` a
:class:`~checkpoint.replication.Replicator` behind a listening link submits ``--batches`` batches
one after the other, each what the disk store's group commit gives for one full-sized client
segment: a 1448-byte log append and the connection's ICI (``record_state``, JSON).  Measured per
batch: from ``submit`` to the ACK releasing it (the commit point may move), in the active's
process, with the asyncio loop in between — what the data plane would wait.

*Redis* (Debian's ``redis-server``): a master in ``rb-a``, a replica (``replicaof``) in ``rb-b``,
persistence off on both.  A client in ``rb-a`` writes the same batch as
``MULTI; APPEND log:<id> <1448 bytes>; HSET conn:<id> ici <record JSON>; EXEC; WAIT 1 1000``,
all five commands in one write (raw RESP over a TCP socket: the least client overhead), and
waits for WAIT's reply, which comes once the replica acknowledged the offset.  Measured: from the
write to WAIT's reply; a WAIT answering 0 replicas is counted and reported.

Both use ``--batches`` (default 20,000) after ``--warmup`` (1,000) unmeasured.  Prints JSON with
the median, p90, p99, p99.9 and max of each in microseconds and the ratio Redis/ours.

    sudo .venv/bin/python -m appliance.bench.replication [--batches 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

NS_A, NS_B = "rb-a", "rb-b"
VETH_A, VETH_B = "rbv-a", "rbv-b"
ADDR_A, ADDR_B = "203.0.113.249", "203.0.113.250"
PORT_OURS, PORT_REDIS = 7400, 6390
LOG_BYTES = 1448
ROOT = Path(__file__).resolve().parents[2]


def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def summary(lat_s: list[float]) -> dict[str, float]:
    us = [x * 1e6 for x in lat_s]
    return {"n": len(us), "median_us": round(statistics.median(us), 1), "p90_us": round(_pct(us, 90), 1),
            "p99_us": round(_pct(us, 99), 1), "p999_us": round(_pct(us, 99.9), 1), "max_us": round(max(us), 1)}


def typical_record(cid: int) -> dict[str, Any]:
    """A connection's ICI as the store writes it (record_state of an established record)."""
    from checkpoint.ici import ConnectionRecord, TcpState
    from checkpoint.state import record_state

    now = time.time()
    rec = ConnectionRecord(id=cid, client_ip="192.0.2.10", client_port=40000 + cid, vip="203.0.113.10", vport=80,
                           service="web", backend="primary", backend_ip="198.51.100.10", backend_port=80,
                           created=now, last_seen=now)
    rec.state = TcpState.ESTABLISHED
    for h, isn in ((rec.client, 123456789), (rec.server, 987654321)):
        h.isn, h.next_seq, h.ack, h.mss, h.wscale, h.window = isn, isn + 100000, isn + 5000, 1448, 7, 64240
    rec.commit_offset = 100000
    return record_state(rec)


# ----- the two sides of ours (run inside the namespaces) -------------------------------------

async def _standby(port: int) -> None:
    from checkpoint.replication import Replica

    from ..replication_link import ReplicationLink

    link = ReplicationLink(Replica("rb-b"), dial=(ADDR_A, port), backoff_min=0.01, backoff_max=0.2,
                           idle_timeout=5.0)
    await link.start()
    await asyncio.Event().wait()  # until killed


async def _active(port: int, batches: int, warmup: int) -> dict[str, Any]:
    from checkpoint.replication import Append, Record, Replicator

    from ..replication_link import ReplicationLink

    r = Replicator("rb-a", 1, ack_timeout=1.0, lease=2.0, heartbeat=0.1, max_lag_bytes=256 << 20)
    loop = asyncio.get_running_loop()
    waiter: list[tuple[int, asyncio.Future[None]]] = []

    def changed() -> None:
        if r.wants_snapshot:
            r.snapshot({}, time.monotonic())
        r.pop_events()
        if waiter and r.released_through >= waiter[0][0] and not waiter[0][1].done():
            waiter[0][1].set_result(None)

    link = ReplicationLink(r, listen=(ADDR_A, port), on_change=changed, tick_interval=0.01, idle_timeout=5.0)
    await link.start()
    deadline = time.monotonic() + 20
    while not r.in_sync:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the standby never got in sync: {r.degraded}")
        await asyncio.sleep(0.01)
    record = typical_record(1)
    payload = os.urandom(LOG_BYTES)
    lat: list[float] = []
    off = 0
    degraded = 0
    for i in range(warmup + batches):
        record["last_seen"] = time.time()
        fut: asyncio.Future[None] = loop.create_future()
        t0 = time.perf_counter()
        seq = r.submit([Record(1, record), Append(1, off, payload)], time.monotonic())
        link.flush()
        if r.released_through < seq:
            waiter[:] = [(seq, fut)]
            await fut
        t1 = time.perf_counter()
        if not r.synchronous:
            degraded += 1
        off += LOG_BYTES
        if i >= warmup:
            lat.append(t1 - t0)
    await link.stop()
    return {"latency": summary(lat), "degraded_batches": degraded, "bytes_sent": r.sent_bytes}


# ----- Redis ---------------------------------------------------------------------------------

def _resp(*args: bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class _Resp:
    """The few RESP replies this client reads, from a blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(f"redis: {rest.decode()}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self.buf += self.sock.recv(65536)
            data, self.buf = self.buf[:n], self.buf[n + 2:]
            return data
        if kind == b"*":
            return [self.reply() for _ in range(int(rest))]
        raise RuntimeError(f"redis: unexpected reply {line[:40]!r}")


def _redis_client(port: int, batches: int, warmup: int) -> dict[str, Any]:
    sock = socket.create_connection((ADDR_A, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rd = _Resp(sock)
    deadline = time.monotonic() + 20
    while True:  # the replica has done its initial sync
        sock.sendall(_resp(b"INFO", b"replication"))
        info = rd.reply().decode()
        if "connected_slaves:1" in info and "state=online" in info:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the redis replica never came online:\n{info}")
        time.sleep(0.05)
    record = typical_record(1)
    payload = os.urandom(LOG_BYTES)
    lat: list[float] = []
    unreplicated = 0
    for i in range(warmup + batches):
        record["last_seen"] = time.time()
        ici = json.dumps(record, separators=(",", ":")).encode()
        t0 = time.perf_counter()
        sock.sendall(_resp(b"MULTI") + _resp(b"APPEND", b"log:1", payload) + _resp(b"HSET", b"conn:1", b"ici", ici)
                     + _resp(b"EXEC") + _resp(b"WAIT", b"1", b"1000"))
        replies = [rd.reply() for _ in range(5)]
        t1 = time.perf_counter()
        if replies[0] != "OK" or replies[3] is None:
            raise RuntimeError(f"redis transaction failed: {replies[:4]}")
        if replies[4] < 1:
            unreplicated += 1
        if i >= warmup:
            lat.append(t1 - t0)
    sock.close()
    return {"latency": summary(lat), "wait_answered_0": unreplicated}


# ----- orchestration (root) ------------------------------------------------------------------

def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def _down() -> None:
    for ns in (NS_A, NS_B):
        for pid in _sh("ip", "netns", "pids", ns, check=False).stdout.split():
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid), 9)
        _sh("ip", "netns", "del", ns, check=False)


def _up() -> None:
    _down()
    _sh("ip", "netns", "add", NS_A)
    _sh("ip", "netns", "add", NS_B)
    _sh("ip", "link", "add", VETH_A, "netns", NS_A, "type", "veth", "peer", "name", VETH_B, "netns", NS_B)
    for ns, dev, addr in ((NS_A, VETH_A, ADDR_A), (NS_B, VETH_B, ADDR_B)):
        _sh("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
        _sh("ip", "-n", ns, "link", "set", dev, "up")
        _sh("ip", "-n", ns, "link", "set", "lo", "up")


def _in(ns: str, *cmd: str, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(["ip", "netns", "exec", ns, *cmd], text=True, **kw)


def _self(ns: str, *args: str, **kw: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return _in(ns, sys.executable, "-m", "appliance.bench.replication", *args, env=env, **kw)


def _run_side(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark side failed ({proc.returncode}):\n{err[-3000:]}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def run(batches: int, warmup: int) -> dict[str, Any]:
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    version = _sh(redis_server, "--version").stdout.split()[2].removeprefix("v=")
    procs: list[subprocess.Popen[str]] = []
    tmp = Path(tempfile.mkdtemp(prefix="rb-redis-"))
    try:
        _up()
        # ours
        standby = _self(NS_B, "--role", "standby", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(standby)
        ours = _run_side(_self(NS_A, "--role", "active", "--batches", str(batches), "--warmup", str(warmup),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE), timeout=900)
        standby.kill()
        # Redis: master in rb-a, replica in rb-b, no persistence
        common = ["--save", "", "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no",
                  "--port", str(PORT_REDIS), "--logfile", ""]
        for ns, addr, extra in ((NS_A, ADDR_A, []), (NS_B, ADDR_B, ["--replicaof", ADDR_A, str(PORT_REDIS)])):
            d = tmp / ns
            d.mkdir()
            procs.append(_in(ns, redis_server, "--bind", addr, "--dir", str(d), *common, *extra,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 10
        while _sh("ip", "netns", "exec", NS_A, "redis-cli", "-h", ADDR_A, "-p", str(PORT_REDIS), "ping",
                  check=False).stdout.strip() != "PONG":
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        redis = _run_side(_self(NS_A, "--role", "redis-client", "--batches", str(batches), "--warmup", str(warmup),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE), timeout=900)
    finally:
        for p in procs:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                p.kill()
                p.wait(5)
        _down()
        shutil.rmtree(tmp, ignore_errors=True)
    o, r = ours["latency"], redis["latency"]
    return {
        "batch": f"{LOG_BYTES} bytes of client log + one ICI record ({len(json.dumps(typical_record(1)))} bytes JSON)",
        "batches": batches,
        "ours": ours,
        "redis": {**redis, "version": version, "commands": "MULTI APPEND HSET EXEC WAIT 1 1000 (one write)"},
        "ratio_redis_over_ours": {"median": round(r["median_us"] / o["median_us"], 2),
                                  "p99": round(r["p99_us"] / o["p99_us"], 2)},
        "target": {"median_us": 200, "p99_us": 1000,
                   "met": o["median_us"] <= 200 and o["p99_us"] <= 1000},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=20_000)
    ap.add_argument("--warmup", type=int, default=1_000)
    ap.add_argument("--role", choices=["run", "active", "standby", "redis-client"], default="run",
                    help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.role == "standby":
        asyncio.run(_standby(a.port or PORT_OURS))
        return 0
    if a.role == "active":
        print(json.dumps(asyncio.run(_active(a.port or PORT_OURS, a.batches, a.warmup))))
        return 0
    if a.role == "redis-client":
        print(json.dumps(_redis_client(a.port or PORT_REDIS, a.batches, a.warmup)))
        return 0
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces): sudo .venv/bin/python -m appliance.bench.replication")
    print(json.dumps(run(a.batches, a.warmup), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
