"""Portable, authenticated checkpoints: one connection as a signed JSON document.

Theory of operation
-------------------
An operator (or a standby gateway) can carry a connection's checkpoint away
from the appliance and bring it back: ``GET /api/v1/connections/{id}/checkpoint``
and ``appliance checkpoint export`` produce a *document*, ``POST
/api/v1/checkpoints`` and ``appliance checkpoint import`` take one.  The
document is JSON, so it is architecture-independent (no struct layouts, no
byte order), versioned, and signed::

    {
      "format": "tcp-failover-checkpoint",
      "version": 2,
      "family": "ipv4" | "ipv6",            # of every address in "connection" (version 2)
      "exported_at": 1763700000.25,         # wall time of the export
      "checkpoint_time": 1763700000.2,      # wall time the ICI was last committed
      "connection": {...},                  # checkpoint.state.record_state(rec)
      "log": {"limit": .., "end": .., "fin_offset": .., "overflow": .., "fin_server_offset": ..,
              "data_b64": "<base64 of the client bytes [0, end)>"},
      "digest": {...} | null,               # checkpoint.state.digest_state(rec.digest)
      "signature": "hmac-sha256:<64 hex digits>"
    }

The signature is HMAC-SHA256, keyed from the configuration, over the
*canonical* JSON of the document without its ``signature`` key
(``sort_keys=True``, ``separators=(",", ":")``, ``ensure_ascii=True``; floats
as Python's shortest round-trip repr), so any reader that parses and
re-serialises canonically can check it.  Only the contiguous prefix of the
client log is exported: client segments held aside beyond a gap are not
(the client retransmits them, it has no acknowledgment for them).

Versions: 2 added ``family``; the client, service and backend addresses of a
document must all be of that family.  A version-1 document (written before
IPv6) has no ``family`` and is read as IPv4: every address in it must be one.  A stream
digest's running hash of its partial chunk cannot be exported either; the
imported digest is *restored*, blind up to the next chunk boundary
(``checkpoint.streamlog``).

Import is tcpcp section 7 applied to a document that may come from anywhere:
"the kernel has no means of verifying that the connection information
actually originates from a compatible system", so it takes nothing on trust.
The order matters: the size and the JSON syntax are checked, then the format
and version, then the signature -- *before* any other field is interpreted --
and only then the sanity checks (:func:`_sanity`): a state a connection can be
resumed in, windows within the buffer limits, MSS and window scale in range,
addresses of a configured service and one of its backends, and sequence
numbers that agree with each other and with the log (the server never
acknowledged a client byte the log lacks: invariant I1).  Every refusal is a
:class:`CheckpointError` whose ``field`` is the dotted path of the culprit
(``connection.server.wscale``, ``log.data_b64``, ``signature``) and whose
``str()`` starts with it.  :func:`import_document` is pure: it returns a
complete :class:`Imported` or raises; nothing is half-accepted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import math
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, Sequence

from .addr import family, with_port
from .ici import ConnectionRecord, HalfConnection, TcpState
from .seqnum import seq_add, seq_diff
from .state import StateError, digest_from_state, digest_state, log_from_state, log_state, record_from_state, record_state
from .streamlog import ByteLog, SampledDigest, StreamDigest


class BackendShape(Protocol):
    """What an import checks of a configured backend (the appliance's config has this shape)."""

    @property
    def name(self) -> str: ...
    @property
    def addresses(self) -> tuple[str, ...]: ...
    @property
    def port(self) -> int: ...


class ServiceShape(Protocol):
    """What an import checks of a configured service: its address and its backends."""

    @property
    def name(self) -> str: ...
    @property
    def vips(self) -> tuple[str, ...]: ...
    @property
    def port(self) -> int: ...
    @property
    def backends(self) -> Sequence[BackendShape]: ...

FORMAT = "tcp-failover-checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)
SIG_PREFIX = "hmac-sha256:"
TOP_KEYS = ("format", "version", "family", "exported_at", "checkpoint_time", "connection", "log", "digest",
            "signature")
TOP_KEYS_V1 = tuple(k for k in TOP_KEYS if k != "family")
FAMILIES = ("ipv4", "ipv6")
RESUMABLE = (TcpState.ESTABLISHED, TcpState.FIN_WAIT, TcpState.CLOSE_WAIT)
MIN_MSS, MAX_MSS = 88, 65495   # Linux's TCP_MIN_MSS; the largest over IPv4 (64 KiB - 40)


class CheckpointError(ValueError):
    """A checkpoint document refused; ``field`` is the dotted path of the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class ImportLimits:
    """What this appliance accepts (tcpcp 7.1: "constraints of the local system")."""

    max_document_bytes: int = 512 << 20   # the raw document
    max_log_bytes: int = 256 << 20        # client bytes in its log
    max_window: int = 1 << 30             # any announced window, in bytes (RFC 7323's largest)


@dataclass(frozen=True, slots=True)
class Imported:
    """A checkpoint that passed every check.  ``rec.log`` and ``rec.digest`` are
    ``log`` and ``digest`` (the record is ready to use as it is)."""

    rec: ConnectionRecord
    log: ByteLog
    digest: StreamDigest | SampledDigest | None
    checkpoint_time: float


# ----- export ----------------------------------------------------------------------------

def canonical(doc: dict[str, Any]) -> bytes:
    """The bytes the signature covers: ``doc`` without its ``signature``, canonically."""
    body = {k: v for k, v in doc.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def sign(doc: dict[str, Any], key: bytes) -> str:
    """The ``signature`` value of ``doc`` under ``key``."""
    if not key:
        raise CheckpointError("signature", "no checkpoint key is configured")
    return SIG_PREFIX + hmac.new(key, canonical(doc), hashlib.sha256).hexdigest()


def export_document(rec: ConnectionRecord, key: bytes, now_wall: float,
                    checkpoint_time: float | None = None) -> dict[str, Any]:
    """The signed document of ``rec`` (its contiguous client log, its digest)."""
    if rec.log is None:
        raise CheckpointError("log", "the connection has no client log to export")
    log: ByteLog = rec.log
    doc: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "family": family(rec.client_ip),
        "exported_at": now_wall,
        "checkpoint_time": now_wall if checkpoint_time is None else checkpoint_time,
        "connection": record_state(rec),
        "log": {**log_state(log), "data_b64": base64.b64encode(bytes(log.data)).decode("ascii")},
        "digest": None if rec.digest is None else digest_state(rec.digest),
    }
    doc["signature"] = sign(doc, key)
    return doc


# ----- import ----------------------------------------------------------------------------

def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _parse(raw: bytes | str | dict[str, Any], limits: ImportLimits) -> dict[str, Any]:
    if isinstance(raw, dict):
        doc = raw
    else:
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogatepass")
        if not isinstance(raw, (bytes, bytearray, memoryview)):
            raise CheckpointError("document", f"expected JSON text, got {type(raw).__name__}")
        if len(raw) > limits.max_document_bytes:
            raise CheckpointError("document", f"{len(raw)} bytes, over the limit of {limits.max_document_bytes}")
        try:
            doc = json.loads(bytes(raw).decode("utf-8"), parse_constant=_reject_constant)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise CheckpointError("document", f"not valid JSON ({str(e)[:100]})") from None
    if not isinstance(doc, dict):
        raise CheckpointError("document", "expected a JSON object")
    return doc


def _verify(doc: dict[str, Any], key: bytes) -> None:
    sig = doc.get("signature")
    if type(sig) is not str or not sig.startswith(SIG_PREFIX):
        raise CheckpointError("signature", f'expected "{SIG_PREFIX}<hex>"')
    if not key:
        raise CheckpointError("signature", "no checkpoint key is configured: nothing can be verified")
    try:
        body = canonical(doc)
    except (TypeError, ValueError, RecursionError):  # a dict from a caller holding non-JSON values
        raise CheckpointError("document", "not plain JSON data") from None
    want = hmac.new(key, body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(sig[len(SIG_PREFIX):].encode("ascii", "replace"), want.encode("ascii")):
        raise CheckpointError("signature", "does not match the document (wrong key, or altered)")


def _time(doc: dict[str, Any], name: str) -> float:
    v = doc[name]
    if type(v) not in (int, float) or not math.isfinite(v) or v < 0:
        raise CheckpointError(name, "expected a wall-clock time in seconds")
    return float(v)


def _log(d: Any, limits: ImportLimits) -> ByteLog:
    if type(d) is not dict:
        raise CheckpointError("log", "expected an object")
    b64 = d.get("data_b64")
    if type(b64) is not str:
        raise CheckpointError("log.data_b64", "expected base64 text")
    if len(b64) // 4 * 3 > limits.max_log_bytes + 2:
        raise CheckpointError("log.data_b64", f"more than the limit of {limits.max_log_bytes} log bytes")
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise CheckpointError("log.data_b64", "not valid base64") from None
    if len(data) > limits.max_log_bytes:
        raise CheckpointError("log.data_b64", f"{len(data)} bytes, over the limit of {limits.max_log_bytes}")
    return log_from_state({k: v for k, v in d.items() if k != "data_b64"}, data, "log")


def import_document(raw: bytes | str | dict[str, Any], key: bytes, services: Sequence[ServiceShape],
                    limits: ImportLimits = ImportLimits()) -> Imported:
    """Parse, authenticate and check a checkpoint document (see the module docstring).
    Raises :class:`CheckpointError` naming the field; returns a complete import."""
    doc = _parse(raw, limits)
    if doc.get("format") != FORMAT:
        raise CheckpointError("format", f'expected "{FORMAT}"')
    version = doc.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise CheckpointError("version", f"version {version!r} is not supported "
                                         f"(expected one of {', '.join(map(str, READABLE_VERSIONS))})")
    _verify(doc, key)
    # authentic: now every other field may be read
    keys = TOP_KEYS if version >= 2 else TOP_KEYS_V1
    for k in doc:
        if k not in keys:
            raise CheckpointError(k, "unknown key" if k != "family" else f"not a version-{version} key")
    for k in keys:
        if k not in doc:
            raise CheckpointError(k, "missing")
    fam = doc.get("family", "ipv4")  # version 1: IPv4 only
    if fam not in FAMILIES:
        raise CheckpointError("family", f"{fam!r} is not one of {', '.join(FAMILIES)}")
    exported_at = _time(doc, "exported_at")
    checkpoint_time = _time(doc, "checkpoint_time")
    if checkpoint_time > exported_at:
        raise CheckpointError("checkpoint_time", "after the document was exported")
    try:
        rec = record_from_state(doc["connection"], "connection")
        log = _log(doc["log"], limits)
        digest = None if doc["digest"] is None else digest_from_state(doc["digest"], "digest")
    except StateError as e:
        raise CheckpointError(e.field, e.message) from None
    _sanity(rec, log, digest, services, limits)
    for f, a in (("connection.client_ip", rec.client_ip), ("connection.vip", rec.vip),
                 ("connection.backend_ip", rec.backend_ip)):
        if family(a) != fam:
            raise CheckpointError(f, f"{a} is not an {'IPv6' if fam == 'ipv6' else 'IPv4'} address (the document's "
                                     f"family is {fam}" + (", as every version-1 document's" if version == 1 else "")
                                  + ")")
    rec.log = log
    rec.digest = digest
    return Imported(rec, log, digest, checkpoint_time)


# ----- tcpcp section 7's sanity checks ---------------------------------------------------

def _fail(field: str, message: str) -> NoReturn:
    raise CheckpointError(field, message)


def _half_sane(h: HalfConnection, p: str, peer_wscale: int | None,
               limits: ImportLimits) -> tuple[int, int]:
    """One end's own numbers: handshake seen, MSS and windows in range, sequence
    numbers in order (data_base <= data_high <= next_seq, FIN inside).  Returns the
    end's (data_base, next_seq), both known once it passed."""
    if h.isn is None:
        _fail(f"{p}.isn", "unknown (no SYN seen): the connection cannot be resumed")
    data_base = seq_add(h.isn, 1)
    if h.data_base != data_base:
        _fail(f"{p}.data_base", f"expected isn + 1 = {data_base}")
    if h.mss is None or not MIN_MSS <= h.mss <= MAX_MSS:
        _fail(f"{p}.mss", f"expected {MIN_MSS}..{MAX_MSS}")
    shift = h.wscale if (h.wscale is not None and peer_wscale is not None) else 0
    for name in ("window", "max_window"):
        w = getattr(h, name)
        if w > 65535 << shift:
            _fail(f"{p}.{name}", f"{w} is more than a window field can say (65535 << {shift})")
        if w > limits.max_window:
            _fail(f"{p}.{name}", f"{w} is over the buffer limit of {limits.max_window} bytes")
    if h.window not in (h.window_raw, h.window_raw << shift):
        _fail(f"{p}.window", f"{h.window} is not the window field {h.window_raw} (scaled by {shift})")
    if h.window > h.max_window:
        _fail(f"{p}.max_window", f"{h.max_window} is less than the current window {h.window}")
    if h.next_seq is None:
        _fail(f"{p}.next_seq", "unknown")
    sent = seq_diff(h.next_seq, data_base)
    if sent < 0:
        _fail(f"{p}.next_seq", "behind the first byte of the stream")
    if h.data_high is not None and not 0 <= seq_diff(h.data_high, data_base) <= sent:
        _fail(f"{p}.data_high", "outside the stream sent (data_base .. next_seq)")
    if h.ts_offered and h.tsval is None:
        _fail(f"{p}.tsval", "unknown, though its SYN offered timestamps")
    if h.fin_seq is not None and not 0 <= seq_diff(h.fin_seq, data_base) < sent:
        _fail(f"{p}.fin_seq", "outside the stream sent (data_base .. next_seq)")
    return data_base, h.next_seq


def _acked(h: HalfConnection, name: str, peer_base: int, peer_sent: int) -> int:
    """How many of the peer's stream bytes (plus 1 for its FIN) this end acknowledged."""
    if h.ack is None:
        _fail(f"connection.{name}.ack", "unknown: nothing acknowledged")
    acked = seq_diff(h.ack, peer_base)
    if acked < 0:
        _fail(f"connection.{name}.ack", "below the peer's first byte")
    if acked > peer_sent:
        _fail(f"connection.{name}.ack", f"acknowledges {acked} bytes, the peer sent {peer_sent}")
    return acked


def _sanity(rec: ConnectionRecord, log: ByteLog, digest: StreamDigest | SampledDigest | None,
            services: Sequence[ServiceShape], limits: ImportLimits) -> None:
    if rec.state not in RESUMABLE:
        _fail("connection.state", f"{rec.state.value} cannot be resumed "
              f"(expected {', '.join(s.value for s in RESUMABLE)})")
    if rec.mid_stream:
        _fail("connection.mid_stream", "picked up mid-stream: there is no log from the SYN")
    if rec.rst_seen:
        _fail("connection.rst_seen", "the connection was reset")
    # addresses: a configured service, and one of its backends
    try:
        canon = str(ipaddress.ip_address(rec.client_ip))
    except ValueError:
        _fail("connection.client_ip", f"{rec.client_ip!r} is not an IP address")
    if canon != rec.client_ip:  # the table's keys are the canonical strings
        _fail("connection.client_ip", f"{rec.client_ip!r} is not in canonical form ({canon!r})")
    svc = next((s for s in services if rec.vip in s.vips and s.port == rec.vport), None)
    if svc is None:
        _fail("connection.vip", f"{with_port(rec.vip, rec.vport)} is not a configured service")
    if rec.service != svc.name:
        _fail("connection.service", f"{with_port(rec.vip, rec.vport)} is service {svc.name!r}, not {rec.service!r}")
    be = next((b for b in svc.backends if b.name == rec.backend), None)
    if be is None:
        _fail("connection.backend", f"{rec.backend!r} is not a backend of service {svc.name!r}")
    if rec.backend_ip not in be.addresses:
        _fail("connection.backend_ip", f"backend {be.name!r} is {' and '.join(be.addresses)}, not {rec.backend_ip}")
    if family(rec.backend_ip) != family(rec.client_ip) or family(rec.vip) != family(rec.client_ip):
        _fail("connection.backend_ip", "the client, the vip and the backend must be of one family (no NAT46/64)")
    if be.port != rec.backend_port:
        _fail("connection.backend_port", f"backend {be.name!r} listens on {be.port}, not {rec.backend_port}")
    # each end on its own, then the two against each other and against the log
    c, s = rec.client, rec.server
    c_base, c_next = _half_sane(c, "connection.client", s.wscale, limits)
    s_base, s_next = _half_sane(s, "connection.server", c.wscale, limits)
    c_sent = seq_diff(c_next, c_base)   # client stream bytes, plus 1 for its FIN
    s_sent = seq_diff(s_next, s_base)
    s_acked = _acked(s, "server", c_base, c_sent)
    _acked(c, "client", s_base, s_sent)
    if log.overflow is not None:
        _fail("log.overflow", f"the log is incomplete ({log.overflow})")
    if log.end - log.base > limits.max_log_bytes:
        _fail("log.end", f"{log.end - log.base} bytes, over the limit of {limits.max_log_bytes}")
    if log.end > c.bytes:
        _fail("log.end", f"the log holds {log.end} bytes, the client sent {c.bytes}")
    if c.fin_seq is None and log.fin_offset is not None:
        _fail("log.fin_offset", "the log has a FIN, the client's FIN was never seen")
    if c.fin_seq is not None and log.fin_offset != seq_diff(c.fin_seq, c_base):
        _fail("log.fin_offset", f"the client's FIN is at {seq_diff(c.fin_seq, c_base)}, "
              f"the log says {log.fin_offset}")
    # the FIN counts once every byte before it is logged
    have = log.end + (1 if log.fin_offset == log.end else 0)
    if s_acked > have:  # I1: what the server acknowledged must be in the log
        _fail("log", f"server acknowledged {s_acked} bytes, log holds {have}")
    if rec.commit_offset < 0:
        _fail("connection.commit_offset", "the record was never committed: not a checkpoint")
    if rec.commit_offset > log.end:
        _fail("connection.commit_offset", f"{rec.commit_offset} is past the {log.end} bytes logged")
    if rec.commit_fin and (log.fin_offset is None or rec.commit_offset != log.fin_offset):
        _fail("connection.commit_fin", "the client's FIN is committed but the log does not end with it")
    if digest is not None:
        if digest.overflow is not None:
            _fail("digest.overflow", f"the digest is incomplete ({digest.overflow})")
        if digest.end > s.bytes:
            _fail("digest.end", f"covers {digest.end} bytes, the server sent {s.bytes}")
