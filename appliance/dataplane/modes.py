"""The per-connection modes of the data plane: one small unit decides a packet's fate in each.

Theory of operation
-------------------
Every tracked connection is in exactly one mode; the engine (:mod:`.engine`) tracks and logs a
packet the same way in all of them, then hands it to the connection's mode, which returns the
verdict.  A connection without an entry in ``Dataplane.modes`` is *ordinary*.

* :class:`Ordinary` — pinned to its backend: client packets get the backend's address (by the
  kernel's stateless rule when the backend is the one it points to, ``kernel_target``; the kernel
  gives the return path the VIP); a backend's FIN or RST is held as a *suspect* until a probe
  says the backend is alive; backend segments feed the stream digest and pass the delayed-ACK
  gate.
* :class:`Resyncing` — re-attached from the checkpoint store after a restart: as ordinary, plus
  tcpcp 6.1's check of the first backend packet (2**31 rule, bytes that passed unlogged while the
  appliance was down) and a restored digest that jumps gaps until it has passed what the client
  acknowledged.  Becomes ordinary when both are done.
* :class:`Spliced` — moved by replay: every packet goes through its
  :class:`~checkpoint.splice.Splice` (caught up, verified, translated).
* :class:`Held` — resume mode, the endpoint is being moved by the agents: client packets are
  logged and dropped (data, FIN and RST kept for re-injection, and the newest pure ACK), the
  origin's packets are dropped; the new endpoint's window probe passes to the client.
* :class:`Resumed` — re-created from the wire checkpoint: its new sender starts at ``snd_nxt``,
  below what the client may already have, so client ACKs above it are lowered to it (I6) until the
  new sender has passed everything the old one was seen to send.  Then ordinary.

Packets from a backend that no longer owns the connection are fenced in every mode but
:class:`Held` (dropped, and the old backend sent a RST on the client's behalf).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from checkpoint.ici import ConnectionRecord, TcpState
from checkpoint.resurrect import absorb_ack, bytes_since
from checkpoint.segment import ACK, FIN, RST
from checkpoint.seqnum import seq_add, seq_diff
from checkpoint.splice import Decision, Splice
from checkpoint.store import CommitPlanner
from checkpoint.streamlog import StreamDigest
from nfq.packet import PacketView
from nfq.queue import Verdict

from ..config import Config
from .runtime import BackendRuntime, DataplaneCounters, ServiceRuntime

MAX_HELD_SEGMENTS = 256   # client segments with data kept per held connection (resume mode)


class Dataplane(Protocol):
    """The stages of the engine (:class:`appliance.dataplane.engine.Dataplane`) that the modes
    share: the engine drives the modes, the modes call back into these."""

    config: Config
    counters: DataplaneCounters
    store: CommitPlanner | None

    def to_backend(self, pv: PacketView, svc: ServiceRuntime, be: BackendRuntime) -> None: ...
    def forward(self, pv: PacketView, svc: ServiceRuntime, be: BackendRuntime) -> Verdict: ...
    def observe_server(self, rec: ConnectionRecord, pv: PacketView, be: BackendRuntime, now: float) -> None: ...
    def gate_server(self, rec: ConnectionRecord, pv: PacketView, svc: ServiceRuntime | None,
                    verdict: Verdict = Verdict.ACCEPT) -> Verdict: ...
    def hold_close(self, rec: ConnectionRecord, svc: ServiceRuntime, be: BackendRuntime,
                   pv: PacketView) -> Verdict: ...
    def fence(self, rec: ConnectionRecord, pv: PacketView, be: BackendRuntime, now: float) -> Verdict: ...
    def after_reset(self, rec: ConnectionRecord, pv: PacketView, svc: ServiceRuntime, now: float) -> Verdict: ...
    def malformed(self, why: str) -> Verdict: ...
    def set_mode(self, rec: ConnectionRecord, mode: "Mode | None") -> None: ...
    def refuse_resume(self, rec: ConnectionRecord, why: str, now: float) -> None: ...
    def apply(self, pv: PacketView, d: Decision, mode: "Spliced", now: float,
              observe_rec: ConnectionRecord | None = None) -> Verdict: ...


class Ordinary:
    name = "ordinary"

    def client(self, dp: Dataplane, rec: ConnectionRecord, pv: PacketView, svc: ServiceRuntime,
               now: float) -> Verdict:
        be = svc.backends.get(rec.backend)
        if be is None:  # the gateway reset it: nothing behind it any more
            return dp.after_reset(rec, pv, svc, now)
        return dp.forward(pv, svc, be)

    def server(self, dp: Dataplane, rec: ConnectionRecord, pv: PacketView, svc: ServiceRuntime,
               be: BackendRuntime, now: float) -> Verdict:
        early = self.screen(dp, rec, pv, svc, be, now)
        if early is not None:
            return early
        dp.observe_server(rec, pv, be, now)
        return dp.gate_server(rec, pv, svc)

    @staticmethod
    def screen(dp: Dataplane, rec: ConnectionRecord, pv: PacketView, svc: ServiceRuntime,
               be: BackendRuntime, now: float) -> Verdict | None:
        """A backend packet that goes no further: from a backend that no longer owns the
        connection (fenced), or a close held until a probe has spoken.  None: it goes on."""
        if rec.backend != be.name:
            return dp.fence(rec, pv, be, now)
        if pv.flags & (FIN | RST) and not rec.server_close_ok and rec.state not in (TcpState.TIME_WAIT,
                                                                                     TcpState.CLOSED):
            return dp.hold_close(rec, svc, be, pv)
        return None


ORDINARY = Ordinary()


@dataclass
class Resyncing(Ordinary):
    """A connection re-attached after a restart (see the module doc)."""

    first_packet: bool = True         # no backend packet seen since the restart
    client_segments: int | None = None  # the client's segment count at restore, while the digest resyncs
    # could client bytes have bypassed the queues meanwhile (this gateway's appliance down, the
    # kernel forwarding: on_failure = "open")?  Not at a pair's takeover: the new active's queues
    # held every packet, the old active is gone
    bypass_possible: bool = True
    name = "resyncing"

    def server(self, dp: Dataplane, rec: ConnectionRecord, pv: PacketView, svc: ServiceRuntime,
               be: BackendRuntime, now: float) -> Verdict:
        early = self.screen(dp, rec, pv, svc, be, now)
        if early is not None:
            return early
        dp.observe_server(rec, pv, be, now)
        if self.client_segments is not None and not pv.truncated and pv.payload_len:
            self._end_resync(rec)
        if self.first_packet and rec.log is not None:
            self.first_packet = False
            why = self._check_first(dp, rec, pv, self.bypass_possible)
            if why is not None:
                dp.refuse_resume(rec, why, now)
                return Verdict.DROP
        if not self.first_packet and self.client_segments is None:
            dp.set_mode(rec, None)
        return dp.gate_server(rec, pv, svc)

    def _end_resync(self, rec: ConnectionRecord) -> None:
        """A restored digest jumps over gaps until it has passed what the client acknowledged
        after the restart: from there on the stream has no hole that the server will not fill."""
        dg = rec.digest
        if not isinstance(dg, StreamDigest) or not dg.resync:
            self.client_segments = None
            return
        assert self.client_segments is not None
        if rec.client.segments <= self.client_segments or rec.client.ack is None or rec.server.isn is None:
            return  # nothing heard from the client since the restart
        if dg.end >= seq_diff(rec.client.ack, seq_add(rec.server.isn, 1)):
            dg.resync = False
            self.client_segments = None

    @staticmethod
    def _check_first(dp: Dataplane, rec: ConnectionRecord, pv: PacketView, bypass_possible: bool = True) -> str | None:
        """The first backend packet of a re-attached connection: the reason it cannot be
        resumed, or None.

        tcpcp 6.1: its sequence number must be less than 2**31 past the checkpoint's (else it
        cannot be told apart modulo 2**32).  With ``on_failure = "open"`` client bytes may have
        passed while the appliance was down: if the backend acknowledges more than the log
        holds, they did, and a replay could not give them again (the connection stays, marked
        unprotected).  Without a bypass (``bypass_possible`` False: a pair's takeover) a backend
        ahead of the log only holds bytes that were forwarded before their commit: the client
        was never told of them, sends them again, and the log gets them then."""
        if rec.server.next_seq is not None and bytes_since(rec.server, pv.seq) is None:
            return (f"the backend is at sequence {pv.seq}, 2**31 bytes or more past "
                    f"the checkpoint's {rec.server.next_seq}")
        log = rec.log
        if log is None or rec.client.isn is None or not pv.flags & ACK or log.overflow is not None:
            return None
        acked = seq_diff(pv.ack, seq_add(rec.client.isn, 1))
        have = log.end + (1 if log.fin_offset is not None else 0)
        if acked > have and dp.config.gateway.on_failure == "open" and bypass_possible:
            log.overflow = (f"client bytes passed unlogged while the appliance was down "
                            f"(backend acknowledged {acked}, the log holds {have})")
        return None


@dataclass
class Spliced:
    """A connection moved by replay: its splice decides every packet."""

    splice: Splice
    verified: bool = False   # MoveVerified given
    name = "spliced"

    def client(self, dp: Dataplane, rec: ConnectionRecord, pv: PacketView, svc: ServiceRuntime,
               now: float) -> Verdict:
        sp = self.splice
        be = svc.backends.get(rec.backend)
        if be is not None:
            be.bytes_from_client += pv.payload_len
        return dp.apply(pv, sp.on_client(pv, now), self, now)

    def server(self, dp: Dataplane, rec: ConnectionRecord, pv: PacketView, svc: ServiceRuntime,
               be: BackendRuntime, now: float) -> Verdict:
        if rec.backend != be.name:
            return dp.fence(rec, pv, be, now)
        if pv.truncated:  # cannot be translated: the backup will send it again
            dp.malformed("truncated packet of a moved connection")
            return Verdict.DROP
        be.bytes_from_server += pv.payload_len
        return dp.apply(pv, self.splice.on_backend(pv, pv.payload, now), self, now, observe_rec=rec)


@dataclass
class ResumedFlow:
    """A connection re-created from the wire checkpoint: its new sender starts at ``snd_nxt``,
    below what the client may already have (I6)."""

    snd_nxt: int          # the new sender's next sequence number, as seen on the wire
    until: int            # the highest sequence the old sender was seen to send: absorb until passed
    absorbed: int = 0     # client ACKs lowered
    ahead: int = 0        # the most the client was ahead of the new sender, in bytes

    def absorb(self, dp: Dataplane, pv: PacketView) -> None:
        """I6 (tcpcp 6.1): a client ACK above the resumed sender's snd_nxt is valid; the sender
        is given snd_nxt (it would drop the segment, data and all, as acknowledging unsent
        data), and SACK blocks go with it."""
        if not pv.flags & ACK:
            return
        a = absorb_ack(pv.ack, self.snd_nxt)
        if a.ahead:
            pv.set_ack(a.ack)
            if pv.options.sack_blocks:
                pv.strip_sack()
            self.absorbed += 1
            self.ahead = max(self.ahead, a.ahead)
            dp.counters.acks_absorbed += 1

    def track(self, rec: ConnectionRecord, pv: PacketView) -> bool:
        """A segment of the new sender: True once it has passed everything the old one sent."""
        end = seq_add(pv.seq, pv.payload_len + (1 if pv.flags & FIN else 0))
        if seq_diff(end, self.snd_nxt) > 0:
            self.snd_nxt = end
        top = rec.client.ack if rec.client.ack is not None and seq_diff(rec.client.ack, self.until) > 0 \
            else self.until
        return seq_diff(self.snd_nxt, top) >= 0


@dataclass
class Resumed(Ordinary):
    flow: ResumedFlow = field(default_factory=lambda: ResumedFlow(0, 0))
    name = "resumed"

    def client(self, dp: Dataplane, rec: ConnectionRecord, pv: PacketView, svc: ServiceRuntime,
               now: float) -> Verdict:
        be = svc.backends.get(rec.backend)
        if be is None:
            return Verdict.DROP
        self.flow.absorb(dp, pv)
        dp.to_backend(pv, svc, be)
        return Verdict.REWRITTEN

    def server(self, dp: Dataplane, rec: ConnectionRecord, pv: PacketView, svc: ServiceRuntime,
               be: BackendRuntime, now: float) -> Verdict:
        if rec.backend == be.name and self.flow.track(rec, pv):
            dp.set_mode(rec, None)  # the new sender has caught up: nothing above it any more
        return super().server(dp, rec, pv, svc, be, now)


@dataclass
class Held:
    """A connection isolated while the agents move its endpoint (resume mode)."""

    since: float
    origin: str             # the backend the endpoint leaves: its packets are dropped while held
    held: list[bytearray] = field(default_factory=list)  # client segments with data/FIN/RST, to re-inject
    last_ack: bytearray | None = None  # the newest pure ACK (it may answer the new endpoint's window probe)
    client_drops: int = 0
    server_drops: int = 0
    resumed: ResumedFlow | None = None  # set when re-created from the wire: Resumed after the release
    name = "held"

    def client(self, dp: Dataplane, rec: ConnectionRecord, pv: PacketView, svc: ServiceRuntime,
               now: float) -> Verdict:
        self.client_drops += 1
        dp.counters.resume_held_drops += 1
        if pv.payload_len or pv.flags & (FIN | RST):
            if len(self.held) < MAX_HELD_SEGMENTS:
                self.held.append(bytearray(pv.buf))
        else:
            self.last_ack = bytearray(pv.buf)
        return Verdict.DROP

    def server(self, dp: Dataplane, rec: ConnectionRecord, pv: PacketView, svc: ServiceRuntime,
               be: BackendRuntime, now: float) -> Verdict:
        if be.name == self.origin or be.name != rec.backend:
            self.server_drops += 1
            dp.counters.resume_held_drops += 1
            return Verdict.DROP
        # the new endpoint (switched to, activating): its window probe goes to the client
        if self.resumed is not None and self.resumed.track(rec, pv):
            self.resumed = None  # caught up already: ordinary after the release
        return ORDINARY.server(dp, rec, pv, svc, be, now)


Mode = Ordinary | Spliced | Held
