"""Benchmark: how long one TCP endpoint move takes (hold to release), over many moves.

Theory of operation
-------------------
Builds the ``rp-*`` topology of :mod:`appliance.lab.repair_topology`, opens one
connection from ``rp-c`` to the service address on ``rp-a`` and keeps a
stream flowing on it (the server writes at ``--rate``, the client reads
everything).  Then it moves the server end ``--migrations`` times,
alternately to ``rp-b`` and back, ``--interval`` seconds apart, each move
being hold (the router blackholes the service address), ``get()``, close,
address moved, ``create()``, route switched (release), ``activate()``.

Reported per move: ``hold_to_release`` (the whole move as the client's
path sees it), ``library`` (get + create + activate only: what the
endpoint library costs; the rest is ``ip`` commands standing in for the
gateway's switch), and the client's longest pause between two reads
around the move.  At the end the client's sha256 must equal the stream's,
so every figure is of a move that lost and duplicated nothing.

    sudo .venv/bin/python -m appliance.bench.repair --migrations 100
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import select
import socket
import statistics
import threading
import time
from typing import Any

from ..lab.repair_topology import SERVICE_ADDR, Topology, move, reap_stale


def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


class _Sender:
    """The server end the writer thread sends on (replaced by each move) and its progress."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sent = 0


def run(migrations: int, interval: float, rate: float, port: int = 7100) -> dict[str, Any]:
    topo = Topology().up(owner="a")
    try:
        lst = topo.socket("a")
        lst.bind((SERVICE_ADDR, port))
        lst.listen()
        cli = topo.socket("c")
        cli.connect((SERVICE_ADDR, port))
        srv, _ = lst.accept()
        lst.close()
        size = int(rate * (migrations * interval + 2.0))
        data = random.Random(7).randbytes(size)
        got = hashlib.sha256()
        arrivals: list[float] = []
        received = [0]
        state = _Sender(srv)
        pause, paused, resume = threading.Event(), threading.Event(), threading.Event()
        errors: list[BaseException] = []

        def reader() -> None:
            try:
                while received[0] < size:
                    b = cli.recv(65536)
                    if not b:
                        break
                    arrivals.append(time.monotonic())
                    got.update(b)
                    received[0] += len(b)
            except BaseException as exc:  # noqa: BLE001  (reported by the main thread)
                errors.append(exc)

        def writer() -> None:
            t0 = time.monotonic()
            try:
                while state.sent < size:
                    if pause.is_set():
                        paused.set()
                        resume.wait()
                        continue
                    due = (time.monotonic() - t0) * rate
                    if state.sent >= due:
                        time.sleep(0.001)
                        continue
                    s = state.sock
                    if not select.select([], [s], [], 0.01)[1]:
                        continue
                    try:
                        n = s.send(data[state.sent:state.sent + 16384], socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        continue
                    state.sent += n
                state.sock.shutdown(socket.SHUT_WR)
            except BaseException as exc:  # noqa: BLE001  (reported by the main thread)
                errors.append(exc)
            finally:
                paused.set()

        threads = [threading.Thread(target=reader, daemon=True), threading.Thread(target=writer, daemon=True)]
        for t in threads:
            t.start()
        moves: list[dict[str, float]] = []
        where = "a"
        for i in range(migrations):
            time.sleep(interval)
            resume.clear()
            pause.set()
            paused.wait(10)
            to = "b" if where == "a" else "a"
            t_hold = time.monotonic()
            new, timings = move(topo, state.sock, to)
            m: dict[str, float] = {**timings, "t_hold": t_hold, "t_release": time.monotonic()}
            state.sock = new
            where = to
            paused.clear()
            pause.clear()
            resume.set()
            moves.append(m)
            if errors:
                break
        for t in threads:
            t.join(60)
        state.sock.close()
        cli.close()
        if errors:
            raise RuntimeError(f"stream failed: {errors[0]!r}")
        if received[0] != size or got.hexdigest() != hashlib.sha256(data).hexdigest():
            raise RuntimeError(f"stream corrupted: {received[0]} of {size} bytes, sha256 mismatch")
        for m in moves:
            # the client's longest pause between reads that overlaps the move
            before = [a for a in arrivals if a <= m["t_hold"]]
            after = [a for a in arrivals if a >= m["t_release"]]
            m["client_gap"] = (after[0] - before[-1]) if before and after else float("nan")
        out: dict[str, Any] = {"migrations": len(moves), "stream_bytes": size, "rate": rate, "sha256_ok": True}
        for key in ("hold_to_release", "library", "get", "create", "activate", "address", "release", "hold",
                    "client_gap"):
            xs = [m[key] * 1000 for m in moves]
            out[key + "_ms"] = {"median": round(statistics.median(xs), 3), "p90": round(_pct(xs, 90), 3),
                                "max": round(max(xs), 3), "min": round(min(xs), 3)}
        out["queued_bytes_median"] = statistics.median(m["sent_queue"] + m["unsent_queue"] + m["recv_queue"]
                                                       for m in moves)
        return out
    finally:
        topo.down()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--migrations", type=int, default=100)
    p.add_argument("--interval", type=float, default=0.05, help="seconds between moves")
    p.add_argument("--rate", type=float, default=20e6, help="stream rate, bytes/s")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    reap_stale()
    res = run(args.migrations, args.interval, args.rate)
    text = json.dumps(res, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
