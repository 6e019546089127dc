"""The splice engine: moves one connection to an unmodified backup by replay.

Theory of operation
-------------------
A connection between a client and the old primary is to continue on a backup
that knows nothing of it.  The engine opens a connection to the backup *as
the client* and then stands in the middle of it for the rest of its life:

``CONNECTING``
    A SYN from the client's address and port with the client's ISN and the
    options the original connection negotiated (MSS, window scale,
    SACK-permitted, timestamps with the client's latest TSval).  Resent with
    exponential back-off; after ``syn_retries`` the move fails.
``REPLAYING``
    The backup's SYN-ACK is absorbed and answered; the translation is fixed
    (sequence delta from the ISNs, timestamp delta from the first backup
    TSval so the client's view of the server clock never goes back).  The
    logged client bytes (and FIN) are sent again within the backup's window
    and MSS, resent go-back-N on timeout, until the backup has acknowledged
    all of them.  Client packets meanwhile are only logged (by the data
    plane) and dropped: the replay delivers their bytes.
``SPLICED``
    Client packets are translated and forwarded (a FIN only at its place in the
    server's stream, see below: a server may abort a response it is regenerating
    when the client half-closes); the acknowledgment is
    clamped to what the backup has sent (tcpcp 6.1, invariant I6) and a pure
    ACK that tells the backup nothing new is dropped, so the backup never
    sees a flood of duplicate ACKs while it regenerates.

The connection may be caught in any state the tracker knows but the finished ones
(TIME_WAIT, CLOSED: the data plane refuses to move those, there is nothing left to move).
What each state needs, so that it completes on the backup as it would have on the primary:

``SYN_RECV`` (the client's SYN and the primary's SYN-ACK seen, the client's ACK not yet)
    Nothing logged, nothing to verify: the move is spliced as soon as the backup's SYN-ACK
    is absorbed.  The client's handshake ACK (with data or not) then goes the usual way
    (logged and replayed while replaying, translated once spliced).  A client SYN (the
    primary's SYN-ACK was lost: it retransmits its SYN) is never passed to the backup (whose
    connection exists already: it would draw a challenge ACK the client cannot use); the
    gateway answers it with the primary's SYN-ACK as the client must see it (the primary's
    ISN and options, a TSval not below one already shown), in every phase of the move.
The client's FIN (``FIN_WAIT``/``CLOSE_WAIT`` of the client's direction, ``LAST_ACK``)
    It is in the log, with what the primary had sent when it was logged
    (``ByteLog.fin_server_offset``).  It goes to the backup once the backup has regenerated
    that much (where the primary got it: a server that reads to EOF before it answers gets it
    before its answer, one that was answering after the same bytes; unknown, in a log of an
    older gateway: once the backup has caught up with all the client has) and once the backup
    has every client byte before it: then the *gateway* sends it, and any logged bytes the backup
    still lacks before it, whatever the phase — the client may never send it again (the
    primary acknowledged it) — resent on a timer until the backup acknowledges it.  The
    backup's acknowledgment of it reaches the client (a no-op when the primary had
    acknowledged it already, the one it waits for in ``LAST_ACK``).  Until the backup has
    the FIN, client segments whose sequence number lies past it (the ACKs of a client in
    FIN_WAIT_2) are given the FIN's sequence number: the backup never sees a hole.
The server's FIN (``FIN_WAIT``/``CLOSE_WAIT`` of the server's direction, ``LAST_ACK``)
    The backup regenerates it with the response; it is a stream position like any byte:
    suppressed and acknowledged by the gateway when the client acknowledged it, else
    delivered once (translated) after the bytes before it verify; a FIN before what the
    client has seen is a divergence.  The client's later bytes and its own FIN follow the
    rules above, so the backup's side closes too.
The close (both FINs)
    The backup's RTT estimate is the gateway's prompt answers: its tail loss probe sends its
    FIN again a few ms later, before the client's acknowledgment could come back through the
    gateway.  A copy within :data:`INITIAL_RTO` of the FIN passed on to the client is dropped
    (a FIN really lost comes again after the backup's RTO): given to the client in TIME_WAIT,
    its duplicate ACK would reach the backup after the first had closed it, and draw a RST.
    Once both FINs are acknowledged, client ACKs that tell the backup nothing new are dropped,
    and a RST from the backup (its closed socket's answer to something stale) never reaches
    the client.

Backup data is handled the same way in every phase after the handshake, by
its stream offset:

* it is fed to the :class:`~checkpoint.streamlog.StreamVerifier`, which
  compares it with the digest of what the old primary sent; a mismatch is a
  *divergence*: both sides are reset (fail closed), never a wrong byte;
* below what the client already acknowledged it is *suppressed*: dropped,
  and acknowledged to the backup by the gateway;
* above that it is forwarded, translated, once every byte of it that the
  client may already have is verified.  Until then it is held in a buffer
  and acknowledged to the backup by the gateway — the backup must be able
  to send on to the end of what is to verify, whatever the client's window
  says — and the gateway takes over its delivery: once its chunk verifies
  it is sent to the client, and kept until the client acknowledges it, sent
  again on duplicate ACKs or a timeout.  Out-of-order backup segments in that
  region are dropped unacknowledged: the backup resends them.

A restart of the gateway (``store.mode = "disk"``)
    The checkpoint keeps a move's state (:class:`~checkpoint.state.MoveState`, written with the
    record in the store's next group commit when it changes: :meth:`Splice.persisted`).

    *A move that completed* — phase ``SPLICED``, everything the client may have had verified,
    nothing held or retained by the gateway (:attr:`Splice.steady`) — is restored as spliced
    (:meth:`Splice.restore`): same backup, same translation.  Persisted, because the wire
    cannot give them back and they never change for the life of the connection: the sequence
    delta (fixed by the backup's ISN when its SYN-ACK was absorbed, or by a range answer's head,
    both before the steady state), the timestamp delta (chosen once from the backup's first
    TSval), both window scales (negotiated in the SYNs), the backup's ISN, MSS and first TSval,
    where its streams start, how much of the server stream was verified, the backends' names
    and addresses, and the offset after the backup's FIN once it sent one.  Re-learned, as an
    ordinary connection re-learns its numbers after a restart (``Resyncing``), starting from the
    restored record (the ICI, at most ``ici_interval`` old) and corrected by the first segments:

    * the client's acknowledged point, the backup's acknowledgment of the client stream, the
      windows and TSvals: from every segment, as in any phase;
    * the backup's highest sequence sent (the I6 clamp of client ACKs): from the backup's next
      segment, and until one comes, from the client's ACKs.  That is exact in the steady state:
      every server byte the client holds past what was verified came from the backup through
      the gateway (what the backup sent while the gateway was down reached the client
      untranslated, far outside its window, and was dropped), so a client never acknowledges a
      byte the backup has not sent and the clamp binds nothing;
    * where the backup's contiguous stream is: its first data segment after the restart is
      taken where it lies (a retransmission from its oldest unacknowledged byte, or new data),
      as a restored digest jumps a gap (everything before it was verified before the restart),
      unless it lies 2**30 or more from the checkpoint's (then it cannot be told apart modulo
      2**32: the move fails, reset on both sides);
    * the highest TSval shown to the client: the record's; the backup's clock only goes forward
      and the delta is constant, so its next translated TSval is at least any the client saw.

    The old primary stays fenced: the restored record names the backup as its backend, so
    whatever the old primary still sends for the connection is dropped and answered with a RST.

    *A move caught under way* (``CONNECTING``, ``REPLAYING``, or ``SPLICED`` before its catch-up
    verified or while the gateway still holds or delivers backup bytes) is reset on both sides,
    with an event saying why; it is not restarted.  The backup already has a socket with the
    client's address, port and ISN, in a state the checkpoint does not know (half-open, or
    established with part of the replay): a second SYN with the same ISN lands on it (a
    challenge ACK, not a new connection), and what the gateway delivered or acknowledged on the
    backup's behalf since the last commit is not in the checkpoint.  Restarting would first
    need that socket reset exactly (its rcv_nxt is unknown) and a window of what was delivered;
    a clean reset is what the gateway can promise.

Each method returns a :class:`Decision` (forward with a :class:`Rewrite`, or
drop) and segments to inject (:class:`Out`); ``poll(now)`` drives the timers.
No sockets, no clock: ``now`` comes from the caller.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

from .httpreplay import RangeAnswer, ReplayPlan, stream_plan
from .ici import ConnectionRecord
from .resurrect import absorb_ack
from .segment import ACK, FIN, PSH, RST, SYN, SegmentLike
from .seqnum import MASK, seq_add, seq_diff
from .state import MoveState
from .streamlog import ByteLog, DigestSnapshot, SampledSnapshot, SampledVerifier, StreamVerifier
from .translate import Translation, choose_ts_delta

DEFAULT_MSS = 536
MAX_RELEARN_JUMP = 1 << 30  # the farthest the backup's first segment after a restart may lie from the checkpoint
TS_OPTION_LEN = 12  # NOP, NOP, timestamps: on every segment the gateway sends when timestamps are on
INITIAL_RTO = 0.2
# the least window the gateway advertises to the backup while it waits for a range answer's head,
# which it takes itself and never forwards, whatever the client's window: 64 KiB, the head's limit
HEAD_WINDOW = 64 * 1024
MAX_RTO = 3.0


class Phase(str, enum.Enum):
    CONNECTING = "CONNECTING"
    REPLAYING = "REPLAYING"
    SPLICED = "SPLICED"
    FAILED = "FAILED"
    CLOSED = "CLOSED"


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str
    ip: str
    port: int


@dataclass(slots=True)
class Out:
    """A segment for the gateway to build and send."""

    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int = 0
    tsval: int | None = None
    tsecr: int | None = None
    payload: bytes = b""
    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    to: str = "backend"  # backend | client | old


@dataclass(slots=True)
class Rewrite:
    """Changes to make to a forwarded packet (None: leave the field alone)."""

    src: str | None = None
    dst: str | None = None
    sport: int | None = None
    dport: int | None = None
    seq: int | None = None
    ack: int | None = None
    window: int | None = None
    tsval: int | None = None
    tsecr: int | None = None
    sack: tuple[tuple[int, int], ...] | None = None
    strip_sack: bool = False


@dataclass(slots=True)
class Decision:
    forward: bool
    rewrite: Rewrite | None = None
    inject: list[Out] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SpliceOptions:
    syn_retries: int = 6
    move_timeout: float = 10.0


def reset_seqs(rec: ConnectionRecord) -> list[int]:
    """Where to put a RST to the client so that it is accepted (RFC 5961).  The client's last
    ACK is its rcv_nxt when nothing is in flight (a RST there resets at once), but it may lag
    what the client has received (delayed ACKs): a RST below rcv_nxt is dropped silently.  So a
    second one goes at the highest sequence the server sent, which is at rcv_nxt or in the
    window: there the client answers with a challenge ACK, and the gateway answers that with a
    RST at exactly the acknowledged sequence."""
    seqs = [s for s in (rec.client.ack, rec.server.next_seq) if s is not None]
    return seqs[:1] if len(seqs) == 2 and seqs[0] == seqs[1] else seqs


class Splice:
    def __init__(
        self,
        rec: ConnectionRecord,
        log: ByteLog,
        snap: DigestSnapshot | SampledSnapshot,
        *,
        vip: str,
        vport: int,
        old: Endpoint,
        target: Endpoint,
        now: float,
        options: SpliceOptions = SpliceOptions(),
        ts_floor: int | None = None,
        plan: ReplayPlan | None = None,
    ) -> None:
        """``ts_floor``: the lowest TSval to show the client (tcpcp 6.1: the last one
        it saw plus the ticks elapsed since, ``resurrect.estimate_tsval``); by default
        the last TSval seen, and the elapsed ticks are estimated at 1000 Hz."""
        c, s = rec.client, rec.server
        if c.isn is None or s.isn is None:
            raise ValueError("cannot splice a connection whose ISNs are unknown")
        self.rec = rec
        self.log = log
        self.snap = snap
        self.vip, self.vport = vip, vport
        self.old, self.target = old, target
        self.opts = options
        self.phase = Phase.CONNECTING
        self.reason: str | None = None
        self.reset_by: str | None = None  # who reset the moved connection (it ended CLOSED)
        self.c_isn, self.s_isn = c.isn, s.isn
        self.c_base = seq_add(c.isn, 1)
        self.s_base = seq_add(s.isn, 1)
        # the client's acknowledged point in the server stream (offsets)
        self.client_acked = max(0, seq_diff(c.ack, self.s_base)) if c.ack is not None else 0
        self.ts = rec.ts_ok
        if plan is None:
            plan = stream_plan(log, snap) if isinstance(snap, DigestSnapshot) else ReplayPlan("stream", 0, 0, 0)
        self.plan = plan
        self.verifier: StreamVerifier | SampledVerifier = (
            StreamVerifier(snap, plan.verify_from, plan.prime) if isinstance(snap, DigestSnapshot)
            else SampledVerifier(snap))
        # where the backup's streams start: the client's (its SYN one below), the server's
        # (None until a range answer's head says: see httpreplay)
        self.c_start = plan.client_start
        self.s_start: int | None = plan.server_start
        self.range_answer = RangeAnswer(plan.range) if plan.range is not None else None
        self.range_buf = bytearray()  # the backup's first bytes until its answer's head is checked
        self.range_outcome: str | None = None
        self.range_head = 0
        self.tr: Translation | None = None
        self.b_isn: int | None = None
        self.b_base = 0
        self.b_mss = DEFAULT_MSS
        self.b_window = 65535
        self.b_wscale = 0
        self.b_high = plan.server_start or 0  # highest backup stream offset seen (incl. FIN)
        self.b_tsval: int | None = None
        self.b_ts_first: int | None = None
        self.acked_to_b = plan.server_start or 0  # highest backup stream offset acknowledged to it
        self.replay_next = plan.client_start      # next client stream offset to send
        self.replay_acked = plan.client_start     # client stream offset the backup acknowledged
        self.fin_sent = False
        self.fin_tx: float | None = None  # when the gateway last sent the client's FIN once spliced
        self.b_fin_end: int | None = None  # the backup's stream offset after its FIN, once it sent it
        self.b_fin_out: float | None = None  # when its FIN last went to the client (forwarded or sent)
        self.pending: dict[int, tuple[bytes, int]] = {}   # backup segments awaiting verification
        self.retained: dict[int, tuple[bytes, int]] = {}  # sent to the client by us, not yet acked
        self.retained_tx = now
        self.client_dupacks = 0
        # the highest TSval the client has seen from "the server": never go below it (I3)
        self.ts_high = rec.server.tsval if self.ts else None
        if self.ts and ts_floor is not None and (self.ts_high is None or seq_diff(ts_floor, self.ts_high) > 0):
            self.ts_high = ts_floor & MASK
        self.tries = 0
        self.rto = INITIAL_RTO
        self.last_tx = now
        self.t_start = now
        self.relearn = False  # restored after a restart: no backup segment seen yet (see restore)
        self.timings: dict[str, float] = {}
        self.stats = {"suppressed": 0, "suppressed_bytes": 0, "buffered": 0, "forwarded": 0,
                      "replayed_bytes": 0, "replay_retransmits": 0, "acks_clamped": 0, "acks_dropped": 0}

    # --- helpers -------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.phase in (Phase.CONNECTING, Phase.REPLAYING, Phase.SPLICED)

    def _client_tsval(self) -> int | None:
        return self.rec.client.tsval if self.ts else None

    def _mark(self, name: str, now: float) -> None:
        self.timings.setdefault(name, round((now - self.t_start) * 1000, 3))

    def _to_backend(self, seq: int, ack: int, flags: int, payload: bytes = b"") -> Out:
        c = self.rec.client
        window = c.window_raw or 65535
        if not self.rec.established:  # caught in SYN_RECV: the last window seen is its SYN's, unscaled
            window = min(c.window >> (c.wscale if self.rec.wscale_ok and c.wscale else 0), 0xFFFF) or 1
        elif self.s_start is None and self.phase is Phase.REPLAYING:
            # a range answer's head is on its way: the gateway takes it whole before it
            # acknowledges any of it, so a client with a nearly closed window must not hold it up
            # (the backup sent what fitted in 128 bytes and retransmitted it for ever)
            scale = c.wscale if self.rec.wscale_ok and c.wscale else 0
            window = max(window, min(HEAD_WINDOW >> scale, 0xFFFF))
        return Out(
            src=self.rec.client_ip, dst=self.target.ip, sport=self.rec.client_port, dport=self.target.port,
            seq=seq, ack=ack, flags=flags, window=window,
            tsval=self._client_tsval(), tsecr=self.b_tsval if self.ts else None, payload=payload,
        )

    def _ack_value_for_backend(self) -> int:
        return seq_add(self.b_base, self.acked_to_b)

    # --- a restart of the gateway (see the theory of operation) ---------------------------
    @property
    def steady(self) -> bool:
        """The move completed: spliced, everything to verify verified, nothing held or retained
        by the gateway, the translation fixed.  Only such a splice is restored after a restart."""
        return (self.phase is Phase.SPLICED and self.verifier.done and not self.pending and not self.retained
                and self.tr is not None and self.b_isn is not None and self.s_start is not None
                and not self.range_buf)

    def persisted(self) -> MoveState:
        """What the checkpoint keeps of this move now: its constants once :attr:`steady`, else
        only that a move to ``target`` is under way."""
        old = (self.old.name, self.old.ip, self.old.port)
        target = (self.target.name, self.target.ip, self.target.port)
        tr = self.tr
        if not self.steady or tr is None or self.b_isn is None or self.s_start is None:
            return MoveState("moving", old, target)
        return MoveState("spliced", old, target, seq_delta=tr.seq_delta, ts_delta=tr.ts_delta,
                         backend_wscale=tr.backend_wscale, client_view_wscale=tr.client_view_wscale,
                         backend_isn=self.b_isn, backend_mss=self.b_mss, backend_ts_first=self.b_ts_first,
                         backend_fin_end=self.b_fin_end, client_start=self.c_start, server_start=self.s_start,
                         verified_to=self.snap.end, strategy=self.strategy)

    @classmethod
    def restore(cls, rec: ConnectionRecord, log: ByteLog, st: MoveState, *, vip: str, vport: int, now: float,
                options: SpliceOptions = SpliceOptions()) -> "Splice":
        """The splice of a completed move, from the checkpoint (``st``, phase "spliced") and the
        restored record and client log: spliced, its catch-up verified.  Its live numbers start
        from the record and are re-learned from the next segments (the theory of operation).
        Raises ValueError for a move that had not completed."""
        if st.phase != "spliced":
            raise ValueError(f"the move was under way ({st.phase}): only a completed move is restored")
        snap = DigestSnapshot((), None, st.verified_to)  # verified before the restart: nothing left to check
        plan = ReplayPlan(st.strategy, st.client_start, st.server_start, 0)
        sp = cls(rec, log, snap, vip=vip, vport=vport, old=Endpoint(*st.old), target=Endpoint(*st.target),
                 now=now, options=options, plan=plan)
        sp.phase = Phase.SPLICED
        sp.tr = Translation(st.seq_delta, st.ts_delta, st.backend_wscale, st.client_view_wscale)
        sp.b_isn = st.backend_isn
        sp.b_base = seq_add(st.backend_isn, 1 - st.server_start)
        sp.b_mss, sp.b_wscale, sp.b_ts_first = st.backend_mss, st.backend_wscale, st.backend_ts_first
        sp.b_fin_end = st.backend_fin_end
        s = rec.server
        sp.b_tsval = sp.tr.tsval_to_backend(s.tsval) if sp.ts and s.tsval is not None else st.backend_ts_first
        sp.b_window = s.window or 65535
        # the backup had sent at least what was verified and what the client acknowledged
        top = max(st.verified_to, sp.client_acked)
        sp.verifier.end = top
        sp.b_high = max(top, sp.b_fin_end or 0)
        sp.acked_to_b = max(st.server_start, min(sp.client_acked, sp.b_high))
        if s.ack is not None:  # the backup's acknowledgment of the client stream (in the record)
            fin = 1 if log.fin_offset is not None else 0
            sp.replay_acked = min(max(st.client_start, seq_diff(s.ack, sp.c_base)), log.end + fin)
        sp.replay_next = sp.replay_acked
        sp.fin_sent = log.fin_offset is not None and sp.replay_acked > log.fin_offset
        sp.relearn = True
        sp.stats["restored"] = 1
        return sp

    def _relearn_backend(self, seg: SegmentLike, n: int, now: float) -> list[Out] | None:
        """The first backup segments after a restore: where the backup is (see the theory of
        operation).  A list of segments: the move failed (the backup is implausibly far)."""
        off = seq_diff(seg.seq, self.b_base)
        v = self.verifier
        if abs(off - v.end) >= MAX_RELEARN_JUMP:
            return self.fail(f"after the restart the backup is at stream offset {off}, 2**30 or more from the "
                             f"checkpoint's {v.end}", now)
        top = off + n + (1 if seg.flags & FIN else 0)
        if top > self.b_high:
            self.b_high = top
        if n or seg.flags & FIN:
            if off > v.end:
                v.end = off
            self.relearn = False
        return None

    # --- start ---------------------------------------------------------------------------
    def start(self, now: float) -> list[Out]:
        """The SYN to the backup, and a RST to the old primary (fencing)."""
        out = [self._syn()]
        self.last_tx = now
        fence = self.fence_old(self.rec.server.ack)
        if fence:
            out.append(fence)
        return out

    def _syn(self) -> Out:
        rec = self.rec
        c = rec.client
        self.tries += 1
        return Out(
            src=rec.client_ip, dst=self.target.ip, sport=rec.client_port, dport=self.target.port,
            # a SYN's window is never scaled: give the client's window in bytes, capped
            seq=seq_add(self.c_base, self.c_start - 1), ack=0, flags=SYN,
            window=min((c.window_raw or 65535) << (c.wscale if rec.wscale_ok and c.wscale else 0), 0xFFFF),
            tsval=self._client_tsval(), tsecr=0 if self.ts else None,
            mss=c.mss or DEFAULT_MSS, wscale=c.wscale if rec.wscale_ok else None,
            sack_permitted=rec.sack_ok,
        )

    def fence_old(self, rcv_nxt: int | None) -> Out | None:
        """A RST to the old primary on the client's behalf (its rcv_nxt exactly,
        as RFC 5961 receivers want), so it frees the socket."""
        if rcv_nxt is None:
            return None
        return Out(src=self.rec.client_ip, dst=self.old.ip, sport=self.rec.client_port, dport=self.old.port,
                   seq=rcv_nxt, ack=0, flags=RST, to="old")

    def fail(self, reason: str, now: float) -> list[Out]:
        """Reset both sides (fail closed)."""
        if not self.active:
            return []
        self.phase = Phase.FAILED
        self.reason = reason
        self._mark("failed_ms", now)
        rec = self.rec
        out: list[Out] = []
        out.extend(Out(src=self.vip, dst=rec.client_ip, sport=self.vport, dport=rec.client_port, seq=seq,
                       ack=rec.client.next_seq or 0, flags=RST | ACK, to="client") for seq in reset_seqs(rec))
        if self.b_isn is not None:
            out.append(Out(src=rec.client_ip, dst=self.target.ip, sport=rec.client_port, dport=self.target.port,
                           seq=seq_add(self.c_base, self.replay_acked), ack=0, flags=RST))
        return out

    # --- timers ---------------------------------------------------------------------------
    def next_timer(self) -> float | None:
        """When :meth:`poll` next has something to do (as aioquic's ``get_timer()``): the move's
        deadline, the next retransmission of the SYN or the replay, of what was sent to the
        client; None when nothing is pending."""
        if not self.active:
            return None
        times = []
        if self.phase is not Phase.SPLICED:
            times.append(self.t_start + self.opts.move_timeout)
        if self.phase is Phase.CONNECTING or (self.phase is Phase.REPLAYING):
            times.append(self.last_tx + self.rto)
        if self.retained:
            times.append(self.retained_tx + max(self.rto, INITIAL_RTO))
        if self.phase is Phase.SPLICED and self._fin_due():
            times.append(self.fin_tx + self.rto if self.fin_tx is not None else self.t_start)
        return min(times) if times else None

    def poll(self, now: float) -> list[Out]:
        if not self.active:
            return []
        if self.phase is not Phase.SPLICED and now - self.t_start > self.opts.move_timeout:
            return self.fail(f"move not done after {self.opts.move_timeout} s ({self.phase.value})", now)
        if self.phase is Phase.CONNECTING:
            if now - self.last_tx >= self.rto:
                if self.tries > self.opts.syn_retries:
                    return self.fail(f"backup {self.target.name} did not answer {self.tries} SYNs", now)
                self.last_tx = now
                self.rto = min(self.rto * 2, MAX_RTO)
                return [self._syn()]
            return []
        if self.retained and now - self.retained_tx >= max(self.rto, INITIAL_RTO):
            return self._resend_retained(now) + self._client_fin(now)
        if self.phase is Phase.SPLICED:
            return self._client_fin(now)
        if self.phase is Phase.REPLAYING:
            out = []
            self._maybe_spliced(now)
            if now - self.last_tx >= self.rto and self._replay_outstanding():
                self.replay_next = self.replay_acked
                self.fin_sent = False
                self.rto = min(self.rto * 2, MAX_RTO)
                self.stats["replay_retransmits"] += 1
            out += self._replay(now)
            return out
        return []

    def _fin_may_go(self) -> bool:
        """The client's FIN may go to the backup once the backup has regenerated what the primary
        had sent when the FIN was logged (``ByteLog.fin_server_offset``): the backup then gets it
        where the primary did — a server that reads to EOF before it answers gets it before its
        answer, a server that was answering gets it after the same bytes.  Unknown (a log of an
        older gateway): once the backup has caught up with everything the client has (a server
        may abort the response it is regenerating on a half-close)."""
        v = self.verifier
        if v.done:
            return True
        at = self.log.fin_server_offset
        return at is not None and v.mismatch_at is None and v.end >= min(at, self.snap.end)

    def _fin_to_replay(self) -> bool:
        """The client's FIN is logged and may go to the backup (:meth:`_fin_may_go`)."""
        return self.log.fin_offset is not None and self._fin_may_go()

    def _closed_both_ways(self) -> bool:
        """Both FINs sent and acknowledged, as far as the gateway knows: the backup's by the
        client (and that acknowledgment passed on to the backup), the client's by the backup.
        The backup's socket is closed (or in TIME_WAIT): anything more for it only draws a RST."""
        fin, b_fin = self.log.fin_offset, self.b_fin_end
        return (b_fin is not None and fin is not None and self.client_acked >= b_fin
                and self.acked_to_b >= b_fin and self.replay_acked > fin)

    def _fin_due(self) -> bool:
        """Spliced, the client's FIN is for the backup now and it has not acknowledged it."""
        log = self.log
        return (self._fin_to_replay() and log.fin_offset == log.end
                and self.replay_acked <= log.end and self.b_isn is not None)

    def _client_fin(self, now: float) -> list[Out]:
        """Spliced: the client's FIN, sent by the gateway (see the theory of operation), with the
        logged bytes before it that the backup has not acknowledged; resent after an RTO."""
        if self.phase is not Phase.SPLICED or not self._fin_due():
            return []
        if self.fin_tx is not None:
            if now - self.fin_tx < self.rto:
                return []
            self.rto = min(self.rto * 2, MAX_RTO)
            self.stats["fin_retransmits"] = self.stats.get("fin_retransmits", 0) + 1
        self.fin_tx = now
        out = []
        off, end = self.replay_acked, self.log.end
        limit = self.replay_acked + max(self.b_window, self.b_mss)
        while off < end and off < limit:
            data = self._read(off, min(self.b_mss, end - off, limit - off))
            if not data:
                break
            out.append(self._to_backend(seq_add(self.c_base, off), self._ack_value_for_backend(), ACK | PSH, data))
            off += len(data)
        if off == end:
            out.append(self._to_backend(seq_add(self.c_base, end), self._ack_value_for_backend(), ACK | FIN))
            self.stats["fins_sent"] = self.stats.get("fins_sent", 0) + 1
        return out

    def _synack_to_client(self, syn: SegmentLike) -> Out:
        """The primary's SYN-ACK as the client must see it, for a client that retransmits its SYN
        (it never got the primary's): the primary's ISN and options, the window in bytes (a SYN's
        is never scaled), a TSval not below one the client may have seen."""
        rec = self.rec
        s = rec.server
        tsval = tsecr = None
        if self.ts:
            if self.tr is not None and self.b_tsval is not None:
                tsval = self._ts_to_client(self.b_tsval)
            else:
                tsval = self.ts_high if self.ts_high is not None else (s.tsval or 0)
            tsecr = syn.tsval if syn.tsval is not None else (rec.client.tsval or 0)
        self.stats["synacks_resent"] = self.stats.get("synacks_resent", 0) + 1
        return Out(src=self.vip, dst=rec.client_ip, sport=self.vport, dport=rec.client_port,
                   seq=self.s_isn, ack=seq_add(self.c_isn, 1), flags=SYN | ACK,
                   window=min(s.max_window or s.window or 65535, 0xFFFF), tsval=tsval, tsecr=tsecr,
                   mss=s.mss, wscale=s.wscale if rec.client.wscale is not None else None,
                   sack_permitted=s.sack_permitted and rec.client.sack_permitted, to="client")

    def _replay_outstanding(self) -> bool:
        fin = 1 if self._fin_to_replay() else 0
        return self.replay_acked < self.log.end + fin

    def _read(self, offset: int, n: int) -> bytes:
        """Client stream bytes for the backup: the plan's prefix (a rewritten request) first."""
        p = self.plan
        if offset < p.log_from:
            i = offset - p.client_start
            return p.prefix[i:i + min(n, p.log_from - offset)]
        return self.log.read(offset, n)

    def _replay(self, now: float) -> list[Out]:
        out = []
        limit = self.replay_acked + max(self.b_window, self.b_mss)
        while self.replay_next < self.log.end and self.replay_next < limit:
            n = min(self.b_mss, self.log.end - self.replay_next, limit - self.replay_next)
            data = self._read(self.replay_next, n)
            n = len(data)
            out.append(self._to_backend(seq_add(self.c_base, self.replay_next), self._ack_value_for_backend(),
                                        ACK | PSH, data))
            self.replay_next += n
            self.stats["replayed_bytes"] += n
        if (self._fin_to_replay() and self.replay_next >= self.log.end and not self.fin_sent
                and self.log.fin_offset == self.log.end):
            out.append(self._to_backend(seq_add(self.c_base, self.log.end), self._ack_value_for_backend(), ACK | FIN))
            self.fin_sent = True
        if out:
            self.last_tx = now
        return out

    # --- segments from the backup ---------------------------------------------------------
    def on_backend(self, seg: SegmentLike, payload: bytes, now: float) -> Decision:
        d = self._on_backend(seg, payload, now)
        if self.active:
            d.inject += self._client_fin(now)  # the backup caught up, or has the bytes before the FIN
        return d

    def _on_backend(self, seg: SegmentLike, payload: bytes, now: float) -> Decision:
        if not self.active:
            return Decision(False)
        flags = seg.flags
        if flags & SYN:
            return self._on_synack(seg, now)
        if self.b_isn is None:
            return Decision(False)  # nothing but a SYN-ACK makes sense before the handshake
        if self.relearn and not flags & RST:
            failed = self._relearn_backend(seg, len(payload), now)
            if failed is not None:
                return Decision(False, inject=failed)
        if flags & RST:
            if self.phase is Phase.SPLICED and self._closed_both_ways():
                # the answer of the backup's closed socket to a stale segment (a duplicate ACK
                # that crossed the last one): the connection is over on both sides, the client
                # (in TIME_WAIT) must not be reset
                self.stats["late_rsts_dropped"] = self.stats.get("late_rsts_dropped", 0) + 1
                return Decision(False)
            if self.phase is Phase.SPLICED and self.verifier.done:
                self.phase = Phase.CLOSED
                self.reset_by = "backend"
                return Decision(True, self._rewrite_to_client(seg))
            return Decision(False, inject=self.fail("the backup reset the connection during the move", now))
        if seg.tsval is not None:
            self.b_tsval = seg.tsval
        if flags & ACK:
            acked = seq_diff(seg.ack, self.c_base)
            if acked > self.replay_acked:
                self.replay_acked = min(acked, self.log.end + (1 if self.log.fin_offset is not None else 0))
                self.rto = INITIAL_RTO
        self.b_window = seg.window << self.b_wscale
        out: list[Out] = []
        if self.phase is Phase.REPLAYING:
            out += self._replay(now)
            self._maybe_spliced(now)
        n = len(payload)
        if not n and not flags & FIN:
            if self.phase is Phase.SPLICED and self.verifier.done:
                return Decision(True, self._rewrite_to_client(seg), out)
            return Decision(False, inject=out)
        if self.s_start is None:
            return self._on_range_head(seg, payload, now, out)
        return self._on_backend_data(seg, payload, now, out)

    def _on_range_head(self, seg: SegmentLike, payload: bytes, now: float, out: list[Out]) -> Decision:
        """The backup's first bytes after a range request: collected (not acknowledged) until
        its answer's head is checked; then the mapping of its stream is known, and what was
        collected goes the usual way."""
        assert self.range_answer is not None and self.b_isn is not None and self.plan.range is not None
        raw = seq_diff(seg.seq, seq_add(self.b_isn, 1))
        have = len(self.range_buf)
        if raw > have or raw + len(payload) <= have:
            return Decision(False, inject=out)  # a gap (the backup resends) or old bytes
        new = payload[have - raw:]
        self.range_buf += new
        outcome = self.range_answer.feed(bytes(new))
        if outcome is None:
            if len(self.range_buf) > 64 * 1024:
                return Decision(False, inject=out + self.fail("range resume: no answer head in 64 KiB", now))
            return Decision(False, inject=out)
        kind, detail = outcome
        if kind == "fail":
            return Decision(False, inject=out + self.fail(str(detail), now))
        x = self.plan.range
        if kind == "range":
            self.range_head = int(detail)
            s_start = x.server_first - self.range_head
        else:  # a 200: the whole response again, verified from its start
            assert self.plan.full_from is not None and isinstance(self.snap, DigestSnapshot)
            s_start = self.plan.full_from
            self.verifier = StreamVerifier(self.snap, s_start)
        self.range_outcome = kind
        self.s_start = s_start
        self.b_base = seq_add(self.b_isn, 1 - s_start)
        self.acked_to_b = self.b_high = s_start
        assert self.tr is not None
        self.tr = dataclasses.replace(self.tr, seq_delta=(self.s_isn + s_start - self.b_isn) & MASK)
        data, flags = bytes(self.range_buf), seg.flags
        self.range_buf = bytearray()
        return self._on_backend_data(_Collected(seq_add(self.b_base, s_start), flags), data, now, out)

    def _on_synack(self, seg: SegmentLike, now: float) -> Decision:
        flags = seg.flags
        if not flags & ACK or seg.ack != seq_add(self.c_base, self.c_start):
            return Decision(False)
        if self.b_isn is None:
            rec = self.rec
            opts = seg.options
            self.b_isn = seg.seq
            # backup stream offsets are counted as offsets of the original server stream
            self.b_base = seq_add(seg.seq, 1 - (self.s_start or 0))
            self.b_mss = min(opts.mss or DEFAULT_MSS, rec.client.mss or DEFAULT_MSS)
            if self.ts:  # the MSS excludes options; replayed segments carry timestamps (RFC 6691)
                self.b_mss -= TS_OPTION_LEN
            self.b_wscale = opts.wscale if (rec.wscale_ok and opts.wscale is not None) else 0
            self.b_window = seg.window  # never scaled in a SYN
            ts_delta = 0
            if self.ts and seg.tsval is not None:
                self.b_tsval = self.b_ts_first = seg.tsval
                s = rec.server
                last_seen, when = (s.tsval, s.ts_last[0]) if s.ts_last else (s.tsval or 0, now)
                ts_delta = choose_ts_delta(last_seen or 0, now - when, s.tick_rate, seg.tsval)
                if self.ts_high is not None and seq_diff((seg.tsval + ts_delta) & MASK, self.ts_high) < 0:
                    ts_delta = (self.ts_high - seg.tsval) & MASK  # start the clock at the floor, not stuck below it
            self.tr = Translation(
                seq_delta=(self.s_isn + (self.s_start or 0) - seg.seq) & MASK,
                ts_delta=ts_delta,
                backend_wscale=self.b_wscale,
                client_view_wscale=rec.server.wscale if rec.wscale_ok and rec.server.wscale is not None else 0,
            )
            self.phase = Phase.REPLAYING
            self.rto = INITIAL_RTO
            self._mark("synack_ms", now)
        # (re)acknowledge the SYN-ACK, then replay
        out = [self._to_backend(seq_add(self.c_base, self.c_start), self._ack_value_for_backend(), ACK)]
        if self.phase is Phase.REPLAYING:
            out += self._replay(now)
            self._maybe_spliced(now)
        return Decision(False, inject=out)

    def _maybe_spliced(self, now: float) -> None:
        if self.phase is Phase.REPLAYING and not self._replay_outstanding():
            self.phase = Phase.SPLICED
            self._mark("replayed_ms", now)

    def _on_backend_data(self, seg: SegmentLike | _Collected, payload: bytes, now: float,
                         out: list[Out]) -> Decision:
        """A :class:`_Collected` ``seg``: ``payload`` is not the packet's own (bytes gathered from
        several): what may go to the client now is sent by the gateway, never by forwarding."""
        off = seq_diff(seg.seq, self.b_base)
        n = len(payload)
        end = off + n + (1 if seg.flags & FIN else 0)
        v = self.verifier
        if off > v.end:
            # a gap: drop it unacknowledged, and tell the backup where we are (its
            # fast retransmit wants duplicate ACKs, or it waits for its RTO)
            self.stats["gaps"] = self.stats.get("gaps", 0) + 1
            if not v.done:
                out.append(self._to_backend(seq_add(self.c_base, self.replay_acked),
                                            self._ack_value_for_backend(), ACK))
            return Decision(False, inject=out)
        if end > self.b_high:  # only now: a client ACK must never cover a segment dropped above (I6)
            self.b_high = end
        if n and not v.add(off, payload):
            return Decision(False, inject=out + self.fail(
                f"divergence: backup stream differs from what the client received (chunk at offset {v.mismatch_at})",
                now))
        if seg.flags & FIN and off + n < self.snap.end:
            return Decision(False, inject=out + self.fail(
                f"divergence: backup stream ended at {off + n}, the client has seen {self.snap.end} bytes", now))
        if seg.flags & FIN:
            if self.b_fin_out is not None and now - self.b_fin_out < INITIAL_RTO:
                # the backup sends its FIN again before the client's acknowledgment of it could
                # come back: its RTT estimate is the gateway's prompt answers, its tail loss probe
                # fires after a few ms, while its FIN still travels to the client and the ACK
                # back through the gateway.  Passed on, the client (in TIME_WAIT) would answer
                # the copy with a duplicate ACK that the backup, closed by the first, answers with
                # a RST.  Dropped, not acknowledged: a FIN that is really lost is sent again
                # after the backup's RTO (at least 200 ms), and that copy goes the usual way
                self.stats["fin_copies_dropped"] = self.stats.get("fin_copies_dropped", 0) + 1
                return Decision(False, inject=out)
            self.b_fin_end = off + n + 1
        if end <= self.client_acked:
            # the client has all of it: suppress, and acknowledge it ourselves
            self.stats["suppressed"] += 1
            self.stats["suppressed_bytes"] += n
            fin = 1 if (seg.flags & FIN and off + n == v.end) else 0
            ack_to = min(v.end + fin, self.client_acked)
            if ack_to > self.acked_to_b:
                self.acked_to_b = ack_to
            out.append(self._to_backend(seq_add(self.c_base, self.replay_acked), self._ack_value_for_backend(), ACK))
            return Decision(False, inject=out)
        good = v.verified_end()
        need = min(off + n, self.snap.end)
        if need <= good and isinstance(seg, _Collected):
            self.pending[off] = (bytes(payload), seg.flags)
            return Decision(False, inject=out + self._flush_pending(good, now))
        if need <= good:
            assert not isinstance(seg, _Collected)
            out += self._flush_pending(good, now)
            self.stats["forwarded"] += 1
            if seg.flags & FIN:
                self.b_fin_out = now
            if "first_forward_ms" not in self.timings:
                self._mark("first_forward_ms", now)
            return Decision(True, self._rewrite_to_client(seg), out)
        held = self.pending.get(off)
        if held is None or len(held[0]) < n:  # never replace held bytes by a shorter copy
            self.pending[off] = (bytes(payload), seg.flags)
        self.stats["buffered"] += 1
        out += self._flush_pending(good, now)  # earlier segments whose chunk this one completed
        if v.end > self.acked_to_b:  # ours to deliver now: let the backup send on
            self.acked_to_b = v.end
            out.append(self._to_backend(seq_add(self.c_base, self.replay_acked), self._ack_value_for_backend(), ACK))
        return Decision(False, inject=out)

    def _flush_pending(self, good: int, now: float) -> list[Out]:
        out = []
        if not self.retained:
            self.retained_tx = now  # the retransmission timer starts with the first delivery
        for off in sorted(self.pending):
            data, flags = self.pending[off]
            if min(off + len(data), self.snap.end) > good:
                break
            del self.pending[off]
            if off + len(data) > self.client_acked:
                self.retained[off] = (data, flags)
            out.append(self._client_out(off, data, flags, now))
        return out

    def _resend_retained(self, now: float) -> list[Out]:
        self.retained_tx = now
        self.client_dupacks = 0
        self.stats["retained_resent"] = self.stats.get("retained_resent", 0) + len(self.retained)
        return [self._client_out(off, data, flags, now) for off, (data, flags) in sorted(self.retained.items())]

    def _client_acked_to(self, acked: int, now: float) -> list[Out]:
        """Bookkeeping for the segments the gateway delivers itself."""
        if acked > self.client_acked:
            self.client_acked = acked
            self.client_dupacks = 0
            self.retained_tx = now  # progress: the retransmission timer restarts
            for off in [o for o, (d, _) in self.retained.items() if o + len(d) <= acked]:
                del self.retained[off]
            return []
        if self.retained and acked == self.client_acked and acked <= min(self.retained):
            self.client_dupacks += 1
            if self.client_dupacks >= 2:
                return self._resend_retained(now)
        return []

    def _ts_to_client(self, tsval: int | None) -> int | None:
        """The backend's TSval in the client's view, never below one already shown (I3)."""
        if tsval is None or self.tr is None:
            return None
        t = self.tr.tsval_to_client(tsval)
        if self.ts_high is not None and seq_diff(t, self.ts_high) < 0:
            self.stats["ts_raised"] = self.stats.get("ts_raised", 0) + 1
            return self.ts_high
        self.ts_high = t
        return t

    def _client_out(self, off: int, data: bytes, flags: int, now: float) -> Out:
        tr = self.tr
        assert tr is not None
        rec = self.rec
        if flags & FIN:
            self.b_fin_out = now
        return Out(
            src=self.vip, dst=rec.client_ip, sport=self.vport, dport=rec.client_port,
            seq=tr.seq_to_client(seq_add(self.b_base, off)), ack=rec.client.next_seq or 0,
            flags=(flags & (FIN | PSH)) | ACK,
            window=tr.window_to_client(self.b_window >> self.b_wscale),
            tsval=self._ts_to_client(self.b_tsval) if self.ts else None,
            tsecr=rec.client.tsval if self.ts else None, payload=data, to="client",
        )

    def _rewrite_to_client(self, seg: SegmentLike) -> Rewrite:
        tr = self.tr
        assert tr is not None
        shown = self.rec.server.ack
        return Rewrite(
            src=self.vip, sport=self.vport,
            seq=tr.seq_to_client(seg.seq),
            # never below an acknowledgment the client was shown (the primary's of the client's
            # FIN, before the backup has it): the client's own bytes, already logged
            ack=shown if seg.flags & ACK and shown is not None and seq_diff(seg.ack, shown) < 0 else None,
            window=tr.window_to_client(seg.window),
            tsval=self._ts_to_client(seg.tsval) if seg.tsval is not None else None,
            tsecr=seg.tsecr if seg.tsval is not None else None,
        )

    # --- segments from the client ----------------------------------------------------------
    def on_client(self, seg: SegmentLike, now: float) -> Decision:
        """A client segment of a moved connection (already tracked and logged)."""
        if not self.active:
            return Decision(False)
        flags = seg.flags
        if flags & SYN:
            if flags & (ACK | RST) or seg.seq != self.c_isn:
                return Decision(False)  # not this connection's SYN
            # the client never got the primary's SYN-ACK: give it again, never the SYN to the backup
            return Decision(False, inject=[self._synack_to_client(seg)])
        resend: list[Out] = []
        if flags & ACK:
            resend = self._client_acked_to(seq_diff(seg.ack, self.s_base), now)
        if self.phase is not Phase.SPLICED:
            if flags & RST:
                return Decision(False, inject=self.fail("the client reset the connection during the move", now))
            return Decision(False)
        if flags & FIN and not self._fin_may_go():
            # a FIN now would make the backup abort what it is regenerating (nginx does):
            # hold it, the gateway sends it once the backup has caught up
            self.stats["fins_held"] = self.stats.get("fins_held", 0) + 1
            return Decision(False, inject=resend)
        tr = self.tr
        assert tr is not None
        rw = Rewrite(dst=self.target.ip, dport=self.target.port)
        fin_at = self.log.fin_offset
        if (fin_at is not None and not flags & FIN and self.replay_acked <= fin_at and self.fin_tx is None
                and not self.fin_sent and seq_diff(seg.seq, self.c_base) > fin_at):
            # past a FIN the backup does not have yet (a client in FIN_WAIT_2 acknowledging data):
            # at the FIN's place, the backup's rcv_nxt, until the gateway has delivered it
            rw.seq = seq_add(self.c_base, fin_at)
        if flags & ACK:
            if self.relearn:  # restored, the backup not heard yet: it sent what the client acknowledges
                acked = seq_diff(tr.ack_to_backend(seg.ack), self.b_base)
                if 0 < acked - self.b_high < MAX_RELEARN_JUMP:
                    self.b_high = acked
            top = seq_add(self.b_base, self.b_high)
            absorbed = absorb_ack(tr.ack_to_backend(seg.ack), top)
            ack_b = absorbed.ack  # never acknowledge what the backup has not sent (I6)
            if absorbed.ahead:
                self.stats["acks_clamped"] += 1
            off = seq_diff(ack_b, self.b_base)
            if (seg.payload_len == 0 and not flags & (FIN | RST | SYN) and off <= self.acked_to_b
                    and (self.verifier.done is False or self.retained or self._closed_both_ways())):
                self.stats["acks_dropped"] += 1
                # nothing new for the backup: no duplicate ACKs while it catches up, and none
                # once both sides closed (the client in TIME_WAIT answering a FIN sent again:
                # the backup's closed socket would answer it with a RST)
                return Decision(False, inject=resend)
            if off > self.acked_to_b:
                self.acked_to_b = off
            rw.ack = ack_b
            opts = seg.options
            if opts.sack_blocks:
                blocks = tr.sack_to_backend(opts.sack_blocks)
                if all(seq_diff(r, top) <= 0 for _, r in blocks):
                    rw.sack = blocks
                else:
                    rw.strip_sack = True
        if seg.tsecr is not None and self.ts:
            tsecr = tr.tsecr_to_backend(seg.tsecr)
            if self.b_ts_first is not None and seq_diff(tsecr, self.b_ts_first) < 0:
                tsecr = self.b_ts_first  # an echo of the old primary's clock
            rw.tsecr = tsecr
        if flags & RST:
            self.phase = Phase.CLOSED
            self.reset_by = "client"
        return Decision(True, rw, resend)

    @property
    def regenerated_bytes(self) -> int:
        """Server bytes the backup sent again that the old primary had already sent (a range
        answer's head included)."""
        if self.s_start is None:
            return len(self.range_buf)
        return max(0, min(self.b_high, self.snap.end) - self.s_start)

    @property
    def strategy(self) -> str:
        if self.plan.strategy == "range" and self.range_outcome == "full":
            return "full"
        return self.plan.strategy

    def describe(self) -> dict[str, Any]:
        return {
            "phase": self.phase.value,
            "strategy": self.strategy,
            "strategy_reason": self.plan.reason if self.range_outcome != "full" else
            "the backup answered the range request with 200 (range ignored or validator changed)",
            "regenerated_bytes": self.regenerated_bytes,
            "replay_from": {"client": self.plan.client_start, "server": self.s_start},
            "range_head_bytes": self.range_head,
            "failure": self.reason,
            "from": self.old.name,
            "to": self.target.name,
            "timings_ms": dict(self.timings),
            "client_acked": self.client_acked,
            "verified": self.verifier.verified_end(),
            "to_verify": self.snap.end,
            "replayed": self.replay_acked,
            "log_bytes": self.log.end,
            "seq_delta": self.tr.seq_delta if self.tr else None,
            "ts_delta": self.tr.ts_delta if self.tr else None,
            **self.stats,
        }


@dataclass(frozen=True, slots=True)
class _Collected:
    """Backup bytes gathered across segments, handed on as one (``Splice._on_range_head``)."""

    seq: int
    flags: int
