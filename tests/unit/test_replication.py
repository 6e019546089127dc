"""checkpoint.replication, sans-I/O: the frame format (and its decoder on arbitrary bytes), the
active's Replicator and the standby's Replica driven through a simulated link that loses,
reorders and duplicates frames, reconnects, and a clock under the test's control."""

from __future__ import annotations

import copy
import json
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpoint.replication import (
    ACK, BATCH, MAX_FRAME, Ack, Append, Batch, Digest, Epoch, Forget, FrameReader, Hello, Move, Op, Ping, Record,
    Replica, ReplicationError, Replicator, ReplConn, Resync, SnapshotBegin, SnapshotConn, SnapshotEnd, Table, Trim,
    apply_ops, decode, encode, ops_from_batch,
)
from checkpoint.store import CommitPlanner
from checkpoint.streamlog import ByteLog, StreamDigest

from ._helpers import make_record

H = bytes(range(16))  # a chunk hash (DIGEST_SIZE bytes)


# ----- frames --------------------------------------------------------------------------------

ALL_OPS: tuple[Op, ...] = (
    Record(7, {"state": "ESTABLISHED", "n": [1, 2]}),
    Append(7, 0, b"GET / HTTP/1.1\r\n\r\n"),
    Append(7, 18, b"", True, 4096),
    Trim(7, 10),
    Digest(7, {"kind": "stream", "end": 5000}, (4096, 1), 1, (H, None), (8192, None), None),
    Digest(8, {"kind": "sampled"}, None, 0, (), (), ((0, 100, H),)),
    Move(7, {"backend": "backup", "delta": 12345}),
    Move(8, None),
    Forget(9),
)

FRAMES = [
    Hello("gw1", "standby", 3, 2, 41, True),
    Batch(3, 42, ALL_OPS, (12.5, 1.0)),
    Batch(3, 43, (), None),
    Ack(3, 42, 99.25),
    SnapshotBegin(3, 44, 2, 1),
    SnapshotConn(3, 44, 0, 7, tuple(op for op in ALL_OPS if op.conn == 7)),
    SnapshotEnd(3, 44),
    Epoch(4),
    Resync(3, 41, False, "gap: seq 43 after 41"),
    Ping(3, 44, None),
]


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: type(f).__name__)
def test_every_frame_round_trips(frame):
    data = encode(frame)
    assert struct.unpack(">I", data[:4])[0] == len(data) - 4
    assert data[4] == 1  # version
    assert decode(data) == frame


def test_a_stream_cut_anywhere_gives_the_same_frames():
    data = b"".join(encode(f) for f in FRAMES)
    for cut in (1, 3, 7, 64):
        r = FrameReader()
        got = []
        for i in range(0, len(data), cut):
            got += r.feed(data[i:i + cut])
        assert got == FRAMES and r.pending == 0


def _raw(kind: int, header: object, body: bytes = b"", version: int = 1) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack(">IBBI", 6 + len(h) + len(body), version, kind, len(h)) + h + body


