"""The compiled fast path against the Python engine, its specification (issue 12, item 4).

The same packets go to two data planes: one runs the Python engine on every packet; the other
has the offload (``appliance.dataplane.offload``) and its flow cache (``nfq/native/fastpath.c``),
and takes the packets in batches as the native binding does: the cache sees the batch first and
decides what it can, the records are synced, then the Python engine handles the rest in order.
Both must give every packet the same verdict, and after every batch the same records (every field
of the API's document) and the same counters.  Hypothesis writes the packet sequences: two
connections interleaved, data and pure ACKs both ways, retransmissions, acknowledgments and
timestamps going back or leaping 2**30 and more, TSecr 0, windows, packets without timestamps, URG, FINs
and RSTs, in batches of any size.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.config import parse
from appliance.dataplane import Dataplane
from appliance.dataplane.offload import FPC_CLIENT, FPC_SERVER, Offload
from checkpoint.seqnum import seq_add
from nfq.build import tcp_options, tcp_packet
from nfq.native import _lib
from nfq.queue import Verdict

VIP, PRIMARY, BACKUP = "203.0.113.10", "198.51.100.10", "198.51.100.20"
VIP6, PRIMARY6, BACKUP6 = "2001:db8::10", "2001:db8:1::10", "2001:db8:1::20"
CLIENT, CLIENT6 = "192.0.2.10", "2001:db8:2::10"
FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


def config(**failover: Any) -> dict[str, Any]:
    return {
        "api": {"token": "a-long-token"},
        "service": [{"name": "web", "vip": VIP, "vip6": VIP6, "port": 80, "failover": {"verify": "full", **failover},
                     "backend": [{"name": "primary", "address": PRIMARY, "address6": PRIMARY6},
                                 {"name": "backup", "address": BACKUP, "address6": BACKUP6}]}],
    }


def plane(cfg: dict[str, Any], kernel_rewrites: bool, offload: bool) -> Dataplane:
    dp = Dataplane(parse(cfg))
    if kernel_rewrites:
        for svc in dp.services.values():
            svc.kernel_target = svc.active
    if offload:
        Offload(dp, 64)
    return dp


@dataclass
class Conn:
    """One connection's two ends, as the packet writer keeps them."""

    client: str
    server: str
    vip: str
    port: int
    c_seq: int
    s_seq: int
    c_ts: int = 1000
    s_ts: int = 90000
    s_base: int = 0   # the server's stream offset 0 (its ISN + 1), once the handshake is written
    c_base: int = 0   # the client's

    def c2s(self, seq: int, ack: int, flags: int, data: bytes = b"", window: int = 2000,
            tsval: int | None = None, tsecr: int | None = None, syn: bool = False) -> bytes:
        opts = tcp_options(mss=1460, wscale=7, sack_permitted=True, tsval=tsval, tsecr=tsecr, syn=syn) \
            if syn else tcp_options(tsval=tsval, tsecr=tsecr)
        return tcp_packet(self.client, self.vip, self.port, 80, seq, ack, flags, window, opts, data)

    def s2c(self, seq: int, ack: int, flags: int, data: bytes = b"", window: int = 2000,
            tsval: int | None = None, tsecr: int | None = None, syn: bool = False) -> bytes:
        opts = tcp_options(mss=1400, wscale=9, sack_permitted=True, tsval=tsval, tsecr=tsecr, syn=syn) \
            if syn else tcp_options(tsval=tsval, tsecr=tsecr)
        return tcp_packet(self.server, self.client, 80, self.port, seq, ack, flags, window, opts, data)

    def handshake(self) -> list[bytes]:
        c, s = self.c_seq, self.s_seq
        self.c_seq, self.s_seq = seq_add(c, 1), seq_add(s, 1)
        self.s_base, self.c_base = self.s_seq, self.c_seq
        return [self.c2s(c, 0, SYN, tsval=self.c_ts, tsecr=0, syn=True),
                self.s2c(s, self.c_seq, SYN | ACK, tsval=self.s_ts, tsecr=self.c_ts, syn=True),
                self.c2s(self.c_seq, self.s_seq, ACK, tsval=self.c_ts + 1, tsecr=self.s_ts)]


