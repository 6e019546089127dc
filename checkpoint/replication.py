"""Checkpoint replication between the two gateways of a pair, sans-I/O (issue 13).

Theory of operation
-------------------
The *active* gateway owns the connections; every commit batch of its checkpoint store (client log
bytes, ICI records, digest chunks, trims, translation state of moved connections, forgotten
connections) is turned into *ops* (:func:`ops_from_batch`) and handed to its :class:`Replicator`,
which numbers it (``seq``) and queues the frames to send.  The *standby* gateway's :class:`Replica`
applies the frames in ``seq`` order to a live table (``conn id -> ReplConn``) and answers with
cumulative ACKs.  The active moves the commit point of a batch (and releases the client ACKs held
for it) only when ``seq <= Replicator.released_through``: normally when the standby acknowledged
it (invariant I1 becomes "held by both gateways").

Every op is *positional* and idempotent (a log append names its offset, a record upsert carries
the whole record, a trim its new base, chunk digests their index): a frame applied twice, or a
batch applied on top of a snapshot taken after it was planned, gives the same table.  That is what
makes resending and snapshotting simple.

*Sessions.*  Each TCP connection is a session; both ends send HELLO first.  The standby's HELLO
says which history its table belongs to (``table_epoch``) and how far it applied (``applied_seq``).
The active resends from ``applied_seq + 1`` if its buffer of unacknowledged frames still covers
that (and the table is of its history), else it asks its caller for a full snapshot
(:attr:`Replicator.wants_snapshot`, :meth:`Replicator.snapshot`): SNAPSHOT_BEGIN, one
SNAPSHOT_CONN per connection (or per piece of a large log), SNAPSHOT_END, all under one ``seq``;
the standby builds the new table aside and swaps it in at END.  Within a session the standby
detects a gap (``seq > applied + 1``, or a PING naming a seq it has not got) and answers RESYNC.

*Degraded.*  A peer that does not acknowledge within ``ack_timeout``, falls more than
``max_lag_bytes`` behind, or is gone, makes the active *degraded* (an event with the reason):
it then commits without waiting (``released_through`` follows ``seq``), keeps buffering up to
``max_lag_bytes`` so that a peer coming back soon gets a resend, and past that drops the buffer and
will snapshot.  The peer is *in sync* again (eligible to take over) only once a snapshot's END
(or the resend) and every batch after it are acknowledged.

*Lease* (why the standby may trust its own ``in_sync``).  The standby must not believe it is in
sync while the active commits alone.  Its ACKs carry its own clock ``t``; while in sync the active
echoes the newest ``t`` it received in every BATCH and PING (``lease = [t, seconds]``); the standby
is in sync until ``t + seconds`` (its own clock: ``t`` was read before the active received it, so
before the frame was sent).  A degraded active sends ``lease = null`` and, before it commits
anything alone, waits until ``(when it received the newest echoed t) + seconds``: by then no lease
it granted is alive.  The lease must outlast the takeover detection (keepalived's master-down
interval, about 0.35 s at ``advert_int 0.1``): default 1 s.  A standby that took over as long as
its lease was alive holds every batch the dead active committed.  Idle, the active sends a PING
every ``heartbeat``; its ``seq`` also reveals batches lost at the tail of a session.

*Fencing.*  Every frame carries the sender's epoch.  A Replica refuses frames of an epoch older
than the highest it knows (and answers EPOCH with it); a Replicator that meets a higher epoch (an
EPOCH frame, a HELLO, an active peer) is *fenced*: it sends nothing more and its caller must stop
forwarding.  :meth:`Replica.take_over` returns a new epoch, higher than any seen, and the table.
A node must use a new epoch for every Replicator it creates (persisted by the caller).

Wire format (version 1)
-----------------------
Every frame, big-endian::

    u32  length of what follows (6 .. MAX_FRAME)
    u8   version (1)
    u8   type: 1 HELLO, 2 BATCH, 3 ACK, 4 SNAPSHOT_BEGIN, 5 SNAPSHOT_CONN, 6 SNAPSHOT_END,
               7 EPOCH, 8 RESYNC, 9 PING
    u32  header length H
    H    header: a UTF-8 JSON object (below)
    ...  body: the bytes of the frame's log ops ("op": "log"), concatenated in op order

Headers (ints are 0 .. 2**63-1, times are finite seconds of the sender's monotonic clock)::

    HELLO          {"node": str, "role": "active"|"standby", "epoch": int, "table_epoch": int,
                    "applied_seq": int, "in_sync": bool}
    BATCH          {"epoch": int, "seq": int, "lease": [t, seconds] | null, "ops": [op, ...]}
    ACK            {"epoch": int, "seq": int, "t": float}         (cumulative: everything <= seq)
    SNAPSHOT_BEGIN {"epoch": int, "seq": int, "count": int, "conns": int}
    SNAPSHOT_CONN  {"epoch": int, "seq": int, "i": int, "conn": int, "ops": [op, ...]}  (i < count)
    SNAPSHOT_END   {"epoch": int, "seq": int}
    EPOCH          {"epoch": int}                                 (the sender knows this epoch)
    RESYNC         {"epoch": int, "applied_seq": int, "snapshot": bool, "reason": str}
    PING           {"epoch": int, "seq": int, "lease": [t, seconds] | null}

Ops (``conn`` is the connection id)::

    {"op": "record", "conn", "state": {...}}       the ICI, checkpoint.state.record_state's dict
    {"op": "log", "conn", "off", "len", "fin",     client log bytes [off, off+len) (in the body);
     "fin_server": int|null}                       fin: the client's FIN follows them; fin_server:
                                                   what the server had sent then (null: unknown)
    {"op": "trim", "conn", "base"}                 the log starts at base now
    {"op": "digest", "conn", "meta": {...}|null,   the server-stream digest: meta (kind, end, ...
     "base": [base, dropped]|null, "first": int,   as the disk store), a trim, chunk hashes (hex,
     "chunks": [hex|null], "bounds": [int|null],   or null) from chunk number first with their end
     "samples": [[off, len, hex]] | null}          offsets (or [] for none), a sampled digest's list
    {"op": "move", "conn", "state": {...}|null}    a moved connection's translation (opaque here)
    {"op": "forget", "conn"}                       closed, expired, reset: drop it

Decoding is strict: anything else raises :class:`ReplicationError` whose ``field`` names the
culprit (``BATCH.ops[2].off``), never another exception.
"""

from __future__ import annotations

import json
import math
import struct
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .streamlog import CHUNK, DIGEST_SIZE, ByteLog, SampledDigest, StreamDigest

if TYPE_CHECKING:
    from .ici import ConnectionRecord
    from .store import Batch as StoreBatch

Json = dict[str, Any]

VERSION = 1
MAX_FRAME = 64 << 20        # the largest frame accepted (length field)
PIECE = 1 << 20             # log bytes per op when a snapshot or a batch is split
BATCH_BODY = 4 << 20        # a batch whose log bytes pass this is sent as several seqs
MAX_INT = (1 << 63) - 1
_HEAD = struct.Struct(">IBBI")

