"""A view of one IPv4/TCP or IPv6/TCP packet that parses and rewrites headers in place.

``PacketView(buf)`` checks the headers once (raising :class:`MalformedPacket`
with the reason, which the data plane counts; never another exception,
whatever the bytes) and then reads fields straight out of the ``bytearray``
with ``struct``.  Setters change the bytes in place and fix the IPv4 and TCP
checksums incrementally (RFC 1624), so a rewrite costs the same for a 40-byte
ACK and a 1500-byte segment.

Both families, one view.  The version nibble picks the parser; an IPv6 packet
gets an instance of the subclass :class:`PacketView6` (``version == 6``),
which only differs in where the addresses are (16 bytes each at 8 and 24)
and in having no header checksum (the TCP checksum covers the 16-byte
addresses through its pseudo-header).  Everything after the network header
is found through ``ihl``, the network header's length: the IPv4 header with
its options, or the IPv6 header with its extension headers.  ``total_len``
is the whole datagram (IPv6: 40 + payload length).  The IPv4 path is the
hot one and costs nothing more for IPv6 existing.

IPv6 extension headers, by rule (RFC 8200 section 4): hop-by-hop options
(first only), destination options (at most twice) and a routing header (at
most once, with no segments left: with segments left the IPv6 destination is
a waypoint, not the connection's endpoint, and the TCP checksum covers the
final one) are walked by their length field; a fragment header is refused as
an IPv4 fragment is; ESP, AH, no-next-header, the other extension headers
and any other upper layer are refused by name; a header running past the
captured bytes or the payload length is refused, never guessed at.
Jumbograms (payload length 0) are refused.

The view satisfies ``checkpoint.segment.SegmentLike``: the tracker consumes
it directly, without a copy.

A header-only copy (the queue copied fewer bytes than the datagram's length,
as for the observed return path) is accepted with ``allow_truncated=True``:
every header field reads normally, ``payload_len`` comes from the IPv4 total
length (the IPv6 payload length), and any rewrite raises, since setting a
truncated payload would truncate the real packet.  The network and TCP
headers (options included) must be captured whole.
"""

from __future__ import annotations

import socket
import struct
from typing import ClassVar

from checkpoint.segment import TcpOptions

from .checksum import update16, update32, update_words

_H = struct.Struct("!H")
_I = struct.Struct("!I")
_HH = struct.Struct("!HH")
_TS_FAST = b"\x01\x01\x08\x0a"  # NOP NOP TS(len 10): how Linux lays timestamps out

IPPROTO_TCP = 6

# IPv6 next-header values (IANA "IPv6 Extension Header Types", RFC 8200 section 4)
_HOPOPTS, _ROUTING, _FRAGMENT, _ESP, _AH, _NONXT, _DSTOPTS = 0, 43, 44, 50, 51, 59, 60
_V6_REFUSED = {
    _FRAGMENT: "IPv6 fragment",
    _ESP: "IPv6 ESP (encrypted payload)",
    _AH: "IPv6 AH (authenticated payload, cannot be rewritten)",
    _NONXT: "IPv6 no next header",
}
_V6_OTHER_EXT = frozenset((135, 139, 140, 253, 254))  # mobility, HIP, shim6, experimental


class MalformedPacket(ValueError):
    """The bytes are not a complete IPv4/TCP or IPv6/TCP packet this view can handle."""


def _too_short(buf: bytearray | bytes, n: int) -> str:
    fam = "IPv6" if n and buf[0] >> 4 == 6 else "IPv4"
    return f"too short for {fam}+TCP ({n} bytes)"


