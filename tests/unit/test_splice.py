"""checkpoint.splice: moving a tracked connection to a backup by replay, end to end.

No sockets: a conversation between a client and the old primary is folded
into a ConnectionRecord by the tracker (with the client's bytes in a ByteLog
and the server's hashed into a StreamDigest, as the data plane keeps them);
then a Splice moves it to ``Backup``, a small deterministic TCP sender of the
same response, and ``Net`` carries the segments between the three of them
the way the data plane would (tracker first, then the splice; rewrites
applied; injected segments routed by ``Out.to``).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

import pytest

from checkpoint.ici import ConnectionRecord
from checkpoint.resurrect import estimate_tsval
from checkpoint.segment import ACK, FIN, PSH, RST, SYN, Segment, TcpOptions
from checkpoint.seqnum import MASK, seq_add, seq_diff
from checkpoint.splice import (
    DEFAULT_MSS, INITIAL_RTO, Decision, Endpoint, Out, Phase, Rewrite, Splice, SpliceOptions, reset_seqs,
)
from checkpoint.streamlog import CHUNK, ByteLog, SampledDigest, StreamDigest
from checkpoint.tracker import observe
from nfq.build import tcp_options, tcp_packet

from ._helpers import CLIENT_IP, CLIENT_PORT, VIP, VPORT, cseg, handshake_segments, make_record, sseg

PRIMARY = Endpoint("primary", "10.0.0.2", 8080)
BACKUP = Endpoint("backup", "10.0.0.3", 8080)
T0 = 1000.0
MOVE_AT = T0 + 2.0
MSS = 1448            # payload of a full segment: MSS option 1460 less 12 bytes of timestamps
C_WSCALE, S_WSCALE, B_WSCALE = 7, 9, 7
C_WIN = 502           # client window field (<< 7: 64256 bytes)
REQUEST_LEN = 3000
RESPONSE_LEN = 300_000
SENT = 180 * MSS      # 260640: what the old primary sent before it died (the snapshot)
ACKED = 104 * MSS     # 150592: what the client acknowledged
DATE1 = b"Sun, 06 Nov 1994 08:49:37 GMT"
DATE2 = b"Fri, 21 Nov 2025 05:44:00 GMT"


def make_response(date: bytes, n: int = RESPONSE_LEN, seed: int = 42) -> bytes:
    def head(body_len: int) -> bytes:
        return (b"HTTP/1.1 200 OK\r\nServer: nginx/1.24.0\r\nDate: " + date +
                b"\r\nContent-Type: application/octet-stream\r\nContent-Length: " +
                str(body_len).encode() + b"\r\nConnection: keep-alive\r\n\r\n")
    body_len = n - len(head(n))
    body = random.Random(seed).randbytes(body_len)
    out = head(body_len) + body
    assert len(out) == n
    return out


RESPONSE = make_response(DATE1)      # what the old primary sent
REGEN = make_response(DATE2)         # what the backup regenerates: only the Date differs
REQUEST = (b"POST /upload HTTP/1.1\r\nHost: www.example.com\r\nContent-Length: 2930\r\n\r\n")
REQUEST = REQUEST + random.Random(7).randbytes(REQUEST_LEN - len(REQUEST))


# ----- the conversation with the old primary -----------------------------------------

@dataclass
class Conv:
    rec: ConnectionRecord
    log: ByteLog
    digest: StreamDigest
    cisn: int
    sisn: int
    c_ts0: int
    s_ts0: int
    sent: int
    acked: int

    @property
    def c_base(self) -> int:
        return seq_add(self.cisn, 1)

    @property
    def s_base(self) -> int:
        return seq_add(self.sisn, 1)

    def c_ts(self, t: float) -> int:
        """The client's timestamp clock (1000 Hz)."""
        return (self.c_ts0 + int((t - T0) * 1000)) & MASK

    def s_ts(self, t: float) -> int:
        """The old primary's timestamp clock (1000 Hz)."""
        return (self.s_ts0 + int((t - T0) * 1000)) & MASK


def log_client(rec: ConnectionRecord, seg) -> None:
    """What the data plane does with every client segment (Dataplane._log_client)."""
    log = rec.log
    start = seq_add(seg.seq, 1) if seg.flags & SYN else seg.seq
    off = seq_diff(start, seq_add(rec.client.isn, 1))
    if seg.payload_len and off >= 0:
        log.add(off, seg.payload)
    if seg.flags & FIN and log.fin_offset is None and off >= 0:
        log.fin_offset = off + seg.payload_len


def converse(cisn: int = 1_000_000, sisn: int = 3_000_000_000, *, c_ts0: int = 400_000, s_ts0: int = 9_000_000,
             sent: int = SENT, acked: int = ACKED, response: bytes = RESPONSE, request: bytes = REQUEST,
             digest=None, ts: bool = True) -> Conv:
    """Client <-> primary: handshake (TS, wscale, SACK), a request, ``sent`` bytes of the
    response (in 1448-byte segments over 0.6 s), the client acknowledging up to ``acked``."""
    rec = make_record(now=T0)
    rec.backend, rec.backend_ip, rec.backend_port = PRIMARY.name, PRIMARY.ip, PRIMARY.port
    log = ByteLog(1 << 20)
    dg = digest if digest is not None else StreamDigest(("http-date",))
    rec.log, rec.digest = log, dg
    conv = Conv(rec, log, dg, cisn, sisn, c_ts0, s_ts0, sent, acked)
    hs = handshake_segments(cisn, sisn, c_mss=1460, s_mss=1460, c_wscale=C_WSCALE, s_wscale=S_WSCALE, sack=True,
                            c_ts=c_ts0 if ts else None, s_ts=s_ts0 if ts else None, c_win=64240, s_win=65160,
                            ack_win=C_WIN)
    for i, (seg, from_client) in enumerate(hs):
        observe(rec, seg, from_client, T0 + i * 0.0005)
        log_client(rec, seg) if from_client else None

    def copts(t):
        return {"tsval": conv.c_ts(t), "tsecr": rec.client.ts_recent} if ts else {}

    def sopts(t):
        return {"tsval": conv.s_ts(t), "tsecr": rec.client.tsval} if ts else {}

    t = T0 + 0.002
    for off in range(0, len(request), MSS):
        seg = cseg(conv.c_base + off, conv.s_base, ACK | PSH, request[off:off + MSS], window=C_WIN, **copts(t))
        observe(rec, seg, True, t)
        log_client(rec, seg)
    t = T0 + 0.01
    observe(rec, sseg(conv.s_base, conv.c_base + len(request), ACK, window=128, **sopts(t)), False, t)
    offs = list(range(0, sent, MSS))
    for i, off in enumerate(offs):
        t = T0 + 0.02 + i * 0.6 / len(offs)
        payload = response[off:off + MSS][:sent - off]
        seg = sseg(conv.s_base + off, conv.c_base + len(request), ACK | PSH, payload, window=128, **sopts(t))
        observe(rec, seg, False, t)
        if isinstance(dg, SampledDigest):
            dg.add(off, payload, len(payload))
        else:
            dg.add(off, payload)
        end = off + len(payload)
        if end <= acked and (i % 2 or end == acked):
            t += 0.0001
            observe(rec, cseg(conv.c_base + len(request), conv.s_base + end, ACK, window=C_WIN, **copts(t)), True, t)
    assert rec.established and rec.protected
    assert seq_diff(rec.client.ack, conv.s_base) == acked
    assert dg.end == sent
    return conv


