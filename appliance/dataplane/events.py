"""What the data plane tells its owner, as typed events from one queue (``Dataplane.next_event()``).

Like h11's and aioquic's ``next_event()``: the engine never calls out; whatever the controller
must act on (report a move, probe a backend, say why a connection was reset) is queued here, in
the order it happened, and the owner drains the queue after each batch of packets and each timer
run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from checkpoint.ici import ConnectionRecord
from checkpoint.splice import Out, Splice


@dataclass(frozen=True, slots=True)
class Suspect:
    """A backend closed (FIN) or reset (RST) a connection; held until probed."""

    conn_id: int
    service: str
    backend: str
    kind: str               # "FIN" or "RST"
    rst: Out | None = None  # the RST to re-send to the client if the backend is fine


@dataclass(frozen=True, slots=True)
class MoveStarted:
    """A replay move began: the kernel must send the new backend's packets of this flow to the
    full-copy queue (before the SYN leaves, so the SYN-ACK is caught)."""

    splice: Splice


@dataclass(frozen=True, slots=True)
class MoveVerified:
    """A moved connection is spliced and everything the client had was verified: the move is done."""

    splice: Splice


@dataclass(frozen=True, slots=True)
class MoveEnded:
    """A splice ended, whatever the reason: failed (divergence, timeout), reset by the gateway,
    replaced by a later move, or its connection gone.  The one way a splice ends."""

    splice: Splice
    verified: bool     # a MoveVerified was given for it before


@dataclass(frozen=True, slots=True)
class CloseSuspected:
    suspect: Suspect


@dataclass(frozen=True, slots=True)
class ResumeRefused:
    """A re-attached connection cannot be resumed (tcpcp 6.1); it was reset."""

    rec: ConnectionRecord
    reason: str


@dataclass(frozen=True, slots=True)
class HalfOpenEvicted:
    """The table was full: half-open records were evicted for new connections (a SYN flood?)."""

    count: int      # since the last such event
    total: int


@dataclass(frozen=True, slots=True)
class HttpFallback:
    """HTTP tracking of a ``replay = "http"`` connection stopped (malformed or unexpected HTTP,
    a client log over its limit): a move of it is a stream replay from its last exchange boundary."""

    rec: ConnectionRecord
    side: str | None   # "client", "server", or None (not the peers' doing)
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """A connection is over, once per record: it closed or was reset (its state reached TIME_WAIT
    or CLOSED), or it left the table open (``why``: "idle", "evicted", "replaced")."""

    rec: ConnectionRecord
    why: str       # "closed", "reset", "idle", "evicted", "replaced"


EngineEvent = Union[MoveStarted, MoveVerified, MoveEnded, CloseSuspected, ResumeRefused, HalfOpenEvicted,
                    HttpFallback, ConnectionClosed]
