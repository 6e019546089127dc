"""checkpoint.httpreplay: HttpTrack on byte streams (no packets), the replay plans it makes,
the range request and the check of its answer; and a Splice run with such a plan.

A connection here is a client log and a server digest fed the way the data plane feeds them:
client bytes ``log.add`` then ``track.client_logged()``, server bytes ``digest.add`` (the
digest's cutter feeds the framing), the client's acknowledgments ``track.client_acked`` then
``track.advance()``."""

from __future__ import annotations

import random

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpoint.httpreplay import (
    RANGE_OVERLAP, RANGE_PRIME, HttpTrack, RangeAnswer, RangeExpect, ReplayPlan, range_request,
)
from checkpoint.seqnum import seq_add, seq_diff
from checkpoint.splice import Phase, Splice, SpliceOptions
from checkpoint.streamlog import CHUNK, ByteLog, StreamDigest, StreamVerifier

from . import test_splice as tsp

PROP = settings(max_examples=60, deadline=None)
DATE1 = b"Sun, 06 Nov 1994 08:49:37 GMT"
DATE2 = b"Fri, 21 Nov 2025 05:44:00 GMT"
MIB = 1 << 20


def get(path: str, *extra: bytes) -> bytes:
    return (b"GET /" + path.encode() + b" HTTP/1.1\r\nHost: example.com\r\nUser-Agent: t/1\r\n"
            + b"".join(h + b"\r\n" for h in extra) + b"\r\n")


def ok(body: bytes, *extra: bytes, date: bytes = DATE1, status: bytes = b"200 OK") -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\nServer: t\r\nDate: " + date + b"\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n" + b"".join(h + b"\r\n" for h in extra) + b"\r\n" + body)


def chunked(body: bytes, *extra: bytes, date: bytes = DATE1) -> bytes:
    out = (b"HTTP/1.1 200 OK\r\nServer: t\r\nDate: " + date + b"\r\nTransfer-Encoding: chunked\r\n"
           + b"".join(h + b"\r\n" for h in extra) + b"\r\n")
    for i in range(0, len(body), 8192):
        part = body[i:i + 8192]
        out += b"%x\r\n" % len(part) + part + b"\r\n"
    return out + b"0\r\n\r\n"


BIG = random.Random(1).randbytes(MIB)
RANGEABLE = (b'ETag: "abc"', b"Accept-Ranges: bytes")


class Conn:
    """One connection's log, digest and track, and the two streams as sent so far."""

    def __init__(self, limit: int = MIB) -> None:
        self.log = ByteLog(limit)
        self.digest = StreamDigest(("http-date",))
        self.track = HttpTrack(self.log, self.digest)
        self.client_stream = b""
        self.server_stream = b""

    @property
    def c(self) -> int:
        return len(self.client_stream)

    @property
    def s(self) -> int:
        return len(self.server_stream)

    def client(self, data: bytes, seg: int = 1448) -> None:
        base = self.c
        self.client_stream += data
        for i in range(0, len(data), seg):
            self.log.add(base + i, data[i:i + seg])
            self.track.client_logged()

    def server(self, data: bytes, seg: int = 1448) -> None:
        base = self.s
        self.server_stream += data
        for i in range(0, len(data), seg):
            self.digest.add(base + i, data[i:i + seg])

    def ack(self, offset: int | None = None) -> bool:
        self.track.client_acked(self.s if offset is None else offset)
        return self.track.advance()

    def plan(self, acked: int | None = None) -> ReplayPlan:
        return self.track.plan(self.digest.snapshot(), self.track.framing.acked if acked is None else acked)


def keepalive(n: int = 3) -> tuple[Conn, list[tuple[int, int]]]:
    """``n`` exchanges, each fully acknowledged; returns the (request end, response end)s."""
    conn = Conn()
    ends = []
    for i in range(n):
        conn.client(get(f"page{i}"))
        conn.server(ok(random.Random(i).randbytes(1000 * (i + 1) + 70_000 * (i == 1))))
        assert conn.ack()
        ends.append((conn.c, conn.s))
    return conn, ends


def assert_verifiable(conn: Conn, plan: ReplayPlan) -> None:
    """The plan's verifier can start, and the original stream verifies from there."""
    snap = conn.digest.snapshot()
    assert plan.verify_from in snap.chunk_starts()
    v = StreamVerifier(snap, plan.verify_from, plan.prime)
    start = plan.verify_from - plan.prime
    v.add(start, conn.server_stream[start:])
    assert v.done


# ----- trims as exchanges finish -------------------------------------------------------------

def test_three_keepalive_exchanges_leave_nothing_in_the_log():
    conn, ends = keepalive(3)
    log, dg, track = conn.log, conn.digest, conn.track
    assert track.requests == 3 and track.fallback is None
    assert log.base == log.end == conn.c and len(log.data) == 0
    assert dg.base == dg.end == ends[-1][1] == conn.s
    assert track.point == ends[-1] and track.trims == 3 and track.trimmed_bytes == conn.c
    assert dg.dropped > 0 and dg.chunks == [] and dg.cuts == [conn.s]
    assert conn.plan().strategy == "quiescent"