def ipv6_tcp_offset(buf: bytearray | bytes | memoryview, n: int, total: int) -> int:
    """Offset of the TCP header in an IPv6 packet: after the 40-byte header and the extension
    headers walked by rule (module docstring).  ``n``: bytes captured, ``total``: 40 + payload
    length.  Raises :class:`MalformedPacket` for anything else."""
    nh = buf[6]
    off = 40
    dstopts = 0
    routing = False
    while nh != IPPROTO_TCP:
        if nh == _HOPOPTS or nh == _DSTOPTS or nh == _ROUTING:
            if nh == _HOPOPTS and off != 40:
                raise MalformedPacket("IPv6 hop-by-hop options not first")
            if nh == _DSTOPTS:
                dstopts += 1
                if dstopts > 2:
                    raise MalformedPacket("IPv6 destination options repeated (more than twice)")
            elif nh == _ROUTING:
                if routing:
                    raise MalformedPacket("IPv6 routing header repeated")
                routing = True
            if off + 8 > total:
                raise MalformedPacket(f"IPv6 extension header past the payload length (next header {nh} "
                                      f"at {off}, datagram ends at {total})")
            if off + 8 > n:
                raise MalformedPacket(f"truncated: IPv6 extension header not captured (next header {nh})")
            hlen = (buf[off + 1] + 1) * 8
            if off + hlen > total:
                raise MalformedPacket(f"IPv6 extension header longer than the payload (next header {nh}, "
                                      f"{hlen} bytes at {off}, datagram ends at {total})")
            if off + hlen > n:
                raise MalformedPacket(f"truncated: IPv6 extension header not captured (next header {nh})")
            if nh == _ROUTING and buf[off + 3]:
                raise MalformedPacket(f"IPv6 routing header with segments left ({buf[off + 3]}): "
                                      "the destination is not the endpoint")
            nh = buf[off]
            off += hlen
        elif nh in _V6_REFUSED:
            raise MalformedPacket(_V6_REFUSED[nh])
        elif nh in _V6_OTHER_EXT:
            raise MalformedPacket(f"IPv6 extension header not supported (next header {nh})")
        else:
            raise MalformedPacket(f"not TCP (next header {nh})")
    return off


