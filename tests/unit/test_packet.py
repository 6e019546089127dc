"""nfq.packet.PacketView and nfq.checksum against scapy."""

from __future__ import annotations

import contextlib
import signal
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.packet import Raw

from checkpoint.segment import ACK, PSH, SYN
from nfq.checksum import checksum, tcp_checksum, update16, update32
from nfq.packet import MalformedPacket, PacketView, find_option, parse_options

from ._helpers import view

u32 = st.integers(0, 0xFFFFFFFF)
u16 = st.integers(0, 0xFFFF)
ipv4 = st.builds(lambda n: socket.inet_ntoa(struct.pack("!I", n)), u32)


def tcp_pkt(payload=b"", options=(), flags="PA", **kw):
    fields = dict(sport=40000, dport=80, seq=1001, ack=5001, flags=flags, window=502)
    fields.update({k: v for k, v in kw.items() if k not in ("src", "dst", "ip")})
    ip = IP(src=kw.get("src", "192.0.2.10"), dst=kw.get("dst", "198.51.100.1"), **kw.get("ip", {}))
    pkt = ip / TCP(options=list(options), **fields)
    if payload:
        pkt = pkt / Raw(payload)
    return pkt


def checksums_valid(buf) -> tuple[bool, bool]:
    """(ip ok, tcp ok) by letting scapy recompute both checksums from scratch."""
    p = IP(bytes(buf))
    ip_ck, tcp_ck = p.chksum, p[TCP].chksum
    del p.chksum
    del p[TCP].chksum
    q = IP(bytes(p))
    return q.chksum == ip_ck, q[TCP].chksum == tcp_ck


def assert_checksums_valid(buf):
    ip_ok, tcp_ok = checksums_valid(buf)
    assert ip_ok, "IPv4 header checksum broken"
    assert tcp_ok, "TCP checksum broken"
    # and independently of scapy: a valid header/segment sums to zero
    ihl = (buf[0] & 0x0F) * 4
    total = struct.unpack_from("!H", buf, 2)[0]
    assert checksum(buf[:ihl]) == 0
    assert tcp_checksum(bytes(buf[12:16]), bytes(buf[16:20]), buf[ihl:total]) == 0


# ----- parsing -----------------------------------------------------------------------

def test_fields():
    v = view(tcp_pkt(b"hello world", flags="PA", seq=0xFFFFFFF0, ack=7, window=1234,
                     sport=5555, dport=443))
    assert v.src == "192.0.2.10" and v.dst == "198.51.100.1"
    assert v.src_raw == socket.inet_aton("192.0.2.10") and v.dst_raw == socket.inet_aton("198.51.100.1")
    assert (v.sport, v.dport) == (5555, 443) and v.ports == (5555, 443)
    assert v.seq == 0xFFFFFFF0 and v.ack == 7 and v.window == 1234
    assert v.flags == PSH | ACK
    assert v.payload_len == 11 and v.payload == b"hello world"
    assert v.ihl == 20 and v.thl == 20 and v.total_len == 51
    assert v.tsval is None and v.tsecr is None
    o = v.options
    assert (o.mss, o.wscale, o.sack_permitted, o.tsval, o.sack_blocks) == (None, None, False, None, ())
    assert "seq=4294967280" in repr(v) and "len=11" in repr(v)


def test_syn_options_linux_layout():
    v = view(tcp_pkt(flags="S", options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (123456, 0)),
                                         ("NOP", None), ("WScale", 7)]))
    assert v.flags == SYN and v.thl == 40
    o = v.options
    assert (o.mss, o.wscale, o.sack_permitted, o.tsval, o.tsecr) == (1460, 7, True, 123456, 0)
    assert v.tsval == 123456 and v.tsecr == 0
    assert v.payload_len == 0


def test_timestamp_fast_layout():
    v = view(tcp_pkt(b"x", options=[("NOP", None), ("NOP", None), ("Timestamp", (0xDEADBEEF, 0xFEEDF00D))]))
    assert v.buf[40:44] == b"\x01\x01\x08\x0a"
    assert v.tsval == 0xDEADBEEF and v.tsecr == 0xFEEDF00D
    assert v.options.tsval == 0xDEADBEEF and v.options.tsecr == 0xFEEDF00D