@pytest.mark.parametrize("data, field", [
    (_raw(BATCH, {"epoch": 1, "seq": 2, "lease": None, "ops": [
        {"op": "forget", "conn": 1}, {"op": "log", "conn": 1, "off": -1, "len": 0, "fin": False,
                                      "fin_server": None}]}),
     "BATCH.ops[1].off"),
    (_raw(BATCH, {"epoch": 1, "seq": 2, "lease": None, "ops": [
        {"op": "log", "conn": 1, "off": 0, "len": 5, "fin": False, "fin_server": None}]}, b"abc"),
     "BATCH.ops[0].len"),
    (_raw(BATCH, {"epoch": 1, "seq": 2, "lease": None, "ops": [
        {"op": "log", "conn": 1, "off": 0, "len": 0, "fin": False, "fin_server": 9}]}), "BATCH.ops[0].fin_server"),
    (_raw(BATCH, {"epoch": 1, "seq": 2, "lease": None, "ops": []}, b"abc"), "BATCH.body"),
    (_raw(BATCH, {"epoch": 1, "seq": 2, "lease": [1.0], "ops": []}), "BATCH.lease"),
    (_raw(BATCH, {"epoch": 1, "seq": 2, "lease": None, "ops": [{"op": "dance", "conn": 1}]}), "BATCH.ops[0].op"),
    (_raw(BATCH, {"epoch": 1, "seq": 2, "lease": None, "ops": [], "extra": 1}), "BATCH.extra"),
    (_raw(ACK, {"epoch": 1, "seq": True, "t": 0}), "ACK.seq"),
    (_raw(ACK, {"epoch": 1, "t": 0}), "ACK.seq"),
    (_raw(ACK, {"epoch": 1, "seq": 1, "t": 0}, version=2), "version"),
    (_raw(ACK, {"epoch": 1, "seq": 1, "t": 0}, b"x"), "ACK.body"),
    (_raw(ACK, [1, 2]), "ACK"),
    (_raw(42, {}), "type"),
    (struct.pack(">IBBI", 6, 1, ACK, 0) + b"", "ACK.header"),
    (struct.pack(">IBBI", 8, 1, ACK, 9) + b"{}", "header_length"),
    (struct.pack(">I", MAX_FRAME + 1), "length"),
    (_raw(BATCH, {"epoch": 1, "seq": 2, "lease": None, "ops": [
        {"op": "digest", "conn": 1, "meta": None, "base": None, "first": 0, "chunks": ["zz"], "bounds": [None],
         "samples": None}]}), "BATCH.ops[0].chunks[0]"),
])
def test_a_bad_frame_names_its_field(data, field):
    with pytest.raises(ReplicationError) as exc:
        FrameReader().feed(data)
    assert exc.value.field == field
    assert str(exc.value).startswith(field)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_the_decoder_on_arbitrary_bytes_raises_only_replication_errors(data):
    try:
        FrameReader().feed(data)
    except ReplicationError:
        pass


JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                       lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                       max_leaves=12)
KEYS = ["epoch", "seq", "lease", "ops", "t", "node", "role", "table_epoch", "applied_seq", "in_sync", "count",
        "conns", "i", "conn", "snapshot", "reason", "op", "off", "len", "fin", "state", "base", "meta", "first",
        "chunks", "bounds", "samples"]


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 12), st.dictionaries(st.sampled_from(KEYS), JSONISH, max_size=8),
       st.lists(st.dictionaries(st.sampled_from(KEYS), JSONISH | st.sampled_from(["log", "digest", "record"]),
                                max_size=9), max_size=3), st.binary(max_size=20))
def test_the_decoder_on_plausible_headers_raises_only_replication_errors(kind, header, ops, body):
    if ops:
        header["ops"] = ops
    try:
        FrameReader().feed(_raw(kind, header, body))
    except ReplicationError:
        pass


# ----- the table -----------------------------------------------------------------------------

def test_ops_are_idempotent_and_positional():
    t: Table = {}
    ops = [Record(1, {"a": 1}), Append(1, 0, b"hello "), Append(1, 6, b"world"), Trim(1, 3),
           Digest(1, {"kind": "stream"}, None, 0, (H, H), (10, 20)), Digest(1, None, (20, 2), 2, (None,), (30,))]
    apply_ops(t, ops)
    once = copy.deepcopy(t)
    apply_ops(t, ops)          # everything again: same table
    apply_ops(t, [Append(1, 0, b"hello wo")])   # an overlap below the trim and into the log
    assert t == once
    rc = t[1]
    assert (rc.log_base, bytes(rc.log), rc.digest_dropped, rc.chunks) == (3, b"lo world", 2, [None])
    with pytest.raises(ReplicationError, match="log ends at 11"):
        apply_ops(t, [Append(1, 12, b"x")])     # a hole is never silently accepted
    apply_ops(t, [Forget(1)])
    assert t == {}


