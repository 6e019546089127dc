"""The transparency contract (DESIGN.md I1-I6), checked from a capture at the client.

``check(pcap, ...)`` reads a full-payload capture taken on the client's
interface and returns, for every connection the client opened during the
capture, every violation it finds:

* I1: an acknowledgment (ACK or SACK block) the client received for a byte
  it had not sent yet (in memory mode a byte is logged before it leaves the
  gateway, so "sent by the client" is the observable bound); and, when the
  caller passes the gateway's commit log (``commits``: client port -> the
  records of ``/api/v1/store/commits``), for a byte not yet committed when
  the acknowledgment was captured (before the first commit not even the SYN
  may be acknowledged);
* I2: a byte received at a stream offset that differs from the byte received
  there before (values of volatile fields, such as the HTTP Date header, are
  allowed to differ, as the gateway masks them for its own check);
* I3: a server segment that PAWS would discard: its TSval is below the
  client's TS.Recent, kept by RFC 7323's rule (updated from segments that
  start at or before the last acknowledgment the client sent).  Raw arrival
  order is not the test: a Linux sender's retransmission can carry a lower
  TSval than a later-scheduled segment (paced departure times), which PAWS
  accepts because it fills the hole at the left edge;
* I4: any RST from the service, or a FIN before the end of the stream;
* stream holes: bytes of the final stream never seen in the capture.

All sequence and TSval arithmetic is modulo 2**32.

Both families: ``client_ip`` and ``vip`` are address strings of one family
(IPv4 or IPv6, as ``ipaddress`` or any other writer prints them); the
packets of that family between them are read (IPv6 extension headers walked
by the data plane's own rules, :func:`nfq.packet.ipv6_tcp_offset`), the rest
of the capture ignored.  Connections are keyed by the client's port: with
the client address, the VIP and its port fixed, the port names a connection
in either family.

A small pcap reader (struct) keeps it fast enough for 100 MiB captures.
"""

from __future__ import annotations

import bisect
import socket
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from appliance.pcap import packets
from nfq.packet import MalformedPacket, ipv6_tcp_offset

DATE = b"\r\nDate: "
DATE_LEN = 29


@dataclass
class ConnReport:
    client_port: int
    violations: list[str] = field(default_factory=list)
    server_bytes: int = 0
    segments: int = 0
    rsts: int = 0
    tsval_checks: int = 0
    commit_checks: int = 0

    def add(self, what: str) -> None:
        if len(self.violations) < 20:
            self.violations.append(what)


def _in_date(data: bytearray, pos: int) -> bool:
    start = max(0, pos - DATE_LEN - len(DATE))
    i = data.rfind(DATE, start, pos + 1)
    return i >= 0 and i + len(DATE) <= pos < i + len(DATE) + DATE_LEN