class PacketView:
    """An IPv4/TCP packet's view; ``PacketView(buf)`` of an IPv6 packet is a :class:`PacketView6`."""

    __slots__ = ("buf", "ihl", "thl", "total_len", "truncated", "_opts")
    version: ClassVar[int] = 4

    def __init__(self, buf: bytearray, allow_truncated: bool = False) -> None:
        n = len(buf)
        if n < 40:
            raise MalformedPacket(_too_short(buf, n))
        b0 = buf[0]
        if b0 >> 4 != 4:
            if b0 >> 4 == 6:
                self._init6(buf, n, allow_truncated)
                return
            raise MalformedPacket(f"not IPv4 or IPv6 (version {b0 >> 4})")
        ihl = (b0 & 0x0F) * 4
        if ihl < 20:
            raise MalformedPacket(f"bad IPv4 header length {ihl}")
        total: int = _H.unpack_from(buf, 2)[0]
        truncated = total > n
        if truncated and not allow_truncated:
            raise MalformedPacket(f"truncated: IPv4 total length {total} > {n} bytes captured")
        if total < ihl + 20:
            raise MalformedPacket(f"IPv4 total length {total} too small")
        if buf[9] != IPPROTO_TCP:
            raise MalformedPacket(f"not TCP (protocol {buf[9]})")
        if _H.unpack_from(buf, 6)[0] & 0x3FFF:
            raise MalformedPacket("IPv4 fragment")
        if ihl + 20 > n:
            raise MalformedPacket("truncated: TCP header not captured")
        thl = (buf[ihl + 12] >> 4) * 4
        if thl < 20 or ihl + thl > total:
            raise MalformedPacket(f"bad TCP data offset {thl}")
        if ihl + thl > n:
            raise MalformedPacket("truncated: TCP options not captured")
        self.buf = buf
        self.ihl = ihl
        self.thl = thl
        self.total_len = total
        self.truncated = truncated
        self._opts: TcpOptions | None = None

    def _init6(self, buf: bytearray, n: int, allow_truncated: bool) -> None:
        plen: int = _H.unpack_from(buf, 4)[0]
        if plen == 0:
            if buf[6] == _HOPOPTS:
                raise MalformedPacket("IPv6 jumbogram (payload length 0)")
            raise MalformedPacket("IPv6 payload length 0 too small")
        total = 40 + plen
        truncated = total > n
        if truncated and not allow_truncated:
            raise MalformedPacket(f"truncated: IPv6 datagram length {total} (40 + payload length {plen}) "
                                  f"> {n} bytes captured")
        ihl = ipv6_tcp_offset(buf, n, total)
        if total < ihl + 20:
            raise MalformedPacket(f"IPv6 payload length {plen} too small")
        if ihl + 20 > n:
            raise MalformedPacket("truncated: TCP header not captured")
        thl = (buf[ihl + 12] >> 4) * 4
        if thl < 20 or ihl + thl > total:
            raise MalformedPacket(f"bad TCP data offset {thl}")
        if ihl + thl > n:
            raise MalformedPacket("truncated: TCP options not captured")
        self.buf = buf
        self.ihl = ihl
        self.thl = thl
        self.total_len = total
        self.truncated = truncated
        self._opts = None
        self.__class__ = PacketView6

    # ----- IPv4 -------------------------------------------------------------
    @property
    def src(self) -> str:
        return socket.inet_ntoa(self.buf[12:16])

    @property
    def dst(self) -> str:
        return socket.inet_ntoa(self.buf[16:20])

    @property
    def src_raw(self) -> bytes:
        return bytes(self.buf[12:16])

    @property
    def dst_raw(self) -> bytes:
        return bytes(self.buf[16:20])

    def set_src(self, addr: bytes) -> None:
        self._set_addr(12, addr)

    def set_dst(self, addr: bytes) -> None:
        self._set_addr(16, addr)

    def _set_addr(self, off: int, addr: bytes) -> None:
        if self.truncated:
            raise MalformedPacket("cannot rewrite a truncated copy")
        buf = self.buf
        old = _I.unpack_from(buf, off)[0]
        try:
            new = _I.unpack(addr)[0]
        except struct.error:
            raise ValueError(f"an IPv4 packet takes a 4-byte address, not {len(addr)} bytes") from None
        if old == new:
            return
        buf[off:off + 4] = addr
        _H.pack_into(buf, 10, update32(_H.unpack_from(buf, 10)[0], old, new))
        # the TCP checksum covers the addresses through the pseudo-header
        coff = self.ihl + 16
        _H.pack_into(buf, coff, update32(_H.unpack_from(buf, coff)[0], old, new))

    # ----- TCP fixed header ---------------------------------------------------
    @property
    def sport(self) -> int:
        v: int = _H.unpack_from(self.buf, self.ihl)[0]
        return v

    @property
    def dport(self) -> int:
        v: int = _H.unpack_from(self.buf, self.ihl + 2)[0]
        return v

    @property
    def ports(self) -> tuple[int, int]:
        return _HH.unpack_from(self.buf, self.ihl)

    @property
    def seq(self) -> int:
        v: int = _I.unpack_from(self.buf, self.ihl + 4)[0]
        return v

    @property
    def ack(self) -> int:
        v: int = _I.unpack_from(self.buf, self.ihl + 8)[0]
        return v

    @property
    def flags(self) -> int:
        return self.buf[self.ihl + 13]

    @property
    def window(self) -> int:
        v: int = _H.unpack_from(self.buf, self.ihl + 14)[0]
        return v

    @property
    def payload_len(self) -> int:
        return self.total_len - self.ihl - self.thl

    @property
    def captured_payload(self) -> bytes:
        """The payload bytes copied to us (all of them unless truncated)."""
        return bytes(memoryview(self.buf)[self.ihl + self.thl:min(self.total_len, len(self.buf))])  # one copy

    @property
    def payload(self) -> bytes:
        if self.truncated:
            raise MalformedPacket("payload not captured")
        return bytes(memoryview(self.buf)[self.ihl + self.thl:self.total_len])  # one copy, not two

    @property
    def payload_view(self) -> memoryview:
        """The payload in place, no copy (for a reader that does not keep it: a digest)."""
        if self.truncated:
            raise MalformedPacket("payload not captured")
        return memoryview(self.buf)[self.ihl + self.thl:self.total_len]

    def _set_tcp32(self, rel: int, value: int) -> None:
        if self.truncated:
            raise MalformedPacket("cannot rewrite a truncated copy")
        buf, off = self.buf, self.ihl + rel
        old = _I.unpack_from(buf, off)[0]
        if old == value:
            return
        _I.pack_into(buf, off, value)
        coff = self.ihl + 16
        _H.pack_into(buf, coff, update32(_H.unpack_from(buf, coff)[0], old, value))

    def _set_tcp16(self, rel: int, value: int) -> None:
        if self.truncated:
            raise MalformedPacket("cannot rewrite a truncated copy")
        buf, off = self.buf, self.ihl + rel
        old = _H.unpack_from(buf, off)[0]
        if old == value:
            return
        _H.pack_into(buf, off, value)
        coff = self.ihl + 16
        _H.pack_into(buf, coff, update16(_H.unpack_from(buf, coff)[0], old, value))

    def set_sport(self, value: int) -> None:
        self._set_tcp16(0, value)

    def set_dport(self, value: int) -> None:
        self._set_tcp16(2, value)

    def set_seq(self, value: int) -> None:
        self._set_tcp32(4, value & 0xFFFFFFFF)

    def set_ack(self, value: int) -> None:
        self._set_tcp32(8, value & 0xFFFFFFFF)

    def set_window(self, value: int) -> None:
        self._set_tcp16(14, value & 0xFFFF)

    # ----- TCP options --------------------------------------------------------
    @property
    def options(self) -> TcpOptions:
        if self._opts is None:
            self._opts = parse_options(self.buf, self.ihl + 20, self.ihl + self.thl)
        return self._opts

    def _ts_offset(self) -> int:
        """Absolute offset of the TSval field, or -1 without a timestamp option."""
        buf, o = self.buf, self.ihl + 20
        if self.thl >= 32 and buf[o:o + 4] == _TS_FAST:
            return o + 4
        return find_option(buf, o, self.ihl + self.thl, 8, 10)

    @property
    def tsval(self) -> int | None:
        off = self._ts_offset()
        return None if off < 0 else _I.unpack_from(self.buf, off)[0]

    @property
    def tsecr(self) -> int | None:
        off = self._ts_offset()
        return None if off < 0 else _I.unpack_from(self.buf, off + 4)[0]

    def set_timestamps(self, tsval: int, tsecr: int) -> None:
        off = self._ts_offset()
        if off < 0:
            raise MalformedPacket("no timestamp option to rewrite")
        rel = off - self.ihl
        self._set_tcp32(rel, tsval & 0xFFFFFFFF)
        self._set_tcp32(rel + 4, tsecr & 0xFFFFFFFF)
        self._opts = None

    def sack_offset(self) -> int:
        """Absolute offset of the SACK option's kind byte, or -1."""
        return find_option(self.buf, self.ihl + 20, self.ihl + self.thl, 5, None) - 2

    def set_sack_blocks(self, blocks: list[tuple[int, int]]) -> None:
        """Rewrite the SACK blocks in place (same number of blocks)."""
        kind = self.sack_offset()
        if kind < 0:
            raise MalformedPacket("no SACK option to rewrite")
        n = (self.buf[kind + 1] - 2) // 8
        if n != len(blocks):
            raise ValueError("SACK block count differs")
        for i, (left, right) in enumerate(blocks):
            rel = kind + 2 + 8 * i - self.ihl
            self._set_tcp32(rel, left)
            self._set_tcp32(rel + 4, right)
        self._opts = None

    def strip_sack(self) -> None:
        """Turn the SACK option into NOPs (same header length, checksum fixed)."""
        kind = self.sack_offset()
        if kind < 0:
            return
        if self.truncated:
            raise MalformedPacket("cannot rewrite a truncated copy")
        buf = self.buf
        ln = buf[kind + 1]
        tcp0 = self.ihl
        lo = kind - ((kind - tcp0) % 2)          # word-aligned to the TCP header
        hi = kind + ln + ((kind + ln - tcp0) % 2)
        old = bytes(buf[lo:hi])
        buf[kind:kind + ln] = b"\x01" * ln
        coff = self.ihl + 16
        c = _H.unpack_from(buf, coff)[0]
        for i in range(0, hi - lo, 2):
            o = (old[i] << 8) | old[i + 1]
            n = (buf[lo + i] << 8) | buf[lo + i + 1]
            if o != n:
                c = update16(c, o, n)
        _H.pack_into(buf, coff, c)
        self._opts = None

    def __repr__(self) -> str:
        src, dst = (self.src, self.dst) if self.version == 4 else (f"[{self.src}]", f"[{self.dst}]")
        return (
            f"<{type(self).__name__} {src}:{self.sport} > {dst}:{self.dport} "
            f"flags={self.flags:#04x} seq={self.seq} ack={self.ack} len={self.payload_len}>"
        )