def new_splice(conv: Conv, now: float = MOVE_AT, ts_floor: int | None = None, **opts) -> Splice:
    return Splice(conv.rec, conv.log, conv.digest.snapshot(), vip=VIP, vport=VPORT, old=PRIMARY, target=BACKUP,
                  now=now, options=SpliceOptions(**opts), ts_floor=ts_floor)


# ----- the backup ------------------------------------------------------------------------

def _mss_of(p) -> int | None:
    return p.mss if isinstance(p, Out) else p.options.mss


def _wscale_of(p) -> int | None:
    return p.wscale if isinstance(p, Out) else p.options.wscale


class Backup:
    """The backup server as a plain TCP endpoint: answers the SYN, reads the
    request, then sends ``response`` (and a FIN) within the window it is given,
    go-back-N from its oldest unacknowledged byte on ``timeout()``."""

    def __init__(self, response: bytes = REGEN, *, isn: int = 0x6000_0000, ts0: int = 77, ts_rate: float = 1000.0,
                 mss_option: int = 1460, wscale: int = B_WSCALE, window: int = 1024, request_len: int = REQUEST_LEN,
                 fin: bool = True, ts: bool = True, strict_window: bool = False) -> None:
        self.response = response
        self.isn, self.base = isn, seq_add(isn, 1)
        self.ts0, self.ts_rate, self.ts = ts0, ts_rate, ts
        self.mss_option, self.wscale, self.window = mss_option, wscale, window
        self.strict_window = strict_window
        self.request_len = request_len
        self.fin = fin
        self.c_base: int | None = None
        self.peer_mss = DEFAULT_MSS
        self.peer_wscale = 0
        self.peer_wnd = 0
        self.received = bytearray()   # the client stream, in order
        self.client_fin = False
        self.snd_una = 0              # stream offsets (FIN counts one)
        self.snd_nxt = 0
        self.echo = 0                 # latest TSval from the "client" (for TSecr)
        self.reset = False
        self.got: list = []           # everything it was sent
        self.acks_seen: list[int] = []

    @property
    def total(self) -> int:
        return len(self.response) + (1 if self.fin else 0)

    @property
    def send_mss(self) -> int:
        return self.peer_mss - (12 if self.ts else 0)

    def tsval(self, now: float) -> int:
        return (self.ts0 + int(now * self.ts_rate)) & MASK

    def rcv_nxt(self) -> int:
        return seq_add(self.c_base, len(self.received) + (1 if self.client_fin else 0))

    def opts(self, now: float, **kw) -> TcpOptions:
        if self.ts:
            kw.update(tsval=self.tsval(now), tsecr=self.echo)
        return TcpOptions(**kw)

    def segment(self, off: int, n: int, now: float) -> Segment:
        """Response bytes [off, off + n) (a FIN with the last of them)."""
        flags = ACK | PSH
        if self.fin and off + n == len(self.response):
            flags |= FIN
        return Segment(BACKUP.ip, CLIENT_IP, BACKUP.port, CLIENT_PORT, seq_add(self.base, off), self.rcv_nxt(),
                       flags, self.window, self.response[off:off + n], self.opts(now))

    def on(self, p, now: float) -> list[Segment]:
        self.got.append(p)
        if p.flags & RST:
            self.reset = True
            return []
        if self.reset:
            return []
        if p.tsval is not None:
            self.echo = p.tsval
        if p.flags & SYN:
            self.c_base = seq_add(p.seq, 1)
            self.peer_mss = _mss_of(p) or DEFAULT_MSS
            self.peer_wscale = _wscale_of(p) or 0
            return [Segment(BACKUP.ip, CLIENT_IP, BACKUP.port, CLIENT_PORT, self.isn, self.c_base, SYN | ACK, 65160,
                            b"", self.opts(now, mss=self.mss_option, wscale=self.wscale, sack_permitted=True))]
        out: list[Segment] = []
        if p.flags & ACK:
            a = seq_diff(p.ack, self.base)
            self.acks_seen.append(a)
            assert a <= self.snd_nxt, "acknowledgment of bytes the backup never sent"
            if a > self.snd_una:
                self.snd_una = a
            self.peer_wnd = p.window << self.peer_wscale
        off = seq_diff(p.seq, self.c_base)
        n = len(p.payload)
        if n and off <= len(self.received) < off + n:
            self.received += p.payload[len(self.received) - off:]
        if p.flags & FIN and off + n == len(self.received):
            self.client_fin = True
        if n or p.flags & FIN:
            out.append(Segment(BACKUP.ip, CLIENT_IP, BACKUP.port, CLIENT_PORT, seq_add(self.base, self.snd_nxt),
                               self.rcv_nxt(), ACK, self.window, b"", self.opts(now)))
        return out + self.send(now)

    def send(self, now: float) -> list[Segment]:
        out = []
        if len(self.received) < self.request_len:
            return out
        # strict: as Linux, never past the peer's window, filling it with a shorter segment
        limit = self.snd_una + (self.peer_wnd if self.strict_window else max(self.peer_wnd, self.send_mss))
        while self.snd_nxt < len(self.response) and self.snd_nxt < limit:
            n = min(self.send_mss, len(self.response) - self.snd_nxt)
            if self.snd_nxt + n > limit:
                if not self.strict_window:
                    break  # no sub-MSS segments for want of window (Nagle)
                n = limit - self.snd_nxt
            out.append(self.segment(self.snd_nxt, n, now))
            self.snd_nxt += n
            if self.fin and self.snd_nxt == len(self.response):
                self.snd_nxt += 1
        return out

    def timeout(self, now: float) -> list[Segment]:
        if self.snd_una >= self.snd_nxt or self.reset:
            return []
        self.snd_nxt = self.snd_una
        return self.send(now)


# ----- the client --------------------------------------------------------------------------

