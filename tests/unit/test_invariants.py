"""The checker checked: tests/lab/invariants.py against small crafted client
captures, one per violation of the transparency contract (DESIGN.md I1-I6),
and clean captures (also with sequence numbers and TSvals wrapping past 2**32)
that must pass; the same over IPv6 (and a capture holding both families).
No root, no lab: scapy writes the pcap files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from scapy.all import IP, TCP, IPv6, IPv6ExtHdrDestOpt, Raw, wrpcap

from tests.lab.invariants import ConnReport, assert_clean, check

CLIENT, VIP, VPORT, CPORT = "192.0.2.10", "203.0.113.10", 80, 40000
CLIENT6, VIP6 = "2001:db8:2::10", "2001:db8:113::10"
M = 1 << 32
REQUEST = b"GET /f HTTP/1.1\r\n\r\n"  # 19 bytes
BODY = [b"A" * 100, b"B" * 100, b"C" * 50]  # the server's stream: 250 bytes


@dataclass
class Flow:
    """One client connection, built packet by packet.  Offsets are stream
    offsets (0 = the first byte after the SYN); ``ack`` is the offset in the
    other side's stream the segment acknowledges."""

    cisn: int = 1_000
    sisn: int = 7_000_000
    cts: int = 500
    sts: int = 90_000
    t: float = 1_700_000_000.0
    v6: bool = False
    ext: bool = False  # IPv6: a destination options header before TCP in every packet
    pkts: list = field(default_factory=list)

    @property
    def addrs(self) -> tuple[str, str]:
        """(client, VIP) of this flow's family."""
        return (CLIENT6, VIP6) if self.v6 else (CLIENT, VIP)

    def _ip(self, src: str, dst: str):
        if not self.v6:
            return IP(src=src, dst=dst)
        return IPv6(src=src, dst=dst) / IPv6ExtHdrDestOpt() if self.ext else IPv6(src=src, dst=dst)

    def _seg(self, client: bool, off: int, ack: int | None, flags: str, data: bytes,
             tsval: int | None = None, extra_opts: list | None = None) -> float:
        self.t += 0.001
        if client:
            self.cts += 1
            ts = (self.cts if tsval is None else tsval, self.sts)
            ip, tcp = self._ip(*self.addrs), TCP(sport=CPORT, dport=VPORT)
            seq, peer = self.cisn, self.sisn
        else:
            self.sts += 1
            ts = (self.sts if tsval is None else tsval, self.cts)
            ip, tcp = self._ip(*reversed(self.addrs)), TCP(sport=VPORT, dport=CPORT)
            seq, peer = self.sisn, self.cisn
        tcp.seq = (seq + 1 + off) % M
        tcp.ack = 0 if ack is None else (peer + 1 + ack) % M
        tcp.flags = flags
        tcp.options = [("NOP", None), ("NOP", None), ("Timestamp", (ts[0] % M, ts[1] % M))] + (extra_opts or [])
        p = ip / tcp / Raw(data) if data else ip / tcp
        p.time = self.t
        self.pkts.append(p)
        return self.t

    def client(self, off: int, data: bytes = b"", ack: int | None = None, flags: str = "PA", **kw) -> float:
        return self._seg(True, off, ack, flags, data, **kw)

    def server(self, off: int, data: bytes = b"", ack: int | None = None, flags: str = "PA", **kw) -> float:
        return self._seg(False, off, ack, flags, data, **kw)

    def handshake(self) -> None:
        self.client(-1, flags="S")
        self.server(-1, ack=0, flags="SA")
        self.client(0, ack=0, flags="A")

    def check(self, tmp_path: Path, **kw) -> dict[int, ConnReport]:
        pcap = tmp_path / "client.pcap"
        wrpcap(str(pcap), self.pkts)
        return check(pcap, *self.addrs, VPORT, **kw)


def request_and_first_two(f: Flow) -> None:
    """Handshake, the request, 200 bytes of answer (the second segment
    retransmitted with identical bytes), the client's ACK of them."""
    f.handshake()
    f.client(0, REQUEST, ack=0)
    f.server(0, ack=19, flags="A")
    f.server(0, BODY[0], ack=19)
    f.server(100, BODY[1], ack=19)
    f.client(19, ack=200, flags="A")
    f.server(100, BODY[1], ack=19)  # a retransmission of the same bytes: fine


def clean(f: Flow) -> Flow:
    request_and_first_two(f)
    f.client(19, b"more", ack=200)
    f.server(200, BODY[2], ack=23, flags="FPA")  # the last bytes and the FIN: offset 250
    f.client(23, ack=251, flags="FA")
    f.server(251, ack=24, flags="A")
    return f


