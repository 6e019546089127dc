"""Sequence-space translation between the client's view and a new backend's.

After a replay failover the client still speaks the original connection —
the server's ISN and timestamps it learnt from the old primary — while the
backup has its own ISN and clock.  Everything that names the *server's*
sequence space or clock must be translated, both ways; the client's own
sequence space needs nothing (the backup was given the client's ISN).

=====================  backend -> client          client -> backend
sequence number        + seq_delta                (client space: unchanged)
acknowledgment         (client space)             - seq_delta, clamped (I6)
SACK blocks            (client space)             - seq_delta
TSval                  + ts_delta                 (client clock: unchanged)
TSecr                  (client clock)             - ts_delta
window                 rescaled backend -> primary  (client's scale: unchanged)
=====================  ====================      ========================

``seq_delta`` = client-view server ISN - backend ISN; ``ts_delta`` is chosen
once (from the first backend TSval) so that the client's view of the server
clock never goes backwards (tcpcp 4.5, 6.1).  All arithmetic is modulo 2**32;
the pairs are exact inverses, except the window, which is rescaled (rounded
down, so the client never believes in more window than the backend offered).
"""

from __future__ import annotations

from dataclasses import dataclass

from .seqnum import MASK


@dataclass(frozen=True, slots=True)
class Translation:
    seq_delta: int            # add to a backend sequence number for the client's view
    ts_delta: int             # add to a backend TSval for the client's view
    backend_wscale: int = 0   # scale in force for the backend's window field (0: none)
    client_view_wscale: int = 0  # scale the client applies to the server's window field

    # --- backend -> client -------------------------------------------------
    def seq_to_client(self, seq: int) -> int:
        return (seq + self.seq_delta) & MASK

    def tsval_to_client(self, tsval: int) -> int:
        return (tsval + self.ts_delta) & MASK

    def window_to_client(self, raw: int) -> int:
        return min((raw << self.backend_wscale) >> self.client_view_wscale, 0xFFFF)

    # --- client -> backend -------------------------------------------------
    def ack_to_backend(self, ack: int) -> int:
        return (ack - self.seq_delta) & MASK

    def tsecr_to_backend(self, tsecr: int) -> int:
        return (tsecr - self.ts_delta) & MASK

    def sack_to_backend(self, blocks: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
        return tuple(((left - self.seq_delta) & MASK, (right - self.seq_delta) & MASK) for left, right in blocks)

    # inverses, for checking and for segments the gateway builds itself
    def seq_to_backend(self, seq: int) -> int:
        return (seq - self.seq_delta) & MASK

    def ack_to_client(self, ack: int) -> int:
        return (ack + self.seq_delta) & MASK

    def tsecr_to_client(self, tsecr: int) -> int:
        return (tsecr + self.ts_delta) & MASK

    def tsval_to_backend(self, tsval: int) -> int:
        return (tsval - self.ts_delta) & MASK

    def sack_to_client(self, blocks: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
        return tuple(((left + self.seq_delta) & MASK, (right + self.seq_delta) & MASK) for left, right in blocks)


def choose_ts_delta(last_client_seen: int, elapsed: float, tick_rate: float | None, backend_tsval: int) -> int:
    """The TSval offset for a resumed connection (tcpcp 6.1): the first
    translated backend TSval is the last TSval the client saw plus a
    conservative estimate of the ticks elapsed since (rounded up, at least
    one tick, rate at least 1000 Hz: overestimating is harmless, going back
    in time is not)."""
    rate = max(tick_rate or 0.0, 1000.0)
    ticks = int(max(elapsed, 0.0) * rate) + 1
    return (last_client_seen + ticks - backend_tsval) & MASK
