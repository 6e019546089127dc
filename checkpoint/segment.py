"""The sans-I/O view of one TCP segment, as the tracker needs it.

The data plane hands the tracker a ``nfq.packet.PacketView`` (parsed in place
from the queued bytes); tests hand it a :class:`Segment`.  Both satisfy
:class:`SegmentLike`: the tracker reads attributes and never touches bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80


@dataclass(slots=True)
class TcpOptions:
    """The TCP options the tracker understands (RFC 793, 7323, 2018)."""

    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    tsval: int | None = None
    tsecr: int | None = None
    sack_blocks: tuple[tuple[int, int], ...] = ()


class SegmentLike(Protocol):
    """What the tracker reads of a segment: read-only, so a parsed packet's
    properties (``nfq.packet.PacketView``) fit as well as a ``Segment``'s fields."""

    @property
    def src(self) -> str: ...

    @property
    def dst(self) -> str: ...

    @property
    def sport(self) -> int: ...

    @property
    def dport(self) -> int: ...

    @property
    def seq(self) -> int: ...

    @property
    def ack(self) -> int: ...

    @property
    def flags(self) -> int: ...

    @property
    def window(self) -> int: ...

    @property
    def payload_len(self) -> int: ...

    @property
    def options(self) -> TcpOptions: ...

    @property
    def tsval(self) -> int | None: ...

    @property
    def tsecr(self) -> int | None: ...


@dataclass(slots=True)
class Segment:
    """A TCP segment built by hand (tests, replays of captures, the splice engine)."""

    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    ack: int = 0
    flags: int = ACK
    window: int = 65535
    payload: bytes = b""
    options: TcpOptions = field(default_factory=TcpOptions)

    @property
    def payload_len(self) -> int:
        return len(self.payload)

    @property
    def tsval(self) -> int | None:
        return self.options.tsval

    @property
    def tsecr(self) -> int | None:
        return self.options.tsecr