def test_trim_follows_each_exchange():
    conn = Conn()
    conn.client(get("a"))
    assert not conn.ack(0) and conn.log.base == 0
    resp = ok(b"x" * 5000)
    conn.server(resp)
    assert not conn.ack(len(resp) - 1)  # not all of it: nothing finished
    assert conn.log.base == 0 and conn.digest.base == 0 and conn.track.point == (0, 0)
    assert conn.ack()
    assert conn.track.point == (conn.c, conn.s) == (conn.log.base, conn.digest.base)
    assert not conn.ack()  # the point did not move: nothing to do
    assert conn.track.trims == 1


def test_next_request_logged_before_the_trim_stays():
    """The acknowledgment comes with the next request: the trim keeps that request."""
    conn = Conn()
    conn.client(get("a"))
    conn.server(ok(b"x" * 100))
    first = (conn.c, conn.s)
    conn.track.client_acked(conn.s)
    conn.client(get("b"))
    assert conn.track.advance()
    assert conn.log.base == first[0] and conn.log.read(first[0], conn.c - first[0]) == get("b")
    assert conn.digest.base == first[1]


def test_describe():
    conn, ends = keepalive(2)
    conn.client(get("big"))
    d = conn.track.describe()
    assert d == {"requests": 3, "replay_point": {"client": ends[-1][0], "server": ends[-1][1]},
                 "in_flight": "GET /big", "trims": 2, "fallback": None}


# ----- the plans -------------------------------------------------------------------------------

def in_flight(resp: bytes, acked_part: float | int = 0.5, request: bytes | None = None,
              exchanges: int = 3) -> tuple[Conn, tuple[int, int], int, int]:
    """``exchanges`` finished exchanges, then ``request`` answered by ``resp``, sent whole, of
    which the client acknowledged a part; returns (conn, replay point, request end, acked)."""
    conn, ends = keepalive(exchanges) if exchanges else (Conn(), [(0, 0)])
    conn.client(request or get("big"))
    req_end = conn.c
    s0 = conn.s
    conn.server(resp)
    acked = s0 + (int(len(resp) * acked_part) if isinstance(acked_part, float) else acked_part)
    conn.ack(acked)
    assert conn.track.point == ends[-1] and conn.track.fallback is None
    return conn, ends[-1], req_end, acked


def test_range_plan_for_a_large_get_half_acknowledged():
    resp = ok(BIG, *RANGEABLE)
    conn, (c, s), req_end, acked = in_flight(resp)
    snap = conn.digest.snapshot()
    plan = conn.plan(acked)
    assert plan.strategy == "range" and plan.reason is None
    body_start = s + resp.index(b"\r\n\r\n") + 4
    v = plan.verify_from
    n = v - body_start - RANGE_PRIME
    assert plan.prime == RANGE_PRIME
    assert plan.range is not None
    assert plan.range == RangeExpect(first=n, total=MIB, etag=b'"abc"', body_start=body_start)
    assert plan.range.server_first == v - RANGE_PRIME
    assert v in snap.chunk_starts() and acked - v >= RANGE_OVERLAP
    # the latest such chunk start: the overlap is as short as it can be
    assert not [x for x in snap.chunk_starts() if v < x <= acked - RANGE_OVERLAP]
    assert v - RANGE_PRIME >= body_start
    # the original request with Range and If-Range, ending where the original did
    original = conn.client_stream[c:req_end]
    assert plan.prefix == range_request(original, n, b'"abc"')
    assert plan.prefix.startswith(b"GET /big HTTP/1.1\r\nHost: example.com\r\nUser-Agent: t/1\r\n")
    assert plan.prefix.endswith(b"\r\nRange: bytes=%d-\r\nIf-Range: \"abc\"\r\n\r\n" % n)
    assert plan.client_start == req_end - len(plan.prefix)
    assert plan.log_from == req_end
    assert plan.server_start is None and plan.full_from == s
    assert_verifiable(conn, plan)


@pytest.mark.parametrize("acked_part", [RANGE_OVERLAP + CHUNK + RANGE_PRIME + 200, 0.9, 0.999])
def test_range_plan_overlap_bounds(acked_part):
    resp = ok(BIG, *RANGEABLE)
    conn, (c, s), req_end, acked = in_flight(resp, acked_part)
    plan = conn.plan(acked)
    assert plan.strategy == "range"
    assert plan.range is not None and acked - plan.verify_from >= RANGE_OVERLAP
    assert 0 <= plan.range.first < MIB
    assert_verifiable(conn, plan)


def test_range_plan_for_the_first_request_of_a_connection():
    resp = ok(BIG, *RANGEABLE)
    conn, (c, s), req_end, acked = in_flight(resp, exchanges=0)
    plan = conn.plan(acked)
    assert plan.strategy == "range" and (c, s) == (0, 0)
    assert plan.log_from == req_end and plan.client_start == req_end - len(plan.prefix)
    assert_verifiable(conn, plan)


