"""checkpoint.splice: a move that catches a connection in each TCP state (issue 14, item 4).

Sans-I/O: the conversation with the old primary is folded into a record by the tracker (the
client's bytes logged, the primary's hashed) up to the state under test; then a Splice moves it
and the test plays the backup segment by segment, asserting the exact segments the client and
the backup are given (sequence and acknowledgment numbers as offsets of their streams, flags,
payload).  ``World`` carries them the way the data plane does: tracker and log first, then the
splice; rewrites applied; forwarded backup segments tracked in the client's view.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from checkpoint.ici import TcpState
from checkpoint.segment import ACK, FIN, PSH, RST, SYN, Segment, TcpOptions
from checkpoint.seqnum import seq_add, seq_diff
from checkpoint.splice import Decision, Endpoint, Out, Phase, Splice, SpliceOptions
from checkpoint.streamlog import ByteLog, StreamDigest
from checkpoint.tracker import observe

from ._helpers import CLIENT_IP, CLIENT_PORT, VIP, VPORT, cseg, make_record, sseg
from .test_splice import log_client, rewritten

PRIMARY = Endpoint("primary", "10.0.0.2", 80)
BACKUP = Endpoint("backup", "10.0.0.3", 80)
CISN, SISN, BISN = 4_294_960_000, 700_000, 90_000_000  # the client's stream wraps
C_TS0, S_TS0, B_TS0 = 50_000, 800_000, 3_000
T0 = 100.0
REQ = b"GET /f HTTP/1.1\r\nHost: x\r\n\r\n"
R = len(REQ)
RESP = (b"HTTP/1.1 200 OK\r\nContent-Length: 2962\r\n\r\n" + bytes(range(256)) * 12)[:3000]
A = ACK
AP = ACK | PSH
AF = ACK | FIN


@dataclass
class World:
    """A client, the old primary (before the move), the splice and a hand-played backup."""

    rec: object = field(default_factory=lambda: make_record(now=T0))
    now: float = T0
    sp: Splice | None = None
    to_client: list = field(default_factory=list)   # what the client is given (Out or Segment)
    to_backup: list = field(default_factory=list)   # what the backup is given
    to_old: list = field(default_factory=list)
    b_echo: int = 0

    def __post_init__(self) -> None:
        self.rec.log = ByteLog(1 << 20)
        self.rec.digest = StreamDigest(())

    def tick(self) -> float:
        self.now += 0.001
        return self.now

    # --- the conversation with the primary (before the move) ---------------------------------
    def c(self, off: int, ack: int | None, flags: int, payload: bytes = b"") -> Segment:
        """A client segment: ``off`` in the client's stream, ``ack`` in the server's."""
        t = self.tick()
        rec = self.rec
        seq = CISN if flags & SYN else seq_add(CISN, 1 + off)
        return cseg(seq, 0 if ack is None else seq_add(SISN, 1 + ack), flags, payload, window=502,
                    tsval=C_TS0 + int((t - T0) * 1000), tsecr=(rec.client.ts_recent or 0) if flags & ACK else 0,
                    **({"mss": 1460, "wscale": 7, "sack_permitted": True} if flags & SYN else {}))

    def s(self, off: int, ack: int, flags: int, payload: bytes = b"") -> Segment:
        """A segment of the old primary, as the client sees it."""
        t = self.tick()
        seq = SISN if flags & SYN else seq_add(SISN, 1 + off)
        return sseg(seq, seq_add(CISN, 1 + ack), flags, payload, window=501 if not flags & SYN else 65160,
                    tsval=S_TS0 + int((t - T0) * 1000), tsecr=self.rec.client.tsval or 0,
                    **({"mss": 1460, "wscale": 7, "sack_permitted": True} if flags & SYN else {}))

    def client_says(self, seg: Segment) -> None:
        observe(self.rec, seg, True, self.now)
        log_client(self.rec, seg)

    def primary_says(self, seg: Segment) -> None:
        observe(self.rec, seg, False, self.now)
        if seg.payload:
            self.rec.digest.add(seq_diff(seg.seq, seq_add(SISN, 1)), seg.payload)

    def handshake(self, complete: bool = True) -> None:
        self.client_says(self.c(0, None, SYN))
        self.primary_says(self.s(0, 0, SYN | ACK))
        if complete:
            self.client_says(self.c(0, 0, A))

    # --- the move --------------------------------------------------------------------------------
    def move(self) -> None:
        rec = self.rec
        self.sp = Splice(rec, rec.log, rec.digest.snapshot(), vip=VIP, vport=VPORT, old=PRIMARY, target=BACKUP,
                         now=self.tick(), options=SpliceOptions())
        self.route(self.sp.start(self.now))

    def route(self, outs: list[Out]) -> None:
        for o in outs:
            {"backend": self.to_backup, "client": self.to_client, "old": self.to_old}[o.to].append(o)

    def from_client(self, seg: Segment) -> Decision:
        self.client_says(seg)
        d = self.sp.on_client(seg, self.now)
        self.route(d.inject)
        if d.forward:
            self.to_backup.append(rewritten(seg, d.rewrite))
        return d

    def b(self, off: int, ack: int, flags: int, payload: bytes = b"") -> Segment:
        """A backup segment: ``off`` in its own stream, ``ack`` in the client's."""
        t = self.tick()
        seq = BISN if flags & SYN else seq_add(BISN, 1 + off)
        return Segment(BACKUP.ip, CLIENT_IP, BACKUP.port, CLIENT_PORT, seq, seq_add(CISN, 1 + ack), flags,
                       65160 if flags & SYN else 509, payload,
                       TcpOptions(1460 if flags & SYN else None, 7 if flags & SYN else None, bool(flags & SYN),
                                  B_TS0 + int((t - T0) * 1000), self.b_echo))

    def from_backup(self, seg: Segment) -> Decision:
        d = self.sp.on_backend(seg, seg.payload, self.tick())
        self.route(d.inject)
        if d.forward:
            fw = rewritten(seg, d.rewrite)
            observe(self.rec, fw, False, self.now)
            self.to_client.append(fw)
        return d

    def backup_synack(self) -> None:
        self.from_backup(self.b(0, 0, SYN | ACK))

    # --- what each side was given, as stream offsets ----------------------------------------------
    def client_got(self) -> list[tuple[int, int, int, bytes]]:
        out = []
        for p in self.to_client:
            assert (p.src, p.sport, p.dst, p.dport) == (VIP, VPORT, CLIENT_IP, CLIENT_PORT)
            seq = -1 if p.flags & SYN else seq_diff(p.seq, seq_add(SISN, 1))
            out.append((seq, seq_diff(p.ack, seq_add(CISN, 1)), p.flags, bytes(p.payload)))
        self.to_client.clear()
        return out

    def backup_got(self) -> list[tuple[int, int, int, bytes]]:
        out = []
        for p in self.to_backup:
            assert (p.src, p.sport, p.dst, p.dport) == (CLIENT_IP, CLIENT_PORT, BACKUP.ip, BACKUP.port)
            seq = -1 if p.flags & SYN else seq_diff(p.seq, seq_add(CISN, 1))
            ack = seq_diff(p.ack, seq_add(BISN, 1)) if p.flags & ACK else None
            out.append((seq, ack, p.flags, bytes(p.payload)))
        self.to_backup.clear()
        return out