def test_a_snapshot_rebuilds_an_entry_exactly():
    rc = ReplConn({"x": 1}, 100, bytearray(b"abc" * 1000), True, 777, {"kind": "stream", "end": 9}, 4096, 1,
                  [H, None], [8192, None], None, {"move": 1})
    t: Table = {}
    apply_ops(t, rc.ops(5))
    assert t == {5: rc}


def test_a_live_record_survives_the_trip():
    """ReplConn.from_record / to_record: the log, the FIN and the digest come back."""
    rec = make_record(3)
    rec.log = ByteLog(1 << 20)
    rec.log.add(0, b"x" * 5000)
    rec.log.fin_offset = rec.log.end
    rec.log.fin_server_offset = 321
    dg = StreamDigest()
    dg.add(0, bytes(range(256)) * 40)
    rec.digest = dg
    t: Table = {}
    apply_ops(t, ReplConn.from_record(rec, {"moved": True}).ops(3))
    back = t[3].to_record()
    assert back.id == 3 and back.log is not None and bytes(back.log.data) == b"x" * 5000
    assert back.log.fin_offset == 5000 and back.log.fin_server_offset == 321
    assert isinstance(back.digest, StreamDigest) and back.digest.chunks == dg.chunks and back.digest.end == dg.end
    assert t[3].move == {"moved": True}


def test_the_disk_store_batches_replicate_what_the_store_holds():
    """CommitPlanner batches -> ops_from_batch -> Replicator -> Replica: the standby holds what a
    restart from the disk store would (log bytes, trims, FIN, digest chunks)."""
    planner = CommitPlanner(ici_interval=0)
    recs = []
    for cid in (1, 2):
        rec = make_record(cid)
        rec.log = ByteLog(1 << 20)
        rec.digest = StreamDigest()
        planner.track(rec)
        recs.append(rec)
    pair = Pair()
    pair.establish()
    rng = random.Random(1)
    for step in range(30):
        for rec in recs:
            assert rec.log is not None and isinstance(rec.digest, StreamDigest)
            if rec.log.fin_offset is None:
                rec.log.add(rec.log.end, rng.randbytes(rng.randrange(1, 3000)))
            rec.digest.add(rec.digest.end, rng.randbytes(rng.randrange(1, 9000)))
            planner.touch(rec)
        if step == 20:
            recs[0].log.trim(recs[0].log.end - 100)
            recs[1].log.fin_offset = recs[1].log.end
            recs[1].log.fin_server_offset = 4242
        batch = planner.plan(float(step))
        assert batch is not None
        seq = pair.r.submit(ops_from_batch(batch, {1: {"delta": step}}), pair.now)
        assert seq > pair.r.released_through   # not before the standby has it
        pair.pump()
        assert seq <= pair.r.released_through
        planner.done(batch)
    for rec in recs:
        got = pair.p.table[rec.id].to_record()
        assert got.log is not None and rec.log is not None
        assert (got.log.base, bytes(got.log.data), got.log.fin_offset, got.log.fin_server_offset) == (
            rec.log.base, bytes(rec.log.data), rec.log.fin_offset, rec.log.fin_server_offset)
        assert isinstance(got.digest, StreamDigest) and isinstance(rec.digest, StreamDigest)
        assert got.digest.chunks == rec.digest.chunks
    assert pair.p.table[1].move == {"delta": 29}


# ----- the protocol: a simulated link --------------------------------------------------------

