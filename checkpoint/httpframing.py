"""HTTP/1.x message framing of one connection, in both directions.

Theory of operation
-------------------
An HTTP-aware replay needs to know where each request and each response
starts and ends in the two byte streams of a connection, and when the
connection is at a *quiescent point*: every response so far has ended and
been acknowledged by the client, and no byte of a next request has arrived.
A backup taking over there needs nothing replayed.

:class:`HttpFraming` is fed the client's stream (:meth:`client_data`), the
server's stream (:meth:`server_data`), each in order, in the order the
gateway sees them, and the client's acknowledgments of the server stream
(:meth:`client_acked`).  It does no parsing of its own: two
:class:`h11.Connection` objects do, kept in step by mirroring events:

* ``_req`` plays the **server** and receives the client's bytes: it parses
  requests;
* ``_resp`` plays the **client** and receives the server's bytes: it parses
  responses.

Each request ``_req`` parses is *sent* through ``_resp`` (h11's client must
send a request before it can receive its response, and learns from it the
method — a HEAD response has no body — and whether the client asked to
close); each response event ``_resp`` parses is sent through ``_req`` (h11's
server pauses after a request until its response is sent).  Mirroring is the
state machine's half of h11's ``send`` only (``Connection._process_event``, no
serialising: the bytes would be thrown away), and a message's body is not
mirrored at all — its end is (h11's state machine needs no body events, only
its writer counts them): per body segment the cost is the parse alone.  h11 writes HTTP/1.1 only, so an
HTTP/1.0 message is mirrored as HTTP/1.1 with ``Connection: close`` — which
is what h11's keep-alive rules make of HTTP/1.0 anyway.  When both sides of
an exchange are done, both connections ``start_next_cycle()``; a pipelined
request waits in ``_req``'s buffer (h11 answers ``PAUSED``) until then.

Offsets are stream offsets (0-based).  h11 consumes its buffer one event at
a time, so the offset an event ends at is the bytes fed minus
``conn.trailing_data``'s length, read right after ``next_event()``.  An
exchange records: its request's start and end in the client stream; the
start of its server bytes (an interim 1xx included), the start and header
end of its final response, and the end of its body in the server stream;
and the facts a later range resume needs (validators, framing, encoding).

States:

``TRACKING``
    Following the connection.
``CLOSED``
    The connection carries no further exchange: its last one asked to close
    (``Connection: close``, HTTP/1.0), its response was close-delimited, or a
    side reached end of stream.  Acknowledgments still count.  Client bytes
    after the last exchange are counted, not parsed (a request the server
    will not answer: a pipelining or keep-alive race, never quiescent
    again); server bytes after the last response are a failure.
``FAILED``
    Malformed or unexpected HTTP from either side (any h11 protocol error, a
    protocol switch — 101 or a 2xx to CONNECT —, server data after the last
    response or data after end of stream).  The tracker stops, ``reason`` names
    why and ``side`` which side; :meth:`quiescent` keeps reporting the last
    good point.  Nothing is ever raised to the caller.

A close-delimited body (HTTP/1.0 style: neither Content-Length nor chunked)
ends at the server's end of stream (:meth:`server_eof`) and never makes a
quiescent point: its end is not a place where another request can follow.

Memory: a few completed exchanges are kept (``history``); the exchanges the
client has not fully received are kept until it has.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import h11
from h11._readers import ContentLengthReader as _ContentLengthReader

Side = Literal["client", "server"]
Headers = tuple[tuple[bytes, bytes], ...]

# h11's default; a header block (or a chunk header) larger than this is an error
MAX_HEADER_BLOCK = 16 * 1024


class State(enum.Enum):
    TRACKING = "tracking"
    CLOSED = "closed"
    FAILED = "failed"


def _header(headers: Headers, name: bytes) -> bytes | None:
    """The value of header ``name`` (lower case); repeated headers joined with ", "."""
    values = [v for n, v in headers if n == name]
    return b", ".join(values) if values else None


def _tokens(value: bytes | None) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",")] if value else []


@dataclass
class Exchange:
    """One request and its response.  Offsets are ``None`` until known."""

    index: int  # 0 for the connection's first request
    request_start: int  # client stream
    request_head_end: int
    method: bytes
    target: bytes
    http_version: bytes  # the request's
    request_headers: Headers  # names in lower case, as h11 gives them
    request_end: int | None = None
    response_first_byte: int | None = None  # server stream: an interim 1xx included
    interim: list[int] = field(default_factory=list)  # 1xx status codes, in order
    response_start: int | None = None  # the final response's status line
    response_head_end: int | None = None  # = its body's start
    response_end: int | None = None  # its body's end (trailers included)
    status: int | None = None
    response_version: bytes | None = None
    response_headers: Headers = ()
    etag: bytes | None = None  # the opaque tag, quotes included, without W/
    etag_weak: bool = False
    last_modified: bytes | None = None
    accept_ranges: bytes | None = None
    content_length: int | None = None  # as the header says (a HEAD/304 one included)
    chunked: bool = False
    content_encoding: bytes | None = None
    close_delimited: bool = False  # the body ends at the server's end of stream
    keep_alive: bool = True  # False: neither side lets another exchange follow

    def request_header(self, name: bytes) -> bytes | None:
        return _header(self.request_headers, name.lower())

    def response_header(self, name: bytes) -> bytes | None:
        return _header(self.response_headers, name.lower())

    @property
    def has_body(self) -> bool:
        """Whether the final response's framing allows body bytes."""
        return not (
            self.method == b"HEAD" or self.status in (204, 304) or (self.content_length == 0 and not self.chunked)
        )