# what one step of the writer does: (kind, knobs drawn by hypothesis)
STEP = st.tuples(
    st.sampled_from(["c_ack"] * 4 + ["s_ack"] * 4 + ["c_data"] * 5 + ["s_data"] * 4 + ["s_bulk"] * 2
                    + ["c_odd", "s_odd", "c_fin", "s_fin", "rst"]),
    st.integers(0, 1),                      # which connection
    st.integers(-3, 3),                     # how far the sequence number is from the end's next
    st.integers(-3, 3),                     # the acknowledgment's step
    st.integers(0, 0xFFFF),                 # window
    st.sampled_from([None, 0, 1, -1, 2, 1 << 30, 1 << 31]),  # the TSval's step (None: no option)
    st.integers(1, 300),                    # payload length (data steps)
    st.integers(0, 5),                      # 0: a TSecr of 0 (not an echo), else the peer's TSval
    st.integers(0, 5),                      # server data: where "\r\nDate: " values sit in it
)

DATE = b"\r\nDate: "
VALUE = b"Sun, 06 Nov 1994 08:49:37 GMT"


def _stream() -> bytes:
    """What the servers send: bytes with volatile values every few dozen to few thousand bytes
    (so segments cut patterns and values at every position), 1 MiB, repeated."""
    rnd = random.Random(7)
    out = bytearray()
    while len(out) < 1 << 20:
        out += bytes(rnd.randrange(256) for _ in range(rnd.choice((3, 40, 700, 3000))))
        out += DATE + VALUE if rnd.random() < 0.9 else DATE[:rnd.randrange(1, len(DATE))]
    return bytes(out[:1 << 20])


STREAM = _stream()


def stream_at(offset: int, n: int) -> bytes:
    o = offset % len(STREAM)
    out = STREAM[o:o + n]
    while len(out) < n:
        out += STREAM[:n - len(out)]
    return out