class Client:
    """The client after the move: receives (in its own view) and acknowledges."""

    def __init__(self, conv: Conv, has: int) -> None:
        self.conv = conv
        self.stream = ByteLog(1 << 22)           # the server stream as the client holds it
        self.stream.add(0, RESPONSE[:has])
        self.rx: list = []                       # every segment delivered (Out or Segment)
        self.ts_seen = conv.rec.server.tsval     # the highest server TSval it has seen
        self.seq = seq_add(conv.c_base, REQUEST_LEN)
        self.auto_ack = True
        self.fin_at: int | None = None             # offset of the server's FIN, once received

    def receive(self, p, now: float) -> list[Segment]:
        conv = self.conv
        self.rx.append(p)
        if p.flags & RST:
            return []
        assert (p.src, p.sport, p.dst, p.dport) == (VIP, VPORT, CLIENT_IP, CLIENT_PORT)
        off = seq_diff(p.seq, conv.s_base)
        n = len(p.payload)
        assert 0 <= off and off + n <= RESPONSE_LEN + (0 if n else 1)
        # every byte the client gets is the regenerated response, at the right place
        assert p.payload == REGEN[off:off + n]
        if conv.rec.ts_ok:
            assert p.tsval is not None and seq_diff(p.tsval, self.ts_seen) >= 0, "server clock went back (I3)"
            self.ts_seen = p.tsval
        if n:
            self.stream.add(off, p.payload)
        if p.flags & FIN:
            self.fin_at = off + n
        if not self.auto_ack or not (n or p.flags & FIN):
            return []
        return [self.ack(now)]

    def rcv_nxt(self) -> int:
        return self.stream.end + (1 if self.fin_at == self.stream.end else 0)

    def ack(self, now: float, ack_off: int | None = None, flags: int = ACK, **kw) -> Segment:
        conv = self.conv
        a = self.rcv_nxt() if ack_off is None else ack_off
        opts = {"tsval": conv.c_ts(now), "tsecr": self.ts_seen} if conv.rec.ts_ok else {}
        opts.update(kw)
        return cseg(self.seq, conv.s_base + a, flags, window=C_WIN, **opts)


# ----- the network ----------------------------------------------------------------------------

def rewritten(seg: Segment, rw: Rewrite | None) -> Segment:
    """``seg`` with a Rewrite applied (as nfq applies it to the queued packet)."""
    if rw is None:
        return seg
    o = seg.options
    ts = (rw.tsval if rw.tsval is not None else o.tsval, rw.tsecr if rw.tsecr is not None else o.tsecr)
    if o.tsval is None:
        ts = (None, None)
    sack = () if rw.strip_sack else (rw.sack if rw.sack is not None else o.sack_blocks)
    return Segment(
        rw.src if rw.src is not None else seg.src, rw.dst if rw.dst is not None else seg.dst,
        rw.sport if rw.sport is not None else seg.sport, rw.dport if rw.dport is not None else seg.dport,
        rw.seq if rw.seq is not None else seg.seq, rw.ack if rw.ack is not None else seg.ack, seg.flags,
        rw.window if rw.window is not None else seg.window, seg.payload,
        TcpOptions(o.mss, o.wscale, o.sack_permitted, ts[0], ts[1], sack))


def out_packet_len(o: Out) -> int:
    opts = tcp_options(mss=o.mss, wscale=o.wscale, sack_permitted=o.sack_permitted, tsval=o.tsval, tsecr=o.tsecr,
                       syn=bool(o.flags & SYN))
    return len(tcp_packet(o.src, o.dst, o.sport, o.dport, o.seq, o.ack, o.flags, o.window, opts, o.payload))


class Net:
    """The three parties and the gateway's splice, one packet at a time (FIFO)."""

    STEP = 0.0002

    def __init__(self, conv: Conv, backup: Backup | None = None, *, client_has: int | None = None,
                 now: float = MOVE_AT, **opts) -> None:
        self.conv = conv
        self.rec = conv.rec
        self.backup = backup or Backup()
        self.client = Client(conv, conv.acked if client_has is None else client_has)
        self.now = now
        self.sp = new_splice(conv, now, **opts)
        self.q: deque = deque()
        self.to_old: list[Out] = []
        self.drop_from_backup = lambda seg: False    # loss between the backup and the gateway
        self.drop_to_backup = lambda p: False        # loss between the gateway and the backup
        self.drop_to_client = lambda p: False
        self.forwarded: list[tuple[Segment, Segment]] = []   # backup segment, as the client got it
        self.backend_decisions: list[tuple[Segment, Decision]] = []
        self.contiguous_before: list[int] = []   # the gateway's in-order end when each arrived
        self.client_decisions: list[tuple[Segment, Decision]] = []
        self.route(self.sp.start(now))

    def route(self, outs: list[Out]) -> None:
        for o in outs:
            if o.to == "backend":
                self.q.append(("backup", o))
            elif o.to == "client":
                self.q.append(("client", o))
            else:
                assert o.to == "old"
                self.to_old.append(o)

    def from_backup(self, seg: Segment) -> Decision:
        self.contiguous_before.append(self.sp.verifier.end)
        d = self.sp.on_backend(seg, seg.payload, self.now)
        self.backend_decisions.append((seg, d))
        self.route(d.inject)
        if d.forward:
            fw = rewritten(seg, d.rewrite)
            observe(self.rec, fw, False, self.now)  # the data plane tracks it in the client's view
            self.forwarded.append((seg, fw))
            self.q.append(("client", fw))
        return d

    def from_client(self, seg: Segment) -> Decision:
        observe(self.rec, seg, True, self.now)
        log_client(self.rec, seg)
        d = self.sp.on_client(seg, self.now)
        self.client_decisions.append((seg, d))
        self.route(d.inject)
        if d.forward:
            self.q.append(("backup", rewritten(seg, d.rewrite)))
        return d

    def step(self) -> None:
        where, p = self.q.popleft()
        self.now += self.STEP
        if where == "backup":
            if not self.drop_to_backup(p):
                for seg in self.backup.on(p, self.now):
                    if not self.drop_from_backup(seg):
                        self.q.append(("gateway-b", seg))
        elif where == "client":
            if not self.drop_to_client(p):
                for seg in self.client.receive(p, self.now):
                    self.q.append(("gateway-c", seg))
        elif where == "gateway-b":
            self.from_backup(p)
        else:
            self.from_client(p)

    def run(self, until=None, max_time: float = 30.0, idle: float = 0.05) -> None:
        """Deliver packets; when nothing is in flight let time pass (timers of the
        splice and the backup) until ``until()`` holds or the splice is over."""
        start = self.now
        while True:
            if until is not None and until():
                return
            if self.q:
                self.step()
                continue
            if not self.sp.active or (until is None and self.done()):
                return
            assert self.now - start < max_time, f"stuck: {self.sp.describe()}"
            self.now += idle
            self.route(self.sp.poll(self.now))
            for seg in self.backup.timeout(self.now):
                if not self.drop_from_backup(seg):
                    self.q.append(("gateway-b", seg))

    def done(self) -> bool:
        return self.client.stream.end >= RESPONSE_LEN and self.backup.snd_una >= self.backup.total

    def client_outs(self) -> list[Out]:
        return [p for _, p in self.q if isinstance(p, Out) and p.to == "client"]


# ----- start() ------------------------------------------------------------------------------

@pytest.mark.parametrize("cisn,sisn", [(1_000_000, 3_000_000_000), (MASK - 1000, MASK - 100_000), (MASK, 5)])
def test_start_syn_and_fence(cisn, sisn):
    conv = converse(cisn, sisn)
    rec = conv.rec
    sp = new_splice(conv)
    assert sp.phase is Phase.CONNECTING and sp.active
    assert sp.client_acked == ACKED
    outs = sp.start(MOVE_AT)
    assert len(outs) == 2
    syn, rst = outs
    assert syn.to == "backend" and syn.flags == SYN
    assert (syn.src, syn.sport, syn.dst, syn.dport) == (CLIENT_IP, CLIENT_PORT, BACKUP.ip, BACKUP.port)
    assert syn.seq == cisn and syn.ack == 0
    assert (syn.mss, syn.wscale, syn.sack_permitted) == (1460, C_WSCALE, True)
    assert syn.tsval == rec.client.tsval and syn.tsecr == 0  # the client's latest TSval
    assert seq_diff(syn.tsval, conv.c_ts0) > 300  # (its last ACK, 0.36 s into the connection)
    assert syn.window <= 0xFFFF
    assert out_packet_len(syn) <= 1500
    # fencing: a RST to the old primary at exactly its rcv_nxt
    assert rst.to == "old" and rst.flags == RST
    assert (rst.src, rst.sport, rst.dst, rst.dport) == (CLIENT_IP, CLIENT_PORT, PRIMARY.ip, PRIMARY.port)
    assert rst.seq == rec.server.ack == seq_add(cisn, 1 + REQUEST_LEN)


