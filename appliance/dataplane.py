"""The per-packet logic of the gateway: classify, track, translate addresses.

Theory of operation
-------------------
Every packet of a service reaches :meth:`Dataplane.handle` as the bytes of
an IPv4 datagram (from the NFQUEUE binding, or from a test).  It is one of:

* **client -> service** (held: a full copy, rewritten here): destination is
  a service's VIP:port.  The connection's record is looked up by the client
  4-tuple, or admitted (a new connection is pinned to the service's *active*
  backend at that moment); the tracker folds the segment in, and the
  destination is rewritten to the record's backend.  Sequence numbers are
  untouched: the client's view is the wire's.
* **server -> client** (observed: a header-only copy, GSO super-packets
  whole): source is a backend's address:port.  The record is found by the
  destination (client) 4-tuple and the tracker folds the segment in; the
  packet passes unchanged and the kernel rewrites its source to the VIP
  (``nfq.kernelnat``).  A packet from a backend that is not the record's
  backend is dropped (it belongs to a connection that moved).
* anything else is passed untouched (counted as ``foreign``).

Packets that cannot be parsed are counted and accepted or dropped according to
``gateway.on_malformed``; a packet that would open a connection in a full
table is dropped (the client retransmits its SYN) and counted.

Sans-I/O: ``handle(buf, now)`` only reads and rewrites ``buf`` and returns a
:class:`~nfq.queue.Verdict`.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from checkpoint.ici import ConnectionRecord
from checkpoint.table import ConnectionTable, Timeouts
from nfq.packet import MalformedPacket, PacketView
from nfq.queue import Verdict

from .config import BackendConfig, Config, ServiceConfig


@dataclass
class BackendRuntime:
    name: str
    service: str
    address: str
    port: int
    raw: bytes

    @classmethod
    def from_config(cls, svc: ServiceConfig, b: BackendConfig) -> "BackendRuntime":
        return cls(name=b.name, service=svc.name, address=b.address, port=b.port, raw=socket.inet_aton(b.address))


@dataclass
class ServiceRuntime:
    name: str
    vip: str
    port: int
    vip_raw: bytes
    backends: dict[str, BackendRuntime]
    active: str

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
    client_packets: int = 0
    server_packets: int = 0
    malformed_reasons: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "malformed": self.malformed,
            "foreign": self.foreign,
            "untracked": self.untracked,
            "table_full_drops": self.table_full_drops,
            "fenced_drops": self.fenced_drops,
            "client_packets": self.client_packets,
            "server_packets": self.server_packets,
            "malformed_reasons": dict(self.malformed_reasons),
        }


class Dataplane:
    def __init__(self, config: Config) -> None:
        self.config = config
        t = config.gateway.timeouts
        self.table = ConnectionTable(
            max_connections=config.gateway.max_connections,
            timeouts=Timeouts(opening=t.opening, established=t.established, closing=t.closing, finished=t.finished),
        )
        self.counters = DataplaneCounters()
        self.malformed_verdict = Verdict.DROP if config.gateway.on_malformed == "drop" else Verdict.ACCEPT
        self.services: dict[str, ServiceRuntime] = {}
        self._fronts: dict[tuple[bytes, int], ServiceRuntime] = {}
        self._backs: dict[tuple[bytes, int], tuple[ServiceRuntime, BackendRuntime]] = {}
        for svc in config.services:
            backends = {b.name: BackendRuntime.from_config(svc, b) for b in svc.backends}
            rt = ServiceRuntime(
                name=svc.name, vip=svc.vip, port=svc.port, vip_raw=socket.inet_aton(svc.vip),
                backends=backends, active=svc.backends[0].name,
            )
            self.services[svc.name] = rt
            self._fronts[(rt.vip_raw, rt.port)] = rt
            for b in backends.values():
                self._backs[(b.raw, b.port)] = (rt, b)

    def handle(self, buf: bytearray, now: float) -> Verdict:
        try:
            pv = PacketView(buf, allow_truncated=True)
        except MalformedPacket as exc:
            return self._malformed(str(exc))
        sport, dport = pv.ports
        svc = self._fronts.get((bytes(buf[16:20]), dport))
        if svc is not None:
            return self._from_client(pv, svc, sport, dport, now)
        hit = self._backs.get((bytes(buf[12:16]), sport))
        if hit is not None:
            return self._from_server(pv, hit[0], hit[1], dport, now)
        self.counters.foreign += 1
        return Verdict.ACCEPT

    def _from_client(self, pv: PacketView, svc: ServiceRuntime, sport: int, dport: int, now: float) -> Verdict:
        self.counters.client_packets += 1
        if pv.truncated:  # larger than the queue copies: cannot be rewritten here
            return self._malformed("truncated client packet")
        key = (pv.src, sport, svc.vip, dport)
        table = self.table
        rec = table.get(key)
        if rec is None or rec.state.value in ("TIME_WAIT", "CLOSED"):
            be = svc.active_backend
            rec = table.admit(
                key, pv, service=svc.name, backend=be.name, backend_ip=be.address, backend_port=be.port, now=now,
            )
            if rec is None:
                if pv.flags & 0x04:  # a stray RST: nothing to track, let it reach the backend
                    self.counters.untracked += 1
                    self._to_backend(pv, svc, svc.active_backend)
                    return Verdict.REWRITTEN
                self.counters.table_full_drops += 1
                return Verdict.DROP
        table.observe(rec, pv, True, now)
        self._to_backend(pv, svc, svc.backends[rec.backend])
        return Verdict.REWRITTEN

    @staticmethod
    def _to_backend(pv: PacketView, svc: ServiceRuntime, be: BackendRuntime) -> None:
        pv.set_dst(be.raw)
        if be.port != svc.port:
            pv.set_dport(be.port)

    def _from_server(self, pv: PacketView, svc: ServiceRuntime, be: BackendRuntime, dport: int, now: float) -> Verdict:
        self.counters.server_packets += 1
        rec = self.table.get((pv.dst, dport, svc.vip, svc.port))
        if rec is None:
            # Not tracked (table full, or expired): the kernel still translates it.
            self.counters.untracked += 1
        elif rec.backend != be.name:
            self.counters.fenced_drops += 1
            return Verdict.DROP
        else:
            self.table.observe(rec, pv, False, now)
        return Verdict.ACCEPT

    def _malformed(self, why: str) -> Verdict:
        c = self.counters
        c.malformed += 1
        reason = why.split(" (")[0].split(":")[0]
        c.malformed_reasons[reason] = c.malformed_reasons.get(reason, 0) + 1
        return self.malformed_verdict

    def connections(self) -> list[ConnectionRecord]:
        return list(self.table)