def body(n: int, shape: int, salt: int) -> bytes:
    """n bytes of server data with volatile values where ``shape`` says: none, at the start, a
    pattern cut by the segment's end, a value cut by it, many, or a value at the very end."""
    base = bytes((salt + i * 7) & 0xFF for i in range(256)) * (n // 256 + 1)
    field = DATE + VALUE
    if shape == 0:
        b = base
    elif shape == 1:
        b = field + base
    elif shape == 2:
        b = base[:max(0, n - 4)] + DATE
    elif shape == 3:
        b = base[:max(0, n - len(DATE) - 10)] + field
    elif shape == 4:
        b = (field + base[:50]) * (n // 87 + 1)
    else:
        b = base[:max(0, n - len(field))] + field
    return b[:n]


def writer(steps: list[tuple[Any, ...]], v6: bool) -> list[bytes]:
    # the second connection's clocks are about to wrap: a TSecr of 0 is ahead of them
    conns = [Conn(CLIENT6 if v6 else CLIENT, PRIMARY6 if v6 else PRIMARY, VIP6 if v6 else VIP, 40000 + i,
                  c_seq=0xFFFFFF00 - 1000 * i, s_seq=0x7FFFFFF0 + 77 * i, c_ts=(1000, 0xFFFFFFF0)[i],
                  s_ts=(90000, 0xFFFFFF00)[i]) for i in range(2)]
    out: list[bytes] = []
    for c in conns:
        out += c.handshake()
    for kind, which, dseq, dack, window, dts, n, zero_ecr, shape in steps:
        c = conns[which]
        jump = {-3: -(1 << 30), 3: 1 << 30}.get(dseq, dseq * 700)
        ajump = {-3: -(1 << 31), 3: (1 << 30) + 5}.get(dack, dack * 500)
        client = kind.startswith("c")
        ts = None
        if dts is not None:
            if client:
                c.c_ts = seq_add(c.c_ts, dts)
                ts = c.c_ts
            else:
                c.s_ts = seq_add(c.s_ts, dts)
                ts = c.s_ts
        ecr = (c.s_ts if client else c.c_ts) if ts is not None else None
        if ecr is not None and not zero_ecr:
            ecr = 0
        if kind == "c_ack":
            out.append(c.c2s(seq_add(c.c_seq, jump if abs(dseq) == 3 else 0), seq_add(c.s_seq, ajump), ACK,
                             window=window, tsval=ts, tsecr=ecr))
        elif kind == "s_ack":
            out.append(c.s2c(seq_add(c.s_seq, jump if abs(dseq) == 3 else 0), seq_add(c.c_seq, ajump), ACK,
                             window=window, tsval=ts, tsecr=ecr))
        elif kind == "c_data":
            # new data; a gap (2); half of it sent before (-1); a retransmission (-2)
            seq = seq_add(c.c_seq, {2: n, -1: -(n // 2), -2: -1400}.get(dseq, 0))
            data = stream_at(((seq - c.c_base) & 0xFFFFFFFF) + 4321, n)  # the same bytes when retransmitted
            out.append(c.c2s(seq, c.s_seq, ACK | PSH, data, window=window, tsval=ts, tsecr=ecr))
            if dseq in (-1, 0, 1):
                c.c_seq = seq_add(seq, n)
        elif kind in ("s_data", "s_bulk"):
            if kind == "s_bulk":  # a GSO super-packet's worth: chunk boundaries are crossed
                n = 20000 + n * 150
            seq = seq_add(c.s_seq, {2: n, -1: -(n // 2), -2: -1400}.get(dseq, 0))  # as the client's
            n += shape
            data = stream_at((seq - c.s_base) & 0xFFFFFFFF, n)  # the same bytes again when retransmitted
            out.append(c.s2c(seq, c.c_seq, ACK | PSH, data, window=window, tsval=ts, tsecr=ecr))
            if dseq in (-1, 0, 1):
                c.s_seq = seq_add(seq, n)
        elif kind == "c_odd":   # pure ACKs the cache must leave to Python
            out.append(c.c2s(c.c_seq, c.s_seq, ACK | URG, window=window, tsval=ts, tsecr=ecr))
        elif kind == "s_odd":
            out.append(c.s2c(c.s_seq, c.c_seq, PSH, window=window, tsval=ts, tsecr=ecr))  # no ACK
        elif kind == "c_fin":
            out.append(c.c2s(c.c_seq, c.s_seq, FIN | ACK, window=window, tsval=ts, tsecr=ecr))
        elif kind == "s_fin":
            out.append(c.s2c(c.s_seq, c.c_seq, FIN | ACK, window=window, tsval=ts, tsecr=ecr))
        else:
            out.append(c.c2s(c.c_seq, 0, RST, window=0))
    return out


def run_both(cfg: dict[str, Any], packets: list[bytes], cuts: list[int], kernel_rewrites: bool = True
             ) -> tuple[Dataplane, Dataplane, int]:
    """The engine alone against engine plus cache, batch by batch; how many packets the cache took."""
    ffi, lib = _lib()
    spec, fast = plane(cfg, kernel_rewrites, offload=False), plane(cfg, kernel_rewrites, offload=True)
    off = fast.offload
    assert off is not None
    taken = 0
    start = 0
    bounds = sorted({c % (len(packets) + 1) for c in cuts} | {len(packets)})
    for b_i, end in enumerate(bounds):
        batch = packets[start:end]
        start = end
        now = 10.0 + b_i
        want = [spec.handle(bytearray(p), now) for p in batch]
        got: list[Verdict | None] = [None] * len(batch)
        lib.fpc_begin(off.cache)
        left = []
        for i, p in enumerate(batch):
            if lib.fpc_packet(off.cache, p, len(p)) >= 0:
                got[i] = Verdict.ACCEPT
                taken += 1
            else:
                left.append(i)
        off.sync(now)
        for i in left:
            got[i] = fast.handle(bytearray(batch[i]), now)
        assert got == want, f"batch {b_i}: verdicts differ"
        assert same_records(spec, fast, now)
        assert spec.counters.as_dict() == fast.counters.as_dict(), f"batch {b_i}: counters differ"
        assert backend_bytes(spec) == backend_bytes(fast), f"batch {b_i}: backend byte counts differ"
    return spec, fast, taken


def backend_bytes(dp: Dataplane) -> dict[str, tuple[int, int]]:
    return {b.name: (b.bytes_from_client, b.bytes_from_server) for s in dp.services.values()
            for b in s.backends.values()}


def same_records(a: Dataplane, b: Dataplane, now: float) -> bool:
    da = {r.id: r.to_dict(now) for r in a.connections()}
    db = {r.id: r.to_dict(now) for r in b.connections()}
    assert da == db
    for r in a.connections():  # and the fields the document does not show
        o = b.table.by_id(r.id)
        assert o is not None
        for side in ("client", "server"):
            ha, hb = getattr(r, side), getattr(o, side)
            assert (ha.window_raw, ha.max_window, ha.out_of_window, ha.ts_first, ha.ts_last, ha.data_high) == \
                   (hb.window_raw, hb.max_window, hb.out_of_window, hb.ts_first, hb.ts_last, hb.data_high), side
        la, lb = r.log, o.log  # the client's log, byte for byte
        assert (la is None) == (lb is None)
        if la is not None and lb is not None:
            assert (bytes(la.data), la.base, la.overflow, la.ooo, la.fin_offset, la.fin_server_offset) == \
                   (bytes(lb.data), lb.base, lb.overflow, lb.ooo, lb.fin_offset, lb.fin_server_offset)
        assert (r.commit_offset, r.commit_fin) == (o.commit_offset, o.commit_fin)
        da_, db_ = r.digest, o.digest
        assert (da_ is None) == (db_ is None)
        if da_ is not None and db_ is not None:  # the stream digest, chunk by chunk, and its masker
            assert da_.snapshot() == db_.snapshot()
            assert (da_.mask.tail, da_.mask.left, da_.overflow, sorted(da_.ooo)) == \
                   (db_.mask.tail, db_.mask.left, db_.overflow, sorted(db_.ooo))
    return True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(STEP, min_size=1, max_size=80),
       cuts=st.one_of(st.none(), st.lists(st.integers(0, 200), max_size=80)), v6=st.booleans())
def test_the_cache_and_the_engine_agree_on_every_packet(steps: list[tuple[Any, ...]], cuts: list[int] | None,
                                                        v6: bool) -> None:
    packets = writer(steps, v6)
    # None: every packet a batch of its own (as on a quiet queue), the most the cache decides
    run_both(config(), packets, list(range(len(packets))) if cuts is None else cuts)


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(STEP, min_size=1, max_size=40), cuts=st.lists(st.integers(0, 200), max_size=8))
def test_they_agree_where_the_appliance_rewrites_client_packets(steps: list[tuple[Any, ...]], cuts: list[int]) -> None:
    # no kernel rule for the service yet: client packets are rewritten by Python, never the cache
    _, fast, _ = run_both(config(), writer(steps, False), cuts, kernel_rewrites=False)
    off = fast.offload
    assert off is not None
    assert all(off._lib.fpc_flow(off.cache, s).dirs & (FPC_CLIENT | FPC_SERVER) == FPC_SERVER
               for s in off.slots.values())


def download(packets: int, v6: bool = False, size: int = 1400, many: set[int] | None = None) -> list[bytes]:
    """A handshake, a request, then ``packets`` data segments of ``size`` bytes, each
    acknowledged; volatile values in varied places (``many``: those segments full of them)."""
    c = Conn(CLIENT6 if v6 else CLIENT, PRIMARY6 if v6 else PRIMARY, VIP6 if v6 else VIP, 40000, 1000, 5000)
    out = c.handshake()
    out.append(c.c2s(c.c_seq, c.s_seq, ACK | PSH, b"GET / HTTP/1.1\r\n\r\n", tsval=1002, tsecr=90000))
    c.c_seq = seq_add(c.c_seq, 18)
    for i in range(packets):
        shape = (0, 1, 2, 3, 5)[i % 5] if many is None else (4 if i in many else 0)
        out.append(c.s2c(c.s_seq, c.c_seq, ACK, body(size, shape, i), tsval=90001 + i, tsecr=1002 + i))
        c.s_seq = seq_add(c.s_seq, size)
        out.append(c.c2s(c.c_seq, c.s_seq, ACK, window=3000 + i, tsval=1003 + i, tsecr=90001 + i))
    return out


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("size", [1400, 65000], ids=["segments", "super-packets"])
def test_a_downloads_data_and_acknowledgments_take_the_fast_path(v6: bool, size: int) -> None:
    """After the handshake and the request (which the engine sees), every server data segment
    (tracked, masked, hashed across chunk boundaries) and every client ACK is decided by the
    cache; the records, digests included, still agree.  (A data segment and the ACK after it
    come on different queues, so in different batches: one packet a batch here.  In one batch
    the ACK would follow its connection's punted segment to Python.)"""
    pkts = download(50, v6, size)
    spec, fast, taken = run_both(config(), pkts, cuts=list(range(len(pkts))))
    assert taken == 101  # the handshake's ACK installed the flow: the request is logged in C too
    off = fast.offload
    assert off is not None
    s = off.stats()
    assert s["data_fast"] == 50 and s["logged"] == 1 and s["flows"] == 1 and s["installs"] == 1
    dg = spec.connections()[0].digest
    assert dg is not None and dg.end == 50 * size and len(dg.chunks) == 50 * size // 65536


def test_every_cut_through_a_volatile_value_is_masked_alike() -> None:
    """Segments one byte shorter than the stream's period (filler, a pattern, a value): their
    boundaries fall at every position of the pattern and of the value in turn."""
    period = b"f" * 37 + DATE + VALUE
    stream = period * 200
    c = Conn(CLIENT, PRIMARY, VIP, 40000, 1000, 5000)
    pkts = c.handshake()
    pkts.append(c.c2s(c.c_seq, c.s_seq, ACK | PSH, b"GET / HTTP/1.1\r\n\r\n", tsval=1002, tsecr=90000))
    c.c_seq = seq_add(c.c_seq, 18)
    size = len(period) - 1
    for i in range(len(period) + 2):
        pkts.append(c.s2c(c.s_seq, c.c_seq, ACK, stream[i * size:(i + 1) * size], tsval=90001 + i, tsecr=1002))
        c.s_seq = seq_add(c.s_seq, size)
    spec, fast, _ = run_both(config(), pkts, cuts=list(range(len(pkts))))
    off = fast.offload
    assert off is not None and off.stats()["data_fast"] == len(period) + 2


def test_a_segment_with_more_values_than_the_cache_masks_goes_to_python() -> None:
    pkts = download(6, size=65000, many={2, 3})  # some 750 values in each of those two
    _, fast, taken = run_both(config(), pkts, cuts=list(range(len(pkts))))
    off = fast.offload
    assert off is not None
    assert off.stats()["data_fast"] == 4 and off.stats()["not_in_order"] == 2 and taken == 11


def test_an_uploads_data_is_logged_by_the_cache() -> None:
    """An upload: the client's segments (new, half resent, wholly resent) are logged in C and
    appended to the log at the sync; the server's ACKs are folded there too.  The log, the commit
    point and the backend's byte count agree with the engine's."""
    c = Conn(CLIENT, PRIMARY, VIP, 40000, 1000, 5000)
    pkts = c.handshake()
    for i in range(40):
        n = 1000 + 37 * i
        back = {3: n // 2, 7: 1000}.get(i % 10, 0)   # some segments start before the log's end
        seq = seq_add(c.c_seq, -back)
        pkts.append(c.c2s(seq, c.s_seq, ACK | PSH, stream_at((seq - c.c_base) & 0xFFFFFFFF, n), tsval=1002 + i,
                          tsecr=90000))
        c.c_seq = max(c.c_seq, seq_add(seq, n))
        pkts.append(c.s2c(c.s_seq, c.c_seq, ACK, tsval=90001 + i, tsecr=1002 + i))
    spec, fast, taken = run_both(config(), pkts, cuts=list(range(len(pkts))))
    off = fast.offload
    assert off is not None and off.stats()["logged"] == 40 and taken == 80
    rec = fast.connections()[0]
    assert rec.log is not None and rec.commit_offset == rec.log.end == seq_add(c.c_seq, -c.c_base)


def test_out_of_order_data_goes_to_python_and_comes_back() -> None:
    """A gap in the server's stream: the segment past it is the engine's (held aside), and so is
    every one until the gap fills; then the cache takes the stream again.  Digests agree."""
    c = Conn(CLIENT, PRIMARY, VIP, 40000, 1000, 5000)
    pkts = c.handshake()
    segs = [c.s2c(seq_add(c.s_seq, 1000 * i), c.c_seq, ACK, body(1000, i % 6, i), tsval=90001 + i, tsecr=1002)
            for i in range(8)]
    order = [segs[0], segs[2], segs[3], segs[1], segs[4], segs[5], segs[6], segs[7]]
    spec, fast, taken = run_both(config(), pkts + order, cuts=list(range(len(pkts) + len(order))))
    off = fast.offload
    assert off is not None
    s = off.stats()
    assert s["not_in_order"] >= 1 and s["data_fast"] >= 3


def test_http_replay_connections_are_not_offloaded() -> None:
    """The HTTP framing reads every client acknowledgment: no flow for it."""
    pkts = download(20)
    _, fast, taken = run_both(config(replay="http"), pkts, cuts=[5, 17])
    assert taken == 0 and fast.offload is not None and fast.offload.stats()["flows"] == 0


def test_a_move_takes_the_flow_out_of_the_cache() -> None:
    """A mode set on the connection (here: a replay move to the backup) removes its flow, so the
    move's splice sees every packet again."""
    pkts = download(10)
    spec, fast, _ = run_both(config(), pkts, cuts=[])
    off = fast.offload
    assert off is not None and off.stats()["flows"] == 1
    rec = fast.connections()[0]
    fast.move(rec, fast.services["web"].backends["backup"], 30.0)
    assert off.stats()["flows"] == 0 and not off.slots
    ack = Conn(CLIENT, PRIMARY, VIP, 40000, 0, 0).c2s(rec.client.next_seq, rec.server.next_seq, ACK,
                                                     tsval=5000, tsecr=1)
    _, lib = _lib()
    lib.fpc_begin(off.cache)
    assert lib.fpc_packet(off.cache, ack, len(ack)) < 0


def test_a_changed_service_clears_the_cache() -> None:
    pkts = download(5)
    _, fast, _ = run_both(config(), pkts, cuts=[])
    off = fast.offload
    assert off is not None and off.stats()["flows"] == 1
    off.clear()
    assert off.stats()["flows"] == 0 and not off.slots


def test_expired_connections_leave_the_cache() -> None:
    pkts = download(5)
    _, fast, _ = run_both(config(), pkts, cuts=[])
    off = fast.offload
    assert off is not None and off.stats()["flows"] == 1
    fast.table.expire(1e9)
    assert off.stats()["flows"] == 0


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=0, max_size=200), seed=st.integers(0, 2**32))
def test_any_bytes_are_punted_or_decided_never_crash(data: bytes, seed: int) -> None:
    """Random bytes, and a real pure ACK with random bytes flipped: the cache punts or decides,
    and what it decides agrees with the engine (the differential runner checks)."""
    pkts = download(3)
    ack = bytearray(pkts[-1])
    rnd = random.Random(seed)
    for _ in range(rnd.randint(1, 4)):
        ack[rnd.randrange(len(ack))] = rnd.randrange(256)
    run_both(config(), pkts + [data, bytes(ack)], cuts=[len(pkts)])


def test_the_cache_counts_what_it_punts() -> None:
    pkts = download(3)
    _, fast, _ = run_both(config(), pkts + [b"\x45" + bytes(60)], cuts=[])
    off = fast.offload
    assert off is not None
    s = off.stats()
    assert s["punted"] == len(pkts) + 1 - s["fast"]
    assert s["no_flow"] + s["not_pure_ack"] + s["unusual"] + s["stale"] == s["punted"]


def test_flows_beyond_the_capacity_stay_in_python() -> None:
    """A full cache refuses the install (counted); that connection's packets all run in Python."""
    dp = plane(config(), True, offload=False)
    off = Offload(dp, 1)
    a, b = Conn(CLIENT, PRIMARY, VIP, 40000, 1000, 5000), Conn(CLIENT, PRIMARY, VIP, 40001, 3000, 7000)
    for p in a.handshake() + b.handshake():
        dp.handle(bytearray(p), 1.0)
    s = off.stats()
    assert s["flows"] == 1 and s["full"] >= 1
    _, lib = _lib()
    lib.fpc_begin(off.cache)
    ack_a = a.c2s(a.c_seq, a.s_seq, ACK, tsval=1002, tsecr=90000)
    ack_b = b.c2s(b.c_seq, b.s_seq, ACK, tsval=1002, tsecr=90000)
    assert lib.fpc_packet(off.cache, ack_a, len(ack_a)) >= 0
    assert lib.fpc_packet(off.cache, ack_b, len(ack_b)) < 0