def moved(world: World) -> World:
    """The move started: the SYN to the backup (the client's ISN) and the fencing RST are out."""
    world.move()
    (syn,) = [p for p in world.to_backup]
    assert syn.flags == SYN and syn.seq == CISN and syn.mss == 1460 and syn.wscale == 7
    world.b_echo = syn.tsval
    world.to_backup.clear()
    assert [(o.flags, o.seq) for o in world.to_old] == [(RST, world.rec.server.ack)]
    return world


def no_resets(world: World) -> None:
    assert world.sp.phase is not Phase.FAILED, world.sp.reason
    assert not any(p.flags & RST for p in world.to_client + world.to_backup)


# ----- SYN_RECV ----------------------------------------------------------------------------------

def test_syn_recv_handshake_finishes_on_the_backup() -> None:
    w = World()
    w.handshake(complete=False)
    assert w.rec.state is TcpState.SYN_RECV
    moved(w)
    # the fencing RST at the primary's rcv_nxt: the client's ISN + 1
    assert w.to_old[0].seq == seq_add(CISN, 1)
    w.backup_synack()
    assert w.backup_got() == [(0, 0, A, b"")]
    assert w.sp.phase is Phase.SPLICED  # nothing to replay, nothing to verify
    # the client's handshake ACK, then its request: translated to the backup
    w.from_client(w.c(0, 0, A))
    w.from_client(w.c(0, 0, AP, REQ))
    assert w.backup_got() == [(0, 0, A, b""), (0, 0, AP, REQ)]
    # the backup answers and closes: all of it goes to the client, in the primary's sequence space
    w.from_backup(w.b(0, R, A))
    w.from_backup(w.b(0, R, AP, RESP[:1000]))
    w.from_backup(w.b(1000, R, AP | FIN, RESP[1000:]))
    assert w.client_got() == [(0, R, A, b""), (0, R, AP, RESP[:1000]), (1000, R, AP | FIN, RESP[1000:])]
    w.from_client(w.c(R, 3001, AF))
    w.from_backup(w.b(3001, R + 1, A))
    assert w.backup_got() == [(R, 3001, AF, b"")]
    assert w.client_got() == [(3001, R + 1, A, b"")]
    assert w.rec.state is TcpState.TIME_WAIT
    no_resets(w)