HELLO, BATCH, ACK, SNAPSHOT_BEGIN, SNAPSHOT_CONN, SNAPSHOT_END, EPOCH, RESYNC, PING = range(1, 10)
TYPE_NAMES = {HELLO: "HELLO", BATCH: "BATCH", ACK: "ACK", SNAPSHOT_BEGIN: "SNAPSHOT_BEGIN",
              SNAPSHOT_CONN: "SNAPSHOT_CONN", SNAPSHOT_END: "SNAPSHOT_END", EPOCH: "EPOCH",
              RESYNC: "RESYNC", PING: "PING"}


class ReplicationError(ValueError):
    """A frame that cannot be read, or a protocol rule broken; ``field`` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# ----- ops -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Record:
    conn: int
    state: Json


@dataclass(frozen=True, slots=True)
class Append:
    conn: int
    off: int
    data: bytes
    fin: bool = False
    fin_server: int | None = None       # with fin: the server stream offset sent by then


@dataclass(frozen=True, slots=True)
class Trim:
    conn: int
    base: int


@dataclass(frozen=True, slots=True)
class Digest:
    conn: int
    meta: Json | None = None
    base: tuple[int, int] | None = None          # (stream offset, chunks dropped)
    first: int = 0
    chunks: tuple[bytes | None, ...] = ()
    bounds: tuple[int | None, ...] = ()
    samples: tuple[tuple[int, int, bytes], ...] | None = None


@dataclass(frozen=True, slots=True)
class Move:
    conn: int
    state: Json | None


@dataclass(frozen=True, slots=True)
class Forget:
    conn: int


Op = Record | Append | Trim | Digest | Move | Forget


# ----- frames --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Hello:
    node: str
    role: str                   # "active" | "standby"
    epoch: int                  # the highest epoch the sender knows (owns, if active)
    table_epoch: int            # the history applied_seq belongs to (0: no table)
    applied_seq: int
    in_sync: bool


@dataclass(frozen=True, slots=True)
class Batch:
    epoch: int
    seq: int
    ops: tuple[Op, ...]
    lease: tuple[float, float] | None = None


@dataclass(frozen=True, slots=True)
class Ack:
    epoch: int
    seq: int
    t: float


@dataclass(frozen=True, slots=True)
class SnapshotBegin:
    epoch: int
    seq: int
    count: int                  # SNAPSHOT_CONN frames that follow
    conns: int                  # connections they describe


@dataclass(frozen=True, slots=True)
class SnapshotConn:
    epoch: int
    seq: int
    index: int
    conn: int
    ops: tuple[Op, ...]


@dataclass(frozen=True, slots=True)
class SnapshotEnd:
    epoch: int
    seq: int


@dataclass(frozen=True, slots=True)
class Epoch:
    epoch: int


@dataclass(frozen=True, slots=True)
class Resync:
    epoch: int
    applied_seq: int
    snapshot: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Ping:
    epoch: int
    seq: int
    lease: tuple[float, float] | None = None


Frame = Hello | Batch | Ack | SnapshotBegin | SnapshotConn | SnapshotEnd | Epoch | Resync | Ping


# ----- encoding ------------------------------------------------------------------------------

def _op_json(op: Op, body: list[bytes]) -> Json:
    if isinstance(op, Append):
        body.append(op.data)
        return {"op": "log", "conn": op.conn, "off": op.off, "len": len(op.data), "fin": op.fin,
                "fin_server": op.fin_server}
    if isinstance(op, Record):
        return {"op": "record", "conn": op.conn, "state": op.state}
    if isinstance(op, Trim):
        return {"op": "trim", "conn": op.conn, "base": op.base}
    if isinstance(op, Digest):
        return {"op": "digest", "conn": op.conn, "meta": op.meta,
                "base": None if op.base is None else list(op.base), "first": op.first,
                "chunks": [None if c is None else c.hex() for c in op.chunks], "bounds": list(op.bounds),
                "samples": None if op.samples is None else [[o, n, h.hex()] for o, n, h in op.samples]}
    if isinstance(op, Move):
        return {"op": "move", "conn": op.conn, "state": op.state}
    return {"op": "forget", "conn": op.conn}


def _lease_json(lease: tuple[float, float] | None) -> list[float] | None:
    return None if lease is None else [lease[0], lease[1]]


def encode(frame: Frame) -> bytes:
    """The bytes of one frame, length prefix included."""
    body: list[bytes] = []
    h: Json
    if isinstance(frame, Batch):
        kind = BATCH
        h = {"epoch": frame.epoch, "seq": frame.seq, "lease": _lease_json(frame.lease),
             "ops": [_op_json(op, body) for op in frame.ops]}
    elif isinstance(frame, Ack):
        kind, h = ACK, {"epoch": frame.epoch, "seq": frame.seq, "t": frame.t}
    elif isinstance(frame, Hello):
        kind, h = HELLO, {"node": frame.node, "role": frame.role, "epoch": frame.epoch,
                          "table_epoch": frame.table_epoch, "applied_seq": frame.applied_seq,
                          "in_sync": frame.in_sync}
    elif isinstance(frame, SnapshotBegin):
        kind, h = SNAPSHOT_BEGIN, {"epoch": frame.epoch, "seq": frame.seq, "count": frame.count,
                                   "conns": frame.conns}
    elif isinstance(frame, SnapshotConn):
        kind, h = SNAPSHOT_CONN, {"epoch": frame.epoch, "seq": frame.seq, "i": frame.index, "conn": frame.conn,
                                  "ops": [_op_json(op, body) for op in frame.ops]}
    elif isinstance(frame, SnapshotEnd):
        kind, h = SNAPSHOT_END, {"epoch": frame.epoch, "seq": frame.seq}
    elif isinstance(frame, Epoch):
        kind, h = EPOCH, {"epoch": frame.epoch}
    elif isinstance(frame, Resync):
        kind, h = RESYNC, {"epoch": frame.epoch, "applied_seq": frame.applied_seq, "snapshot": frame.snapshot,
                           "reason": frame.reason}
    else:
        kind, h = PING, {"epoch": frame.epoch, "seq": frame.seq, "lease": _lease_json(frame.lease)}
    header = json.dumps(h, separators=(",", ":"), allow_nan=False).encode()
    size = 6 + len(header) + sum(len(b) for b in body)
    if size > MAX_FRAME:
        raise ReplicationError(TYPE_NAMES[kind], f"frame of {size} bytes, over {MAX_FRAME}")
    return b"".join([_HEAD.pack(size, VERSION, kind, len(header)), header, *body])


# ----- decoding ------------------------------------------------------------------------------

def _get(h: Json, path: str, key: str) -> Any:
    if key not in h:
        raise ReplicationError(f"{path}.{key}", "missing")
    return h[key]


def _int(h: Json, path: str, key: str, lo: int = 0) -> int:
    v = _get(h, path, key)
    if type(v) is not int or not lo <= v <= MAX_INT:
        raise ReplicationError(f"{path}.{key}", f"expected an integer {lo}..{MAX_INT}")
    return v


def _bool(h: Json, path: str, key: str) -> bool:
    v = _get(h, path, key)
    if type(v) is not bool:
        raise ReplicationError(f"{path}.{key}", "expected true or false")
    return v


def _str(h: Json, path: str, key: str) -> str:
    v = _get(h, path, key)
    if type(v) is not str:
        raise ReplicationError(f"{path}.{key}", "expected a string")
    return v


def _num(v: Any, path: str) -> float:
    if type(v) not in (int, float) or not math.isfinite(v) or isinstance(v, bool):
        raise ReplicationError(path, "expected a finite number")
    return float(v)


def _obj(v: Any, path: str, nullable: bool) -> Json | None:
    if v is None and nullable:
        return None
    if type(v) is not dict:
        raise ReplicationError(path, "expected an object" + (" or null" if nullable else ""))
    return v


def _lease(h: Json, path: str) -> tuple[float, float] | None:
    v = _get(h, path, "lease")
    if v is None:
        return None
    if type(v) is not list or len(v) != 2:
        raise ReplicationError(f"{path}.lease", "expected [t, seconds] or null")
    t, s = _num(v[0], f"{path}.lease[0]"), _num(v[1], f"{path}.lease[1]")
    if s < 0:
        raise ReplicationError(f"{path}.lease[1]", "expected a duration >= 0")
    return (t, s)


def _hash(v: Any, path: str) -> bytes | None:
    if v is None:
        return None
    if type(v) is str and len(v) == 2 * DIGEST_SIZE:
        try:
            return bytes.fromhex(v)
        except ValueError:
            pass
    raise ReplicationError(path, f"expected {2 * DIGEST_SIZE} hex digits or null")


def _keys(h: Any, path: str, keys: frozenset[str]) -> Json:
    if type(h) is not dict:
        raise ReplicationError(path, "expected an object")
    for k in h:
        if k not in keys:
            raise ReplicationError(f"{path}.{k}", "unknown key")
    return h


_OP_KEYS = {
    "record": frozenset({"op", "conn", "state"}),
    "log": frozenset({"op", "conn", "off", "len", "fin", "fin_server"}),
    "trim": frozenset({"op", "conn", "base"}),
    "digest": frozenset({"op", "conn", "meta", "base", "first", "chunks", "bounds", "samples"}),
    "move": frozenset({"op", "conn", "state"}),
    "forget": frozenset({"op", "conn"}),
}


def _op(v: Any, path: str, body: memoryview, pos: int) -> tuple[Op, int]:
    if type(v) is not dict:
        raise ReplicationError(path, "expected an object")
    kind = v.get("op")
    if type(kind) is not str or kind not in _OP_KEYS:
        raise ReplicationError(f"{path}.op", f"expected one of {', '.join(_OP_KEYS)}")
    _keys(v, path, _OP_KEYS[kind])
    conn = _int(v, path, "conn")
    if kind == "log":
        off, n, fin = _int(v, path, "off"), _int(v, path, "len"), _bool(v, path, "fin")
        fs = _get(v, path, "fin_server")
        if fs is not None and (type(fs) is not int or not 0 <= fs <= MAX_INT or not fin):
            raise ReplicationError(f"{path}.fin_server", "expected an offset with fin, or null")
        if pos + n > len(body):
            raise ReplicationError(f"{path}.len", f"{n} bytes, the body has {len(body) - pos} left")
        return Append(conn, off, bytes(body[pos:pos + n]), fin, fs), pos + n
    if kind == "record":
        state = _obj(_get(v, path, "state"), f"{path}.state", False)
        assert state is not None
        return Record(conn, state), pos
    if kind == "trim":
        return Trim(conn, _int(v, path, "base")), pos
    if kind == "move":
        return Move(conn, _obj(_get(v, path, "state"), f"{path}.state", True)), pos
    if kind == "forget":
        return Forget(conn), pos
    meta = _obj(_get(v, path, "meta"), f"{path}.meta", True)
    b = _get(v, path, "base")
    base: tuple[int, int] | None = None
    if b is not None:
        if type(b) is not list or len(b) != 2 or any(type(x) is not int or not 0 <= x <= MAX_INT for x in b):
            raise ReplicationError(f"{path}.base", "expected [offset, dropped] or null")
        base = (b[0], b[1])
    first = _int(v, path, "first")
    ch, bd = _get(v, path, "chunks"), _get(v, path, "bounds")
    if type(ch) is not list:
        raise ReplicationError(f"{path}.chunks", "expected a list of hashes")
    if type(bd) is not list or len(bd) not in (0, len(ch)):
        raise ReplicationError(f"{path}.bounds", f"expected a list of {len(ch)} offsets (or nulls), or none")
    chunks = tuple(_hash(c, f"{path}.chunks[{i}]") for i, c in enumerate(ch))
    for i, x in enumerate(bd):
        if x is not None and (type(x) is not int or not 0 <= x <= MAX_INT):
            raise ReplicationError(f"{path}.bounds[{i}]", "expected an offset or null")
    s = _get(v, path, "samples")
    samples: tuple[tuple[int, int, bytes], ...] | None = None
    if s is not None:
        if type(s) is not list:
            raise ReplicationError(f"{path}.samples", "expected a list of [offset, length, hex] or null")
        out: list[tuple[int, int, bytes]] = []
        for i, x in enumerate(s):
            sp = f"{path}.samples[{i}]"
            if type(x) is not list or len(x) != 3 or any(type(y) is not int or not 0 <= y <= MAX_INT for y in x[:2]):
                raise ReplicationError(sp, "expected [offset, length, hex]")
            h = _hash(x[2], f"{sp}[2]")
            if h is None:
                raise ReplicationError(f"{sp}[2]", "expected a hash")
            out.append((x[0], x[1], h))
        samples = tuple(out)
    return Digest(conn, meta, base, first, chunks, tuple(bd), samples), pos


def _ops(h: Json, path: str, body: memoryview) -> tuple[Op, ...]:
    v = _get(h, path, "ops")
    if type(v) is not list:
        raise ReplicationError(f"{path}.ops", "expected a list of ops")
    out: list[Op] = []
    pos = 0
    for i, x in enumerate(v):
        op, pos = _op(x, f"{path}.ops[{i}]", body, pos)
        out.append(op)
    if pos != len(body):
        raise ReplicationError(f"{path}.body", f"{len(body) - pos} bytes not claimed by a log op")
    return tuple(out)


_KEYS = {
    HELLO: frozenset({"node", "role", "epoch", "table_epoch", "applied_seq", "in_sync"}),
    BATCH: frozenset({"epoch", "seq", "lease", "ops"}),
    ACK: frozenset({"epoch", "seq", "t"}),
    SNAPSHOT_BEGIN: frozenset({"epoch", "seq", "count", "conns"}),
    SNAPSHOT_CONN: frozenset({"epoch", "seq", "i", "conn", "ops"}),
    SNAPSHOT_END: frozenset({"epoch", "seq"}),
    EPOCH: frozenset({"epoch"}),
    RESYNC: frozenset({"epoch", "applied_seq", "snapshot", "reason"}),
    PING: frozenset({"epoch", "seq", "lease"}),
}
_WITH_BODY = frozenset({BATCH, SNAPSHOT_CONN})


def decode_payload(kind: int, header: bytes, body: memoryview | bytes) -> Frame:
    """One frame from its type, header and body (the parts after the fixed prefix)."""
    name = TYPE_NAMES.get(kind)
    if name is None:
        raise ReplicationError("type", f"unknown frame type {kind}")
    try:
        h = json.loads(bytes(header).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ReplicationError(f"{name}.header", f"not a JSON object ({type(exc).__name__})") from None
    h = _keys(h, name, _KEYS[kind])
    body = memoryview(body)
    if kind not in _WITH_BODY and len(body):
        raise ReplicationError(f"{name}.body", f"{len(body)} bytes where none are expected")
    if kind == BATCH:
        return Batch(_int(h, name, "epoch"), _int(h, name, "seq"), _ops(h, name, body), _lease(h, name))
    if kind == ACK:
        return Ack(_int(h, name, "epoch"), _int(h, name, "seq"), _num(_get(h, name, "t"), f"{name}.t"))
    if kind == HELLO:
        role = _str(h, name, "role")
        if role not in ("active", "standby"):
            raise ReplicationError(f"{name}.role", 'expected "active" or "standby"')
        return Hello(_str(h, name, "node"), role, _int(h, name, "epoch"), _int(h, name, "table_epoch"),
                     _int(h, name, "applied_seq"), _bool(h, name, "in_sync"))
    if kind == SNAPSHOT_BEGIN:
        return SnapshotBegin(_int(h, name, "epoch"), _int(h, name, "seq"), _int(h, name, "count"),
                             _int(h, name, "conns"))
    if kind == SNAPSHOT_CONN:
        conn = _int(h, name, "conn")
        ops = _ops(h, name, body)
        for i, op in enumerate(ops):
            if op.conn != conn:
                raise ReplicationError(f"{name}.ops[{i}].conn", f"{op.conn} in a frame of connection {conn}")
        return SnapshotConn(_int(h, name, "epoch"), _int(h, name, "seq"), _int(h, name, "i"), conn, ops)
    if kind == SNAPSHOT_END:
        return SnapshotEnd(_int(h, name, "epoch"), _int(h, name, "seq"))
    if kind == EPOCH:
        return Epoch(_int(h, name, "epoch"))
    if kind == RESYNC:
        return Resync(_int(h, name, "epoch"), _int(h, name, "applied_seq"), _bool(h, name, "snapshot"),
                      _str(h, name, "reason"))
    return Ping(_int(h, name, "epoch"), _int(h, name, "seq"), _lease(h, name))


def decode(data: bytes) -> Frame:
    """Exactly one whole frame (length prefix included)."""
    frames, rest = FrameReader().feed_all(data)
    if rest:
        raise ReplicationError("length", f"{rest} bytes of an incomplete frame")
    if len(frames) != 1:
        raise ReplicationError("length", f"{len(frames)} frames where one is expected")
    return frames[0]


class FrameReader:
    """Frames out of a byte stream, incrementally (a TCP connection's bytes, however cut)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        out: list[Frame] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= 4:
            size = int.from_bytes(buf[pos:pos + 4], "big")
            if not 6 <= size <= MAX_FRAME:
                raise ReplicationError("length", f"frame length {size}, expected 6..{MAX_FRAME}")
            if len(buf) - pos < 4 + size:
                break
            version, kind, hlen = buf[pos + 4], buf[pos + 5], int.from_bytes(buf[pos + 6:pos + 10], "big")
            if version != VERSION:
                raise ReplicationError("version", f"version {version}, this end speaks {VERSION}")
            if hlen > size - 6:
                raise ReplicationError("header_length", f"{hlen} bytes, the frame holds {size - 6}")
            start = pos + 10
            out.append(decode_payload(kind, bytes(buf[start:start + hlen]),
                                      bytes(buf[start + hlen:pos + 4 + size])))
            pos += 4 + size
        if pos:
            del buf[:pos]
        return out

    def feed_all(self, data: bytes) -> tuple[list[Frame], int]:
        """Frames in ``data`` and how many bytes are left over (an incomplete frame)."""
        frames = self.feed(data)
        return frames, len(self._buf)

    @property
    def pending(self) -> int:
        return len(self._buf)


# ----- the replicated table -----------------------------------------------------------------

@dataclass
class ReplConn:
    """One connection as the standby holds it: what the disk store holds (checkpoint.io.sqlite),
    plus a moved connection's translation."""

    record: Json | None = None                 # record_state's dict (None: not received yet)
    log_base: int = 0
    log: bytearray = field(default_factory=bytearray)
    fin: bool = False                          # the client's FIN follows the log
    fin_server: int | None = None              # what the server had sent by then (None: unknown)
    digest_meta: Json | None = None
    digest_base: int = 0
    digest_dropped: int = 0
    chunks: list[bytes | None] = field(default_factory=list)    # chunk number digest_dropped + i
    bounds: list[int | None] = field(default_factory=list)
    samples: list[tuple[int, int, bytes]] | None = None
    move: Json | None = None

    @property
    def log_end(self) -> int:
        return self.log_base + len(self.log)

    @classmethod
    def from_record(cls, rec: ConnectionRecord, move: Json | None = None) -> ReplConn:
        """The full state of a live connection (what a snapshot sends)."""
        from .state import record_state

        rc = cls(record=record_state(rec), move=move)
        if rec.log is not None:
            rc.log_base, rc.log = rec.log.base, bytearray(rec.log.data)
            rc.fin = rec.log.fin_offset is not None and rec.log.fin_offset == rec.log.end
            rc.fin_server = rec.log.fin_server_offset if rc.fin else None
        dg = rec.digest
        if isinstance(dg, StreamDigest):
            rc.digest_meta = {"kind": "stream", "end": dg.end, "volatile": list(dg.volatile), "overflow": dg.overflow,
                              "grid": dg.grid, "cuts": dg.cuts[-64:]}
            rc.digest_base, rc.digest_dropped = dg.base, dg.dropped
            rc.chunks, rc.bounds = list(dg.chunks), list(dg.bounds)
        elif isinstance(dg, SampledDigest):
            rc.digest_meta = {"kind": "sampled", "end": dg.end, "volatile": list(dg.volatile),
                              "overflow": dg.overflow, "stride": dg.stride}
            rc.samples = list(dg.samples)
        return rc

    def to_record(self) -> ConnectionRecord:
        """The connection rebuilt (at a takeover), as the disk store's ``load`` does.  Raises
        :class:`checkpoint.state.StateError` for a record that cannot be read back."""
        from .state import StateError, record_from_state

        if self.record is None:
            raise StateError("record", "no ICI replicated for this connection")
        rec = record_from_state(self.record)
        log = ByteLog(1 << 31, base=self.log_base)
        log.data = bytearray(self.log)
        if self.fin:
            log.fin_offset = log.end
            log.fin_server_offset = self.fin_server
        rec.log = log
        m = self.digest_meta
        if m is not None:
            volatile = tuple(m.get("volatile", ()))
            if m.get("kind") == "sampled":
                sd = SampledDigest(volatile)
                sd.samples = list(self.samples or [])
                sd.end, sd.stride, sd.overflow = m["end"], m.get("stride", 1), m.get("overflow")
                rec.digest = sd
            else:
                bounds = [b if b is not None else (self.digest_dropped + i + 1) * CHUNK
                          for i, b in enumerate(self.bounds)]
                end = max([m["end"], self.digest_base, *bounds[-1:]])
                dg = StreamDigest.restored(list(self.chunks), end, volatile, base=self.digest_base, bounds=bounds,
                                           grid=m.get("grid"), cuts=m.get("cuts", ()), dropped=self.digest_dropped)
                dg.overflow = m.get("overflow")
                rec.digest = dg
        return rec

    def ops(self, cid: int) -> list[Op]:
        """Ops that rebuild this state on an empty entry (a snapshot's)."""
        out: list[Op] = []
        if self.record is not None:
            out.append(Record(cid, self.record))
        if self.log_base:
            out.append(Trim(cid, self.log_base))
        data = bytes(self.log)
        for i in range(0, len(data), PIECE):
            last = self.fin and i + PIECE >= len(data)
            out.append(Append(cid, self.log_base + i, data[i:i + PIECE], last, self.fin_server if last else None))
        if self.fin and not data:
            out.append(Append(cid, self.log_base, b"", True, self.fin_server))
        if (self.digest_meta is not None or self.digest_base or self.digest_dropped or self.chunks
                or self.samples is not None):
            out.append(Digest(cid, self.digest_meta,
                              (self.digest_base, self.digest_dropped) if self.digest_base or self.digest_dropped
                              else None, self.digest_dropped, tuple(self.chunks), tuple(self.bounds),
                              None if self.samples is None else tuple(self.samples)))
        if self.move is not None:
            out.append(Move(cid, self.move))
        return out


Table = dict[int, ReplConn]


def apply_op(table: Table, op: Op) -> None:
    """Apply one op (idempotent, positional).  A log or chunk write that would leave a hole
    raises :class:`ReplicationError` (the table is then not trusted: resync by snapshot)."""
    if isinstance(op, Forget):
        table.pop(op.conn, None)
        return
    rc = table.get(op.conn)
    if rc is None:
        rc = table[op.conn] = ReplConn()
    if isinstance(op, Record):
        rc.record = op.state
    elif isinstance(op, Append):
        end = rc.log_end
        if op.off > end:
            raise ReplicationError("log.off", f"connection {op.conn}: bytes at {op.off}, the log ends at {end}")
        skip = max(0, rc.log_base - op.off)
        data = op.data[skip:]
        at = op.off + skip - rc.log_base
        if data:
            rc.log[at:at + len(data)] = data
        if op.fin:
            rc.fin = True
            rc.fin_server = op.fin_server if op.fin_server is not None else rc.fin_server
    elif isinstance(op, Trim):
        if op.base > rc.log_base:
            del rc.log[:op.base - rc.log_base]
            rc.log_base = op.base
    elif isinstance(op, Digest):
        if op.meta is not None:
            rc.digest_meta = op.meta
        if op.base is not None:
            b, d = op.base
            rc.digest_base = b
            if d > rc.digest_dropped:
                k = d - rc.digest_dropped
                del rc.chunks[:k], rc.bounds[:k]
                rc.digest_dropped = d
        if op.chunks:
            have = rc.digest_dropped + len(rc.chunks)
            if op.first > have:
                raise ReplicationError("digest.first", f"connection {op.conn}: chunk {op.first}, {have} held")
            bounds = op.bounds if op.bounds else (None,) * len(op.chunks)
            for k in range(max(0, rc.digest_dropped - op.first), len(op.chunks)):
                idx = op.first + k - rc.digest_dropped
                if idx < len(rc.chunks):
                    rc.chunks[idx], rc.bounds[idx] = op.chunks[k], bounds[k]
                else:
                    rc.chunks.append(op.chunks[k])
                    rc.bounds.append(bounds[k])
        if op.samples is not None:
            rc.samples = list(op.samples)
    else:
        rc.move = op.state


def apply_ops(table: Table, ops: Iterable[Op]) -> None:
    for op in ops:
        apply_op(table, op)


def ops_from_batch(batch: StoreBatch, moves: Mapping[int, Json | None] | None = None) -> list[Op]:
    """A disk-store batch (checkpoint.store.Batch) as replication ops, in the order the SQLite
    backend writes it (forgets first); ``moves``: translation state of moved connections that
    changed (None: the connection is not moved any more)."""
    out: list[Op] = [Forget(c) for c in batch.forget]
    for w in batch.writes:
        cid = w.cid
        if w.ici is not None:
            out.append(Record(cid, json.loads(w.ici)))
        if w.log_base is not None:
            out.append(Trim(cid, w.log_base))
        fin_server = w.fin_server if w.fin else None
        if w.log_data:
            out.append(Append(cid, w.log_off, w.log_data, w.fin, fin_server))
        elif w.fin:
            out.append(Append(cid, w.log_end, b"", True, fin_server))
        if w.digest_meta is not None or w.digest_base is not None or w.chunks or w.samples is not None:
            out.append(Digest(cid, None if w.digest_meta is None else json.loads(w.digest_meta), w.digest_base,
                              w.chunks_from, tuple(w.chunks), tuple(w.bounds),
                              None if w.samples is None else tuple(w.samples)))
    for cid, st in (moves or {}).items():
        out.append(Move(cid, st))
    return out


# ----- the active side -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Event:
    kind: str           # in_sync | degraded | snapshot | resend | fenced | peer
    message: str
    at: float


@dataclass(slots=True)
class _Sent:
    seq: int
    frames: list[bytes]
    size: int
    at: float
    snapshot: bool = False


def _split(ops: list[Op]) -> list[list[Op]]:
    """Ops cut into groups of at most BATCH_BODY log bytes (a large append split)."""
    groups: list[list[Op]] = [[]]
    size = 0
    for op in ops:
        if isinstance(op, Append) and len(op.data) > PIECE:
            n = len(op.data)
            pieces: list[Op] = [Append(op.conn, op.off + i, op.data[i:i + PIECE], op.fin and i + PIECE >= n,
                                       op.fin_server if i + PIECE >= n else None) for i in range(0, n, PIECE)]
        else:
            pieces = [op]
        for p in pieces:
            n = len(p.data) if isinstance(p, Append) else 0
            if size + n > BATCH_BODY and groups[-1]:
                groups.append([])
                size = 0
            groups[-1].append(p)
            size += n
    return groups


class Replicator:
    """The active gateway's end of the stream (see the module's theory of operation).

    The caller: ``submit(ops, now)`` for every commit batch and commits it once
    ``seq <= released_through`` (the lists ``on_frame``/``tick`` return name the seqs that just
    became committable; a seq the caller did not submit, a snapshot's, is to be ignored); feeds
    every received frame to ``on_frame``; calls ``tick`` regularly (every few ms); sends
    ``frames_out(now)``; calls ``connected``/``disconnected`` as the link comes and goes; answers
    :attr:`wants_snapshot` with :meth:`snapshot`; reads :meth:`pop_events`.  Once :attr:`fenced`
    is set it must stop forwarding for this epoch.

    States of the peer: *catching up* (a snapshot or a resend in flight; commits go alone), then
    *synchronous* once it acknowledged the catch-up (commits wait for its ACK), then *in sync* once
    it also acknowledged every batch committed alone (it is granted a lease: eligible).  A
    timeout, a lag or a lost link makes it *degraded*: commits go alone again once the last lease
    granted has run out.
    """

    def __init__(self, node: str, epoch: int, *, start_seq: int = 0, ack_timeout: float = 0.5,
                 max_lag_bytes: int = 64 << 20, lease: float = 1.0, heartbeat: float = 0.1,
                 now: float = 0.0) -> None:
        if epoch < 1:
            raise ValueError("an active epoch is >= 1")
        self.node = node
        self.epoch = epoch
        self.seq = start_seq
        self.acked = start_seq          # the peer acknowledged every seq up to here (of our history)
        self.released_through = start_seq  # every seq up to here may commit
        self.ack_timeout = ack_timeout
        self.max_lag_bytes = max_lag_bytes
        self.lease = lease
        self.heartbeat = heartbeat
        self.connected_now = False
        self.peer: Hello | None = None
        self.synchronous = False        # commits wait for the peer's ACK
        self.in_sync = False            # ... and the peer holds every committed batch: eligible
        self.degraded: str | None = "no standby yet"   # why not in sync (None: in sync)
        self.fenced: str | None = None
        self.need_snapshot = True       # the peer can only be caught up by a snapshot
        self._target: int | None = None  # catching up: the peer is caught up once it acked this
        self._sent_seq = 0              # the highest seq queued to the peer in this session
        self._hold: int | None = None   # buffer dropped with frames in flight: no snapshot before
                                        # the peer acknowledged them (a stuck peer gets none)
        self._floor: int | None = None  # seq of our first snapshot: a table of our history is at or after it
        self._buf: deque[_Sent] = deque()
        self._buf_bytes = 0
        self._out: list[bytes] = []
        self._echo: float | None = None     # the newest ACK t (peer clock) and when we received it
        self._echo_at = -math.inf
        self._granted_at = -math.inf        # receipt time of the newest t put into a lease
        self._release_at = now              # not synchronous: commits go alone from then on
        self._last_out = -math.inf
        self._ping_at: float | None = None  # an unanswered PING sent then
        self._down_since: float | None = now
        self._events: list[Event] = []
        self.sent_bytes = 0

    # --- state -----------------------------------------------------------------------------
    @property
    def wants_snapshot(self) -> bool:
        """A snapshot must be sent now: call :meth:`snapshot` with every open connection."""
        return self.connected_now and self.need_snapshot and self.fenced is None and self._hold is None

    def lag(self, now: float) -> tuple[int, float]:
        """Bytes sent and not acknowledged, and the age (ms) of the oldest of them."""
        age = (now - self._buf[0].at) * 1000 if self._buf else 0.0
        return self._buf_bytes, max(0.0, age)

    def pop_events(self) -> list[Event]:
        ev, self._events = self._events, []
        return ev

    def _event(self, kind: str, message: str, now: float) -> None:
        self._events.append(Event(kind, message, now))

    def _lease_field(self) -> tuple[float, float] | None:
        if self.in_sync and self._echo is not None:
            self._granted_at = max(self._granted_at, self._echo_at)
            return (self._echo, self.lease)
        return None

    def _degrade(self, reason: str, now: float) -> None:
        if self.synchronous:
            self._release_at = max(now, self._granted_at + self.lease)
            wait = self._release_at - now
            self._event("degraded", f"{reason}: committing without the standby"
                        + (f" in {wait * 1000:.0f} ms (when its lease ends)" if wait > 0 else ""), now)
        self.synchronous = self.in_sync = False
        self._target = None
        self.degraded = reason

    def _drop_buffer(self, now: float) -> None:
        """Too far behind or lost: forget what was buffered, the peer gets a snapshot."""
        self._buf.clear()
        self._buf_bytes = 0
        self._hold = self._sent_seq if self.connected_now and self._sent_seq > self.acked else None
        if not self.need_snapshot:
            self.need_snapshot = True
            self._event("snapshot", "the standby will get a snapshot", now)

    def _release(self, now: float) -> list[int]:
        new = self.acked
        if not self.synchronous and now >= self._release_at:
            new = self.seq
        if new <= self.released_through:
            return []
        out = list(range(self.released_through + 1, new + 1))
        self.released_through = new
        return out

    def _check_sync(self, now: float) -> None:
        if (self.in_sync or self._target is None or not self.connected_now or self.need_snapshot
                or self.fenced is not None or self.acked < self._target):
            return
        if not self.synchronous:
            # caught up: from now on commits wait; those that went alone must be acknowledged too
            self.synchronous = True
            self._release_at = math.inf
            self._target = self.seq
            if self.acked < self._target:
                return
        self.in_sync = True
        self._target = None
        self.degraded = None
        self._event("in_sync", f"standby {self.peer.node if self.peer else '?'} in sync at seq {self.seq}", now)

    def _fence(self, reason: str, now: float) -> None:
        if self.fenced is None:
            self._degrade(reason, now)
            self.fenced = reason
            self._out.clear()
            self._event("fenced", reason, now)

    # --- driven by the caller --------------------------------------------------------------
    def connected(self, now: float) -> None:
        """A new connection to the peer: our HELLO goes first; we wait for the peer's."""
        self._out.clear()
        self.connected_now = False
        self._ping_at = None
        self._sent_seq, self._hold = 0, None
        if self.fenced is None:
            self._out.append(encode(Hello(self.node, "active", self.epoch, self.epoch, self.seq, False)))

    def disconnected(self, now: float) -> None:
        if self.connected_now:
            self._event("peer", "sync link down", now)
        self.connected_now = False
        self._out.clear()
        self._ping_at = None
        self._down_since = now
        self._sent_seq, self._hold = 0, None
        if not self.synchronous:
            self._target = None

    def submit(self, ops: list[Op], now: float) -> int:
        """Queue one commit batch; returns its seq (the last one, if it was split)."""
        if self.fenced is not None:
            raise ReplicationError("epoch", f"fenced: {self.fenced}")
        lease = self._lease_field()
        for group in _split(ops):
            self.seq += 1
            if self.need_snapshot:
                continue  # the snapshot to come covers it
            data = encode(Batch(self.epoch, self.seq, tuple(group), lease))
            self._buf.append(_Sent(self.seq, [data], len(data), now))
            self._buf_bytes += len(data)
            if self.connected_now:
                self._out.append(data)
                self._sent_seq = self.seq
        if self._buf_bytes > self.max_lag_bytes:
            self._degrade(f"standby behind by {self._buf_bytes} bytes (max_lag_bytes {self.max_lag_bytes})", now)
            self._drop_buffer(now)
        if not self.synchronous and now >= self._release_at:
            self.released_through = self.seq
        return self.seq

    def snapshot(self, conns: Mapping[int, ReplConn], now: float) -> int:
        """Send every open connection's full state (what :attr:`wants_snapshot` asks for): it
        replaces the standby's table; batches submitted afterwards follow it."""
        if self.fenced is not None:
            raise ReplicationError("epoch", f"fenced: {self.fenced}")
        self.seq += 1
        seq = self.seq
        frames: list[bytes] = []
        for cid in sorted(conns):
            ops = conns[cid].ops(cid)
            for group in _split(ops) if ops else [[]]:
                frames.append(encode(SnapshotConn(self.epoch, seq, len(frames), cid, tuple(group))))
        frames.insert(0, encode(SnapshotBegin(self.epoch, seq, len(frames), len(conns))))
        frames.append(encode(SnapshotEnd(self.epoch, seq)))
        self._buf.clear()
        size = sum(len(f) for f in frames)
        self._buf.append(_Sent(seq, frames, size, now, snapshot=True))
        self._buf_bytes = size
        self.need_snapshot = False
        self._floor = seq if self._floor is None else self._floor
        self._target = seq
        if self.connected_now:
            self._out.extend(frames)
            self._sent_seq = seq
        self._event("snapshot", f"snapshot of {len(conns)} connections ({size} bytes) as seq {seq}", now)
        if not self.synchronous and now >= self._release_at:
            self.released_through = self.seq
        return seq

    def _resend_from(self, applied: int, table_epoch: int, now: float, why: str) -> bool:
        """Resend what follows ``applied`` if the buffer holds it; False: a snapshot is needed."""
        if self.need_snapshot or applied > self.seq:
            return False
        ours = table_epoch == self.epoch and self._floor is not None and applied >= self._floor
        if not ours and not (self._buf and self._buf[0].snapshot):
            return False
        if ours:
            if self._buf and self._buf[0].seq > applied + 1:
                return False
            while self._buf and self._buf[0].seq <= applied:
                s = self._buf.popleft()
                self._buf_bytes -= s.size
            self.acked = max(self.acked, applied)
        frames = [f for s in self._buf for f in s.frames]
        self._out.extend(frames)
        self._sent_seq = self.seq if frames else self._sent_seq
        if frames:
            self._event("resend", f"{why}: resending from seq {self._buf[0].seq} to {self.seq}", now)
        if not self.synchronous:
            self._target = self.seq
        return True

    def on_frame(self, frame: Frame, now: float) -> list[int]:
        """A frame from the peer; returns the seqs that may now commit."""
        if self.fenced is not None:
            return []
        if isinstance(frame, Ack):
            if frame.epoch == self.epoch and frame.seq <= self.seq:
                if self._echo is None or frame.t > self._echo:
                    self._echo, self._echo_at = frame.t, now
                self._ping_at = None
                if self._hold is not None and frame.seq >= self._hold:
                    self._hold = None
                if frame.seq > self.acked:
                    self.acked = frame.seq
                    while self._buf and self._buf[0].seq <= frame.seq:
                        s = self._buf.popleft()
                        self._buf_bytes -= s.size
        elif isinstance(frame, Hello):
            if frame.epoch > self.epoch:
                self._fence(f"peer {frame.node} holds epoch {frame.epoch} (ours {self.epoch})", now)
                return []
            if frame.role == "active":
                if frame.epoch == self.epoch:
                    self._fence(f"peer {frame.node} is active at our epoch {self.epoch}", now)
                    return []
                self._out.append(encode(Epoch(self.epoch)))
                return []
            self.peer = frame
            self.connected_now = True
            self._sent_seq, self._hold = 0, None
            self._down_since = None
            self._event("peer", f"standby {frame.node} connected (epoch {frame.table_epoch}, "
                        f"applied seq {frame.applied_seq})", now)
            if not self._resend_from(frame.applied_seq, frame.table_epoch, now, f"standby {frame.node} back"):
                self._degrade(f"standby {frame.node} needs a snapshot", now)
                self._drop_buffer(now)
        elif isinstance(frame, Resync):
            if frame.snapshot or not self._resend_from(frame.applied_seq, frame.epoch, now,
                                                       f"standby asks: {frame.reason}"):
                self._degrade(f"standby resync: {frame.reason}", now)
                self._drop_buffer(now)
        elif isinstance(frame, Epoch):
            if frame.epoch > self.epoch:
                self._fence(f"peer announces epoch {frame.epoch} (ours {self.epoch})", now)
                return []
        elif frame.epoch > self.epoch:  # another active's BATCH/PING/SNAPSHOT: it is newer
            self._fence(f"frames of epoch {frame.epoch} from the peer (ours {self.epoch})", now)
            return []
        else:
            self._out.append(encode(Epoch(self.epoch)))
        self._check_sync(now)
        return self._release(now)

    def tick(self, now: float) -> list[int]:
        """Timers: ACK timeout, link down, heartbeat, release of commits when degraded."""
        if self.fenced is not None:
            return []
        if self.synchronous:
            oldest = self._buf[0] if self._buf else None
            if oldest is not None and now - oldest.at > self.ack_timeout:
                self._degrade(f"no ACK for seq {oldest.seq} within {self.ack_timeout * 1000:.0f} ms", now)
            elif self._ping_at is not None and now - self._ping_at > self.ack_timeout:
                self._degrade(f"standby silent for {self.ack_timeout * 1000:.0f} ms", now)
            elif self._down_since is not None and now - self._down_since > self.ack_timeout:
                self._degrade("sync link down", now)
        if self.connected_now and now - self._last_out >= self.heartbeat and not self.need_snapshot:
            self._out.append(encode(Ping(self.epoch, self.seq, self._lease_field())))
            if self._ping_at is None:
                self._ping_at = now
        return self._release(now)

    def frames_out(self, now: float) -> list[bytes]:
        out, self._out = self._out, []
        if out:
            self._last_out = now
            self.sent_bytes += sum(len(f) for f in out)
        return out


# ----- the standby side ----------------------------------------------------------------------

class Replica:
    """The standby gateway's end: a live table applied in seq order (see the theory of operation).

    The caller feeds every received frame to ``on_frame(frame, now)``, sends ``frames_out()``,
    calls ``connected(now)`` on every new connection, reads ``in_sync(now)`` (eligibility: the
    keepalived track file) and, when it becomes master, ``take_over(now)``.
    """

    def __init__(self, node: str, epoch: int = 0) -> None:
        self.node = node
        self.epoch = epoch              # the highest epoch known (fencing)
        self.table_epoch = 0            # the history the table belongs to (0: none)
        self.applied = 0
        self.table: Table = {}
        self.gap: str | None = "no snapshot yet"   # why the table cannot be trusted (None: it can)
        self._need_snapshot = True      # the gap is one only a snapshot closes (else: a resend)
        self.refused = 0                # frames of an older epoch refused
        self.retired = False            # took over: this end is closed
        self._stage: Table | None = None
        self._stage_key = (0, 0)
        self._stage_count = 0
        self._stage_got: set[int] = set()
        self._lease_until: float | None = None
        self._ack_t: float | None = None
        self._asked: tuple[int, int, bool] | None = None
        self._out: list[bytes] = []

    def in_sync(self, now: float) -> bool:
        return self.why_not(now) is None

    def why_not(self, now: float) -> str | None:
        """Why this standby is not eligible (None: it is)."""
        if self.retired:
            return "took over"
        if self.gap is not None:
            return self.gap
        if self.table_epoch < self.epoch:
            return f"table of epoch {self.table_epoch}, epoch {self.epoch} exists"
        if self._lease_until is None or now >= self._lease_until:
            return "no lease from the active"
        return None

    def hello(self, now: float) -> Hello:
        return Hello(self.node, "standby", self.epoch, self.table_epoch, self.applied, self.in_sync(now))

    def connected(self, now: float) -> None:
        self._out.clear()
        self._ack_t = None
        self._asked = None
        self._out.append(encode(self.hello(now)))

    def disconnected(self, now: float) -> None:
        """The link is down: nothing queued is sent (the table and the lease stay: a silent death
        of the active looks the same, and the lease is what tells how long it may be trusted)."""
        self._out.clear()
        self._ack_t = None

    def tick(self, now: float) -> list[int]:
        """No timers on this side (the lease is read with ``in_sync(now)``)."""
        return []

    def _resync(self, reason: str, snapshot: bool) -> None:
        self.gap = reason
        self._need_snapshot = self._need_snapshot or snapshot
        snapshot = self._need_snapshot
        self._lease_until = None
        key = (self.table_epoch, self.applied, snapshot)
        if self._asked == key:
            return
        self._asked = key
        self._out.append(encode(Resync(self.table_epoch, self.applied, snapshot, reason)))

    def _lease(self, lease: tuple[float, float] | None) -> None:
        if lease is None:
            self._lease_until = None
        else:
            until = lease[0] + lease[1]
            self._lease_until = until if self._lease_until is None else max(self._lease_until, until)

    def _older(self, frame: Batch | Ping | SnapshotBegin | SnapshotConn | SnapshotEnd) -> bool:
        if frame.epoch < self.epoch:
            self.refused += 1
            self._out.append(encode(Epoch(self.epoch)))
            return True
        self.epoch = frame.epoch
        return False

    def on_frame(self, frame: Frame, now: float) -> None:
        if self.retired:
            if isinstance(frame, (Batch, Ping, SnapshotBegin, SnapshotConn, SnapshotEnd)) and frame.epoch < self.epoch:
                self.refused += 1
                self._out.append(encode(Epoch(self.epoch)))
            return
        if isinstance(frame, Batch):
            if self._older(frame):
                return
            if frame.epoch != self.table_epoch or self._need_snapshot:
                self._resync(self.gap if frame.epoch == self.table_epoch and self.gap else
                             f"batch of epoch {frame.epoch}, table of epoch {self.table_epoch}", True)
                return
            if self._stage is not None:
                if frame.seq > self._stage_key[1]:
                    self._stage = None
                    self._resync(f"seq {frame.seq} before the END of snapshot {self._stage_key[1]}", True)
                return
            if frame.seq <= self.applied:
                self._ack_t = now
                return
            if frame.seq > self.applied + 1:
                self._resync(f"gap: seq {frame.seq} after {self.applied}", False)
                return
            try:
                apply_ops(self.table, frame.ops)
            except ReplicationError as exc:
                self._resync(f"seq {frame.seq}: {exc}", True)
                return
            self.applied = frame.seq
            if not self._need_snapshot:
                self.gap = None
            self._lease(frame.lease)
            self._ack_t = now
        elif isinstance(frame, Ping):
            if self._older(frame):
                return
            if frame.epoch != self.table_epoch or self._stage is not None:
                return
            if frame.seq > self.applied:
                self._resync(f"gap: the active is at seq {frame.seq}, applied {self.applied}", False)
                return
            if self.gap is None:
                self._lease(frame.lease)
            self._ack_t = now
        elif isinstance(frame, SnapshotBegin):
            if self._older(frame):
                return
            key = (frame.epoch, frame.seq)
            if (self._stage is not None and key == self._stage_key) or (
                    frame.epoch == self.table_epoch and frame.seq <= self.applied):
                return  # a duplicate
            self._stage, self._stage_key = {}, key
            self._stage_count, self._stage_got = frame.count, set()
            self._lease_until = None
        elif isinstance(frame, SnapshotConn):
            if self._older(frame):
                return
            if self._stage is None or (frame.epoch, frame.seq) != self._stage_key or frame.index >= self._stage_count:
                return
            try:
                apply_ops(self._stage, frame.ops)
            except ReplicationError as exc:
                self._stage = None
                self._resync(f"snapshot {frame.seq}: {exc}", True)
                return
            self._stage_got.add(frame.index)
        elif isinstance(frame, SnapshotEnd):
            if self._older(frame):
                return
            key = (frame.epoch, frame.seq)
            if self._stage is None or key != self._stage_key:
                if frame.epoch == self.table_epoch and frame.seq == self.applied:
                    self._ack_t = now  # a duplicate END: acknowledge again
                return
            if len(self._stage_got) != self._stage_count:
                self._stage = None
                self._resync(f"snapshot {frame.seq} incomplete: {len(self._stage_got)} of "
                             f"{self._stage_count} frames", True)
                return
            self.table, self._stage = self._stage, None
            self.table_epoch, self.applied = frame.epoch, frame.seq
            self.gap = None
            self._need_snapshot = False
            self._asked = None
            self._ack_t = now
        elif isinstance(frame, Hello):
            if frame.role == "active" and frame.epoch < self.epoch:
                self._out.append(encode(Epoch(self.epoch)))
            else:
                self.epoch = max(self.epoch, frame.epoch)
        elif isinstance(frame, Epoch):
            self.epoch = max(self.epoch, frame.epoch)

    def frames_out(self, now: float = 0.0) -> list[bytes]:
        out, self._out = self._out, []
        if self._ack_t is not None:
            if self.table_epoch:
                out.append(encode(Ack(self.table_epoch, self.applied, self._ack_t)))
            self._ack_t = None
        return out

    def take_over(self, now: float, *, force: bool = False) -> tuple[int, Table, int]:
        """Become the active: returns (the new epoch, the table, the seq it reflects).  Refused
        while not in sync unless ``force`` (the operator's decision: connections may lack bytes)."""
        why = self.why_not(now)
        if why is not None and not force:
            raise ReplicationError("in_sync", f"not in sync ({why}): refusing to take over")
        self.epoch += 1
        self.retired = True
        table, self.table = self.table, {}
        return self.epoch, table, self.applied