def _signed(a: int, b: int) -> int:
    """a - b modulo 2**32, in [-2**31, 2**31)."""
    return ((a - b + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


def _commit_limits(commits: list[dict]) -> tuple[list[float], list[int]]:
    """(times, client bytes acknowledgeable from then on: the commit offset, +1 for a committed FIN)."""
    times, allowed = [], []
    for c in sorted(commits, key=lambda c: c["t"]):
        times.append(c["t"])
        allowed.append(c["commit_offset"] + (1 if c["commit_fin"] else 0))
    return times, allowed


def check(pcap: Path, client_ip: str, vip: str, vport: int,
          commits: dict[int, list[dict]] | None = None) -> dict[int, ConnReport]:
    v6 = ":" in client_ip
    if (":" in vip) != v6:
        raise ValueError(f"client {client_ip} and VIP {vip} are not of one family")
    family = socket.AF_INET6 if v6 else socket.AF_INET
    cip, sip = socket.inet_pton(family, client_ip), socket.inet_pton(family, vip)
    limits = {port: _commit_limits(log) for port, log in (commits or {}).items()}
    client_isn: dict[int, int] = {}
    reports: dict[int, ConnReport] = {}
    isn: dict[int, int] = {}
    stream: dict[int, bytearray] = defaultdict(bytearray)
    have: dict[int, list[tuple[int, int]]] = defaultdict(list)
    client_high: dict[int, int] = {}
    ts_recent: dict[int, int] = {}
    last_ack_sent: dict[int, int] = {}
    fins: dict[int, int] = {}
    opened: set[int] = set()
    for t, p in packets(pcap):
        if v6:
            if len(p) < 60 or p[0] >> 4 != 6:
                continue
            total = 40 + struct.unpack_from("!H", p, 4)[0]
            try:
                ihl = ipv6_tcp_offset(p, len(p), total)  # the TCP header's offset, past extension headers
            except MalformedPacket:
                continue  # not TCP, or not readable: not a packet of the checked connections
            src, dst = p[8:24], p[24:40]
        else:
            if len(p) < 40 or p[0] >> 4 != 4 or p[9] != 6:
                continue
            ihl = (p[0] & 15) * 4
            total = struct.unpack_from("!H", p, 2)[0]
            src, dst = p[12:16], p[16:20]
        if len(p) < ihl + 20:
            continue
        sport, dport, seq, ack = struct.unpack_from("!HHII", p, ihl)
        thl = (p[ihl + 12] >> 4) * 4
        flags = p[ihl + 13]
        payload = p[ihl + thl:total]
        opts = p[ihl + 20:ihl + thl]
        tsval = None
        sack_right: list[int] = []  # the right edges of SACK blocks
        o = 0
        while o < len(opts):
            k = opts[o]
            if k == 0:
                break
            if k == 1:
                o += 1
                continue
            if o + 1 >= len(opts) or opts[o + 1] < 2:
                break
            if k == 8 and opts[o + 1] == 10:
                tsval = struct.unpack_from("!I", opts, o + 2)[0]
            elif k == 5:
                for e in range(o + 6, min(o + opts[o + 1], len(opts)) - 3, 8):
                    sack_right.append(struct.unpack_from("!I", opts, e)[0])
            o += opts[o + 1]
        if src == cip and dst == sip and dport == vport:
            port = sport
            if flags & 0x02 and not flags & 0x10:
                opened.add(port)
                client_isn[port] = seq
            r = reports.setdefault(port, ConnReport(port))
            # the length on the wire, not what the capture kept (a short snaplen truncates)
            end = (seq + total - ihl - thl + (1 if flags & 3 else 0)) & 0xFFFFFFFF
            if port not in client_high or ((end - client_high[port]) & 0xFFFFFFFF) < (1 << 31):
                client_high[port] = end
            if flags & 0x10 and (port not in last_ack_sent
                                 or ((ack - last_ack_sent[port]) & 0xFFFFFFFF) < (1 << 31)):
                last_ack_sent[port] = ack
        elif src == sip and dst == cip and sport == vport:
            port = dport
            r = reports.setdefault(port, ConnReport(port))
            r.segments += 1
            if flags & 0x04:
                r.rsts += 1
                r.add(f"I4: RST from the service at seq {seq}")
                continue
            if flags & 0x02:
                isn[port] = seq
            if flags & 0x10 and port in client_high:
                if _signed(ack, client_high[port]) > 0:
                    r.add(f"I1: ACK {ack} above what the client sent ({client_high[port]})")
                for edge in sack_right:
                    if _signed(edge, client_high[port]) > 0:
                        r.add(f"I1: SACK up to {edge} above what the client sent ({client_high[port]})")
            if flags & 0x10 and port in limits:
                if port not in client_isn:
                    r.add("I1: no client SYN in the capture: the commit log cannot be checked")
                else:
                    times, allowed = limits[port]
                    i = bisect.bisect_right(times, t) - 1
                    limit = allowed[i] if i >= 0 else -1  # before the first commit not even the SYN
                    base = (client_isn[port] + 1) & 0xFFFFFFFF
                    r.commit_checks += 1
                    if _signed(ack, base) > limit:
                        r.add(f"I1: ACK of {_signed(ack, base)} client bytes at {t:.6f}, committed then: {limit}")
                    for edge in sack_right:
                        if _signed(edge, base) > limit:
                            r.add(f"I1: SACK up to {_signed(edge, base)} client bytes at {t:.6f}, "
                                  f"committed then: {limit}")
            if tsval is not None:
                r.tsval_checks += 1
                recent = ts_recent.get(port)
                if recent is not None and ((tsval - recent) & 0xFFFFFFFF) >= (1 << 31):
                    r.add(f"I3: TSval {tsval} below TS.Recent {recent}: PAWS would drop it")
                elif recent is None or flags & 0x02 or (port in last_ack_sent and (
                        (last_ack_sent[port] - seq) & 0xFFFFFFFF) < (1 << 31)):
                    ts_recent[port] = tsval
            if port not in isn:
                continue
            off = (seq - isn[port] - (0 if flags & 0x02 else 1)) & 0xFFFFFFFF
            if flags & 0x02:
                off = 0
            if off >= 1 << 31:  # before the first byte (a keep-alive probe's seq is snd_una - 1)
                if payload or flags & 0x01:  # bytes or a FIN there: no stream offset, no 4 GiB buffer for it
                    r.add(f"I2: segment at seq {seq}, before the server's first byte ({isn[port]} + 1)")
                continue
            if flags & 0x01:
                fin_at = off + len(payload)
                if port in fins and fins[port] != fin_at:
                    r.add(f"I4: FIN at offset {fin_at}, earlier one at {fins[port]}")
                fins.setdefault(port, fin_at)
            if not payload:
                continue
            data = stream[port]
            if off + len(payload) > len(data):
                data.extend(b"\0" * (off + len(payload) - len(data)))
            # compare with what was received before at these offsets
            for lo, hi in have[port]:
                a, b = max(lo, off), min(hi, off + len(payload))
                if a < b:
                    old = data[a:b]
                    new = payload[a - off:b - off]
                    if old != new:
                        bad = [a + i for i in range(b - a) if old[i] != new[i]]
                        if not all(_in_date(data, x) for x in bad):
                            r.add(f"I2: byte at offset {bad[0]} changed ({len(bad)} bytes differ)")
            data[off:off + len(payload)] = payload
            iv = have[port]
            iv.append((off, off + len(payload)))
            iv.sort()
            merged = [iv[0]]
            for lo, hi in iv[1:]:
                if lo <= merged[-1][1]:
                    merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
                else:
                    merged.append((lo, hi))
            have[port] = merged
    # only the connections opened during the capture: stragglers of earlier
    # tests (a late FIN answered by a RST from a server that forgot them) are not ours
    reports = {p: r for p, r in reports.items() if p in opened}
    for port, r in reports.items():
        iv = have.get(port, [])
        r.server_bytes = iv[-1][1] if iv else 0
        if len(iv) > 1:
            r.add(f"holes in the received stream: {iv[:3]}...")
        if port in fins and fins[port] != r.server_bytes:
            r.add(f"I4: FIN at offset {fins[port]} but the stream has {r.server_bytes} bytes")
    return reports


def assert_clean(reports: dict[int, ConnReport], expect_connections: int | None = None) -> None:
    bad = {p: r.violations for p, r in reports.items() if r.violations}
    assert not bad, f"transparency violations: {bad}"
    if expect_connections is not None:
        assert len(reports) == expect_connections, f"{len(reports)} connections in the capture"
    assert all(r.tsval_checks for r in reports.values()), "no timestamps seen: capture broken?"