class Pair:
    """An active (Replicator) and a standby (Replica) over a simulated link; ``model`` is the
    active's own table (every op it submitted, applied in order)."""

    def __init__(self, *, ack_timeout: float = 0.5, lease: float = 1.0, max_lag_bytes: int = 1 << 20,
                 epoch: int = 1, replica: Replica | None = None) -> None:
        self.now = 0.0
        self.r = Replicator("gw1", epoch, ack_timeout=ack_timeout, lease=lease, max_lag_bytes=max_lag_bytes,
                            heartbeat=0.1)
        self.p = replica or Replica("gw2")
        self.model: Table = {}
        self.to_p: list[bytes] = []
        self.to_r: list[bytes] = []
        self.released: list[int] = []
        self.events: list[str] = []

    def connect(self) -> None:
        self.to_p.clear()
        self.to_r.clear()
        self.r.disconnected(self.now)
        self.r.connected(self.now)
        self.p.connected(self.now)

    def submit(self, ops: list[Op]) -> int:
        apply_ops(self.model, ops)
        return self.r.submit(ops, self.now)

    def collect(self) -> None:
        if self.r.wants_snapshot:
            self.r.snapshot(copy.deepcopy(self.model), self.now)
        self.to_p += self.r.frames_out(self.now)
        self.to_r += self.p.frames_out()
        self.events += [f"{e.kind}: {e.message}" for e in self.r.pop_events()]

    def deliver_p(self, i: int = 0) -> None:
        self.p.on_frame(decode(self.to_p.pop(i)), self.now)

    def deliver_r(self, i: int = 0) -> None:
        self.released += self.r.on_frame(decode(self.to_r.pop(i)), self.now)

    def pump(self, rounds: int = 50) -> None:
        """Deliver everything, both ways, until quiet."""
        for _ in range(rounds):
            self.collect()
            if not self.to_p and not self.to_r:
                return
            while self.to_p:
                self.deliver_p()
            while self.to_r:
                self.deliver_r()
        raise AssertionError("the link never went quiet")

    def advance(self, dt: float) -> None:
        self.now += dt
        self.released += self.r.tick(self.now)

    def establish(self) -> None:
        self.connect()
        self.pump()
        self.advance(0.15)  # a PING carries the first lease
        self.pump()
        assert self.r.in_sync and self.p.in_sync(self.now), (self.r.degraded, self.p.why_not(self.now))

    def check_safe(self) -> None:
        """I1 across the pair: an eligible standby holds every batch the active committed."""
        if self.p.in_sync(self.now) and self.p.table_epoch == self.r.epoch:
            assert self.p.applied >= self.r.released_through, (self.p.applied, self.r.released_through)


def log_op(pair: Pair, cid: int, n: int = 100) -> Append:
    rc = pair.model.get(cid)
    end = rc.log_end if rc else 0
    return Append(cid, end, bytes([cid]) * n)


def test_a_fresh_standby_gets_a_snapshot_then_every_batch_waits_for_its_ack():
    pair = Pair()
    pair.submit([Record(1, {"v": 1}), log_op(pair, 1)])   # before any standby: goes alone
    assert pair.r.released_through == 1 and not pair.r.in_sync
    pair.establish()
    assert any(e.startswith("snapshot: snapshot of 1 connections") for e in pair.events)
    assert pair.p.table == pair.model
    seq = pair.submit([log_op(pair, 1)])
    pair.collect()
    assert pair.r.released_through < seq          # sent, not acknowledged: not committable
    pair.deliver_p()
    pair.collect()
    assert pair.r.released_through < seq
    pair.deliver_r()
    assert pair.r.released_through == seq and seq in pair.released
    assert pair.p.table == pair.model


def test_pipelined_batches_are_released_in_order_by_cumulative_acks():
    pair = Pair()
    pair.establish()
    seqs = [pair.submit([log_op(pair, 1)]) for _ in range(5)]
    pair.collect()
    assert len(pair.to_p) == 5
    assert pair.r.lag(pair.now)[0] == sum(len(f) for f in pair.to_p)
    for _ in range(5):
        pair.deliver_p()
    pair.collect()
    assert len(pair.to_r) == 1           # one coalesced ACK for the five
    pair.deliver_r()
    assert pair.r.released_through == seqs[-1] and pair.r.lag(pair.now) == (0, 0.0)


