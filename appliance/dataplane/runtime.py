"""What the data plane knows of the configured services and backends, and its counters."""

from __future__ import annotations

from dataclasses import dataclass, field

from checkpoint.addr import pack
from checkpoint.splice import Endpoint

from ..config import BackendConfig, FailoverConfig, ServiceConfig


@dataclass
class BackendRuntime:
    """A backend as the data plane sees it: one address per family the service answers on (a
    connection reaches it over its client's family: ``addr(v6)``)."""

    name: str
    service: str
    address: str | None   # IPv4
    port: int
    address6: str | None = None  # IPv6
    admin_state: str = "ready"
    raw: bytes = b""   # the addresses' bytes, as they are written into packets
    raw6: bytes = b""
    # cumulative, as HAProxy's bytes in/out: payload bytes forwarded to and from this backend,
    # whatever became of the connections that carried them
    bytes_from_client: int = 0
    bytes_from_server: int = 0

    @classmethod
    def from_config(cls, svc: ServiceConfig, b: BackendConfig) -> "BackendRuntime":
        return cls(name=b.name, service=svc.name, address=b.address, address6=b.address6, port=b.port,
                   admin_state=getattr(b, "admin_state", "ready"))

    def __post_init__(self) -> None:
        self.raw = pack(self.address) if self.address else b""
        self.raw6 = pack(self.address6) if self.address6 else b""

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(a for a in (self.address, self.address6) if a is not None)

    def addr(self, v6: bool) -> str:
        """The backend's address in the family of a connection (the config guarantees it has one)."""
        a = self.address6 if v6 else self.address
        if a is None:
            raise LookupError(f"backend {self.name} has no IPv{6 if v6 else 4} address")
        return a

    def endpoint(self, v6: bool) -> Endpoint:
        return Endpoint(self.name, self.addr(v6), self.port)


@dataclass
class ServiceRuntime:
    name: str
    vip: str | None    # IPv4 front
    port: int
    backends: dict[str, BackendRuntime]
    active: str
    failover: FailoverConfig
    vip6: str | None = None  # IPv6 front
    # the backend the kernel's stateless rule sends this service's client packets to (nfq.kernelnat;
    # set by whoever installs that rule, after it is in place), or None: no such rule
    kernel_target: str | None = None

    @property
    def vips(self) -> tuple[str, ...]:
        return tuple(a for a in (self.vip, self.vip6) if a is not None)

    def front(self, v6: bool) -> str:
        """The service address in the family of a connection."""
        a = self.vip6 if v6 else self.vip
        if a is None:
            raise LookupError(f"service {self.name} has no IPv{6 if v6 else 4} vip")
        return a

    def front_raw(self, v6: bool) -> bytes:
        return pack(self.front(v6))

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
    kernel_rewrites: int = 0  # client packets passed unchanged for the kernel's rule to rewrite
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
            "kernel_rewrites": self.kernel_rewrites,
            "http_fallbacks": self.http_fallbacks,
            "http_fallback_reasons": dict(self.http_fallback_reasons),
            "http_trims": self.http_trims,
            "client_packets": self.client_packets,
            "server_packets": self.server_packets,
            "malformed_reasons": dict(self.malformed_reasons),
            "last_foreign": self.last_foreign,
        }