def test_start_without_options():
    conv = converse(ts=False)
    rec = conv.rec
    rec.client.wscale = None  # no window scaling negotiated
    rec.client.sack_permitted = False
    syn, _ = new_splice(conv).start(MOVE_AT)
    assert syn.tsval is None and syn.tsecr is None and syn.wscale is None and not syn.sack_permitted
    assert syn.mss == 1460


# ----- handshake and replay ---------------------------------------------------------------------

@pytest.mark.parametrize("cisn,sisn,bisn", [
    (1_000_000, 3_000_000_000, 0x6000_0000),
    (MASK - 1000, MASK - 100_000, MASK - 10),   # the request, the response and the backup's stream wrap
])
def test_synack_absorbed_and_request_replayed(cisn, sisn, bisn):
    conv = converse(cisn, sisn)
    net = Net(conv, Backup(isn=bisn))
    sp = net.sp
    _, syn = net.q.popleft()
    synack = net.backup.on(syn, net.now)[0]
    d = sp.on_backend(synack, b"", net.now)
    assert not d.forward and d.rewrite is None
    assert sp.phase is Phase.REPLAYING
    assert sp.tr.seq_delta == (sisn - bisn) & MASK
    assert sp.tr.seq_to_client(synack.seq) == sisn
    assert sp.b_mss == MSS
    hs, *data = d.inject
    # the handshake ACK
    assert hs.to == "backend" and hs.flags == ACK and not hs.payload
    assert hs.seq == conv.c_base and hs.ack == seq_add(bisn, 1)
    assert hs.tsval == conv.rec.client.tsval and hs.tsecr == synack.tsval
    # the replayed request: the logged bytes, exactly, in backup-MSS segments
    assert [len(o.payload) for o in data] == [MSS, MSS, REQUEST_LEN - 2 * MSS]
    assert b"".join(o.payload for o in data) == conv.log.read(0, conv.log.end) == REQUEST
    for o in data:
        assert o.to == "backend" and o.flags & ACK
        assert (o.src, o.sport, o.dst, o.dport) == (CLIENT_IP, CLIENT_PORT, BACKUP.ip, BACKUP.port)
        assert o.seq == seq_add(conv.c_base, REQUEST.index(o.payload))
        assert o.ack == seq_add(bisn, 1)
        assert out_packet_len(o) <= 1500, "replayed segment larger than the MTU"
    assert sp.stats["replayed_bytes"] == REQUEST_LEN
    # the backup acknowledges the request: the replay is over
    for o in data:
        for seg in net.backup.on(o, net.now):
            if not seg.payload:
                sp.on_backend(seg, b"", net.now)
    assert sp.replay_acked == REQUEST_LEN
    assert sp.phase is Phase.SPLICED


def test_replay_without_timestamps_uses_the_full_mss():
    conv = converse(ts=False)
    net = Net(conv, Backup(ts=False))
    _, syn = net.q.popleft()
    d = net.sp.on_backend(net.backup.on(syn, net.now)[0], b"", net.now)
    assert [len(o.payload) for o in d.inject[1:]] == [1460, 1460, REQUEST_LEN - 2 * 1460]
    assert all(o.tsval is None for o in d.inject)


def test_replay_retransmitted_go_back_n():
    conv = converse()
    net = Net(conv)
    sp = net.sp
    _, syn = net.q.popleft()
    d = sp.on_backend(net.backup.on(syn, net.now)[0], b"", net.now)
    assert len(d.inject) == 4  # everything lost
    assert sp.poll(net.now + INITIAL_RTO / 2) == []
    again = sp.poll(net.now + INITIAL_RTO)
    assert [o.payload for o in again] == [REQUEST[:MSS], REQUEST[MSS:2 * MSS], REQUEST[2 * MSS:]]
    assert sp.stats["replay_retransmits"] == 1
    # backed off: not again after one more initial RTO
    assert sp.poll(net.now + 2 * INITIAL_RTO) == []
    assert len(sp.poll(net.now + 3 * INITIAL_RTO + 0.001)) == 3


def test_syn_retransmitted_with_backoff_then_fails():
    conv = converse()
    rec = conv.rec
    sp = new_splice(conv, syn_retries=3)
    t = MOVE_AT
    first = sp.start(t)[0]
    assert sp.poll(t + 0.1) == []
    # retransmitted after 0.2 s, then 0.4 and 0.8 s later (exponential back-off)
    for due in (0.2, 0.6, 1.4):
        assert sp.poll(t + due - 0.005) == []
        outs = sp.poll(t + due + 0.001)
        assert len(outs) == 1
        syn = outs[0]
        assert syn.flags == SYN and syn.to == "backend"
        assert (syn.seq, syn.mss, syn.wscale, syn.sack_permitted) == (first.seq, first.mss, first.wscale, True)
        t += 0.001
    assert sp.tries == 4
    # after syn_retries retransmissions, one more RTO (1.6 s): the move fails
    assert sp.poll(t + 3.0 - 0.005) == [] and sp.active
    now = t + 3.0 + 0.001
    outs = sp.poll(now)
    assert sp.phase is Phase.FAILED and "did not answer 4 SYNs" in sp.reason
    assert outs and all(o.flags & RST for o in outs)
    # no backup connection to reset: the client's RSTs only (RFC 5961: at its last ACK, and at the
    # highest sequence it may have received when that is further)
    assert {o.to for o in outs} == {"client"} and [o.seq for o in outs] == reset_seqs(sp.rec)
    rst = outs[0]
    assert rst.to == "client" and rst.flags == RST | ACK
    assert (rst.src, rst.sport, rst.dst, rst.dport) == (VIP, VPORT, CLIENT_IP, CLIENT_PORT)
    assert rst.seq == rec.client.ack  # the client's rcv_nxt: accepted
    assert rst.ack == rec.client.next_seq
    assert sp.poll(now + 10) == [] and sp.on_client(cseg(0), now) == Decision(False)


def test_move_timeout():
    conv = converse()
    sp = new_splice(conv, syn_retries=100, move_timeout=2.0)
    sp.start(MOVE_AT)
    now = MOVE_AT
    while sp.active:
        now += 0.05
        sp.poll(now)
    assert sp.phase is Phase.FAILED and sp.reason.startswith("move not done after 2.0 s (CONNECTING)")
    assert now - MOVE_AT == pytest.approx(2.05)


# ----- end to end ------------------------------------------------------------------------------

