"""Helpers for the endpoint-passing tests: a client-side capture and its
checker, and a duplex stream whose server end can be paused and moved.

Theory of operation
-------------------
:class:`Capture` runs tcpdump in the client's namespace (headers only) for
the duration of a test.  :func:`check_capture` reads it back and judges
the server's side of one connection as the client saw it: no RST, no FIN
before the end, sequence numbers continuous (a data segment never starts
beyond the highest byte already seen: nothing skipped), acknowledgments
never going back, TSval never decreasing (PAWS, tcpcp 4.5).

:class:`Duplex` drives one connection both ways at once: the client (two
threads in ``rp-c``) writes a seeded byte stream at a bounded rate and
reads the server's; the server application (a thread) writes its own
seeded stream and reads, and can be *paused* so the test can take its
socket away, move the connection and hand it back.  The application's
state is its two counters; the bytes in the kernel's queues travel with
the ICI.  Both ends hash what they receive; the test compares the hashes
with the streams sent.
"""

from __future__ import annotations

import hashlib
import os
import random
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from appliance.pcap import packets
from checkpoint.seqnum import seq_diff


def stream(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# --- capture ------------------------------------------------------------------------

class Capture:
    """tcpdump in a namespace, writing headers of the matching packets to ``path``."""

    def __init__(self, ns: str, path: Path, bpf: str, iface: str = "eth0", snaplen: int = 128) -> None:
        self.path = path
        self.stats = ""
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, "tcpdump", "--immediate-mode", "-i", iface, "-n", "-U",
                                      "-s", str(snaplen),
                                      "-w", str(path), bpf], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # wait until it listens ("listening on ..." on stderr)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline().decode(errors="replace")
        if "listening" not in line:
            self.stop()
            raise RuntimeError(f"tcpdump did not start: {line.strip()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            time.sleep(0.2)             # let the last segments be written
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        assert self.proc.stderr is not None
        self.stats = self.proc.stderr.read().decode(errors="replace").strip()


def _tcp(p: bytes) -> tuple[str, int, str, int, int, int, int, int, int | None] | None:
    """(src, sport, dst, dport, seq, ack, flags, payload length, TSval) of an IPv4 or IPv6 TCP packet
    (IPv6: TCP right after the fixed header; the tests' packets carry no extension headers)."""
    if len(p) >= 60 and p[0] >> 4 == 6:
        if p[6] != 6:
            return None
        ihl = 40
        total = 40 + struct.unpack_from("!H", p, 4)[0]
    elif len(p) >= 40 and p[0] >> 4 == 4 and p[9] == 6:
        ihl = (p[0] & 15) * 4
        total = struct.unpack_from("!H", p, 2)[0]
    else:
        return None
    sport, dport, seq, ack, off_flags = struct.unpack_from("!HHIIH", p, ihl)
    thl = (off_flags >> 12) * 4
    flags = off_flags & 0x3F
    tsval = None
    opts = p[ihl + 20: ihl + thl]
    i = 0
    while i < len(opts):
        kind = opts[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= len(opts):
            break
        ln = opts[i + 1]
        if kind == 8 and ln == 10 and i + 10 <= len(opts):
            tsval = struct.unpack_from("!I", opts, i + 2)[0]
        i += max(ln, 2)
    if ihl == 40 and p[0] >> 4 == 6:
        src, dst = socket.inet_ntop(socket.AF_INET6, p[8:24]), socket.inet_ntop(socket.AF_INET6, p[24:40])
    else:
        src, dst = socket.inet_ntoa(p[12:16]), socket.inet_ntoa(p[16:20])
    return src, sport, dst, dport, seq, ack, flags, total - ihl - thl, tsval


@dataclass
class CaptureReport:
    segments: int = 0
    data_segments: int = 0
    rst: list[str] = field(default_factory=list)
    fin_early: list[str] = field(default_factory=list)
    gaps: list[str] = field(default_factory=list)
    ack_back: list[str] = field(default_factory=list)
    ts_back: list[str] = field(default_factory=list)
    server_bytes: int = 0

    @property
    def problems(self) -> list[str]:
        return self.rst + self.fin_early + self.gaps + self.ack_back + self.ts_back


# Two CPUs and veth queues reorder segments between the server's stack and
# the client's capture point (seen: a 6 KB segment overtaken by the next one,
# and two 64 KB GSO segments overtaken by a third).  A migration bug is not
# like that: a wrong sequence base is off by a random 32-bit number, and bytes
# skipped or repeated by a wrong queue length leave a hole in the coverage
# (and break the sha256 the tests compare).  So: the bytes the server sent
# must cover the stream without a hole; a single segment may start at most
# REORDER bytes beyond what came before it, an ACK lag the highest one by at
# most REORDER; a TSval may be below the highest by at most the kernel's own
# PAWS window (1 tick).
REORDER = 1 << 20
PAWS_WINDOW = 1


def check_capture(path: Path, server: tuple[str, int], expect_fin: bool = False) -> CaptureReport:
    """Judge the server side of the connection to ``server`` in a capture."""
    rep = CaptureReport()
    first: int | None = None
    high: int | None = None        # highest seq + len the server sent
    acked: int | None = None
    ts: int | None = None
    ranges: list[tuple[int, int]] = []   # stream offsets [start, end) of server data
    syn_seen = False
    for t, p in packets(path):
        f = _tcp(p)
        if f is None:
            continue
        src, sport, dst, dport, seq, ack, flags, plen, tsval = f
        from_server = (src, sport) == server
        if not from_server and (dst, dport) != server:
            continue
        if flags & 0x04:
            rep.rst.append(f"RST from {'server' if from_server else 'client'} at {t:.6f}")
        if not from_server:
            continue
        rep.segments += 1
        if first is None:
            syn_seen = bool(flags & 0x02)
            first = high = (seq + 1) & 0xFFFFFFFF if syn_seen else seq
        assert high is not None
        if flags & 0x01 and not expect_fin:
            rep.fin_early.append(f"FIN from the server at {t:.6f}")
        if plen:
            rep.data_segments += 1
            if seq_diff(seq, high) > REORDER:
                rep.gaps.append(f"data at {seq}, {seq_diff(seq, high)} bytes beyond what the client has seen ({t:.6f})")
            start = seq_diff(seq, first)
            ranges.append((start, start + plen))
            end = (seq + plen) & 0xFFFFFFFF
            if seq_diff(end, high) > 0:
                high = end
        elif not flags & 0x02 and seq_diff(seq, high) > REORDER:
            rep.gaps.append(f"empty segment at {seq} beyond {high} ({t:.6f})")
        if flags & 0x10:
            if acked is not None and seq_diff(acked, ack) > REORDER:
                rep.ack_back.append(f"ack {ack} below {acked} ({t:.6f})")
            if acked is None or seq_diff(ack, acked) > 0:
                acked = ack
        if tsval is not None:
            if ts is not None and seq_diff(ts, tsval) > PAWS_WINDOW:
                rep.ts_back.append(f"TSval {tsval} below {ts} ({t:.6f})")
            if ts is None or seq_diff(tsval, ts) > 0:
                ts = tsval
    # from the SYN-ACK on, the stream starts at ISN + 1; a capture started
    # mid-connection starts at the lowest byte it saw
    covered = 0 if syn_seen or not ranges else min(r[0] for r in ranges)
    for start, end in sorted(ranges):
        if start > covered:
            rep.gaps.append(f"stream bytes {covered}..{start} never sent by the server")
        covered = max(covered, end)
    rep.server_bytes = covered - (0 if syn_seen or not ranges else min(r[0] for r in ranges))
    return rep


# --- a duplex stream with a movable server end ------------------------------------------

class ServerApp:
    """The application owning the server end: writes ``out``, hashes what it reads."""

    def __init__(self, sock: socket.socket, out: bytes, expect_in: int) -> None:
        self.sock = sock
        self.out = out
        self.expect_in = expect_in
        self.sent = 0
        self.received = 0
        self.hash = hashlib.sha256()
        self.error: BaseException | None = None
        self._pause = threading.Event()
        self._paused = threading.Event()
        self._resume = threading.Event()
        self.thread = threading.Thread(target=self._run, name="server-app", daemon=True)

    def start(self) -> ServerApp:
        self.thread.start()
        return self

    def pause(self, timeout: float = 5.0) -> socket.socket:
        """Stop touching the socket; returns it (the caller may take it away)."""
        self._resume.clear()
        self._pause.set()
        if not self._paused.wait(timeout):
            raise TimeoutError(f"server app did not pause (error: {self.error!r})")
        return self.sock

    def resume(self, sock: socket.socket) -> None:
        self.sock = sock
        self._paused.clear()
        self._pause.clear()
        self._resume.set()

    def _run(self) -> None:
        try:
            while self.received < self.expect_in or self.sent < len(self.out):
                if self._pause.is_set():
                    self._paused.set()
                    self._resume.wait()
                    continue
                s = self.sock
                w = [s] if self.sent < len(self.out) else []
                r, wr, _ = select.select([s], w, [], 0.02)
                if r:
                    data = s.recv(65536, socket.MSG_DONTWAIT)
                    if not data:
                        raise EOFError(f"client closed after {self.received} bytes")
                    self.received += len(data)
                    self.hash.update(data)
                if wr:
                    try:
                        n = s.send(self.out[self.sent:self.sent + 65536], socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        n = 0
                    self.sent += n
            self.sock.shutdown(socket.SHUT_WR)
        except BaseException as exc:  # noqa: BLE001  (the test asserts on it)
            self.error = exc
        finally:
            self._paused.set()


class Client:
    """Both directions of the client end, rate-bounded so queues are busy when a move comes."""

    def __init__(self, sock: socket.socket, out: bytes, expect_in: int, rate: float) -> None:
        self.sock = sock
        self.out = out
        self.expect_in = expect_in
        self.rate = rate                   # bytes per second, each direction
        self.buf = bytearray()
        self.sent = 0
        self.errors: list[BaseException] = []
        self.reader = threading.Thread(target=self._read, name="client-read", daemon=True)
        self.writer = threading.Thread(target=self._write, name="client-write", daemon=True)

    def start(self) -> Client:
        self.reader.start()
        self.writer.start()
        return self

    def _pace(self, t0: float, done: int) -> None:
        ahead = done / self.rate - (time.monotonic() - t0)
        if ahead > 0:
            time.sleep(ahead)

    def _read(self) -> None:
        try:
            t0 = time.monotonic()
            while True:
                data = self.sock.recv(32768)
                if not data:
                    return
                self.buf += data
                self._pace(t0, len(self.buf))
        except BaseException as exc:  # noqa: BLE001  (the test asserts on it)
            self.errors.append(exc)

    def _write(self) -> None:
        try:
            t0 = time.monotonic()
            while self.sent < len(self.out):
                n = self.sock.send(self.out[self.sent:self.sent + 16384])
                self.sent += n
                self._pace(t0, self.sent)
        except BaseException as exc:  # noqa: BLE001  (the test asserts on it)
            self.errors.append(exc)

    def join(self, timeout: float) -> None:
        self.writer.join(timeout)
        self.reader.join(timeout)


def kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