def test_syn_recv_client_ack_with_data_during_the_move_is_replayed() -> None:
    w = World()
    w.handshake(complete=False)
    moved(w)
    # the client's handshake-completing ACK carries the request while the backup has not answered
    d = w.from_client(w.c(0, 0, AP, REQ))
    assert not d.forward and not d.inject and w.sp.phase is Phase.CONNECTING
    w.backup_synack()
    assert w.backup_got() == [(0, 0, A, b""), (0, 0, AP, REQ)]
    # the backup's acknowledgment of it reaches the client (nothing held: nothing to verify)
    w.from_backup(w.b(0, R, A))
    assert w.sp.phase is Phase.SPLICED
    w.from_backup(w.b(0, R, AP, RESP[:500]))
    assert w.client_got() == [(0, R, A, b""), (0, R, AP, RESP[:500])]
    no_resets(w)


@pytest.mark.parametrize("when", ["connecting", "spliced"])
def test_syn_recv_client_retransmits_its_syn(when: str) -> None:
    """The primary's SYN-ACK was lost: the client sends its SYN again.  It is answered with the
    primary's SYN-ACK (never passed to the backup, whose connection exists already)."""
    w = World()
    w.handshake(complete=False)
    synack_tsval = w.rec.server.tsval
    moved(w)
    if when == "spliced":
        w.backup_synack()
        w.backup_got()
    syn = w.c(0, None, SYN)
    d = w.from_client(syn)
    assert not d.forward and w.backup_got() == []
    (sa,) = w.to_client
    assert (sa.flags, sa.seq, sa.ack) == (SYN | ACK, SISN, seq_add(CISN, 1))
    assert (sa.mss, sa.wscale, sa.sack_permitted) == (1460, 7, True)
    assert sa.window == 65160 and sa.tsecr == syn.tsval
    assert seq_diff(sa.tsval, synack_tsval) >= 0  # the client's view of the server clock never goes back
    w.to_client.clear()
    if when == "connecting":
        w.backup_synack()
        assert w.backup_got() == [(0, 0, A, b"")]
    # the handshake completes with the request, as on the primary
    w.from_client(w.c(0, 0, AP, REQ))
    assert w.backup_got() == [(0, 0, AP, REQ)]
    w.from_backup(w.b(0, R, AP, RESP[:100]))
    assert w.client_got() == [(0, R, AP, RESP[:100])]
    no_resets(w)


# ----- the client half-closed ------------------------------------------------------------------------

@pytest.mark.parametrize("fin_acked", [True, False], ids=["close_wait", "fin_wait"])
def test_client_half_closed_server_still_sending(fin_acked: bool) -> None:
    """The client sent its request and its FIN; the primary was sending the response (2000 of
    3000 bytes sent, 1000 acknowledged).  The backup regenerates, the gateway suppresses what the
    client has, gives the FIN to the backup once it has caught up, delivers the rest and the FIN."""
    w = World()
    w.handshake()
    w.client_says(w.c(0, 0, AP, REQ))
    w.client_says(w.c(R, 0, AF))
    w.primary_says(w.s(0, R + 1 if fin_acked else R, A))
    w.primary_says(w.s(0, R + 1 if fin_acked else R, AP, RESP[:1000]))
    w.primary_says(w.s(1000, R + 1 if fin_acked else R, AP, RESP[1000:2000]))
    w.client_says(w.c(R + 1, 1000, A))
    assert w.rec.state is (TcpState.CLOSE_WAIT if fin_acked else TcpState.FIN_WAIT)
    moved(w)
    w.backup_synack()
    # the request is replayed, not yet the FIN: the backup must first regenerate what the client saw
    assert w.backup_got() == [(0, 0, A, b""), (0, 0, AP, REQ)]
    w.from_backup(w.b(0, R, A))
    assert w.sp.phase is Phase.SPLICED and w.backup_got() == []
    if not fin_acked:  # the client sends its FIN again: held, the backup has not caught up
        d = w.from_client(w.c(R, 1000, AF))
        assert not d.forward and w.backup_got() == []
    # what the client has is suppressed and acknowledged by the gateway
    w.from_backup(w.b(0, R, AP, RESP[:1000]))
    assert w.client_got() == [] and w.backup_got() == [(R, 1000, A, b"")]
    # the rest of what the primary sent: verified, delivered; the backup has caught up: the FIN
    w.from_backup(w.b(1000, R, AP, RESP[1000:2000]))
    shown_ack = R + 1 if fin_acked else R
    assert w.client_got() == [(1000, shown_ack, AP, RESP[1000:2000])]
    assert w.backup_got() == [(R, 1000, AF, b"")]
    # a client in FIN_WAIT_2 acknowledges: its sequence number lies past its FIN, as the backup's now
    w.from_client(w.c(R + 1, 2000, A))
    assert w.backup_got() == [(R + 1, 2000, A, b"")]
    # the backup acknowledges the FIN: the client sees it acknowledged (again, if the primary had)
    w.from_backup(w.b(2000, R + 1, A))
    assert w.client_got() == [(2000, R + 1, A, b"")]
    # the end of the response and the backup's FIN, once, at the right place
    w.from_backup(w.b(2000, R + 1, AP | FIN, RESP[2000:]))
    assert w.client_got() == [(2000, R + 1, AP | FIN, RESP[2000:])]
    w.from_client(w.c(R + 1, 3001, A))
    assert w.backup_got() == [(R + 1, 3001, A, b"")]
    assert w.rec.state is TcpState.TIME_WAIT
    # the FIN went to the backup exactly once, and nothing is left to do
    assert w.sp.stats["fins_sent"] == 1 and w.sp.next_timer() is None
    no_resets(w)