def test_a_lost_batch_is_a_gap_answered_by_a_resend_never_a_missing_op():
    pair = Pair()
    pair.establish()
    s1 = pair.submit([log_op(pair, 1)])
    s2 = pair.submit([Record(2, {"new": True}), log_op(pair, 2)])
    s3 = pair.submit([log_op(pair, 1)])
    pair.collect()
    pair.to_p.pop(1)                      # seq s2 lost
    pair.deliver_p()
    pair.deliver_p()                      # s3 arrives after s1: a gap
    assert pair.p.applied == s1 and 2 not in pair.p.table
    assert not pair.p.in_sync(pair.now) and "gap" in (pair.p.why_not(pair.now) or "")
    pair.collect()
    frames = [decode(f) for f in pair.to_r]
    assert any(isinstance(f, Resync) and f.applied_seq == s1 and not f.snapshot for f in frames)
    pair.pump()
    assert pair.p.applied == s3 and pair.p.table == pair.model
    assert pair.r.released_through == s3 and pair.r.in_sync
    assert any(e.startswith("resend") for e in pair.events)
    assert sum(e.startswith("snapshot: snapshot of") for e in pair.events) == 1   # the first one only
    del s2


def test_reordered_and_duplicated_batches():
    pair = Pair()
    pair.establish()
    for _ in range(3):
        pair.submit([log_op(pair, 1, 10)])
    pair.collect()
    a, b, c = pair.to_p
    pair.to_p = [a, a, c, b, b, c, a]
    while pair.to_p:
        pair.deliver_p()
        pair.check_safe()
    pair.pump()
    assert pair.p.table == pair.model and pair.p.applied == pair.r.seq
    assert bytes(pair.p.table[1].log) == bytes([1]) * 30


def test_a_standby_that_does_not_ack_degrades_the_active_then_catches_up_by_snapshot():
    pair = Pair(ack_timeout=0.5, lease=1.0, max_lag_bytes=20_000)
    pair.establish()
    granted = pair.now
    seq = pair.submit([log_op(pair, 1, 1000)])
    pair.collect()
    pair.to_p.clear()                      # the standby is stuck: nothing arrives, nothing is acked
    pair.advance(0.3)
    assert pair.r.in_sync and pair.r.released_through < seq
    pair.advance(0.3)                      # past ack_timeout: degraded, but its lease still runs
    assert not pair.r.in_sync and "no ACK for seq" in (pair.r.degraded or "")
    assert pair.r.released_through < seq
    pair.collect()
    assert any("committing without the standby in" in e for e in pair.events)
    pair.now = granted + 1.0 - 0.01
    pair.advance(0)
    assert pair.r.released_through < seq   # not while a lease it granted may be alive
    pair.advance(0.02)
    assert pair.r.released_through == seq  # alone, now
    assert not pair.p.in_sync(pair.now)    # ... and the standby knows it is not eligible
    for _ in range(30):                    # it falls further behind: the buffer is dropped
        s = pair.submit([log_op(pair, 1, 1000)])
        assert s <= pair.r.released_through  # degraded: commits do not wait
    assert pair.r.lag(pair.now)[0] == 0 and pair.r.need_snapshot
    pair.collect()
    pair.to_p.clear()
    pair.submit([log_op(pair, 1, 1000)])
    pair.collect()
    assert not any(isinstance(decode(f), Batch) for f in pair.to_p)   # no batch while a snapshot is due
    pair.connect()                          # the standby comes back
    pair.pump()
    assert any(e.startswith("snapshot: snapshot of 1 connections") for e in pair.events)
    pair.advance(0.1)
    pair.pump()
    assert pair.r.in_sync and pair.p.in_sync(pair.now) and pair.p.table == pair.model
    seq = pair.submit([log_op(pair, 1)])
    assert pair.r.released_through < seq   # synchronous again


def test_a_reconnect_within_the_buffer_resends_without_degrading():
    pair = Pair()
    pair.establish()
    s1 = pair.submit([log_op(pair, 1)])
    pair.collect()
    pair.to_p.clear()                      # the connection breaks with s1 in flight
    pair.r.disconnected(pair.now)
    s2 = pair.submit([log_op(pair, 1)])
    pair.advance(0.2)                      # shorter than ack_timeout
    assert pair.r.in_sync and pair.r.released_through < s1
    pair.connect()
    pair.pump()
    assert pair.r.in_sync and pair.r.released_through == s2 and pair.p.table == pair.model
    assert not any(e.startswith("degraded") for e in pair.events)
    assert any(e.startswith("resend") for e in pair.events)


