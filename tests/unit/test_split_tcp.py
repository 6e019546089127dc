"""nfq.inject.split_tcp: a super-packet cut into segments that fit the MTU, as GSO would."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from nfq.inject import split_tcp


def checksums_ok(seg: bytes, v6: bool) -> bool:
    p = IPv6(seg) if v6 else IP(seg)
    q = p.copy()
    if not v6:
        del q.chksum
    del q[TCP].chksum
    q = (IPv6 if v6 else IP)(bytes(q))
    return p[TCP].chksum == q[TCP].chksum and (v6 or p.chksum == q.chksum)


@settings(max_examples=30, deadline=None)
@given(v6=st.booleans(), n=st.integers(0, 65400), mtu=st.sampled_from([576, 1280, 1500, 9000]),
       seq=st.integers(0, 2**32 - 1), fin=st.booleans())
def test_segments_fit_carry_every_byte_in_order_and_are_valid(v6: bool, n: int, mtu: int, seq: int,
                                                             fin: bool) -> None:
    payload = bytes((i * 7) & 0xFF for i in range(n))
    flags = "PA" + ("F" if fin else "")
    ip = IPv6(src="2001:db8::a", dst="2001:db8::b") if v6 else IP(src="192.0.2.10", dst="198.51.100.10", id=77)
    tcp = TCP(sport=40000, dport=80, seq=seq, ack=5, flags=flags,
              options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2))])
    pkt = bytes(ip / tcp / Raw(payload)) if payload else bytes(ip / tcp)
    segs = split_tcp(pkt, mtu)
    if len(pkt) <= mtu:
        assert segs == [pkt]
        return
    got = b""
    for i, s in enumerate(segs):
        assert len(s) <= mtu and checksums_ok(s, v6)
        p = (IPv6 if v6 else IP)(s)
        assert p[TCP].seq == (seq + len(got)) & 0xFFFFFFFF
        last = i == len(segs) - 1
        assert bool(p[TCP].flags & 0x01) == (fin and last) and bool(p[TCP].flags & 0x08) == last
        assert p[TCP].options == tcp.options or p[TCP].options == [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]
        got += bytes(p[TCP].payload)
    assert got == payload