class PacketView6(PacketView):
    """An IPv6/TCP packet's view (made by ``PacketView(buf)``): addresses of 16 bytes at 8 and
    24, no header checksum; ``ihl`` covers the extension headers walked."""

    __slots__ = ()
    version: ClassVar[int] = 6

    @property
    def src(self) -> str:
        return socket.inet_ntop(socket.AF_INET6, self.buf[8:24])

    @property
    def dst(self) -> str:
        return socket.inet_ntop(socket.AF_INET6, self.buf[24:40])

    @property
    def src_raw(self) -> bytes:
        return bytes(self.buf[8:24])

    @property
    def dst_raw(self) -> bytes:
        return bytes(self.buf[24:40])

    def set_src(self, addr: bytes) -> None:
        self._set_addr(8, addr)

    def set_dst(self, addr: bytes) -> None:
        self._set_addr(24, addr)

    def _set_addr(self, off: int, addr: bytes) -> None:
        if self.truncated:
            raise MalformedPacket("cannot rewrite a truncated copy")
        if len(addr) != 16:
            raise ValueError(f"an IPv6 packet takes a 16-byte address, not {len(addr)} bytes")
        buf = self.buf
        old = bytes(buf[off:off + 16])
        if old == addr:
            return
        buf[off:off + 16] = addr
        # no IPv6 header checksum; the TCP pseudo-header holds both addresses
        coff = self.ihl + 16
        _H.pack_into(buf, coff, update_words(_H.unpack_from(buf, coff)[0], old, addr))