def test_a_reconnect_beyond_the_buffer_needs_a_snapshot():
    pair = Pair(max_lag_bytes=5000)
    pair.establish()
    pair.r.disconnected(pair.now)
    pair.advance(0.6)                      # link down past ack_timeout: degraded
    assert not pair.r.in_sync and pair.r.degraded == "sync link down"
    pair.advance(1.0)
    for _ in range(10):
        pair.submit([log_op(pair, 1, 1000)])
    assert pair.r.need_snapshot
    pair.connect()
    pair.pump()
    pair.advance(0.1)
    pair.pump()
    assert any(e.startswith("snapshot: snapshot of") for e in pair.events[2:])
    assert pair.r.in_sync and pair.p.in_sync(pair.now) and pair.p.table == pair.model


def test_a_standby_restarted_empty_gets_a_snapshot():
    pair = Pair()
    pair.establish()
    pair.submit([log_op(pair, 1)])
    pair.pump()
    pair.p = Replica("gw2", epoch=1)       # the standby's process restarted: its table is gone
    pair.connect()
    pair.pump()
    pair.advance(0.1)
    pair.pump()
    assert pair.p.table == pair.model and pair.p.in_sync(pair.now)


def test_a_degraded_active_withdraws_the_lease_of_a_connected_standby():
    pair = Pair(ack_timeout=0.2, lease=0.5)
    pair.establish()
    seq = pair.submit([log_op(pair, 1)])
    pair.collect()
    held = pair.to_p.pop()                 # delayed in the network, not lost
    pair.advance(0.3)
    assert not pair.r.in_sync
    pair.advance(0.5)
    assert pair.r.released_through >= seq   # committed alone
    pair.collect()
    pair.to_p.insert(0, held)
    while pair.to_p:
        pair.deliver_p()
        pair.check_safe()
    assert not pair.p.in_sync(pair.now)


def test_an_old_master_is_refused_and_fenced():
    standby = Replica("gw2", epoch=2)      # it knows epoch 2 (a takeover happened)
    old = Pair(epoch=1, replica=standby)
    old.connect()
    old.pump()
    assert old.r.fenced is not None and "epoch 2" in old.r.fenced
    with pytest.raises(ReplicationError, match="fenced"):
        old.r.submit([log_op(old, 1)], old.now)
    # a batch of epoch 1 reaching it anyway (sent before the old master learnt) is refused
    standby.on_frame(Batch(1, 1, (Record(1, {"evil": True}),), None), 0.0)
    assert standby.table == {} and standby.refused == 1
    assert isinstance(decode(standby.frames_out()[-1]), Epoch)


def test_an_active_meeting_an_active_of_a_newer_epoch_goes_silent():
    a = Replicator("gw1", 1)
    b = Replicator("gw2", 2)
    a.connected(0.0)
    b.connected(0.0)
    for f in a.frames_out(0.0):
        b.on_frame(decode(f), 0.0)
    for f in b.frames_out(0.0):
        a.on_frame(decode(f), 0.0)
    assert a.fenced is not None and b.fenced is None
    assert a.frames_out(0.0) == [] and a.tick(1.0) == []


def test_takeover_then_the_old_master_rejoins_as_standby():
    pair = Pair()
    pair.establish()
    for cid in (1, 2, 3):
        pair.submit([Record(cid, {"c": cid}), log_op(pair, cid), Move(cid, {"m": cid})])
    pair.submit([Forget(2)])
    pair.pump()
    # the active dies; the standby is master within its lease
    pair.now += 0.4
    epoch, table, applied = pair.p.take_over(pair.now)
    assert epoch == 2 and table == pair.model and applied == pair.r.seq
    # the new active carries on; the old one comes back as a standby (its epoch persisted: 1)
    new = Pair(epoch=epoch, replica=Replica("gw1", epoch=1))
    new.r = Replicator("gw2", epoch, start_seq=applied)
    new.model = table
    new.now = pair.now
    new.submit([log_op(new, 1)])
    new.establish()
    assert new.p.table == new.model and new.p.epoch == 2 and new.p.table_epoch == 2