@pytest.mark.parametrize("cisn,sisn,bisn,bts0", [
    (1_000_000, 3_000_000_000, 0x6000_0000, 77),
    (MASK - 1000, MASK - 100_000, MASK - 150_000, MASK - 500),     # everything wraps, the backup clock too
    (MASK - 1000, MASK - 200_000, 12345, (9_000_000 - 5_000_000) & MASK),
])
def test_move_end_to_end(cisn, sisn, bisn, bts0):
    conv = converse(cisn, sisn)
    rec = conv.rec
    ts_before = rec.server.tsval
    net = Net(conv, Backup(isn=bisn, ts0=bts0))
    sp = net.sp
    net.run()
    assert net.done() and sp.phase is Phase.SPLICED and sp.verifier.done
    # the client has the whole response: the original up to what it had, then the backup's
    assert bytes(net.client.stream.data) == RESPONSE[:ACKED] + REGEN[ACKED:]
    # what the client acknowledged was suppressed and acknowledged by the gateway
    assert sp.stats["suppressed_bytes"] >= ACKED
    assert all(seq_diff(f.seq, conv.s_base) + len(f.payload) > ACKED for _, f in net.forwarded)
    assert ACKED in net.backup.acks_seen
    assert net.backup.snd_una == net.backup.total  # everything, FIN included, acknowledged
    # [ACKED, SENT): delivered by the gateway itself once verified; the rest forwarded
    delivered = [p for p in net.client.rx if isinstance(p, Out)]
    assert delivered and all(ACKED <= seq_diff(p.seq, conv.s_base) < SENT for p in delivered)
    assert {seq_diff(p.seq, conv.s_base) for p in delivered} >= set(range(ACKED, SENT - MSS, MSS))
    assert not sp.pending and not sp.retained
    for seg, fw in net.forwarded:
        assert fw.seq == sp.tr.seq_to_client(seg.seq) == seq_add(seg.seq, (sisn - bisn) & MASK)
        assert (fw.src, fw.sport) == (VIP, VPORT)
        assert fw.window == (seg.window << B_WSCALE) >> S_WSCALE
        assert seq_diff(fw.tsval, ts_before) > 0
        assert fw.tsecr == seg.tsecr
    # the first server TSval after the move is the last one before it + the time since (>= 1000 Hz)
    first = next(p for p in net.client.rx if p.payload)
    gap = seq_diff(first.tsval, ts_before)
    assert gap >= (net.sp.timings["synack_ms"] / 1000 + MOVE_AT - rec.server.ts_last[0]) * 1000
    assert gap >= 1380  # the primary's last TSval is 1.38 s older
    assert sp.timings.keys() >= {"synack_ms", "replayed_ms", "first_forward_ms"}
    d = sp.describe()
    assert d["phase"] == "SPLICED" and d["client_acked"] == RESPONSE_LEN + 1 and d["verified"] == RESPONSE_LEN + 0
    assert d["to_verify"] == SENT and d["replayed"] == REQUEST_LEN
    # the backup FIN reached the client
    assert net.client.rx[-1].flags & FIN or any(p.flags & FIN for p in net.client.rx)


def test_backup_segments_below_client_acked_are_suppressed_and_acknowledged():
    conv = converse()
    net = Net(conv)
    sp = net.sp
    net.run(until=lambda: sp.verifier.end >= 50 * MSS)
    assert not net.forwarded and not net.client.rx and not net.client_outs()
    assert sp.stats["suppressed"] >= 49
    assert sp.acked_to_b == sp.verifier.end
    gw_acks = [p for p in net.backup.got + [p for _, p in net.q]
               if isinstance(p, Out) and not p.payload and p.flags == ACK]
    assert max(seq_diff(p.ack, net.backup.base) for p in gw_acks) >= 49 * MSS
    # the ACKs the gateway sends on the client's behalf look like the client's
    for p in gw_acks:
        assert (p.src, p.sport, p.dst, p.dport) == (CLIENT_IP, CLIENT_PORT, BACKUP.ip, BACKUP.port)
        assert p.tsval == conv.rec.client.tsval and p.window == C_WIN


def test_timestamps_never_go_back_with_a_slow_backup_clock():
    """The backup's clock is far behind (and wraps), then steps back a little:
    the client must never see the server clock go backwards (I3)."""
    conv = converse()
    rec = conv.rec
    last = rec.server.tsval
    # the move is done after everything the client may miss was verified
    net = Net(conv, Backup(ts0=(MASK - 3000), ts_rate=10.0))
    sp = net.sp
    net.run(until=lambda: sp.verifier.done and any(p.payload for p in net.client.rx) and not net.q)
    seen = [p.tsval for p in net.client.rx if p.tsval is not None]
    assert seen and all(seq_diff(b, a) >= 0 for a, b in zip([last] + seen, seen))
    assert seq_diff(seen[0], last) >= 1380  # 1.38 s since the primary's last segment, at >= 1000 Hz
    # a backup segment whose TSval steps back: raised to the highest shown
    top = sp.ts_high
    b = net.backup
    seg = b.segment(b.snd_nxt, 100, net.now)
    seg.options.tsval = (seg.options.tsval - 50) & MASK
    b.snd_nxt += 100
    d = net.from_backup(seg)
    assert d.forward and d.rewrite.tsval == top
    assert sp.stats["ts_raised"] >= 1
    # and a later one that is ahead again is translated, not raised
    seg = b.segment(b.snd_nxt, 100, net.now + 1.0)
    b.snd_nxt += 100
    d = net.from_backup(seg)
    assert d.forward and seq_diff(d.rewrite.tsval, top) > 0
    assert d.rewrite.tsval == sp.tr.tsval_to_client(seg.tsval)


@pytest.mark.parametrize("s_ts0", [9_000_000, MASK - 5000])  # the second: the estimate wraps past 0
def test_splice_started_late_starts_the_clock_at_the_estimate(s_ts0):
    """tcpcp 6.1 with a checkpoint behind the wire: a splice started 10 s after the
    server's last TSval was seen takes estimate_tsval as its floor, so every TSval the
    client sees is at least the last one plus 10 s of ticks at the observed rate with
    its margin -- not just 1000 Hz (what the default gives) -- and the clock then runs
    on from there instead of sticking at the floor."""
    conv = converse(s_ts0=s_ts0)
    rec = conv.rec
    last, seen_at = rec.server.tsval, rec.server.ts_last[0]
    assert 990 < rec.server.tick_rate < 1010  # the primary's clock is 1000 Hz
    start = seen_at + 10.0
    floor = estimate_tsval(rec.server, rec.last_seen, start)
    assert seq_diff(floor, last) >= 10.0 * rec.server.tick_rate * 1.25 > 12_000
    net = Net(conv, now=start, ts_floor=floor, move_timeout=30.0)
    sp = net.sp
    assert sp.ts_high == floor
    net.run(until=lambda: sp.verifier.done and sum(1 for p in net.client.rx if p.payload) > 20 and not net.q)
    shown = [p.tsval for p in net.client.rx if p.tsval is not None]
    assert shown and all(seq_diff(t, floor) >= 0 for t in shown)
    assert all(seq_diff(b, a) >= 0 for a, b in zip(shown, shown[1:]))  # never back (I3)
    assert len(set(shown)) > 1 and sp.stats.get("ts_raised", 0) == 0  # running, not pinned at the floor
    # without the floor, the same move shows less (1000 Hz since the last TSval): the floor matters
    plain = Net(converse(s_ts0=s_ts0), now=start, move_timeout=30.0)
    plain.run(until=lambda: plain.sp.verifier.done and any(p.payload for p in plain.client.rx) and not plain.q)
    first = next(p.tsval for p in plain.client.rx if p.tsval is not None)
    assert seq_diff(first, last) >= 10_000 and seq_diff(first, floor) < 0