@pytest.mark.parametrize("opts", [
    [("Timestamp", (11, 22))],                                     # TS first, EOL padding
    [("MSS", 1400), ("Timestamp", (11, 22))],                      # after MSS
    [("NOP", None), ("WScale", 3), ("Timestamp", (11, 22))],       # after WS
    [("SAckOK", b""), ("NOP", None), ("NOP", None), ("Timestamp", (11, 22))],
    [("NOP", None), ("NOP", None), ("SAck", (1, 2)), ("NOP", None), ("NOP", None),
     ("Timestamp", (11, 22))],                                     # after a SACK block
])
def test_timestamp_other_layouts(opts):
    v = view(tcp_pkt(b"abc", options=opts))
    assert (v.tsval, v.tsecr) == (11, 22)
    assert (v.options.tsval, v.options.tsecr) == (11, 22)
    assert v.payload == b"abc"


def test_sack_blocks():
    v = view(tcp_pkt(options=[("NOP", None), ("NOP", None), ("Timestamp", (5, 6)), ("NOP", None),
                              ("NOP", None), ("SAck", (100, 200, 0xFFFFFF00, 0x10, 300, 400))]))
    assert v.options.sack_blocks == ((100, 200), (0xFFFFFF00, 0x10), (300, 400))
    assert v.options.tsval == 5 and v.tsval == 5
    assert v.buf[v.sack_offset()] == 5
    assert view(tcp_pkt()).sack_offset() < 0


def test_ip_options_shift_tcp_header():
    from scapy.layers.inet import IPOption_NOP
    pkt = IP(src="1.2.3.4", dst="5.6.7.8", options=[IPOption_NOP()] * 4) / TCP(
        sport=1, dport=2, seq=3, ack=4, flags="A", options=[("NOP", None), ("NOP", None),
                                                              ("Timestamp", (9, 10))]) / Raw(b"zz")
    v = view(pkt)
    assert v.ihl == 24 and v.sport == 1 and v.dport == 2 and v.seq == 3 and v.ack == 4
    assert v.tsval == 9 and v.payload == b"zz"
    v.set_seq(77)
    v.set_timestamps(1, 2)
    v.set_dst(socket.inet_aton("9.9.9.9"))
    assert_checksums_valid(v.buf)


def test_trailing_padding_ignored():
    buf = bytearray(bytes(tcp_pkt(b"data")) + b"\0" * 6)  # Ethernet minimum padding
    v = PacketView(buf)
    assert v.payload == b"data" and v.payload_len == 4


def test_df_flag_is_not_a_fragment():
    v = view(tcp_pkt(b"x", ip={"flags": "DF"}))
    assert v.payload_len == 1


# ----- malformed ---------------------------------------------------------------------

def test_too_short():
    with pytest.raises(MalformedPacket, match="too short"):
        PacketView(bytearray(bytes(tcp_pkt())[:39]))
    with pytest.raises(MalformedPacket):
        PacketView(bytearray())


@pytest.mark.parametrize("version", [0, 5, 7, 15])
def test_version_nibble_neither_ipv4_nor_ipv6(version):
    buf = bytearray(bytes(tcp_pkt(b"x" * 10)))
    buf[0] = (version << 4) | (buf[0] & 0x0F)
    with pytest.raises(MalformedPacket, match=f"not IPv4 or IPv6 \\(version {version}\\)"):
        PacketView(buf)


def test_ipv4_header_read_as_ipv6_is_refused_not_misparsed():
    """An IPv4 packet whose version nibble says 6: its bytes as an IPv6 header make no sense
    (payload length 41 from the IPv4 id field, next header 0 from the TTL...): refused."""
    buf = bytearray(bytes(tcp_pkt(b"x" * 10)))
    buf[0] = 0x60 | (buf[0] & 0x0F)
    with pytest.raises(MalformedPacket):
        PacketView(buf)


def test_udp():
    with pytest.raises(MalformedPacket, match="not TCP"):
        PacketView(bytearray(bytes(IP(src="1.1.1.1", dst="2.2.2.2") / UDP() / Raw(b"x" * 30))))