def test_client_fin_to_the_backup_resent_until_acknowledged() -> None:
    w = World()
    w.handshake()
    w.client_says(w.c(0, 0, AP, REQ))
    w.client_says(w.c(R, 0, AF))
    w.primary_says(w.s(0, R + 1, AP, RESP[:1000]))
    w.client_says(w.c(R + 1, 1000, A))
    moved(w)
    w.backup_synack()
    w.from_backup(w.b(0, R, A))
    w.from_backup(w.b(0, R, AP, RESP[:1000]))
    assert w.backup_got() == [(0, 0, A, b""), (0, 0, AP, REQ), (R, 1000, A, b""), (R, 1000, AF, b"")]
    due = w.sp.next_timer()
    assert due is not None and w.sp.poll(due - 0.001) == []
    again = w.sp.poll(due)
    assert [(seq_diff(o.seq, seq_add(CISN, 1)), o.flags) for o in again] == [(R, AF)]
    w.from_backup(w.b(1000, R + 1, A))
    assert w.sp.next_timer() is None and w.sp.stats["fin_retransmits"] == 1


def test_client_fin_with_bytes_the_backup_lacks() -> None:
    """Spliced before the backup caught up, the client's last bytes and FIN arrive while the
    backup regenerates (held); once it has caught up the gateway sends both from the log."""
    w = World()
    w.handshake()
    w.client_says(w.c(0, 0, AP, REQ[:10]))
    w.primary_says(w.s(0, 10, AP, RESP[:1000]))
    w.client_says(w.c(10, 1000, A))
    moved(w)
    w.backup_synack()
    w.from_backup(w.b(0, 10, A))
    assert w.sp.phase is Phase.SPLICED
    assert w.backup_got() == [(0, 0, A, b""), (0, 0, AP, REQ[:10])]
    d = w.from_client(w.c(10, 1000, AP | FIN, REQ[10:]))
    assert not d.forward
    w.from_backup(w.b(0, 10, AP, RESP[:1000]))
    assert w.backup_got() == [(10, 1000, A, b""), (10, 1000, AP, REQ[10:]), (R, 1000, AF, b"")]
    w.from_backup(w.b(1000, R + 1, AP | FIN, RESP[1000:1200]))
    assert w.client_got() == [(1000, R + 1, AP | FIN, RESP[1000:1200])]
    no_resets(w)


# ----- the server half-closed ----------------------------------------------------------------------

@pytest.mark.parametrize("fin_acked", [True, False], ids=["close_wait", "fin_wait"])
def test_server_half_closed_client_still_sending(fin_acked: bool) -> None:
    """The primary answered and closed its side; the client still uploads (and has or has not
    acknowledged the FIN).  The backup's regenerated FIN is suppressed (acknowledged by the
    gateway) or delivered once; the client's later bytes and FIN reach the backup."""
    w = World()
    w.handshake()
    w.client_says(w.c(0, 0, AP, REQ))
    w.primary_says(w.s(0, R, AP, RESP[:1000]))
    w.primary_says(w.s(1000, R, AP | FIN, RESP[1000:]))
    w.client_says(w.c(R, 3001 if fin_acked else 3000, A))
    w.client_says(w.c(R, 3001 if fin_acked else 3000, AP, b"more-1"))
    assert w.rec.state is (TcpState.CLOSE_WAIT if fin_acked else TcpState.FIN_WAIT)
    moved(w)
    w.backup_synack()
    assert w.backup_got() == [(0, 0, A, b""), (0, 0, AP, REQ + b"more-1")]
    w.from_backup(w.b(0, R + 6, A))
    w.from_backup(w.b(0, R + 6, AP, RESP[:1000]))
    w.from_backup(w.b(1000, R + 6, AP | FIN, RESP[1000:]))
    if fin_acked:
        assert w.client_got() == []
        assert w.backup_got() == [(R + 6, 1000, A, b""), (R + 6, 3001, A, b"")]
    else:  # the client has the bytes, not the FIN: the segment again, as the primary would resend it
        assert w.client_got() == [(1000, R + 6, AP | FIN, RESP[1000:])]
        assert w.backup_got() == [(R + 6, 1000, A, b"")]
        w.from_client(w.c(R + 6, 3001, A))
        assert w.backup_got() == [(R + 6, 3001, A, b"")]
    # the client uploads on, then closes
    w.from_client(w.c(R + 6, 3001, AP, b"more-2"))
    w.from_client(w.c(R + 12, 3001, AF))
    assert w.backup_got() == [(R + 6, 3001, AP, b"more-2"), (R + 12, 3001, AF, b"")]
    w.from_backup(w.b(3001, R + 13, A))
    assert w.client_got() == [(3001, R + 13, A, b"")]
    assert w.rec.state is TcpState.TIME_WAIT
    assert w.sp.stats.get("fins_sent", 0) == 0  # the client's own FIN went through
    no_resets(w)


