"""The last packets of each connection, as the gateway received them, for a pcap download.

A bounded ring per flow: ``per_flow`` packets of at most ``snaplen`` bytes
each (headers and the start of the payload), for at most ``flows`` flows
(the least recently active flow is forgotten first): at most
``flows * per_flow * snaplen`` bytes, 20 MiB with the defaults.  A flow is
keyed by its client address and port, which both directions carry (source of
client->VIP packets, destination of backend->client ones), so one lookup
serves the connection whichever backend it is on, before and after a move.

The daemon calls :meth:`PacketRing.record` with each queued packet before the
data plane handles (and rewrites) it; :meth:`pcap` writes a connection's
packets as a pcap file (LINKTYPE_RAW: IP packets without a link header, the
family read from each packet's version nibble, so one file carries IPv4 and
IPv6 packets and tcpdump, Wireshark and scapy decode both).  Keys hold the
address's bytes: 4 for IPv4, 16 for IPv6.
"""

from __future__ import annotations

import struct
from collections import OrderedDict, deque
from collections.abc import Iterator
from typing import Any

from checkpoint.addr import pack
from nfq.packet import MalformedPacket, ipv6_tcp_offset

from .pcap import LINKTYPE_RAW, tcp_fields


def _addresses(obj: Any, *names: str) -> Iterator[bytes]:
    """The bytes of each address attribute ``obj`` has and sets (``vip``, ``vip6``...)."""
    for name in names:
        a = getattr(obj, name, None)
        if isinstance(a, str) and a:
            yield pack(a)


def addresses_ports(buf: bytes | bytearray | memoryview) -> tuple[bytes, bytes, int, int] | None:
    """(source, destination, source port, destination port) of an IPv4 or IPv6 TCP packet
    (addresses as 4 or 16 bytes), or None: not TCP, or its ports not captured."""
    n = len(buf)
    if n < 40:
        return None
    version = buf[0] >> 4
    if version == 4:
        if buf[9] != 6:
            return None
        off = (buf[0] & 15) * 4
        src, dst = bytes(buf[12:16]), bytes(buf[16:20])
    elif version == 6:
        if buf[6] == 6:
            off = 40
        else:
            try:
                off = ipv6_tcp_offset(buf, n, 40 + struct.unpack_from("!H", buf, 4)[0])
            except MalformedPacket:
                return None
        src, dst = bytes(buf[8:24]), bytes(buf[24:40])
    else:
        return None
    if n < off + 4:
        return None
    sport, dport = struct.unpack_from("!HH", buf, off)
    return src, dst, sport, dport


class PacketRing:
    def __init__(self, gw: Any, per_flow: int = 128, snaplen: int = 160, flows: int = 1024) -> None:
        self.gw = gw
        self.per_flow = per_flow
        self.snaplen = snaplen
        self.max_flows = flows
        self._flows: OrderedDict[tuple[bytes, int], deque[tuple[float, int, bytes]]] = OrderedDict()
        self._fronts: set[tuple[bytes, int]] = set()
        self._backs: set[tuple[bytes, int]] = set()
        for s in gw.dataplane.services.values():
            for raw in _addresses(s, "vip", "vip6"):
                self._fronts.add((raw, s.port))
            for b in s.backends.values():
                for raw in _addresses(b, "address", "address6"):
                    self._backs.add((raw, b.port))
        self.recorded = 0

    def record(self, buf: bytes | bytearray | memoryview, now: float) -> None:
        f = addresses_ports(buf)
        if f is None:
            return
        src, dst, sport, dport = f
        if (dst, dport) in self._fronts:
            key = (src, sport)
        elif (src, sport) in self._backs:
            key = (dst, dport)
        else:
            return
        ring = self._flows.get(key)
        if ring is None:
            if len(self._flows) >= self.max_flows:
                self._flows.popitem(last=False)
            ring = self._flows[key] = deque(maxlen=self.per_flow)
        else:
            self._flows.move_to_end(key)
        ring.append((now, len(buf), bytes(buf[:self.snaplen])))
        self.recorded += 1

    def packets(self, cid: int) -> list[tuple[float, int, bytes]]:
        rec = self.gw.dataplane.table.by_id(cid)
        return [] if rec is None else self.packets_of(rec)

    def packets_of(self, rec: Any) -> list[tuple[float, int, bytes]]:
        """The record's packets (its flow's, from its creation on: not an earlier incarnation's)."""
        ring = self._flows.get((pack(rec.client_ip), rec.client_port))
        if not ring:
            return []
        since = rec.created
        return [p for p in ring if p[0] >= since]

    def pcap(self, cid: int) -> bytes:
        return self._pcap(self.packets(cid))

    def pcap_of(self, rec: Any) -> bytes:
        """The record's packets as a pcap file (the history copies it when the connection ends)."""
        return self._pcap(self.packets_of(rec))

    def first_fin(self, rec: Any) -> str | None:
        """Who sent the first FIN among the record's packets here: "client", "server" or None."""
        client = pack(rec.client_ip)
        for _, _, data in self.packets_of(rec):
            f = tcp_fields(data)
            if f is not None and f[6] & 0x01:
                return "client" if f[0] == client else "server"
        return None

    def _pcap(self, packets: list[tuple[float, int, bytes]]) -> bytes:
        out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, self.snaplen, LINKTYPE_RAW)]
        for t, length, data in packets:
            sec = int(t)
            out.append(struct.pack("<IIII", sec, int((t - sec) * 1e6), len(data), length))
            out.append(data)
        return b"".join(out)


def attach(gw: Any, **kwargs: Any) -> PacketRing:
    ring = PacketRing(gw, **kwargs)
    gw.packet_ring = ring
    return ring


def of(gw: Any) -> PacketRing | None:
    return getattr(gw, "packet_ring", None)
