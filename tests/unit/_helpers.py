"""Segment builders shared by the unit tests."""

from __future__ import annotations

from checkpoint.ici import ConnectionRecord
from checkpoint.segment import ACK, SYN, Segment, TcpOptions
from checkpoint.seqnum import seq_add
from checkpoint.tracker import observe
from nfq.packet import PacketView

CLIENT_IP, CLIENT_PORT = "192.0.2.10", 40000
VIP, VPORT = "198.51.100.1", 80
KEY = (CLIENT_IP, CLIENT_PORT, VIP, VPORT)


def make_record(cid: int = 1, now: float = 0.0, key=KEY) -> ConnectionRecord:
    return ConnectionRecord(
        id=cid,
        client_ip=key[0],
        client_port=key[1],
        vip=key[2],
        vport=key[3],
        service="web",
        backend="b1",
        backend_ip="10.0.0.2",
        backend_port=8080,
        created=now,
        last_seen=now,
    )


def cseg(seq: int, ack: int = 0, flags: int = ACK, payload: bytes = b"", window: int = 65535,
         options: TcpOptions | None = None, **opts) -> Segment:
    """A client -> VIP segment.  ``opts`` are TcpOptions fields (tsval=..., ...)."""
    return Segment(CLIENT_IP, VIP, CLIENT_PORT, VPORT, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, flags,
                   window, payload, options or TcpOptions(**opts))


def sseg(seq: int, ack: int = 0, flags: int = ACK, payload: bytes = b"", window: int = 65535,
         options: TcpOptions | None = None, **opts) -> Segment:
    """A VIP -> client segment."""
    return Segment(VIP, CLIENT_IP, VPORT, CLIENT_PORT, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, flags,
                   window, payload, options or TcpOptions(**opts))


def handshake_segments(cisn: int, sisn: int, *, c_mss: int | None = 1460, s_mss: int | None = 1400,
                       c_wscale: int | None = 7, s_wscale: int | None = 9, sack: bool = True,
                       c_ts: int | None = 100, s_ts: int | None = 7000,
                       c_win: int = 64240, s_win: int = 65160, ack_win: int = 502):
    """[(segment, from_client)] for SYN, SYN-ACK, ACK with the usual Linux options."""
    syn = cseg(cisn, 0, SYN, window=c_win, mss=c_mss, wscale=c_wscale, sack_permitted=sack,
               tsval=c_ts, tsecr=None if c_ts is None else 0)
    synack = sseg(sisn, seq_add(cisn, 1), SYN | ACK, window=s_win, mss=s_mss, wscale=s_wscale,
                  sack_permitted=sack, tsval=s_ts,
                  tsecr=None if s_ts is None else (c_ts if c_ts is not None else 0))
    ack_opts = {}
    if c_ts is not None and s_ts is not None:
        ack_opts = {"tsval": seq_add(c_ts, 1), "tsecr": s_ts}
    ack = cseg(seq_add(cisn, 1), seq_add(sisn, 1), ACK, window=ack_win, **ack_opts)
    return [(syn, True), (synack, False), (ack, True)]


def handshake(rec: ConnectionRecord, cisn: int, sisn: int, now: float = 0.0, **kw) -> None:
    for seg, from_client in handshake_segments(cisn, sisn, **kw):
        observe(rec, seg, from_client, now)


# ----- scapy ---------------------------------------------------------------------

def view(pkt) -> PacketView:
    """A scapy packet as the data plane sees it."""
    return PacketView(bytearray(bytes(pkt)))


def scapy_options(opts: TcpOptions, linux_layout: bool = True) -> list:
    """TcpOptions as a scapy option list (Linux order: MSS, SACKOK, TS, NOP, WS)."""
    out: list = []
    if opts.mss is not None:
        out.append(("MSS", opts.mss))
    if opts.sack_permitted:
        out.append(("SAckOK", b""))
    if opts.tsval is not None:
        if not opts.mss and not opts.sack_permitted and linux_layout:
            out += [("NOP", None), ("NOP", None)]
        out.append(("Timestamp", (opts.tsval, opts.tsecr or 0)))
    if opts.wscale is not None:
        out += [("NOP", None), ("WScale", opts.wscale)]
    if opts.sack_blocks:
        flat = tuple(x for blk in opts.sack_blocks for x in blk)
        out += [("NOP", None), ("NOP", None), ("SAck", flat)]
    return out


def to_scapy(seg: Segment, linux_layout: bool = True):
    from scapy.layers.inet import IP, TCP

    pkt = IP(src=seg.src, dst=seg.dst) / TCP(
        sport=seg.sport, dport=seg.dport, seq=seg.seq, ack=seg.ack, flags=seg.flags,
        window=seg.window, options=scapy_options(seg.options, linux_layout))
    if seg.payload:
        pkt = pkt / seg.payload
    return pkt


def to_view(seg: Segment, linux_layout: bool = True) -> PacketView:
    return view(to_scapy(seg, linux_layout))
