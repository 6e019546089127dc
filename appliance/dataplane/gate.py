"""The delayed-ACK gate (tcpcp 6.2, invariant I1): one stage every packet to a client passes.

Theory of operation
-------------------
With a checkpoint store on disk (``store.mode = "disk"``, :mod:`checkpoint.store`) a logged
client byte is safe only once its group commit is durable, so the client must not be told
earlier that it arrived.  Every packet to the client is checked against the connection's commit
point (:meth:`AckGate.allowed`): a segment carrying data (or a FIN, or a RST) has its ACK field
clamped to the commit point and SACK blocks above it stripped, and the client is *owed* the rest;
a pure ACK or a SYN-ACK above it is held — the newest one per connection — and sent by the
gateway when the commit catches up (:meth:`AckGate.committed`: its source rewritten to the VIP,
its TSval raised to the newest the client saw, its ACK the commit point if that is still lower).
Segments the gateway sends itself are clamped too (:meth:`AckGate.clamp_outbox`).  The gate
also keeps the highest acknowledgment each client was let see: a client that has not heard of
the commit point (after a restart or a pair's takeover, what it was told died with the old
process) gets a pure ACK lowered to it at once rather than held, so it resends from there
instead of waiting for its retransmission timer.  With
``store.mode = "memory"`` there is no gate: the commit point is the log's end.
"""

from __future__ import annotations

from collections.abc import Callable

from checkpoint.addr import pack
from checkpoint.ici import ConnectionRecord
from checkpoint.segment import ACK, FIN, RST, SYN
from checkpoint.seqnum import seq_add, seq_diff
from checkpoint.splice import Out
from checkpoint.table import ConnectionTable
from nfq.build import tcp_options, tcp_packet
from nfq.packet import PacketView
from nfq.queue import Verdict

from .runtime import DataplaneCounters, ServiceRuntime