@pytest.mark.parametrize("ip", [{"flags": "MF"}, {"frag": 1}, {"flags": "MF+DF", "frag": 0}])
def test_fragment(ip):
    buf = bytearray(bytes(tcp_pkt(b"x" * 10, ip=ip)))
    with pytest.raises(MalformedPacket, match="fragment"):
        PacketView(buf)


def test_truncated():
    buf = bytearray(bytes(tcp_pkt(b"x" * 100)))
    with pytest.raises(MalformedPacket, match="truncated"):
        PacketView(buf[:-1])


def test_truncated_copy_allowed_for_reading_only():
    """NFQUEUE may hand over a partial copy: headers readable, nothing rewritable."""
    full = bytes(tcp_pkt(b"y" * 500, options=[("NOP", None), ("NOP", None), ("Timestamp", (8, 9))]))
    v = PacketView(bytearray(full[:80]), allow_truncated=True)
    assert v.truncated
    assert (v.sport, v.dport, v.seq, v.ack, v.flags) == (40000, 80, 1001, 5001, PSH | ACK)
    assert v.payload_len == 500 and v.total_len == len(full)  # from the IPv4 header
    assert (v.tsval, v.tsecr) == (8, 9) and v.options.tsval == 8
    before = bytes(v.buf)
    for rewrite in (lambda: v.payload, lambda: v.set_seq(1), lambda: v.set_ack(1),
                    lambda: v.set_window(1), lambda: v.set_sport(1), lambda: v.set_dport(1),
                    lambda: v.set_src(b"\1\2\3\4"), lambda: v.set_dst(b"\1\2\3\4"),
                    lambda: v.set_timestamps(1, 2)):
        with pytest.raises(MalformedPacket):
            rewrite()
    assert bytes(v.buf) == before
    complete = PacketView(bytearray(full), allow_truncated=True)
    assert not complete.truncated and complete.payload == b"y" * 500


def test_truncated_copy_must_hold_tcp_header_and_options():
    from scapy.layers.inet import IPOption_NOP
    pkt = IP(src="1.2.3.4", dst="5.6.7.8", options=[IPOption_NOP()] * 8) / TCP(
        options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]) / Raw(b"z" * 100)
    raw = bytes(pkt)  # ihl 28, thl 32
    with pytest.raises(MalformedPacket, match="TCP header"):
        PacketView(bytearray(raw[:45]), allow_truncated=True)
    with pytest.raises(MalformedPacket, match="options"):
        PacketView(bytearray(raw[:28 + 24]), allow_truncated=True)
    assert PacketView(bytearray(raw[:28 + 32]), allow_truncated=True).tsval == 1


def test_total_length_too_small():
    buf = bytearray(bytes(tcp_pkt(b"x" * 30)))
    struct.pack_into("!H", buf, 2, 39)
    with pytest.raises(MalformedPacket, match="too small"):
        PacketView(buf)


def test_bad_ihl():
    buf = bytearray(bytes(tcp_pkt(b"x" * 30)))
    buf[0] = 0x44
    with pytest.raises(MalformedPacket, match="header length"):
        PacketView(buf)


@pytest.mark.parametrize("doff", [0, 1, 4, 15])
def test_bad_data_offset(doff):
    buf = bytearray(bytes(tcp_pkt(b"x" * 8)))  # 48 bytes: offset 15 (60 bytes) overruns
    buf[32] = (doff << 4) | (buf[32] & 0x0F)
    with pytest.raises(MalformedPacket, match="data offset"):
        PacketView(buf)


def test_malformed_is_value_error():
    assert issubclass(MalformedPacket, ValueError)


# ----- option parsing robustness -----------------------------------------------------

