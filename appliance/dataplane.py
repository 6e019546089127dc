"""The per-packet logic of the gateway: classify, track, protect, translate.

Theory of operation
-------------------
Every packet of a service reaches :meth:`Dataplane.handle` as the bytes of
an IPv4 datagram (from an NFQUEUE binding, or from a test).  It is one of:

* **client -> service** (queue ``queue_num``, full copy): destination is a
  service's VIP:port.  The record is looked up by the client 4-tuple, or
  admitted (a new connection is pinned to the service's *active* backend);
  the tracker folds the segment in and its payload is appended to the
  connection's client byte log.  An ordinary connection's packet then gets
  its destination rewritten to the backend; a moved one goes through its
  :class:`~checkpoint.splice.Splice` (translated, or dropped while the
  backup is being caught up).
* **server -> client** (queue ``queue_num + 1``, full copy): source is a
  backend's address:port.  For an ordinary connection the tracker folds it
  in, its payload goes into the stream digest, and it passes unchanged: the
  kernel rewrites its source to the VIP (``nfq.kernelnat``).  A FIN or RST
  from the backend is held back (dropped) and reported as a *suspect* until a
  health probe says the backend is alive (then the FIN's retransmission is let
  through, or the RST is re-sent): a server that was killed closes its
  connections, and the client must not see that.  Packets of a moved
  connection from its new backend go through the splice; packets from a
  backend that no longer owns the connection are dropped (fenced) and answered
  with a RST on the client's behalf.
* anything else passes untouched (``foreign``).

**Delayed acknowledgments** (tcpcp 6.2, invariant I1).  With a checkpoint
store on disk (``store.mode = "disk"``, :mod:`checkpoint.store`) a logged
client byte is safe only once its group commit is durable, so the client must
not be told earlier that it arrived.  Every packet to the client is checked
against the connection's commit point: a segment carrying data (or a FIN, or
a RST) has its ACK field clamped to the commit point and SACK blocks above it
stripped; a pure ACK or a SYN-ACK above it is held — the newest one per
connection — and sent by the gateway when the commit catches up (its source
rewritten to the VIP, its TSval raised to the newest the client saw, its ACK
the commit point if that is still lower).  The return path is then always
held with full copies (``queue_num + 1``).  With ``store.mode = "memory"`` the
commit point is the log's end and nothing is ever held.

**Resume mode** (``failover.mode = "resume"``, :mod:`appliance.resume`).  A
connection whose endpoint is being moved by the backends' agents is *held*
(:meth:`Dataplane.hold`): its client packets are tracked and logged as
always, then dropped (those carrying data, FIN or RST are kept, to be
re-injected at :meth:`Dataplane.release`), and its backend packets are
dropped, so neither end sees the other while the socket is in repair mode.
:meth:`Dataplane.switch` re-points the connection at the new backend: an
address rewrite only, the sequence space is the same.  A connection
re-created from the *wire* checkpoint (after a failure) starts sending at
what the client had acknowledged; the client may have received more from the
dead backend, so its ACKs above the new sender's ``snd_nxt`` are accepted and
lowered to it (tcpcp 6.1, invariant I6, :func:`checkpoint.resurrect.absorb_ack`)
until the new sender has passed everything the old one sent.

Packets that cannot be parsed are counted by reason and accepted or dropped
per ``gateway.on_malformed``.  Segments the gateway must send (replay,
acknowledgments, resets) are appended to ``outbox``, which the I/O layer
drains after each batch.  Sans-I/O: ``handle(buf, now)`` only reads and
rewrites ``buf``.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

from checkpoint.ici import ConnectionRecord, TcpState
from checkpoint.segment import ACK, FIN, RST, SYN
from checkpoint.seqnum import seq_add, seq_diff
from checkpoint.store import CommitPlanner
from checkpoint.splice import Decision, Endpoint, Out, Rewrite, Splice, SpliceOptions
from checkpoint.streamlog import ByteLog, SampledDigest, StreamDigest
from checkpoint.table import ConnectionTable, Timeouts
from nfq.build import tcp_options, tcp_packet
from nfq.packet import MalformedPacket, PacketView
from nfq.queue import Verdict

from .config import BackendConfig, Config, FailoverConfig, ServiceConfig

FENCE_RST_INTERVAL = 1.0  # seconds between RSTs to an old primary, per connection
MAX_HELD_SEGMENTS = 256   # client segments with data kept per held connection (resume mode)
NO_BACKEND = "(reset)"    # the backend of a connection the gateway reset


@dataclass
class BackendRuntime:
    name: str
    service: str
    address: str
    port: int
    raw: bytes
    admin_state: str = "ready"

    @classmethod
    def from_config(cls, svc: ServiceConfig, b: BackendConfig) -> "BackendRuntime":
        return cls(name=b.name, service=svc.name, address=b.address, port=b.port,
                   raw=socket.inet_aton(b.address), admin_state=getattr(b, "admin_state", "ready"))

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.name, self.address, self.port)


@dataclass
class ServiceRuntime:
    name: str
    vip: str
    port: int
    vip_raw: bytes
    backends: dict[str, BackendRuntime]
    active: str
    failover: FailoverConfig

    @property
    def active_backend(self) -> BackendRuntime:
        return self.backends[self.active]


@dataclass
class Suspect:
    """A backend closed (FIN) or reset (RST) a connection; held until probed."""

    conn_id: int
    service: str
    backend: str
    kind: str               # "FIN" or "RST"
    rst: Out | None = None  # the RST to re-send to the client if the backend is fine


@dataclass
class ResumeHold:
    """A connection isolated while the agents move its endpoint (resume mode)."""

    since: float
    origin: str             # the backend the endpoint leaves: its packets are dropped while held
    held: list[bytearray] = field(default_factory=list)  # client segments with data/FIN/RST, to re-inject
    last_ack: bytearray | None = None  # the newest pure ACK (it may answer the new endpoint's window probe)
    client_drops: int = 0
    server_drops: int = 0


@dataclass
class ResumedFlow:
    """A connection re-created from the wire checkpoint: its new sender starts
    at ``snd_nxt``, below what the client may already have (I6)."""

    snd_nxt: int          # the new sender's next sequence number, as seen on the wire
    until: int            # the highest sequence the old sender was seen to send: absorb until passed
    absorbed: int = 0     # client ACKs lowered
    ahead: int = 0        # the most the client was ahead of the new sender, in bytes


@dataclass
class DataplaneCounters:
    malformed: int = 0
    foreign: int = 0
    untracked: int = 0
    table_full_drops: int = 0
    fenced_drops: int = 0
    resume_held_drops: int = 0  # packets of connections held while their endpoint moves (resume mode)
    acks_absorbed: int = 0      # I6: client ACKs above a resumed sender's snd_nxt, lowered to it
    acks_clamped: int = 0     # I1: data segments whose ACK field was lowered to the commit point
    acks_held: int = 0        # I1: pure ACKs / SYN-ACKs held until their commit
    acks_released: int = 0    # held ones sent by the gateway
    held_closes: int = 0
    client_packets: int = 0
    server_packets: int = 0
    malformed_reasons: dict[str, int] = field(default_factory=dict)
    last_foreign: str | None = None  # what the last packet we had no business with looked like

    def as_dict(self) -> dict[str, object]:
        return {
            "malformed": self.malformed,
            "foreign": self.foreign,
            "untracked": self.untracked,
            "table_full_drops": self.table_full_drops,
            "fenced_drops": self.fenced_drops,
            "resume_held_drops": self.resume_held_drops,
            "acks_absorbed": self.acks_absorbed,
            "acks_clamped": self.acks_clamped,
            "acks_held": self.acks_held,
            "acks_released": self.acks_released,
            "held_closes": self.held_closes,
            "client_packets": self.client_packets,
            "server_packets": self.server_packets,
            "malformed_reasons": dict(self.malformed_reasons),
            "last_foreign": self.last_foreign,
        }


def apply_rewrite(pv: PacketView, rw: Rewrite) -> None:
    if rw.src is not None:
        pv.set_src(socket.inet_aton(rw.src))
    if rw.dst is not None:
        pv.set_dst(socket.inet_aton(rw.dst))
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
        if tsval is not None:
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
        self._fronts: dict[tuple[bytes, int], ServiceRuntime] = {}
        self._backs: dict[tuple[bytes, int], tuple[ServiceRuntime, BackendRuntime]] = {}
        self.splices: dict[int, Splice] = {}
        self.outbox: list[Out] = []
        self.raw_out: list[bytearray] = []  # whole packets to send (held ACKs)
        # the checkpoint store's commit planner (store.mode = "disk"), None: memory
        self.store: CommitPlanner | None = None
        if config.store.mode == "disk":
            self.store = CommitPlanner(max_total_bytes=config.store.max_total_bytes)
        self.held: dict[int, bytearray] = {}  # conn id -> newest held ACK, in the client's view
        self.reloaded: set[int] = set()       # re-attached after a restart, no backend packet seen yet
        self.resume_refusals: list[tuple[ConnectionRecord, str]] = []  # reset on their first packet (tcpcp 6.1)
        self.resyncing: dict[int, int] = {}   # restored digests still jumping gaps: client segments at restore
        self.suspects: list[Suspect] = []
        self.finished_splices: list[Splice] = []
        self.resume_holds: dict[int, ResumeHold] = {}  # resume mode: connections isolated while moving
        self.resumed: dict[int, ResumedFlow] = {}       # resume mode: I6 absorption after a wire resume
        self._fence_sent: dict[int, float] = {}
        for svc in config.services:
            backends = {b.name: BackendRuntime.from_config(svc, b) for b in svc.backends}
            rt = ServiceRuntime(
                name=svc.name, vip=svc.vip, port=svc.port, vip_raw=socket.inet_aton(svc.vip),
                backends=backends, active=svc.backends[0].name,
                failover=getattr(svc, "failover", None) or FailoverConfig(),
            )
            self.services[svc.name] = rt
            self._fronts[(rt.vip_raw, rt.port)] = rt
            for b in backends.values():
                self._backs[(b.raw, b.port)] = (rt, b)

    # --- classification -------------------------------------------------------------
    def handle(self, buf: bytearray, now: float) -> Verdict:
        try:
            pv = PacketView(buf, allow_truncated=True)
        except MalformedPacket as exc:
            return self._malformed(str(exc))
        sport, dport = pv.ports
        svc = self._fronts.get((bytes(buf[16:20]), dport))
        if svc is not None:
            return self._from_client(pv, svc, sport, dport, now)
        hit = self._backs.get((bytes(buf[12:16]), sport))
        if hit is not None:
            return self._from_server(pv, hit[0], hit[1], dport, now)
        c = self.counters
        c.foreign += 1
        c.last_foreign = f"{pv.src}:{sport} > {pv.dst}:{dport} flags={pv.flags:#x} len={pv.payload_len}"
        return Verdict.ACCEPT

    def _malformed(self, why: str) -> Verdict:
        c = self.counters
        c.malformed += 1
        reason = why.split(" (")[0].split(":")[0]
        c.malformed_reasons[reason] = c.malformed_reasons.get(reason, 0) + 1
        return self.malformed_verdict

    # --- client -> service ----------------------------------------------------------------
    def _from_client(self, pv: PacketView, svc: ServiceRuntime, sport: int, dport: int, now: float) -> Verdict:
        self.counters.client_packets += 1
        if pv.truncated:  # larger than the queue copies: cannot be logged or rewritten
            return self._malformed("truncated client packet")
        key = (pv.src, sport, svc.vip, dport)
        table = self.table
        rec = table.get(key)
        if rec is None or rec.state in (TcpState.TIME_WAIT, TcpState.CLOSED):
            be = svc.active_backend
            old = rec
            rec = table.admit(
                key, pv, service=svc.name, backend=be.name, backend_ip=be.address, backend_port=be.port, now=now,
            )
            if rec is None:
                if pv.flags & RST:  # a stray RST: nothing to track, let it reach the backend
                    self.counters.untracked += 1
                    self._to_backend(pv, svc, svc.active_backend)
                    return Verdict.REWRITTEN
                self.counters.table_full_drops += 1
                return Verdict.DROP
            if rec is not old:
                if old is not None:
                    self.splices.pop(old.id, None)
                if old is not None:
                    self._forget(old)
                if pv.flags & SYN:
                    rec.log = ByteLog(svc.failover.max_log_bytes)
                    kind = SampledDigest if svc.failover.verify == "sampled" else StreamDigest
                    rec.digest = kind(svc.failover.volatile)
                    if self.store is not None:
                        self.store.track(rec)
        table.observe(rec, pv, True, now)
        self._log_client(rec, pv)
        if self.store is not None:
            self.store.touch(rec)
        elif rec.log is not None:  # memory: logged is committed
            rec.commit_offset = rec.log.end
            rec.commit_fin = rec.log.fin_offset is not None and rec.log.fin_offset == rec.commit_offset
        if self.resume_holds and rec.id in self.resume_holds:
            return self._hold_client(self.resume_holds[rec.id], pv)
        sp = self.splices.get(rec.id)
        if sp is not None:
            return self._apply(pv, sp.on_client(pv, now), sp, now)
        be = svc.backends.get(rec.backend)
        if be is None:  # the gateway reset it: nothing behind it any more
            return Verdict.DROP
        if self.resumed and rec.id in self.resumed:
            self._absorb(rec, pv)
        self._to_backend(pv, svc, be)
        return Verdict.REWRITTEN

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

    @staticmethod
    def _to_backend(pv: PacketView, svc: ServiceRuntime, be: BackendRuntime) -> None:
        pv.set_dst(be.raw)
        if be.port != svc.port:
            pv.set_dport(be.port)

    # --- server -> client ------------------------------------------------------------------
    def _from_server(self, pv: PacketView, svc: ServiceRuntime, be: BackendRuntime, dport: int, now: float) -> Verdict:
        self.counters.server_packets += 1
        rec = self.table.get((pv.dst, dport, svc.vip, svc.port))
        if rec is None:
            # Not tracked (table full, or expired): the kernel still translates it.
            self.counters.untracked += 1
            return Verdict.ACCEPT
        if self.resume_holds and rec.id in self.resume_holds:
            h = self.resume_holds[rec.id]
            if be.name == h.origin or be.name != rec.backend:
                h.server_drops += 1
                self.counters.resume_held_drops += 1
                return Verdict.DROP
            # the new endpoint (switched to, activating): its window probe goes to the client
        if rec.backend != be.name:
            return self._fence(rec, pv, be, now)
        if self.resumed and rec.id in self.resumed:
            self._track_resumed(rec, pv)
        sp = self.splices.get(rec.id)
        if sp is not None:
            if pv.truncated:  # cannot be translated: the backup will send it again
                self._malformed("truncated packet of a moved connection")
                return Verdict.DROP
            return self._apply(pv, sp.on_backend(pv, pv.payload, now), sp, now, observe_rec=rec)
        flags = pv.flags
        if flags & (FIN | RST) and not rec.server_close_ok and rec.state not in (TcpState.TIME_WAIT, TcpState.CLOSED):
            return self._hold_close(rec, svc, be, pv)
        self.table.observe(rec, pv, False, now)
        dg = rec.digest
        if dg is not None and pv.payload_len and rec.server.isn is not None:
            off = seq_diff(pv.seq + (1 if flags & SYN else 0), seq_add(rec.server.isn, 1))
            if isinstance(dg, SampledDigest):
                dg.add(off, pv.captured_payload, pv.payload_len)
            elif not pv.truncated:
                dg.add(off, pv.payload)
                if self.resyncing and rec.id in self.resyncing:
                    self._end_resync(rec)
        if self.store is not None and rec.log is not None:
            if self.reloaded and rec.id in self.reloaded and not self._check_reloaded(rec, pv, now):
                return Verdict.DROP
            self.store.touch(rec)
            return self._gate_ack(rec, pv, Verdict.ACCEPT, svc)
        return Verdict.ACCEPT

    # --- delayed acknowledgments (I1) ---------------------------------------------------------
    @staticmethod
    def ack_allowed(rec: ConnectionRecord) -> int | None:
        """The highest ACK the client may see: ISN + 1 + committed bytes (+1 for
        a committed FIN); the ISN itself (not even the SYN) before the record
        is durable.  None: no limit known (no client ISN)."""
        isn = rec.client.isn
        if isn is None:
            return None
        return seq_add(isn, 1 + rec.commit_offset + (1 if rec.commit_fin else 0))

    def _gate_ack(self, rec: ConnectionRecord, pv: PacketView, verdict: Verdict,
                  svc: ServiceRuntime | None = None) -> Verdict:
        """Clamp or hold a packet to the client whose ACK is above the commit point.
        ``svc`` is given for a packet still in the backend's addressing (the
        kernel would rewrite its source): a held copy is readdressed here."""
        flags = pv.flags
        if not flags & ACK or flags & RST:
            return verdict
        allowed = self.ack_allowed(rec)
        if allowed is None:
            return verdict
        ack = pv.ack
        if seq_diff(ack, allowed) <= 0:
            if rec.id in self.held and seq_diff(ack, PacketView(self.held[rec.id]).ack) >= 0:
                del self.held[rec.id]  # superseded by what goes out now
            return verdict
        if pv.payload_len == 0 and not flags & FIN:
            # a pure ACK (or the SYN-ACK): keep the newest, send it when the commit catches up
            held = bytearray(pv.buf)
            if svc is not None:
                hv = PacketView(held)
                hv.set_src(svc.vip_raw)
                if hv.ports[0] != svc.port:
                    hv.set_sport(svc.port)
            self.held[rec.id] = held
            self.counters.acks_held += 1
            return Verdict.DROP
        if flags & SYN:  # a SYN-ACK with data: hold it too (never seen in practice)
            self.counters.acks_held += 1
            return Verdict.DROP
        # the client is owed this acknowledgment: a pure ACK carrying it waits for the commit
        # (else a FIN acknowledged late is retransmitted to a peer that has closed: RST)
        src, sport = (svc.vip, svc.port) if svc is not None else (pv.src, pv.ports[0])
        owed = tcp_packet(src, pv.dst, sport, pv.ports[1], seq_add(pv.seq, pv.payload_len + (1 if flags & FIN else 0)),
                          ack, ACK, pv.window, tcp_options(tsval=pv.tsval, tsecr=pv.tsecr), b"")
        self.held[rec.id] = bytearray(owed)
        pv.set_ack(allowed)
        if pv.options.sack_blocks:
            pv.strip_sack()
        self.counters.acks_clamped += 1
        return Verdict.REWRITTEN

    def committed(self, recs: list[ConnectionRecord]) -> None:
        """Commit points moved (the store's batch is durable): send the held
        ACKs they now cover, or lowered to the new commit point."""
        for rec in recs:
            held = self.held.get(rec.id)
            if held is None:
                continue
            allowed = self.ack_allowed(rec)
            hv = PacketView(held)
            if allowed is None:
                continue
            syn = hv.flags & SYN
            if seq_diff(hv.ack, allowed) <= 0:
                del self.held[rec.id]
                out = held
            elif syn:
                continue  # a SYN-ACK cannot be partly sent
            else:
                out = bytearray(held)
            ov = PacketView(out)
            if out is not held:  # only part of it is durable: acknowledge that much now
                ov.set_ack(allowed)
                if ov.options.sack_blocks:
                    ov.strip_sack()
            ts = rec.server.tsval
            if ov.tsval is not None and ts is not None and not syn and rec.id not in self.splices:
                if seq_diff(ts, ov.tsval) > 0:  # I3: never older than what the client saw
                    ov.set_timestamps(ts, ov.tsecr)
            self.raw_out.append(out)
            self.counters.acks_released += 1

    def gate_outbox(self) -> None:
        """I1 for the segments the gateway itself sends to clients."""
        if self.store is None:
            return
        for o in self.outbox:
            if o.to != "client" or not o.flags & ACK:
                continue
            rec = self.table.get((o.dst, o.dport, o.src, o.sport))
            if rec is None or rec.log is None:
                continue
            allowed = self.ack_allowed(rec)
            if allowed is not None and seq_diff(o.ack, allowed) > 0:
                o.ack = allowed
                self.counters.acks_clamped += 1

    def reattach(self, rec: ConnectionRecord, now: float) -> bool:
        """A connection read back from the checkpoint store (a restart)."""
        if not self.table.restore(rec):
            return False
        if rec.log is not None:
            rec.log.limit = self.services[rec.service].failover.max_log_bytes
        if self.store is not None:
            self.store.adopt(rec, now)
        self.reloaded.add(rec.id)
        if isinstance(rec.digest, StreamDigest) and rec.digest.resync:
            self.resyncing[rec.id] = rec.client.segments
        return True

    def _end_resync(self, rec: ConnectionRecord) -> None:
        """A restored digest jumps over gaps until it has passed what the client
        acknowledged after the restart: from there on the stream has no hole
        that the server will not fill."""
        dg = rec.digest
        if not isinstance(dg, StreamDigest) or not dg.resync:
            self.resyncing.pop(rec.id, None)
            return
        if rec.client.segments <= self.resyncing[rec.id] or rec.client.ack is None or rec.server.isn is None:
            return  # nothing heard from the client since the restart
        if dg.end >= seq_diff(rec.client.ack, seq_add(rec.server.isn, 1)):
            dg.resync = False
            del self.resyncing[rec.id]

    def _check_reloaded(self, rec: ConnectionRecord, pv: PacketView, now: float) -> bool:
        """The first backend packet of a re-attached connection.  False: it
        cannot be resumed (reset, the reason in ``resume_refusals``).

        tcpcp 6.1: its sequence number must be less than 2**31 past the
        checkpoint's (else it cannot be told apart modulo 2**32).  With
        ``on_failure = "open"`` client bytes may have passed while the
        appliance was down: if the backend acknowledges more than the log
        holds, they did, and a replay could not give them again."""
        from checkpoint.resurrect import bytes_since

        self.reloaded.discard(rec.id)
        if rec.server.next_seq is not None and bytes_since(rec.server, pv.seq) is None:
            self.resume_refusals.append((rec, f"the backend is at sequence {pv.seq}, 2**31 bytes or more past "
                                              f"the checkpoint's {rec.server.next_seq}"))
            self.reset(rec, now)
            return False
        log = rec.log
        if log is None or rec.client.isn is None or not pv.flags & ACK or log.overflow is not None:
            return
        acked = seq_diff(pv.ack, seq_add(rec.client.isn, 1))
        have = log.end + (1 if log.fin_offset is not None else 0)
        if acked > have and self.config.gateway.on_failure == "open":
            log.overflow = (f"client bytes passed unlogged while the appliance was down "
                            f"(backend acknowledged {acked}, the log holds {have})")
        return True

    def _forget(self, rec: ConnectionRecord) -> None:
        self.held.pop(rec.id, None)
        self.resume_holds.pop(rec.id, None)
        self.resumed.pop(rec.id, None)
        self.resyncing.pop(rec.id, None)
        if self.store is not None:
            self.store.forget(rec.id)

    def _hold_close(self, rec: ConnectionRecord, svc: ServiceRuntime, be: BackendRuntime, pv: PacketView) -> Verdict:
        """A backend closes or resets a live connection: maybe it is dying.
        Keep it from the client until a probe has spoken."""
        self.counters.held_closes += 1
        kind = "RST" if pv.flags & RST else "FIN"
        if not any(s.conn_id == rec.id for s in self.suspects):
            rst = None
            if kind == "RST":
                rst = Out(src=svc.vip, dst=rec.client_ip, sport=svc.port, dport=rec.client_port,
                          seq=pv.seq, ack=pv.ack, flags=pv.flags, to="client")
            self.suspects.append(Suspect(rec.id, svc.name, be.name, kind, rst))
        return Verdict.DROP

    def release_suspect(self, s: Suspect) -> None:
        """The probe found the backend alive: its close was genuine."""
        rec = self.table.by_id(s.conn_id)
        if rec is None:
            return
        rec.server_close_ok = True
        if s.rst is not None:
            self.outbox.append(s.rst)

    def _fence(self, rec: ConnectionRecord, pv: PacketView, be: BackendRuntime, now: float) -> Verdict:
        self.counters.fenced_drops += 1
        last = self._fence_sent.get(rec.id, 0.0)
        if not pv.flags & RST and now - last >= FENCE_RST_INTERVAL:
            self._fence_sent[rec.id] = now
            self.outbox.append(Out(src=rec.client_ip, dst=be.address, sport=rec.client_port, dport=be.port,
                                   seq=pv.ack, ack=0, flags=RST, to="old"))
        return Verdict.DROP

    # --- resume mode: endpoints moved by the agents ----------------------------------------
    def hold(self, rec: ConnectionRecord, now: float) -> None:
        """Isolate ``rec`` while its endpoint moves: client packets are
        logged and dropped (kept for re-injection), backend packets dropped."""
        if rec.id in self.splices:
            raise ValueError(f"connection {rec.id} is being replayed to {rec.backend}")
        self.resume_holds.setdefault(rec.id, ResumeHold(since=now, origin=rec.backend))

    def switch(self, rec: ConnectionRecord, target: BackendRuntime) -> None:
        """Point ``rec``'s forwarding at ``target``: the address rewrite only,
        the sequence space stays the client's (the endpoint was re-created
        with the same numbers).  The kernel NAT gives the return path the VIP."""
        rec.backend, rec.backend_ip, rec.backend_port = target.name, target.address, target.port
        rec.server_close_ok = False
        self.suspects = [s for s in self.suspects if s.conn_id != rec.id]

    def release(self, rec: ConnectionRecord) -> int:
        """End ``rec``'s hold: the client segments kept while it was held go
        to its (new) backend now, through the injector.  Returns how many."""
        h = self.resume_holds.pop(rec.id, None)
        if h is None:
            return 0
        svc = self.services[rec.service]
        be = svc.backends.get(rec.backend)
        if be is None:
            return 0
        segments = h.held + ([h.last_ack] if h.last_ack is not None else [])
        for buf in segments:
            pv = PacketView(buf)
            if self.resumed and rec.id in self.resumed:
                self._absorb(rec, pv)
            self._to_backend(pv, svc, be)
            self.raw_out.append(buf)
        return len(segments)

    def resumed_from_wire(self, rec: ConnectionRecord, snd_nxt: int) -> None:
        """``rec`` was re-created from the wire checkpoint with its send
        sequence at ``snd_nxt``: absorb client ACKs above the new sender's
        ``snd_nxt`` (I6) until it has passed what the old one was seen to send."""
        until = rec.server.next_seq if rec.server.next_seq is not None else snd_nxt
        if rec.client.ack is not None and seq_diff(rec.client.ack, until) > 0:
            until = rec.client.ack
        self.resumed[rec.id] = ResumedFlow(snd_nxt=snd_nxt, until=until)

    def _hold_client(self, h: ResumeHold, pv: PacketView) -> Verdict:
        h.client_drops += 1
        self.counters.resume_held_drops += 1
        if pv.payload_len or pv.flags & (FIN | RST):
            if len(h.held) < MAX_HELD_SEGMENTS:
                h.held.append(bytearray(pv.buf))
        else:
            h.last_ack = bytearray(pv.buf)
        return Verdict.DROP

    def _absorb(self, rec: ConnectionRecord, pv: PacketView) -> None:
        """I6 (tcpcp 6.1): a client ACK above the resumed sender's snd_nxt is
        valid; the sender is given snd_nxt (it would drop the segment, data and
        all, as acknowledging unsent data), and SACK blocks go with it."""
        from checkpoint.resurrect import absorb_ack

        if not pv.flags & ACK:
            return
        rf = self.resumed[rec.id]
        a = absorb_ack(pv.ack, rf.snd_nxt)
        if a.ahead:
            pv.set_ack(a.ack)
            if pv.options.sack_blocks:
                pv.strip_sack()
            rf.absorbed += 1
            rf.ahead = max(rf.ahead, a.ahead)
            self.counters.acks_absorbed += 1

    def _track_resumed(self, rec: ConnectionRecord, pv: PacketView) -> None:
        rf = self.resumed[rec.id]
        end = seq_add(pv.seq, pv.payload_len + (1 if pv.flags & FIN else 0))
        if seq_diff(end, rf.snd_nxt) > 0:
            rf.snd_nxt = end
        top = rec.client.ack if rec.client.ack is not None and seq_diff(rec.client.ack, rf.until) > 0 else rf.until
        if seq_diff(rf.snd_nxt, top) >= 0:
            del self.resumed[rec.id]  # the new sender has caught up: nothing above it any more

    # --- moved connections -----------------------------------------------------------------
    def _apply(self, pv: PacketView, d: Decision, sp: Splice, now: float,
               observe_rec: ConnectionRecord | None = None) -> Verdict:
        self.outbox.extend(d.inject)
        if not sp.active:
            self._end_splice(sp)
        if not d.forward:
            return Verdict.DROP
        if d.rewrite is not None:
            apply_rewrite(pv, d.rewrite)
        if observe_rec is not None:  # a backend segment, now in the client's view
            self.table.observe(observe_rec, pv, False, now)
            dg = observe_rec.digest
            if dg is not None and pv.payload_len and observe_rec.server.isn is not None:
                off = seq_diff(pv.seq, seq_add(observe_rec.server.isn, 1))
                if isinstance(dg, SampledDigest):
                    dg.add(off, pv.payload, pv.payload_len)
                else:
                    dg.add(off, pv.payload)
            if self.store is not None and observe_rec.log is not None:
                self.store.touch(observe_rec)
                return self._gate_ack(observe_rec, pv, Verdict.REWRITTEN)
        return Verdict.REWRITTEN

    def _end_splice(self, sp: Splice) -> None:
        if self.splices.get(sp.rec.id) is sp:
            del self.splices[sp.rec.id]
            self.finished_splices.append(sp)
            if sp.phase.value == "FAILED":
                self._disown(sp.rec)

    def move(self, rec: ConnectionRecord, target: BackendRuntime, now: float) -> Splice:
        """Start moving ``rec`` to ``target`` (replay).  Raises ValueError with
        the reason when it cannot be moved; the caller resets it then."""
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
            rec.backend, rec.backend_ip, rec.backend_port = target.name, target.address, target.port
            rec.moves += 1
            raise LookupError("not yet established: re-pinned without replay")
        old = svc.backends[rec.backend]
        prev = self.splices.pop(rec.id, None)
        if prev is not None:  # moved before: that splice ends here, the new one starts from the client's view
            prev.phase = prev.phase.__class__.CLOSED
            self.finished_splices.append(prev)
        # tcpcp 6.1: the record may be behind the wire (a restart, an imported checkpoint, or
        # simply the time since the last server packet): the client's view of the server's
        # clock starts from a conservative estimate of where that clock is now
        from checkpoint.resurrect import estimate_tsval

        floor = estimate_tsval(rec.server, rec.last_seen, now) if rec.ts_ok else None
        sp = Splice(rec, rec.log, rec.digest.snapshot(), vip=svc.vip, vport=svc.port, old=old.endpoint,
                    target=target.endpoint, now=now, ts_floor=floor,
                    options=SpliceOptions(syn_retries=svc.failover.syn_retries, move_timeout=svc.failover.move_timeout))
        self.outbox.extend(sp.start(now))
        rec.backend, rec.backend_ip, rec.backend_port = target.name, target.address, target.port
        rec.moves += 1
        rec.server_close_ok = False
        self.splices[rec.id] = sp
        self.suspects = [s for s in self.suspects if s.conn_id != rec.id]
        return sp

    def reset(self, rec: ConnectionRecord, now: float) -> None:
        """Reset a connection cleanly on both sides (the client and its backend)."""
        svc = self.services[rec.service]
        be = svc.backends.get(rec.backend)
        if rec.client.ack is not None:
            self.outbox.append(Out(src=svc.vip, dst=rec.client_ip, sport=svc.port, dport=rec.client_port,
                                   seq=rec.client.ack, ack=rec.client.next_seq or 0, flags=RST | 0x10, to="client"))
        if be is not None and rec.server.ack is not None:
            self.outbox.append(Out(src=rec.client_ip, dst=be.address, sport=rec.client_port, dport=be.port,
                                   seq=rec.server.ack, ack=0, flags=RST, to="old"))
        sp = self.splices.pop(rec.id, None)
        if sp is not None:
            sp.phase = sp.phase.__class__.CLOSED
        self._disown(rec)
        rec.closed_at = now

    @staticmethod
    def _disown(rec: ConnectionRecord) -> None:
        """The gateway reset this connection: no backend owns it any more, so
        whatever a backend still sends for it is fenced."""
        rec.rst_seen = True
        rec.rst_from = "gateway"
        rec.state = TcpState.CLOSED
        rec.backend = NO_BACKEND

    def poll(self, now: float) -> None:
        """Timers of the moves under way."""
        for sp in list(self.splices.values()):
            self.outbox.extend(sp.poll(now))
            if not sp.active:
                self._end_splice(sp)

    def expire(self, now: float) -> list[ConnectionRecord]:
        """Drop idle and finished records, and the splices of those that moved."""
        gone = self.table.expire(now)
        for rec in gone:
            self._forget(rec)
            sp = self.splices.pop(rec.id, None)
            if sp is not None:
                sp.phase = sp.phase.__class__.CLOSED
                self.finished_splices.append(sp)
            self._fence_sent.pop(rec.id, None)
        return gone

    def connections(self) -> list[ConnectionRecord]:
        return list(self.table)

    def describe_move(self, cid: int) -> dict[str, Any] | None:
        sp = self.splices.get(cid)
        return sp.describe() if sp else None