# ----- both FINs sent, one not acknowledged --------------------------------------------------------

def test_last_ack_client_fin_unacknowledged() -> None:
    """The server closed, the client acknowledged and closed too: its FIN was not acknowledged
    when the primary died.  The backup's acknowledgment of it reaches the client, no reset, and
    without waiting for the client to send its FIN again."""
    w = World()
    w.handshake()
    w.client_says(w.c(0, 0, AP, REQ))
    w.primary_says(w.s(0, R, AP | FIN, RESP[:1000]))
    w.client_says(w.c(R, 1001, A))
    w.client_says(w.c(R, 1001, AF))
    assert w.rec.state is TcpState.LAST_ACK
    moved(w)
    w.backup_synack()
    w.from_backup(w.b(0, R, A))
    assert w.backup_got() == [(0, 0, A, b""), (0, 0, AP, REQ)]
    w.from_backup(w.b(0, R, AP | FIN, RESP[:1000]))
    # suppressed (FIN included), acknowledged; caught up: the client's FIN
    assert w.backup_got() == [(R, 1001, A, b""), (R, 1001, AF, b"")]
    w.from_backup(w.b(1001, R + 1, A))
    assert w.client_got() == [(1001, R + 1, A, b"")]
    assert w.rec.state is TcpState.TIME_WAIT
    no_resets(w)


def test_last_ack_server_fin_unacknowledged() -> None:
    """The client closed (acknowledged), the server answered and closed: its FIN not yet
    acknowledged by the client.  The FIN reaches the client once, the client's ACK the backup."""
    w = World()
    w.handshake()
    w.client_says(w.c(0, 0, AP, REQ))
    w.client_says(w.c(R, 0, AF))
    w.primary_says(w.s(0, R + 1, AP | FIN, RESP[:1000]))
    w.client_says(w.c(R + 1, 1000, A))
    assert w.rec.state is TcpState.LAST_ACK
    moved(w)
    w.backup_synack()
    w.from_backup(w.b(0, R, A))
    assert w.backup_got() == [(0, 0, A, b""), (0, 0, AP, REQ)]
    w.from_backup(w.b(0, R, AP | FIN, RESP[:1000]))
    assert w.client_got() == [(0, R + 1, AP | FIN, RESP[:1000])]
    assert w.backup_got() == [(R, 0, AF, b"")]
    w.from_backup(w.b(1001, R + 1, A))
    assert w.client_got() == [(1001, R + 1, A, b"")]
    w.from_client(w.c(R + 1, 1001, A))
    assert w.backup_got() == [(R + 1, 1001, A, b"")]
    assert w.rec.state is TcpState.TIME_WAIT
    no_resets(w)


# ----- through the data plane: packets in, verdicts and segments out -----------------------------

def _engine():
    from appliance.config import parse
    from appliance.dataplane import Dataplane

    return Dataplane(parse({"api": {"token": "a-long-token"},
                            "service": [{"name": "web", "vip": "203.0.113.10", "port": 80,
                                         "backend": [{"name": "primary", "address": "198.51.100.10"},
                                                     {"name": "backup", "address": "198.51.100.20"}]}]}))


def _pkt(src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: int, payload: bytes = b"",
         **opts) -> bytearray:
    from nfq.build import tcp_options, tcp_packet

    return bytearray(tcp_packet(src, dst, sport, dport, seq, ack, flags, 64240,
                                tcp_options(syn=bool(flags & SYN), **opts), payload))


CL, VIP4, P4, B4 = "192.0.2.10", "203.0.113.10", "198.51.100.10", "198.51.100.20"