@contextlib.contextmanager
def finishes_within(seconds: int):
    """Fail (instead of hanging) if an option walk stops advancing."""
    def _alarm(signum, frame):
        raise AssertionError(f"did not finish within {seconds}s (option loop not advancing?)")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("raw, expect_mss", [
    (b"\x02\x04\x05\xb4" + b"\x08\x00" + b"\x00" * 6, 1460),        # zero length after MSS
    (b"\x02\x04\x05\xb4" + b"\x08\x01" + b"\x00" * 6, 1460),        # length 1
    (b"\x02\x04\x05\xb4" + b"\x01\x01\x08\x0a\x00\x00", 1460),      # TS length past the end
    (b"\x02\x04\x05\xb4" + b"\x01\x01\x01\x08", 1460),              # kind as the last byte
    (b"\x02\x00\x05\xb4", None),                                    # zero-length first option
    (b"\x02\x04\x05\xb4\x00\x08\x0a\x00\x00\x00\x01\x00\x00\x00\x02\x00", 1460),  # EOL stops
    (b"\x02\x03\x05\xb4", None),                                     # MSS wrong length: skipped
])
def test_parse_options_malformed(raw, expect_mss):
    with finishes_within(5):
        o = parse_options(raw, 0, len(raw))
        off = find_option(raw, 0, len(raw), 8, 10)
    assert o.mss == expect_mss
    assert o.tsval is None and o.tsecr is None
    assert off == -1


def test_parse_options_skips_unknown_and_bad_sack():
    raw = (b"\x1e\x06abcd"            # unknown kind 30, len 6
           + b"\x05\x05xyz"           # SACK with impossible length: ignored
           + b"\x03\x03\x09"          # WS 9
           + b"\x04\x02")             # SACK permitted
    o = parse_options(raw, 0, len(raw))
    assert o.wscale == 9 and o.sack_permitted and o.sack_blocks == ()


def test_parse_options_respects_end():
    raw = b"\x02\x04\x05\xb4\x03\x03\x07"
    assert parse_options(raw, 0, 4).wscale is None
    assert parse_options(raw, 0, 7).wscale == 7


def test_packetview_with_malformed_options_does_not_raise():
    buf = bytearray(bytes(tcp_pkt(b"pl", options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2))])))
    buf[43] = 40  # TS option length now runs past the header
    v = PacketView(buf)
    with finishes_within(5):
        assert v.tsval is None and v.tsecr is None and v.options.tsval is None
    with pytest.raises(MalformedPacket):
        v.set_timestamps(1, 2)
    assert v.payload == b"pl"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40))
def test_parse_options_never_raises(raw):
    with finishes_within(5):
        o = parse_options(raw, 0, len(raw))
        off = find_option(raw, 0, len(raw), 8, 10)
    assert off == -1 or 2 <= off <= len(raw) - 8
    if o.tsval is not None:
        assert off >= 0
    for left, right in o.sack_blocks:
        assert 0 <= left <= 0xFFFFFFFF and 0 <= right <= 0xFFFFFFFF


# ----- rewriting ---------------------------------------------------------------------

def test_setters_change_fields_and_keep_checksums():
    v = view(tcp_pkt(b"payload!", options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2)),
                                          ("NOP", None), ("NOP", None), ("SAck", (10, 20, 30, 40))]))
    assert_checksums_valid(v.buf)
    assert v.options.tsval == 1 and v.options.sack_blocks == ((10, 20), (30, 40))  # cached now
    v.set_src(socket.inet_aton("10.1.2.3"))
    v.set_dst(socket.inet_aton("10.4.5.6"))
    v.set_seq(0x1_0000_0005)  # masked to 32 bits
    v.set_ack(0xFFFFFFFF)
    v.set_window(0x1_0007)
    v.set_timestamps(0xAAAAAAAA, 0xBBBBBBBB)
    v.set_sack_blocks([(0xFFFFFFF0, 5), (7, 9)])
    assert (v.src, v.dst, v.seq, v.ack, v.window) == ("10.1.2.3", "10.4.5.6", 5, 0xFFFFFFFF, 7)
    assert (v.tsval, v.tsecr) == (0xAAAAAAAA, 0xBBBBBBBB)
    # the cached options were invalidated
    assert v.options.tsval == 0xAAAAAAAA and v.options.sack_blocks == ((0xFFFFFFF0, 5), (7, 9))
    assert v.payload == b"payload!"
    assert_checksums_valid(v.buf)
    p = IP(bytes(v.buf))
    assert p.src == "10.1.2.3" and p[TCP].seq == 5 and p[TCP].window == 7


