"""IPv6 in the packet layer: nfq.packet.PacketView over IPv6 (fields, rewrites, extension headers
walked or refused by rule), nfq.build.tcp_packet for IPv6, nfq.checksum's IPv6 pseudo-header,
and property tests over both families (arbitrary and mutated bytes raise MalformedPacket or
parse consistently; build -> parse round trips).

Checksums are checked three ways: scapy recomputing them from scratch, a from-scratch RFC 1071
sum written here (independent of nfq.checksum), and nfq.checksum.tcp_checksum.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.packet import Raw

from checkpoint.segment import ACK, PSH, SYN
from nfq.build import tcp_options, tcp_packet
from nfq.checksum import checksum, tcp_checksum, update_words
from nfq.packet import MalformedPacket, PacketView, PacketView6

C6, V6, S6 = "2001:db8:2::10", "2001:db8:113::10", "2001:db8:100::10"
C4, V4 = "192.0.2.10", "203.0.113.10"
TS = [("NOP", None), ("NOP", None), ("Timestamp", (1000, 2000))]
u32 = st.integers(0, 0xFFFFFFFF)
u16 = st.integers(0, 0xFFFF)
addr6 = st.builds(lambda n: str(ipaddress.IPv6Address((0x20010DB8 << 96) | n)), st.integers(0, (1 << 96) - 1))
addr4 = st.builds(lambda net, h: f"{net}.{h}", st.sampled_from(["192.0.2", "198.51.100", "203.0.113"]),
                  st.integers(0, 255))


def pkt6(payload: bytes = b"", options=(), flags: str = "PA", ext=(), src: str = C6, dst: str = V6, **kw):
    fields = {"sport": 40000, "dport": 80, "seq": 1001, "ack": 5001, "flags": flags, "window": 502}
    fields.update(kw)
    p = IPv6(src=src, dst=dst)
    for h in ext:
        p = p / h
    p = p / TCP(options=list(options), **fields)
    return p / Raw(payload) if payload else p


def pkt4(payload: bytes = b"", options=(), flags: str = "PA", src: str = C4, dst: str = V4, **kw):
    fields = {"sport": 40000, "dport": 80, "seq": 1001, "ack": 5001, "flags": flags, "window": 502}
    fields.update(kw)
    p = IP(src=src, dst=dst) / TCP(options=list(options), **fields)
    return p / Raw(payload) if payload else p


def view(p) -> PacketView:
    return PacketView(bytearray(bytes(p)))


# ----- checksums from scratch -------------------------------------------------------------------

def scratch_sum(data: bytes) -> int:
    """RFC 1071, written out here so the check does not lean on nfq.checksum."""
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def scratch_tcp_checksum(buf: bytes | bytearray) -> tuple[int, int]:
    """(checksum in the packet, checksum recomputed from scratch) of an IPv4 or IPv6 TCP packet
    without options beyond what PacketView found (its ihl/total_len say where the segment is)."""
    v = PacketView(bytearray(buf))
    seg = bytearray(buf[v.ihl:v.total_len])
    stored = struct.unpack_from("!H", seg, 16)[0]
    seg[16:18] = b"\0\0"
    if v.version == 6:
        pseudo = bytes(buf[8:40]) + struct.pack("!IBBBB", len(seg), 0, 0, 0, 6)
    else:
        pseudo = bytes(buf[12:20]) + struct.pack("!BBH", 0, 6, len(seg))
    return stored, scratch_sum(pseudo + bytes(seg))


def assert_checksums_valid(buf: bytes | bytearray) -> None:
    stored, want = scratch_tcp_checksum(buf)
    assert stored == want, f"TCP checksum {stored:#06x}, from scratch {want:#06x}"
    v = PacketView(bytearray(buf))
    assert tcp_checksum(v.src_raw, v.dst_raw, buf[v.ihl:v.total_len]) == 0
    if v.version == 6:  # and scapy agrees (its own pseudo-header code)
        p = IPv6(bytes(buf))
        ck = p[TCP].chksum
        del p[TCP].chksum
        assert IPv6(bytes(p))[TCP].chksum == ck
    else:
        assert scratch_sum(bytes(buf[:v.ihl])) == 0, "IPv4 header checksum broken"


# ----- fields -----------------------------------------------------------------------------------

def test_ipv6_fields():
    v = view(pkt6(b"hello world", seq=0xFFFFFFF0, ack=7, window=1234, sport=5555, dport=443,
                  src="2001:0db8:0002:0000:0000:0000:0000:0010"))
    assert isinstance(v, PacketView) and isinstance(v, PacketView6) and v.version == 6
    assert v.src == C6 and v.dst == V6  # compressed, as ipaddress prints
    assert v.src_raw == socket.inet_pton(socket.AF_INET6, C6) and len(v.dst_raw) == 16
    assert v.dst_raw == socket.inet_pton(socket.AF_INET6, V6)
    assert (v.sport, v.dport) == (5555, 443) and v.ports == (5555, 443)
    assert v.seq == 0xFFFFFFF0 and v.ack == 7 and v.window == 1234 and v.flags == PSH | ACK
    assert v.ihl == 40 and v.thl == 20 and v.total_len == 40 + 20 + 11 and not v.truncated
    assert v.payload_len == 11 and v.payload == b"hello world" and v.captured_payload == b"hello world"
    assert v.tsval is None and v.options.mss is None
    assert repr(v).startswith(f"<PacketView6 [{C6}]:5555 > [{V6}]:443 ") and "len=11" in repr(v)


def test_ipv4_view_says_version_4():
    v = view(pkt4(b"x"))
    assert type(v) is PacketView and v.version == 4 and v.src == C4 and len(v.src_raw) == 4


def test_ipv6_syn_options():
    v = view(pkt6(flags="S", options=[("MSS", 1440), ("SAckOK", b""), ("Timestamp", (123456, 0)),
                                      ("NOP", None), ("WScale", 7)]))
    assert v.flags == SYN and v.thl == 40
    o = v.options
    assert (o.mss, o.wscale, o.sack_permitted, o.tsval, o.tsecr) == (1440, 7, True, 123456, 0)
    assert (v.tsval, v.tsecr) == (123456, 0)


def test_trailing_bytes_after_the_payload_ignored():
    buf = bytearray(bytes(pkt6(b"data")) + b"\0" * 6)
    v = PacketView(buf)
    assert v.payload == b"data" and v.total_len == 64


# ----- rewrites ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ext", [(), (IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt())], ids=["plain", "ext"])
def test_ipv6_rewrites_keep_the_checksum(ext):
    v = view(pkt6(b"payload!", ext=ext, options=TS + [("NOP", None), ("NOP", None), ("SAck", (10, 20, 30, 40))]))
    assert_checksums_valid(v.buf)
    assert v.options.sack_blocks == ((10, 20), (30, 40))  # cached
    new_src, new_dst = socket.inet_pton(socket.AF_INET6, "2001:db8:113::10"), socket.inet_pton(
        socket.AF_INET6, S6)
    v.set_src(new_src)
    assert_checksums_valid(v.buf)
    v.set_dst(new_dst)
    assert_checksums_valid(v.buf)
    v.set_seq(0x1_0000_0005)
    v.set_ack(0xFFFFFFFF)
    v.set_window(0x1_0007)
    v.set_sport(1)
    v.set_dport(8080)
    v.set_timestamps(0xAAAAAAAA, 0xBBBBBBBB)
    v.set_sack_blocks([(0xFFFFFFF0, 5), (7, 9)])
    assert_checksums_valid(v.buf)
    assert (v.src, v.dst, v.seq, v.ack, v.window, v.ports) == ("2001:db8:113::10", S6, 5, 0xFFFFFFFF, 7, (1, 8080))
    assert (v.tsval, v.tsecr) == (0xAAAAAAAA, 0xBBBBBBBB)
    assert v.options.tsval == 0xAAAAAAAA and v.options.sack_blocks == ((0xFFFFFFF0, 5), (7, 9))
    v.strip_sack()
    assert v.options.sack_blocks == () and v.options.tsval == 0xAAAAAAAA
    assert_checksums_valid(v.buf)
    assert v.payload == b"payload!"
    p = IPv6(bytes(v.buf))
    assert p.src == "2001:db8:113::10" and p.dst == S6 and p[TCP].seq == 5 and p[TCP].dport == 8080


@pytest.mark.parametrize("family", [4, 6])
def test_strip_sack_both_families(family):
    mk = pkt4 if family == 4 else pkt6
    opts = [("NOP", None), ("SAck", (1, 2)), ("NOP", None), ("Timestamp", (5, 6))]  # SACK at an odd offset
    v = view(mk(b"abc", options=opts))
    assert v.options.sack_blocks == ((1, 2),)
    v.strip_sack()
    assert v.options.sack_blocks == () and (v.tsval, v.tsecr) == (5, 6) and v.sack_offset() < 0
    assert_checksums_valid(v.buf)


def test_set_address_of_the_wrong_family_raises_value_error():
    v6, v4 = view(pkt6(b"x")), view(pkt4(b"x"))
    before6, before4 = bytes(v6.buf), bytes(v4.buf)
    for bad in (b"\1\2\3\4", b"\0" * 15, b""):
        with pytest.raises(ValueError, match="16-byte"):
            v6.set_src(bad)
        with pytest.raises(ValueError, match="16-byte"):
            v6.set_dst(bad)
    for bad in (b"\0" * 16, b"\1\2\3"):
        with pytest.raises(ValueError, match="4-byte"):
            v4.set_src(bad)
        with pytest.raises(ValueError, match="4-byte"):
            v4.set_dst(bad)
    assert bytes(v6.buf) == before6 and bytes(v4.buf) == before4


def test_setting_the_same_address_is_a_no_op():
    v = view(pkt6(b"x"))
    before = bytes(v.buf)
    v.set_src(v.src_raw)
    v.set_dst(v.dst_raw)
    assert bytes(v.buf) == before


def test_ipv6_truncated_copy_readable_not_rewritable():
    full = bytes(pkt6(b"y" * 500, options=TS, ext=(IPv6ExtHdrDestOpt(),)))
    v = PacketView(bytearray(full[:100]), allow_truncated=True)
    assert v.truncated and v.version == 6 and v.ihl == 48
    assert (v.sport, v.dport, v.seq, v.ack, v.flags) == (40000, 80, 1001, 5001, PSH | ACK)
    assert v.payload_len == 500 and v.total_len == len(full)
    assert (v.tsval, v.tsecr) == (1000, 2000) and v.src == C6
    assert v.captured_payload == b"y" * (100 - 48 - 32)
    before = bytes(v.buf)
    six = socket.inet_pton(socket.AF_INET6, S6)
    for rewrite in (lambda: v.payload, lambda: v.set_seq(1), lambda: v.set_ack(1), lambda: v.set_window(1),
                    lambda: v.set_sport(1), lambda: v.set_dport(1), lambda: v.set_src(six),
                    lambda: v.set_dst(six), lambda: v.set_timestamps(1, 2)):
        with pytest.raises(MalformedPacket):
            rewrite()
    assert bytes(v.buf) == before
    with pytest.raises(MalformedPacket, match="truncated: IPv6 datagram length"):
        PacketView(bytearray(full[:100]))


# ----- extension headers ------------------------------------------------------------------------

def test_extension_headers_walked():
    ext = (IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(options=[]),
           IPv6ExtHdrRouting(addresses=[], segleft=0), IPv6ExtHdrDestOpt())
    raw = bytes(pkt6(b"through", ext=ext, options=TS))
    hdrs = 8 + 8 + 8 + 8
    v = PacketView(bytearray(raw))
    assert v.ihl == 40 + hdrs and v.thl == 32 and v.total_len == len(raw)
    assert v.payload == b"through" and (v.tsval, v.tsecr) == (1000, 2000) and v.sport == 40000
    assert_checksums_valid(v.buf)
    v.set_dst(socket.inet_pton(socket.AF_INET6, S6))
    v.set_seq(99)
    assert_checksums_valid(v.buf)
    assert bytes(v.buf[40:40 + hdrs]) == raw[40:40 + hdrs]  # the extension headers untouched


def test_long_extension_header_walked_by_its_length():
    from scapy.layers.inet6 import PadN
    dst = IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\0" * 36)])  # 2 + 2 + 36 = 40 bytes
    raw = bytes(pkt6(b"x", ext=(dst,)))
    assert raw[41] == 4  # (4 + 1) * 8 = 40
    v = PacketView(bytearray(raw))
    assert v.ihl == 80 and v.payload == b"x"


def _with_next_header(nh: int, body: bytes = b"\x06\x00" + b"\0" * 6) -> bytearray:
    """An IPv6 packet whose header says ``nh``, followed by ``body`` and a TCP header."""
    tcp = bytes(TCP(sport=1, dport=2))
    p = bytearray(bytes(IPv6(src=C6, dst=V6, nh=nh, plen=len(body) + len(tcp))) + body + tcp)
    return p


@pytest.mark.parametrize("nh, reason", [
    (44, "IPv6 fragment"),
    (50, "IPv6 ESP"),
    (51, "IPv6 AH"),
    (59, "IPv6 no next header"),
    (135, r"IPv6 extension header not supported \(next header 135\)"),
    (139, r"IPv6 extension header not supported \(next header 139\)"),
    (17, r"not TCP \(next header 17\)"),
    (58, r"not TCP \(next header 58\)"),
    (200, r"not TCP \(next header 200\)"),
])
def test_refused_next_headers(nh, reason):
    with pytest.raises(MalformedPacket, match=f"^{reason}"):
        PacketView(_with_next_header(nh))
    # the same behind a walked header
    buf = bytearray(bytes(pkt6(b"x", ext=(IPv6ExtHdrDestOpt(),))))
    buf[40] = nh
    with pytest.raises(MalformedPacket, match=f"^{reason}"):
        PacketView(buf, allow_truncated=True)


def test_scapy_fragment_refused():
    with pytest.raises(MalformedPacket, match="^IPv6 fragment$"):
        view(pkt6(b"x" * 20, ext=(IPv6ExtHdrFragment(),)))
    with pytest.raises(MalformedPacket, match="^IPv6 fragment$"):
        view(pkt6(b"x" * 20, ext=(IPv6ExtHdrHopByHop(), IPv6ExtHdrFragment(offset=0, m=1))))


def test_extension_header_truncated_in_the_capture():
    raw = bytes(pkt6(b"x" * 100, ext=(IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt())))
    for cut in (44, 48, 52, 55):
        with pytest.raises(MalformedPacket, match="^truncated: IPv6 extension header not captured"):
            PacketView(bytearray(raw[:cut]), allow_truncated=True)
    # the TCP header behind them cut: named as such
    with pytest.raises(MalformedPacket, match="^truncated: TCP header not captured"):
        PacketView(bytearray(raw[:60]), allow_truncated=True)


def test_extension_header_longer_than_the_payload():
    raw = bytearray(bytes(pkt6(b"", ext=(IPv6ExtHdrDestOpt(),))))  # 40 + 8 + 20
    raw[41] = 3  # 32 bytes of options: past the datagram's 68 bytes
    with pytest.raises(MalformedPacket, match="^IPv6 extension header longer than the payload"):
        PacketView(raw + bytearray(64))  # bytes captured past the datagram do not count
    raw[41] = 2  # 24 bytes: ends at 64, leaving 4 bytes for TCP
    with pytest.raises(MalformedPacket, match=r"^IPv6 payload length 28 too small"):
        PacketView(raw + bytearray(64))
    # a payload length that ends inside the extension headers' first 8 bytes
    short = bytearray(bytes(pkt6(b"", ext=(IPv6ExtHdrHopByHop(),))))
    struct.pack_into("!H", short, 4, 4)
    with pytest.raises(MalformedPacket, match="^IPv6 extension header past the payload length"):
        PacketView(short)


@pytest.mark.parametrize("plen, reason", [
    (0, "^IPv6 payload length 0 too small"),
    (19, "^IPv6 payload length 19 too small"),
    (200, "^truncated: IPv6 datagram length 240"),
])
def test_bad_payload_length(plen, reason):
    buf = bytearray(bytes(pkt6(b"x" * 30)))
    struct.pack_into("!H", buf, 4, plen)
    with pytest.raises(MalformedPacket, match=reason):
        PacketView(buf)


def test_jumbogram_refused():
    buf = bytearray(bytes(pkt6(b"x" * 30, ext=(IPv6ExtHdrHopByHop(),))))
    struct.pack_into("!H", buf, 4, 0)
    with pytest.raises(MalformedPacket, match="^IPv6 jumbogram"):
        PacketView(buf)


def test_data_offset_past_the_payload():
    buf = bytearray(bytes(pkt6(b"x" * 8)))
    buf[40 + 12] = 0xF0  # 60 bytes of TCP header in a 28-byte segment
    with pytest.raises(MalformedPacket, match="^bad TCP data offset 60"):
        PacketView(buf)
    buf[40 + 12] = 0x40
    with pytest.raises(MalformedPacket, match="^bad TCP data offset 16"):
        PacketView(buf)


@pytest.mark.parametrize("ext, reason", [
    ((IPv6ExtHdrDestOpt(), IPv6ExtHdrHopByHop()), "^IPv6 hop-by-hop options not first"),
    ((IPv6ExtHdrRouting(), IPv6ExtHdrRouting()), "^IPv6 routing header repeated"),
    ((IPv6ExtHdrDestOpt(), IPv6ExtHdrDestOpt(), IPv6ExtHdrDestOpt()), "^IPv6 destination options repeated"),
    ((IPv6ExtHdrRouting(addresses=[S6], segleft=1),),
     r"^IPv6 routing header with segments left \(1\): the destination is not the endpoint"),
])
def test_extension_header_order_rules(ext, reason):
    with pytest.raises(MalformedPacket, match=reason):
        view(pkt6(b"x", ext=ext))


def test_too_short():
    raw = bytes(pkt6(b"x"))
    with pytest.raises(MalformedPacket, match=r"^too short for IPv6\+TCP \(39 bytes\)"):
        PacketView(bytearray(raw[:39]))
    with pytest.raises(MalformedPacket, match=r"^truncated: IPv6 datagram length 61"):
        PacketView(bytearray(raw[:59]))
    with pytest.raises(MalformedPacket, match="^truncated: TCP header not captured"):
        PacketView(bytearray(raw[:59]), allow_truncated=True)


# ----- builder ----------------------------------------------------------------------------------

def test_tcp_packet_ipv6_checked_by_scapy():
    opts = tcp_options(mss=1440, wscale=7, sack_permitted=True, tsval=77, tsecr=0, syn=True)
    raw = tcp_packet(C6, V6, 40000, 80, 123, 0, SYN, 64800, opts, b"", ttl=61)
    p = IPv6(raw)
    assert (p.version, p.tc, p.fl, p.nh, p.hlim, p.plen) == (6, 0, 0, 6, 61, len(raw) - 40)
    assert (p.src, p.dst, p[TCP].sport, p[TCP].dport, p[TCP].seq, p[TCP].flags) == (C6, V6, 40000, 80, 123, "S")
    assert {k: v for k, v in p[TCP].options if k in ("MSS", "WScale", "Timestamp")} == {
        "MSS": 1440, "WScale": 7, "Timestamp": (77, 0)}
    ck = p[TCP].chksum
    del p[TCP].chksum
    assert IPv6(bytes(p))[TCP].chksum == ck
    assert_checksums_valid(raw)


def test_tcp_packet_refuses_mixed_families():
    with pytest.raises(ValueError, match="two families"):
        tcp_packet(C4, V6, 1, 2, 3, 4, ACK, 100)


@settings(max_examples=150, deadline=None)
@given(v6=st.booleans(), data=st.data(), sport=u16, dport=u16, seq=u32, ack=u32, flags=st.integers(0, 0xFF),
       window=st.integers(0, 0x1FFFF), ttl=st.integers(1, 255), payload=st.binary(max_size=300),
       tsval=st.none() | u32, tsecr=u32, syn=st.booleans(), mss=st.none() | u16,
       wscale=st.none() | st.integers(0, 14), sack=st.booleans())
def test_build_then_parse_round_trip(v6, data, sport, dport, seq, ack, flags, window, ttl, payload, tsval,
                                     tsecr, syn, mss, wscale, sack):
    src, dst = (data.draw(addr6), data.draw(addr6)) if v6 else (data.draw(addr4), data.draw(addr4))
    opts = tcp_options(mss=mss, wscale=wscale, sack_permitted=sack, tsval=tsval, tsecr=tsecr, syn=syn)
    raw = tcp_packet(src, dst, sport, dport, seq, ack, flags, window, opts, payload, ttl=ttl)
    v = PacketView(bytearray(raw))
    assert v.version == (6 if v6 else 4) and (v.src, v.dst) == (src, dst)
    assert (v.sport, v.dport, v.seq, v.ack, v.flags, v.window) == (sport, dport, seq, ack, flags, min(window, 0xFFFF))
    assert v.ihl == (40 if v6 else 20) and v.thl == 20 + len(opts) and v.payload == payload
    assert v.total_len == len(raw) and not v.truncated
    o = v.options
    assert (o.tsval, o.tsecr) == ((tsval, tsecr) if tsval is not None else (None, None))
    if syn:
        assert (o.mss, o.wscale, o.sack_permitted) == (mss, wscale, sack)
    assert_checksums_valid(raw)
    if v6:
        assert IPv6(raw).hlim == ttl
    else:
        assert IP(raw).ttl == ttl


# ----- checksum primitives ----------------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(addr6, addr6, st.binary(max_size=80), u32)
def test_tcp_checksum_ipv6_matches_scapy(src, dst, payload, seq):
    p = IPv6(bytes(IPv6(src=src, dst=dst) / TCP(sport=1, dport=2, seq=seq, flags="A") / Raw(payload)))
    tcp = bytearray(bytes(p[TCP]))
    want = p[TCP].chksum
    tcp[16:18] = b"\0\0"
    pton = socket.inet_pton
    assert tcp_checksum(pton(socket.AF_INET6, src), pton(socket.AF_INET6, dst), tcp) == want


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=16, max_size=120).filter(lambda b: len(b) % 2 == 0 and any(b)), st.data())
def test_update_words_matches_full(data, d):
    buf = bytearray(data)
    off = d.draw(st.integers(0, (len(buf) - 16) // 2)) * 2
    new = d.draw(st.binary(min_size=16, max_size=16))
    old_ck = checksum(buf)
    old = bytes(buf[off:off + 16])
    buf[off:off + 16] = new
    got = update_words(old_ck, old, new)
    full = checksum(buf)
    assert got == full or (not any(buf) and got in (0, 0xFFFF))


# ----- property tests: any bytes --------------------------------------------------------------

def check_consistent(buf: bytearray, v: PacketView) -> None:
    """What a parsed view promises, whatever the bytes it came from."""
    n = len(buf)
    assert v.version == buf[0] >> 4 and v.version in (4, 6)
    assert v.truncated == (v.total_len > n)
    assert 20 <= v.thl <= 60 and v.ihl + v.thl <= min(n, v.total_len)
    if v.version == 6:
        assert isinstance(v, PacketView6) and v.total_len == 40 + struct.unpack_from("!H", buf, 4)[0]
        assert v.ihl >= 40 and (v.ihl - 40) % 8 == 0 and len(v.src_raw) == 16 == len(v.dst_raw)
        assert v.src == str(ipaddress.IPv6Address(bytes(buf[8:24])))
    else:
        assert v.ihl == (buf[0] & 15) * 4 and len(v.src_raw) == 4
        assert v.src == str(ipaddress.IPv4Address(bytes(buf[12:16])))
    assert v.payload_len == v.total_len - v.ihl - v.thl >= 0
    assert (v.sport, v.dport) == v.ports == struct.unpack_from("!HH", buf, v.ihl)
    assert (v.seq, v.ack, v.flags, v.window) == struct.unpack_from("!IIxBH", buf, v.ihl + 4)
    assert v.dst_raw == (bytes(buf[24:40]) if v.version == 6 else bytes(buf[16:20])) and v.dst
    o = v.options
    ts = v.tsval
    assert ts is None or o.tsval == ts
    assert v.sack_offset() < 0 or buf[v.sack_offset()] == 5
    assert len(v.captured_payload) == min(n, v.total_len) - v.ihl - v.thl
    if not v.truncated:
        assert len(v.payload) == v.payload_len
    repr(v)


def parse_or_refuse(buf: bytearray, allow_truncated: bool) -> PacketView | None:
    try:
        v = PacketView(buf, allow_truncated=allow_truncated)
    except MalformedPacket as exc:
        assert str(exc)
        event(f"refused: {str(exc).split(' (')[0].split(':')[0]}")  # as the data plane counts it
        return None
    check_consistent(buf, v)
    event(f"parsed IPv{v.version}{' truncated' if v.truncated else ''}")
    return v


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=160) | st.binary(min_size=40, max_size=160), st.sampled_from([None, 4, 6]), st.booleans())
def test_arbitrary_bytes_raise_malformed_or_parse_consistently(raw, version, allow_truncated):
    buf = bytearray(raw)
    if version is not None and buf:
        buf[0] = (version << 4) | (buf[0] & 0x0F)
    parse_or_refuse(buf, allow_truncated)


NEXT_HEADERS = st.sampled_from([0, 6, 6, 43, 44, 50, 51, 59, 60, 60, 17, 58, 135])


@st.composite
def ipv6_like(draw) -> bytearray:
    """IPv6 headers with chains of (possibly broken) extension headers: deeper than random bytes."""
    chain = draw(st.lists(NEXT_HEADERS, max_size=5))
    body = bytearray()
    for i, nh in enumerate(chain):
        nxt = chain[i + 1] if i + 1 < len(chain) else 6
        hl = draw(st.integers(0, 3))
        rest = bytearray(draw(st.binary(min_size=6 + 8 * hl, max_size=6 + 8 * hl)))
        if nh == 43 and draw(st.booleans()):
            rest[1] = 0  # no segments left: walked
        body += bytes((nxt, hl)) + rest
    first = chain[0] if chain else 6
    tcp = bytearray(draw(st.binary(min_size=20, max_size=60)))
    if draw(st.booleans()):
        tcp[12] = draw(st.integers(5, 15)) << 4
    payload = draw(st.binary(max_size=40))
    plen = len(body) + len(tcp) + len(payload) + draw(st.sampled_from([0, 0, 0, 0, -1, 1, -30, -60, 200]))
    head = struct.pack("!IHBB16s16s", 0x60000000, max(0, min(plen, 0xFFFF)), first, 64, b"\x20\x01\x0d\xb8" + bytes(12),
                       b"\x20\x01\x0d\xb8" + bytes(11) + b"\x01")
    out = bytearray(head) + body + tcp + payload
    cut = draw(st.integers(0, len(out)))
    return out[:cut] if draw(st.integers(0, 3)) == 0 else out


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ipv6_like(), st.booleans())
def test_ipv6_like_bytes_raise_malformed_or_parse_consistently(buf, allow_truncated):
    parse_or_refuse(buf, allow_truncated)


@st.composite
def valid_packet(draw) -> bytes:
    v6 = draw(st.booleans())
    opts = draw(st.sampled_from([[], TS, TS + [("NOP", None), ("NOP", None), ("SAck", (1, 2, 3, 4))],
                                 [("MSS", 1400), ("SAckOK", b""), ("Timestamp", (5, 6)), ("NOP", None),
                                  ("WScale", 7)]]))
    payload = draw(st.binary(max_size=40))
    if not v6:
        return bytes(pkt4(payload, options=opts))
    ext = draw(st.sampled_from([(), (IPv6ExtHdrHopByHop(),), (IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt()),
                                (IPv6ExtHdrDestOpt(), IPv6ExtHdrRouting(addresses=[], segleft=0),
                                 IPv6ExtHdrDestOpt())]))
    return bytes(pkt6(payload, options=opts, ext=ext))


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_packet(), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4),
       st.integers(0, 250), st.booleans(), st.data())
def test_mutated_valid_packets(raw, mutations, cut, allow_truncated, data):
    """Valid IPv4/IPv6 packets with bytes changed and cut: refused with MalformedPacket, or parsed
    consistently; then every rewrite raises nothing but MalformedPacket/ValueError and keeps a
    valid TCP checksum valid."""
    buf = bytearray(raw)
    for i, b in mutations:
        if i < len(buf):
            buf[i] = b
    if cut < len(buf) and data.draw(st.booleans()):
        buf = buf[:cut]
    v = parse_or_refuse(buf, allow_truncated)
    if v is None or v.truncated:
        return
    stored, want = scratch_tcp_checksum(buf)
    was_valid = stored == want
    ip_valid = v.version == 4 and scratch_sum(bytes(buf[:v.ihl])) == 0
    alen = 16 if v.version == 6 else 4
    ops = [lambda: v.set_seq(data.draw(u32)), lambda: v.set_ack(data.draw(u32)),
           lambda: v.set_window(data.draw(u16)), lambda: v.set_sport(data.draw(u16)),
           lambda: v.set_src(data.draw(st.binary(min_size=alen, max_size=alen))),
           lambda: v.set_dst(data.draw(st.binary(min_size=alen, max_size=alen))),
           lambda: v.set_timestamps(data.draw(u32), data.draw(u32)),
           lambda: v.set_sack_blocks([(data.draw(u32), data.draw(u32))] * len(v.options.sack_blocks)),
           lambda: v.strip_sack()]
    for i in data.draw(st.lists(st.integers(0, len(ops) - 1), max_size=6)):
        try:
            ops[i]()
        except (MalformedPacket, ValueError):
            pass
        check_consistent(buf, v)
        if was_valid:
            s, w = scratch_tcp_checksum(buf)
            assert s == w or {s, w} == {0, 0xFFFF}
        if ip_valid:
            assert scratch_sum(bytes(buf[:v.ihl])) == 0


def test_valid_packet_strategy_checksums_are_valid():
    """The mutation test's 'stays valid' half only means something if its packets start valid."""
    for ext in ((), (IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt())):
        assert_checksums_valid(bytes(pkt6(b"abc", options=TS, ext=ext)))
    assert_checksums_valid(bytes(pkt4(b"abc", options=TS)))