def test_engine_syn_recv_move_answers_the_retransmitted_syn() -> None:
    from nfq.queue import Verdict

    dp = _engine()
    ts = {"tsval": 500, "tsecr": 0}
    assert dp.handle(_pkt(CL, VIP4, 40000, 80, 1000, 0, SYN, mss=1460, wscale=7, sack_permitted=True, **ts),
                     1.0) is Verdict.REWRITTEN
    dp.handle(_pkt(P4, CL, 80, 40000, 5000, 1001, SYN | ACK, mss=1460, wscale=7, sack_permitted=True,
                   tsval=9000, tsecr=500), 1.0)
    (rec,) = dp.connections()
    assert rec.state is TcpState.SYN_RECV
    sp = dp.move(rec, dp.services["web"].backends["backup"], 2.0)
    syn, fence = dp.outbox
    assert (syn.flags, syn.seq, syn.dst, fence.flags, fence.seq, fence.dst) == (SYN, 1000, B4, RST, 1001, P4)
    dp.outbox.clear()
    # the primary's SYN-ACK never arrived: the client sends its SYN again
    assert dp.handle(_pkt(CL, VIP4, 40000, 80, 1000, 0, SYN, mss=1460, wscale=7, sack_permitted=True,
                          tsval=1500, tsecr=0), 2.1) is Verdict.DROP
    (sa,) = dp.outbox
    assert (sa.to, sa.src, sa.dst, sa.flags, sa.seq, sa.ack) == ("client", VIP4, CL, SYN | ACK, 5000, 1001)
    assert (sa.mss, sa.wscale, sa.sack_permitted, sa.tsecr) == (1460, 7, True, 1500) and sa.tsval >= 9000
    dp.outbox.clear()
    # the backup answers the gateway's SYN; the client's ACK and request reach it translated
    assert dp.handle(_pkt(B4, CL, 80, 40000, 77_000, 1001, SYN | ACK, mss=1460, wscale=7, sack_permitted=True,
                          tsval=10, tsecr=500), 2.2) is Verdict.DROP
    assert [(o.flags, o.seq, o.ack) for o in dp.outbox] == [(ACK, 1001, 77_001)]
    assert sp.phase is Phase.SPLICED
    buf = _pkt(CL, VIP4, 40000, 80, 1001, 5001, ACK | PSH, REQ, tsval=1600, tsecr=sa.tsval)
    assert dp.handle(buf, 2.3) is Verdict.REWRITTEN
    from nfq.packet import PacketView

    pv = PacketView(buf)
    assert (pv.dst, pv.seq, pv.ack, bytes(pv.payload)) == (B4, 1001, 77_001, REQ)


@pytest.mark.parametrize("final", ["TIME_WAIT", "CLOSED"])
def test_engine_finished_connection_is_not_moved(final: str) -> None:
    """TIME_WAIT or reset: nothing to move.  The engine says so (LookupError), sends nothing (no
    SYN to the backup, no RST anywhere) and leaves the connection where it was."""
    dp = _engine()
    dp.handle(_pkt(CL, VIP4, 40000, 80, 1000, 0, SYN, mss=1460), 1.0)
    dp.handle(_pkt(P4, CL, 80, 40000, 5000, 1001, SYN | ACK, mss=1460), 1.0)
    dp.handle(_pkt(CL, VIP4, 40000, 80, 1001, 5001, ACK | PSH, REQ), 1.0)
    if final == "TIME_WAIT":
        dp.handle(_pkt(P4, CL, 80, 40000, 5001, 1001 + R, ACK | PSH, RESP[:100]), 1.1)
        dp.handle(_pkt(CL, VIP4, 40000, 80, 1001 + R, 5101, ACK | FIN), 1.2)
        (rec,) = dp.connections()
        rec.server_close_ok = True  # the primary's FIN vetted (no probe in this test)
        dp.handle(_pkt(P4, CL, 80, 40000, 5101, 1002 + R, ACK | FIN), 1.3)
        dp.handle(_pkt(CL, VIP4, 40000, 80, 1002 + R, 5102, ACK), 1.4)
    else:
        dp.handle(_pkt(CL, VIP4, 40000, 80, 1001 + R, 5001, RST), 1.2)
    (rec,) = dp.connections()
    assert rec.state.value == final
    dp.outbox.clear()
    with pytest.raises(LookupError, match="nothing to move"):
        dp.move(rec, dp.services["web"].backends["backup"], 2.0)
    assert dp.outbox == [] and dp.splice_of(rec.id) is None and rec.backend == "primary" and rec.moves == 0


# ----- the backup's FIN and the close: no RST after it (the lab's client_fin, planned move) ----------

def closing_move() -> World:
    """The client uploaded its request and closed (acknowledged by the primary), nothing answered
    yet; moved: the backup gets the request and the FIN, answers and closes."""
    w = World()
    w.handshake()
    w.client_says(w.c(0, 0, AP, REQ))
    w.client_says(w.c(R, 0, AF))
    w.primary_says(w.s(0, R + 1, A))
    assert w.rec.state is TcpState.CLOSE_WAIT
    moved(w)
    w.backup_synack()
    assert w.backup_got() == [(0, 0, A, b""), (0, 0, AP, REQ), (R, 0, AF, b"")]
    w.from_backup(w.b(0, R + 1, A))
    assert w.sp.phase is Phase.SPLICED
    w.from_backup(w.b(0, R + 1, AP, RESP[:158]))
    w.from_backup(w.b(158, R + 1, AF))
    assert w.client_got() == [(0, R + 1, A, b""), (0, R + 1, AP, RESP[:158]), (158, R + 1, AF, b"")]
    return w