@pytest.mark.parametrize("fast", [True, False])
def test_set_timestamps_invalidates_cached_options(fast):
    opts = [("NOP", None), ("NOP", None)] if fast else [("MSS", 1400)]
    v = view(tcp_pkt(b"x", options=opts + [("Timestamp", (1, 2))]))
    assert (v.options.tsval, v.options.tsecr) == (1, 2)
    v.set_timestamps(0x12345678, 0x9ABCDEF0)
    assert (v.options.tsval, v.options.tsecr) == (0x12345678, 0x9ABCDEF0)
    assert (v.tsval, v.tsecr) == (0x12345678, 0x9ABCDEF0)
    assert_checksums_valid(v.buf)


def test_set_sack_blocks_invalidates_cached_options():
    v = view(tcp_pkt(options=[("NOP", None), ("NOP", None), ("SAck", (1, 2))]))
    assert v.options.sack_blocks == ((1, 2),)
    v.set_sack_blocks([(3, 4)])
    assert v.options.sack_blocks == ((3, 4),)
    assert_checksums_valid(v.buf)


def test_setting_same_value_is_a_no_op():
    v = view(tcp_pkt(b"x"))
    before = bytes(v.buf)
    v.set_src(v.src_raw)
    v.set_seq(v.seq)
    v.set_window(v.window)
    assert bytes(v.buf) == before


def test_set_timestamps_without_option_raises():
    v = view(tcp_pkt(b"x"))
    with pytest.raises(MalformedPacket):
        v.set_timestamps(1, 2)
    with pytest.raises(MalformedPacket):
        v.set_sack_blocks([(1, 2)])


def test_set_sack_blocks_count_mismatch():
    v = view(tcp_pkt(options=[("NOP", None), ("NOP", None), ("SAck", (1, 2))]))
    with pytest.raises(ValueError):
        v.set_sack_blocks([(1, 2), (3, 4)])


@settings(max_examples=200, deadline=None)
@given(
    src=ipv4, dst=ipv4, new_src=ipv4, new_dst=ipv4,
    sport=u16, dport=u16, seq=u32, ack=u32, new_seq=u32, new_ack=u32,
    window=u16, new_window=u16,
    ts=st.tuples(u32, u32), new_ts=st.tuples(u32, u32),
    sack=st.lists(st.tuples(u32, u32), min_size=1, max_size=3), data=st.data(),
    payload=st.binary(max_size=64),
    fast_ts=st.booleans(),
)
def test_rewrites_keep_checksums_valid(src, dst, new_src, new_dst, sport, dport, seq, ack, new_seq,
                                       new_ack, window, new_window, ts, new_ts, sack, data, payload,
                                       fast_ts):
    opts = [("NOP", None), ("NOP", None), ("Timestamp", ts)] if fast_ts else [("Timestamp", ts)]
    flat = tuple(x for blk in sack for x in blk)
    opts += [("NOP", None), ("NOP", None), ("SAck", flat)]
    pkt = tcp_pkt(payload, options=opts, src=src, dst=dst, sport=sport, dport=dport, seq=seq,
                  ack=ack, window=window, flags="A")
    v = view(pkt)
    assert (v.src, v.dst, v.sport, v.dport, v.seq, v.ack, v.window) == (src, dst, sport, dport, seq, ack, window)
    assert (v.tsval, v.tsecr) == ts and v.options.sack_blocks == tuple(sack)
    assert v.payload == payload

    new_sack = data.draw(st.lists(st.tuples(u32, u32), min_size=len(sack), max_size=len(sack)))
    new_ports = data.draw(st.tuples(u16, u16))
    ops = [
        lambda: v.set_src(socket.inet_aton(new_src)),
        lambda: v.set_dst(socket.inet_aton(new_dst)),
        lambda: v.set_seq(new_seq),
        lambda: v.set_ack(new_ack),
        lambda: v.set_window(new_window),
        lambda: v.set_timestamps(*new_ts),
        lambda: v.set_sack_blocks(new_sack),
        lambda: v.set_sport(new_ports[0]),
        lambda: v.set_dport(new_ports[1]),
    ]
    order = data.draw(st.permutations(range(len(ops))))
    n = data.draw(st.integers(1, len(ops)))
    for i in order[:n]:
        ops[i]()
        assert_checksums_valid(v.buf)
    done = set(order[:n])
    assert v.src == (new_src if 0 in done else src)
    assert v.dst == (new_dst if 1 in done else dst)
    assert v.seq == (new_seq if 2 in done else seq)
    assert v.ack == (new_ack if 3 in done else ack)
    assert v.window == (new_window if 4 in done else window)
    assert (v.tsval, v.tsecr) == (new_ts if 5 in done else ts)
    assert (v.options.tsval, v.options.tsecr) == (new_ts if 5 in done else ts)
    assert v.options.sack_blocks == tuple(new_sack if 6 in done else sack)
    assert v.sport == (new_ports[0] if 7 in done else sport)
    assert v.dport == (new_ports[1] if 8 in done else dport)
    assert v.payload == payload


