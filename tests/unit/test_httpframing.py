"""HttpFraming: HTTP/1.x message boundaries and quiescent points, sans-I/O.

Each scenario is a recorded conversation: a script of client bytes ("c"),
server bytes ("s"), client acknowledgments ("a", an offset of the server
stream, or None for "everything fed so far") and ends of stream ("C"/"S"),
in the order a gateway sees them.  It is fed whole, split at every
position of its bytes, byte at a time, and at random positions (hypothesis);
every way must give the same boundaries, the same sequence of quiescent
points and the same final state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from checkpoint.httpframing import Exchange, HttpFraming, State

Step = tuple[str, Any]

# ---- recorded conversations -------------------------------------------------

GET_A = b"GET /a HTTP/1.1\r\nHost: example.com\r\nUser-Agent: t/1\r\n\r\n"
RESP_A = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n"
    b'ETag: "abc123"\r\nLast-Modified: Sun, 06 Nov 1994 08:49:37 GMT\r\nAccept-Ranges: bytes\r\n\r\n'
    b"hello world"
)
GET_B = b"GET /b HTTP/1.1\r\nHost: example.com\r\nAccept-Encoding: gzip\r\n\r\n"
RESP_B = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Encoding: gzip\r\nETag: W/\"w1\"\r\n\r\n"
    b"5\r\n\x1f\x8b\x08\x00\x00\r\n3;ext=1\r\nxyz\r\n0\r\n\r\n"
)
GET_C = b"GET /c?q=1 HTTP/1.1\r\nHost: example.com\r\nRange: bytes=0-3\r\nIf-Range: \"abc123\"\r\n\r\n"
RESP_C = b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-3/11\r\nContent-Length: 4\r\n\r\nhell"
HEAD = b"HEAD /big HTTP/1.1\r\nHost: example.com\r\n\r\n"
RESP_HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 123456\r\nAccept-Ranges: bytes\r\n\r\n"
COND = b'GET /a HTTP/1.1\r\nHost: example.com\r\nIf-None-Match: "abc123"\r\n\r\n'
RESP_304 = b'HTTP/1.1 304 Not Modified\r\nETag: "abc123"\r\nContent-Length: 11\r\n\r\n'
DELETE = b"DELETE /x HTTP/1.1\r\nHost: example.com\r\n\r\n"
RESP_204 = b"HTTP/1.1 204 No Content\r\n\r\n"
TRAILERS = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: Checksum\r\n\r\n"
    b"a\r\n0123456789\r\n1\r\n!\r\n0\r\nChecksum: 1234\r\nX-Other: y\r\n\r\n"
)
POST_HEAD = b"POST /form HTTP/1.1\r\nHost: example.com\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 12\r\n"
POST = POST_HEAD + b"\r\nname=a&x=yyy"
RESP_POST = b"HTTP/1.1 201 Created\r\nLocation: /form/1\r\nContent-Length: 2\r\n\r\nok"
EXPECT_HEAD = b"PUT /up HTTP/1.1\r\nHost: example.com\r\nContent-Length: 6\r\nExpect: 100-continue\r\n\r\n"
EXPECT_BODY = b"abcdef"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
RESP_PUT = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
GET10 = b"GET /old HTTP/1.0\r\nUser-Agent: t/1\r\n\r\n"
RESP10 = b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n<html>old</html>\n"
GET_CLOSE = b"GET /bye HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"
RESP_CLOSE = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbye"
RESP_CLOSE_DELIM_11 = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"


def cat(*parts: bytes) -> int:
    return len(b"".join(parts))


# name -> (script, expected boundaries, expected quiescent sequence, final state)
# boundaries: per exchange (request_start, request_end, response_start, response_head_end, response_end, status)
SCENARIOS: dict[str, tuple[list[Step], list[tuple[Any, ...]], list[tuple[int, int]], State]] = {
    "get": (
        [("c", GET_A), ("s", RESP_A), ("a", None)],
        [(0, len(GET_A), 0, len(RESP_A) - 11, len(RESP_A), 200)],
        [(0, 0), (len(GET_A), len(RESP_A))],
        State.TRACKING,
    ),
    "keepalive3": (
        [("c", GET_A), ("s", RESP_A), ("a", None), ("c", GET_B), ("s", RESP_B), ("a", None), ("c", GET_C), ("s", RESP_C), ("a", None)],
        [
            (0, len(GET_A), 0, len(RESP_A) - 11, len(RESP_A), 200),
            (len(GET_A), cat(GET_A, GET_B), len(RESP_A), len(RESP_A) + RESP_B.index(b"\r\n\r\n") + 4, cat(RESP_A, RESP_B), 200),
            (cat(GET_A, GET_B), cat(GET_A, GET_B, GET_C), cat(RESP_A, RESP_B), cat(RESP_A, RESP_B, RESP_C) - 4, cat(RESP_A, RESP_B, RESP_C), 206),
        ],
        [(0, 0), (len(GET_A), len(RESP_A)), (cat(GET_A, GET_B), cat(RESP_A, RESP_B)), (cat(GET_A, GET_B, GET_C), cat(RESP_A, RESP_B, RESP_C))],
        State.TRACKING,
    ),
    "pipelined": (
        # three requests back to back before any response; acknowledgments lag
        [("c", GET_A + GET_B + GET_C), ("s", RESP_A), ("a", None), ("s", RESP_B + RESP_C), ("a", len(RESP_A) + 1), ("a", None)],
        [
            (0, len(GET_A), 0, len(RESP_A) - 11, len(RESP_A), 200),
            (len(GET_A), cat(GET_A, GET_B), len(RESP_A), len(RESP_A) + RESP_B.index(b"\r\n\r\n") + 4, cat(RESP_A, RESP_B), 200),
            (cat(GET_A, GET_B), cat(GET_A, GET_B, GET_C), cat(RESP_A, RESP_B), cat(RESP_A, RESP_B, RESP_C) - 4, cat(RESP_A, RESP_B, RESP_C), 206),
        ],
        [(0, 0), (cat(GET_A, GET_B, GET_C), cat(RESP_A, RESP_B, RESP_C))],
        State.TRACKING,
    ),
    "pipelined_then_more": (
        # pipelined pair answered, acked, then a request not answered yet
        [("c", GET_A + HEAD), ("s", RESP_A + RESP_HEAD), ("a", None), ("c", GET_B)],
        [
            (0, len(GET_A), 0, len(RESP_A) - 11, len(RESP_A), 200),
            (len(GET_A), cat(GET_A, HEAD), len(RESP_A), cat(RESP_A, RESP_HEAD), cat(RESP_A, RESP_HEAD), 200),
            (cat(GET_A, HEAD), cat(GET_A, HEAD, GET_B), None, None, None, None),
        ],
        [(0, 0), (cat(GET_A, HEAD), cat(RESP_A, RESP_HEAD))],
        State.TRACKING,
    ),
    "head": (
        [("c", HEAD), ("s", RESP_HEAD), ("a", None), ("c", GET_A), ("s", RESP_A), ("a", None)],
        [
            (0, len(HEAD), 0, len(RESP_HEAD), len(RESP_HEAD), 200),
            (len(HEAD), cat(HEAD, GET_A), len(RESP_HEAD), cat(RESP_HEAD, RESP_A) - 11, cat(RESP_HEAD, RESP_A), 200),
        ],
        [(0, 0), (len(HEAD), len(RESP_HEAD)), (cat(HEAD, GET_A), cat(RESP_HEAD, RESP_A))],
        State.TRACKING,
    ),
    "304_and_204": (
        [("c", COND), ("s", RESP_304), ("a", None), ("c", DELETE), ("s", RESP_204), ("a", None)],
        [
            (0, len(COND), 0, len(RESP_304), len(RESP_304), 304),
            (len(COND), cat(COND, DELETE), len(RESP_304), cat(RESP_304, RESP_204), cat(RESP_304, RESP_204), 204),
        ],
        [(0, 0), (len(COND), len(RESP_304)), (cat(COND, DELETE), cat(RESP_304, RESP_204))],
        State.TRACKING,
    ),
    "chunked_trailers": (
        [("c", GET_A), ("s", TRAILERS), ("a", len(TRAILERS) - 1), ("a", None)],
        [(0, len(GET_A), 0, TRAILERS.index(b"\r\n\r\n") + 4, len(TRAILERS), 200)],
        [(0, 0), (len(GET_A), len(TRAILERS))],
        State.TRACKING,
    ),
    "http10_close_delimited": (
        [("c", GET10), ("s", RESP10), ("a", None), ("S", None), ("a", len(RESP10))],
        [(0, len(GET10), 0, RESP10.index(b"\r\n\r\n") + 4, len(RESP10), 200)],
        [(0, 0)],
        State.CLOSED,
    ),
    "http11_close_delimited": (
        [("c", GET_A), ("s", RESP_CLOSE_DELIM_11), ("a", None), ("S", None)],
        [(0, len(GET_A), 0, RESP_CLOSE_DELIM_11.index(b"\r\n\r\n") + 4, len(RESP_CLOSE_DELIM_11), 200)],
        [(0, 0)],
        State.CLOSED,
    ),
    "post": (
        [("c", POST), ("s", RESP_POST), ("a", None)],
        [(0, len(POST), 0, len(RESP_POST) - 2, len(RESP_POST), 201)],
        [(0, 0), (len(POST), len(RESP_POST))],
        State.TRACKING,
    ),
    "100_continue": (
        [("c", EXPECT_HEAD), ("s", CONTINUE), ("a", None), ("c", EXPECT_BODY), ("s", RESP_PUT), ("a", None), ("c", GET_A), ("s", RESP_A), ("a", None)],
        [
            (0, cat(EXPECT_HEAD, EXPECT_BODY), len(CONTINUE), cat(CONTINUE, RESP_PUT), cat(CONTINUE, RESP_PUT), 200),
            (cat(EXPECT_HEAD, EXPECT_BODY), cat(EXPECT_HEAD, EXPECT_BODY, GET_A), cat(CONTINUE, RESP_PUT), cat(CONTINUE, RESP_PUT, RESP_A) - 11, cat(CONTINUE, RESP_PUT, RESP_A), 200),
        ],
        [(0, 0), (cat(EXPECT_HEAD, EXPECT_BODY), cat(CONTINUE, RESP_PUT)), (cat(EXPECT_HEAD, EXPECT_BODY, GET_A), cat(CONTINUE, RESP_PUT, RESP_A))],
        State.TRACKING,
    ),
    "connection_close": (
        [("c", GET_A), ("s", RESP_A), ("a", None), ("c", GET_CLOSE), ("s", RESP_CLOSE), ("a", None), ("S", None), ("C", None)],
        [
            (0, len(GET_A), 0, len(RESP_A) - 11, len(RESP_A), 200),
            (len(GET_A), cat(GET_A, GET_CLOSE), len(RESP_A), cat(RESP_A, RESP_CLOSE) - 3, cat(RESP_A, RESP_CLOSE), 200),
        ],
        [(0, 0), (len(GET_A), len(RESP_A)), (cat(GET_A, GET_CLOSE), cat(RESP_A, RESP_CLOSE))],
        State.CLOSED,
    ),
    "client_half_close": (
        # the client sends its request and half-closes before the response
        [("c", GET_A), ("C", None), ("s", RESP_A), ("a", None)],
        [(0, len(GET_A), 0, len(RESP_A) - 11, len(RESP_A), 200)],
        [(0, 0), (len(GET_A), len(RESP_A))],
        State.CLOSED,
    ),
}


# ---- feeding ----------------------------------------------------------------


def total_bytes(script: list[Step]) -> int:
    return sum(len(x) for k, x in script if k in "cs")


def split_script(script: list[Step], cuts: set[int]) -> list[Step]:
    """The script with its data steps cut at these positions of its bytes."""
    out: list[Step] = []
    pos = 0
    for kind, x in script:
        if kind not in "cs":
            out.append((kind, x))
            continue
        inner = sorted(c - pos for c in cuts if pos < c < pos + len(x))
        for a, b in zip([0, *inner], [*inner, len(x)]):
            out.append((kind, x[a:b]))
        pos += len(x)
    return out


class Run:
    def __init__(self) -> None:
        self.f = HttpFraming()
        self.quiescent = [self.f.quiescent()]
        self.exchanges: dict[int, Exchange] = {}

    def step(self, kind: str, x: Any) -> None:
        f = self.f
        if kind == "c":
            f.client_data(x)
        elif kind == "s":
            f.server_data(x)
        elif kind == "a":
            f.client_acked(f.server_end if x is None else x)
        elif kind == "C":
            f.client_end_of_stream()
        elif kind == "S":
            f.server_end_of_stream()
        q = f.quiescent()
        assert q >= self.quiescent[-1]  # it never goes back
        if q != self.quiescent[-1]:
            self.quiescent.append(q)
        for ex in [*f.history, *f.pending()]:
            self.exchanges[ex.index] = ex

    def result(self) -> tuple[Any, ...]:
        f = self.f
        return (
            f.state,
            f.reason,
            self.quiescent,
            [dataclasses.asdict(self.exchanges[i]) for i in sorted(self.exchanges)],
            f.in_flight() and f.in_flight().index,  # type: ignore[union-attr]
        )


def run(script: list[Step]) -> Run:
    r = Run()
    for kind, x in script:
        r.step(kind, x)
    return r


def boundaries(r: Run) -> list[tuple[Any, ...]]:
    return [
        (e.request_start, e.request_end, e.response_start, e.response_head_end, e.response_end, e.status)
        for _, e in sorted(r.exchanges.items())
    ]


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_whole(name: str) -> None:
    script, bounds, quiescent, state = SCENARIOS[name]
    r = run(script)
    assert r.f.reason is None
    assert r.f.state is state
    assert boundaries(r) == bounds
    assert r.quiescent == quiescent


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_split_everywhere(name: str) -> None:
    script = SCENARIOS[name][0]
    want = run(script).result()
    n = total_bytes(script)
    for p in range(n + 1):
        assert run(split_script(script, {p})).result() == want, p
    assert run(split_script(script, set(range(n + 1)))).result() == want  # byte at a time
    # two cuts: every position paired with a few others
    for p in range(0, n + 1, 7):
        for q in range(p + 1, n + 1, 13):
            assert run(split_script(script, {p, q})).result() == want, (p, q)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(SCENARIOS)), st.data())
def test_random_splits(name: str, data: st.DataObject) -> None:
    script = SCENARIOS[name][0]
    n = total_bytes(script)
    cuts = data.draw(st.sets(st.integers(0, n), max_size=40))
    assert run(split_script(script, cuts)).result() == run(script).result()


# ---- what is recorded ---------------------------------------------------------


def test_validators_and_framing_facts() -> None:
    r = run(SCENARIOS["keepalive3"][0] + [("c", COND), ("s", RESP_304), ("a", None)])
    a, b, c, d = (r.exchanges[i] for i in range(4))
    assert (a.method, a.target, a.http_version) == (b"GET", b"/a", b"1.1")
    assert a.request_header(b"Host") == b"example.com"
    assert (a.etag, a.etag_weak, a.content_length, a.chunked) == (b'"abc123"', False, 11, False)
    assert a.last_modified == b"Sun, 06 Nov 1994 08:49:37 GMT"
    assert a.accept_ranges == b"bytes"
    assert a.keep_alive and a.has_body and not a.close_delimited
    assert (b.etag, b.etag_weak, b.chunked, b.content_encoding, b.content_length) == (b'"w1"', True, True, b"gzip", None)
    assert b.request_header(b"accept-encoding") == b"gzip"
    assert c.request_header(b"range") == b"bytes=0-3" and c.request_header(b"if-range") == b'"abc123"'
    assert c.status == 206 and c.response_header(b"content-range") == b"bytes 0-3/11"
    assert d.status == 304 and d.etag == b'"abc123"' and not d.has_body


def test_head_has_no_body_despite_content_length() -> None:
    r = run([("c", HEAD), ("s", RESP_HEAD)])
    (ex,) = r.exchanges.values()
    assert ex.content_length == 123456 and not ex.has_body
    assert ex.response_end == len(RESP_HEAD)


def test_interim_response() -> None:
    r = run(SCENARIOS["100_continue"][0])
    ex = r.exchanges[0]
    assert ex.interim == [100]
    assert (ex.response_first_byte, ex.response_start) == (0, len(CONTINUE))


def test_in_flight_follows_acknowledgments() -> None:
    f = HttpFraming()
    assert f.in_flight() is None
    f.client_data(GET_A + GET_B)
    ex = f.in_flight()
    assert ex is not None and ex.index == 0 and ex.response_start is None
    f.server_data(RESP_A[:-5])
    assert f.in_flight() is ex and ex.response_head_end == len(RESP_A) - 11 and ex.response_end is None
    f.server_data(RESP_A[-5:] + RESP_B[:10])
    f.client_acked(len(RESP_A) - 1)
    assert f.in_flight() is ex  # one byte of its body not acknowledged yet
    f.client_acked(len(RESP_A))
    nxt = f.in_flight()
    # its head is incomplete: where its response starts is known once the head is parsed
    assert nxt is not None and nxt.index == 1 and nxt.response_start is None
    assert [e.index for e in f.pending()] == [1]
    assert f.quiescent() == (0, 0)  # request /b was pending all along
    f.server_data(RESP_B[10:])
    assert nxt.response_start == len(RESP_A)
    f.client_acked(f.server_end)
    assert f.in_flight() is None and f.quiescent() == (len(GET_A + GET_B), len(RESP_A + RESP_B))


def test_quiescent_needs_acknowledgment_and_no_pending_request() -> None:
    f = HttpFraming()
    f.client_data(GET_A)
    f.server_data(RESP_A)
    assert f.quiescent() == (0, 0)  # not acknowledged yet
    f.client_data(GET_B[:1])  # one byte of the next request
    f.client_acked(len(RESP_A))
    assert f.quiescent() == (0, 0)
    f.client_data(GET_B[1:])
    f.server_data(RESP_B)
    f.client_acked(len(RESP_A + RESP_B))
    assert f.quiescent() == (len(GET_A + GET_B), len(RESP_A + RESP_B))
    f.client_data(GET_C)
    assert f.quiescent() == (len(GET_A + GET_B), len(RESP_A + RESP_B))  # the latest good point stays


def test_http10_close_delimited_never_quiescent() -> None:
    r = run(SCENARIOS["http10_close_delimited"][0])
    ex = r.exchanges[0]
    assert ex.close_delimited and not ex.keep_alive and ex.http_version == b"1.0"
    assert r.f.quiescent() == (0, 0) and r.f.in_flight() is None


def test_connection_close_stops_further_exchanges() -> None:
    r = run(SCENARIOS["connection_close"][0][:6])
    assert r.f.state is State.CLOSED and not r.exchanges[1].keep_alive
    q = (cat(GET_A, GET_CLOSE), cat(RESP_A, RESP_CLOSE))
    assert r.f.quiescent() == q
    r.f.client_data(GET_A)  # a request the server will not answer: counted, not parsed
    assert r.f.state is State.CLOSED and r.f.reason is None and r.f.exchanges == 2
    assert r.f.client_end == q[0] + len(GET_A) and r.f.quiescent() == q
    r.f.server_data(b"HTTP/1.1 200 OK\r\n")
    assert r.f.state is State.FAILED and r.f.side == "server" and "after" in (r.f.reason or "")
    assert r.f.quiescent() == q


def test_server_closes_idle_connection_while_a_request_starts() -> None:
    r = run(GOOD + [("c", GET_B[:10]), ("S", None), ("c", GET_B[10:])])
    assert r.f.state is State.CLOSED and r.f.reason is None and r.f.quiescent() == GOOD_Q


def test_server_closes_without_answering() -> None:
    r = run(GOOD + [("c", GET_B), ("S", None)])
    assert r.f.state is State.CLOSED and r.f.reason is None and r.f.quiescent() == GOOD_Q
    ex = r.f.in_flight()
    assert ex is not None and ex.target == b"/b" and ex.response_start is None


# ---- bad input: failed with a reason, never an exception ------------------------

GOOD = [("c", GET_A), ("s", RESP_A), ("a", None)]
GOOD_Q = (len(GET_A), len(RESP_A))

BAD: dict[str, tuple[list[Step], str, str]] = {
    # name -> (what follows a good exchange, failing side, a word of the reason)
    "client_garbage": ([("c", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")], "client", "request"),
    "client_bad_request_line": ([("c", b"GET /x HTTP/9.9 extra\r\nHost: a\r\n\r\n")], "client", "request"),
    "client_bad_header": ([("c", b"GET /x HTTP/1.1\r\nHost a\r\n\r\n")], "client", "request"),
    "client_oversized_header": ([("c", b"GET /x HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")], "client", "request"),
    "client_bad_chunk": ([("c", b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")], "client", "request"),
    "server_garbage": ([("c", GET_B), ("s", b"SSH-2.0-OpenSSH_9.6\r\n\r\n")], "server", "response"),
    "server_bad_chunk": ([("c", GET_B), ("s", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n")], "server", "response"),
    "server_oversized_header": ([("c", GET_B), ("s", b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 20000 + b"\r\nContent-Length: 0\r\n\r\n")], "server", "response"),
    "server_two_lengths": ([("c", GET_B), ("s", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd")], "server", "response"),
    "server_unsolicited": ([("s", b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")], "server", "no request"),
    "server_extra_after_response": ([("c", GET_B), ("s", RESP_B + b"HTTP/1.1 200 OK\r\n")], "server", "no request"),
    "server_truncated_body": ([("c", GET_B), ("s", RESP_A[:-3]), ("S", None)], "server", "response"),
    "upgrade_101": (
        [("c", b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"), ("s", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x00")],
        "server",
        "switch",
    ),
    "connect_200": ([("c", b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n"), ("s", b"HTTP/1.1 200 OK\r\n\r\n\x16\x03")], "server", "switch"),
    "data_after_close_delimited": ([("c", GET_A), ("s", RESP_CLOSE_DELIM_11), ("S", None), ("s", b"more")], "server", "end of stream"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_fails_with_reason(name: str) -> None:
    tail, side, word = BAD[name]
    script = GOOD + tail
    n = total_bytes(script)
    cut_sets = [set(), set(range(n + 1)), *({p} for p in range(0, n + 1, max(1, n // 50)))]
    for cuts in cut_sets:
        r = run(split_script(script, cuts))
        assert r.f.state is State.FAILED, (cuts, r.f.state)
        assert r.f.side == side and word in (r.f.reason or ""), r.f.reason
        assert not (r.f.reason or "").startswith("tracker error")
        assert r.f.quiescent() == GOOD_Q
        # it stays failed and silent, whatever comes next
        r.f.client_data(GET_C)
        r.f.server_data(RESP_C)
        r.f.client_acked(10**6)
        r.f.server_end_of_stream()
        assert r.f.state is State.FAILED and r.f.quiescent() == GOOD_Q


def test_declined_upgrade_is_plain_http() -> None:
    req = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    r = run([("c", req), ("s", RESP_A), ("a", None), ("c", GET_B), ("s", RESP_B), ("a", None)])
    assert r.f.state is State.TRACKING and r.f.quiescent() == (cat(req, GET_B), cat(RESP_A, RESP_B))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("csaCS"), st.binary(max_size=40)), max_size=12), st.booleans())
def test_arbitrary_input_never_raises(steps: list[tuple[str, bytes]], prefix: bool) -> None:
    r = run(GOOD) if prefix else Run()
    for kind, blob in steps:
        r.step(kind, blob if kind in "cs" else (len(blob) * 7 if kind == "a" else None))
        assert not (r.f.reason or "").startswith("tracker error"), r.f.reason
    if prefix:
        assert r.f.quiescent() >= GOOD_Q


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([GET_A, GET_B, POST, HEAD]), st.sampled_from([RESP_A, RESP_B, TRAILERS, RESP_POST]), st.integers(0, 200), st.binary(min_size=1, max_size=8))
def test_corrupted_byte_never_raises(req: bytes, resp: bytes, at: int, junk: bytes) -> None:
    stream = req + resp
    at %= len(stream)
    bad = stream[:at] + junk + stream[at + len(junk):]
    f = HttpFraming()
    f.client_data(bad[: len(req)])
    f.server_data(bad[len(req):])
    f.client_acked(f.server_end)
    assert not (f.reason or "").startswith("tracker error"), f.reason