def violations(reports: dict[int, ConnReport]) -> list[str]:
    assert list(reports) == [CPORT]
    return reports[CPORT].violations


def assert_caught(reports: dict[int, ConnReport], tag: str, *words: str) -> None:
    found = [v for v in violations(reports) if v.startswith(tag)]
    assert found, f"{tag} not reported: {violations(reports)}"
    assert any(all(w in v for w in words) for v in found), f"{tag} message lacks {words}: {found}"
    with pytest.raises(AssertionError, match="transparency violations"):
        assert_clean(reports)


# the clean captures ----------------------------------------------------------


def test_clean_capture_passes(tmp_path: Path) -> None:
    reports = clean(Flow()).check(tmp_path)
    assert_clean(reports, expect_connections=1)
    r = reports[CPORT]
    assert r.server_bytes == 250 and r.rsts == 0 and r.tsval_checks > 0


@pytest.mark.parametrize("flow", [
    Flow(cisn=M - 10, sisn=M - 120, cts=M - 4, sts=M - 3),  # everything wraps mid-stream
    Flow(cisn=M - 1, sisn=M - 1),                            # the SYN is the last sequence number
    Flow(cisn=M - 20, sisn=M - 201),                         # a wrap on a segment boundary
], ids=["mid-stream", "at-syn", "on-boundary"])
def test_clean_capture_wrapping_past_2_32_passes(tmp_path: Path, flow: Flow) -> None:
    reports = clean(flow).check(tmp_path)
    assert_clean(reports, expect_connections=1)
    assert reports[CPORT].server_bytes == 250


def test_clean_capture_within_the_commit_log_passes(tmp_path: Path) -> None:
    f = Flow(cisn=M - 5)
    f.client(-1, flags="S")
    commits = [{"t": f.t + 0.0001, "commit_offset": 0, "commit_fin": False}]
    f.server(-1, ack=0, flags="SA")
    f.client(0, ack=0, flags="A")
    f.client(0, REQUEST, ack=0)
    commits.append({"t": f.t + 0.0001, "commit_offset": 19, "commit_fin": False})
    f.server(0, BODY[0], ack=19)
    f.client(19, ack=100, flags="FA")
    commits.append({"t": f.t + 0.0001, "commit_offset": 19, "commit_fin": True})
    f.server(100, ack=20, flags="FA")
    f.client(20, ack=101, flags="A")
    reports = f.check(tmp_path, commits={CPORT: commits})
    assert_clean(reports, expect_connections=1)
    assert reports[CPORT].commit_checks == 3


def test_keepalive_probe_before_any_data_passes(tmp_path: Path) -> None:
    f = Flow(sisn=M - 1)
    f.handshake()
    f.server(-1, ack=0, flags="A")  # seq = snd_una - 1 = the ISN: no stream offset, no violation
    f.client(0, ack=0, flags="A")
    assert_clean(f.check(tmp_path), expect_connections=1)


# one capture per violation ---------------------------------------------------


def test_rst_to_the_client_is_caught(tmp_path: Path) -> None:
    f = Flow()
    request_and_first_two(f)
    f.server(200, ack=19, flags="R")
    reports = f.check(tmp_path)
    assert_caught(reports, "I4", "RST")
    assert reports[CPORT].rsts == 1


def test_early_fin_from_the_server_is_caught(tmp_path: Path) -> None:
    f = Flow()
    f.handshake()
    f.client(0, REQUEST, ack=0)
    f.server(0, BODY[0], ack=19, flags="FPA")  # a FIN after 100 bytes (the old primary closing) ...
    f.server(100, BODY[1], ack=19)             # ... and the stream goes on
    f.server(200, BODY[2], ack=19)
    assert_caught(f.check(tmp_path), "I4", "FIN", "100")


def test_early_fin_then_the_real_one_is_caught(tmp_path: Path) -> None:
    f = Flow()
    f.handshake()
    f.client(0, REQUEST, ack=0)
    f.server(0, BODY[0], ack=19, flags="FPA")
    f.server(100, BODY[1], ack=19)
    f.server(200, BODY[2], ack=19, flags="FPA")
    assert_caught(f.check(tmp_path), "I4", "FIN", "100")


def test_changed_byte_in_a_retransmission_is_caught(tmp_path: Path) -> None:
    f = Flow()
    request_and_first_two(f)
    f.server(100, b"B" * 50 + b"X" + b"B" * 49, ack=19)  # offset 150 differs
    assert_caught(f.check(tmp_path), "I2", "offset 150")


