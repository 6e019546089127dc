"""A view of one IPv4/TCP packet that parses and rewrites headers in place.

``PacketView(buf)`` checks the headers once (raising :class:`MalformedPacket`
with the reason, which the data plane counts) and then reads fields straight
out of the ``bytearray`` with ``struct``.  Setters change the bytes in place
and fix the IPv4 and TCP checksums incrementally (RFC 1624), so a rewrite
costs the same for a 40-byte ACK and a 1500-byte segment.

The view satisfies ``checkpoint.segment.SegmentLike``: the tracker consumes
it directly, without a copy.

A header-only copy (the queue copied fewer bytes than the IPv4 total length,
as for the observed return path) is accepted with ``allow_truncated=True``:
every header field reads normally, ``payload_len`` comes from the IPv4 total
length, and any rewrite raises, since setting a truncated payload would
truncate the real packet.
"""

from __future__ import annotations

import socket
import struct

from checkpoint.segment import TcpOptions

from .checksum import update16, update32

_H = struct.Struct("!H")
_I = struct.Struct("!I")
_HH = struct.Struct("!HH")
_TS_FAST = b"\x01\x01\x08\x0a"  # NOP NOP TS(len 10): how Linux lays timestamps out

IPPROTO_TCP = 6


class MalformedPacket(ValueError):
    """The bytes are not a complete IPv4/TCP packet this view can handle."""


class PacketView:
    __slots__ = ("buf", "ihl", "thl", "total_len", "truncated", "_opts")

    def __init__(self, buf: bytearray, allow_truncated: bool = False) -> None:
        n = len(buf)
        if n < 40:
            raise MalformedPacket(f"too short for IPv4+TCP ({n} bytes)")
        b0 = buf[0]
        if b0 >> 4 != 4:
            raise MalformedPacket(f"not IPv4 (version {b0 >> 4})")
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
        new = _I.unpack(addr)[0]
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
        return bytes(self.buf[self.ihl + self.thl:min(self.total_len, len(self.buf))])

    @property
    def payload(self) -> bytes:
        if self.truncated:
            raise MalformedPacket("payload not captured")
        return bytes(self.buf[self.ihl + self.thl:self.total_len])

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
        return (
            f"<PacketView {self.src}:{self.sport} > {self.dst}:{self.dport} "
            f"flags={self.flags:#04x} seq={self.seq} ack={self.ack} len={self.payload_len}>"
        )


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
