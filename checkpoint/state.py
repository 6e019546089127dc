"""Plain-JSON state of the ICI, the client byte log and the server-stream digest.

Theory of operation
-------------------
The checkpoint store (on disk) and the portable checkpoint documents both need
the connection record as plain data: a ``dict`` of ``str``/``int``/``float``/
``bool``/``None``/``list`` values that ``json`` writes and reads back exactly,
on any architecture.  This module is that one translation, in both directions,
and nothing else (no I/O, no signing, no policy about which records may be
resumed — see ``checkpoint.document`` for that).

* :func:`record_state` / :func:`record_from_state` — every dataclass field of
  :class:`~checkpoint.ici.ConnectionRecord` and of both
  :class:`~checkpoint.ici.HalfConnection` halves, found with
  ``dataclasses.fields`` so that a field added later is carried too, *except*
  ``log`` and ``digest`` (kept separately: the bytes are large and the store
  writes them incrementally).  Tuples become lists, :class:`TcpState` its value.
* :func:`log_state` / :func:`log_from_state` — a :class:`ByteLog`'s metadata;
  the bytes travel beside it.  Only the contiguous prefix exists in a state:
  segments held aside beyond a gap are not saved (the client retransmits them).
* :func:`digest_state` / :func:`digest_from_state` — a :class:`StreamDigest`
  (full-chunk hashes; the partial chunk's running hash cannot be saved, so a
  restored digest is blind up to the next chunk boundary, see
  ``checkpoint.streamlog``) or a :class:`SampledDigest` (its samples).
* :func:`move_state` / :func:`move_from_state` — a :class:`MoveState`: the move of a connection
  moved by replay (under way, or completed: the splice's constants, ``checkpoint.splice``),
  versioned (``"version": 1``); optional where it is kept: absent means never moved by replay.

Reading is strict: a missing key, an unknown key, a value of the wrong type or
out of range raises :class:`StateError` whose ``field`` is the dotted path of
the culprit (``server.wscale``) and whose ``str()`` starts with it.  The ranges
checked here are those of the wire (a port fits 16 bits, a sequence number 32,
a window scale is at most 14); whether a record may be *resumed* is a
question for the caller.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from .ici import ConnectionRecord, HalfConnection, TcpState
from .streamlog import (
    CHUNK, DIGEST_SIZE, SAMPLE_CONTEXT, STREAM_LIMIT, VOLATILE, ByteLog, SampledDigest, StreamDigest,
)

Json = dict[str, Any]

EXCLUDED = frozenset({"log", "digest"})  # ConnectionRecord fields serialised separately
U32 = (1 << 32) - 1
U16 = (1 << 16) - 1
MAX_INT = (1 << 63) - 1   # the largest count a state may hold (a signed 64-bit integer)
SEQ_FIELDS = frozenset({"isn", "data_base", "next_seq", "data_high", "ack", "tsval", "ts_recent", "fin_seq"})
# (lowest, highest) for integer fields by name; other integers are counts in 0..MAX_INT
INT_RANGES: dict[str, tuple[int, int]] = {
    **{name: (0, U32) for name in SEQ_FIELDS},
    "wscale": (0, 14),
    "mss": (0, U16),
    "window_raw": (0, U16),
    "window": (0, U16 << 14),
    "max_window": (0, U16 << 14),
    "client_port": (0, U16),
    "vport": (0, U16),
    "backend_port": (0, U16),
    "commit_offset": (-1, MAX_INT),  # -1: the record itself is not durable yet (checkpoint.store)
}


class StateError(ValueError):
    """A state that cannot be read back; ``field`` is the dotted path of the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# ----- scalar readers --------------------------------------------------------------------

def _int(path: str, v: Any, name: str) -> int:
    lo, hi = INT_RANGES.get(name, (0, MAX_INT))
    if type(v) is not int or not lo <= v <= hi:
        raise StateError(path, f"expected an integer {lo}..{hi}")
    return v


def _opt_int(path: str, v: Any, name: str) -> int | None:
    if v is None:
        return None
    lo, hi = INT_RANGES.get(name, (0, MAX_INT))
    if type(v) is not int or not lo <= v <= hi:
        raise StateError(path, f"expected an integer {lo}..{hi} or null")
    return v


def _float(path: str, v: Any, name: str = "") -> float:
    # an integer a float cannot hold exactly (past 2**53) would not be read back as written
    if type(v) not in (int, float) or not math.isfinite(v) or (type(v) is int and float(v) != v):
        raise StateError(path, "expected a finite number")
    return float(v)


