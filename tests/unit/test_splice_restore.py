"""checkpoint.splice: a moved connection survives a restart of the gateway (issue 13 item 8).

Sans-I/O, with the conversation, backup and client of ``test_splice``: a move runs to its steady
state; the checkpoint is what the store keeps (the record's ICI and client log as JSON, taken a
while before the restart so it is stale, and the move state); a splice restored from it must then
decide every next segment exactly as the original splice does, and carry the connection to its end
after a downtime that lost whatever was in flight (the backup never sees an acknowledgment of a byte
it did not send, the client never sees the server clock go back, every byte lands at its place).
"""

from __future__ import annotations

import json

import pytest

from checkpoint.ici import ConnectionRecord
from checkpoint.segment import ACK, PSH, RST, Segment
from checkpoint.seqnum import MASK, seq_add
from checkpoint.splice import Decision, Phase, Splice
from checkpoint.state import (
    MoveState, StateError, log_from_state, log_state, move_from_state, move_state, record_from_state, record_state,
)
from checkpoint.tracker import observe

from . import test_splice as conversation
from ._helpers import VIP, VPORT
from .test_splice import (
    ACKED, BACKUP, DATE1, DATE2, MSS, PRIMARY, SENT, Backup, Net, log_client, make_response, rewritten,
)

Checkpoint = tuple[str, str, bytes, str]
LONG = 1_500_000  # a response long enough for a steady state of a few hundred segments


@pytest.fixture(autouse=True)
def long_response(monkeypatch: pytest.MonkeyPatch) -> None:
    """test_splice's client and backup, with a longer response."""
    monkeypatch.setattr(conversation, "RESPONSE_LEN", LONG)
    monkeypatch.setattr(conversation, "RESPONSE", make_response(DATE1, LONG))
    monkeypatch.setattr(conversation, "REGEN", make_response(DATE2, LONG))


def converse(*args: int, **kw: object) -> conversation.Conv:
    return conversation.converse(*args, response=conversation.RESPONSE, **kw)  # type: ignore[arg-type]


def backup(**kw: object) -> Backup:
    return Backup(conversation.REGEN, **kw)  # type: ignore[arg-type]


def whole() -> bytes:
    """What the client must hold in the end: the original up to what it had, then the backup's."""
    return conversation.RESPONSE[:ACKED] + conversation.REGEN[ACKED:]


def checkpoint_of(net: Net) -> Checkpoint:
    """What the disk store holds of the connection now: ICI, client log and move state, as JSON."""
    rec = net.rec
    assert rec.log is not None
    return (json.dumps(record_state(rec)), json.dumps(log_state(rec.log)), bytes(rec.log.data),
            json.dumps(move_state(net.sp.persisted())))


def restored(cp: Checkpoint, now: float) -> tuple[ConnectionRecord, Splice]:
    """A new process reads the checkpoint back and restores the splice."""
    ici, lg, data, mv = cp
    rec = record_from_state(json.loads(ici))
    rec.log = log_from_state(json.loads(lg), data)
    return rec, Splice.restore(rec, rec.log, move_from_state(json.loads(mv)), vip=VIP, vport=VPORT, now=now)


class ShadowNet(Net):
    """The network of test_splice, and a restored splice fed every segment the original is fed
    (tracked into its own restored record the way the data plane does): each decision compared."""

    shadow: tuple[ConnectionRecord, Splice] | None = None
    compared = {"backend": 0, "client": 0}

    def from_backup(self, seg: Segment) -> Decision:
        d2 = None
        if self.shadow is not None:
            rec2, sp2 = self.shadow
            d2 = sp2.on_backend(seg, seg.payload, self.now)
            if d2.forward:
                observe(rec2, rewritten(seg, d2.rewrite), False, self.now)
        d = super().from_backup(seg)
        if d2 is not None:
            assert d2 == d, f"backend segment {seg}: restored {d2}, original {d}"
            self.compared["backend"] += 1
        return d

    def from_client(self, seg: Segment) -> Decision:
        d2 = None
        if self.shadow is not None:
            rec2, sp2 = self.shadow
            observe(rec2, seg, True, self.now)
            log_client(rec2, seg)
            d2 = sp2.on_client(seg, self.now)
        d = super().from_client(seg)
        if d2 is not None:
            assert d2 == d, f"client segment {seg}: restored {d2}, original {d}"
            self.compared["client"] += 1
        return d


ISNS = [
    (1_000_000, 3_000_000_000, 0x6000_0000, 77),
    (MASK - 1000, MASK - 100_000, MASK - 150_000, MASK - 500),  # everything wraps, the backup clock too
]


def steady_net(cisn: int, sisn: int, bisn: int, bts0: int, net_class: type[Net] = Net) -> Net:
    net = net_class(converse(cisn, sisn), backup(isn=bisn, ts0=bts0))
    sp = net.sp
    # the move completes: spliced, everything the client may have had verified, nothing held
    net.run(until=lambda: sp.steady and net.client.stream.end >= SENT + 10 * MSS)
    assert sp.phase is Phase.SPLICED and sp.verifier.done and not sp.pending and not sp.retained
    return net