# ----- the client side: ACK clamping, duplicate ACKs, FIN ------------------------------------

def _spliced(conv: Conv | None = None, **kw) -> Net:
    net = Net(conv or converse(), **kw)
    net.run(until=lambda: net.sp.phase is Phase.SPLICED)
    return net


def test_duplicate_acks_dropped_during_catch_up():
    net = _spliced()
    sp = net.sp
    net.run(until=lambda: sp.verifier.end >= 20 * MSS)
    assert not sp.verifier.done
    before = dict(sp.stats)
    for i in range(5):
        d = net.from_client(net.client.ack(net.now + i * 0.001))  # acks what the client has: ACKED
        assert not d.forward and not d.inject
    assert sp.stats["acks_dropped"] == before["acks_dropped"] + 5
    # a window update (same ack) is dropped the same way
    seg = net.client.ack(net.now)
    seg.window = C_WIN * 2
    assert not net.from_client(seg).forward


def test_client_ack_above_backup_is_clamped():
    net = _spliced()
    sp = net.sp
    conv = net.conv
    net.run(until=lambda: sp.verifier.end >= 20 * MSS)
    top = seq_add(net.backup.base, sp.b_high)
    # during catch-up: the client acknowledges what the primary had sent (ahead of the backup)
    n = sp.stats["acks_clamped"]
    d = net.from_client(net.client.ack(net.now, ack_off=ACKED))
    assert sp.stats["acks_clamped"] == n + 1
    assert not d.forward  # the gateway acknowledged all of it already
    # a data segment with the same ack goes through, acknowledging no more than the backup sent (I6)
    seg = cseg(net.client.seq, conv.s_base + SENT, ACK | PSH, b"GET /next HTTP/1.1\r\n\r\n", window=C_WIN,
               tsval=conv.c_ts(net.now), tsecr=net.client.ts_seen)
    d = net.from_client(seg)
    assert d.forward and d.rewrite.ack == top
    assert seq_diff(d.rewrite.ack, net.backup.base) <= net.backup.snd_nxt
    assert (d.rewrite.dst, d.rewrite.dport) == (BACKUP.ip, BACKUP.port)
    assert d.rewrite.seq is None  # the client's own sequence space is the backup's
    assert sp.stats["acks_clamped"] == n + 2


def test_client_ack_clamped_after_catch_up():
    net = _spliced()
    sp = net.sp
    net.client.auto_ack = False
    net.run(until=lambda: sp.verifier.done and not sp.pending and not net.q)
    # the client acknowledges everything it got ...
    net.from_client(net.client.ack(net.now))
    net.run(until=lambda: not net.q)
    # ... then something the backup has not sent: clamped to the backup's highest byte
    top = seq_add(net.backup.base, sp.b_high)
    n = sp.stats["acks_clamped"]
    d = net.from_client(net.client.ack(net.now, ack_off=sp.b_high + 5000))
    assert sp.stats["acks_clamped"] == n + 1
    assert d.forward and d.rewrite.ack == top
    # SACK blocks beyond what the backup sent are stripped, others translated
    blocks = ((net.conv.s_base + sp.b_high - 3000) & MASK, (net.conv.s_base + sp.b_high - 1000) & MASK)
    d = net.from_client(net.client.ack(net.now, ack_off=sp.b_high - 4000, sack_blocks=(blocks,)))
    assert d.forward and d.rewrite.sack == sp.tr.sack_to_backend((blocks,)) and not d.rewrite.strip_sack
    far = ((net.conv.s_base + sp.b_high + 1000) & MASK, (net.conv.s_base + sp.b_high + 2000) & MASK)
    d = net.from_client(net.client.ack(net.now, ack_off=sp.b_high - 4000, sack_blocks=(blocks, far)))
    assert d.rewrite.strip_sack and d.rewrite.sack is None


def test_tsecr_translated_to_the_backup_clock():
    net = _spliced()
    sp = net.sp
    net.run(until=lambda: sp.verifier.done and not net.q)
    shown = net.client.ts_seen
    seg = cseg(net.client.seq, net.conv.s_base + net.client.stream.end, ACK | PSH, b"x", window=C_WIN,
               tsval=net.conv.c_ts(net.now), tsecr=shown)
    d = net.from_client(seg)
    assert d.forward and d.rewrite.tsecr == sp.tr.tsecr_to_backend(shown)
    # an echo of the old primary's clock is never sent to the backup below its first TSval
    seg = cseg(net.client.seq + 1, net.conv.s_base + net.client.stream.end, ACK | PSH, b"y", window=C_WIN,
               tsval=net.conv.c_ts(net.now), tsecr=net.conv.s_ts0)
    d = net.from_client(seg)
    assert d.rewrite.tsecr == sp.b_ts_first


def test_client_fin_held_until_caught_up():
    net = _spliced()
    sp = net.sp
    net.run(until=lambda: sp.verifier.end >= 20 * MSS)
    fin = net.client.ack(net.now, flags=ACK | FIN)
    d = net.from_client(fin)
    assert not d.forward and sp.stats["fins_held"] == 1
    assert not any(p.flags & FIN for p in net.backup.got)
    net.run(until=lambda: sp.verifier.done and not net.q)
    # the client sends its FIN again (retransmission): now it goes through
    d = net.from_client(net.client.ack(net.now, flags=ACK | FIN))
    assert d.forward and d.rewrite.dst == BACKUP.ip
    net.run()
    assert net.backup.client_fin
    assert bytes(net.client.stream.data) == RESPONSE[:ACKED] + REGEN[ACKED:]


def test_client_segments_dropped_while_replaying_and_rst_fails():
    conv = converse()
    net = Net(conv)
    sp = net.sp
    assert not net.from_client(net.client.ack(net.now)).forward  # CONNECTING
    _, syn = net.q.popleft()
    sp.on_backend(net.backup.on(syn, net.now)[0], b"", net.now)
    assert sp.phase is Phase.REPLAYING
    assert not net.from_client(net.client.ack(net.now)).forward
    d = net.from_client(cseg(net.client.seq, conv.s_base + ACKED, RST | ACK, window=0))
    assert not d.forward and sp.phase is Phase.FAILED and "client reset" in sp.reason
    assert {o.to for o in d.inject} == {"client", "backend"}


# ----- divergence --------------------------------------------------------------------------------