def _opt_float(path: str, v: Any, name: str) -> float | None:
    if v is None:
        return None
    if type(v) not in (int, float) or not math.isfinite(v) or (type(v) is int and float(v) != v):
        raise StateError(path, "expected a finite number or null")
    return float(v)


def _str(path: str, v: Any, name: str) -> str:
    if type(v) is not str:
        raise StateError(path, "expected a string")
    return v


def _opt_str(path: str, v: Any, name: str) -> str | None:
    if v is not None and type(v) is not str:
        raise StateError(path, "expected a string or null")
    return v


def _bool(path: str, v: Any, name: str) -> bool:
    if type(v) is not bool:
        raise StateError(path, "expected true or false")
    return v


def _tcp_state(path: str, v: Any, name: str) -> TcpState:
    try:
        return TcpState(v)
    except (ValueError, TypeError):
        raise StateError(path, f"expected one of {', '.join(s.value for s in TcpState)}") from None


def _ts_sample(path: str, v: Any, name: str) -> tuple[float, int] | None:
    if v is None:
        return None
    if type(v) is not list or len(v) != 2:
        raise StateError(path, "expected [time, tsval] or null")
    return (_float(f"{path}[0]", v[0]), _int(f"{path}[1]", v[1], "tsval"))


def _half(path: str, v: Any, name: str) -> HalfConnection:
    return HalfConnection(**_fields_from(HalfConnection, v, path))


# annotation (as written in checkpoint/ici.py) -> (reader, writer)
_Reader = Callable[[str, Any, str], Any]
_TYPES: dict[str, tuple[_Reader, Callable[[Any], Any]]] = {
    "int": (_int, lambda v: v),
    "int | None": (_opt_int, lambda v: v),
    "float": (_float, lambda v: v),
    "float | None": (_opt_float, lambda v: v),
    "str": (_str, lambda v: v),
    "str | None": (_opt_str, lambda v: v),
    "bool": (_bool, lambda v: v),
    "TcpState": (_tcp_state, lambda v: v.value),
    "tuple[float, int] | None": (_ts_sample, lambda v: None if v is None else [v[0], v[1]]),
    "HalfConnection": (_half, lambda v: _fields_to(v)),
}


def _kind(f: dataclasses.Field[Any]) -> tuple[_Reader, Callable[[Any], Any]]:
    ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", repr(f.type))
    try:
        return _TYPES[ann]
    except KeyError:  # a field added to the ICI with a type this module cannot carry yet
        raise TypeError(f"checkpoint.state cannot serialise field {f.name!r} of type {ann!r}") from None


def _fields_of(cls: type) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if f.name not in EXCLUDED]


def _fields_to(obj: Any) -> Json:
    return {f.name: _kind(f)[1](getattr(obj, f.name)) for f in _fields_of(type(obj))}


def _check_keys(path: str, d: Any, expected: list[str], optional: list[str] | tuple[str, ...] = ()) -> None:
    prefix = f"{path}." if path else ""
    if type(d) is not dict:
        raise StateError(path or "state", "expected an object")
    for k in d:
        if k not in expected and k not in optional:
            raise StateError(f"{prefix}{k}", "unknown key")
    for k in expected:
        if k not in d:
            raise StateError(f"{prefix}{k}", "missing")


def _fields_from(cls: type, d: Any, path: str) -> dict[str, Any]:
    fields = _fields_of(cls)
    _check_keys(path, d, [f.name for f in fields])
    prefix = f"{path}." if path else ""
    return {f.name: _kind(f)[0](f"{prefix}{f.name}", d[f.name], f.name) for f in fields}


# ----- the record ------------------------------------------------------------------------

def record_state(rec: ConnectionRecord) -> Json:
    """The record (without its log and digest) as plain JSON data."""
    return _fields_to(rec)


def record_from_state(d: Any, path: str = "") -> ConnectionRecord:
    """The record a :func:`record_state` dict describes (``log`` and ``digest`` None).
    ``path`` prefixes the field names in errors (``connection`` in a document)."""
    return ConnectionRecord(**_fields_from(ConnectionRecord, d, path))


# ----- the client byte log ---------------------------------------------------------------

LOG_KEYS = ["limit", "end", "fin_offset", "overflow"]
# base: a log trimmed at an HTTP exchange boundary (absent: 0, as older states); fin_server_offset:
# what the server had sent when the client's FIN was logged (absent: unknown, as older states)
LOG_OPTIONAL = ["base", "fin_server_offset"]