@pytest.mark.parametrize("cisn,sisn,bisn,bts0", ISNS)
def test_a_restored_splice_decides_every_next_segment_as_the_original(cisn, sisn, bisn, bts0):
    net = steady_net(cisn, sisn, bisn, bts0, ShadowNet)
    assert isinstance(net, ShadowNet)
    cp = checkpoint_of(net)  # the last commit before the restart...
    net.run(until=lambda: net.client.stream.end >= SENT + 300 * MSS)  # ...is stale by 30 segments
    st = move_from_state(json.loads(cp[3]))
    assert st.phase == "spliced" and (st.seq_delta, st.ts_delta) == (net.sp.tr.seq_delta, net.sp.tr.ts_delta)
    assert (st.backend_isn, st.backend_wscale, st.verified_to) == (bisn, net.sp.b_wscale, SENT)
    rec2, sp2 = restored(cp, net.now)
    assert sp2.phase is Phase.SPLICED and sp2.verifier.done and sp2.steady and sp2.tr == net.sp.tr
    assert sp2.client_acked < net.sp.client_acked  # the record is behind the wire: re-learned from it
    net.shadow = (rec2, sp2)
    net.compared = {"backend": 0, "client": 0}
    # the client speaks first (acknowledging what it holds, past what the restored record knows the
    # backup sent): passed on with the same acknowledgment, not clamped
    d = net.from_client(net.client.ack(net.now))
    assert d.forward and d.rewrite is not None and d.rewrite.ack == seq_add(net.sp.b_base, net.client.rcv_nxt())
    net.run()
    assert net.done()
    assert net.compared["backend"] > 50 and net.compared["client"] > 50
    assert bytes(net.client.stream.data) == whole()
    assert sp2.b_fin_end == net.sp.b_fin_end == LONG + 1
    assert sp2.persisted() == net.sp.persisted()  # the backup's FIN: the same state to write again


@pytest.mark.parametrize("cisn,sisn,bisn,bts0", ISNS)
def test_a_restored_splice_carries_the_connection_on_after_a_downtime(cisn, sisn, bisn, bts0):
    net = steady_net(cisn, sisn, bisn, bts0)
    cp = checkpoint_of(net)
    net.run(until=lambda: net.client.stream.end >= SENT + 300 * MSS)
    old = net.sp
    # the gateway dies: what is in flight is lost; half a second later a new process restores
    net.q.clear()
    net.now += 0.5
    rec2, sp2 = restored(cp, net.now)
    net.sp, net.rec = sp2, rec2
    forwarded_before = len(net.forwarded)
    net.run()  # the backup's retransmission timer brings it back, from its oldest unacknowledged byte
    assert net.done() and sp2.phase is Phase.SPLICED and sp2.reason is None
    # every byte at its place (Client.receive checks each), the backup never acknowledged beyond
    # what it sent (Backup.on asserts it: I6), the server clock never went back (I3, Client)
    assert bytes(net.client.stream.data) == whole()
    assert net.backup.snd_una == net.backup.total
    after = net.forwarded[forwarded_before:]
    assert after and all(fw.seq == seq_add(seg.seq, old.tr.seq_delta) for seg, fw in after)
    assert not sp2.relearn and sp2.stats["restored"] == 1


def test_a_restored_splice_without_timestamps():
    conv = converse(ts=False)
    net = Net(conv, backup(ts=False))
    net.run(until=lambda: net.sp.steady and net.client.stream.end >= SENT + 10 * MSS)
    cp = checkpoint_of(net)
    net.q.clear()
    net.now += 0.3
    net.sp, net.rec = restored(cp, net.now)[::-1]
    net.run()
    assert net.done() and bytes(net.client.stream.data) == whole()
    assert move_from_state(json.loads(cp[3])).backend_ts_first is None


def test_a_move_under_way_is_persisted_as_such_and_never_restored():
    net = Net(converse())
    sp = net.sp
    net.run(until=lambda: sp.phase is Phase.REPLAYING)
    st = sp.persisted()
    assert st == MoveState("moving", (PRIMARY.name, PRIMARY.ip, PRIMARY.port), (BACKUP.name, BACKUP.ip, BACKUP.port))
    assert move_state(st) == {"version": 1, "phase": "moving", "from": {"name": "primary", "ip": "10.0.0.2",
                                                                        "port": 8080},
                              "to": {"name": "backup", "ip": "10.0.0.3", "port": 8080}}
    # spliced, but the gateway still holds and delivers backup bytes the client lacks: not steady
    net.run(until=lambda: sp.phase is Phase.SPLICED)
    assert not sp.steady and sp.persisted().phase == "moving"
    with pytest.raises(ValueError, match="under way"):
        Splice.restore(net.rec, net.rec.log, st, vip=VIP, vport=VPORT, now=net.now)


def test_a_backup_implausibly_far_after_the_restart_fails_closed():
    net = steady_net(*ISNS[0])
    rec2, sp2 = restored(checkpoint_of(net), net.now)
    b = net.backup
    far = Segment(BACKUP.ip, "192.0.2.10", BACKUP.port, 40000, seq_add(sp2.b_base, sp2.verifier.end + (1 << 30)),
                  b.rcv_nxt(), ACK | PSH, 1024, b"x" * 100, b.opts(net.now))
    d = sp2.on_backend(far, far.payload, net.now)
    assert not d.forward and sp2.phase is Phase.FAILED and "2**30" in (sp2.reason or "")
    assert {o.to for o in d.inject if o.flags & RST} == {"client", "backend"}


def test_move_state_is_read_strictly():
    net = steady_net(*ISNS[0])
    d = move_state(net.sp.persisted())
    assert move_from_state(json.loads(json.dumps(d))) == net.sp.persisted()
    for bad, field in [({**d, "version": 2}, "move.version"), ({**d, "extra": 1}, "move.extra"),
                       ({k: v for k, v in d.items() if k != "seq_delta"}, "move.seq_delta"),
                       ({**d, "seq_delta": 1 << 32}, "move.seq_delta"), ({**d, "backend_wscale": 15}, "move.backend_wscale"),
                       ({**d, "to": {"name": "b", "ip": "x"}}, "move.to.port"), ({**d, "phase": "gone"}, "move.phase")]:
        with pytest.raises(StateError) as exc:
            move_from_state(bad)
        assert exc.value.field == field