# ----- checksum primitives -----------------------------------------------------------

def same_checksum(incremental: int, buf) -> bool:
    """RFC 1624 eqn. 3 equals the full checksum, except that for all-zero data
    (never an IPv4 header or a TCP pseudo-header) it answers the other ones'-
    complement zero: 0x0000 instead of 0xFFFF."""
    full = checksum(buf)
    if not any(buf):
        return full == 0xFFFF and incremental in (0x0000, 0xFFFF)
    return incremental == full

@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=2, max_size=200).filter(lambda b: len(b) % 2 == 0), st.data())
def test_update16_matches_full(data, d):
    buf = bytearray(data)
    word = d.draw(st.integers(0, len(buf) // 2 - 1)) * 2
    new = d.draw(u16)
    old_ck = checksum(buf)
    old = struct.unpack_from("!H", buf, word)[0]
    struct.pack_into("!H", buf, word, new)
    assert same_checksum(update16(old_ck, old, new), buf)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=4, max_size=200).filter(lambda b: len(b) % 2 == 0), st.data())
def test_update32_matches_full(data, d):
    buf = bytearray(data)
    off = d.draw(st.integers(0, len(buf) // 2 - 2)) * 2  # 32-bit fields sit on 16-bit boundaries
    new = d.draw(u32)
    old_ck = checksum(buf)
    old = struct.unpack_from("!I", buf, off)[0]
    struct.pack_into("!I", buf, off, new)
    assert same_checksum(update32(old_ck, old, new), buf)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=2, max_size=64).filter(lambda b: any(b)))
def test_checksum_verifies_to_zero(data):
    """Appending the checksum of even-length data makes the whole sum to zero."""
    b = data + b"\0" if len(data) % 2 else data
    assert checksum(b + struct.pack("!H", checksum(b))) == 0
    assert checksum(data) == checksum(b)  # odd length padded with zero


def test_update_known_values():
    buf = bytearray(bytes.fromhex("4500003c1c4640004006") + b"\0\0" + bytes.fromhex("ac100a63ac100a0c"))
    ck = checksum(buf)
    struct.pack_into("!H", buf, 4, 0xBEEF)
    assert update16(ck, 0x1C46, 0xBEEF) == checksum(buf) != ck
    struct.pack_into("!I", buf, 12, 0x0A000001)
    assert update32(checksum(bytes(buf[:12]) + bytes.fromhex("ac100a63") + bytes(buf[16:])),
                    0xAC100A63, 0x0A000001) == checksum(buf)


def test_checksum_known_value():
    # RFC 1071 section 3 example words
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == (~0xDDF2 & 0xFFFF)
    assert checksum(b"") == 0xFFFF


@settings(max_examples=100, deadline=None)
@given(ipv4, ipv4, st.binary(max_size=80), u32)
def test_tcp_checksum_matches_scapy(src, dst, payload, seq):
    pkt = IP(bytes(IP(src=src, dst=dst) / TCP(sport=1, dport=2, seq=seq, flags="A") / Raw(payload)))
    tcp = bytearray(bytes(pkt[TCP]))
    want = pkt[TCP].chksum
    tcp[16:18] = b"\0\0"
    assert tcp_checksum(socket.inet_aton(src), socket.inet_aton(dst), tcp) == want
