"""What the data plane knows of the configured services and backends, and its counters."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from checkpoint.splice import Endpoint

from ..config import BackendConfig, FailoverConfig, ServiceConfig


@dataclass
class BackendRuntime:
    name: str
    service: str
    address: str
    port: int
    raw: bytes
    admin_state: str = "ready"
    # cumulative, as HAProxy's bytes in/out: payload bytes forwarded to and from this backend,
    # whatever became of the connections that carried them
    bytes_from_client: int = 0
    bytes_from_server: int = 0

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
    http_fallbacks: int = 0   # HTTP-aware replay: connections whose HTTP tracking stopped (stream replay then)
    http_trims: int = 0       # client logs trimmed at an exchange boundary
    client_packets: int = 0
    server_packets: int = 0
    malformed_reasons: dict[str, int] = field(default_factory=dict)
    http_fallback_reasons: dict[str, int] = field(default_factory=dict)
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
            "http_fallbacks": self.http_fallbacks,
            "http_fallback_reasons": dict(self.http_fallback_reasons),
            "http_trims": self.http_trims,
            "client_packets": self.client_packets,
            "server_packets": self.server_packets,
            "malformed_reasons": dict(self.malformed_reasons),
            "last_foreign": self.last_foreign,
        }
