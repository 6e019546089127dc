"""The checkpoint store: each connection's ICI and client byte log, with a
commit point per connection (tcpcp section 6).

Theory of operation
-------------------
The data plane appends every client byte to the connection's in-memory
:class:`~checkpoint.streamlog.ByteLog` as the packet passes.  A byte is
*committed* once it is durable: then, and only then, may the client be told
it arrived (tcpcp 6.2, invariant I1); the data plane holds or clamps every
acknowledgment above the commit point (``ConnectionRecord.commit_offset``,
``commit_fin``).

``mode = "memory"`` needs no store: a byte is as safe as the process that
holds it the moment it is logged, so the commit point is the log's end.

``mode = "disk"`` is a **group commit**.  :class:`CommitPlanner` (sans-I/O)
keeps what is durable per connection; every ``commit_interval`` the daemon
asks it for a :class:`Batch` — the log bytes appended since the last one,
the ICI of records that are new, changed state or were last saved
``ici_interval`` ago, new digest chunk hashes, the connections to forget —
hands the batch to a :class:`Backend` on a writer thread (one transaction,
one fsync, however many connections), and when that returns calls
:meth:`CommitPlanner.done`, which advances the commit points and reports the
records whose held acknowledgments may now go.  At most one batch is in
flight: while it is written the next one accumulates, so the fsync rate is
bounded and a slow disk makes batches larger rather than queues longer.

A record's commit point is ``-1`` until its ICI is durable: without it a
restart could not even name the connection, so not even the SYN is
acknowledged (the SYN-ACK is held).

A connection moved by replay also has its *move state* (``checkpoint.state.MoveState``, set
with :meth:`CommitPlanner.set_move`): written when it changes — a move starts, a move completes,
the backup sends its FIN — together with the record's ICI in the same batch, so that a restart
reads the translation with the backend it belongs to (``checkpoint.splice``, "A restart of the
gateway").

The ICI's sequence numbers and windows are saved at most every
``ici_interval`` (they change with every packet, and after a restart the
tracker's highest-plausible-value rule re-learns them from the wire within a
round trip); the log and the digest, which the wire cannot give back, are
saved every batch.

Retention: a stream replay needs the client's stream from byte 0, so nothing
of such a connection's log is trimmed.  An HTTP-aware one (``replay = "http"``)
trims the log and the digest at the boundary after the last exchange the client
fully acknowledged (``checkpoint.httpreplay``); the next batch records the trim
(``log_base``, ``digest_base``) and drops the rows before it, in the same
transaction as the bytes after it.  A connection's rows go when it is forgotten
(closed, expired, reset).  Limits: ``failover.max_log_bytes`` per
connection (the log stops and says why) and ``max_total_bytes`` over all
connections: a connection whose new bytes would pass it stops being logged,
with the reason "checkpoint store full", and is *unprotected* (reset cleanly
rather than replayed on failover).

:class:`checkpoint.io.sqlite.SqliteBackend` is the ``disk`` backend: SQLite in WAL mode with
``synchronous = FULL`` — a commit is one append to the write-ahead log and
one fsync, readers never block the writer, crash recovery and space reuse
after deletes are SQLite's, and it is in the standard library.  (An
append-only log of our own would need its own compaction and recovery code
to get the same.)  A ``peer`` backend (replication to a standby gateway)
implements the same :class:`Backend` protocol: ``write`` returns once the
peer holds the batch.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from .ici import ConnectionRecord, TcpState
from .streamlog import SampledDigest, StreamDigest

STORE_FULL = "checkpoint store full (store.max_total_bytes)"
COMMIT_LOG_LEN = 200_000


@dataclass(slots=True)
class Write:
    """What one batch writes for one connection."""

    cid: int
    ici: str | None = None              # record_state JSON, None: unchanged
    log_off: int = 0
    log_data: bytes = b""
    log_base: int | None = None         # the log was trimmed to here (None: unchanged)
    digest_base: tuple[int, int] | None = None  # the digest was trimmed: (its base, chunks dropped)
    bounds: list[int] = field(default_factory=list)  # end offsets of ``chunks``
    log_end: int = 0                    # durable log length once written
    fin: bool = False                   # the client's FIN is logged
    fin_server: int | None = None       # with it: what the server had sent then (None: unknown)
    digest_meta: str | None = None      # kind, end, volatile, overflow (JSON)
    chunks_from: int = 0                # index of chunks[0]
    chunks: list[bytes | None] = field(default_factory=list)
    samples: list[tuple[int, int, bytes]] | None = None  # a sampled digest's list, whole (rewritten)
    move_set: bool = False              # the move state changed: write ``move`` (with the ICI)
    move: str | None = None             # with move_set: checkpoint.state.move_state JSON, None: not moved


@dataclass(slots=True)
class Batch:
    seq: int
    planned: float                      # wall time the batch was cut
    writes: list[Write] = field(default_factory=list)
    forget: list[int] = field(default_factory=list)
    written: float | None = None        # wall time the backend returned (durable)

    @property
    def log_bytes(self) -> int:
        return sum(len(w.log_data) for w in self.writes)


@dataclass(slots=True)
class _Entry:
    rec: ConnectionRecord
    log_saved: int = 0
    fin_saved: bool = False
    ici_saved: bool = False
    ici_at: float = 0.0
    state: TcpState | None = None
    chunks_saved: int = 0               # chunk number (counting trimmed ones) saved up to
    log_base: int = 0
    digest_base: int = 0
    samples_saved: int = 0
    stride: int = 1
    move: str | None = None             # the move state to keep (MoveState JSON), None: not moved by replay
    move_saved: str | None = None       # the move state durable


@dataclass(slots=True)
class Loaded:
    """A connection read back from the store."""

    rec: ConnectionRecord
    saved_at: float                     # wall time its ICI was committed
    move: str | None = None             # its move state (checkpoint.state.move_state JSON), None: not moved


@dataclass
class StoreStats:
    batches: int = 0
    bytes_written: int = 0
    last_batch_ms: float = 0.0
    max_batch_ms: float = 0.0
    last_commit: float | None = None
    held_total: int = 0                 # client log bytes held over all connections
    overflowed: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "batches": self.batches,
            "bytes_written": self.bytes_written,
            "last_batch_ms": round(self.last_batch_ms, 3),
            "max_batch_ms": round(self.max_batch_ms, 3),
            "last_commit": self.last_commit,
            "held_total": self.held_total,
            "overflowed": self.overflowed,
        }


class Backend(Protocol):
    """Where batches become durable."""

    def write(self, batch: Batch) -> None: ...
    def load(self) -> list[Loaded]: ...
    def close(self) -> None: ...


class CommitPlanner:
    """Which bytes of which connection are durable, and what to write next."""

    def __init__(self, *, max_total_bytes: int = 1 << 30, ici_interval: float = 0.25) -> None:
        self.max_total_bytes = max_total_bytes
        self.ici_interval = ici_interval
        self.entries: dict[int, _Entry] = {}
        self.dirty: set[int] = set()
        self.forgotten: list[int] = []
        self.in_flight: Batch | None = None
        self.stats = StoreStats()
        self._seq = 0
        # (wall time durable, connection id, commit_offset, commit_fin): what the
        # client may have been told, when — for tests and the panel
        self.commit_log: deque[tuple[float, int, int, bool]] = deque(maxlen=COMMIT_LOG_LEN)

    # --- fed by the data plane -------------------------------------------------------------
    def track(self, rec: ConnectionRecord) -> None:
        """A new protected connection: nothing of it is durable yet."""
        rec.commit_offset = -1
        rec.commit_fin = False
        self.entries[rec.id] = _Entry(rec)
        self.dirty.add(rec.id)

    def adopt(self, rec: ConnectionRecord, now: float, move: str | None = None) -> None:
        """A connection loaded from the store: durable as it stands (``move``: its move state)."""
        e = _Entry(rec, log_saved=rec.log.end if rec.log is not None else 0, ici_saved=True, ici_at=now,
                   state=rec.state, log_base=rec.log.base if rec.log is not None else 0, move=move, move_saved=move)
        e.fin_saved = rec.log is not None and rec.log.fin_offset is not None
        dg = rec.digest
        if isinstance(dg, StreamDigest):
            e.chunks_saved = dg.dropped + len(dg.chunks)
            e.digest_base = dg.base
        elif isinstance(dg, SampledDigest):
            e.samples_saved, e.stride = len(dg.samples), dg.stride
        rec.commit_offset, rec.commit_fin = e.log_saved, e.fin_saved
        self.entries[rec.id] = e
        self.stats.held_total += e.log_saved - e.log_base

    def set_move(self, cid: int, move: str | None) -> None:
        """The connection's move state (``checkpoint.state.move_state`` JSON; None: not moved by
        replay) is now ``move``: written, with the record, in the next batch if it changed."""
        e = self.entries.get(cid)
        if e is not None and e.move != move:
            e.move = move
            self.dirty.add(cid)

    def drop_loaded(self, cid: int) -> None:
        """A connection read back from the store and not re-attached (reset, or over): its rows
        go in the next batch (it was never adopted, so :meth:`forget` does not know it)."""
        if cid not in self.entries and cid not in self.forgotten:
            self.forgotten.append(cid)

    def touch(self, rec: ConnectionRecord) -> None:
        if rec.id in self.entries:
            self.dirty.add(rec.id)

    def forget(self, cid: int) -> None:
        e = self.entries.pop(cid, None)
        if e is not None:
            self.stats.held_total -= e.log_saved - e.log_base
            self.dirty.discard(cid)
            self.forgotten.append(cid)

    # --- the group commit ------------------------------------------------------------------
    def plan(self, now: float) -> Batch | None:
        """Cut the next batch (None: nothing to write, or one is in flight)."""
        if self.in_flight is not None or (not self.dirty and not self.forgotten):
            return None
        self._seq += 1
        batch = Batch(self._seq, now, forget=self.forgotten)
        self.forgotten = []
        for cid in self.dirty:
            e = self.entries.get(cid)
            if e is not None:
                w = self._write_for(e, now)
                if w is not None:
                    batch.writes.append(w)
        self.dirty = set()
        self.in_flight = batch
        return batch

    def _write_for(self, e: _Entry, now: float) -> Write | None:
        from .state import record_state

        rec = e.rec
        w = Write(rec.id)
        log = rec.log
        if log is not None:
            end = log.end
            if log.base > e.log_base:
                w.log_base = log.base
            start = max(e.log_saved, log.base)  # bytes trimmed before they were saved are never needed
            new = end - start
            if new > 0 and self.stats.held_total + new > self.max_total_bytes and log.overflow is None:
                log.overflow = STORE_FULL
                self.stats.overflowed += 1
            if new > 0 and log.overflow != STORE_FULL:
                w.log_off, w.log_data = start, bytes(log.data[start - log.base:end - log.base])
                self.stats.held_total += new
            else:
                # nothing new to write; bytes trimmed before they were written count as
                # committed (no replay starts before the trim, recorded in this batch)
                end = start
            w.log_end = end
            w.fin = log.fin_offset is not None and log.fin_offset == end
            w.fin_server = log.fin_server_offset if w.fin else None
        state_changed = rec.state != e.state
        if e.move != e.move_saved:
            # the move state goes with the record as it is then (its backend, its move count)
            w.move_set, w.move = True, e.move
        if not e.ici_saved or state_changed or w.move_set or now - e.ici_at >= self.ici_interval:
            w.ici = json.dumps(record_state(rec), separators=(",", ":"))
            dg = rec.digest
            if isinstance(dg, StreamDigest):
                w.digest_meta = json.dumps({"kind": "stream", "end": dg.end, "volatile": list(dg.volatile),
                                            "overflow": dg.overflow, "grid": dg.grid, "cuts": dg.cuts[-64:]})
            elif isinstance(dg, SampledDigest):
                w.digest_meta = json.dumps({"kind": "sampled", "end": dg.end, "volatile": list(dg.volatile),
                                            "overflow": dg.overflow, "stride": dg.stride})
        dg = rec.digest
        if isinstance(dg, StreamDigest) and dg.base > e.digest_base:
            w.digest_base = (dg.base, dg.dropped)
        if isinstance(dg, StreamDigest) and dg.dropped + len(dg.chunks) > e.chunks_saved:
            first = max(e.chunks_saved, dg.dropped)
            w.chunks_from = first
            w.chunks = list(dg.chunks[first - dg.dropped:])
            w.bounds = list(dg.bounds[first - dg.dropped:])
        elif isinstance(dg, SampledDigest) and (dg.stride != e.stride or len(dg.samples) != e.samples_saved):
            w.samples = list(dg.samples)
        if (not w.log_data and w.ici is None and not w.move_set and not w.chunks and w.samples is None and w.fin == e.fin_saved
                and w.log_base is None and w.digest_base is None):
            return None
        return w

    def done(self, batch: Batch) -> list[ConnectionRecord]:
        """The batch is durable: advance the commit points.  Returns the
        records whose commit point moved (their held ACKs may go)."""
        self.in_flight = None
        st = self.stats
        st.batches += 1
        st.bytes_written += batch.log_bytes
        written = batch.written if batch.written is not None else batch.planned
        ms = (written - batch.planned) * 1000
        st.last_batch_ms, st.max_batch_ms = ms, max(st.max_batch_ms, ms)
        st.last_commit = written
        moved = []
        for w in batch.writes:
            e = self.entries.get(w.cid)
            if e is None:
                continue
            rec = e.rec
            if w.ici is not None:
                e.ici_saved, e.ici_at, e.state = True, batch.planned, rec.state
            if w.log_base is not None and w.log_base > e.log_base:
                # the bytes counted as held below the trim (those written before this batch)
                self.stats.held_total -= min(w.log_base, e.log_saved) - e.log_base
                e.log_base = w.log_base
            e.log_saved = max(e.log_saved, w.log_end)
            if w.digest_base is not None:
                e.digest_base = max(e.digest_base, w.digest_base[0])
            e.fin_saved = e.fin_saved or w.fin
            if w.chunks:
                e.chunks_saved = w.chunks_from + len(w.chunks)
            if w.move_set:
                e.move_saved = w.move
            if w.samples is not None:
                e.samples_saved = len(w.samples)
                dg = rec.digest
                e.stride = dg.stride if isinstance(dg, SampledDigest) else 1
            if e.ici_saved:
                off, fin = e.log_saved, e.fin_saved
                if off != rec.commit_offset or fin != rec.commit_fin:
                    rec.commit_offset, rec.commit_fin = off, fin
                    self.commit_log.append((written, rec.id, off, fin))
                    moved.append(rec)
        return moved

    def failed(self, batch: Batch) -> None:
        """The backend could not write: everything in the batch is dirty again."""
        self.in_flight = None
        for w in batch.writes:
            if w.cid in self.entries:
                self.dirty.add(w.cid)
                self.stats.held_total -= len(w.log_data)
        self.forgotten.extend(batch.forget)

    def checkpoint_age(self, cid: int, now: float) -> float | None:
        """Seconds since the connection's ICI was last made durable (None: never)."""
        e = self.entries.get(cid)
        return None if e is None or not e.ici_saved else max(0.0, now - e.ici_at)

    def commits(self, cid: int | None = None, since: float = 0.0) -> list[dict[str, object]]:
        return [{"t": t, "connection": c, "commit_offset": off, "commit_fin": fin}
                for t, c, off, fin in self.commit_log if (cid is None or c == cid) and t >= since]
