"""appliance.lab.httpload without the lab: wrk's output, the timeline and the
recovery after a cut on synthetic data, pauses from crafted captures, and the
two load tools themselves against a small local server (127.0.0.1) that can
hold its answers back for a while (a stall, the cut's stand-in)."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import wrpcap

from appliance.lab import httpload as hl


def wait_for(pred, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# --- wrk's output -------------------------------------------------------------------------

WRK_CLEAN = """\
Running 3s test @ http://203.0.113.10:8080/4K.bin
  2 threads and 20 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.52ms    0.91ms  23.41ms   91.02%
    Req/Sec     6.71k   512.30     7.62k    70.00%
  40042 requests in 3.00s, 166.81MB read
Requests/sec:  13342.15
Transfer/sec:     55.58MB
"""

WRK_ERRORS = """\
Running 10s test @ http://203.0.113.10/4K.bin
  2 threads and 100 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   105.26ms  301.52ms   1.98s    94.51%
    Req/Sec   612.40    233.10     1.10k    66.00%
  11904 requests in 10.01s, 48.70MB read
  Socket errors: connect 3, read 17, write 2, timeout 41
  Non-2xx or 3xx responses: 5
Requests/sec:   1189.31
Transfer/sec:      4.87MB
"""


def test_parse_wrk_output_clean() -> None:
    s = hl.parse_wrk_output(WRK_CLEAN)
    assert s.requests == 40042
    assert s.runtime_s == pytest.approx(3.0)
    assert s.bytes_read == pytest.approx(166.81 * (1 << 20))
    assert s.errors == {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    assert s.status_errors == 0
    assert s.requests_per_s == pytest.approx(13342.15)
    assert s.latency_avg_ms == pytest.approx(1.52)
    assert s.latency_max_ms == pytest.approx(23.41)


def test_parse_wrk_output_with_errors() -> None:
    s = hl.parse_wrk_output(WRK_ERRORS)
    assert s.requests == 11904
    assert s.runtime_s == pytest.approx(10.01)
    assert s.errors == {"connect": 3, "read": 17, "write": 2, "timeout": 41}
    assert s.status_errors == 5
    assert s.latency_avg_ms == pytest.approx(105.26)
    assert s.latency_max_ms == pytest.approx(1980.0)


def test_parse_wrk_output_nothing_completed() -> None:
    s = hl.parse_wrk_output("Running 1s test @ http://x/\n  0 requests in 1.00m, 0.00B read\n"
                            "    Latency     0.00us    0.00us   0.00us    -nan%\n")
    assert s.requests == 0 and s.runtime_s == pytest.approx(60.0) and s.latency_max_ms == 0.0


# --- timeline and recovery -------------------------------------------------------------------

def steady(start: float, end: float, rate: float, latency: float = 0.001) -> list[hl.Response]:
    """Completions at ``rate`` per second in [start, end), a little off the bin edges."""
    n = round((end - start) * rate)
    return [hl.Response(start + (i + 0.5) / rate, 200, latency) for i in range(n)]


T0 = 1_700_000_000.0


def test_timeline_counts_every_bin_empty_ones_too() -> None:
    times = [T0 + 0.05, T0 + 0.07, T0 + 0.25, T0 + 0.99, T0 - 1.0]
    assert hl.timeline(times, T0) == [(0.0, 2), (0.1, 0), (0.2, 1), (0.3, 0), (0.4, 0), (0.5, 0),
                                      (0.6, 0), (0.7, 0), (0.8, 0), (0.9, 1)]
    assert hl.timeline([], T0, end=T0 + 0.3) == [(0.0, 0), (0.1, 0), (0.2, 0)]


def test_recovery_after_an_outage_and_a_catch_up_burst() -> None:
    cut = T0 + 5.0
    rs = (steady(T0, cut, 1000) + steady(cut + 0.8, cut + 1.0, 1500) + steady(cut + 1.0, T0 + 10, 1000))
    # the requests held through the outage: started just before the cut, answered at its end
    rs.append(hl.Response(cut + 0.8, 200, 0.805))
    rs.append(hl.Response(cut + 0.81, 200, 0.3))
    rs.sort(key=lambda r: r.t)
    rec = hl.recovery(rs, cut, before_s=5.0)
    assert rec.rate_before == pytest.approx(1000, rel=0.01)
    assert rec.threshold == pytest.approx(900, rel=0.01)
    assert rec.recovery_s == pytest.approx(0.8)  # the burst does not make it look earlier
    assert rec.lowest_rate == 0
    assert rec.slowest_after_cut_ms == pytest.approx(805)
    assert rec.slowest_after_cut_at == pytest.approx(0.8)
    assert rec.slowest_after_cut_started == pytest.approx(-0.005, abs=1e-6)
    assert rec.requests_after_cut == sum(1 for r in rs if r.t >= cut)


def test_recovery_without_a_dent_is_zero_and_a_slow_return_is_later() -> None:
    cut = T0 + 5.0
    assert hl.recovery(steady(T0, T0 + 10, 500), cut).recovery_s == 0.0
    # back at 50 % for 2 s, then at full rate: recovered when the full rate is back
    rs = steady(T0, cut, 1000) + steady(cut, cut + 2.0, 500) + steady(cut + 2.0, T0 + 10, 1000)
    assert hl.recovery(rs, cut).recovery_s == pytest.approx(2.0)
    # a lone good bin inside a slow stretch does not count: the rate must stay back
    rs = steady(T0, cut, 1000) + steady(cut, cut + 0.5, 300) + steady(cut + 0.5, cut + 0.6, 1000) \
        + steady(cut + 0.6, cut + 1.5, 300) + steady(cut + 1.5, T0 + 10, 1000)
    assert hl.recovery(rs, cut).recovery_s == pytest.approx(1.5)


def test_recovery_never_back_and_noisy_low_rates() -> None:
    cut = T0 + 5.0
    rs = steady(T0, cut, 1000) + steady(cut + 1.0, T0 + 10, 400)
    rec = hl.recovery(rs, cut)
    assert rec.recovery_s is None and rec.rate_before == pytest.approx(1000, rel=0.01)
    assert rec.rate_end == pytest.approx(400, rel=0.02)  # where it settled
    # 20 per second: bins of 2 and 1 alternate; a second of smoothing sees the steady rate
    rs = [hl.Response(T0 + 0.02 + 0.05 * i * (1 + (i % 2)), 200, None) for i in range(300)]
    rec = hl.recovery(rs, T0 + 5.0, smooth_s=1.0, hold_s=2.0, end=T0 + 12.0)
    assert rec.recovery_s == 0.0
    assert rec.slowest_after_cut_ms is None  # no per-request latency known


# --- pauses from a capture ----------------------------------------------------------------

CLIENT, VIP = "192.0.2.10", "203.0.113.10"


def seg(t: float, seq: int, payload: int = 0, flags: str = "A", sport: int = 80, dport: int = 40000,
        src: str = VIP, dst: str = CLIENT):
    # explicit MACs: scapy would otherwise look the address up with ARP
    p = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, seq=seq % (1 << 32), ack=1, flags=flags)
    if payload:
        p = p / Raw(b"x" * payload)
    p.time = t
    return p


def crafted() -> list:
    pkts = []
    # connection 1 (client port 40000): handshake, data each 0.1 s, a retransmission of old
    # bytes during a 1.2 s pause, then new data
    pkts.append(seg(T0, 999, flags="SA"))
    for i in range(4):
        pkts.append(seg(T0 + 0.1 * (i + 1), 1000 + 1000 * i, 1000))
    pkts.append(seg(T0 + 0.8, 3000, 1000))            # old bytes again: not the end of the pause
    pkts.append(seg(T0 + 1.6, 5000, 1000))
    pkts.append(seg(T0 + 1.7, 6000, 0, flags="FA"))
    # the client's own packets are not the server's data
    pkts.append(seg(T0 + 1.0, 1, 500, sport=40000, dport=80, src=CLIENT, dst=VIP))
    # connection 2 (port 40001): the capture begins mid-connection, its sequence wraps,
    # one pause of 0.5 s at T0 + 10 and one of 0.3 s at T0 + 2
    seq = (1 << 32) - 3000
    t = T0
    for i in range(200):
        t += 0.3 if i == 40 else 0.5 if i == 160 else 0.05
        pkts.append(seg(t, seq, 1448, dport=40001))
        seq += 1448
    # connection 3 (port 40002): another server port, another service
    pkts.append(seg(T0 + 3.0, 7, 100, sport=8080, dport=40002))
    pkts.append(seg(T0 + 3.5, 107, 100, sport=8080, dport=40002))
    pkts.sort(key=lambda p: float(p.time))
    return pkts


def truncated_pcap(path: Path, pkts: list, snaplen: int = 96) -> None:
    """A pcap as ``tcpdump -s 96`` writes it: records cut at snaplen, the original length kept."""
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snaplen, 1))
        for p in pkts:
            raw = bytes(p)
            t = float(p.time)
            f.write(struct.pack("<IIII", int(t), round((t - int(t)) * 1e6), min(len(raw), snaplen), len(raw)))
            f.write(raw[:snaplen])


@pytest.mark.parametrize("snap", ["full", "96"])
def test_pcap_pauses_per_connection(tmp_path: Path, snap: str) -> None:
    pcap = tmp_path / "client.pcap"
    if snap == "full":
        wrpcap(str(pcap), crafted())
    else:
        truncated_pcap(pcap, crafted())
    conns = {c.client_port: c for c in hl.pcap_pauses(pcap, server_port=80)}
    assert set(conns) == {40000, 40001}
    c1 = conns[40000]
    assert (c1.client, c1.server, c1.server_port) == (CLIENT, VIP, 80)
    assert c1.max_gap_s == pytest.approx(1.2, abs=1e-5)
    assert c1.gap_start == pytest.approx(T0 + 0.4, abs=1e-5) and c1.gap_end == pytest.approx(T0 + 1.6, abs=1e-5)
    assert c1.new_bytes == 5000 and c1.data_packets == 6 and c1.retransmitted == 1
    assert c1.fin and not c1.rst
    c2 = conns[40001]
    assert c2.new_bytes == 200 * 1448 and c2.retransmitted == 0  # across the wrap
    assert c2.max_gap_s == pytest.approx(0.5, abs=1e-5)
    # only the gaps around a time
    near = {c.client_port: c for c in hl.pcap_pauses(pcap, server_port=80, around=T0 + 2.2, window_s=0.3)}
    assert near[40001].max_gap_s == pytest.approx(0.3, abs=1e-5)
    assert near[40000].max_gap_s == 0.0 and near[40000].gap_start is None
    # by server address: every port of it
    every = hl.pcap_pauses(pcap, server=VIP)
    assert [c.client_port for c in every] == [40000, 40001, 40002]
    assert every[2].max_gap_s == pytest.approx(0.5, abs=1e-5)


def test_pcap_pauses_ports_used_again(tmp_path: Path) -> None:
    pkts = [seg(T0, 99, flags="SA"), seg(T0 + 0.1, 100, 10), seg(T0 + 0.2, 110, 10, flags="FA"),
            seg(T0 + 5, 5000, flags="SA"), seg(T0 + 5.1, 5001, 10), seg(T0 + 6.1, 5011, 10)]
    wrpcap(str(tmp_path / "p.pcap"), pkts)
    a, b = hl.pcap_pauses(tmp_path / "p.pcap", server_port=80)
    assert (a.new_bytes, a.max_gap_s) == (20, pytest.approx(0.1, abs=1e-5))
    assert (b.new_bytes, b.max_gap_s) == (20, pytest.approx(1.0, abs=1e-5))


def test_command_line_pauses_and_recovery(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json
    wrpcap(str(tmp_path / "c.pcap"), crafted())
    assert hl.main(["pauses", str(tmp_path / "c.pcap"), "--server-port", "80"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "pauses" and doc["max_gap_s"] == pytest.approx(1.2, abs=1e-5)
    assert [c["client_port"] for c in doc["connections"]] == [40000, 40001]
    cut = T0 + 5.0
    rs = steady(T0, cut, 1000) + steady(cut + 0.5, T0 + 10, 1000)
    (tmp_path / "r.json").write_text(json.dumps({"responses": [[r.t, r.status, r.latency] for r in rs]}))
    assert hl.main(["recovery", str(tmp_path / "r.json"), "--cut", str(cut)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "recovery" and doc["recovery_s"] == pytest.approx(0.5)


def test_sizes_and_heads() -> None:
    assert hl.parse_size("64k") == 65536 and hl.parse_size("1M") == 1 << 20 and hl.parse_size(500) == 500
    assert hl.parse_size("1.5k") == 1536
    with pytest.raises(ValueError):
        hl.parse_size("fast")
    assert hl._parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nServer: x") == (200, 12, None)
    assert hl._parse_head(b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked") == (404, None, "chunked")


# --- the tools against a local server ------------------------------------------------------

class StallServer:
    """HTTP/1.1 on 127.0.0.1, in a thread: every GET gets ``body``, keep-alive,
    the request's ``X-Httpload-Id`` echoed when ``echo``; nothing is sent
    while a stall is on (``stall_for``), answers nor body bytes."""

    def __init__(self, body: bytes, echo: bool = True, sndbuf: int | None = None, delay: float = 0.0) -> None:
        self.body = body
        self.delay = delay  # before each answer: a steady rate that is not all the CPU can do
        self.echo = echo
        self.sndbuf = sndbuf
        self.stall_until = 0.0
        self.requests = 0
        self.sent = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    def url(self, path: str = "/f") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stall_for(self, seconds: float) -> float:
        now = time.time()
        self.stall_until = now + seconds
        return now

    async def _gate(self) -> None:
        wait = self.stall_until - time.time()
        if wait > 0:
            await asyncio.sleep(wait)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import socket
        if self.sndbuf:  # little sent ahead of the gate: in the kernel, and none in asyncio's buffer
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
            writer.transport.set_write_buffer_limits(0)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                self.requests += 1
                lines = head.decode("latin-1").split("\r\n")
                hdrs = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                close = hdrs.get("connection", "").lower() == "close"
                extra = f"X-Httpload-Id: {hdrs['x-httpload-id']}\r\n" if self.echo and "x-httpload-id" in hdrs else ""
                if self.delay:
                    await asyncio.sleep(self.delay)
                await self._gate()
                writer.write((f"HTTP/1.1 200 OK\r\nContent-Length: {len(self.body)}\r\n{extra}"
                              f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n").encode())
                for i in range(0, len(self.body), 4096):
                    await self._gate()
                    writer.write(self.body[i:i + 4096])
                    await writer.drain()
                    self.sent += len(self.body[i:i + 4096])
                if close:
                    break
        except ConnectionError:
            pass
        finally:
            writer.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def server() -> Iterator[StallServer]:
    srv = StallServer(b"y" * 1000, delay=0.002)
    yield srv
    srv.close()


def need_wrk() -> None:
    if shutil.which("wrk") is None:
        pytest.fail("wrk is not installed: deploy/bootstrap.sh installs it (Debian package wrk)")


def test_crowd_records_each_request_and_the_recovery_after_a_stall(server: StallServer) -> None:
    need_wrk()
    with hl.start_crowd(server.url(), connections=4, duration=3, threads=2, ns=None) as run:
        wait_for(lambda: server.requests > 500 and time.time() - run.started_at > 1.2, what="a steady rate")
        cut = server.stall_for(0.8)
        res = run.wait()
    assert res.wrk_exit == 0, res.wrk_stderr
    assert res.socket_errors == 0 and res.non_2xx == 0 and res.unanswered_over_timeout == 0
    assert res.requests == res.recorded > 1000
    assert res.latency_source == "per-request"
    assert 700 <= res.max_latency_ms <= 1300
    # wrk's histogram saw the same slowest request
    assert res.wrk_max_latency_ms == pytest.approx(res.max_latency_ms, abs=5)
    # the timeline: 100 ms bins from the start, empty through the stall
    assert [t for t, _ in res.timeline[:3]] == [0.0, 0.1, 0.2]
    stalled = [n for t, n in res.timeline if cut - res.started_at + 0.1 <= t <= cut - res.started_at + 0.6]
    assert stalled and not any(stalled)
    rec = res.recovery_at(cut, before_s=1.0, fraction=0.8, smooth_s=0.2, hold_s=0.5)
    assert rec.rate_before > 300
    assert rec.rate_end is not None and rec.rate_end > 0.7 * rec.rate_before
    assert rec.recovery_s is not None and 0.7 <= rec.recovery_s <= 1.1
    assert 700 <= rec.slowest_after_cut_ms <= 1300
    assert -0.1 <= rec.slowest_after_cut_started <= 0.1  # the request held through the stall
    doc = res.to_json()
    assert "responses" not in doc and doc["errors"]["timeout"] == 0 and doc["timeline"][0] == [0.0, res.timeline[0][1]]


def test_crowd_without_echo_latency_by_connection_or_histogram() -> None:
    need_wrk()
    srv = StallServer(b"z" * 100, echo=False)
    try:
        # one connection per thread: the last request of a thread is the one answered
        single = hl.crowd(srv.url(), connections=2, threads=2, duration=1, ns=None)
        assert single.latency_source == "per-request" and single.socket_errors == 0
        assert single.requests == single.recorded > 100
        # several per thread and no echo: only wrk's histogram knows
        multi = hl.crowd(srv.url(), connections=4, threads=2, duration=1, ns=None)
        assert multi.latency_source == "wrk-histogram" and multi.max_latency_ms is not None
        assert all(r.latency is None for r in multi.responses)
    finally:
        srv.close()


def paced_with_stall(body: bytes, count: int, rate: str, tick: float, stall: float,
                     after: int) -> tuple[hl.PacedResult, float]:
    """``count`` paced downloads of ``body`` from a local server that stalls for
    ``stall`` s once it has sent ``after`` bytes in all; (result, stall start)."""
    srv = StallServer(body, sndbuf=4096)
    try:
        box: dict[str, hl.PacedResult] = {}
        th = threading.Thread(target=lambda: box.setdefault("r", hl.paced(
            srv.url("/b"), count=count, rate=rate, rcvbuf="16k", tick=tick, ns=None, timeout=60)))
        th.start()
        try:
            wait_for(lambda: srv.sent >= after, timeout=30, what=f"{after} bytes sent")
            cut = srv.stall_for(stall)
        finally:
            th.join(60)
        res = box["r"]
    finally:
        srv.close()
    assert res.ok == count and res.failed == 0 and res.errors == {}
    want = hashlib.sha256(body).hexdigest()
    for d in res.downloads:
        assert (d.status, d.bytes, d.content_length, d.sha256) == (200, len(body), len(body), want)
        assert d.local_port and d.first_byte_at is not None
    return res, cut


def test_paced_downloads_measure_a_pause_the_buffers_do_not_hide() -> None:
    # read fast (1 MiB/s, a socket buffer is a few ms of it): the pause the server makes is the pause seen
    body = bytes(range(256)) * 1024  # 256 KiB
    res, cut = paced_with_stall(body, count=20, rate="1m", tick=0.05, stall=1.0, after=20 * 80 * 1024)
    for d in res.downloads:
        assert d.max_arrival_gap_s is not None and 0.8 <= d.max_arrival_gap_s <= 1.4, d
        assert d.max_arrival_gap_start is not None and cut - 0.3 <= d.max_arrival_gap_start <= cut + 0.3, d
        assert 0.7 <= d.max_gap_s <= d.max_arrival_gap_s + 0.1, d
        assert d.max_gap_start is not None and cut - 0.3 <= d.max_gap_start <= cut + 0.3, d
    assert res.max_gap_s == max(d.max_gap_s for d in res.downloads)


def test_paced_downloads_hold_their_rate_and_buffers_shorten_the_read_gap() -> None:
    # read slowly (64 KiB/s): the socket buffers hold a good part of a second of reading, so
    # the reader's gap is at most the kernel's arrival gap (plus a tick), and both are shorter
    # than the server's stall (the sender's queue drains into the window as the reader reads)
    body = bytes(range(256)) * 512  # 128 KiB
    res, _ = paced_with_stall(body, count=20, rate="64k", tick=0.05, stall=1.0, after=20 * 40_000)
    for d in res.downloads:
        assert d.max_arrival_gap_s is not None and 0.2 <= d.max_arrival_gap_s <= 1.3, d
        assert d.max_gap_s <= d.max_arrival_gap_s + 0.05 + 0.05, d
        # 128 KiB at 64 KiB/s: the pacing held (the reader catches up after a stall)
        assert d.first_byte_at is not None and 1.8 <= d.ended_at - d.first_byte_at <= 3.5, d