def test_backup_fin_sent_again_before_the_client_acknowledged_it() -> None:
    """The lab's failure: the backup's RTT estimate is the gateway's prompt answers, so its tail
    loss probe sends its FIN again 4 ms later, while the client's ACK is still on its way.  That
    copy must not reach the client (in TIME_WAIT it answers it with a duplicate ACK, which the
    backup, closed by the first, answers with a RST), and a duplicate ACK must not reach the
    closed backup; a RST that still comes from it never reaches the client."""
    w = closing_move()
    w.now += 0.004
    d = w.from_backup(w.b(158, R + 1, AF))  # the tail loss probe
    assert not d.forward and w.client_got() == [] and w.backup_got() == []  # dropped, not acknowledged
    w.from_client(w.c(R + 1, 158, A))
    w.from_client(w.c(R + 1, 159, A))
    assert w.backup_got() == [(R + 1, 158, A, b""), (R + 1, 159, A, b"")]
    assert w.rec.state is TcpState.TIME_WAIT
    # the client acknowledges again (had the copy reached it): the backup is closed, it is not told
    d = w.from_client(w.c(R + 1, 159, A))
    assert not d.forward and w.backup_got() == []
    # a RST from the closed backup (the answer to anything stale): not for the client
    d = w.from_backup(w.b(159, 0, RST))
    assert not d.forward and w.client_got() == [] and w.sp.stats["late_rsts_dropped"] == 1
    assert w.sp.phase is Phase.SPLICED  # the splice keeps the connection's later segments
    no_resets(w)


def test_backup_fin_copy_after_the_acknowledgment_is_not_answered_at_once() -> None:
    """The copy crossed the client's ACK: the gateway has seen the ACK (and passed it on) when the
    copy comes.  Acknowledging it would draw a RST from the then closed backup: dropped."""
    w = closing_move()
    w.from_client(w.c(R + 1, 159, A))
    assert w.backup_got() == [(R + 1, 159, A, b"")]
    w.now += 0.004
    d = w.from_backup(w.b(158, R + 1, AF))
    assert not d.forward and w.client_got() == [] and w.backup_got() == []
    no_resets(w)


def test_backup_fin_lost_to_the_client_is_delivered_by_the_backups_retransmission() -> None:
    """Only copies within the backup's minimum RTO of the FIN passed on are dropped: a FIN the
    client never got is resent by the backup after its RTO, and that copy reaches the client."""
    w = closing_move()
    w.now += 0.004
    w.from_backup(w.b(158, R + 1, AF))  # its tail loss probe: dropped
    assert w.client_got() == []
    w.from_client(w.c(R + 1, 158, A))  # the client got the data, not the FIN
    assert w.backup_got() == [(R + 1, 158, A, b"")]
    w.now += 0.25
    d = w.from_backup(w.b(158, R + 1, AF))  # its RTO
    assert d.forward and w.client_got() == [(158, R + 1, AF, b"")]
    w.from_client(w.c(R + 1, 159, A))
    assert w.backup_got() == [(R + 1, 159, A, b"")]
    no_resets(w)


def test_backup_rst_before_the_close_still_reaches_the_client() -> None:
    """A RST from the backup while the connection is open (its FIN not acknowledged by the client)
    is the backup's word: it goes to the client, translated."""
    w = closing_move()
    d = w.from_backup(w.b(159, 0, RST))
    assert d.forward and w.sp.phase is Phase.CLOSED and w.sp.reset_by == "backend"
    (rst,) = w.client_got()
    assert rst[0] == 159 and rst[2] & RST


# ----- where the client's FIN goes in the backup's stream (ByteLog.fin_server_offset) ------------

HEAD = RESP[:100]


@pytest.mark.parametrize("known", [True, False], ids=["fin_server_offset", "older_log"])
def test_client_fin_reaches_a_server_that_reads_to_eof(known: bool) -> None:
    """A server that sends a head, reads the body to EOF, then answers (the answer after the
    client's FIN, seen by the gateway, not by the client).  The backup must get the FIN once it
    has regenerated the head (what the primary had sent when the FIN was logged), before its
    answer: waiting for everything the client has would wait forever.  A log from an older
    gateway (the offset unknown) keeps the old rule: the FIN waits until the backup caught up."""
    w = World()
    w.handshake()
    w.client_says(w.c(0, 0, AP, REQ))
    w.primary_says(w.s(0, R, AP, HEAD))
    w.client_says(w.c(R, 100, AF))
    assert w.rec.log.fin_offset == R
    w.rec.log.fin_server_offset = 100 if known else None  # what the engine records (below)
    w.primary_says(w.s(100, R + 1, AP, RESP[100:1000]))  # the answer after EOF, lost to the client
    moved(w)
    w.backup_synack()
    assert w.backup_got() == [(0, 0, A, b""), (0, 0, AP, REQ)]  # not the FIN: no head yet
    w.from_backup(w.b(0, R, A))
    assert w.sp.phase is Phase.SPLICED
    w.from_backup(w.b(0, R, AP, HEAD))  # the client has it: suppressed, acknowledged by the gateway
    assert w.client_got() == []
    if not known:
        assert w.backup_got() == [(R, 100, A, b"")]
        assert w.sp.next_timer() is None  # nothing will send it: this server would wait forever
        return
    assert w.backup_got() == [(R, 100, A, b""), (R, 100, AF, b"")]
    # EOF: the backup answers, the answer verifies against the primary's and reaches the client
    w.from_backup(w.b(100, R + 1, AP | FIN, RESP[100:1000]))
    assert w.client_got() == [(100, R + 1, AP | FIN, RESP[100:1000])]
    w.from_client(w.c(R + 1, 1001, A))
    assert w.backup_got() == [(R + 1, 1001, A, b"")]
    assert w.rec.state is TcpState.TIME_WAIT and w.sp.stats["fins_sent"] == 1
    no_resets(w)


