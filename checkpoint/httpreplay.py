"""HTTP-aware replay: where a moved HTTP/1.x connection's replay starts, and what the backup is asked.

Theory of operation
-------------------
A stream replay (``checkpoint.splice``) sends the backup every byte the client ever sent and
has it regenerate every byte the server ever sent.  For HTTP/1.x the byte streams translate
into application state (tcpcp section 6): an exchange whose response the client has fully
acknowledged is finished business, and — for a server whose response does not depend on
earlier requests on the same connection, the operator's choice (``replay = "http"``) — a
backup can take the connection over at the boundary after it.

:class:`HttpTrack` follows one connection for the data plane (sans-I/O).  It owns the
connection's :class:`~checkpoint.httpframing.HttpFraming`, fed the client's bytes as the log
grows and the server's as the digest hashes them (the digest's *cutter*: a new chunk starts
where each response ends, so that a verifier can start there), and the client's
acknowledgments.  When the **replay point** (the boundary after the last fully acknowledged
exchange) advances, the client log and the digest are trimmed to it: a keep-alive connection
holds only what follows its last finished exchange.

At a move, :meth:`HttpTrack.plan` says how the backup takes over (a :class:`ReplayPlan`):

``quiescent``
    Nothing in flight: the backup connection opens at the replay point and is sent only the
    requests that follow it.  Nothing is regenerated.
``range``
    The oldest exchange in flight is a ``200`` to a GET, caught mid-body, with a strong
    validator, ``Accept-Ranges: bytes``, a ``Content-Length`` and no content coding.  The backup
    is sent that request again with ``Range: bytes=N-`` and ``If-Range:`` the validator
    (RFC 9110 13.1.5 and 14.2), N at a chunk boundary of the digest at least
    :data:`RANGE_OVERLAP` below what the client acknowledged (and :data:`RANGE_PRIME` bytes
    earlier still, which only prime the volatile-field masker).  The answer is checked by
    :class:`RangeAnswer`: a ``206`` whose ``Content-Range`` and validator match has its header
    block removed and its body spliced at N (the overlap verified against the digest); a
    ``200`` (the validator changed, or Range ignored) is the whole response regenerated and
    verified; anything else fails the move (reset, never a wrong byte).
``full``
    Something in flight that cannot be range-resumed (``reason`` says why): the backup opens
    at the replay point and regenerates the responses in flight in full, verified.
``stream``
    HTTP tracking stopped (malformed or unexpected HTTP from either side, a client log over
    its limit, state lost at a restart; ``reason``): a stream replay from the last replay
    point, as far as the log was trimmed — the same bytes a stream replay would send after it.

The synthetic range request takes the original request's place in the client's sequence
space: the backup's connection is opened so that the request *ends* where the original did,
so every later client byte keeps its sequence number and the translation stays a constant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import h11

from .httpframing import MAX_HEADER_BLOCK, Exchange, HttpFraming
from .streamlog import ByteLog, DigestSnapshot, StreamDigest

RANGE_OVERLAP = 64 * 1024  # bytes the client already acknowledged that a range resume regenerates, at least
RANGE_PRIME = 64           # bytes before the verified overlap that only prime the masker (>= its horizon)
STRATEGIES = ("stream", "quiescent", "full", "range")
_NO_CUTS: list[int] = []  # (never appended to: what the cutter returns for most segments)


@dataclass(frozen=True, slots=True)
class RangeExpect:
    """What a range resume asked for, and what the ``206`` must say."""

    first: int              # the body offset asked from (Range: bytes=first-)
    total: int              # the body's length (the original Content-Length)
    etag: bytes             # the strong validator, quotes included
    body_start: int         # server stream offset of the original body's first byte

    @property
    def server_first(self) -> int:
        """Server stream offset of body byte ``first``."""
        return self.body_start + self.first


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    """How a backup takes a connection over (offsets are stream offsets of the original
    connection: client stream for ``client_*``, server stream for the others)."""

    strategy: str
    client_start: int             # the backup's client stream starts here (its SYN is one below)
    server_start: int | None      # the backup's first byte stands for this server offset (None: range, from its head)
    verify_from: int              # where the verifier starts (a chunk start of the snapshot)
    prefix: bytes = b""           # sent first instead of the log: a rewritten request
    prime: int = 0                # bytes before verify_from that only prime the masker
    range: RangeExpect | None = None
    full_from: int | None = None  # range: the server offset a 200 answer stands for
    reason: str | None = None     # why not a better strategy

    @property
    def log_from(self) -> int:
        """Where the client log takes over from the prefix."""
        return self.client_start + len(self.prefix)


def stream_plan(log: ByteLog, snap: DigestSnapshot, reason: str | None = None) -> ReplayPlan:
    """A stream replay from wherever the log and the digest start."""
    return ReplayPlan("stream", log.base, snap.base, snap.base, reason=reason)


# ----- the range request and its answer --------------------------------------------------

_STRIP = re.compile(rb"^(range|if-range)\s*:", re.IGNORECASE)


def range_request(head: bytes, first: int, etag: bytes) -> bytes:
    """The request head ``head`` (ending in an empty line) asking for bytes from ``first`` if the
    representation is still ``etag``; any Range or If-Range it had is replaced.  Written with CRLF
    line ends whatever the original used."""
    lines = re.split(rb"\r?\n", head.rstrip(b"\r\n"))  # h11 accepts bare LF line ends too
    kept = [lines[0]] + [ln for ln in lines[1:] if not _STRIP.match(ln)]
    kept += [b"Range: bytes=%d-" % first, b"If-Range: " + etag]
    return b"\r\n".join(kept) + b"\r\n\r\n"


class RangeAnswer:
    """The head of the backup's answer to a range request, checked against what was asked
    (sans-I/O, h11 as the parser).  ``feed`` the backup's first bytes in order until
    ``outcome`` is set: ``("range", head_length)`` for a matching ``206``, ``("full", 0)`` for a
    ``200`` (the whole response regenerated), ``("fail", reason)`` for anything else."""

    def __init__(self, expect: RangeExpect) -> None:
        self.expect = expect
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BLOCK)
        self.conn.send(h11.Request(method="GET", target="/", headers=[("host", "-")]))
        self.conn.send(h11.EndOfMessage())
        self.fed = 0
        self.outcome: tuple[str, int | str] | None = None

    def feed(self, data: bytes) -> tuple[str, int | str] | None:
        if self.outcome is not None or not data:
            return self.outcome
        self.fed += len(data)
        try:
            self.conn.receive_data(data)
            while True:
                ev = self.conn.next_event()
                if ev is h11.NEED_DATA:
                    return None
                if isinstance(ev, h11.InformationalResponse):
                    continue
                if isinstance(ev, h11.Response):
                    head = self.fed - len(self.conn.trailing_data[0])
                    self.outcome = self._check(ev, head)
                    return self.outcome
                self.outcome = ("fail", f"range resume: unexpected {type(ev).__name__} from the backup")
                return self.outcome
        except h11.ProtocolError as exc:
            self.outcome = ("fail", f"range resume: malformed answer from the backup: {exc}")
            return self.outcome

    def _check(self, ev: h11.Response, head: int) -> tuple[str, int | str]:
        x = self.expect
        headers = {bytes(n): bytes(v) for n, v in ev.headers}
        if ev.status_code == 200:
            return ("full", 0)  # Range ignored or the validator changed: verified in full
        if ev.status_code != 206:
            return ("fail", f"range resume refused: the backup answered {ev.status_code}")
        want_range = b"bytes %d-%d/%d" % (x.first, x.total - 1, x.total)
        got_range = headers.get(b"content-range", b"").strip()
        if got_range != want_range:
            return ("fail", f"range resume: Content-Range {got_range!r}, expected {want_range!r}")
        etag = headers.get(b"etag", b"").strip()
        if etag != x.etag:
            return ("fail", f"range resume: validator {etag!r}, the original was {x.etag!r}")
        coding = headers.get(b"content-encoding", b"identity").strip().lower()
        if coding != b"identity":
            return ("fail", f"range resume: content coding {coding!r}")
        if b"content-length" in headers and int(headers[b"content-length"]) != x.total - x.first:
            return ("fail", "range resume: Content-Length does not match the range")
        return ("range", head)


# ----- one connection's HTTP state --------------------------------------------------------

class HttpTrack:
    """HTTP framing of one connection, wired to its log and digest (see the module)."""

    def __init__(self, log: ByteLog, digest: StreamDigest) -> None:
        self.framing = HttpFraming()
        self.log = log
        self.digest = digest
        self.fallback: str | None = None  # why HTTP tracking stopped (then: stream replay)
        self.fallback_side: str | None = None  # whose bytes made it stop ("client", "server"), if theirs
        self.reported = False  # (the owner's: the fallback was announced)
        self.point = (log.base, digest.base)
        self.trims = 0
        self.trimmed_bytes = 0  # client log bytes freed
        self._log_end = log.end
        if log.base or digest.base or digest.end or log.end:
            self.stop("HTTP state not known (restored or imported connection)")
        else:
            digest.cutter = self._server_bytes

    @property
    def requests(self) -> int:
        return self.framing.exchanges

    def stop(self, reason: str) -> None:
        if self.fallback is None:
            self.fallback = reason
        self.digest.cutter = None

    def _server_bytes(self, mv: memoryview) -> list[int]:
        f = self.framing
        f.server_data(mv)
        cuts = f.take_cuts() if f.cuts else _NO_CUTS
        self._check()
        return cuts

    def _check(self) -> None:
        f = self.framing
        if f.failed and self.fallback is None:
            self.fallback_side = f.side
            self.stop(f"{f.side}: {f.reason}")

    def client_acked(self, offset: int) -> None:
        """The client acknowledged the server stream up to ``offset`` (before its payload is logged)."""
        self.framing.client_acked(offset)

    def client_logged(self) -> None:
        """The client log may have grown: the framing reads the new bytes."""
        log = self.log
        if self.fallback is not None:
            return
        if log.overflow is not None:
            return self.stop(f"client log stopped: {log.overflow}")
        if log.end > self._log_end:
            self.framing.client_data(log.read(self._log_end, log.end - self._log_end))
            self._log_end = log.end
            if log.fin_offset == log.end:
                self.framing.client_end_of_stream()
            self._check()

    def server_fin(self, offset: int) -> None:
        if self.fallback is None and self.digest.end == offset:
            self.framing.server_end_of_stream()
            self._check()

    def advance(self) -> bool:
        """Trim the log and the digest to the replay point when it moved."""
        c, s = self.framing.replay_point()
        if self.fallback is not None or (c, s) == self.point or c < self.log.base or s < self.digest.base:
            return False
        self.trimmed_bytes += self.log.trim(c)
        self.digest.trim(s)
        self.point = (c, s)
        self.trims += 1
        return True

    def describe(self) -> dict[str, object]:
        f = self.framing
        ex = f.in_flight()
        return {
            "requests": f.exchanges,
            "replay_point": {"client": self.point[0], "server": self.point[1]},
            "in_flight": None if ex is None else f"{ex.method.decode('latin-1')} {ex.target.decode('latin-1')}",
            "trims": self.trims,
            "fallback": self.fallback,
        }

    # --- at a move ------------------------------------------------------------------------
    def plan(self, snap: DigestSnapshot, client_acked: int) -> ReplayPlan:
        """How a backup takes the connection over now (see the module)."""
        log = self.log
        if self.fallback is not None:
            return stream_plan(log, snap, self.fallback)
        c, s = self.point
        if (c, s) != (log.base, snap.base):
            return stream_plan(log, snap, "log and digest out of step")
        ex = self.framing.in_flight()
        if ex is None or (ex.response_start is None and ex.response_first_byte is None and snap.end == s):
            return ReplayPlan("quiescent", c, s, s)
        why = self._why_not_range(ex, snap, client_acked, c, s)
        if isinstance(why, str):
            return ReplayPlan("full", c, s, s, reason=why)
        v, first = why
        assert ex.etag is not None and ex.content_length is not None and ex.response_head_end is not None
        head = log.read(ex.request_start, ex.request_head_end - ex.request_start)
        req = range_request(head, first, ex.etag)
        x = RangeExpect(first=first, total=ex.content_length, etag=ex.etag, body_start=ex.response_head_end)
        return ReplayPlan("range", ex.request_head_end - len(req), None, v, prefix=req, prime=RANGE_PRIME,
                          range=x, full_from=s)

    @staticmethod
    def _why_not_range(ex: Exchange, snap: DigestSnapshot, acked: int, c: int, s: int) -> str | tuple[int, int]:
        """Why ``ex``'s response cannot be range-resumed, or (verify_from, first body byte asked)."""
        if ex.method != b"GET":
            return f"{ex.method.decode('latin-1')} request"
        if ex.request_start != c or ex.request_end != ex.request_head_end:
            return "request with a body, or not complete"
        if ex.response_start is None or ex.response_head_end is None:
            return "response head not received"
        if ex.interim or ex.response_start != s:
            return "interim responses"
        if ex.status != 200:
            return f"status {ex.status}"
        if ex.etag is None or ex.etag_weak:
            return "no strong validator" if ex.etag is None else "weak validator"
        if b"bytes" not in [t.strip().lower() for t in (ex.accept_ranges or b"").split(b",")]:
            return "no Accept-Ranges: bytes"
        if ex.chunked or ex.content_length is None:
            return "chunked body"
        if ex.content_encoding is not None and ex.content_encoding.strip().lower() != b"identity":
            return "content-coded body"
        body = ex.response_head_end
        end = body + ex.content_length
        limit = min(acked, end) - RANGE_OVERLAP
        starts = [v for v in snap.chunk_starts() if body + RANGE_PRIME <= v <= limit]
        if not starts:
            return f"less than {RANGE_OVERLAP} body bytes acknowledged past a chunk boundary"
        v = starts[-1]
        return v, v - body - RANGE_PRIME
