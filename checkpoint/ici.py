"""The ICI: everything the gateway knows about one TCP connection.

tcpcp (Almesberger 2004, Table 1) calls the state needed to re-create a TCP
endpoint its Internal Connection Information.  The gateway keeps the same
record, learnt from the wire instead of read from a socket, for both ends at
once: :class:`HalfConnection` holds what one end (client or server) has sent
and announced, :class:`ConnectionRecord` the pair plus identity and state.

All sequence numbers are as the *client* sees them on the wire: the server's
side is recorded after the gateway's rewriting (so after a failover, when the
server behind the gateway changed, the numbers the client knows stay valid).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .addr import family, with_port
from .seqnum import seq_diff
from .streamlog import ByteLog, SampledDigest, StreamDigest


class TcpState(str, Enum):
    """Connection state as an observer in the middle sees it (conntrack's model)."""

    SYN_SENT = "SYN_SENT"        # client SYN seen
    SYN_RECV = "SYN_RECV"        # server SYN-ACK seen
    ESTABLISHED = "ESTABLISHED"  # handshake completed (or picked up mid-stream)
    FIN_WAIT = "FIN_WAIT"        # one side sent FIN, not yet acknowledged
    CLOSE_WAIT = "CLOSE_WAIT"    # one side's FIN acknowledged, the other still open
    LAST_ACK = "LAST_ACK"        # both sides sent FIN, not both acknowledged
    TIME_WAIT = "TIME_WAIT"      # both FINs acknowledged
    CLOSED = "CLOSED"            # reset


@dataclass(slots=True)
class HalfConnection:
    """What one end of the connection has put on the wire."""

    isn: int | None = None          # initial sequence number (None: picked up mid-stream)
    data_base: int | None = None    # sequence number of stream byte 0 (isn+1, or first seen)
    next_seq: int | None = None     # highest seq + len (+SYN, +FIN) seen: snd_nxt
    data_high: int | None = None    # highest end of payload seen (no SYN/FIN)
    ack: int | None = None          # highest acknowledgment sent (rcv_nxt acknowledged)
    window_raw: int = 0             # last window field, unscaled
    window: int = 0                 # last window in bytes (scaled when scaling is on)
    max_window: int = 0             # largest window in bytes announced
    mss: int | None = None          # MSS option of its SYN
    wscale: int | None = None       # window-scale option of its SYN
    sack_permitted: bool = False    # SACK-permitted option in its SYN
    ts_offered: bool = False        # timestamp option in its SYN
    tsval: int | None = None        # latest (highest) TSval sent
    ts_recent: int | None = None    # highest TSecr sent: the peer's TSval it holds (RFC 7323)
    fin_seq: int | None = None      # sequence number of its FIN
    segments: int = 0
    retransmissions: int = 0        # segments whose data was entirely below data_high
    out_of_window: int = 0          # segments ignored as implausible
    # timestamp clock estimate: first and latest (now, tsval) samples
    ts_first: tuple[float, int] | None = None
    ts_last: tuple[float, int] | None = None

    @property
    def bytes(self) -> int:
        """Stream bytes sent so far (offset of the highest byte seen + 1)."""
        if self.data_base is None or self.data_high is None:
            return 0
        return max(0, seq_diff(self.data_high, self.data_base))

    @property
    def tick_rate(self) -> float | None:
        """Estimated timestamp clock rate in Hz (None until 0.5 s of samples)."""
        if self.ts_first is None or self.ts_last is None:
            return None
        dt = self.ts_last[0] - self.ts_first[0]
        if dt < 0.5:
            return None
        return seq_diff(self.ts_last[1], self.ts_first[1]) / dt


@dataclass(slots=True)
class ConnectionRecord:
    """One tracked connection: identity, state, both halves."""

    id: int
    client_ip: str
    client_port: int
    vip: str
    vport: int
    service: str
    backend: str
    backend_ip: str
    backend_port: int
    created: float
    last_seen: float
    client: HalfConnection = field(default_factory=HalfConnection)
    server: HalfConnection = field(default_factory=HalfConnection)
    state: TcpState = TcpState.SYN_SENT
    mid_stream: bool = False
    established: bool = False
    syn_seen: bool = False
    synack_seen: bool = False
    rst_seen: bool = False
    rst_from: str | None = None
    closed_at: float | None = None
    # failover protection (kept by the data plane): the client byte log and the
    # digest of the server stream (checkpoint.streamlog), None when not kept
    log: ByteLog | None = None
    digest: StreamDigest | SampledDigest | None = None
    moves: int = 0
    server_close_ok: bool = False   # a FIN/RST from this backend was vetted by a probe
    # the commit point (tcpcp 6.2): client stream bytes [0, commit_offset) are safe in
    # the checkpoint store, and the client's FIN too when commit_fin; the client is
    # never shown an acknowledgment above it (invariant I1)
    commit_offset: int = 0
    commit_fin: bool = False

    @property
    def protected(self) -> bool:
        return self.unprotected_reason is None

    @property
    def unprotected_reason(self) -> str | None:
        if self.mid_stream:
            return "picked up mid-stream: no log from the SYN"
        if self.log is None or self.digest is None:
            return "no client log"
        if self.log.overflow:
            return self.log.overflow
        if self.digest.overflow:
            return self.digest.overflow
        return None

    @property
    def key(self) -> tuple[str, int, str, int]:
        return (self.client_ip, self.client_port, self.vip, self.vport)

    @property
    def wscale_ok(self) -> bool:
        """Window scaling is in effect only when both SYNs carried the option."""
        return self.client.wscale is not None and self.server.wscale is not None

    @property
    def sack_ok(self) -> bool:
        return self.client.sack_permitted and self.server.sack_permitted

    @property
    def ts_ok(self) -> bool:
        return self.client.ts_offered and self.server.ts_offered

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        """The connection's JSON document (REST API, panel)."""
        c, s = self.client, self.server
        return {
            "id": self.id,
            "client": with_port(self.client_ip, self.client_port),
            "family": family(self.client_ip),
            "service": with_port(self.vip, self.vport),
            "service_name": self.service,
            "backend": self.backend,
            "backend_address": with_port(self.backend_ip, self.backend_port),
            "state": self.state.value,
            "mid_stream": self.mid_stream,
            "client_isn": c.isn,
            "server_isn": s.isn,
            "client_next_seq": c.next_seq,
            "server_next_seq": s.next_seq,
            "client_ack": c.ack,
            "server_ack": s.ack,
            "client_window": c.window,
            "server_window": s.window,
            "client_wscale": c.wscale,
            "server_wscale": s.wscale,
            "wscale_ok": self.wscale_ok,
            "client_mss": c.mss,
            "server_mss": s.mss,
            "sack_permitted": self.sack_ok,
            "timestamps": self.ts_ok,
            "client_tsval": c.tsval,
            "server_tsval": s.tsval,
            "client_ts_recent": c.ts_recent,
            "server_ts_recent": s.ts_recent,
            "client_tick_rate": c.tick_rate,
            "server_tick_rate": s.tick_rate,
            "bytes_from_client": c.bytes,
            "bytes_from_server": s.bytes,
            "segments_from_client": c.segments,
            "segments_from_server": s.segments,
            "retransmissions_from_client": c.retransmissions,
            "retransmissions_from_server": s.retransmissions,
            "client_fin_seq": c.fin_seq,
            "server_fin_seq": s.fin_seq,
            "rst_from": self.rst_from,
            "protected": self.protected,
            "unprotected_reason": self.unprotected_reason,
            "log_bytes": self.log.end if self.log is not None else 0,
            "log_held": (self.log.end - self.log.base) if self.log is not None else 0,
            "server_bytes_hashed": self.digest.end if self.digest is not None else 0,
            "moves": self.moves,
            "commit_offset": self.commit_offset,
            "commit_lag": (self.log.end - self.commit_offset) if self.log is not None else 0,
            "created": self.created,
            "last_seen": self.last_seen,
            "idle_seconds": None if now is None else round(now - self.last_seen, 3),
        }
