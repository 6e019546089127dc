"""tcpcp 6.1: the rules for resuming a connection from a checkpoint behind the wire.

Theory of operation
-------------------
A checkpoint is a picture of the connection at one moment; by the time it is
used (after a failover, or after the appliance itself restarted) the
connection may have moved on: "the sender may have enqueued more data, the
receiver may have acknowledged more data, the receiver may have retrieved
more data, thereby growing its window".  tcpcp section 6.1 lists what can go
wrong and how to avoid it; this module is that list as pure functions:

* **Sequence numbers may have wrapped.**  Sequence numbers compare modulo
  2**32, so a checkpoint is only usable while less than 2**31 bytes were sent
  since it and it is younger than the MSL (two minutes, RFC 9293), after which
  old duplicates may still be about.  :func:`check_resumable` refuses a
  checkpoint older than the MSL or from which either direction may have sent
  2**31 bytes (estimated conservatively from its observed byte rate), and
  :func:`bytes_since` measures the distance exactly once a segment from the
  live connection is seen -- or says it cannot be told apart.
* **Timestamps must not go back (PAWS).**  The new sender's clock must start
  above the last TSval the peer saw *plus* the ticks elapsed since:
  :func:`estimate_tsval` estimates it high (the observed tick rate times a
  margin, or RFC 7323's fastest clock, 1000 Hz, when the rate is unknown).
  Overestimating is harmless (the peer only sees a clock that ran fast);
  underestimating makes the peer drop every segment as old.  The splice takes
  it as its floor (``Splice(..., ts_floor=...)``).
* **The peer may acknowledge more than the new sender has sent.**  "If the
  sequence number is above snd_nxt, the sender would exceptionally treat this
  as a valid acknowledgment": :func:`absorb_ack` accepts such an ACK, clamps
  what is passed on to snd_nxt (so the new sender never sees an ACK for data
  it has not sent, which TCP would ignore or answer with a challenge) and
  says how far ahead the peer is (the output it may skip).

Times: ``now``, ``checkpoint_time`` and the record's own times (``created``,
``last_seen``, the ``ts_first``/``ts_last`` samples) must be on one clock.  A
record from another host or an earlier boot is moved onto this one's with
:func:`rebased` first.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .ici import ConnectionRecord, HalfConnection
from .seqnum import HALF, MASK, MAX_JUMP, seq_diff

MSL = 120.0                 # seconds (RFC 9293 section 3.4.2: two minutes)
FASTEST_TS_HZ = 1000.0      # RFC 7323 section 5.4: at most one tick per millisecond
SLOWEST_TS_HZ = 1.0         # ... and at least one per second
FUTURE_TOLERANCE = 1.0      # seconds a checkpoint may appear to be from the future (clock steps)


def check_resumable(rec: ConnectionRecord, checkpoint_time: float, now: float, msl: float = MSL, *,
                    client_seq: int | None = None, server_seq: int | None = None) -> str | None:
    """None if ``rec``, checkpointed at ``checkpoint_time``, may be resumed at ``now``;
    else why not.  ``client_seq``/``server_seq``: a sequence number seen on the wire
    from that end since (exact, instead of the estimate from the byte rate)."""
    age = now - checkpoint_time
    if age < -FUTURE_TOLERANCE:
        return f"checkpoint is {-age:.1f} s in the future: the clocks disagree"
    age = max(age, 0.0)
    if age > msl:
        return f"checkpoint is {age:.1f} s old, over the MSL of {msl:g} s"
    for name, half, seen in (("client", rec.client, client_seq), ("server", rec.server, server_seq)):
        if seen is not None:
            if half.next_seq is None:
                return f"the {name}'s sequence numbers were never seen: its progress cannot be told"
            d = bytes_since(half, seen)
            if d is None:
                return (f"the {name} is at sequence {seen}, which cannot be told apart modulo 2**32 "
                        f"from the checkpoint's {half.next_seq}: 2**31 bytes or more may have passed")
            continue
        est = estimate_bytes_since(rec, half, age)
        if est >= HALF:
            return (f"the {name} may have sent 2**31 bytes or more since the checkpoint "
                    f"(about {est:.3g} at its average rate over {age:.1f} s)")
    return None


def estimate_bytes_since(rec: ConnectionRecord, half: HalfConnection, age: float) -> float:
    """Bytes ``half`` may have sent in ``age`` seconds: its average rate over the
    connection's life so far (bytes / (last_seen - created)) times ``age``.  A
    connection with bytes and no measurable life counts them as sent in 1 ms."""
    if half.bytes == 0 or age <= 0:
        return 0.0
    life = max(rec.last_seen - rec.created, 1e-3)
    return half.bytes / life * age


def bytes_since(half: HalfConnection, seg_seq: int) -> int | None:
    """How far ``seg_seq``, seen on the wire after the resume, is past the
    checkpoint's ``next_seq``: positive, bytes sent since; zero or negative, a
    retransmission of older data.  None when the distance cannot be told modulo
    2**32: 2**31 or more ahead looks behind, so anything behind by more than a
    window could (MAX_JUMP, the largest scaled window) is refused."""
    if half.next_seq is None:
        return None
    d = seq_diff(seg_seq & MASK, half.next_seq)
    if d < -MAX_JUMP:
        return None
    return d


def estimate_tsval(half: HalfConnection, checkpoint_time_mono: float, now: float,
                   margin: float = 1.25) -> int | None:
    """The TSval ``half`` may have reached by ``now``, estimated high (tcpcp 6.1):
    its last TSval plus the ticks since it was seen -- since the earlier of its
    sample time (``ts_last``) and the checkpoint -- at its observed tick rate
    times ``margin`` (at least 1 Hz, RFC 7323's slowest), or at 1000 Hz (the
    fastest) when the rate is unknown.  Modulo 2**32; None without a TSval."""
    if half.tsval is None:
        return None
    seen_at = checkpoint_time_mono if half.ts_last is None else min(half.ts_last[0], checkpoint_time_mono)
    elapsed = max(now - seen_at, 0.0)
    rate = half.tick_rate
    hz = FASTEST_TS_HZ if rate is None else max(rate, SLOWEST_TS_HZ) * margin
    return (half.tsval + math.ceil(elapsed * hz)) & MASK


@dataclass(frozen=True, slots=True)
class AbsorbedAck:
    ack: int     # the acknowledgment to pass to the sender: never above its snd_nxt
    ahead: int   # bytes the peer acknowledged beyond snd_nxt (0: none): output it may skip


def absorb_ack(ack: int, snd_nxt: int) -> AbsorbedAck:
    """A peer's acknowledgment for a resumed sender whose send sequence is at
    ``snd_nxt``.  Above it (the peer got more from the old sender than the
    checkpoint knew) it is valid, not an error: passed on as ``snd_nxt``, the
    excess reported in ``ahead``.  At or below it, passed on unchanged."""
    d = seq_diff(ack & MASK, snd_nxt)
    if d > 0:
        return AbsorbedAck(snd_nxt & MASK, d)
    return AbsorbedAck(ack & MASK, 0)


def rebased(rec: ConnectionRecord, delta: float) -> ConnectionRecord:
    """A copy of ``rec`` with every time moved by ``delta`` seconds (onto another
    clock: ``delta`` = this clock's now - the recording clock's now).  The log and
    digest are shared, not copied."""
    def half(h: HalfConnection) -> HalfConnection:
        return dataclasses.replace(
            h,
            ts_first=None if h.ts_first is None else (h.ts_first[0] + delta, h.ts_first[1]),
            ts_last=None if h.ts_last is None else (h.ts_last[0] + delta, h.ts_last[1]),
        )
    return dataclasses.replace(
        rec, created=rec.created + delta, last_seen=rec.last_seen + delta,
        closed_at=None if rec.closed_at is None else rec.closed_at + delta,
        client=half(rec.client), server=half(rec.server),
    )
