"""The per-packet engine of the gateway: classify, track, log, then the connection's mode decides.

Theory of operation
-------------------
Every packet of a service reaches :meth:`Dataplane.handle` as the bytes of an IPv4 datagram
(from an NFQUEUE binding, or from a test) together with ``now``.  It is one of:

* **client -> service** (destination a service's VIP:port).  The record is looked up by the
  client 4-tuple, or admitted (a new connection is pinned to the service's *active* backend); the
  tracker folds the segment in and its payload is appended to the connection's client byte log,
  whose end is the commit point in memory mode (the store's planner keeps it in disk mode).
* **server -> client** (source a backend's address:port), looked up by the client 4-tuple.
* anything else passes untouched (``foreign``).

Then the connection's *mode* (:mod:`.modes`: ordinary, resyncing after a restart, spliced after
a replay move — and after a restart when that move had completed (``checkpoint.splice``) —, held
while the agents move its endpoint, resumed from the wire) returns the verdict: one path per
packet.  Packets to the client pass the delayed-ACK gate
(:mod:`.gate`) when a disk store is configured.  Packets that cannot be parsed are counted by
reason and accepted or dropped per ``gateway.on_malformed``.

Sans-I/O: ``handle(buf, now)`` only reads and rewrites ``buf``.  What the gateway must send is
appended to ``outbox`` (segments to build) and ``raw_out`` (whole packets); what the controller
must act on comes out of :meth:`Dataplane.next_event` as typed events (:mod:`.events`); when the
engine next needs to run without a packet is :meth:`Dataplane.next_deadline` (its timers are run
by :meth:`Dataplane.poll`).  The controller changes state only through the methods here
(``move``, ``reset``, ``hold``/``switch``/``release``, ``reattach``), on the one thread that owns
the gateway.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from checkpoint.addr import is_v6, pack
from checkpoint.httpreplay import HttpTrack
from checkpoint.ici import ConnectionRecord, TcpState
from checkpoint.resurrect import estimate_tsval
from checkpoint.segment import ACK, FIN, RST, SYN
from checkpoint.seqnum import seq_add, seq_diff
from checkpoint.splice import Decision, Out, Phase, Rewrite, Splice, SpliceOptions, reset_seqs
from checkpoint.state import MoveState, move_state
from checkpoint.store import CommitPlanner
from checkpoint.streamlog import ByteLog, DigestSnapshot, SampledDigest, StreamDigest
from checkpoint.table import FINISHED, ConnectionTable, Timeouts
from nfq.packet import MalformedPacket, PacketView
from nfq.queue import Verdict

from ..config import Config, FailoverConfig
from .events import (CloseSuspected, ConnectionClosed, EngineEvent, HalfOpenEvicted, HttpFallback, MoveEnded,
                     MoveStarted, MoveVerified, ResumeRefused, Suspect)
from .gate import AckGate
from .modes import ORDINARY, Held, Mode, Ordinary, Resumed, ResumedFlow, Resyncing, Spliced
from .runtime import BackendRuntime, DataplaneCounters, ServiceRuntime

FENCE_RST_INTERVAL = 1.0  # seconds between RSTs to an old primary, per connection
EVICTION_EVENT_INTERVAL = 1.0  # at most one HalfOpenEvicted event a second (a flood is one story)
NO_BACKEND = "(reset)"    # the backend of a connection the gateway reset


class FlowOffload(Protocol):
    """What the engine tells the compiled fast path (``appliance.dataplane.offload.Offload``)."""

    enabled: bool

    def after(self, rec: ConnectionRecord, from_client: bool) -> None: ...

    def clear(self) -> None: ...

    def stats(self) -> dict[str, int | bool]: ...


class ModeTable(dict[int, Mode]):
    """conn id -> its mode (absent: ordinary).  A mode decides what a connection's packets do,
    so every change is told to ``on_change`` (the offload drops the connection's flow)."""

    __slots__ = ("on_change",)

    def __init__(self) -> None:
        super().__init__()
        self.on_change: Callable[[int], None] | None = None

    def __setitem__(self, cid: int, mode: Mode) -> None:
        super().__setitem__(cid, mode)
        if self.on_change is not None:
            self.on_change(cid)

    def __delitem__(self, cid: int) -> None:
        super().__delitem__(cid)
        if self.on_change is not None:
            self.on_change(cid)

    def pop(self, cid: int, default: Any = None) -> Any:  # type: ignore[override]
        mode = super().pop(cid, default)
        if self.on_change is not None:
            self.on_change(cid)
        return mode


def apply_rewrite(pv: PacketView, rw: Rewrite) -> None:
    if rw.src is not None:
        pv.set_src(pack(rw.src))
    if rw.dst is not None:
        pv.set_dst(pack(rw.dst))
    if rw.sport is not None:
        pv.set_sport(rw.sport)
    if rw.dport is not None:
        pv.set_dport(rw.dport)
    if rw.seq is not None:
        pv.set_seq(rw.seq)
    if rw.ack is not None:
        pv.set_ack(rw.ack)
    if rw.window is not None:
        pv.set_window(rw.window)
    if rw.tsecr is not None or rw.tsval is not None:
        tsval, tsecr = pv.tsval, pv.tsecr
        if tsval is not None and tsecr is not None:
            pv.set_timestamps(rw.tsval if rw.tsval is not None else tsval,
                              rw.tsecr if rw.tsecr is not None else tsecr)
    if rw.strip_sack:
        pv.strip_sack()
    elif rw.sack is not None:
        pv.set_sack_blocks(list(rw.sack))


class Dataplane:
    def __init__(self, config: Config) -> None:
        self.config = config
        t = config.gateway.timeouts
        self.table = ConnectionTable(
            max_connections=config.gateway.max_connections,
            timeouts=Timeouts(opening=t.opening, established=t.established, closing=t.closing, finished=t.finished),
        )
        self.counters = DataplaneCounters()
        self.malformed_verdict = Verdict.DROP if config.gateway.on_malformed == "drop" else Verdict.ACCEPT
        self.services: dict[str, ServiceRuntime] = {}
        # (address bytes, port) -> the service and the VIP string of that family
        self._fronts: dict[tuple[bytes, int], tuple[ServiceRuntime, str]] = {}
        # (address bytes, port) -> the service, the backend and the VIP of the address's family
        self._backs: dict[tuple[bytes, int], tuple[ServiceRuntime, BackendRuntime, str]] = {}
        self.modes = ModeTable()   # conn id -> its mode; absent: ordinary
        # the compiled fast path's flows (appliance.dataplane.offload; None: every packet here)
        self.offload: FlowOffload | None = None
        self.http: dict[int, HttpTrack] = {}  # conn id -> its HTTP framing (replay = "http" services)
        self.outbox: list[Out] = []
        self.raw_out: list[bytearray] = []  # whole packets to send (held ACKs, re-injected segments)
        # the checkpoint store's commit planner and the delayed-ACK gate (store.mode = "disk" or "peer");
        # None: memory
        self.store: CommitPlanner | None = None
        self.gate: AckGate | None = None
        if config.store.gated:
            self.store = CommitPlanner(max_total_bytes=config.store.max_total_bytes)
            self.gate = AckGate(self.table, self.counters, self.raw_out.append,
                                lambda cid: isinstance(self.modes.get(cid), Spliced))
        self._events: deque[EngineEvent] = deque()
        self._suspected: set[int] = set()  # connections whose backend close waits for a probe
        self._ended: set[int] = set()      # connections whose ConnectionClosed was given
        self._fence_sent: dict[int, float] = {}
        # conn id -> the move state given to the store for its current splice (disk store)
        self._move_saved: dict[int, MoveState] = {}
        # conn id -> the client's segment count when its moved connection was restored, while its
        # restored digest may jump gaps (as Resyncing's for an ordinary one)
        self._restored_digest: dict[int, int] = {}
        self._evictions_reported = 0
        self._eviction_event_at = float("-inf")
        for svc in config.services:
            backends = {b.name: BackendRuntime.from_config(svc, b) for b in svc.backends}
            rt = ServiceRuntime(
                name=svc.name, vip=svc.vip, vip6=getattr(svc, "vip6", None), port=svc.port,
                backends=backends, active=svc.backends[0].name,
                failover=getattr(svc, "failover", None) or FailoverConfig(),
            )
            self.services[svc.name] = rt
            # keyed by the address bytes as they sit in the packet, either family (4 or 16 bytes)
            for vip in rt.vips:
                self._fronts[(pack(vip), rt.port)] = (rt, vip)
            for b in backends.values():
                for a in b.addresses:
                    self._backs[(pack(a), b.port)] = (rt, b, rt.front(is_v6(a)))

    # --- what the owner reads -----------------------------------------------------------
    def next_event(self) -> EngineEvent | None:
        """The oldest event the controller has not taken yet, or None."""
        return self._events.popleft() if self._events else None

    def next_deadline(self) -> float | None:
        """When :meth:`poll` must run next (the earliest timer of a move), or None."""
        times = [t for m in self.modes.values() if isinstance(m, Spliced)
                 for t in [m.splice.next_timer()] if t is not None]
        return min(times) if times else None

    def suspected(self, cid: int) -> bool:
        """Does a close of this connection's backend wait for a probe?"""
        return cid in self._suspected

    def mode_of(self, cid: int) -> Mode:
        return self.modes.get(cid, ORDINARY)

    def splice_of(self, cid: int) -> Splice | None:
        m = self.modes.get(cid)
        return m.splice if isinstance(m, Spliced) else None

    @property
    def splices(self) -> dict[int, Splice]:
        """Connections being moved or moved by replay, and their splices (a read-only view)."""
        return {cid: m.splice for cid, m in self.modes.items() if isinstance(m, Spliced)}

    @property
    def resume_holds(self) -> dict[int, Held]:
        return {cid: m for cid, m in self.modes.items() if isinstance(m, Held)}

    @property
    def resumed(self) -> dict[int, ResumedFlow]:
        out = {cid: m.flow for cid, m in self.modes.items() if isinstance(m, Resumed)}
        out.update({cid: m.resumed for cid, m in self.modes.items() if isinstance(m, Held) and m.resumed})
        return out

    @property
    def held(self) -> dict[int, bytearray]:
        """Acknowledgments held for their commit (disk store)."""
        return self.gate.held if self.gate is not None else {}

    def connections(self) -> list[ConnectionRecord]:
        return list(self.table)

    def describe_move(self, cid: int) -> dict[str, Any] | None:
        sp = self.splice_of(cid)
        return sp.describe() if sp else None

    # --- classification -------------------------------------------------------------
    def handle(self, buf: bytearray, now: float) -> Verdict:
        try:
            pv = PacketView(buf, allow_truncated=True)
        except MalformedPacket as exc:
            return self.malformed(str(exc))
        sport, dport = pv.ports
        front = self._fronts.get((pv.dst_raw, dport))
        if front is not None:
            return self._from_client(pv, front[0], front[1], sport, dport, now)
        hit = self._backs.get((pv.src_raw, sport))
        if hit is not None:
            return self._from_server(pv, hit[0], hit[1], hit[2], dport, now)
        c = self.counters
        c.foreign += 1
        c.last_foreign = f"{pv.src}:{sport} > {pv.dst}:{dport} flags={pv.flags:#x} len={pv.payload_len}"
        return Verdict.ACCEPT

    def malformed(self, why: str) -> Verdict:
        c = self.counters
        c.malformed += 1
        reason = why.split(" (")[0].split(":")[0]
        c.malformed_reasons[reason] = c.malformed_reasons.get(reason, 0) + 1
        return self.malformed_verdict

    # --- client -> service ----------------------------------------------------------------
    def _from_client(self, pv: PacketView, svc: ServiceRuntime, vip: str, sport: int, dport: int,
                     now: float) -> Verdict:
        self.counters.client_packets += 1
        if pv.truncated:  # larger than the queue copies: cannot be logged or rewritten
            return self.malformed("truncated client packet")
        key = (pv.src, sport, vip, dport)
        table = self.table
        rec = table.get(key)
        if rec is None or rec.state in (TcpState.TIME_WAIT, TcpState.CLOSED) or pv.flags & (SYN | ACK) == SYN:
            # (whether a SYN opens a new connection on the key is the table's to say: ConnectionTable.admit)
            rec = self._admit(pv, svc, key, rec, now)
            if rec is None:
                if pv.flags & RST:  # a stray RST: nothing to track, let it reach the backend
                    self.counters.untracked += 1
                    self.to_backend(pv, svc, svc.active_backend)
                    return Verdict.REWRITTEN
                self.counters.table_full_drops += 1
                return Verdict.DROP
        table.observe(rec, pv, True, now)
        if rec.state in FINISHED:
            self._closed(rec, "closed")
        ht = self.http.get(rec.id)
        if ht is not None and pv.flags & ACK and rec.server.isn is not None:
            # the acknowledgment first: with the next request it may finish the previous exchange
            ht.client_acked(seq_diff(pv.ack, seq_add(rec.server.isn, 1)))
        self._log_client(rec, pv)
        if ht is not None:
            self._http_step(rec, ht)
        if self.store is not None:
            self.store.touch(rec)
        elif rec.log is not None:  # memory: logged is committed
            rec.commit_offset = rec.log.end
            rec.commit_fin = rec.log.fin_offset is not None and rec.log.fin_offset == rec.commit_offset
        verdict = self.modes.get(rec.id, ORDINARY).client(self, rec, pv, svc, now)
        if self.offload is not None:
            self.offload.after(rec, True)
        return verdict

    def _admit(self, pv: PacketView, svc: ServiceRuntime, key: tuple[str, int, str, int],
               old: ConnectionRecord | None, now: float) -> ConnectionRecord | None:
        be = svc.active_backend
        rec = self.table.admit(key, pv, service=svc.name, backend=be.name, backend_ip=be.addr(is_v6(key[0])),
                               backend_port=be.port, now=now)
        for gone in self.table.take_evicted():
            self._forget(gone, "evicted")
        self._note_evictions(now)
        if rec is None or rec is old:
            return rec
        if old is not None:
            self._forget(old, "replaced")
        if pv.flags & SYN:
            rec.log = ByteLog(svc.failover.max_log_bytes)
            kind = SampledDigest if svc.failover.verify == "sampled" else StreamDigest
            rec.digest = kind(svc.failover.volatile)
            if svc.failover.replay == "http" and isinstance(rec.digest, StreamDigest):
                self.http[rec.id] = HttpTrack(rec.log, rec.digest)
            if self.store is not None:
                self.store.track(rec)
        return rec

    def _note_evictions(self, now: float) -> None:
        total = self.table.early_drops
        if total != self._evictions_reported and now - self._eviction_event_at >= EVICTION_EVENT_INTERVAL:
            self._events.append(HalfOpenEvicted(total - self._evictions_reported, total))
            self._evictions_reported = total
            self._eviction_event_at = now

    @staticmethod
    def _log_client(rec: ConnectionRecord, pv: PacketView) -> None:
        log = rec.log
        if log is None or rec.client.isn is None:
            return
        flags = pv.flags
        n = pv.payload_len
        start = pv.seq + (1 if flags & SYN else 0)
        off = seq_diff(start, seq_add(rec.client.isn, 1))
        if n and off >= 0:
            log.add(off, pv.payload)
        if flags & FIN and log.fin_offset is None and off >= 0:
            log.fin_offset = off + n
            s = rec.server
            if s.isn is not None:  # the data bytes the primary had sent by then (its FIN not counted)
                sent = 0 if s.data_high is None else seq_diff(s.data_high, seq_add(s.isn, 1))
                log.fin_server_offset = max(0, sent)

    def _http_step(self, rec: ConnectionRecord, ht: HttpTrack) -> None:
        """After a client packet: the framing reads the new log bytes, and the log and digest are
        trimmed when the replay point moved (not while a move still replays from them)."""
        try:
            ht.client_logged()
            if ht.fallback is None:
                mode = self.modes.get(rec.id)
                if isinstance(mode, Spliced) and not mode.verified:
                    return  # the move still replays from the log
                if ht.advance():
                    self.counters.http_trims += 1
                    if self.store is not None:
                        self.store.touch(rec)
        except Exception as exc:  # noqa: BLE001 - a tracker bug must never cost the packet its verdict
            ht.stop(f"tracker error: {type(exc).__name__}: {exc}")
        if ht.fallback is not None:
            self._http_fallback(rec, ht)

    def _http_fallback(self, rec: ConnectionRecord, ht: HttpTrack) -> None:
        if ht.reported or ht.fallback is None:
            return
        ht.reported = True
        c = self.counters
        c.http_fallbacks += 1
        reason = ": ".join(ht.fallback.split(": ")[:2]).split(" (")[0][:80]
        c.http_fallback_reasons[reason] = c.http_fallback_reasons.get(reason, 0) + 1
        self._events.append(HttpFallback(rec, ht.fallback_side, ht.fallback))

    # --- server -> client ------------------------------------------------------------------
    def _from_server(self, pv: PacketView, svc: ServiceRuntime, be: BackendRuntime, vip: str, dport: int,
                     now: float) -> Verdict:
        self.counters.server_packets += 1
        rec = self.table.get((pv.dst, dport, vip, svc.port))
        if rec is None:
            # Not tracked (table full, or expired): the kernel still translates it.
            self.counters.untracked += 1
            return Verdict.ACCEPT
        verdict = self.modes.get(rec.id, ORDINARY).server(self, rec, pv, svc, be, now)
        if self.offload is not None:
            self.offload.after(rec, False)
        return verdict

    # --- the stages the modes share ------------------------------------------------------------
    def forward(self, pv: PacketView, svc: ServiceRuntime, be: BackendRuntime) -> Verdict:
        """A client packet of an ordinary connection on its way to ``be``.  When the kernel's
        stateless rule sends the service's client packets to ``be`` anyway (``kernel_target``),
        the packet passes unchanged and the kernel rewrites it after the queue: no copy back,
        and a GSO super-packet passes whole with its checksum left to the hardware path."""
        if svc.kernel_target == be.name:
            be.bytes_from_client += pv.payload_len
            self.counters.kernel_rewrites += 1
            return Verdict.ACCEPT
        self.to_backend(pv, svc, be)
        return Verdict.REWRITTEN

    @staticmethod
    def to_backend(pv: PacketView, svc: ServiceRuntime, be: BackendRuntime) -> None:
        be.bytes_from_client += pv.payload_len
        pv.set_dst(be.raw6 if pv.version == 6 else be.raw)
        if be.port != svc.port:
            pv.set_dport(be.port)

    def observe_server(self, rec: ConnectionRecord, pv: PacketView, be: BackendRuntime, now: float) -> None:
        """Track a backend segment (in the backend's own view) and feed the stream digest."""
        be.bytes_from_server += pv.payload_len
        self.table.observe(rec, pv, False, now)
        if rec.state in FINISHED:
            self._closed(rec, "closed")
        dg = rec.digest
        if dg is not None and pv.payload_len and rec.server.isn is not None:
            off = seq_diff(pv.seq + (1 if pv.flags & SYN else 0), seq_add(rec.server.isn, 1))
            if isinstance(dg, SampledDigest):
                dg.add(off, pv.captured_payload, pv.payload_len)
            elif not pv.truncated:
                dg.add(off, pv.payload_view)  # (copied only if it must wait: out of order)
        self._http_server(rec, pv)

    def _http_server(self, rec: ConnectionRecord, pv: PacketView) -> None:
        ht = self.http.get(rec.id) if self.http else None
        if ht is None or rec.server.isn is None:
            return
        if pv.flags & FIN:
            ht.server_fin(seq_diff(pv.seq + pv.payload_len, seq_add(rec.server.isn, 1)))
        if ht.fallback is not None and not ht.reported:
            self._http_fallback(rec, ht)

    def gate_server(self, rec: ConnectionRecord, pv: PacketView, svc: ServiceRuntime | None,
                    verdict: Verdict = Verdict.ACCEPT) -> Verdict:
        """The delayed-ACK stage of a packet to the client (disk store only)."""
        if self.gate is None or rec.log is None:
            return verdict
        assert self.store is not None
        self.store.touch(rec)
        return self.gate.check(rec, pv, verdict, svc)

    def hold_close(self, rec: ConnectionRecord, svc: ServiceRuntime, be: BackendRuntime, pv: PacketView) -> Verdict:
        """A backend closes or resets a live connection: maybe it is dying.  Keep it from the
        client until a probe has spoken."""
        self.counters.held_closes += 1
        if rec.id not in self._suspected:
            self._suspected.add(rec.id)
            kind = "RST" if pv.flags & RST else "FIN"
            rst = None
            if kind == "RST":
                rst = Out(src=rec.vip, dst=rec.client_ip, sport=svc.port, dport=rec.client_port,
                          seq=pv.seq, ack=pv.ack, flags=pv.flags, to="client")
            self._events.append(CloseSuspected(Suspect(rec.id, svc.name, be.name, kind, rst)))
        return Verdict.DROP

    def release_suspect(self, s: Suspect) -> None:
        """The probe found the backend alive: its close was genuine.  Ignored when the connection
        has moved on since (a later move or switch withdrew the suspicion)."""
        rec = self.table.by_id(s.conn_id)
        if rec is None or s.conn_id not in self._suspected or rec.backend != s.backend:
            return
        self._suspected.discard(s.conn_id)
        rec.server_close_ok = True
        if s.rst is not None:
            self.outbox.append(s.rst)

    def fence(self, rec: ConnectionRecord, pv: PacketView, be: BackendRuntime, now: float) -> Verdict:
        """A packet from a backend that no longer owns the connection: dropped, and the backend
        sent a RST on the client's behalf (at most one a second)."""
        self.counters.fenced_drops += 1
        last = self._fence_sent.get(rec.id, 0.0)
        if not pv.flags & RST and now - last >= FENCE_RST_INTERVAL:
            self._fence_sent[rec.id] = now
            self.outbox.append(Out(src=rec.client_ip, dst=be.addr(is_v6(rec.client_ip)), sport=rec.client_port,
                                   dport=be.port, seq=pv.ack, ack=0, flags=RST, to="old"))
        return Verdict.DROP

    def fenced_at(self, cid: int) -> float | None:
        """When the gateway last answered a fenced backend's packet of ``cid`` with a RST."""
        return self._fence_sent.get(cid)

    def probe_target(self, rec: ConnectionRecord, target: str) -> None:
        """A segment far below ``target``'s window on ``rec``'s 4-tuple: a half-replayed socket
        there (a move caught by a takeover) answers with a duplicate ACK at its ``rcv_nxt``, which
        :meth:`fence` answers with the RST that closes it."""
        svc = self.services[rec.service]
        be = svc.backends.get(target)
        if be is None or rec.client.isn is None:
            return
        self.outbox.append(Out(src=rec.client_ip, dst=be.addr(is_v6(rec.client_ip)), sport=rec.client_port,
                               dport=be.port, seq=seq_add(rec.client.isn, -(1 << 30)), ack=0, flags=ACK, to="old"))

    def prompt(self, rec: ConnectionRecord) -> None:
        """After a takeover: one pure ACK far below each end's window, without a timestamp (no
        clock to guess): each end answers it at once with an ACK of where it is (RFC 793), and
        that ACK crosses the new active to the other end, so a sender in retransmission backoff
        (its segments and the ACKs of them died with the old active) hears at once of what
        arrived and goes on instead of waiting for its timer.  A moved connection's backend is
        not prompted (its sequence space is the splice's)."""
        cn, sn = rec.client.next_seq, rec.server.next_seq
        if rec.state is not TcpState.ESTABLISHED or cn is None or sn is None:
            return
        svc = self.services[rec.service]
        self.outbox.append(Out(src=rec.vip, dst=rec.client_ip, sport=svc.port, dport=rec.client_port,
                               seq=seq_add(sn, -(1 << 30)), ack=cn, flags=ACK, window=rec.server.window or 0,
                               to="client"))
        be = svc.backends.get(rec.backend)
        if be is not None and not isinstance(self.modes.get(rec.id), Spliced):
            self.outbox.append(Out(src=rec.client_ip, dst=be.addr(is_v6(rec.client_ip)), sport=rec.client_port,
                                   dport=be.port, seq=seq_add(cn, -(1 << 30)), ack=sn, flags=ACK,
                                   window=rec.client.window or 0, to="old"))

    def after_reset(self, rec: ConnectionRecord, pv: PacketView, svc: ServiceRuntime, now: float) -> Verdict:
        """A client packet of a connection the gateway reset: dropped, and answered with a RST at
        exactly the sequence it acknowledges (RFC 5961: the RST sent at the reset may have been
        in the window but not at rcv_nxt, and the client answered it with a challenge ACK; this
        one it accepts).  At most one every :data:`FENCE_RST_INTERVAL` / 10 per connection."""
        if rec.rst_from == "gateway" and pv.flags & ACK and not pv.flags & RST:
            last = self._fence_sent.get(rec.id, 0.0)
            if now - last >= FENCE_RST_INTERVAL / 10:
                self._fence_sent[rec.id] = now
                self.outbox.append(Out(src=rec.vip, dst=rec.client_ip, sport=svc.port, dport=rec.client_port,
                                       seq=pv.ack, ack=0, flags=RST, to="client"))
        return Verdict.DROP

    def set_mode(self, rec: ConnectionRecord, mode: Mode | None) -> None:
        if mode is None or mode is ORDINARY:
            self.modes.pop(rec.id, None)
        else:
            self.modes[rec.id] = mode

    def refuse_resume(self, rec: ConnectionRecord, why: str, now: float) -> None:
        self.reset(rec, now)
        self._events.append(ResumeRefused(rec, why))

    # --- moved connections (replay) -------------------------------------------------------------
    def apply(self, pv: PacketView, d: Decision, mode: Spliced, now: float,
              observe_rec: ConnectionRecord | None = None) -> Verdict:
        """Carry out a splice's decision on a packet of its connection."""
        self.outbox.extend(d.inject)
        self._after_splice_step(mode)
        if not d.forward:
            return Verdict.DROP
        if d.rewrite is not None:
            apply_rewrite(pv, d.rewrite)
        if observe_rec is None:
            return Verdict.REWRITTEN
        # a backend segment, now in the client's view
        self.table.observe(observe_rec, pv, False, now)
        if observe_rec.state in FINISHED:
            self._closed(observe_rec, "closed")
        dg = observe_rec.digest
        if dg is not None and pv.payload_len and observe_rec.server.isn is not None:
            off = seq_diff(pv.seq, seq_add(observe_rec.server.isn, 1))
            if isinstance(dg, SampledDigest):
                dg.add(off, pv.payload, pv.payload_len)
            else:
                dg.add(off, pv.payload)
        if self._restored_digest:
            self._settle_restored_digest(observe_rec)
        self._http_server(observe_rec, pv)
        return self.gate_server(observe_rec, pv, None, Verdict.REWRITTEN)

    def _after_splice_step(self, mode: Spliced) -> None:
        sp = mode.splice
        if not sp.active:
            self._end_splice(sp.rec, mode)
        elif not mode.verified and sp.phase is Phase.SPLICED and sp.verifier.done:
            mode.verified = True
            self._events.append(MoveVerified(sp))
        if self.store is not None and sp.active:
            saved = self._move_saved.get(sp.rec.id)
            if (saved is None or saved.phase != "spliced" or saved.backend_fin_end != sp.b_fin_end) and sp.steady:
                self._persist_move(sp)  # the move completed (or the backup sent its FIN): into the checkpoint

    def _persist_move(self, sp: Splice) -> None:
        """Give the store the move state of ``sp`` (``checkpoint.splice``: a restart of the gateway)."""
        if self.store is None:
            return
        st = sp.persisted()
        self._move_saved[sp.rec.id] = st
        self.store.set_move(sp.rec.id, move_json(st))

    def _settle_restored_digest(self, rec: ConnectionRecord) -> None:
        """A restored moved connection's digest jumps gaps until it has passed what the client
        acknowledged after the restart (as ``Resyncing`` ends it for an ordinary one)."""
        seen = self._restored_digest.get(rec.id)
        if seen is None:
            return
        dg = rec.digest
        if not isinstance(dg, StreamDigest) or not dg.resync:
            del self._restored_digest[rec.id]
            return
        if rec.client.segments <= seen or rec.client.ack is None or rec.server.isn is None:
            return  # nothing heard from the client since the restart
        if dg.end >= seq_diff(rec.client.ack, seq_add(rec.server.isn, 1)):
            dg.resync = False
            del self._restored_digest[rec.id]

    def _end_splice(self, rec: ConnectionRecord, mode: Spliced) -> None:
        """The one way a splice ends: out of the modes, an event, and a failed one's connection
        disowned (whatever a backend still sends for it is fenced)."""
        sp = mode.splice
        if sp.active:
            sp.phase = Phase.CLOSED
        if self.modes.get(rec.id) is mode:
            del self.modes[rec.id]
        self._events.append(MoveEnded(sp, mode.verified))
        if sp.phase is Phase.FAILED:
            self._disown(rec)
            self._closed(rec, "reset")
        elif sp.reset_by is not None:
            # reset through the splice: its translation goes with it, so whatever the backend
            # still had in flight (data, a FIN) must not reach the client untranslated: fenced
            rec.backend = NO_BACKEND
            self.table.reindex(rec)

    def move(self, rec: ConnectionRecord, target: BackendRuntime, now: float) -> Splice:
        """Start moving ``rec`` to ``target`` (replay).  Raises ValueError with the reason when it
        cannot be moved (the caller resets it then), LookupError when it needed no replay (its
        SYN was never answered: re-pinned to ``target``; or it is finished, TIME_WAIT or CLOSED:
        nothing to move, left as it is, no SYN to the backup).  Every other state moves: see the
        theory of operation of :mod:`checkpoint.splice` for SYN_RECV and the closing states."""
        if rec.state in FINISHED:
            raise LookupError(f"finished ({rec.state.value}): nothing to move")
        svc = self.services[rec.service]
        reason = rec.unprotected_reason
        if reason is None and rec.client.isn is not None and rec.server.ack is not None and rec.log is not None:
            # I1: the server must not have acknowledged bytes the log lacks
            acked = seq_diff(rec.server.ack, seq_add(rec.client.isn, 1))
            have = rec.log.end + (1 if rec.log.fin_offset is not None else 0)
            if acked > have:
                reason = f"server acknowledged {acked} client bytes, the log has {have}"
        if reason is not None:
            raise ValueError(f"unprotected: {reason}")
        if rec.server.isn is None:
            # the old backend never answered the SYN: the client's retransmitted SYN goes to the new one
            rec.backend, rec.backend_ip, rec.backend_port = target.name, target.addr(is_v6(rec.client_ip)), target.port
            rec.moves += 1
            raise LookupError("not yet established: re-pinned without replay")
        if rec.log is None or rec.digest is None:
            raise ValueError("unprotected: no client log")
        old = svc.backends[rec.backend]
        prev = self.modes.get(rec.id)
        if isinstance(prev, Spliced):  # moved before: that splice ends here, the new one starts from the client's view
            self._end_splice(rec, prev)
        # tcpcp 6.1: the record may be behind the wire (a restart, an imported checkpoint, or
        # simply the time since the last server packet): the client's view of the server's
        # clock starts from a conservative estimate of where that clock is now
        floor = estimate_tsval(rec.server, rec.last_seen, now) if rec.ts_ok else None
        snap = rec.digest.snapshot()
        ht = self.http.get(rec.id)
        plan = None
        if ht is not None and isinstance(snap, DigestSnapshot):
            acked = seq_diff(rec.client.ack, seq_add(rec.server.isn, 1)) if rec.client.ack is not None else 0
            try:
                plan = ht.plan(snap, max(0, acked))
            except Exception as exc:  # noqa: BLE001 - a planner bug: the stream replay from the point
                ht.stop(f"planner error: {type(exc).__name__}: {exc}")
                plan = ht.plan(snap, max(0, acked))
        v6 = is_v6(rec.client_ip)
        sp = Splice(rec, rec.log, snap, vip=rec.vip, vport=svc.port, old=old.endpoint(v6),
                    target=target.endpoint(v6), now=now, ts_floor=floor, plan=plan,
                    options=SpliceOptions(syn_retries=svc.failover.syn_retries, move_timeout=svc.failover.move_timeout))
        # the splice owns the connection before anything points it at the target: from here on
        # every packet of it, either way, goes through the splice
        self.modes[rec.id] = Spliced(sp)
        self._suspected.discard(rec.id)
        self._restored_digest.pop(rec.id, None)
        self._persist_move(sp)  # under way: a restart before it completes resets it (checkpoint.splice)
        self._events.append(MoveStarted(sp))
        self.outbox.extend(sp.start(now))
        rec.backend, rec.backend_ip, rec.backend_port = target.name, target.addr(is_v6(rec.client_ip)), target.port
        rec.moves += 1
        rec.server_close_ok = False
        return sp

    def reset(self, rec: ConnectionRecord, now: float) -> None:
        """Reset a connection cleanly on both sides (the client and its backend)."""
        svc = self.services[rec.service]
        be = svc.backends.get(rec.backend)
        for seq in reset_seqs(rec):  # (RFC 5961: see reset_seqs and after_reset)
            self.outbox.append(Out(src=rec.vip, dst=rec.client_ip, sport=svc.port, dport=rec.client_port,
                                   seq=seq, ack=rec.client.next_seq or 0, flags=RST | ACK, to="client"))
        if be is not None and rec.server.ack is not None:
            self.outbox.append(Out(src=rec.client_ip, dst=be.addr(is_v6(rec.client_ip)), sport=rec.client_port,
                                   dport=be.port, seq=rec.server.ack, ack=0, flags=RST, to="old"))
        mode = self.modes.pop(rec.id, None)
        if isinstance(mode, Spliced):
            self._end_splice(rec, mode)
        self._suspected.discard(rec.id)
        self._disown(rec)
        rec.closed_at = now
        self._closed(rec, "reset")

    def _closed(self, rec: ConnectionRecord, why: str) -> None:
        if rec.id not in self._ended:
            self._ended.add(rec.id)
            self._events.append(ConnectionClosed(rec, why))

    def _disown(self, rec: ConnectionRecord) -> None:
        """The gateway reset this connection: no backend owns it any more, so whatever a backend
        still sends for it is fenced."""
        rec.rst_seen = True
        rec.rst_from = "gateway"
        rec.state = TcpState.CLOSED
        rec.backend = NO_BACKEND
        self.table.reindex(rec)  # finished: the first to make room in a full table

    # --- timers and expiry ----------------------------------------------------------------------
    def poll(self, now: float) -> None:
        """Run the timers of the moves under way (see :meth:`next_deadline`)."""
        for mode in [m for m in self.modes.values() if isinstance(m, Spliced)]:
            self.outbox.extend(mode.splice.poll(now))
            self._after_splice_step(mode)

    def expire(self, now: float) -> list[ConnectionRecord]:
        """Drop idle and finished records, and end the moves of those that moved."""
        gone = self.table.expire(now)
        for rec in gone:
            self._forget(rec, "idle")
        self._note_evictions(now)  # the tail of a flood that no later admission reported
        return gone

    def _forget(self, rec: ConnectionRecord, why: str) -> None:
        """``rec`` leaves the table: its mode, held ACKs, suspicion and store rows go with it."""
        self._closed(rec, why)  # (a no-op for one that closed before)
        self._ended.discard(rec.id)
        mode = self.modes.pop(rec.id, None)
        if isinstance(mode, Spliced):
            self._end_splice(rec, mode)
        if self.gate is not None:
            self.gate.forget(rec.id)
        self._suspected.discard(rec.id)
        self._fence_sent.pop(rec.id, None)
        self._move_saved.pop(rec.id, None)
        self._restored_digest.pop(rec.id, None)
        self.http.pop(rec.id, None)
        if self.store is not None:
            self.store.forget(rec.id)

    def drop_all(self, why: str) -> int:
        """Forget every connection without sending anything for it (a fenced node of a pair: a
        newer epoch owns them); how many."""
        recs = list(self.table)
        for rec in recs:
            self.table.drop(rec)
            self._forget(rec, why)
        self.outbox.clear()
        self.raw_out.clear()
        if self.store is not None:   # nothing of them is written here any more
            self.store.dirty.clear()
            self.store.forgotten.clear()
            self.store.in_flight = None
        return len(recs)

    # --- the checkpoint store ------------------------------------------------------------------
    def committed(self, recs: list[ConnectionRecord]) -> None:
        """Commit points moved (the store's batch is durable): release the ACKs they cover."""
        if self.gate is not None:
            self.gate.committed(recs)

    def gate_outbox(self) -> None:
        """I1 for the segments the gateway itself sends to clients."""
        if self.gate is not None:
            self.gate.clamp_outbox(self.outbox)

    def reattach(self, rec: ConnectionRecord, now: float, move: MoveState | None = None,
                 bypass_possible: bool = True) -> bool:
        """A connection read back from the checkpoint store (a restart) or imported.  ``move``:
        the completed move of a connection moved by replay (phase "spliced"): it is restored
        spliced to its backup (``checkpoint.splice``, a restart of the gateway), and a
        MoveStarted tells the controller of its flow (the kernel's moved set).  Raises ValueError
        (nothing attached) for a move that cannot be restored."""
        svc = self.services[rec.service]
        if move is not None and (move.phase != "spliced" or rec.log is None or rec.client.isn is None
                                 or rec.server.isn is None):
            why = (f"the move was under way ({move.phase})" if move.phase != "spliced"
                   else "no client log" if rec.log is None else "its handshake is unknown")
            raise ValueError(f"its move cannot be restored: {why}")
        if not self.table.restore(rec):
            return False
        if rec.log is not None:
            rec.log.limit = svc.failover.max_log_bytes
        if self.store is not None:
            self.store.adopt(rec, now, move_json(move) if move is not None else None)
        if svc.failover.replay == "http" and isinstance(rec.digest, StreamDigest) and rec.log is not None:
            ht = HttpTrack(rec.log, rec.digest)  # its framing is not in the checkpoint: stream replay from the point
            self.http[rec.id] = ht
            ht.reported = True
        resync = isinstance(rec.digest, StreamDigest) and rec.digest.resync
        if move is not None and rec.log is not None:
            sp = Splice.restore(rec, rec.log, move, vip=rec.vip, vport=svc.port, now=now,
                                options=SpliceOptions(syn_retries=svc.failover.syn_retries,
                                                      move_timeout=svc.failover.move_timeout))
            self.modes[rec.id] = Spliced(sp, verified=True)
            self._move_saved[rec.id] = move
            if resync:
                self._restored_digest[rec.id] = rec.client.segments
            self._events.append(MoveStarted(sp))
            return True
        self.modes[rec.id] = Resyncing(first_packet=rec.log is not None, bypass_possible=bypass_possible,
                                       client_segments=rec.client.segments if resync else None)
        return True

    # --- resume mode: endpoints moved by the agents ----------------------------------------
    def hold(self, rec: ConnectionRecord, now: float) -> None:
        """Isolate ``rec`` while its endpoint moves: client packets are logged and dropped (kept
        for re-injection), backend packets dropped."""
        mode = self.modes.get(rec.id)
        if isinstance(mode, Spliced):
            raise ValueError(f"connection {rec.id} is being replayed to {rec.backend}")
        if isinstance(mode, Held):
            return
        self.modes[rec.id] = Held(since=now, origin=rec.backend,
                                  resumed=mode.flow if isinstance(mode, Resumed) else None)

    def switch(self, rec: ConnectionRecord, target: BackendRuntime) -> None:
        """Point ``rec``'s forwarding at ``target``: the address rewrite only, the sequence space
        stays the client's (the endpoint was re-created with the same numbers).  The kernel NAT
        gives the return path the VIP."""
        rec.backend, rec.backend_ip, rec.backend_port = target.name, target.addr(is_v6(rec.client_ip)), target.port
        rec.server_close_ok = False
        self._suspected.discard(rec.id)

    def release(self, rec: ConnectionRecord) -> int:
        """End ``rec``'s hold: the client segments kept while it was held go to its (new) backend
        now, through the injector.  Returns how many."""
        h = self.modes.get(rec.id)
        if not isinstance(h, Held):
            return 0
        self.set_mode(rec, Resumed(flow=h.resumed) if h.resumed is not None else None)
        svc = self.services[rec.service]
        be = svc.backends.get(rec.backend)
        if be is None:
            return 0
        segments = h.held + ([h.last_ack] if h.last_ack is not None else [])
        for buf in segments:
            pv = PacketView(buf)
            if h.resumed is not None:
                h.resumed.absorb(self, pv)
            self.to_backend(pv, svc, be)
            self.raw_out.append(buf)
        return len(segments)

    def resumed_from_wire(self, rec: ConnectionRecord, snd_nxt: int) -> None:
        """``rec`` was re-created from the wire checkpoint with its send sequence at ``snd_nxt``:
        absorb client ACKs above the new sender's ``snd_nxt`` (I6) until it has passed what the
        old one was seen to send."""
        until = rec.server.next_seq if rec.server.next_seq is not None else snd_nxt
        if rec.client.ack is not None and seq_diff(rec.client.ack, until) > 0:
            until = rec.client.ack
        rf = ResumedFlow(snd_nxt=snd_nxt, until=until)
        mode = self.modes.get(rec.id)
        if isinstance(mode, Held):
            mode.resumed = rf
        else:
            self.modes[rec.id] = Resumed(flow=rf)

    def forget_resumed(self, rec: ConnectionRecord) -> None:
        """The wire resume was rolled back: no more I6 absorption for ``rec``."""
        mode = self.modes.get(rec.id)
        if isinstance(mode, Held):
            mode.resumed = None
        elif isinstance(mode, Resumed):
            self.set_mode(rec, None)


def move_json(st: MoveState) -> str:
    """A move state as the store keeps it."""
    return json.dumps(move_state(st), separators=(",", ":"))


__all__ = ["Dataplane", "apply_rewrite", "move_json", "NO_BACKEND", "FENCE_RST_INTERVAL", "Ordinary"]
