"""Measurement tools for HTTP traffic through the gateway (lab tests and benchmarks).

Three measures, each usable as a function (returning dataclasses) and from the
command line (``python -m appliance.lab.httpload crowd|paced|pauses|recovery``,
one JSON document on stdout):

**crowd** - many keep-alive connections sending requests back to back, run by
``wrk`` in a lab namespace (``ip netns exec lab-client wrk ...``).  wrk's own
summary gives the totals (requests, socket errors by kind, its latency
histogram); a Lua script the tool writes to a temporary directory records, per
response, the completion time (``clock_gettime(CLOCK_REALTIME)`` through
LuaJIT's ``ffi``, microseconds), the status and that request's own latency.
wrk's callbacks do not say which connection they are about (``request()`` and
``response()`` get no connection, and one wrk thread multiplexes many), so the
latency is matched by a request id: ``request()`` puts ``X-Httpload-Id:
<thread>.<n>`` in each request and keeps its start time, and the lab's nginx
echoes the header (``add_header X-Httpload-Id $http_x_httpload_id``), so
``response()`` finds its own request's start, also when the request was
replayed to another server.  When a wrk thread has a single connection, the
last ``request()`` is necessarily the one answered and no echo is needed.
Against a server that echoes nothing, per-request latencies are unknown and
the slowest latency is wrk's histogram maximum (which leaves out, as wrk
does, every request slower than ``--timeout``: wrk counts those as
"timeout" errors when they complete).  wrk never gives up on a request: a
connection whose answer never comes is silently stuck to the end of the run,
which no wrk counter shows; the tool reports such requests as
``unanswered_over_timeout`` (started more than ``timeout`` before wrk's end).
From the records: a request-rate timeline in 100 ms bins and, for a failover
at a known wall-clock time, :func:`recovery` (the rate before the cut, how long
until it is back to 90 % of it, where it settled, the slowest request
completing after the cut).

**paced** - many downloads at once, each read at a fixed rate, by one asyncio
process in a lab namespace (500 downloads at 64 KiB/s cost about a tenth of
a core; 500 curl processes would cost far more).  Each download reads
``rate x tick`` bytes every ``tick`` while data is there, and as it arrives
when it is not (a token bucket of one read: after a pause it goes on at
``rate``, no catch-up burst, unlike curl's ``--limit-rate``).  Every socket
gets a small ``SO_RCVBUF`` (set before ``connect``, so the advertised window
stays small): the sender can only run ahead of the reader by about that
much.  Reports per download: the error if any, the HTTP status, the body's
sha256 and size, its local port (to find it in a capture), and two pause
measures:

* ``max_gap_s``: the longest time between two reads that returned data (from
  the first response byte on).  This is what the *application* sees: a
  network pause shorter than the time the reader needs to drain the socket
  buffer (at most about 2 x ``rcvbuf`` / ``rate``) does not show at all, a
  longer one shows shortened by that time.  The reads are paced every
  ``tick`` seconds, so ``tick`` is the floor of this measure.
* ``max_arrival_gap_s``: the longest time between two data *arrivals* at the
  socket as the kernel saw them (``TCP_INFO.tcpi_last_data_recv``, sampled at
  every read): not hidden by the buffer, never shorter than the pause on
  the wire (arrivals between two reads are seen as the latest of them, so
  it can be longer by up to a ``tick`` while data flows), a few ms of
  jiffies either way; in the lab it matches the capture's pause to ~10 ms.

Both are pauses *at the client*: a server (or gateway) that stops sending
shows there only once the data already queued in the sender's socket has
drained into the window, so the client's pause is shorter than the sender's.

**pauses** - the authoritative pause at the client, from a capture taken
there (``tcpdump -s 96``: the TCP header is enough, the payload length comes
from the IP header): per connection, the longest gap between server-to-client
packets that carry *new* data (retransmissions of bytes already seen do not
end a pause), optionally only the gaps that overlap a window around a time
(the cut).

Addresses come only from the caller (the lab's); every load is bounded in
connections and time, and every process the tools start is ended, also on
failure.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import hashlib
import ipaddress
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from checkpoint.addr import pack, unpack, with_port

from ..pcap import packets, tcp_fields

BIN_S = 0.1
ID_HEADER = "X-Httpload-Id"
DEFAULT_NS = "lab-client"
ERROR_KINDS = ("connect", "read", "write", "timeout")


# --- crowd: wrk ---------------------------------------------------------------------

WRK_SCRIPT = r"""-- written by appliance.lab.httpload: one line per response, "<done_us> <status> <latency_us|-1>"
local ffi = require("ffi")
ffi.cdef[[
struct httpload_ts { long tv_sec; long tv_nsec; };
int clock_gettime(int clk_id, struct httpload_ts *tp);
]]
local ts = ffi.new("struct httpload_ts[1]")
local function now_us()
   ffi.C.clock_gettime(0, ts)  -- CLOCK_REALTIME
   return tonumber(ts[0].tv_sec) * 1000000 + math.floor(tonumber(ts[0].tv_nsec) / 1000)
end

local dir = os.getenv("HTTPLOAD_DIR")
local single = os.getenv("HTTPLOAD_SINGLE") == "1"
local IDH, IDH_LC = "ID_HEADER", string.lower("ID_HEADER")

