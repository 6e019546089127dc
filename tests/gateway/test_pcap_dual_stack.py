"""The packet ring and pcap export over both families: a dual-stack service's IPv4 and IPv6
packets are recorded under their client (4- or 16-byte keys), exported as LINKTYPE_RAW, and
decoded by scapy's rdpcap and by ``tcpdump -r`` (each packet by its version nibble); the pcap
reader (appliance.pcap) reads both families from raw and Ethernet captures."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from scapy.all import ARP, IP, TCP, Ether, Raw, rdpcap, wrpcap
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt

from appliance import history, packetring
from appliance.config import parse
from appliance.gateway import Gateway
from appliance.pcap import LINKTYPE_RAW, packets, tcp_fields
from checkpoint.addr import pack
from checkpoint.ici import ConnectionRecord

C4, V4, P4 = "192.0.2.10", "203.0.113.10", "198.51.100.10"
C6, V6, P6 = "2001:db8:2::10", "2001:db8:113::10", "2001:db8:100::10"


def gateway() -> Gateway:
    cfg = {"api": {"token": "pcap-dual-stack-token-1"},
           "service": [{"name": "web", "vip": V4, "vip6": V6, "port": 80,
                        "backend": [{"name": "primary", "address": P4, "address6": P6},
                                    {"name": "backup", "address": "198.51.100.20", "address6": "2001:db8:100::20"}]}]}
    gw = Gateway(parse(cfg), clock=lambda: 1000.0)
    packetring.attach(gw)
    return gw


def record_of(client: str, vip: str, port: int = 40000) -> ConnectionRecord:
    return ConnectionRecord(id=1, client_ip=client, client_port=port, vip=vip, vport=80, service="web",
                            backend="primary", backend_ip=P6 if ":" in client else P4, backend_port=80,
                            created=999.0, last_seen=999.0)


def tcp(src: str, dst: str, sport: int, dport: int, flags: str, seq: int, data: bytes = b"", ext=()) -> bytes:
    ip = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
    for h in ext:
        ip = ip / h
    p = ip / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=1)
    return bytes(p / Raw(data) if data else p)


@pytest.fixture
def ring_with_both() -> tuple[Gateway, packetring.PacketRing]:
    gw = gateway()
    ring = packetring.of(gw)
    assert ring is not None
    for i, raw in enumerate([
        tcp(C4, V4, 40000, 80, "S", 100),
        tcp(P4, C4, 80, 40000, "SA", 500),
        tcp(C6, V6, 40000, 80, "S", 200),
        tcp(P6, C6, 80, 40000, "SA", 600),
        tcp(C6, V6, 40000, 80, "PA", 201, b"GET / HTTP/1.1\r\n\r\n", ext=(IPv6ExtHdrDestOpt(),)),
        tcp(P6, C6, 80, 40000, "FA", 601),
        tcp("2001:db8:2::99", "2001:db8:113::99", 40000, 80, "S", 1),  # not the service: not kept
        tcp(C6, V6, 40000, 443, "S", 1),                                # not its port: not kept
    ]):
        ring.record(bytearray(raw), 1000.0 + i / 100)
    return gw, ring


def test_ring_keys_both_families(ring_with_both) -> None:
    _, ring = ring_with_both
    assert ring.recorded == 6
    v4 = ring.packets_of(record_of(C4, V4))
    v6 = ring.packets_of(record_of(C6, V6))
    assert [tcp_fields(d)[6] for _, _, d in v4] == [0x02, 0x12]  # type: ignore[index]
    assert [tcp_fields(d)[6] for _, _, d in v6] == [0x02, 0x12, 0x18, 0x11]  # type: ignore[index]
    assert all(tcp_fields(d)[0] in (pack(C6), pack(P6)) for _, _, d in v6)  # type: ignore[index]
    assert ring.first_fin(record_of(C6, V6)) == "server" and ring.first_fin(record_of(C4, V4)) is None
    assert history.client_key(record_of(C6, V6)) == (pack(C6), 40000)
    assert history.client_key(record_of(C4, V4)) == (pack(C4), 40000)


def test_pcap_export_decodes_in_scapy_and_tcpdump(ring_with_both, tmp_path: Path) -> None:
    _, ring = ring_with_both
    p6 = ring.pcap_of(record_of(C6, V6))
    p4 = ring.pcap_of(record_of(C4, V4))
    # one file with both families (LINKTYPE_RAW: the version nibble decides, packet by packet)
    both = ring._pcap(ring.packets_of(record_of(C4, V4)) + ring.packets_of(record_of(C6, V6)))
    for blob in (p6, p4, both):
        assert int.from_bytes(blob[20:24], "little") == LINKTYPE_RAW == 101
    (tmp_path / "v6.pcap").write_bytes(p6)
    (tmp_path / "both.pcap").write_bytes(both)

    got6 = rdpcap(str(tmp_path / "v6.pcap"))
    assert len(got6) == 4 and all(IPv6 in p and TCP in p for p in got6)
    assert [(p[IPv6].src, p[TCP].sport, str(p[TCP].flags)) for p in got6] == [
        (C6, 40000, "S"), (P6, 80, "SA"), (C6, 40000, "PA"), (P6, 80, "FA")]
    assert bytes(got6[2][Raw].load) == b"GET / HTTP/1.1\r\n\r\n"
    mixed = rdpcap(str(tmp_path / "both.pcap"))
    assert [("v6" if IPv6 in p else "v4" if IP in p else "?") for p in mixed] == ["v4"] * 2 + ["v6"] * 4
    assert mixed[0][IP].src == C4 and mixed[0][TCP].dport == 80

    tcpdump = shutil.which("tcpdump")
    assert tcpdump, "tcpdump is not installed (deploy/bootstrap.sh installs it)"
    out = subprocess.run([tcpdump, "-nr", str(tmp_path / "both.pcap")], capture_output=True, text=True,
                         check=True, timeout=30).stdout.splitlines()
    assert len(out) == 6, out
    assert f"IP {C4}.40000 > {V4}.80: Flags [S]" in out[0]
    assert f"IP {P4}.80 > {C4}.40000: Flags [S.]" in out[1]
    assert f"IP6 {C6}.40000 > {V6}.80: Flags [S]" in out[2]
    assert f"IP6 {C6} > {V6}: DSTOPT 40000 > 80: Flags [P.]" in out[4] and "length 18" in out[4]
    assert f"IP6 {P6}.80 > {C6}.40000: Flags [F.]" in out[5]


def test_pcap_reader_both_families_raw_and_ethernet(tmp_path: Path) -> None:
    pkts = [IP(src=C4, dst=V4) / TCP(sport=1, dport=80, seq=7) / Raw(b"abc"),
            IPv6(src=C6, dst=V6) / TCP(sport=2, dport=80, seq=8) / Raw(b"defg"),
            IPv6(src=C6, dst=V6) / IPv6ExtHdrDestOpt() / TCP(sport=3, dport=80, seq=9) / Raw(b"hi")]
    want = [(pack(C4), pack(V4), 1, 80, 7, 0, 0x02, 3), (pack(C6), pack(V6), 2, 80, 8, 0, 0x02, 4),
            (pack(C6), pack(V6), 3, 80, 9, 0, 0x02, 2)]
    eth = tmp_path / "eth.pcap"
    wrpcap(str(eth), [Ether() / p for p in pkts] + [Ether() / ARP()])
    raw = tmp_path / "raw.pcap"
    wrpcap(str(raw), pkts, linktype=LINKTYPE_RAW)
    for f in (eth, raw):
        got = [tcp_fields(p) for _, p in packets(f)]
        assert got == want, f
    # a capture cut inside the IPv6 extension header: no fields, no exception
    cut = bytes(pkts[2])[:50]
    assert tcp_fields(cut) is None and tcp_fields(bytes(pkts[1])[:45]) is None