def test_a_standby_out_of_sync_refuses_to_take_over():
    pair = Pair(lease=0.5)
    pair.establish()
    pair.now += 0.6                         # no frame from the active for longer than the lease
    with pytest.raises(ReplicationError, match="not in sync"):
        pair.p.take_over(pair.now)
    epoch, _, _ = pair.p.take_over(pair.now, force=True)
    assert epoch == 2


# ----- random interleavings ------------------------------------------------------------------

def _random_ops(rng: random.Random, model: Table) -> list[Op]:
    ops: list[Op] = []
    for _ in range(rng.randrange(1, 4)):
        cid = rng.randrange(1, 5)
        rc = model.get(cid)
        k = rng.randrange(10)
        if rc is None or k < 2:
            ops.append(Record(cid, {"v": rng.randrange(1000)}))
        elif k < 6:
            end = rc.log_end
            back = rng.randrange(0, min(len(rc.log), 50) + 1)   # overlap what is held
            ops.append(Append(cid, end - back, bytes(rc.log[len(rc.log) - back:]) + rng.randbytes(rng.randrange(200))))
        elif k == 6:
            ops.append(Trim(cid, rng.randrange(rc.log_base, rc.log_end + 1)))
        elif k == 7:
            first = rc.digest_dropped + len(rc.chunks)
            ops.append(Digest(cid, {"kind": "stream", "end": first}, None, first, (H,) * rng.randrange(3),
                              tuple(range(first, first + 0))))
        elif k == 8:
            ops.append(Move(cid, {"d": rng.randrange(99)} if rng.random() < 0.8 else None))
        else:
            ops.append(Forget(cid))
        apply_ops(model, ops[-1:])
    return ops


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["submit", "submit", "deliver", "deliver", "deliver", "ack", "ack", "drop",
                                           "dup", "swap", "reconnect", "tick"]),
                          st.integers(0, 1 << 30)), max_size=80))
def test_random_losses_duplicates_and_reconnects_end_in_sync_and_equal(actions):
    pair = Pair(ack_timeout=0.3, lease=0.5, max_lag_bytes=3000)
    pair.connect()
    rng = random.Random(0)
    for act, n in actions:
        rng.seed(n)
        pair.collect()
        if act == "submit":
            ops = _random_ops(rng, pair.model)
            pair.r.submit(ops, pair.now)
        elif act == "deliver" and pair.to_p:
            pair.deliver_p(n % len(pair.to_p) if n % 4 == 0 else 0)
        elif act == "ack" and pair.to_r:
            pair.deliver_r(n % len(pair.to_r) if n % 4 == 0 else 0)
        elif act == "drop":
            q = pair.to_p if n % 2 else pair.to_r
            if q:
                q.pop(n % len(q))
        elif act == "dup":
            q = pair.to_p if n % 2 else pair.to_r
            if q:
                q.insert(n % (len(q) + 1), q[n % len(q)])
        elif act == "swap" and len(pair.to_p) > 1:
            i = n % (len(pair.to_p) - 1)
            pair.to_p[i], pair.to_p[i + 1] = pair.to_p[i + 1], pair.to_p[i]
        elif act == "reconnect":
            pair.connect()
        elif act == "tick":
            pair.advance((n % 400) / 1000)
        pair.check_safe()
    # the link becomes reliable: everything ends in sync and equal
    pair.connect()
    for _ in range(5):
        pair.pump()
        pair.advance(0.1)
        pair.check_safe()
    pair.pump()
    assert pair.r.in_sync, (pair.r.degraded, pair.events[-5:])
    assert pair.p.in_sync(pair.now), pair.p.why_not(pair.now)
    assert pair.p.table == pair.model
    assert pair.r.released_through == pair.r.seq == pair.p.applied