def test_changed_byte_in_an_overlapping_segment_is_caught(tmp_path: Path) -> None:
    f = Flow(sisn=M - 150)  # and across the wrap
    request_and_first_two(f)
    f.server(180, b"B" * 19 + b"Y" + BODY[2], ack=19)  # overlaps 180..200, offset 199 differs
    assert_caught(f.check(tmp_path), "I2", "offset 199")


def test_bytes_before_the_servers_isn_are_caught(tmp_path: Path) -> None:
    f = Flow(sisn=50)  # and across the wrap
    request_and_first_two(f)
    f.server(-101, b"Z" * 10, ack=19)  # an offset of -100: another connection's bytes, or a broken rewrite
    assert_caught(f.check(tmp_path), "I2", "before the server's first byte")


def test_ack_of_bytes_the_client_never_sent_is_caught(tmp_path: Path) -> None:
    f = Flow()
    request_and_first_two(f)
    f.server(200, BODY[2], ack=19 + 1000)
    assert_caught(f.check(tmp_path), "I1", "above what the client sent")


def test_ack_of_bytes_never_sent_across_the_wrap_is_caught(tmp_path: Path) -> None:
    f = Flow(cisn=M - 10)  # the client's last byte is below 2**32, the ACK above
    request_and_first_two(f)
    f.server(200, BODY[2], ack=20)
    assert_caught(f.check(tmp_path), "I1", "above what the client sent")


def test_sack_of_bytes_the_client_never_sent_is_caught(tmp_path: Path) -> None:
    f = Flow()
    request_and_first_two(f)
    block = ((f.cisn + 1 + 100) % M, (f.cisn + 1 + 200) % M)
    f.server(200, BODY[2], ack=19, extra_opts=[("NOP", None), ("NOP", None), ("SAck", block)])
    assert_caught(f.check(tmp_path), "I1", "SACK")


def test_server_tsval_going_backwards_is_caught(tmp_path: Path) -> None:
    f = Flow(sts=M - 20)  # TS.Recent just below 2**32, the bad TSval "below" it modulo 2**32
    request_and_first_two(f)  # the client acknowledged 200: TS.Recent is the first data segment's TSval
    f.server(200, BODY[2], ack=19, tsval=M - 1000)
    assert_caught(f.check(tmp_path), "I3", "PAWS")


def test_server_tsval_just_below_ts_recent_is_caught(tmp_path: Path) -> None:
    f = Flow()
    request_and_first_two(f)
    recent = f.sts  # the retransmission's TSval: it starts at or below the client's last ACK (RFC 7323)
    f.server(200, BODY[2], ack=19, tsval=recent - 1)
    assert_caught(f.check(tmp_path), "I3", f"TS.Recent {recent}")


def test_ack_above_the_commit_point_is_caught(tmp_path: Path) -> None:
    f = Flow()
    f.client(-1, flags="S")
    commits = [{"t": f.t + 0.0001, "commit_offset": 0, "commit_fin": False}]
    f.server(-1, ack=0, flags="SA")
    f.client(0, ack=0, flags="A")
    f.client(0, REQUEST, ack=0)
    commits.append({"t": f.t + 0.0001, "commit_offset": 10, "commit_fin": False})  # 10 of 19 bytes safe
    f.server(0, BODY[0], ack=19)  # the client sent 19: a plain I1 check is happy, the commit log is not
    reports = f.check(tmp_path, commits={CPORT: commits})
    assert_caught(reports, "I1", "19 client bytes", "committed then: 10")
    assert not f.check(tmp_path)[CPORT].violations  # without the log the ACK is legal


def test_sack_above_the_commit_point_is_caught(tmp_path: Path) -> None:
    f = Flow()
    f.client(-1, flags="S")
    commits = [{"t": f.t + 0.0001, "commit_offset": 0, "commit_fin": False}]
    f.server(-1, ack=0, flags="SA")
    f.client(0, ack=0, flags="A")
    f.client(10, REQUEST[10:], ack=0)  # the first 10 bytes lost on the way: the server SACKs the rest
    commits.append({"t": f.t + 0.0001, "commit_offset": 0, "commit_fin": False})
    block = ((f.cisn + 1 + 10) % M, (f.cisn + 1 + 19) % M)
    f.server(0, ack=0, flags="A", extra_opts=[("NOP", None), ("NOP", None), ("SAck", block)])
    assert_caught(f.check(tmp_path, commits={CPORT: commits}), "I1", "SACK")