def find_option(buf: bytearray | bytes, start: int, end: int, kind: int, length: int | None) -> int:
    """Offset of the data of option ``kind`` (with that total length, if given), or -1."""
    o = start
    while o < end:
        k = buf[o]
        if k == 0:
            return -1
        if k == 1:
            o += 1
            continue
        if o + 1 >= end:
            return -1
        ln = buf[o + 1]
        if ln < 2 or o + ln > end:
            return -1
        if k == kind and (length is None or ln == length):
            return o + 2
        o += ln
    return -1


def parse_options(buf: bytearray | bytes, start: int, end: int) -> TcpOptions:
    """All options the tracker understands.  Malformed option lists end parsing
    (what was parsed so far is kept), as a TCP receiver would."""
    opts = TcpOptions()
    o = start
    while o < end:
        k = buf[o]
        if k == 0:
            break
        if k == 1:
            o += 1
            continue
        if o + 1 >= end:
            break
        ln = buf[o + 1]
        if ln < 2 or o + ln > end:
            break
        if k == 2 and ln == 4:
            opts.mss = _H.unpack_from(buf, o + 2)[0]
        elif k == 3 and ln == 3:
            opts.wscale = buf[o + 2]
        elif k == 4 and ln == 2:
            opts.sack_permitted = True
        elif k == 8 and ln == 10:
            opts.tsval, opts.tsecr = struct.unpack_from("!II", buf, o + 2)
        elif k == 5 and ln >= 10 and (ln - 2) % 8 == 0:
            opts.sack_blocks = tuple(
                struct.unpack_from("!II", buf, o + 2 + 8 * i) for i in range((ln - 2) // 8)
            )
        o += ln
    return opts