def _assert_failed_closed(net: Net, d: Decision) -> None:
    sp, rec = net.sp, net.rec
    assert not d.forward
    assert sp.phase is Phase.FAILED and not sp.active
    assert sp.reason.startswith("divergence")
    rsts = [o for o in d.inject if o.flags & RST]
    to_client = [o for o in rsts if o.to == "client"]
    to_backup = [o for o in rsts if o.to == "backend"]
    assert [o.seq for o in to_client] == reset_seqs(rec) and len(to_backup) == 1
    assert to_client[0].seq == rec.client.ack and to_client[0].dst == CLIENT_IP
    assert to_backup[0].dst == BACKUP.ip and to_backup[0].seq == seq_add(net.conv.c_base, sp.replay_acked)
    assert sp.on_backend(Segment(BACKUP.ip, CLIENT_IP, BACKUP.port, CLIENT_PORT, 0), b"", net.now) == Decision(False)
    assert sp.poll(net.now + 100) == []


@pytest.mark.parametrize("where", [5000, ACKED - 10, ACKED + 10, SENT - 1])
def test_divergence_fails_closed(where):
    bad = bytearray(REGEN)
    bad[where] ^= 0x01
    net = Net(converse(), Backup(bytes(bad)))
    sp = net.sp
    net.run(until=lambda: not sp.active)
    while net.q:
        net.step()
    seg, d = next((s, d) for s, d in net.backend_decisions if d.inject and any(o.flags & RST for o in d.inject))
    _assert_failed_closed(net, d)
    assert f"offset {where // CHUNK * CHUNK}" in sp.reason
    # no byte of the chunk holding the difference reached the client
    got = [(seq_diff(p.seq, net.conv.s_base), len(p.payload)) for p in net.client.rx if p.payload]
    lo = where // CHUNK * CHUNK
    assert all(o + n <= lo for o, n in got)
    assert net.backup.reset


def test_divergence_other_header():
    other = REGEN.replace(b"nginx/1.24.0", b"nginx/1.25.0")
    net = Net(converse(), Backup(other))
    net.run(until=lambda: not net.sp.active)
    _, d = net.backend_decisions[-1]
    _assert_failed_closed(net, d)
    assert "offset 0" in net.sp.reason


@pytest.mark.parametrize("cut", [ACKED - 5000, ACKED + 5000, SENT - 1])
def test_backup_fin_before_what_the_client_saw(cut):
    net = Net(converse(), Backup(REGEN[:cut]))
    net.run(until=lambda: not net.sp.active)
    _, d = net.backend_decisions[-1]
    _assert_failed_closed(net, d)
    assert f"ended at {cut}" in net.sp.reason and f"seen {SENT}" in net.sp.reason


def test_backup_reset_during_move_fails():
    net = _spliced()
    b = net.backup
    d = net.from_backup(Segment(BACKUP.ip, CLIENT_IP, BACKUP.port, CLIENT_PORT, seq_add(b.base, b.snd_nxt), 0, RST))
    assert not d.forward and net.sp.phase is Phase.FAILED and "reset" in net.sp.reason


# ----- bytes the client may not have: held, delivered, retained ------------------------------