-- the main state: setup() and done()
local threads = {}
function setup(thread)
   table.insert(threads, thread)
   thread:set("tid", #threads)
end

-- each thread's own state; globals are read back by done() with thread:get
rows, nrows, echoed, seq = {}, 0, 0, 0
starts, last_start, last_answered = {}, nil, true
local out, verify

function init(args)
   out = assert(io.open(dir .. "/thread-" .. tid .. ".txt", "w"))
   out:setvbuf("no")
   if single then starts = nil end
   -- wrk calls the first thread's request() once before it runs, to count pipelined requests
   verify = tid == 1
end

function request()
   if verify then
      verify = false
      return wrk.format()
   end
   local t = now_us()
   seq = seq + 1
   local id = tid .. "." .. seq
   if starts ~= nil then starts[id] = t end
   last_start, last_answered = t, false
   wrk.headers[IDH] = id
   return wrk.format()
end

function response(status, headers, body)
   local t = now_us()
   local lat = -1
   local id = headers[IDH] or headers[IDH_LC]
   local s = id ~= nil and starts ~= nil and starts[id] or nil
   if s ~= nil then
      lat = t - s
      starts[id] = nil
      echoed = echoed + 1
   elseif single and last_start ~= nil then
      lat = t - last_start
   end
   last_answered = true
   if starts ~= nil and echoed == 0 and seq > 10000 then starts = nil end  -- no echo: keep no table
   nrows = nrows + 1
   rows[nrows] = string.format("%d %d %d", t, status, lat)
   if nrows >= 4096 then
      out:write(table.concat(rows, "\n", 1, nrows), "\n")
      rows, nrows = {}, 0
   end
end

function done(summary, latency, requests)
   for i, t in ipairs(threads) do
      local f = assert(io.open(dir .. "/thread-" .. i .. ".txt", "a"))
      local n = t:get("nrows")
      if n > 0 then f:write(table.concat(t:get("rows"), "\n", 1, n), "\n") end
      f:close()
      local g = assert(io.open(dir .. "/inflight-" .. i .. ".txt", "w"))
      local st = t:get("starts")
      if st ~= nil then
         for _, v in pairs(st) do g:write(string.format("%d\n", v)) end
      elseif not t:get("last_answered") then
         g:write(string.format("%d\n", t:get("last_start")))
      end
      g:close()
   end
   local e = summary.errors
   local s = assert(io.open(dir .. "/summary.txt", "w"))
   s:write(string.format("end_us %d\nrequests %d\nduration_us %d\nbytes %d\n", now_us(), summary.requests,
                         summary.duration, summary.bytes))
   s:write(string.format("connect %d\nread %d\nwrite %d\ntimeout %d\nstatus %d\n", e.connect, e.read, e.write,
                         e.timeout, e.status))
   s:write(string.format("latency_max_us %d\nlatency_mean_us %d\nlatency_p99_us %d\n", latency.max, latency.mean,
                         latency:percentile(99)))
   s:close()
end
""".replace("ID_HEADER", ID_HEADER)


@dataclass(frozen=True)
class Response:
    """One response wrk received: completion (wall clock, s), status, and the
    request's own latency (s; None when it could not be matched)."""
    t: float
    status: int
    latency: float | None


@dataclass
class WrkSummary:
    """What wrk prints at the end of a run (its stdout)."""
    requests: int = 0
    runtime_s: float = 0.0
    bytes_read: float = 0.0         # approximate: wrk prints it rounded ("12.34MB")
    errors: dict[str, int] = field(default_factory=lambda: {k: 0 for k in ERROR_KINDS})
    status_errors: int = 0          # wrk's "Non-2xx or 3xx responses": status > 399
    requests_per_s: float = 0.0
    latency_avg_ms: float | None = None
    latency_max_ms: float | None = None   # wrk's histogram: leaves out requests slower than --timeout


_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_BIN_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def _wrk_time(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"not a wrk time: {text!r}")
    return float(m.group(1)) * _TIME_UNITS[m.group(2)]


def parse_wrk_output(text: str) -> WrkSummary:
    """Parse wrk's (4.x) summary from its stdout."""
    s = WrkSummary()
    m = re.search(r"^\s*(\d+) requests in ([\d.]+(?:us|ms|s|m|h)), ([\d.]+)([KMGTP]?)B read", text, re.M)
    if m:
        s.requests = int(m.group(1))
        s.runtime_s = _wrk_time(m.group(2))
        s.bytes_read = float(m.group(3)) * _BIN_UNITS[m.group(4)]
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        s.errors = {k: int(v) for k, v in zip(ERROR_KINDS, m.groups())}
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        s.status_errors = int(m.group(1))
    m = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if m:
        s.requests_per_s = float(m.group(1))
    m = re.search(r"^\s+Latency\s+(\S+)\s+(\S+)\s+(\S+)", text, re.M)
    if m:
        try:
            s.latency_avg_ms = _wrk_time(m.group(1)) * 1e3
            s.latency_max_ms = _wrk_time(m.group(3)) * 1e3
        except ValueError:  # "-nan" and the like when nothing completed
            pass
    return s


def timeline(times: Iterable[float], start: float, bin_s: float = BIN_S,
             end: float | None = None) -> list[tuple[float, int]]:
    """Counts of ``times`` in bins of ``bin_s`` from ``start``: ``[(t_rel_s, count)]``
    for every bin up to the last time (or ``end``), empty bins included."""
    counts: dict[int, int] = {}
    last = -1
    for t in times:
        if t < start:
            continue
        i = math.floor((t - start) / bin_s + 1e-9)
        counts[i] = counts.get(i, 0) + 1
        last = max(last, i)
    if end is not None:  # every bin that begins before ``end``
        last = max(last, math.ceil((end - start) / bin_s - 1e-9) - 1)
    return [(round(i * bin_s, 6), counts.get(i, 0)) for i in range(last + 1)]


@dataclass
class Recovery:
    """The crowd's rate around a cut (wall-clock time ``cut``)."""
    cut: float
    before_s: float
    rate_before: float                 # requests/s in [cut - before_s, cut)
    threshold: float                   # fraction x rate_before
    recovery_s: float | None           # cut -> rate back to the threshold (and staying there); None: never
    lowest_rate: float | None          # the lowest rate over smooth_s after the cut (req/s)
    rate_end: float | None             # where it settled: the rate over the last before_s (at most the
                                       # later half of the data after the cut)
    requests_after_cut: int
    slowest_after_cut_ms: float | None  # slowest request completing after the cut
    slowest_after_cut_at: float | None  # when it completed, s after the cut
    slowest_after_cut_started: float | None  # when it started, s after the cut (negative: before)


def recovery(responses: Sequence[Response], cut: float, before_s: float = 5.0, fraction: float = 0.9,
             smooth_s: float = BIN_S, hold_s: float = 1.0, bin_s: float = BIN_S,
             end: float | None = None) -> Recovery:
    """How the request rate took a cut at wall-clock time ``cut``.

    ``rate_before``: requests completed in the ``before_s`` seconds before the
    cut, per second; the threshold is ``fraction`` of it.  The time after the
    cut is split in bins of ``bin_s`` starting at the cut.  ``recovery_s`` is
    the start of the first bin ``k`` from which the rate is back and stays
    back: for every span from ``k`` of ``smooth_s`` up to ``hold_s`` (in whole
    bins), the rate over ``[k, k + span)`` is at least the threshold.  So a
    bin inside the outage never passes (a catch-up burst after it cannot make
    the recovery look earlier than by part of one bin), a rate back to normal
    passes at once (0 when the cut never dented it), and later noise averages
    out.  Raise ``smooth_s`` for low rates (a few requests per bin).  None: not
    back before the end of the data (``rate_end`` then tells whether the rate
    settled lower, or stayed down).  ``end``: when the load stopped (default:
    the last completion, the best guess: wrk's own end comes up to 100 ms
    after its last request); the last, partial bin is left out."""
    times = sorted(r.t for r in responses)
    lo = bisect.bisect_left(times, cut - before_s)
    hi = bisect.bisect_left(times, cut)
    rate_before = (hi - lo) / before_s
    threshold = fraction * rate_before
    stop = end if end is not None else (times[-1] if times else cut)
    nbins = max(0, math.floor((stop - cut) / bin_s + 1e-9))  # complete bins only
    counts = [0] * nbins
    for t in times[hi:]:
        i = math.floor((t - cut) / bin_s + 1e-9)
        if i < nbins:
            counts[i] += 1
    w = max(1, round(smooth_s / bin_s))
    h = max(w, round(hold_s / bin_s))
    smoothed = [sum(counts[i:i + w]) / (w * bin_s) for i in range(0, nbins - w + 1)]
    rec: float | None = None
    for k in range(nbins - w + 1):
        total = sum(counts[k:k + w - 1])
        for j in range(w - 1, min(h, nbins - k)):
            total += counts[k + j]
            if total < threshold * (j + 1) * bin_s:
                break
        else:
            rec = round(k * bin_s, 9)
            break
    tail = max(cut + (stop - cut) / 2, stop - before_s)  # the later half at most: after the outage
    rate_end = (sum(1 for t in times[hi:] if tail <= t < stop) / (stop - tail)) if stop - tail >= bin_s else None
    after = [r for r in responses if r.t >= cut and r.latency is not None]
    slow = max(after, key=lambda r: r.latency or 0.0) if after else None
    return Recovery(
        cut=cut, before_s=before_s, rate_before=rate_before, threshold=threshold, recovery_s=rec,
        lowest_rate=min(smoothed) if smoothed else None, rate_end=rate_end, requests_after_cut=len(times) - hi,
        slowest_after_cut_ms=None if slow is None or slow.latency is None else slow.latency * 1e3,
        slowest_after_cut_at=None if slow is None else slow.t - cut,
        slowest_after_cut_started=None if slow is None or slow.latency is None else slow.t - slow.latency - cut,
    )


@dataclass
class CrowdResult:
    url: str
    ns: str | None
    connections: int               # as run: wrk gives each thread connections // threads
    threads: int
    duration_s: float
    timeout_s: float
    started_at: float              # wall clock when wrk was started
    ended_at: float                # wall clock when wrk ended
    requests: int                  # wrk's total of completed requests
    recorded: int                  # responses the script recorded (= requests unless wrk was cut short)
    rate: float                    # requests / wrk's runtime
    errors: dict[str, int]         # wrk's socket errors: connect, read, write, timeout (>= timeout_s, on completion)
    socket_errors: int             # their sum
    non_2xx: int                   # recorded responses whose status is not 2xx
    wrk_status_errors: int         # wrk's "Non-2xx or 3xx responses" (status > 399)
    unanswered_over_timeout: int   # requests never answered that started more than timeout_s before the end
    max_latency_ms: float | None   # the slowest request
    latency_source: str            # "per-request" | "wrk-histogram" | "mixed" | "none"
    wrk_max_latency_ms: float | None  # wrk's histogram maximum (excludes requests slower than timeout_s)
    timeline: list[tuple[float, int]]  # [(t_rel_s from started_at, completions in the bin)]
    bin_s: float
    wrk_exit: int
    wrk_stderr: str
    recovery: Recovery | None = None
    responses: list[Response] = field(default_factory=list, repr=False)

    def recovery_at(self, cut: float, **kwargs: Any) -> Recovery:
        """:func:`recovery` for a cut at wall-clock time ``cut`` during this run."""
        return recovery(self.responses, cut, **kwargs)

    def to_json(self, with_responses: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["timeline"] = [list(b) for b in self.timeline]
        if not with_responses:
            del d["responses"]
        else:
            d["responses"] = [[r.t, r.status, r.latency] for r in self.responses]
        return d


def _ns_prefix(ns: str | None) -> list[str]:
    return ["ip", "netns", "exec", ns] if ns else []


def _raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


class CrowdRun:
    """A running crowd (``wrk``): :meth:`wait` for its :class:`CrowdResult`,
    :meth:`stop` to end it early; as a context manager it always ends wrk and
    removes its temporary files."""

    def __init__(self, url: str, connections: int = 100, duration: int = 10, threads: int = 2,
                 timeout: int = 2, ns: str | None = DEFAULT_NS, wrk: str = "wrk") -> None:
        # wrk takes whole seconds only (its -d and --timeout)
        if connections < 1 or duration < 1 or timeout < 1:
            raise ValueError("connections, duration and timeout must be >= 1")
        self.url = url
        self.ns = ns
        self.threads = max(1, min(threads, connections))
        self.connections = connections // self.threads * self.threads
        self.duration = duration
        self.timeout = timeout
        self.dir = Path(tempfile.mkdtemp(prefix="httpload-"))
        script = self.dir / "record.lua"
        script.write_text(WRK_SCRIPT)
        env = dict(os.environ, HTTPLOAD_DIR=str(self.dir),
                   HTTPLOAD_SINGLE="1" if self.connections == self.threads else "0")
        cmd = [*_ns_prefix(ns), wrk, "-t", str(self.threads), "-c", str(self.connections),
               "-d", f"{int(duration)}s", "--timeout", f"{int(timeout)}s",
               "-s", str(script), url]
        self.started_at = time.time()
        try:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                         start_new_session=True, stdin=subprocess.DEVNULL,
                                         preexec_fn=lambda: _raise_nofile(self.connections + 64))
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.ended_at: float | None = None
        self._out: tuple[str, str] | None = None

    def running(self) -> bool:
        return self.proc.poll() is None

    def _collect(self, timeout: float) -> None:
        if self._out is None:
            self._out = self.proc.communicate(timeout=timeout)
            self.ended_at = time.time()

    def stop(self) -> None:
        """End wrk now (its summary and the records not yet written are lost)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self._collect(10)
        except subprocess.TimeoutExpired:
            pass

    def wait(self, timeout: float | None = None) -> CrowdResult:
        """Wait for wrk (at most ``timeout``, default its duration + 30 s: then it
        is killed) and collect the result."""
        try:
            self._collect(timeout if timeout is not None else self.duration + 30)
        except subprocess.TimeoutExpired:
            self.stop()
        return self._result()

    def _result(self) -> CrowdResult:
        stdout, stderr = self._out or ("", "")
        summary = parse_wrk_output(stdout or "")
        extra = _read_kv(self.dir / "summary.txt")
        responses = read_records(sorted(self.dir.glob("thread-*.txt")))
        end = extra["end_us"] / 1e6 if "end_us" in extra else (self.ended_at or time.time())
        inflight: list[float] = []
        for f in self.dir.glob("inflight-*.txt"):
            inflight += [int(x) / 1e6 for x in f.read_text().split()]
        lat = [r.latency for r in responses if r.latency is not None]
        hist_max = extra["latency_max_us"] / 1e3 if "latency_max_us" in extra else summary.latency_max_ms
        if responses and len(lat) == len(responses):
            max_ms: float | None = max(lat) * 1e3
            source = "per-request"
        elif lat:
            max_ms, source = max(max(lat) * 1e3, hist_max or 0.0), "mixed"
        elif hist_max is not None and summary.requests:
            max_ms, source = hist_max, "wrk-histogram"
        else:
            max_ms, source = None, "none"
        errors = summary.errors
        runtime = extra["duration_us"] / 1e6 if "duration_us" in extra else summary.runtime_s
        requests = int(extra.get("requests", summary.requests))
        if not stdout:  # wrk was killed: what the script had written is all there is
            requests = len(responses)
            runtime = (self.ended_at or end) - self.started_at
        return CrowdResult(
            url=self.url, ns=self.ns, connections=self.connections, threads=self.threads,
            duration_s=self.duration, timeout_s=self.timeout, started_at=self.started_at,
            ended_at=self.ended_at or end, requests=requests, recorded=len(responses),
            rate=requests / runtime if runtime else 0.0, errors=errors, socket_errors=sum(errors.values()),
            non_2xx=sum(1 for r in responses if not 200 <= r.status < 300),
            wrk_status_errors=summary.status_errors,
            unanswered_over_timeout=sum(1 for t in inflight if t < end - self.timeout),
            max_latency_ms=max_ms, latency_source=source, wrk_max_latency_ms=hist_max,
            timeline=timeline((r.t for r in responses), self.started_at), bin_s=BIN_S,
            wrk_exit=self.proc.returncode if self.proc.returncode is not None else -1,
            wrk_stderr=(stderr or "").strip()[-2000:], responses=responses,
        )

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> CrowdRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_kv(path: Path) -> dict[str, float]:
    try:
        text = path.read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        try:
            out[k] = float(v)
        except ValueError:
            pass
    return out


def read_records(files: Iterable[Path]) -> list[Response]:
    """The script's records ("<done_us> <status> <latency_us|-1>" lines), sorted by completion."""
    out = []
    for f in files:
        for line in f.read_text().splitlines():
            parts = line.split()
            if len(parts) != 3:
                continue  # a line cut short by a killed wrk
            t, status, lat = (int(p) for p in parts)
            out.append(Response(t / 1e6, status, lat / 1e6 if lat >= 0 else None))
    out.sort(key=lambda r: r.t)
    return out


def start_crowd(url: str, connections: int = 100, duration: int = 10, threads: int = 2,
                timeout: int = 2, ns: str | None = DEFAULT_NS) -> CrowdRun:
    """Start a crowd and return at once (to cut a link mid-run): use it as a
    context manager and call ``wait()``."""
    return CrowdRun(url, connections=connections, duration=duration, threads=threads, timeout=timeout, ns=ns)


def crowd(url: str, connections: int = 100, duration: int = 10, threads: int = 2,
          timeout: int = 2, ns: str | None = DEFAULT_NS, cut: float | None = None,
          before_s: float = 5.0) -> CrowdResult:
    """Run a crowd to its end; with ``cut`` (wall clock), its :class:`Recovery` too."""
    with start_crowd(url, connections, duration, threads, timeout, ns) as run:
        res = run.wait()
    if cut is not None:
        res.recovery = res.recovery_at(cut, before_s=before_s)
    return res


# --- paced downloads -------------------------------------------------------------------

@dataclass
class Download:
    index: int
    local_port: int | None
    ok: bool
    error: str | None              # None when ok
    status: int | None             # HTTP status
    sha256: str | None             # of the body received (also when incomplete)
    bytes: int                     # body bytes received
    content_length: int | None
    started_at: float              # wall clock: connect
    first_byte_at: float | None
    ended_at: float
    max_gap_s: float               # longest time between two reads returning data (application view)
    max_gap_start: float | None    # wall clock of the read before that gap
    max_arrival_gap_s: float | None  # longest time between data arrivals (kernel view, sampled at reads)
    max_arrival_gap_start: float | None
    last_data_at: float | None


@dataclass
class PacedResult:
    url: str
    ns: str | None
    count: int
    rate: int                      # bytes/s per download
    rcvbuf: int
    tick: float
    started_at: float
    ended_at: float
    ok: int
    failed: int
    errors: dict[str, int]         # error -> count
    max_gap_s: float               # the largest of the downloads'
    max_arrival_gap_s: float | None
    downloads: list[Download]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> PacedResult:
        d = {k: v for k, v in d.items() if k in PacedResult.__dataclass_fields__}  # not "kind"
        d["downloads"] = [Download(**x) for x in d["downloads"]]
        return PacedResult(**d)


def parse_size(text: str | int) -> int:
    """``"64k"`` -> 65536 (k, m, g: powers of 1024, as curl's ``--limit-rate``)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)[bB]?\s*", text)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return int(float(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()])


_TCP_INFO_LAST_DATA_RECV = 52  # struct tcp_info: 8 bytes of u8 fields, 9 u32, last_data_sent, last_ack_sent, ...


class _Dl:
    """One paced download's state (shared with the watchdog)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.task: asyncio.Task[Download] | None = None
        self.abort: str | None = None
        self.last_activity = time.monotonic()
        self.done = False


async def _paced_one(st: _Dl, addr: tuple[str, int], request: bytes, rate: int, rcvbuf: int,
                     tick: float) -> Download:
    loop = asyncio.get_running_loop()
    chunk = max(1024, int(rate * tick))
    h = hashlib.sha256()
    started = time.time()
    local_port: int | None = None
    status: int | None = None
    length: int | None = None
    body = 0
    head = b""
    in_body = False
    first: float | None = None
    last: float | None = None
    max_gap, gap_start = 0.0, None
    prev_arrival: float | None = None
    max_agap: float | None = None
    agap_start: float | None = None
    error: str | None = None
    # a token bucket of one chunk: reads of ``chunk`` bytes every ``tick`` while data is
    # there, reads as data arrives when it is not; never a catch-up burst after a pause
    tokens = float(chunk)
    refilled = time.monotonic()
    sock = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await loop.sock_connect(sock, addr)
        local_port = sock.getsockname()[1]
        st.last_activity = time.monotonic()
        await loop.sock_sendall(sock, request)
        while True:
            mono = time.monotonic()
            tokens = min(float(chunk), tokens + rate * (mono - refilled))
            refilled = mono
            if tokens < chunk / 2:
                await asyncio.sleep((chunk - tokens) / rate)
                continue
            data = await loop.sock_recv(sock, chunk)
            tokens -= len(data)
            now = time.time()
            if not data:
                if st.abort:
                    error = st.abort
                elif not in_body:
                    error = "closed before the response header"
                elif length is not None and body < length:
                    error = "short body"
                break
            st.last_activity = time.monotonic()
            if first is None:
                first = now
            if last is not None and now - last > max_gap:
                max_gap, gap_start = now - last, last
            last = now
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
            if len(info) >= _TCP_INFO_LAST_DATA_RECV + 4:
                arrival = now - struct.unpack_from("I", info, _TCP_INFO_LAST_DATA_RECV)[0] / 1e3
                if prev_arrival is None:
                    prev_arrival, max_agap = arrival, 0.0
                elif arrival > prev_arrival + 0.005:  # a new arrival (jiffies are coarse)
                    if max_agap is None or arrival - prev_arrival > max_agap:
                        max_agap, agap_start = arrival - prev_arrival, prev_arrival
                    prev_arrival = arrival
            if not in_body:
                head += data
                end = head.find(b"\r\n\r\n")
                if end < 0:
                    if len(head) > 65536:
                        error = "response header too long"
                        break
                    continue
                in_body = True
                status, length, te = _parse_head(head[:end])
                if te:
                    error = f"transfer-encoding {te} not supported"
                    break
                data = head[end + 4:]
            h.update(data)
            body += len(data)
            if length is not None and body >= length:
                break
        if error is None and status != 200:
            error = f"HTTP {status}"
    except asyncio.CancelledError:
        error = st.abort or "cancelled"
    except ConnectionRefusedError:
        error = "connect: refused"
    except ConnectionResetError:
        error = "reset"
    except OSError as e:
        error = f"{type(e).__name__}: {e.strerror or e}"
    finally:
        st.done = True
        sock.close()
    return Download(
        index=st.index, local_port=local_port, ok=error is None, error=error, status=status,
        sha256=h.hexdigest() if in_body else None, bytes=body, content_length=length, started_at=started,
        first_byte_at=first, ended_at=time.time(), max_gap_s=max_gap, max_gap_start=gap_start,
        max_arrival_gap_s=max_agap, max_arrival_gap_start=agap_start, last_data_at=last,
    )


def _parse_head(head: bytes) -> tuple[int | None, int | None, str | None]:
    """(status, content-length, transfer-encoding) of a response header."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split()
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    length: int | None = None
    te: str | None = None
    for line in lines[1:]:
        k, _, v = line.partition(":")
        k = k.strip().lower()
        if k == "content-length" and v.strip().isdigit():
            length = int(v.strip())
        elif k == "transfer-encoding" and v.strip().lower() != "identity":
            te = v.strip()
    return status, length, te


async def _paced_all(url: str, count: int, rate: int, rcvbuf: int, tick: float, timeout: float,
                     idle_timeout: float, ramp_s: float) -> PacedResult:
    u = urlsplit(url)
    if u.scheme != "http" or not u.hostname:
        raise ValueError(f"only http:// URLs: {url!r}")
    host = u.hostname
    port = u.port or 80
    addr = (str(ipaddress.ip_address(host)) if _is_ip(host) else socket.gethostbyname(host), port)
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    hosthdr = with_port(host, port) if port != 80 else (f"[{host}]" if ":" in host else host)
    request = (f"GET {path} HTTP/1.1\r\nHost: {hosthdr}\r\nUser-Agent: appliance-httpload\r\n"
               f"Accept: */*\r\nConnection: close\r\n\r\n").encode()
    started = time.time()
    t0 = time.monotonic()
    states = [_Dl(i) for i in range(count)]

    async def one(st: _Dl) -> Download:
        if ramp_s > 0:
            await asyncio.sleep(ramp_s * st.index / count)
        st.last_activity = time.monotonic()
        return await _paced_one(st, addr, request, rate, rcvbuf, tick)

    for st in states:
        st.task = asyncio.create_task(one(st))

    async def watchdog() -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for st in states:
                if st.done or st.task is None:
                    continue
                if now - t0 > timeout:
                    st.abort = "timeout"
                elif now - st.last_activity > idle_timeout:
                    st.abort = "idle timeout"
                else:
                    continue
                st.task.cancel()

    dog = asyncio.create_task(watchdog())
    try:
        results = await asyncio.gather(*(st.task for st in states if st.task is not None))
    finally:
        dog.cancel()
    errors: dict[str, int] = {}
    for d in results:
        if d.error:
            errors[d.error] = errors.get(d.error, 0) + 1
    agaps = [d.max_arrival_gap_s for d in results if d.max_arrival_gap_s is not None]
    return PacedResult(
        url=url, ns=None, count=count, rate=rate, rcvbuf=rcvbuf, tick=tick, started_at=started,
        ended_at=time.time(), ok=sum(1 for d in results if d.ok), failed=sum(1 for d in results if not d.ok),
        errors=errors, max_gap_s=max((d.max_gap_s for d in results), default=0.0),
        max_arrival_gap_s=max(agaps) if agaps else None, downloads=list(results),
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def paced(url: str, count: int = 500, rate: int | str = "64k", rcvbuf: int | str = "16k", tick: float = 0.1,
          timeout: float = 300.0, idle_timeout: float = 30.0, ramp_s: float = 0.0,
          ns: str | None = DEFAULT_NS) -> PacedResult:
    """``count`` downloads of ``url`` at once, each read at ``rate`` bytes/s
    (reads of ``rate * tick`` bytes every ``tick`` s) through a socket with
    ``SO_RCVBUF = rcvbuf``; in namespace ``ns`` (a child process there), or
    in this process when ``ns`` is None.  A download fails after ``timeout``
    s in all or ``idle_timeout`` s without data; ``ramp_s`` spreads the starts."""
    rate_b, rcvbuf_b = parse_size(rate), parse_size(rcvbuf)
    if count < 1 or rate_b < 1 or tick <= 0:
        raise ValueError("count, rate and tick must be positive")
    if not ns:
        _raise_nofile(count + 64)
        return asyncio.run(_paced_all(url, count, rate_b, rcvbuf_b, tick, timeout, idle_timeout, ramp_s))
    cmd = [*_ns_prefix(ns), sys.executable, "-m", "appliance.lab.httpload", "paced", url, "--ns", "",
           "-n", str(count), "--rate", str(rate_b), "--rcvbuf", str(rcvbuf_b), "--tick", str(tick),
           "--timeout", str(timeout), "--idle-timeout", str(idle_timeout), "--ramp", str(ramp_s)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True,
                            cwd=str(Path(__file__).resolve().parents[2]))
    try:
        out, err = proc.communicate(timeout=timeout + ramp_s + 30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"paced downloads in {ns} failed ({proc.returncode}): {err.strip()[-2000:]}")
    res = PacedResult.from_json(json.loads(out))
    res.ns = ns
    return res


# --- pauses from a capture at the client ------------------------------------------------

@dataclass
class ConnPause:
    """One connection's server-to-client data in a capture."""
    client: str
    client_port: int
    server: str
    server_port: int
    data_packets: int      # packets carrying payload
    new_bytes: int         # payload bytes beyond the highest sequence seen before (the stream's length)
    retransmitted: int     # data packets carrying nothing new
    first_data: float
    last_data: float
    max_gap_s: float       # longest time between consecutive new-data packets (in the window, if one)
    gap_start: float | None
    gap_end: float | None
    fin: bool              # the server sent FIN
    rst: bool              # the server sent RST


class _Flow:
    def __init__(self, key: tuple[bytes, int, bytes, int], isn: int) -> None:
        self.key = key
        self.last_raw = isn
        self.rel = 0            # unwrapped sequence of last_raw, relative to the first
        self.high = 0           # highest relative sequence end seen
        self.packets = 0
        self.retrans = 0
        self.times: list[float] = []   # arrivals of packets with new data
        self.fin = self.rst = False

    def unwrap(self, seq: int) -> int:
        d = (seq - self.last_raw) & 0xFFFFFFFF
        if d >= 1 << 31:
            d -= 1 << 32
        self.last_raw = seq
        self.rel += d
        return self.rel


def pcap_pauses(pcap: Path | str, server_port: int | None = None, server: str | None = None,
                around: float | None = None, window_s: float = 10.0) -> list[ConnPause]:
    """Per connection, the longest pause in new server-to-client data seen in
    ``pcap`` (a capture at the client; a snaplen of ~96 is enough: the
    payload length is taken from the IP header).  Server side: packets from
    ``server`` (an address) and/or ``server_port``; without either, each TCP
    flow direction that carries data counts.  A packet is new data when its
    end is beyond the highest sequence seen so far in its flow (from the
    SYN-ACK, or the first packet when the capture began mid-connection).
    With ``around`` (wall clock), only the gaps that overlap ``[around -
    window_s, around + window_s]`` count.  Sorted by client port."""
    want = pack(server) if server else None
    flows: dict[tuple[bytes, int, bytes, int], _Flow] = {}
    finished: list[_Flow] = []
    for t, p in packets(pcap):
        f = tcp_fields(p)
        if f is None:
            continue
        src, dst, sport, dport, seq, _ack, flags, plen = f
        if (server_port is not None and sport != server_port) or (want is not None and src != want):
            continue
        key = (src, sport, dst, dport)
        fl = flows.get(key)
        if flags & 0x02:  # SYN(-ACK): a new connection, its data starts at seq + 1
            if fl is not None and fl.high:
                finished.append(fl)  # the same ports used again
            flows[key] = _Flow(key, (seq + 1) & 0xFFFFFFFF)
            continue
        if fl is None:
            fl = flows[key] = _Flow(key, seq)
        fl.fin |= bool(flags & 0x01)
        fl.rst |= bool(flags & 0x04)
        if plen <= 0:
            continue
        end = fl.unwrap(seq) + plen
        fl.packets += 1
        if end <= fl.high:
            fl.retrans += 1
            continue
        fl.high = end
        fl.times.append(t)
    out = []
    for fl in finished + list(flows.values()):
        if not fl.times:
            continue
        src, sport, dst, dport = fl.key
        best, gs, ge = 0.0, None, None
        for a, b in zip(fl.times, fl.times[1:]):
            if around is not None and (b < around - window_s or a > around + window_s):
                continue
            if b - a > best:
                best, gs, ge = b - a, a, b
        out.append(ConnPause(
            client=unpack(dst), client_port=dport, server=unpack(src), server_port=sport,
            data_packets=fl.packets, new_bytes=fl.high, retransmitted=fl.retrans, first_data=fl.times[0],
            last_data=fl.times[-1], max_gap_s=best, gap_start=gs, gap_end=ge, fin=fl.fin, rst=fl.rst,
        ))
    out.sort(key=lambda c: (c.client_port, c.client, c.first_data))
    return out


# --- command line --------------------------------------------------------------------------

def _print(doc: Any) -> None:
    json.dump(doc, sys.stdout, indent=1, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
    sys.stdout.write("\n")


def _cut_from(args: argparse.Namespace) -> float | None:
    if getattr(args, "cut", None) is not None:
        return float(args.cut)
    path = getattr(args, "cut_file", None)
    if path:
        try:
            return float(Path(path).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m appliance.lab.httpload", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("crowd", help="keep-alive load with wrk: totals, errors, a rate timeline")
    c.add_argument("url")
    c.add_argument("--ns", default=DEFAULT_NS, help="namespace to run wrk in ('' for none)")
    c.add_argument("-c", "--connections", type=int, default=100)
    c.add_argument("-t", "--threads", type=int, default=2)
    c.add_argument("-d", "--duration", type=int, default=10, help="seconds (whole: wrk's -d)")
    c.add_argument("--timeout", type=int, default=2, help="wrk's --timeout, whole seconds")
    c.add_argument("--cut", type=float, help="wall-clock time of a cut during the run: adds 'recovery'")
    c.add_argument("--cut-file", help="file whose first word is the cut's wall-clock time, read after the run")
    c.add_argument("--before", type=float, default=5.0, help="seconds before the cut for the rate before")
    c.add_argument("--records", help="also write every response [t, status, latency_s] to this JSON file")

    d = sub.add_parser("paced", help="many paced downloads at once: sha256, bytes, longest pause each")
    d.add_argument("url")
    d.add_argument("--ns", default=DEFAULT_NS, help="namespace to run in ('' for none)")
    d.add_argument("-n", "--count", type=int, default=500)
    d.add_argument("--rate", default="64k", help="bytes/s per download (k, m: x1024)")
    d.add_argument("--rcvbuf", default="16k", help="SO_RCVBUF of every socket")
    d.add_argument("--tick", type=float, default=0.1, help="seconds between paced reads")
    d.add_argument("--timeout", type=float, default=300.0)
    d.add_argument("--idle-timeout", type=float, default=30.0)
    d.add_argument("--ramp", type=float, default=0.0, help="spread the starts over this many seconds")

    q = sub.add_parser("pauses", help="per-connection pauses in server->client data from a client-side pcap")
    q.add_argument("pcap")
    q.add_argument("--server-port", type=int)
    q.add_argument("--server")
    q.add_argument("--around", type=float, help="wall-clock time (the cut)")
    q.add_argument("--window", type=float, default=10.0)

    r = sub.add_parser("recovery", help="the rate around a cut, from a crowd's --records file")
    r.add_argument("records")
    r.add_argument("--cut", type=float, required=True)
    r.add_argument("--before", type=float, default=5.0)

    args = p.parse_args(argv)
    if args.cmd == "crowd":
        res = crowd(args.url, connections=args.connections, duration=args.duration, threads=args.threads,
                    timeout=args.timeout, ns=args.ns or None)
        cut = _cut_from(args)
        if cut is not None:
            res.recovery = res.recovery_at(cut, before_s=args.before)
        if args.records:
            Path(args.records).write_text(json.dumps(
                {"ended_at": res.ended_at, "responses": [[x.t, x.status, x.latency] for x in res.responses]}))
        _print({"kind": "crowd", **res.to_json()})
        return 0 if res.wrk_exit == 0 else 1
    if args.cmd == "paced":
        pres = paced(args.url, count=args.count, rate=args.rate, rcvbuf=args.rcvbuf, tick=args.tick,
                     timeout=args.timeout, idle_timeout=args.idle_timeout, ramp_s=args.ramp, ns=args.ns or None)
        _print({"kind": "paced", **pres.to_json()})
        return 0
    if args.cmd == "pauses":
        conns = pcap_pauses(args.pcap, server_port=args.server_port, server=args.server, around=args.around,
                            window_s=args.window)
        _print({"kind": "pauses", "connections": [asdict(x) for x in conns],
                "max_gap_s": max((x.max_gap_s for x in conns), default=0.0)})
        return 0
    doc = json.loads(Path(args.records).read_text())
    resp = [Response(t, s, lat) for t, s, lat in doc["responses"]]
    _print({"kind": "recovery", **asdict(recovery(resp, args.cut, before_s=args.before))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
