"""Ordinary connections offloaded to the compiled fast path (``nfq/native/fastpath.c``).

Theory of operation
-------------------
The Python engine (:class:`~appliance.dataplane.engine.Dataplane`) owns every record and stays
the specification.  Nearly every packet of a connection in its plainest state is a pure
acknowledgment or a data segment in order, and for those the engine only folds the segment
into the sender's half of the record, logs a client's new bytes, hashes a server's, and
accepts the packet.  :class:`Offload` hands such connections to the native binding's flow
cache, which then decides those packets inside the queue's batch, without a Python call per
packet.

* **Eligible** (:meth:`Offload.eligible`): ESTABLISHED, no FIN or RST either way, both halves'
  ``next_seq`` known, the ordinary mode (not moving, moved, held, resumed, resyncing), no HTTP
  framing, no close waiting for a probe, and a live backend.  Client->service ACKs are offloaded
  when the kernel's stateless rule rewrites the service's client packets to the connection's
  backend (the engine would pass them unchanged); backend->client ACKs when there is no
  delayed-ACK gate (memory store: the engine would pass them unchanged).
* **The server's data** too, when its stream digest can be carried on in compiled code
  (:meth:`Offload.digest_state`): a full digest (``verify = "full"``) hashing (not blind, not
  resyncing, nothing out of order, no HTTP cuts) on the shared-state hasher
  (:mod:`checkpoint.xxh3`), at most one volatile field, and the SIMD search in use.  Then a
  segment in order, or one wholly retransmitted, is tracked, masked and hashed into the same
  XXH3 state; the chunks it finishes are handed back at the sync.  Anything else (out of order,
  overlapping, past the stream's limit) is Python's.
* **The client's data** too, when its byte log is complete and in order (no overflow, nothing
  held past a gap, no FIN logged): a segment in order (or partly or wholly retransmitted) is
  tracked and its new bytes are copied into the cache's arena; the sync appends them to the log
  (and, with the memory store, moves the commit point to the log's end) before any verdict of
  the batch is sent, so no byte reaches the backend unlogged.
* **Installed** after a packet of the connection the engine handled (:meth:`after`), with the
  fields of both halves a segment can change, and the log's and digest's state.  When the
  engine handles a later packet of an offloaded connection (out of order, a FIN), the half that
  packet changed is written again with its log or digest state, or the flow is removed when the
  connection is no longer eligible.
* **Removed** when anything else changes what a packet of it would do: a mode set or cleared,
  the record's state or backend changed outside the tracker (``ConnectionTable.reindex``), the
  record gone from the table.  A change of a service (the kernel's rule repointed) clears the
  whole cache.
* **Synced** (:meth:`sync`) after the cache has seen a batch and before the engine handles the
  batch's other packets: the touched flows' fields are copied into their records, with the
  counters, the table's recency, the checkpoint store's dirty mark and the panel's packet ring
  the engine would have updated.  Within a batch, once one packet of a connection is left to
  Python every later one is too, so each connection's packets are folded in arrival order and a
  record is exact whenever Python reads it.  The one difference: ``last_seen`` and the
  timestamp clock samples of fast-path packets carry the batch's ``now``.

``tests/unit/test_fastpath.py`` feeds the same packets to the engine alone and to the engine
with the cache, in batches, and requires the same verdicts, records and counters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from checkpoint import memsearch
from checkpoint.addr import is_v6, pack
from checkpoint.ici import ConnectionRecord, HalfConnection, TcpState
from checkpoint.seqnum import seq_add
from checkpoint.streamlog import STREAM_LIMIT, VOLATILE, ByteLog, StreamDigest
from checkpoint.xxh3 import NativeXXH3

if TYPE_CHECKING:
    from .engine import Dataplane

FPC_CLIENT = 1
FPC_SERVER = 2
FPC_SERVER_DATA = 4
FPC_CLIENT_DATA = 8
STAT_FIELDS = ("fast", "data_fast", "logged", "punted", "no_flow", "not_pure_ack", "not_in_order", "unusual",
               "stale", "installs", "removes", "full")


def _lib() -> tuple[Any, Any]:
    from nfq.native import _lib as native_lib

    return native_lib()


class Offload:
    def __init__(self, dp: Dataplane, capacity: int,
                 record: Callable[[memoryview | bytes | bytearray, float], None] | None = None) -> None:
        ffi, lib = _lib()
        self._ffi, self._lib = ffi, lib
        cache = lib.fpc_new(capacity)
        if cache == ffi.NULL:
            raise MemoryError(f"fast path: no memory for {capacity} flows")
        self.cache = ffi.gc(cache, lib.fpc_free)
        self.capacity = capacity
        self.dp = dp
        self.record = record   # the panel's packet ring (None: not kept)
        self.enabled = True    # False: every packet goes to the engine (a fenced node's drain)
        self.slots: dict[int, int] = {}  # conn id -> its slot in the cache
        self._spec = ffi.new("struct fpc_flow *")
        self._touched = ffi.new("const int32_t **")
        self._chunks = ffi.new("const struct fpc_chunk **")
        self._staged = ffi.new("const struct fpc_staged **")
        self._arena = ffi.new("const uint8_t **")
        dp.offload = self
        dp.table.on_change = self.forget
        dp.modes.on_change = self.forget

    @property
    def wants_packets(self) -> bool:
        return self.record is not None

    # --- what changes an offloaded flow ---------------------------------------------------------
    def forget(self, cid: int) -> None:
        slot = self.slots.pop(cid, None)
        if slot is not None:
            self._lib.fpc_remove(self.cache, slot, cid)

    def clear(self) -> None:
        """A service changed (its kernel rule, its backends): every flow goes."""
        self.slots.clear()
        self._lib.fpc_clear(self.cache)

    def eligible(self, rec: ConnectionRecord) -> int:
        """The directions whose packets the cache may decide for ``rec`` (0: none); whether it
        takes their data too is :meth:`log_state`'s and :meth:`digest_state`'s to say."""
        dp = self.dp
        c, s = rec.client, rec.server
        if (rec.state is not TcpState.ESTABLISHED or rec.rst_seen or c.fin_seq is not None
                or s.fin_seq is not None or c.next_seq is None or s.next_seq is None or c.data_high is None
                or s.data_high is None):
            return 0
        cid = rec.id
        if cid in dp.modes or cid in dp.http or dp.suspected(cid):
            return 0
        svc = dp.services.get(rec.service)
        be = svc.backends.get(rec.backend) if svc is not None else None
        if svc is None or be is None:
            return 0
        dirs = FPC_CLIENT if svc.kernel_target == be.name else 0
        if dp.gate is None:
            dirs |= FPC_SERVER
        return dirs

    @staticmethod
    def digest_state(rec: ConnectionRecord) -> StreamDigest | None:
        """The record's digest when compiled code may carry it on (see the module's doc)."""
        dg = rec.digest
        if (type(dg) is not StreamDigest or dg.overflow is not None or dg.resync or dg.cutter is not None
                or dg.ooo or dg.cur is None or dg.end < dg.blind_until or rec.server.isn is None
                or not isinstance(dg.cur, NativeXXH3) or len(dg.volatile) > 1
                or memsearch.implementation() != "memfind"):
            return None
        return dg

    @staticmethod
    def log_state(rec: ConnectionRecord) -> ByteLog | None:
        """The record's client log when compiled code may append to it (see the module's doc)."""
        log = rec.log
        if log is None or log.overflow is not None or log.ooo or log.fin_offset is not None or rec.client.isn is None:
            return None
        return log

    def after(self, rec: ConnectionRecord, from_client: bool) -> None:
        """The engine handled a packet of ``rec``: push what it changed, install, or remove."""
        slot = self.slots.get(rec.id)
        if slot is None:
            if self.enabled:
                dirs = self.eligible(rec)
                if dirs:
                    self._install(rec, dirs)
            return
        c, s = rec.client, rec.server
        if rec.state is not TcpState.ESTABLISHED or c.fin_seq is not None or s.fin_seq is not None:
            self.forget(rec.id)
            return
        f = self._lib.fpc_flow(self.cache, slot)  # the half that packet changed, written in place
        if f == self._ffi.NULL:  # (removal hooks make this unreachable; never trusted)
            self.slots.pop(rec.id, None)
            return
        if from_client:
            self._fill(f.client, c, rec.wscale_ok)
            self._push_log(slot, rec)
        else:
            self._fill(f.server, s, rec.wscale_ok)
            self._push_digest(slot, rec)

    def _install(self, rec: ConnectionRecord, dirs: int) -> None:
        ffi, f = self._ffi, self._spec
        v6 = is_v6(rec.client_ip)
        n = 16 if v6 else 4
        f.conn_id = rec.id
        f.family = 6 if v6 else 4
        f.dirs = dirs
        ffi.memmove(f.client_addr, pack(rec.client_ip), n)
        ffi.memmove(f.vip, pack(rec.vip), n)
        ffi.memmove(f.backend_addr, pack(rec.backend_ip), n)
        f.client_port, f.vport, f.backend_port = rec.client_port, rec.vport, rec.backend_port
        scaled = rec.wscale_ok
        self._fill(f.client, rec.client, scaled)
        self._fill(f.server, rec.server, scaled)
        d = f.dg
        d.state = ffi.NULL
        dg = self.digest_state(rec) if dirs & FPC_SERVER else None
        if dg is not None:
            assert rec.server.isn is not None and isinstance(dg.cur, NativeXXH3)
            pattern, vlen = VOLATILE[dg.volatile[0]] if dg.volatile else (b"", 0)
            d.plen, d.vlen = len(pattern), vlen
            ffi.memmove(d.pattern, pattern, len(pattern))
            d.base_seq = seq_add(rec.server.isn, 1)
            d.limit = STREAM_LIMIT
            d.state, d.end, d.grid, d.left = dg.cur.address, dg.end, dg.grid, dg.mask.left
            tail = dg.mask.tail
            ffi.memmove(d.tail, tail, len(tail))
            d.ntail = len(tail)
            f.dirs = dirs | FPC_SERVER_DATA
        log = self.log_state(rec) if dirs & FPC_CLIENT else None
        if log is not None:
            assert rec.client.isn is not None
            f.lg.base_seq = seq_add(rec.client.isn, 1)
            f.lg.end, f.lg.room = log.end, log.limit - len(log.data)
            f.dirs |= FPC_CLIENT_DATA
        slot = self._lib.fpc_install(self.cache, f)
        if slot >= 0:
            self.slots[rec.id] = slot

    @staticmethod
    def _fill(fh: Any, h: HalfConnection, scaled: bool) -> None:
        assert h.next_seq is not None
        fh.next_seq = h.next_seq
        fh.has_ack = h.ack is not None
        fh.ack = h.ack or 0
        fh.tsval = h.tsval or 0
        fh.has_tsval = h.tsval is not None
        fh.ts_recent = h.ts_recent or 0
        fh.has_ts_recent = h.ts_recent is not None
        fh.window_raw = h.window_raw
        fh.window = h.window
        fh.max_window = h.max_window
        fh.shift = (h.wscale or 0) if scaled else 0
        fh.segments = h.segments
        fh.out_of_window = h.out_of_window
        fh.data_high = h.data_high or 0
        fh.retransmissions = h.retransmissions


    def _push_log(self, slot: int, rec: ConnectionRecord) -> None:
        """The client's log after the engine appended to it: carried on here, or no longer."""
        log = self.log_state(rec)
        if log is None:
            self._lib.fpc_set_log(self.cache, slot, 0, 0, 0)
        else:
            self._lib.fpc_set_log(self.cache, slot, 1, log.end, log.limit - len(log.data))

    def _push_digest(self, slot: int, rec: ConnectionRecord) -> None:
        """The server's digest after the engine fed it: carried on here, or no longer."""
        dg = self.digest_state(rec)
        if dg is None or not isinstance(dg.cur, NativeXXH3):
            self._lib.fpc_set_digest(self.cache, slot, self._ffi.NULL, 0, 0, 0, b"", 0)
            return
        tail = dg.mask.tail
        self._lib.fpc_set_digest(self.cache, slot, dg.cur.address, dg.end, dg.grid, dg.mask.left, tail, len(tail))

    # --- after the cache has seen a batch ------------------------------------------------------
    def sync(self, now: float, fast_packets: list[memoryview] | None = None) -> int:
        """Copy the touched flows into their records (see the module's doc); how many flows."""
        lib, cache, dp = self._lib, self.cache, self.dp
        n = lib.fpc_touched(cache, self._touched)
        if n:
            table, counters, store = dp.table, dp.counters, dp.store
            k = lib.fpc_staged(cache, self._staged, self._arena)
            if k:  # client bytes logged by the fast path, in order: into their logs
                staged, arena, buffer = self._staged[0], self._arena[0], self._ffi.buffer
                for i in range(k):
                    sg = staged[i]
                    rec = self._record(sg.slot)
                    if rec is not None and rec.log is not None:
                        rec.log.add(sg.offset, buffer(arena + sg.at, sg.len))
            k = lib.fpc_chunks(cache, self._chunks)
            if k:  # chunks the fast path finished, in order: onto their digests
                chunks = self._chunks[0]
                for i in range(k):
                    ch = chunks[i]
                    rec = self._record(ch.slot)
                    if rec is not None and isinstance(rec.digest, StreamDigest):
                        rec.digest.chunks.append(bytes(self._ffi.buffer(ch.digest, 16)))
                        rec.digest.bounds.append(ch.bound)
            slots = self._touched[0]
            for j in range(n):
                f = lib.fpc_flow(cache, slots[j])
                rec = None if f == self._ffi.NULL else table.by_id(f.conn_id)
                if rec is None:  # (removal hooks make this unreachable; never trusted)
                    continue
                cp, sp = f.client_packets, f.server_packets
                if cp:
                    _pull(rec.client, f.client, now)
                    counters.client_packets += cp
                    counters.kernel_rewrites += cp
                    if f.lg.bytes:
                        dp.services[rec.service].backends[rec.backend].bytes_from_client += f.lg.bytes
                    if store is not None:
                        store.touch(rec)
                    elif rec.log is not None:  # memory: logged is committed (the engine's rule)
                        rec.commit_offset = rec.log.end
                        rec.commit_fin = rec.log.fin_offset is not None and rec.log.fin_offset == rec.commit_offset
                if sp:
                    _pull(rec.server, f.server, now)
                    counters.server_packets += sp
                    d = f.dg
                    if d.bytes:
                        dp.services[rec.service].backends[rec.backend].bytes_from_server += d.bytes
                        dg = rec.digest
                        if f.dirs & FPC_SERVER_DATA and isinstance(dg, StreamDigest):
                            dg.end = d.end
                            dg.mask.tail = bytes(self._ffi.buffer(d.tail, d.ntail))
                            dg.mask.left = d.left
                rec.last_seen = now
                table.touch(rec)
            lib.fpc_synced(cache)
        if fast_packets and self.record is not None:
            record = self.record
            for p in fast_packets:
                record(p, now)
        return int(n)

    def _record(self, slot: int) -> ConnectionRecord | None:
        f = self._lib.fpc_flow(self.cache, slot)
        return None if f == self._ffi.NULL else self.dp.table.by_id(f.conn_id)

    def stats(self) -> dict[str, int | bool]:
        s = self._lib.fpc_stats(self.cache)
        out: dict[str, int | bool] = {k: int(getattr(s, k)) for k in STAT_FIELDS}
        out["flows"] = int(self._lib.fpc_count(self.cache))
        out["capacity"] = self.capacity
        out["enabled"] = self.enabled
        return out


def _pull(h: HalfConnection, fh: Any, now: float) -> None:
    h.next_seq = fh.next_seq
    if fh.has_ack:
        h.ack = fh.ack
    h.window_raw = fh.window_raw
    h.window = fh.window
    h.max_window = fh.max_window
    if fh.has_tsval:
        tsval = fh.tsval
        h.tsval = tsval
        if fh.ts_advanced:
            h.ts_last = (now, tsval)
            if h.ts_first is None:
                h.ts_first = (now, tsval)
    if fh.has_ts_recent:
        h.ts_recent = fh.ts_recent
    h.segments = fh.segments
    h.out_of_window = fh.out_of_window
    h.data_high = fh.data_high
    h.retransmissions = fh.retransmissions