FULL_CASES = {
    "weak validator": (ok(BIG, b'ETag: W/"abc"', b"Accept-Ranges: bytes"), None),
    "no strong validator": (ok(BIG, b"Accept-Ranges: bytes"), None),
    "no Accept-Ranges: bytes": (ok(BIG, b'ETag: "abc"'), None),
    "Accept-Ranges: none": (ok(BIG, b'ETag: "abc"', b"Accept-Ranges: none"), "no Accept-Ranges: bytes"),
    "chunked body": (chunked(BIG, *RANGEABLE), None),
    "content-coded body": (ok(BIG, *RANGEABLE, b"Content-Encoding: gzip"), None),
    "status 404": (ok(BIG, *RANGEABLE, status=b"404 Not Found"), None),
}


@pytest.mark.parametrize("case", list(FULL_CASES))
def test_full_plan_when_the_response_cannot_be_range_resumed(case):
    resp, reason = FULL_CASES[case]
    conn, (c, s), req_end, acked = in_flight(resp)
    plan = conn.plan(acked)
    assert plan.strategy == "full"
    assert plan.reason is not None and (reason or case) in plan.reason
    assert (plan.client_start, plan.server_start, plan.verify_from) == (c, s, s)
    assert plan.prefix == b"" and plan.range is None and plan.prime == 0 and plan.log_from == c
    assert_verifiable(conn, plan)


def test_full_plan_for_a_post():
    body = b"name=a&x=" + b"y" * 100
    post = (b"POST /form HTTP/1.1\r\nHost: example.com\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\n\r\n" + body)
    conn, (c, s), _, acked = in_flight(ok(BIG, *RANGEABLE), request=post)
    plan = conn.plan(acked)
    assert plan.strategy == "full" and "POST" in str(plan.reason)
    assert (plan.client_start, plan.server_start) == (c, s)


@pytest.mark.parametrize("acked_part", [0, 1000, RANGE_OVERLAP, RANGE_OVERLAP + CHUNK - 1000])
def test_full_plan_when_too_little_is_acknowledged(acked_part):
    conn, (c, s), _, acked = in_flight(ok(BIG, *RANGEABLE), acked_part)
    plan = conn.plan(acked)
    assert plan.strategy == "full" and "acknowledged" in str(plan.reason) and str(RANGE_OVERLAP) in str(plan.reason)
    assert (plan.client_start, plan.server_start, plan.verify_from) == (c, s, s)


def test_full_plan_for_a_small_response():
    conn, (c, s), _, acked = in_flight(ok(b"x" * 50_000, *RANGEABLE), 0.5)
    plan = conn.plan(acked)
    assert plan.strategy == "full" and "acknowledged" in str(plan.reason)


def test_full_plan_when_the_head_is_not_complete():
    conn, (c, s), _, acked = in_flight(ok(BIG, *RANGEABLE)[:30], 0)
    plan = conn.plan(acked)
    assert plan.strategy == "full" and "head" in str(plan.reason)
    assert (plan.client_start, plan.server_start) == (c, s)


def test_quiescent_plan_when_nothing_is_in_flight():
    conn, ends = keepalive(3)
    plan = conn.plan()
    assert plan == ReplayPlan("quiescent", conn.c, conn.s, conn.s)
    assert_verifiable(conn, plan)
    # a request sent, no byte of its response yet: still quiescent, the backup gets the request
    conn.client(get("next"))
    plan = conn.plan()
    assert plan.strategy == "quiescent" and (plan.client_start, plan.server_start) == ends[-1]
    assert conn.log.read(plan.log_from, conn.c - plan.log_from) == get("next")
    # a request only half sent: the same
    conn2, ends2 = keepalive(1)
    conn2.client(get("half")[:10])
    assert conn2.plan().strategy == "quiescent"


def test_quiescent_plan_on_a_fresh_connection():
    conn = Conn()
    assert conn.plan(0) == ReplayPlan("quiescent", 0, 0, 0)


# ----- fallback ---------------------------------------------------------------------------------