_END = h11.EndOfMessage()


def _inside_body(conn: h11.Connection, n: int) -> bool:
    """``n`` bytes in the middle of a ``Content-Length`` body h11 is reading: counted off its
    reader instead of being parsed (they would only make a Data event, and cost a copy and an
    event per segment of a long body).  Only when h11 has nothing buffered and the body goes on
    past them, so h11 still sees the bytes that end it.  (h11 0.14-0.16's ContentLengthReader.)"""
    reader = conn._reader
    if (type(reader) is not _ContentLengthReader or conn.their_state is not h11.SEND_BODY
            or len(conn._receive_buffer) or reader._remaining <= n):
        return False
    reader._remaining -= n
    return True


def _mirror(conn: h11.Connection, event: h11.Event) -> None:
    """``conn.send(event)`` without serialising it: the state machine's half of h11's
    ``send_with_data_passthrough`` (h11 0.14-0.16), whose bytes would be thrown away.  Events
    are built with ``_parsed=True`` from headers h11 itself normalised."""
    conn._process_event(conn.our_role, event)


class _Failure(Exception):
    def __init__(self, side: Side, reason: str) -> None:
        super().__init__(reason)
        self.side: Side = side
        self.reason = reason


class HttpFraming:
    """Sans-I/O tracker of HTTP/1.x message boundaries in both streams (see the module)."""

    def __init__(self, *, max_header_block: int = MAX_HEADER_BLOCK, history: int = 16) -> None:
        self.max_header_block = max_header_block
        self._req = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_block)
        self._resp = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_block)
        self.state = State.TRACKING
        self.side: Side | None = None  # which side's bytes made it fail
        self.reason: str | None = None
        self.client_end = 0  # bytes of the client stream fed
        self.server_end = 0
        self.acked = 0  # the client has the server stream up to here
        self.client_eof = False
        self.server_eof = False
        self.exchanges = 0  # requests seen
        self.history: deque[Exchange] = deque(maxlen=history)  # completed, most recent last
        self._current: Exchange | None = None  # the one h11 is in the cycle of
        self._unacked: deque[Exchange] = deque()  # response not fully acknowledged yet
        self._c_done = 0  # client offset after the last complete request
        self._s_done = 0  # server offset after the last complete response
        self._quiescent: tuple[int, int] = (0, 0)
        self._point: tuple[int, int] = (0, 0)  # after the last exchange the client fully acknowledged
        self.cuts: list[int] = []  # server offsets where a final response ended (taken by the owner)
        self._side: Side = "client"  # whose event is being handled
        self._client_closed = False  # h11 reported the client's end of stream
        self._dirty_c = False  # the side may have an event to give (see _pump)
        self._dirty_s = False

    # ---- input -------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        """The next ``data`` of the client's stream."""
        if not data or self.state is State.FAILED:
            return
        self.client_end += len(data)
        if self.client_eof:
            return self._fail("client", "client data after its end of stream")
        if self.state is State.CLOSED:
            return  # a request the server will not answer (counted: never quiescent again)
        if _inside_body(self._req, len(data)):
            return
        self._req.receive_data(data)
        self._dirty_c = True
        self._pump()

    def server_data(self, data: bytes | memoryview) -> None:
        """The next ``data`` of the server's stream."""
        if not data or self.state is State.FAILED:
            return
        self.server_end += len(data)
        if self.server_eof:
            return self._fail("server", "server data after its end of stream")
        if self.state is State.CLOSED:
            return self._fail("server", "server data after the connection's last response")
        if _inside_body(self._resp, len(data)):
            return
        self._resp.receive_data(bytes(data))
        self._dirty_s = True
        self._pump()

    def client_acked(self, offset: int) -> None:
        """The client has acknowledged the server stream up to ``offset``."""
        if offset <= self.acked:
            return
        self.acked = offset
        self._drop_acked()
        if self.state is not State.FAILED:
            self._update_quiescent()

    def client_end_of_stream(self) -> None:
        """The client half-closed (its FIN)."""
        if self.client_eof or self.state is State.FAILED:
            return
        self.client_eof = True
        if self.state is State.TRACKING:
            self._req.receive_data(b"")
            self._dirty_c = True
            self._pump()

    def server_end_of_stream(self) -> None:
        """The server closed its half (its FIN): a close-delimited body ends here."""
        if self.server_eof or self.state is State.FAILED:
            return
        self.server_eof = True
        if self.state is not State.TRACKING:
            return
        if self._resp.their_state is h11.SEND_RESPONSE and self.server_end == self._s_done:
            # closed with a request unanswered (a keep-alive race, or the
            # server gave up): no HTTP error, the request stays in flight
            self.state = State.CLOSED
            return
        self._resp.receive_data(b"")
        self._dirty_s = True
        self._pump()

    # ---- output ------------------------------------------------------------

    @property
    def failed(self) -> bool:
        return self.state is State.FAILED

    def quiescent(self) -> tuple[int, int]:
        """The latest (client offset, server offset) where every response so far
        had ended and been acknowledged and no request was pending; (0, 0) at the
        start.  Kept, not advanced, once the tracker has failed."""
        return self._quiescent

    def replay_point(self) -> tuple[int, int]:
        """The latest (client offset, server offset) boundary between two exchanges
        before which every exchange is complete and its response fully acknowledged:
        a replay may start there even while later requests are in flight (pipelined,
        or the next request already sent with the acknowledgment).  Kept, not
        advanced, once the tracker has failed."""
        return self._point

    def take_cuts(self) -> list[int]:
        """The server offsets where a final response ended since the last call."""
        cuts, self.cuts = self.cuts, []
        return cuts

    def in_flight(self) -> Exchange | None:
        """The oldest exchange whose response the client has not fully
        acknowledged (possibly not started yet), or ``None``."""
        return self._unacked[0] if self._unacked else None

    def pending(self) -> list[Exchange]:
        """Every exchange not fully acknowledged yet, oldest first."""
        return list(self._unacked)

    # ---- the machine -------------------------------------------------------

    def _fail(self, side: Side, reason: str) -> None:
        self.state = State.FAILED
        self.side = side
        self.reason = reason

    def _pump(self) -> None:
        try:
            # a side is stepped only when it may have an event: new bytes, or the other
            # side's event let it on (a request sent: its response may be parsed; a cycle
            # restarted: a pipelined request may be)
            while self.state is State.TRACKING and (self._dirty_c or self._dirty_s):
                if self._dirty_c and not self._step_client():
                    self._dirty_c = False
                if self._dirty_s and not self._step_server():
                    self._dirty_s = False
            if (
                self.state is State.TRACKING
                and self._resp.our_state is h11.IDLE
                and self._resp.their_state is h11.IDLE
                and self.server_end > self._s_done
            ):
                raise _Failure("server", "server data with no request outstanding")
        except h11.ProtocolError as exc:
            side = self._side
            what = "request" if side == "client" else "response"
            self._fail(side, f"malformed or unexpected {what}: {type(exc).__name__}: {exc}")
            return
        except _Failure as f:
            self._fail(f.side, f.reason)
            return
        except Exception as exc:  # noqa: BLE001 - never break the connection over a tracker bug
            self._fail(self._side, f"tracker error: {type(exc).__name__}: {exc}")
            return
        self._update_quiescent()

    def _check_head(self, start: int, end: int, what: str) -> None:
        # h11 bounds a head only while it is incomplete: one that arrives
        # whole in a single piece would pass; the limit must not depend on
        # how the stream was cut
        if end - start > self.max_header_block:
            limit = self.max_header_block
            raise _Failure(self._side, f"malformed or unexpected {what}: head larger than {limit} bytes")

    def _consumed(self, conn: h11.Connection, fed: int) -> int:
        return fed - len(conn.trailing_data[0])

    def _step_client(self) -> bool:
        self._side = "client"
        if self._client_closed:
            return False
        ev = self._req.next_event()
        if ev is h11.NEED_DATA or ev is h11.PAUSED:
            return False
        if isinstance(ev, h11.Request):
            self._check_head(self._c_done, self._consumed(self._req, self.client_end), "request")
            headers: Headers = tuple((bytes(n), bytes(v)) for n, v in ev.headers)
            ex = Exchange(
                index=self.exchanges,
                request_start=self._c_done,
                request_head_end=self._consumed(self._req, self.client_end),
                method=bytes(ev.method),
                target=bytes(ev.target),
                http_version=bytes(ev.http_version),
                request_headers=headers,
            )
            self.exchanges += 1
            self._current = ex
            self._unacked.append(ex)
            mirror = list(headers)
            if ev.http_version != b"1.1":
                # h11 writes 1.1 only; 1.0 is no keep-alive for h11 either
                if not any(n == b"host" for n, _ in mirror):
                    mirror.append((b"host", b"-"))
                mirror.append((b"connection", b"close"))
            _mirror(self._resp, h11.Request(method=ev.method, target=ev.target, headers=mirror,
                                            http_version=b"1.1", _parsed=True))
            self._dirty_s = True
        elif isinstance(ev, h11.Data):
            pass  # bodies are not mirrored (see the module)
        elif isinstance(ev, h11.EndOfMessage):
            ex = self._cur()
            ex.request_end = self._c_done = self._consumed(self._req, self.client_end)
            _mirror(self._resp, _END)
            self._maybe_complete()
        elif isinstance(ev, h11.ConnectionClosed):
            # a half-close: the response in progress, if any, still comes
            self._client_closed = True
            if self._current is None:
                self._close()
            return False
        return True

    def _step_server(self) -> bool:
        self._side = "server"
        if self._resp.our_state is h11.IDLE and self._resp.their_state is h11.IDLE:
            # no request yet: server bytes now are unsolicited (unless the
            # client's buffer holds the request they answer: _pump checks)
            if self.server_eof and self.server_end == self._s_done:
                self._close()
            return False
        ev = self._resp.next_event()
        if ev is h11.NEED_DATA or ev is h11.PAUSED:
            return False
        if isinstance(ev, (h11.InformationalResponse, h11.Response)):
            ex = self._cur()
            head_end = self._consumed(self._resp, self.server_end)
            self._check_head(self._s_done, head_end, "response")
            if ex.response_first_byte is None:
                ex.response_first_byte = self._s_done
            if self._resp.their_state is h11.SWITCHED_PROTOCOL:
                raise _Failure("server", f"protocol switch ({ev.status_code} to {ex.method.decode('latin-1')})")
            headers: Headers = tuple((bytes(n), bytes(v)) for n, v in ev.headers)
            mirror = list(headers)
            if ev.http_version != b"1.1":
                mirror.append((b"connection", b"close"))
            if isinstance(ev, h11.InformationalResponse):
                ex.interim.append(ev.status_code)
                self._s_done = head_end
                _mirror(self._req, h11.InformationalResponse(status_code=ev.status_code, headers=mirror,
                                                             http_version=b"1.1", reason=ev.reason, _parsed=True))
                return True
            ex.response_start = self._s_done
            ex.response_head_end = head_end
            self._describe(ex, ev, headers)
            _mirror(self._req, h11.Response(status_code=ev.status_code, headers=mirror, reason=ev.reason,
                                            http_version=b"1.1", _parsed=True))
        elif isinstance(ev, h11.Data):
            pass  # bodies are not mirrored (see the module)
        elif isinstance(ev, h11.EndOfMessage):
            ex = self._cur()
            ex.response_end = self._s_done = self._consumed(self._resp, self.server_end)
            self.cuts.append(ex.response_end)
            _mirror(self._req, _END)
            self._maybe_complete()
        elif isinstance(ev, h11.ConnectionClosed):
            self._close()
            return False
        return True

    def _describe(self, ex: Exchange, ev: h11.Response, headers: Headers) -> None:
        ex.status = ev.status_code
        ex.response_version = bytes(ev.http_version)
        ex.response_headers = headers
        etag = _header(headers, b"etag")
        if etag is not None:
            ex.etag_weak = etag[:2] == b"W/"
            ex.etag = etag[2:] if ex.etag_weak else etag
        ex.last_modified = _header(headers, b"last-modified")
        ex.accept_ranges = _header(headers, b"accept-ranges")
        ex.content_encoding = _header(headers, b"content-encoding")
        ex.chunked = b"chunked" in _tokens(_header(headers, b"transfer-encoding"))
        cl = _header(headers, b"content-length")
        if cl is not None:
            ex.content_length = int(cl.split(b",")[0])  # h11 checked it (equal repeats allowed)
        ex.close_delimited = not (ex.chunked or cl is not None) and not (
            ex.method == b"HEAD" or ev.status_code in (204, 304) or ex.method == b"CONNECT"
        )
        ex.keep_alive = (
            ex.http_version == b"1.1"
            and ev.http_version == b"1.1"
            and b"close" not in _tokens(ex.request_header(b"connection"))
            and b"close" not in _tokens(_header(headers, b"connection"))
            and not ex.close_delimited
        )

    def _cur(self) -> Exchange:
        if self._current is None:  # h11 would not have produced the event
            raise _Failure(self._side, "message outside an exchange")
        return self._current

    def _maybe_complete(self) -> None:
        ex = self._current
        if ex is None or ex.request_end is None or ex.response_end is None:
            return
        self._current = None
        self.history.append(ex)
        if ex.close_delimited:
            return self._close()
        states = (self._req.our_state, self._req.their_state, self._resp.our_state, self._resp.their_state)
        if all(s is h11.DONE for s in states):
            self._req.start_next_cycle()
            self._resp.start_next_cycle()
            self._dirty_c = self._dirty_s = True
        else:
            self._close()

    def _close(self) -> None:
        """No further exchange on this connection."""
        if self.state is not State.TRACKING:
            return
        self.state = State.CLOSED

    def _drop_acked(self) -> None:
        while self._unacked:
            ex = self._unacked[0]
            end = ex.response_end
            if end is None or self.acked < end:
                break
            self._unacked.popleft()
            if ex.request_end is not None and self.state is not State.FAILED:
                self._point = (ex.request_end, end)

    def _update_quiescent(self) -> None:
        self._drop_acked()
        if (
            self._current is None
            and not self._unacked
            and self.client_end == self._c_done
            and self.server_end == self._s_done
            and self.acked >= self._s_done
            and not (self.history and self.history[-1].close_delimited)
        ):
            self._quiescent = (self._c_done, self._s_done)