def log_state(log: ByteLog) -> Json:
    """A log's metadata (its bytes, ``log.data``, travel separately)."""
    d: Json = {"limit": log.limit, "end": log.end, "fin_offset": log.fin_offset, "overflow": log.overflow}
    if log.base:
        d["base"] = log.base
    if log.fin_server_offset is not None:
        d["fin_server_offset"] = log.fin_server_offset
    return d


def log_from_state(d: Any, data: bytes, path: str = "") -> ByteLog:
    """The log :func:`log_state` described, holding ``data`` (its contiguous prefix)."""
    _check_keys(path, d, LOG_KEYS, LOG_OPTIONAL)
    p = f"{path}." if path else ""
    limit = _int(f"{p}limit", d["limit"], "limit")
    end = _int(f"{p}end", d["end"], "end")
    base = _int(f"{p}base", d.get("base", 0), "base")
    fin = _opt_int(f"{p}fin_offset", d["fin_offset"], "fin_offset")
    overflow = _opt_str(f"{p}overflow", d["overflow"], "overflow")
    fin_server = _opt_int(f"{p}fin_server_offset", d.get("fin_server_offset"), "fin_server_offset")
    if fin_server is not None and (fin is None or fin_server < 0):
        raise StateError(f"{p}fin_server_offset", f"{fin_server}, with the client's FIN at {fin}")
    if end - base > limit:
        raise StateError(f"{p}end", f"{end - base} bytes logged, over the log's limit of {limit}")
    if base > end:
        raise StateError(f"{p}base", f"the log starts at {base}, after its end {end}")
    if len(data) != end - base:
        raise StateError(f"{p}end", f"says {end - base} bytes from {base}, the data holds {len(data)}")
    if fin is not None and fin < end:
        raise StateError(f"{p}fin_offset", f"FIN at {fin}, before the {end} bytes logged")
    log = ByteLog(limit, base=base)
    log.data = bytearray(data)
    log.fin_offset = fin
    log.fin_server_offset = fin_server
    log.overflow = overflow
    return log


# ----- the server-stream digest ----------------------------------------------------------

STREAM_KEYS = ["kind", "chunks", "end", "volatile", "overflow", "partial"]
# a digest trimmed or cut at HTTP message boundaries (absent: from 0, every CHUNK, as older states)
STREAM_OPTIONAL = ["base", "bounds", "grid", "cuts", "dropped"]
SAMPLED_KEYS = ["kind", "samples", "end", "stride", "volatile", "overflow"]


def _hex_digest(path: str, v: Any) -> bytes:
    if type(v) is str and len(v) == 2 * DIGEST_SIZE:
        try:
            return bytes.fromhex(v)
        except ValueError:
            pass
    raise StateError(path, f"expected {2 * DIGEST_SIZE} hex digits")


def _volatile(path: str, v: Any) -> tuple[str, ...]:
    if type(v) is not list:
        raise StateError(path, "expected a list of field names")
    for i, name in enumerate(v):
        if type(name) is not str or name not in VOLATILE:
            raise StateError(f"{path}[{i}]", f"expected one of {', '.join(VOLATILE)}")
    return tuple(v)


def digest_state(dg: StreamDigest | SampledDigest) -> Json:
    """A digest as plain JSON data (segments held aside beyond a gap are not saved)."""
    if isinstance(dg, SampledDigest):
        return {
            "kind": "sampled",
            "samples": [[off, ln, h.hex()] for off, ln, h in dg.samples],
            "end": dg.end,
            "stride": dg.stride,
            "volatile": list(dg.volatile),
            "overflow": dg.overflow,
        }
    if isinstance(dg, StreamDigest):
        out: Json = {
            "kind": "stream",
            "chunks": [None if c is None else c.hex() for c in dg.chunks],
            "end": dg.end,
            "volatile": list(dg.volatile),
            "overflow": dg.overflow,
            "partial": None if dg.cur is None else dg.cur.copy().hexdigest(),
        }
        if dg.base or dg.cuts or dg.grid:
            out.update(base=dg.base, bounds=list(dg.bounds), grid=dg.grid, cuts=list(dg.cuts), dropped=dg.dropped)
        return out
    raise TypeError(f"not a digest: {type(dg).__name__}")