def test_unverified_bytes_held_acknowledged_and_delivered():
    net = _spliced()
    sp = net.sp
    conv = net.conv
    # the backup has sent past what the client acknowledged, not yet to the end of the chunk
    net.run(until=lambda: sp.verifier.end >= ACKED + 10 * MSS)
    assert sp.pending and not net.client.rx
    assert sp.stats["buffered"] >= 10
    # held bytes are acknowledged to the backup by the gateway so that it sends on
    assert sp.acked_to_b == sp.verifier.end
    queued = [p for w, p in net.q if w == "backup" and isinstance(p, Out)]
    assert max(net.backup.acks_seen + [seq_diff(p.ack, net.backup.base) for p in queued]) == sp.verifier.end
    assert sp.verifier.verified_end() < ACKED
    held = sorted(sp.pending)
    # the chunk holding ACKED (131072..196608) verifies: its bytes go to the client, at once
    hi = (ACKED // CHUNK + 1) * CHUNK
    net.run(until=lambda: sp.verifier.verified_end() >= hi)
    assert sp.verifier.verified_end() < SENT
    outs = [p for p in net.client_outs()] + [p for p in net.client.rx if isinstance(p, Out)]
    got = {seq_diff(p.seq, conv.s_base) for p in outs}
    whole = [o for o in held if o + MSS <= hi]
    assert set(whole) <= got, "verified bytes not delivered"
    for p in outs:
        off = seq_diff(p.seq, conv.s_base)
        assert p.payload == REGEN[off:off + len(p.payload)]
        assert p.to == "client" and p.flags & ACK and (p.src, p.sport, p.dst) == (VIP, VPORT, CLIENT_IP)
        assert p.ack == conv.rec.client.next_seq
        assert p.window == (net.backup.window << B_WSCALE) >> S_WSCALE
        assert p.tsecr == conv.rec.client.tsval
    # they are retained until the client acknowledges them
    assert set(whole) <= set(sp.retained)
    net.run(until=lambda: sp.verifier.done and not net.q)
    assert not sp.retained and not sp.pending
    assert bytes(net.client.stream.data[:SENT]) == RESPONSE[:ACKED] + REGEN[ACKED:SENT]


def _delivered_but_lost(slow: float = 0.0) -> Net:
    """Everything the client may miss is delivered by the gateway, and lost on
    its way to the client; ``slow``: the backup takes that long to answer."""
    conv = converse()
    net = Net(conv)
    sp = net.sp
    net.drop_to_client = lambda p: True
    net.client.auto_ack = False
    net.now += slow  # the backup answers the SYN that late
    net.run(until=lambda: sp.verifier.done and not sp.pending and not net.q)
    assert sp.retained and not net.client.rx
    assert min(sp.retained) == ACKED
    net.drop_to_client = lambda p: False
    return net


def test_retained_resent_on_two_duplicate_acks():
    net = _delivered_but_lost()
    sp = net.sp
    retained = dict(sp.retained)
    d = net.from_client(net.client.ack(net.now))
    assert not d.inject
    d = net.from_client(net.client.ack(net.now))
    resent = [o for o in d.inject if o.to == "client"]
    assert sorted(seq_diff(o.seq, net.conv.s_base) for o in resent) == sorted(retained)
    assert sp.stats["retained_resent"] == len(retained)
    net.route(d.inject)
    net.client.auto_ack = True
    net.run()
    assert not sp.retained
    assert bytes(net.client.stream.data) == RESPONSE[:ACKED] + REGEN[ACKED:]


@pytest.mark.parametrize("slow", [0.0, 1.0])
def test_retained_resent_by_poll_after_rto(slow):
    net = _delivered_but_lost(slow)
    sp = net.sp
    delivered_at = net.now
    # not before the RTO has passed since the delivery
    assert sp.poll(delivered_at + 0.01) == []
    assert sp.poll(delivered_at + INITIAL_RTO / 2) == []
    outs = sp.poll(delivered_at + INITIAL_RTO + 0.001)
    assert sorted(seq_diff(o.seq, net.conv.s_base) for o in outs) == sorted(sp.retained)
    assert all(o.to == "client" for o in outs)
    # the client acknowledges part of it: that part is no longer retained
    net.now = delivered_at + INITIAL_RTO + 0.002
    half = ACKED + 20 * MSS
    net.from_client(net.client.ack(net.now, ack_off=half))
    assert sp.client_acked == half and min(sp.retained) >= half
    net.client.auto_ack = True
    net.route(outs)
    net.run()
    assert not sp.retained
    assert bytes(net.client.stream.data) == RESPONSE[:ACKED] + REGEN[ACKED:]


def test_retained_timer_restarts_on_progress():
    net = _delivered_but_lost()
    sp = net.sp
    t = net.now
    n = len(sp.retained)
    # the client acknowledges part of it (what it got of a resend, say) just before the RTO
    net.now = t + 0.15
    net.from_client(net.client.ack(net.now, ack_off=ACKED + 10 * MSS))
    left = sorted(sp.retained)
    assert len(left) == n - 10 and left[0] == ACKED + 10 * MSS
    # progress: the timer restarted, no resend at the first deadline
    assert sp.poll(t + INITIAL_RTO + 0.01) == []
    outs = sp.poll(t + 0.15 + INITIAL_RTO + 0.001)
    assert sorted(seq_diff(o.seq, net.conv.s_base) for o in outs) == left


# ----- loss between the backup and the gateway -------------------------------------------------

def _never_out_of_order(net: Net) -> None:
    """Every backup segment the gateway let through or delivered starts at or below
    the contiguous end of what it had received then (checked via the client's view)."""
    conv = net.conv
    highest = 0
    for p in net.client.rx:
        if not p.payload:
            continue
        off = seq_diff(p.seq, conv.s_base)
        assert off <= max(highest, ACKED), f"segment at {off} passed with a hole below ({highest})"
        highest = max(highest, off + len(p.payload))


@pytest.mark.parametrize("seed,ack_loss", [(1, False), (2, False), (3, True), (4, True)])
def test_lost_backup_segments_never_let_a_later_one_through(seed, ack_loss):
    rng = random.Random(seed)
    conv = converse()
    net = Net(conv)
    sp = net.sp
    b = net.backup
    lost: set[int] = set()

    def drop(seg):  # the first transmission of ~5 % of the data segments
        off = seq_diff(seg.seq, b.base)
        if seg.payload and off not in lost and rng.random() < 0.05:
            lost.add(off)
            return True
        return False

    net.drop_from_backup = drop
    if ack_loss:  # and some of the gateway's (and client's) ACKs to the backup
        net.drop_to_backup = lambda p: not p.payload and not p.flags & (SYN | FIN | RST) and rng.random() < 0.05
    net.run(max_time=60)
    assert len(lost) >= 5 and any(ACKED <= o < SENT for o in lost)
    assert net.done() and sp.verifier.done and sp.phase is Phase.SPLICED
    gaps = 0
    for (seg, d), contiguous in zip(net.backend_decisions, net.contiguous_before):
        off = seq_diff(seg.seq, b.base)
        if off > contiguous:
            gaps += 1
            assert not d.forward, f"segment at {off} forwarded over a hole at {contiguous}"
            assert not any(o.to == "client" for o in d.inject)
            assert off not in sp.pending
    assert gaps > 0
    _never_out_of_order(net)
    assert bytes(net.client.stream.data) == RESPONSE[:ACKED] + REGEN[ACKED:]


def test_gap_then_client_ack_does_not_acknowledge_the_hole():
    """A backup segment is lost during catch-up; the later ones are dropped
    (unacknowledged) by the gateway.  An ACK from the client for what it had
    from the primary must not acknowledge the hole to the backup (I6), or the
    backup would never send it again and the move could not complete."""
    conv = converse()
    net = Net(conv)
    sp = net.sp
    hole = 30 * MSS
    state = {"lost": False}

    def drop(seg):
        if seq_diff(seg.seq, net.backup.base) == hole and not state["lost"]:
            state["lost"] = True
            return True
        return False

    net.drop_from_backup = drop
    net.run(until=lambda: state["lost"] and net.backup.snd_nxt >= hole + 10 * MSS and not net.q)
    assert sp.verifier.end == hole
    # the client's ACK of the last bytes it had from the primary (delayed), and a data segment
    d = net.from_client(net.client.ack(net.now, ack_off=ACKED))
    if d.forward:
        assert seq_diff(d.rewrite.ack, net.backup.base) <= hole
    seg = cseg(net.client.seq, conv.s_base + ACKED, ACK | PSH, b"GET /next HTTP/1.1\r\n\r\n", window=C_WIN,
               tsval=conv.c_ts(net.now), tsecr=net.client.ts_seen)
    d = net.from_client(seg)
    assert d.forward and seq_diff(d.rewrite.ack, net.backup.base) <= hole
    net.backup.request_len = REQUEST_LEN  # (the extra request changes nothing for this sender)
    net.run(max_time=30)
    assert net.done() and sp.verifier.done
    assert bytes(net.client.stream.data) == RESPONSE[:ACKED] + REGEN[ACKED:]


def test_shorter_retransmission_does_not_lose_held_bytes():
    """A held (unverified) segment of two MSS (GRO) is later retransmitted as
    one MSS at the same offset (the backup's RTO after a lost gateway ACK):
    the gateway must still deliver both halves."""
    conv = converse()
    net = Net(conv)
    sp = net.sp
    b = net.backup
    # nothing from the backup at or past ACKED gets through for now
    net.drop_from_backup = lambda seg: seq_diff(seg.seq, b.base) >= ACKED and bool(seg.payload)
    net.run(until=lambda: sp.verifier.end >= ACKED and not net.q)
    assert sp.verifier.end == ACKED and not sp.pending
    big = b.segment(ACKED, 2 * MSS, net.now)   # two segments coalesced by GRO
    net.from_backup(big)
    assert ACKED in sp.pending and sp.verifier.end == ACKED + 2 * MSS
    small = b.segment(ACKED, MSS, net.now)     # the retransmission of the first one
    net.from_backup(small)
    net.drop_from_backup = lambda seg: False
    deadline = net.now + 10
    net.run(until=lambda: net.done() or net.now > deadline)
    got = net.client.stream
    assert got.end == RESPONSE_LEN, f"client stuck at {got.end}: bytes lost from the held segment"
    assert bytes(got.data) == RESPONSE[:ACKED] + REGEN[ACKED:]


# ----- sampled snapshot ---------------------------------------------------------------------------

def test_move_with_a_sampled_snapshot():
    conv = converse(digest=SampledDigest(("http-date",)))
    net = Net(conv)
    net.run()
    assert net.done() and net.sp.verifier.done and net.sp.phase is Phase.SPLICED
    assert bytes(net.client.stream.data) == RESPONSE[:ACKED] + REGEN[ACKED:]


def test_sampled_snapshot_divergence():
    bad = bytearray(REGEN)
    bad[ACKED + 3000] ^= 0x40   # inside a sample (each 1448-byte segment is one)
    conv = converse(digest=SampledDigest(("http-date",)))
    net = Net(conv, Backup(bytes(bad)))
    net.run(until=lambda: not net.sp.active)
    _, d = net.backend_decisions[-1]
    _assert_failed_closed(net, d)