def test_client_fin_after_what_the_primary_had_sent_then() -> None:
    """The existing case with the offset known: the primary was answering (1000 bytes sent) when
    the FIN came, then sent 1000 more.  The FIN goes to the backup after it regenerated the
    first 1000 bytes, not before (a server may abort a response it regenerates on a
    half-close), and not only after all 2000."""
    w = World()
    w.handshake()
    w.client_says(w.c(0, 0, AP, REQ))
    w.primary_says(w.s(0, R, AP, RESP[:1000]))
    w.client_says(w.c(R, 1000, AF))
    w.rec.log.fin_server_offset = 1000
    w.primary_says(w.s(1000, R + 1, AP, RESP[1000:2000]))
    moved(w)
    w.backup_synack()
    w.from_backup(w.b(0, R, A))
    assert w.backup_got() == [(0, 0, A, b""), (0, 0, AP, REQ)]
    w.from_backup(w.b(0, R, AP, RESP[:500]))
    assert w.backup_got() == [(R, 500, A, b"")]  # not yet
    w.from_backup(w.b(500, R, AP, RESP[500:1000]))
    assert w.backup_got() == [(R, 1000, A, b""), (R, 1000, AF, b"")]
    w.from_backup(w.b(1000, R + 1, AP | FIN, RESP[1000:]))
    assert w.client_got() == [(1000, R + 1, AP | FIN, RESP[1000:])]
    no_resets(w)


def test_engine_logs_what_the_server_had_sent_with_the_clients_fin() -> None:
    dp = _engine()
    dp.handle(_pkt(CL, VIP4, 40000, 80, 1000, 0, SYN, mss=1460), 1.0)
    dp.handle(_pkt(P4, CL, 80, 40000, 5000, 1001, SYN | ACK, mss=1460), 1.0)
    dp.handle(_pkt(CL, VIP4, 40000, 80, 1001, 5001, ACK | PSH, REQ), 1.0)
    dp.handle(_pkt(P4, CL, 80, 40000, 5001, 1001 + R, ACK | PSH, HEAD), 1.1)
    dp.handle(_pkt(CL, VIP4, 40000, 80, 1001 + R, 5101, ACK | FIN), 1.2)
    dp.handle(_pkt(P4, CL, 80, 40000, 5101, 1002 + R, ACK | PSH, RESP[100:300]), 1.3)
    (rec,) = dp.connections()
    assert (rec.log.fin_offset, rec.log.fin_server_offset) == (R, 100)


def test_fin_server_offset_persists_and_reads_as_unknown_when_absent(tmp_path) -> None:
    import sqlite3

    from checkpoint.io.sqlite import SqliteBackend
    from checkpoint.state import log_from_state, log_state
    from checkpoint.store import CommitPlanner

    log = ByteLog(1 << 20)
    log.add(0, REQ)
    log.fin_offset, log.fin_server_offset = R, 100
    d = log_state(log)
    assert d["fin_server_offset"] == 100 and log_from_state(d, REQ).fin_server_offset == 100
    del d["fin_server_offset"]  # a document of an older gateway
    assert log_from_state(d, REQ).fin_server_offset is None
    # the disk store: written with the FIN, read back; a row of an older appliance reads as unknown
    rec = make_record(3)
    rec.log = log
    planner, backend = CommitPlanner(ici_interval=0.0), SqliteBackend(tmp_path / "cp.db")
    planner.track(rec)
    batch = planner.plan(1.0)
    backend.write(batch)
    planner.done(batch)
    (loaded,) = backend.load()
    assert (loaded.rec.log.fin_offset, loaded.rec.log.fin_server_offset) == (R, 100)
    backend.close()
    db = sqlite3.connect(tmp_path / "cp.db")
    db.execute("UPDATE conn SET fin_server = NULL")
    db.commit()
    db.close()
    again = SqliteBackend(tmp_path / "cp.db")
    (loaded,) = again.load()
    assert (loaded.rec.log.fin_offset, loaded.rec.log.fin_server_offset) == (R, None)
    again.close()