def _offsets(path: str, v: Any, base: int, end: int, strict: bool = True) -> list[int]:
    """A list of increasing stream offsets in (base, end] (``strict``) or [base, end]."""
    if type(v) is not list:
        raise StateError(path, "expected a list of offsets")
    out: list[int] = []
    for i, x in enumerate(v):
        lo = base + 1 if strict else base
        if type(x) is not int or not lo <= x <= end or (out and x <= out[-1]):
            raise StateError(f"{path}[{i}]", f"expected an increasing offset in {lo}..{end}")
        out.append(x)
    return out


def digest_from_state(d: Any, path: str = "") -> StreamDigest | SampledDigest:
    """The digest :func:`digest_state` described.  A stream digest comes back
    *restored*: its partial chunk (``partial`` is informative only) is blind and
    its first segment may jump a gap (``StreamDigest.restored``)."""
    p = f"{path}." if path else ""
    if type(d) is not dict:
        raise StateError(path or "digest", "expected an object")
    kind = d.get("kind")
    if kind == "stream":
        _check_keys(path, d, STREAM_KEYS, STREAM_OPTIONAL)
        end = _int(f"{p}end", d["end"], "end")
        if end > STREAM_LIMIT:
            raise StateError(f"{p}end", f"expected at most {STREAM_LIMIT}")
        base = _int(f"{p}base", d.get("base", 0), "base")
        bounds = _offsets(f"{p}bounds", d["bounds"], base, end) if "bounds" in d else None
        cuts = _offsets(f"{p}cuts", d.get("cuts", []), base, end, strict=False)
        chunks = d["chunks"]
        want = len(bounds) if bounds is not None else end // CHUNK
        if type(chunks) is not list or len(chunks) != want:
            raise StateError(f"{p}chunks", f"expected a list of {want} chunk hashes (hex or null)")
        if bounds is not None and any(b - a > CHUNK for a, b in zip([base] + bounds, bounds)):
            raise StateError(f"{p}bounds", f"a chunk longer than {CHUNK} bytes")
        hashes = [None if c is None else _hex_digest(f"{p}chunks[{i}]", c) for i, c in enumerate(chunks)]
        if d["partial"] is not None:
            _hex_digest(f"{p}partial", d["partial"])
        grid = _int(f"{p}grid", d["grid"], "grid") if "grid" in d else None
        if grid is not None and grid > end:
            raise StateError(f"{p}grid", f"expected at most {end}")
        dropped = _int(f"{p}dropped", d.get("dropped", 0), "dropped")
        volatile = _volatile(f"{p}volatile", d["volatile"])
        try:
            dg = StreamDigest.restored(hashes, end, volatile, base=base,
                                       bounds=bounds, grid=grid, cuts=cuts, dropped=dropped)
        except ValueError as exc:
            raise StateError(f"{p}chunks", str(exc)) from None
        dg.overflow = _opt_str(f"{p}overflow", d["overflow"], "overflow")
        return dg
    if kind == "sampled":
        _check_keys(path, d, SAMPLED_KEYS)
        end = _int(f"{p}end", d["end"], "end")
        if end > STREAM_LIMIT:
            raise StateError(f"{p}end", f"expected at most {STREAM_LIMIT}")
        stride = _int(f"{p}stride", d["stride"], "stride")
        if stride < 1:
            raise StateError(f"{p}stride", "expected a positive integer")
        if type(d["samples"]) is not list:
            raise StateError(f"{p}samples", "expected a list of [offset, length, hex]")
        samples: list[tuple[int, int, bytes]] = []
        for i, s in enumerate(d["samples"]):
            sp = f"{p}samples[{i}]"
            if type(s) is not list or len(s) != 3:
                raise StateError(sp, "expected [offset, length, hex]")
            off = _int(f"{sp}[0]", s[0], "offset")
            ln = _int(f"{sp}[1]", s[1], "length")
            if ln <= SAMPLE_CONTEXT or off + ln > end:
                raise StateError(f"{sp}[1]", f"expected {SAMPLE_CONTEXT + 1}..{end - off} (within the stream)")
            if samples and off <= samples[-1][0]:
                raise StateError(f"{sp}[0]", "samples must be in increasing offset order")
            samples.append((off, ln, _hex_digest(f"{sp}[2]", s[2])))
        sd = SampledDigest(_volatile(f"{p}volatile", d["volatile"]))
        sd.samples = samples
        sd.end = end
        sd.stride = stride
        sd.overflow = _opt_str(f"{p}overflow", d["overflow"], "overflow")
        return sd
    raise StateError(f"{p}kind", 'expected "stream" or "sampled"')


# ----- the move of a connection moved by replay ----------------------------------------------