@pytest.mark.parametrize("garbage", [b"\x00\x01garbage\r\n\r\n", b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                                     b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"])
def test_malformed_client_bytes_stop_tracking(garbage):
    conn, ends = keepalive(2)
    conn.client(garbage)
    track = conn.track
    assert track.fallback and track.fallback_side == "client" and track.fallback.startswith("client: ")
    assert conn.digest.cutter is None
    plan = conn.plan(conn.s)
    assert plan.strategy == "stream" and plan.reason == track.fallback
    assert (plan.client_start, plan.server_start, plan.verify_from) == (*ends[-1], ends[-1][1])
    assert conn.log.read(plan.log_from, conn.c - plan.log_from) == garbage
    # nothing moves any more: the log keeps every byte from the last point
    conn.ack()
    assert not track.advance() and conn.log.base == ends[-1][0]


@pytest.mark.parametrize("garbage", [b"\x00\x01garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"])
def test_malformed_server_bytes_stop_tracking(garbage):
    conn, ends = keepalive(2)
    conn.client(get("x"))
    conn.server(garbage)
    track = conn.track
    assert track.fallback and track.fallback_side == "server" and track.fallback.startswith("server: ")
    assert conn.digest.cutter is None
    assert conn.digest.end == conn.s  # the digest still hashes everything
    plan = conn.plan(conn.s)
    assert plan.strategy == "stream" and plan.reason == track.fallback
    assert (plan.client_start, plan.server_start, plan.verify_from) == (*ends[-1], ends[-1][1])
    assert_verifiable(conn, plan)


def test_unsolicited_server_bytes_stop_tracking():
    conn, ends = keepalive(1)
    conn.server(ok(b"surprise"))
    assert conn.track.fallback_side == "server" and conn.plan().strategy == "stream"


def test_client_log_overflow_stops_tracking():
    conn = Conn(limit=200)
    conn.client(get("a"))
    conn.server(ok(b"x"))
    conn.ack()
    conn.client(b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\n" + b"y" * 1000)
    track = conn.track
    assert track.fallback and "client log stopped" in track.fallback and track.fallback_side is None
    plan = conn.plan()
    assert plan.strategy == "stream" and plan.client_start == len(get("a"))


def test_a_track_on_a_restored_log_falls_back():
    log = ByteLog(MIB, base=500)
    dg = StreamDigest(("http-date",))
    track = HttpTrack(log, dg)
    assert track.fallback and "not known" in track.fallback and track.fallback_side is None
    assert dg.cutter is None
    plan = track.plan(dg.snapshot(), 0)
    assert plan.strategy == "stream" and plan.client_start == 500


# ----- pipelining ---------------------------------------------------------------------------------

def test_pipelined_requests_keep_the_point_at_the_first_boundary():
    conn = Conn()
    a, b = get("a"), get("b")
    conn.client(a + b)  # both requests in one write
    ra, rb = ok(b"1" * 3000), ok(b"2" * 200_000)
    conn.server(ra)
    assert not conn.ack(len(ra) - 1) and conn.track.point == (0, 0)
    conn.server(rb[:1000])
    assert conn.ack(len(ra))
    assert conn.track.point == (len(a), len(ra)) == (conn.log.base, conn.digest.base)
    assert conn.log.read(len(a), len(b)) == b
    conn.server(rb[1000:])
    for part in (1000, 50_000, len(rb) - 1):
        assert not conn.ack(len(ra) + part)
        assert conn.track.point == (len(a), len(ra)) == (conn.log.base, conn.digest.base)
    plan = conn.plan(len(ra) + len(rb) // 2)
    assert plan.strategy == "full" and (plan.client_start, plan.server_start) == (len(a), len(ra))
    assert conn.ack(len(ra) + len(rb))
    assert conn.track.point == (len(a + b), len(ra + rb)) == (conn.log.end, conn.digest.end)
    assert conn.log.base == conn.log.end and conn.plan().strategy == "quiescent"


def test_pipelined_range_plan_replays_the_request_after_it():
    conn = Conn()
    a, b = get("big"), get("b")
    conn.client(a + b)
    resp = ok(BIG, *RANGEABLE)
    conn.server(resp)
    acked = len(resp) // 2
    conn.ack(acked)
    plan = conn.plan(acked)
    assert plan.strategy == "range" and plan.log_from == len(a)
    assert conn.log.read(plan.log_from, conn.log.end - plan.log_from) == b


# ----- any segmentation ---------------------------------------------------------------------------

EXCHANGES = [
    (get("a"), ok(b"a" * 300)),
    (get("b"), ok(random.Random(2).randbytes(70_000), *RANGEABLE)),
    (get("c"), chunked(b"c" * 20_000)),
    (b"HEAD /d HTTP/1.1\r\nHost: example.com\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"),
    (get("e"), ok(b"e" * (CHUNK - 90))),
]


@PROP
@given(cseg=st.integers(1, 3000), sseg=st.integers(1, 20_000), seed=st.integers(0, 2**32 - 1))
def test_any_segmentation_gives_the_same_trims(cseg, sseg, seed):
    """Every exchange sent in random pieces, acknowledged in random steps: the trims land on the
    same boundaries, and the digest is the same as one fed whole."""
    rng = random.Random(seed)
    conn = Conn()
    ref = Conn()
    points: list[tuple[int, int]] = []
    for req, resp in EXCHANGES:
        conn.client(req, seg=cseg)
        ref.client(req, seg=len(req))
        start = conn.s
        conn.server(resp, seg=sseg)
        ref.server(resp, seg=len(resp))
        acked = start
        while acked < conn.s:
            acked = min(conn.s, acked + rng.randint(1, 40_000))
            conn.ack(acked)
            assert conn.track.point in points + [(conn.c, conn.s)] or conn.track.point == (0, 0)
            assert (conn.log.base, conn.digest.base) == conn.track.point
        ref.ack()
        points.append((conn.c, conn.s))
        assert conn.track.point == ref.track.point == (conn.c, conn.s)
    assert conn.track.fallback is None
    assert conn.digest.snapshot() == ref.digest.snapshot()


# ----- range_request ------------------------------------------------------------------------------

def parse_request(head: bytes) -> h11.Request:
    c = h11.Connection(h11.SERVER)
    c.receive_data(head)
    ev = c.next_event()
    assert isinstance(ev, h11.Request), ev
    assert isinstance(c.next_event(), h11.EndOfMessage)
    return ev


def test_range_request_adds_range_and_if_range():
    head = get("big")
    out = range_request(head, 12345, b'"abc"')
    assert out == head[:-2] + b'Range: bytes=12345-\r\nIf-Range: "abc"\r\n\r\n'
    ev = parse_request(out)
    assert (ev.method, ev.target, ev.http_version) == (b"GET", b"/big", b"1.1")
    assert [(bytes(n), bytes(v)) for n, v in ev.headers] == [
        (b"host", b"example.com"), (b"user-agent", b"t/1"), (b"range", b"bytes=12345-"), (b"if-range", b'"abc"')]


@pytest.mark.parametrize("old", [
    [b"Range: bytes=0-99"], [b"range: bytes=5-"], [b"RANGE:bytes=1-2"], [b"If-Range: \"old\""],
    [b"if-range: Sun, 06 Nov 1994 08:49:37 GMT", b"Range: bytes=10-20"], [b"IF-RANGE  : x", b"rAnGe: bytes=-5"],
])
def test_range_request_replaces_existing_range_headers(old):
    head = (b"GET /f?x=1 HTTP/1.1\r\nHost: example.com\r\n" + b"\r\n".join(old)
            + b"\r\nX-Range: keep\r\nRanges: keep\r\nAccept: */*\r\n\r\n")
    out = range_request(head, 7, b'"v2"')
    assert out.endswith(b"\r\n\r\n") and out.count(b"\r\n\r\n") == 1
    lines = out[:-4].split(b"\r\n")
    assert lines[0] == b"GET /f?x=1 HTTP/1.1"
    assert lines[1:] == [b"Host: example.com", b"X-Range: keep", b"Ranges: keep", b"Accept: */*",
                         b"Range: bytes=7-", b'If-Range: "v2"']


def test_range_request_of_an_http10_request():
    head = b"GET /old HTTP/1.0\r\nUser-Agent: t/1\r\n\r\n"
    out = range_request(head, 0, b'"e"')
    assert out == b'GET /old HTTP/1.0\r\nUser-Agent: t/1\r\nRange: bytes=0-\r\nIf-Range: "e"\r\n\r\n'


def test_range_request_of_a_head_with_bare_lf_line_ends():
    """h11 (so HttpFraming) accepts a request head whose lines end in a bare LF (RFC 9112 2.2
    lets a recipient): the range request must keep every header of it intact."""
    head = b"GET /big HTTP/1.1\nHost: example.com\nX-A: 12345\n\n"
    orig = parse_request(head)
    ev = parse_request(range_request(head, 100, b'"abc"'))
    assert (ev.method, ev.target) == (orig.method, orig.target)
    assert [(bytes(n), bytes(v)) for n, v in ev.headers] == [
        *[(bytes(n), bytes(v)) for n, v in orig.headers], (b"range", b"bytes=100-"), (b"if-range", b'"abc"')]


def test_range_plan_for_a_request_with_bare_lf_line_ends():
    """End to end: the framing tracks the LF-only request, the plan's prefix must be it with
    Range and If-Range (not a request with its last header cut short)."""
    req = b"GET /big HTTP/1.1\nHost: example.com\nAccept-Language: en-US\n\n"
    conn, (c, s), req_end, acked = in_flight(ok(BIG, *RANGEABLE), request=req, exchanges=1)
    plan = conn.plan(acked)
    assert plan.strategy == "range" and plan.range is not None
    ev = parse_request(plan.prefix)
    assert (bytes(ev.method), bytes(ev.target)) == (b"GET", b"/big")
    assert dict((bytes(n), bytes(v)) for n, v in ev.headers) == {
        b"host": b"example.com", b"accept-language": b"en-US",
        b"range": b"bytes=%d-" % plan.range.first, b"if-range": b'"abc"'}


# ----- RangeAnswer ---------------------------------------------------------------------------------

X = RangeExpect(first=1000, total=5000, etag=b'"abc"', body_start=300)


def answer(status: bytes = b"206 Partial Content", *headers: bytes) -> bytes:
    return b"HTTP/1.1 " + status + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"


GOOD = answer(b"206 Partial Content", b"Date: " + DATE2, b"Content-Range: bytes 1000-4999/5000",
              b"Content-Length: 4000", b'ETag: "abc"', b"Accept-Ranges: bytes")


def feed_bytewise(ra: RangeAnswer, data: bytes):
    outcomes = [ra.feed(data[i:i + 1]) for i in range(len(data))]
    return outcomes


def test_matching_206_byte_at_a_time():
    ra = RangeAnswer(X)
    outcomes = feed_bytewise(ra, GOOD)
    assert outcomes[:-1] == [None] * (len(GOOD) - 1)
    assert outcomes[-1] == ("range", len(GOOD)) == ra.outcome
    assert ra.feed(b"more body") == ("range", len(GOOD))  # settled


def test_matching_206_with_body_bytes_in_the_same_piece():
    data = GOOD + b"b" * 3000
    for cut in (1, 50, len(GOOD) - 1):
        ra = RangeAnswer(X)
        assert ra.feed(data[:cut]) is None
        assert ra.feed(data[cut:]) == ("range", len(GOOD))
    assert RangeAnswer(X).feed(data) == ("range", len(GOOD))


def test_interim_response_before_the_206():
    cont = b"HTTP/1.1 100 Continue\r\n\r\n"
    ra = RangeAnswer(X)
    assert ra.feed(cont) is None
    assert ra.feed(GOOD + b"body") == ("range", len(cont) + len(GOOD))


def test_matching_206_without_content_length():
    head = answer(b"206 Partial Content", b"Content-Range: bytes 1000-4999/5000", b'ETag: "abc"')
    assert RangeAnswer(X).feed(head) == ("range", len(head))


@pytest.mark.parametrize("status", [b"200 OK", b"200 Fine"])
def test_200_is_a_full_answer(status):
    ra = RangeAnswer(X)
    outcomes = feed_bytewise(ra, answer(status, b"Content-Length: 5000", b'ETag: "new"') + b"x")
    assert outcomes[-1] == ("full", 0) and [o for o in outcomes if o is not None][0] == ("full", 0)


FAILS = {
    "wrong first": answer(b"206 Partial Content", b"Content-Range: bytes 999-4999/5000", b'ETag: "abc"'),
    "wrong total": answer(b"206 Partial Content", b"Content-Range: bytes 1000-4999/5001", b'ETag: "abc"'),
    "unknown total": answer(b"206 Partial Content", b"Content-Range: bytes 1000-4999/*", b'ETag: "abc"'),
    "short range": answer(b"206 Partial Content", b"Content-Range: bytes 1000-1999/5000", b'ETag: "abc"'),
    "no content-range": answer(b"206 Partial Content", b"Content-Type: multipart/byteranges; boundary=x",
                               b'ETag: "abc"'),
    "other etag": answer(b"206 Partial Content", b"Content-Range: bytes 1000-4999/5000", b'ETag: "abd"'),
    "weak etag": answer(b"206 Partial Content", b"Content-Range: bytes 1000-4999/5000", b'ETag: W/"abc"'),
    "no etag": answer(b"206 Partial Content", b"Content-Range: bytes 1000-4999/5000"),
    "content-coded": answer(b"206 Partial Content", b"Content-Range: bytes 1000-4999/5000", b'ETag: "abc"',
                            b"Content-Encoding: gzip"),
    "length mismatch": answer(b"206 Partial Content", b"Content-Range: bytes 1000-4999/5000", b'ETag: "abc"',
                              b"Content-Length: 3999"),
    "416": answer(b"416 Range Not Satisfiable", b"Content-Range: bytes */5000", b"Content-Length: 0"),
    "304": answer(b"304 Not Modified", b'ETag: "abc"'),
    "404": answer(b"404 Not Found", b"Content-Length: 0"),
    "garbage": b"\x00\x01garbage\r\n\r\n",
    "bad version": b"HTTP/7.0 206 Partial Content\r\n\r\n",
    "bad header": b"HTTP/1.1 206 Partial Content\r\nContent-Length: x\r\n\r\n",
    "bad status": b"HTTP/1.1 2O6 Partial Content\r\n\r\n",
    "101": answer(b"101 Switching Protocols", b"Upgrade: h2c", b"Connection: upgrade"),
}


@pytest.mark.parametrize("case", list(FAILS))
@pytest.mark.parametrize("bytewise", [False, True])
def test_anything_else_fails(case, bytewise):
    ra = RangeAnswer(X)
    data = FAILS[case] + b"y" * 100
    outcome = feed_bytewise(ra, data)[-1] if bytewise else ra.feed(data)
    assert outcome is not None and outcome[0] == "fail", outcome
    assert isinstance(outcome[1], str) and outcome[1].startswith("range resume")
    assert ra.feed(GOOD) == outcome  # settled for good


@PROP
@given(data=st.binary(max_size=400), splits=st.lists(st.integers(1, 50), max_size=20))
def test_range_answer_never_raises_on_random_bytes(data, splits):
    ra = RangeAnswer(X)
    pos = 0
    for n in splits + [len(data)]:
        out = ra.feed(data[pos:pos + n])
        pos += n
        assert out is None or (out[0] in ("range", "full", "fail"))


@PROP
@given(edits=st.lists(st.tuples(st.integers(0, len(GOOD)), st.integers(0, 6), st.binary(max_size=8)),
                      max_size=5), step=st.integers(1, 64))
def test_range_answer_never_raises_on_mutated_heads(edits, step):
    data = bytearray(GOOD)
    for at, drop, ins in edits:
        data[at:at + drop] = ins
    ra = RangeAnswer(X)
    for i in range(0, len(data) + 1, step):
        out = ra.feed(bytes(data[i:i + step]))
        assert out is None or out[0] in ("range", "full", "fail")
    if ra.outcome is not None and ra.outcome[0] == "range":
        assert 0 < int(ra.outcome[1]) <= len(data)


# ----- a Splice with a plan (the helpers of test_splice: a client, an old primary, a backup) ---------

def planned_net(monkeypatch, plan: ReplayPlan, backup, **conv_kw):
    """test_splice's Net, its Splice made with ``plan``."""
    conv = tsp.converse(**conv_kw)

    def new_splice(conv, now=tsp.MOVE_AT, ts_floor=None, **opts):
        return Splice(conv.rec, conv.log, conv.digest.snapshot(), vip=tsp.VIP, vport=tsp.VPORT, old=tsp.PRIMARY,
                      target=tsp.BACKUP, now=now, options=SpliceOptions(**opts), ts_floor=ts_floor, plan=plan)
    monkeypatch.setattr(tsp, "new_splice", new_splice)
    return conv, tsp.Net(conv, backup)


@pytest.mark.parametrize("cisn,sisn,bisn", [(1_000_000, 3_000_000_000, 0x6000_0000),
                                            (tsp.MASK - 500, tsp.MASK - 70_000, tsp.MASK - 10)])
def test_splice_from_a_replay_point(monkeypatch, cisn, sisn, bisn):
    """A backup connection opened at (client 1000, server 64 KiB): its SYN is one below the
    client's byte 1000, its first byte stands for server byte 64 Ki."""
    c0, s0 = 1000, CHUNK
    plan = ReplayPlan("full", c0, s0, s0)
    backup = tsp.Backup(tsp.REGEN[s0:], isn=bisn, request_len=tsp.REQUEST_LEN - c0)
    conv, net = planned_net(monkeypatch, plan, backup, cisn=cisn, sisn=sisn)
    where, syn = net.q[0]
    assert where == "backup" and syn.flags == tsp.SYN
    assert syn.seq == seq_add(cisn, c0) == seq_add(conv.c_base, c0 - 1)
    net.run()
    sp = net.sp
    assert sp.phase is Phase.SPLICED and sp.verifier.done and net.done()
    # the backup got the client's stream from byte 1000, at the right sequence numbers
    assert bytes(backup.received) == tsp.REQUEST[c0:]
    # the backup's byte k is the server's s0 + k in the client's sequence space
    assert net.forwarded
    for seg, fw in net.forwarded:
        assert seq_diff(fw.seq, conv.s_base) == s0 + seq_diff(seg.seq, backup.base)
    delivered = [p for p in net.client.rx if p.payload]
    # (segments straddling what the client acknowledged included: it keeps the new part)
    assert delivered and all(seq_diff(p.seq, conv.s_base) + len(p.payload) > tsp.ACKED for p in delivered)
    assert bytes(net.client.stream.data) == tsp.RESPONSE[:tsp.ACKED] + tsp.REGEN[tsp.ACKED:]
    # every whole segment the client already had was suppressed, none of what it had not
    assert tsp.ACKED - s0 - tsp.MSS < sp.stats["suppressed_bytes"] <= tsp.ACKED - s0
    d = sp.describe()
    assert d["replay_from"] == {"client": c0, "server": s0} and d["strategy"] == "full"
    assert sp.regenerated_bytes == tsp.SENT - s0


BODY_START = tsp.RESPONSE.index(b"\r\n\r\n") + 4
TOTAL = tsp.RESPONSE_LEN - BODY_START


def expect(plan: ReplayPlan) -> RangeExpect:
    assert plan.range is not None
    return plan.range


def range_plan(verify_from: int = CHUNK) -> ReplayPlan:
    first = verify_from - BODY_START - RANGE_PRIME
    prefix = range_request(b"GET /big HTTP/1.1\r\nHost: www.example.com\r\n\r\n", first, b'"abc"')
    return ReplayPlan("range", tsp.REQUEST_LEN - len(prefix), None, verify_from, prefix=prefix, prime=RANGE_PRIME,
                      range=RangeExpect(first, TOTAL, b'"abc"', BODY_START), full_from=0)


def head_206(first: int, content_range: bytes | None = None) -> bytes:
    cr = content_range or b"bytes %d-%d/%d" % (first, TOTAL - 1, TOTAL)
    return (b"HTTP/1.1 206 Partial Content\r\nDate: " + DATE2 + b"\r\nContent-Range: " + cr
            + b"\r\nContent-Length: %d\r\nETag: \"abc\"\r\n\r\n" % (TOTAL - first))


@pytest.mark.parametrize("cisn,sisn", [(1_000_000, 3_000_000_000), (5, tsp.MASK - 100_000)])
def test_splice_range_resume(monkeypatch, cisn, sisn):
    plan = range_plan()
    x = expect(plan)
    head = head_206(x.first)
    backup = tsp.Backup(head + tsp.RESPONSE[x.server_first:], request_len=len(plan.prefix))
    conv, net = planned_net(monkeypatch, plan, backup, cisn=cisn, sisn=sisn)
    _, syn = net.q[0]
    # the range request ends where the original request did: the SYN is that much earlier
    assert syn.seq == seq_add(cisn, tsp.REQUEST_LEN - len(plan.prefix))
    net.run()
    sp = net.sp
    assert sp.phase is Phase.SPLICED and sp.verifier.done and net.done(), sp.describe()
    assert bytes(backup.received) == plan.prefix
    assert sp.range_outcome == "range" and sp.strategy == "range" and sp.range_head == len(head)
    assert sp.s_start == x.server_first - len(head)
    for seg, fw in net.forwarded:  # the 206's body byte k is the original body byte first + k
        assert seq_diff(fw.seq, conv.s_base) == sp.s_start + seq_diff(seg.seq, backup.base)
    assert bytes(net.client.stream.data) == tsp.RESPONSE[:tsp.ACKED] + tsp.REGEN[tsp.ACKED:]
    # regenerated: the head, the prime and the overlap, and what the old primary had sent beyond it
    assert sp.regenerated_bytes == tsp.SENT - sp.s_start


def test_splice_range_answered_200_is_verified_in_full(monkeypatch):
    plan = range_plan()
    backup = tsp.Backup(tsp.REGEN, request_len=len(plan.prefix))
    conv, net = planned_net(monkeypatch, plan, backup)
    net.run()
    sp = net.sp
    assert sp.phase is Phase.SPLICED and sp.verifier.done and net.done()
    assert sp.range_outcome == "full" and sp.strategy == "full" and sp.s_start == 0
    assert "200" in sp.describe()["strategy_reason"]
    assert bytes(net.client.stream.data) == tsp.RESPONSE[:tsp.ACKED] + tsp.REGEN[tsp.ACKED:]


@pytest.mark.parametrize("bad", ["content-range", "body"])
def test_splice_range_mismatch_fails_closed(monkeypatch, bad):
    plan = range_plan()
    x = expect(plan)
    if bad == "content-range":
        resp = head_206(x.first, b"bytes 0-%d/%d" % (TOTAL - 1, TOTAL)) + tsp.RESPONSE[BODY_START:]
    else:  # a matching head, other bytes in the verified overlap
        body = bytearray(tsp.RESPONSE[x.server_first:])
        body[RANGE_PRIME + 1000] ^= 0xFF
        resp = head_206(x.first) + bytes(body)
    backup = tsp.Backup(resp, request_len=len(plan.prefix))
    conv, net = planned_net(monkeypatch, plan, backup)
    net.run()
    sp = net.sp
    assert sp.phase is Phase.FAILED
    assert ("Content-Range" if bad == "content-range" else "divergence") in sp.reason
    assert not [p for p in net.client.rx if p.payload]  # never a wrong byte to the client
    assert any(p.flags & tsp.RST for p in net.client.rx) and backup.reset


def test_splice_range_resume_of_a_connections_first_request(monkeypatch):
    """The range request is longer than the original, which was the connection's first: the
    backup's stream starts before the client's ISN (its sequence numbers are only a translation)."""
    req = b"GET /big HTTP/1.1\r\nHost: www.example.com\r\n\r\n"
    monkeypatch.setattr(tsp, "REQUEST_LEN", len(req))
    base = range_plan()
    prefix = range_request(req, expect(base).first, b'"abc"')
    plan = ReplayPlan("range", len(req) - len(prefix), None, base.verify_from, prefix=prefix, prime=RANGE_PRIME,
                      range=base.range, full_from=0)
    assert plan.client_start < 0 and plan.log_from == len(req)
    head = head_206(expect(plan).first)
    backup = tsp.Backup(head + tsp.RESPONSE[expect(plan).server_first:], request_len=len(prefix))
    conv, net = planned_net(monkeypatch, plan, backup, request=req)
    _, syn = net.q[0]
    assert syn.seq == seq_add(conv.cisn, plan.client_start)
    net.run()
    sp = net.sp
    assert sp.phase is Phase.SPLICED and sp.verifier.done and net.done(), sp.describe()
    assert bytes(backup.received) == prefix and sp.range_outcome == "range"
    assert bytes(net.client.stream.data) == tsp.RESPONSE[:tsp.ACKED] + tsp.REGEN[tsp.ACKED:]


def test_splice_range_resume_under_a_nearly_closed_client_window(monkeypatch):
    """The client advertised 128 bytes when the move began (a slow reader with a full buffer).
    The range answer's head and the bytes the client already has never reach it, so the backup
    must be let send them whatever the client's window: the gateway used to pass that window on
    and wait for the whole head without acknowledging any of it — the backup sent 128 bytes and
    retransmitted them for ever (found in the lab: 1 move in 1,000)."""
    monkeypatch.setattr(tsp, "C_WIN", 1)  # << 7: 128 bytes
    plan = range_plan()
    x = expect(plan)
    head = head_206(x.first)
    backup = tsp.Backup(head + tsp.RESPONSE[x.server_first:], request_len=len(plan.prefix), strict_window=True)
    conv, net = planned_net(monkeypatch, plan, backup)
    assert conv.rec.client.window_raw == 1 and len(head) > 128
    net.run(until=lambda: net.sp.s_start is not None and net.sp.verifier.done, max_time=10.0)
    sp = net.sp
    assert sp.range_outcome == "range" and sp.range_head == len(head) and sp.verifier.done, sp.describe()
