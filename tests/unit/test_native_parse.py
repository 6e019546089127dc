"""The native binding's pure parts through its compiled module: the netlink parser on
real-shaped messages, and the whole-TCP-checksum against an independent computation."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from nfq.native import _lib

from .test_native_fuzz import packet_message, tcp_packet

ffi, lib = _lib()


def parse(data: bytes, max_pkts: int = 8) -> tuple[list[dict], int]:
    out = ffi.new("struct nfqb_pkt[]", max_pkts)
    errors = ffi.new("uint64_t *")
    buf = ffi.new("char[]", data)
    n = lib.nfqb_parse_datagram(buf, len(data), out, max_pkts, errors)
    pkts = [{"id": out[i].id, "mark": out[i].mark, "skbinfo": out[i].skbinfo, "len": out[i].len,
             "orig_len": out[i].orig_len, "data": bytes(ffi.buffer(out[i].data, out[i].len))} for i in range(n)]
    return pkts, int(errors[0])


def test_a_packet_message_is_read_field_by_field() -> None:
    pkt = tcp_packet(100)
    (p,), errors = parse(packet_message(7, pkt, mark=0x10, skbinfo=3))
    assert errors == 0
    assert (p["id"], p["mark"], p["skbinfo"], p["len"], p["orig_len"]) == (7, 0x10, 3, len(pkt), len(pkt))
    assert p["data"] == pkt


def test_two_messages_in_one_datagram_and_a_truncated_copy() -> None:
    a, b = tcp_packet(10), tcp_packet(20)
    pkts, errors = parse(packet_message(1, a) + packet_message(2, b, cap=4000))
    assert errors == 0 and [p["id"] for p in pkts] == [1, 2]
    assert pkts[1]["orig_len"] == 4000 and pkts[1]["len"] == len(b)


def test_lies_are_counted_and_nothing_past_the_message_is_read() -> None:
    msg = packet_message(1, tcp_packet(11))       # unpadded at its end, as the kernel sends it
    assert parse(msg)[0] and parse(msg)[1] == 0
    assert parse(msg[:-1]) == ([], 1)             # the message claims a byte more than arrived
    bad = bytearray(msg)
    struct.pack_into("=I", bad, 0, 0x8F8F8F8F)    # a length of more than 2**31
    assert parse(bytes(bad)) == ([], 1)
    assert parse(b"\x01\x02\x03") == ([], 1)       # not even a header


def _reference_checksum(pkt: bytes, l4: int) -> int:
    if pkt[0] >> 4 == 4:
        pseudo = pkt[12:20] + struct.pack("!BBH", 0, 6, len(pkt) - l4)
    else:
        pseudo = pkt[8:40] + struct.pack("!IxxxB", len(pkt) - l4, 6)
    seg = bytearray(pkt[l4:])
    seg[16:18] = b"\0\0"
    data = pseudo + bytes(seg) + (b"\0" if len(seg) % 2 else b"")
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


@settings(max_examples=300, deadline=None)
@given(v6=st.booleans(), payload=st.binary(max_size=3000), seed=st.integers(0, 0xFFFF))
def test_the_whole_tcp_checksum_matches_a_reference(v6: bool, payload: bytes, seed: int) -> None:
    tcp = struct.pack("!HHIIBBHHH", 40000, 80, 1, 2, 0x50, 0x18, 65535, seed, 0) + payload
    if v6:
        pkt = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), 6, 64, b"\x20\x01\x0d\xb8" + b"\0" * 11 + b"\x0a",
                          b"\x20\x01\x0d\xb8" + b"\0" * 11 + b"\x0b") + tcp
        l4 = 40
    else:
        pkt = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0, b"\xc0\0\2\x0a",
                          b"\xcb\0\x71\x0a") + tcp
        l4 = 20
    buf = ffi.new("unsigned char[]", pkt)
    assert lib.nfqb_tcp_checksum(buf, len(pkt), l4) == 0
    got = struct.unpack("!H", bytes(ffi.buffer(buf, len(pkt)))[l4 + 16:l4 + 18])[0]
    assert got == _reference_checksum(pkt, l4)


def test_the_checksum_refuses_offsets_outside_the_packet() -> None:
    pkt = tcp_packet(0)
    buf = ffi.new("unsigned char[]", pkt)
    assert lib.nfqb_tcp_checksum(buf, len(pkt), len(pkt) - 10) == -1
    assert lib.nfqb_tcp_checksum(buf, len(pkt), 8) == -1       # inside the IPv4 header