MOVE_VERSION = 1
MOVE_PHASES = ("moving", "spliced")
ENDPOINT_KEYS = ["name", "ip", "port"]
MOVE_KEYS = ["version", "phase", "from", "to"]
# phase "spliced" only: what a splice in its steady state cannot re-learn from the wire
SPLICED_KEYS = ["seq_delta", "ts_delta", "backend_wscale", "client_view_wscale", "backend_isn", "backend_mss",
                "backend_ts_first", "backend_fin_end", "client_start", "server_start", "verified_to", "strategy"]


@dataclasses.dataclass(frozen=True, slots=True)
class MoveState:
    """The move of a connection moved by replay, as the checkpoint keeps it (absent: never moved
    by replay).  ``phase`` "moving": a move was under way (caught by a restart it cannot be
    carried on, see ``checkpoint.splice``); "spliced": the move completed and the splice is in
    its steady state, and these are its constants — the translation (``checkpoint.translate``),
    the backup's ISN, MSS and first TSval (and where its FIN was, once it sent one), where the backup's streams start and how much of the
    server stream was verified.  ``old``/``target``: (name, address, port) of the backends."""

    phase: str
    old: tuple[str, str, int]
    target: tuple[str, str, int]
    seq_delta: int = 0
    ts_delta: int = 0
    backend_wscale: int = 0
    client_view_wscale: int = 0
    backend_isn: int = 0
    backend_mss: int = 0
    backend_ts_first: int | None = None
    backend_fin_end: int | None = None   # the server stream offset after the backup's FIN, once it sent it
    client_start: int = 0
    server_start: int = 0
    verified_to: int = 0
    strategy: str = "stream"


def move_state(m: MoveState) -> Json:
    """A :class:`MoveState` as plain JSON data (version :data:`MOVE_VERSION`)."""
    d: Json = {"version": MOVE_VERSION, "phase": m.phase,
               "from": dict(zip(ENDPOINT_KEYS, m.old)), "to": dict(zip(ENDPOINT_KEYS, m.target))}
    if m.phase == "spliced":
        d.update({k: getattr(m, k) for k in SPLICED_KEYS})
    return d


def _endpoint(path: str, v: Any) -> tuple[str, str, int]:
    _check_keys(path, v, ENDPOINT_KEYS)
    return (_str(f"{path}.name", v["name"], "name"), _str(f"{path}.ip", v["ip"], "ip"),
            _int(f"{path}.port", v["port"], "backend_port"))


def move_from_state(d: Any, path: str = "move") -> MoveState:
    """The :class:`MoveState` :func:`move_state` wrote (strict, as the rest of this module)."""
    p = f"{path}." if path else ""
    if type(d) is not dict:
        raise StateError(path or "move", "expected an object")
    if d.get("version") != MOVE_VERSION:
        raise StateError(f"{p}version", f"expected {MOVE_VERSION} (this appliance reads move states of version "
                                         f"{MOVE_VERSION})")
    phase = d.get("phase")
    if phase not in MOVE_PHASES:
        raise StateError(f"{p}phase", f"expected one of {', '.join(MOVE_PHASES)}")
    _check_keys(path, d, MOVE_KEYS + (SPLICED_KEYS if phase == "spliced" else []))
    old, target = _endpoint(f"{p}from", d["from"]), _endpoint(f"{p}to", d["to"])
    if phase == "moving":
        return MoveState("moving", old, target)
    u32 = {k: _int(f"{p}{k}", d[k], "isn") for k in ("seq_delta", "ts_delta", "backend_isn")}
    wscales = {k: _int(f"{p}{k}", d[k], "wscale") for k in ("backend_wscale", "client_view_wscale")}
    mss = _int(f"{p}backend_mss", d["backend_mss"], "mss")
    if mss < 1:
        raise StateError(f"{p}backend_mss", "expected an integer 1..65535")
    offsets = {k: _int(f"{p}{k}", d[k], k) for k in ("client_start", "server_start", "verified_to")}
    if offsets["verified_to"] < offsets["server_start"]:
        raise StateError(f"{p}verified_to", f"{offsets['verified_to']}, before the backup's stream starts "
                                            f"({offsets['server_start']})")
    return MoveState("spliced", old, target, **u32, **wscales, backend_mss=mss,
                     backend_ts_first=_opt_int(f"{p}backend_ts_first", d["backend_ts_first"], "tsval"),
                     backend_fin_end=_opt_int(f"{p}backend_fin_end", d["backend_fin_end"], "backend_fin_end"),
                     **offsets, strategy=_str(f"{p}strategy", d["strategy"], "strategy"))
