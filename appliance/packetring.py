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
packets as a pcap file (LINKTYPE_RAW: IPv4 packets without a link header).
"""

from __future__ import annotations

import socket
import struct
from collections import OrderedDict, deque
from typing import Any

LINKTYPE_RAW = 101


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
            self._fronts.add((s.vip_raw, s.port))
            for b in s.backends.values():
                self._backs.add((b.raw, b.port))
        self.recorded = 0

    def record(self, buf: bytes | bytearray, now: float) -> None:
        if len(buf) < 40 or buf[9] != 6:
            return
        ihl = (buf[0] & 15) * 4
        if len(buf) < ihl + 4:
            return
        sport, dport = struct.unpack_from("!HH", buf, ihl)
        if (bytes(buf[16:20]), dport) in self._fronts:
            key = (bytes(buf[12:16]), sport)
        elif (bytes(buf[12:16]), sport) in self._backs:
            key = (bytes(buf[16:20]), dport)
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
        ring = self._flows.get((socket.inet_aton(rec.client_ip), rec.client_port))
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
        client = socket.inet_aton(rec.client_ip)
        for _, _, data in self.packets_of(rec):
            ihl = (data[0] & 15) * 4
            if len(data) > ihl + 13 and data[ihl + 13] & 0x01:
                return "client" if data[12:16] == client else "server"
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