def test_ack_before_the_first_commit_is_caught(tmp_path: Path) -> None:
    f = Flow()
    f.handshake()  # the SYN-ACK acknowledges the SYN before anything was committed
    commits = [{"t": f.t + 0.0001, "commit_offset": 0, "commit_fin": False}]
    assert_caught(f.check(tmp_path, commits={CPORT: commits}), "I1", "committed then: -1")


def test_fin_ack_before_the_fin_is_committed_is_caught(tmp_path: Path) -> None:
    f = Flow()
    f.client(-1, flags="S")
    commits = [{"t": f.t + 0.0001, "commit_offset": 0, "commit_fin": False}]
    f.server(-1, ack=0, flags="SA")
    f.client(0, REQUEST, ack=0, flags="FPA")
    commits.append({"t": f.t + 0.0001, "commit_offset": 19, "commit_fin": False})  # the FIN not yet
    f.server(0, ack=20, flags="A")
    assert_caught(f.check(tmp_path, commits={CPORT: commits}), "I1", "20 client bytes", "committed then: 19")


# IPv6 ------------------------------------------------------------------------

V6 = [Flow(v6=True), Flow(v6=True, ext=True), Flow(v6=True, cisn=M - 10, sisn=M - 120, cts=M - 4, sts=M - 3)]
V6_IDS = ["plain", "extension-header", "wrapping"]


@pytest.mark.parametrize("flow", V6, ids=V6_IDS)
def test_clean_ipv6_capture_passes(tmp_path: Path, flow: Flow) -> None:
    reports = clean(flow).check(tmp_path)
    assert_clean(reports, expect_connections=1)
    r = reports[CPORT]
    assert r.server_bytes == 250 and r.rsts == 0 and r.tsval_checks > 0


def _v6(**kw: int | bool) -> Flow:
    return Flow(v6=True, **kw)  # type: ignore[arg-type]


def test_ipv6_rst_is_caught(tmp_path: Path) -> None:
    f = _v6(ext=True)
    request_and_first_two(f)
    f.server(200, ack=19, flags="R")
    assert_caught(f.check(tmp_path), "I4", "RST")


def test_ipv6_changed_byte_is_caught(tmp_path: Path) -> None:
    f = _v6()
    request_and_first_two(f)
    f.server(100, b"B" * 50 + b"X" + b"B" * 49, ack=19)
    assert_caught(f.check(tmp_path), "I2", "offset 150")


def test_ipv6_ack_of_bytes_never_sent_is_caught(tmp_path: Path) -> None:
    f = _v6()
    request_and_first_two(f)
    f.server(200, BODY[2], ack=19 + 1000)
    assert_caught(f.check(tmp_path), "I1", "above what the client sent")


def test_ipv6_tsval_going_backwards_is_caught(tmp_path: Path) -> None:
    f = _v6()
    request_and_first_two(f)
    recent = f.sts
    f.server(200, BODY[2], ack=19, tsval=recent - 1)
    assert_caught(f.check(tmp_path), "I3", f"TS.Recent {recent}")


def test_ipv6_ack_above_the_commit_point_is_caught(tmp_path: Path) -> None:
    f = _v6()
    f.client(-1, flags="S")
    commits = [{"t": f.t + 0.0001, "commit_offset": 0, "commit_fin": False}]
    f.server(-1, ack=0, flags="SA")
    f.client(0, ack=0, flags="A")
    f.client(0, REQUEST, ack=0)
    commits.append({"t": f.t + 0.0001, "commit_offset": 10, "commit_fin": False})
    f.server(0, BODY[0], ack=19)
    assert_caught(f.check(tmp_path, commits={CPORT: commits}), "I1", "19 client bytes", "committed then: 10")


def test_a_capture_of_both_families_is_checked_per_family(tmp_path: Path) -> None:
    """The same ports over IPv4 (clean) and IPv6 (a RST): each check reads only its family."""
    f4, f6 = clean(Flow()), _v6()
    request_and_first_two(f6)
    f6.server(200, ack=19, flags="R")
    pcap = tmp_path / "both.pcap"
    wrpcap(str(pcap), sorted(f4.pkts + f6.pkts, key=lambda p: float(p.time)))
    assert_clean(check(pcap, CLIENT, VIP, VPORT), expect_connections=1)
    assert_caught(check(pcap, CLIENT6, VIP6, VPORT), "I4", "RST")


def test_addresses_of_two_families_are_refused(tmp_path: Path) -> None:
    pcap = tmp_path / "empty.pcap"
    wrpcap(str(pcap), clean(Flow()).pkts)
    with pytest.raises(ValueError, match="one family"):
        check(pcap, CLIENT6, VIP, VPORT)
