"""The wire tracker: updates a :class:`ConnectionRecord` from observed segments.

Theory of operation
-------------------
The gateway sees every segment of a connection, in both directions, in the
order the network delivered them to it — which is not always the order they
were sent: segments are retransmitted, reordered, duplicated and overlap.
The tracker therefore never *replaces* a sequence-space variable with the
latest value seen; it keeps the **highest plausible** value, compared modulo
2**32 (``checkpoint.seqnum``):

* ``next_seq`` (snd_nxt) = max over segments of seq + len (+1 for SYN, FIN);
* ``data_high`` = max end of payload, so ``bytes`` counts each stream byte once;
* ``ack`` = max acknowledgment sent; ``tsval`` = max TSval sent;
  ``ts_recent`` = max TSecr sent (the peer's TSval this end holds, RFC 7323);
* the window is taken only from segments carrying the newest ACK, so a late
  old segment cannot shrink it (RFC 793's SND.WL1/WL2 rule, simplified).

"Plausible" means less than 2**30 ahead (``seqnum.MAX_JUMP``): no TCP has
that much in flight, so a larger jump is garbage or another incarnation and is
counted in ``out_of_window`` instead of corrupting the record.

The state is *derived* from facts (SYN seen, SYN-ACK seen, handshake ACK seen,
FIN sequence each way and whether the peer acknowledged it, acceptable RST)
rather than stepped through transitions, so a reordered FIN or ACK cannot
leave it in a state the facts contradict.  A connection whose first segment is
not a SYN is picked up mid-stream: ISNs, MSS and window scale are unknown
(None) and ``mid_stream`` says so.

Pure functions of (record, segment, direction, now): no I/O, no clock.
"""

from __future__ import annotations

from .ici import ConnectionRecord, HalfConnection, TcpState
from .segment import ACK, FIN, RST, SYN, SegmentLike
from .seqnum import MAX_JUMP, advances, seq_add, seq_diff, seq_ge

# RFC 7323: the window field of a SYN is never scaled; the largest shift is 14.
MAX_WSCALE = 14


def observe(rec: ConnectionRecord, seg: SegmentLike, from_client: bool, now: float) -> None:
    """Fold one segment into ``rec``.  ``from_client`` gives its direction."""
    me, peer = (rec.client, rec.server) if from_client else (rec.server, rec.client)
    rec.last_seen = now
    me.segments += 1
    flags = seg.flags
    seq = seg.seq

    if flags & RST:
        if _rst_acceptable(me, peer, seg):
            rec.rst_seen = True
            rec.rst_from = "client" if from_client else "server"
            if rec.closed_at is None:
                rec.closed_at = now
            rec.state = TcpState.CLOSED
        else:
            me.out_of_window += 1
        return

    if flags & SYN:
        if not _observe_syn(rec, me, seg, from_client):
            rec.state = derive_state(rec)
            return  # another incarnation's SYN: counted, the record left alone
    elif me.next_seq is None:
        # Picked up mid-stream: this segment defines the origin of the stream.
        me.data_base = seq
        me.data_high = seq
        me.next_seq = seq
        if not rec.syn_seen:
            rec.mid_stream = True
    elif abs(seq_diff(seq, me.next_seq)) >= MAX_JUMP:
        me.out_of_window += 1
        return

    plen = seg.payload_len
    start = seq_add(seq, 1) if flags & SYN else seq
    if plen:
        dend = seq_add(start, plen)
        if me.data_high is None:
            me.data_high = dend
        elif advances(me.data_high, dend):
            me.data_high = dend
        else:
            me.retransmissions += 1
    end = seq_add(start, plen + (1 if flags & FIN else 0))
    if me.next_seq is None or advances(me.next_seq, end):
        me.next_seq = end
    if flags & FIN:
        fin = seq_add(start, plen)
        if me.fin_seq is None or advances(me.fin_seq, fin):
            me.fin_seq = fin

    if flags & ACK:
        ack = seg.ack
        if me.ack is None or advances(me.ack, ack):
            me.ack = ack
        if (
            from_client
            and rec.synack_seen
            and rec.server.isn is not None
            and seq_ge(ack, seq_add(rec.server.isn, 1))
        ):
            rec.established = True
        newest = me.ack == ack
    else:
        newest = True
    if newest:
        me.window_raw = seg.window
        shift = me.wscale if (rec.wscale_ok and not flags & SYN) else 0
        me.window = seg.window << (shift or 0)
        if me.window > me.max_window:
            me.max_window = me.window

    tsval = seg.tsval
    if tsval is not None:
        if me.tsval is None or advances(me.tsval, tsval):
            me.tsval = tsval
            me.ts_last = (now, tsval)
            if me.ts_first is None:
                me.ts_first = (now, tsval)
        tsecr = seg.tsecr
        if flags & ACK and tsecr:
            if me.ts_recent is None or advances(me.ts_recent, tsecr):
                me.ts_recent = tsecr

    rec.state = derive_state(rec)


def _observe_syn(rec: ConnectionRecord, me: HalfConnection, seg: SegmentLike, from_client: bool) -> bool:
    """False when the SYN carries another ISN than the one recorded."""
    opts = seg.options
    accepted = True
    if me.isn is None or me.isn == seg.seq:
        me.isn = seg.seq
        me.data_base = seq_add(seg.seq, 1)
        if me.data_high is None:
            me.data_high = me.data_base
        me.mss = opts.mss
        me.wscale = None if opts.wscale is None else min(opts.wscale, MAX_WSCALE)
        me.sack_permitted = opts.sack_permitted
        me.ts_offered = opts.tsval is not None
    else:
        me.retransmissions += 1  # a SYN with another ISN: counted, the first one kept
        accepted = False
    if from_client:
        if not seg.flags & ACK:
            rec.syn_seen = True
    elif seg.flags & ACK:
        rec.synack_seen = True
    return accepted


def _rst_acceptable(me: HalfConnection, peer: HalfConnection, seg: SegmentLike) -> bool:
    """A RST is believed when its sequence number is near what its sender is at
    (RFC 5961 asks for an exact match or a challenge; an observer in the middle
    accepts anything within the receiver's window)."""
    if me.next_seq is None:
        return True
    slack = max(peer.max_window, 65535) + 1
    return abs(seq_diff(seg.seq, me.next_seq)) <= slack


def _fin_acked(fin_seq: int | None, peer_ack: int | None) -> bool:
    return fin_seq is not None and peer_ack is not None and seq_ge(peer_ack, seq_add(fin_seq, 1))


def derive_state(rec: ConnectionRecord) -> TcpState:
    if rec.rst_seen:
        return TcpState.CLOSED
    c, s = rec.client, rec.server
    c_acked = _fin_acked(c.fin_seq, s.ack)
    s_acked = _fin_acked(s.fin_seq, c.ack)
    if c.fin_seq is not None and s.fin_seq is not None:
        return TcpState.TIME_WAIT if (c_acked and s_acked) else TcpState.LAST_ACK
    if c.fin_seq is not None:
        return TcpState.CLOSE_WAIT if c_acked else TcpState.FIN_WAIT
    if s.fin_seq is not None:
        return TcpState.CLOSE_WAIT if s_acked else TcpState.FIN_WAIT
    if rec.established or rec.mid_stream:
        return TcpState.ESTABLISHED
    if rec.synack_seen:
        return TcpState.SYN_RECV
    return TcpState.SYN_SENT