class AckGate:
    def __init__(self, table: ConnectionTable, counters: DataplaneCounters, send: Callable[[bytearray], None],
                 translated: Callable[[int], bool]) -> None:
        self.table = table
        self.counters = counters
        self.send = send                # a whole packet the gateway sends (a held ACK, released)
        self.translated = translated    # is this connection moved (its TSvals are the splice's)?
        self.held: dict[int, bytearray] = {}  # conn id -> newest held ACK, in the client's view
        # conn id -> the highest ACK the client was let see (absent: not known, as after a restart
        # or a pair's takeover, where the client may be further behind than the commit point)
        self.told: dict[int, int] = {}

    @staticmethod
    def allowed(rec: ConnectionRecord) -> int | None:
        """The highest ACK the client may see: ISN + 1 + committed bytes (+1 for a committed
        FIN); the ISN itself (not even the SYN) before the record is durable.  None: no limit
        known (no client ISN), or none needed: a log that stopped (``max_log_bytes``, the store
        full, bytes that bypassed the queues) makes the connection unprotected, its commit point
        no longer moves, and holding the client's acknowledgments at it would stall it."""
        isn = rec.client.isn
        if isn is None or rec.log is None or rec.log.overflow is not None:
            return None
        return seq_add(isn, 1 + rec.commit_offset + (1 if rec.commit_fin else 0))

    def forget(self, cid: int) -> None:
        self.held.pop(cid, None)
        self.told.pop(cid, None)

    def _tell(self, cid: int, ack: int) -> None:
        told = self.told.get(cid)
        if told is None or seq_diff(ack, told) > 0:
            self.told[cid] = ack

    def check(self, rec: ConnectionRecord, pv: PacketView, verdict: Verdict,
              svc: ServiceRuntime | None = None) -> Verdict:
        """Clamp or hold a packet to the client whose ACK is above the commit point.  ``svc`` is
        given for a packet still in the backend's addressing (the kernel would rewrite its
        source): a held copy is readdressed here."""
        flags = pv.flags
        if not flags & ACK or flags & RST:
            return verdict
        allowed = self.allowed(rec)
        if allowed is None:
            self.held.pop(rec.id, None)  # superseded by what goes out now, unclamped
            return verdict
        ack = pv.ack
        if seq_diff(ack, allowed) <= 0:
            held = self.held.get(rec.id)
            if held is not None and seq_diff(ack, PacketView(held).ack) >= 0:
                del self.held[rec.id]  # superseded by what goes out now
            self._tell(rec.id, ack)
            return verdict
        if pv.payload_len == 0 and not flags & FIN:
            # a pure ACK (or the SYN-ACK): keep the newest, send it when the commit catches up
            held = bytearray(pv.buf)
            if svc is not None:
                hv = PacketView(held)
                hv.set_src(pack(rec.vip))
                if hv.ports[0] != svc.port:
                    hv.set_sport(svc.port)
            self.held[rec.id] = held
            self.counters.acks_held += 1
            told = self.told.get(rec.id)
            if not flags & SYN and (told is None or seq_diff(allowed, told) > 0):
                # the client has not even heard of the commit point (a restart, a takeover: what it
                # was told died with the old process): it goes out now, lowered to it
                return self._lower(rec, pv, allowed)
            return Verdict.DROP
        if flags & SYN:  # a SYN-ACK with data: hold it too (never seen in practice)
            self.counters.acks_held += 1
            return Verdict.DROP
        # the client is owed this acknowledgment: a pure ACK carrying it waits for the commit
        # (else a FIN acknowledged late is retransmitted to a peer that has closed: RST)
        src, sport = (rec.vip, svc.port) if svc is not None else (pv.src, pv.ports[0])
        owed = tcp_packet(src, pv.dst, sport, pv.ports[1], seq_add(pv.seq, pv.payload_len + (1 if flags & FIN else 0)),
                          ack, ACK, pv.window, tcp_options(tsval=pv.tsval, tsecr=pv.tsecr), b"")
        self.held[rec.id] = bytearray(owed)
        return self._lower(rec, pv, allowed)

    def _lower(self, rec: ConnectionRecord, pv: PacketView, allowed: int) -> Verdict:
        """The packet goes out acknowledging the commit point, no SACK block above it."""
        pv.set_ack(allowed)
        if pv.options.sack_blocks:
            pv.strip_sack()
        self._echo_latest(rec, pv)
        self._tell(rec.id, allowed)
        self.counters.acks_clamped += 1
        return Verdict.REWRITTEN

    @staticmethod
    def _echo_latest(rec: ConnectionRecord, pv: PacketView) -> None:
        """A lowered acknowledgment echoes the client's newest TSval, not the backend's echo.  The
        backend's may be far older: after a takeover the backend holds bytes the log lacks, so
        the client's resent segments are duplicates to it, which never refresh its TS.Recent;
        that old echo would give the client an RTT sample of the whole outage for every ACK,
        and its retransmission timer would back off to a minute while it resends the gap one
        segment at a time."""
        latest, tsecr = rec.client.tsval, pv.tsecr
        if latest is not None and tsecr is not None and seq_diff(latest, tsecr) > 0:
            tsval = pv.tsval
            assert tsval is not None  # (both live in the one option)
            pv.set_timestamps(tsval, latest)

    def committed(self, recs: list[ConnectionRecord]) -> None:
        """Commit points moved (the store's batch is durable): send the held ACKs they now
        cover, or lowered to the new commit point."""
        for rec in recs:
            held = self.held.get(rec.id)
            if held is None:
                continue
            allowed = self.allowed(rec)
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
                self._echo_latest(rec, ov)
            ts = rec.server.tsval
            tsecr = ov.tsecr
            if ov.tsval is not None and tsecr is not None and ts is not None and not syn \
                    and not self.translated(rec.id):
                if seq_diff(ts, ov.tsval) > 0:  # I3: never older than what the client saw
                    ov.set_timestamps(ts, tsecr)
            self._tell(rec.id, ov.ack)
            self.send(out)
            self.counters.acks_released += 1

    def clamp_outbox(self, outbox: list[Out]) -> None:
        """I1 for the segments the gateway itself sends to clients."""
        for o in outbox:
            if o.to != "client" or not o.flags & ACK:
                continue
            rec = self.table.get((o.dst, o.dport, o.src, o.sport))
            if rec is None or rec.log is None:
                continue
            allowed = self.allowed(rec)
            if allowed is not None and seq_diff(o.ack, allowed) > 0:
                o.ack = allowed
                self.counters.acks_clamped += 1
