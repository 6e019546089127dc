"""The role of one gateway of the pair (appliance/pairrole.py, issue 13), sans-I/O: every input
with a made-up monotonic clock, every action checked; then random interleavings of inputs
(a hypothesis state machine driven as the driver, appliance/pairctl.py, drives it) against the
safety rules the module's theory of operation states."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from appliance.pairrole import (
    Action,
    ClearAlone,
    Event,
    Fence,
    MarkAlone,
    PairRole,
    Role,
    SetEligible,
    TakeOver,
    next_epoch,
)

LEASE = 1.0
SYNC_LEASE = 1.5   # the state machine below runs the two leases apart
T0 = 1000.0   # the monotonic clock at start (any value: only differences count)


def of(actions: list[Action], kind: type) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def events(actions: list[Action]) -> list[str]:
    return [a.kind for a in actions if isinstance(a, Event)]


def eligibility(actions: list[Action]) -> list[bool]:
    return [a.eligible for a in actions if isinstance(a, SetEligible)]


def takeover_epoch(actions: list[Action]) -> int:
    (t,) = of(actions, TakeOver)
    return int(t.epoch)


def standby(node: int = 1, epoch: int = 0, now: float = T0) -> PairRole:
    r = PairRole(node, epoch, LEASE, now)
    assert r.start(now) == [SetEligible(False, "starting: not checked yet")]  # FAULT until the first check
    assert r.eligible is False and not r.in_sync(now)
    return r


def in_sync_standby(node: int = 1, epoch: int = 0, now: float = T0, peer_epoch: int | None = None) -> PairRole:
    r = standby(node, epoch, now)
    acts = r.checked_sync(now, True, None, now, peer_epoch)
    assert eligibility(acts) == [True] and events(acts) == ["in-sync"]
    return r


def active(node: int = 1, epoch: int = 0, now: float = T0, peer_epoch: int | None = None) -> tuple[PairRole, int]:
    """A node that took over at ``now`` (keepalived's MASTER, the takeover done at once)."""
    r = in_sync_standby(node, epoch, now, peer_epoch)
    e = takeover_epoch(r.vrrp_state("MASTER", now))
    assert r.role is Role.TAKING_OVER
    r.took_over(e, now, 3)
    assert r.role is Role.ACTIVE and r.epoch == e
    return r, e


def synced_active(now: float = T0) -> PairRole:
    """An active whose takeover alone mark was cleared: replication synchronous again."""
    r, _ = active(now=now)
    assert of(r.committed(now, True, now), ClearAlone)
    r.alone_cleared(True, now)
    assert r.alone_since is None and r.release_at() is None
    return r


# --- epochs --------------------------------------------------------------------------------

@pytest.mark.parametrize("known", [0, 1, 2, 3, 10, 11, 1_000_001])
def test_next_epoch_is_above_known_and_of_the_nodes_parity(known: int) -> None:
    e1, e2 = next_epoch(known, 1), next_epoch(known, 2)
    assert e1 % 2 == 1 and e2 % 2 == 0
    assert known < e1 <= known + 2 and known < e2 <= known + 2
    assert e1 != e2
    # the smallest such: the one below it is known, or of the other parity
    assert e1 - 1 == known or (e1 - 1) % 2 == 0
    assert e2 - 1 == known or (e2 - 1) % 2 == 1


def test_node_must_be_1_or_2() -> None:
    for node in (0, 3, -1):
        with pytest.raises(ValueError):
            PairRole(node, 0, LEASE, T0)


# --- the standby: first check, MASTER, refusing ---------------------------------------------

def test_a_node_starts_ineligible_and_stays_so_until_a_check_passes() -> None:
    """Started ineligible (keepalived's FAULT: it learns keepalived's state from what follows);
    nothing more is written until a check answers, and a failing one changes nothing."""
    r = standby()
    assert r.tick(T0 + 5) == [] and r.vrrp_state("BACKUP", T0 + 5) == [] and r.tick(T0 + 6) == []
    assert r.eligible is False and not r.status(T0 + 6)["eligible"]
    acts = r.checked_sync(T0 + 6, False, "the peer's store is out of reach", T0 + 6.1)
    assert eligibility(acts) == [] and events(acts) == ["out-of-sync"]
    acts = r.checked_sync(T0 + 6.2, True, None, T0 + 6.3)
    assert eligibility(acts) == [True] and events(acts) == ["in-sync"]


@pytest.mark.parametrize("node", [1, 2])
def test_master_before_the_first_check_waits_then_takes_over_above_every_known_epoch(node: int) -> None:
    r = standby(node, epoch=4)
    assert r.vrrp_state("MASTER", T0 + 0.01) == []       # pending: no refusal, no takeover yet
    assert r.pending_master and r.role is Role.STANDBY
    acts = r.checked_sync(T0 + 0.02, True, None, T0 + 0.05, peer_epoch=9)
    assert events(acts) == ["in-sync"] and eligibility(acts) == [True]
    e = takeover_epoch(acts)
    assert e % 2 == node % 2 and e > 9 and e > 4
    assert e == next_epoch(9, node)
    assert r.role is Role.TAKING_OVER and not r.pending_master
    assert not r.forwarding(T0 + 0.05)                  # nothing forwarded before the takeover is done


def test_master_before_a_failing_first_check_is_refused() -> None:
    r = standby()
    assert r.vrrp_state("MASTER", T0) == []
    acts = r.checked_sync(T0, False, "the replication link is down", T0 + 0.01)
    assert not of(acts, TakeOver)
    assert eligibility(acts) and not any(eligibility(acts))   # keepalived must give the role up
    assert "refused" in events(acts) and "out-of-sync" in events(acts)
    assert any("the replication link is down" in a.message for a in of(acts, Event))
    assert r.role is Role.STANDBY and r.eligible is False
    # keepalived gives the role up (FAULT); a later passing check makes the node eligible again,
    # and only keepalived's next MASTER starts a takeover
    r.vrrp_state("FAULT", T0 + 0.02)
    acts = r.checked_sync(T0 + 0.1, True, None, T0 + 0.1)
    assert eligibility(acts) == [True] and not of(acts, TakeOver)
    assert of(r.vrrp_state("MASTER", T0 + 0.2), TakeOver)


def test_a_refused_pending_master_is_forgotten() -> None:
    """MASTER before the first check, the first check fails: refused.  Before keepalived's FAULT
    is read (the next check comes 50 ms later), the node must neither refuse again at every check
    nor take over when a check passes: it refused that MASTER."""
    r = standby()
    r.vrrp_state("MASTER", T0)
    assert "refused" in events(r.checked_sync(T0, False, "the table is being built", T0 + 0.01))
    assert r.checked_sync(T0 + 0.05, False, "the table is being built", T0 + 0.06) == []   # got: refused again
    acts = r.checked_sync(T0 + 0.1, True, None, T0 + 0.11)
    assert not of(acts, TakeOver)                        # got: TakeOver, the refused MASTER taken after all


def test_master_then_backup_before_the_first_check_forgets_the_master() -> None:
    r = standby()
    r.vrrp_state("MASTER", T0)
    r.vrrp_state("BACKUP", T0 + 0.01)
    acts = r.checked_sync(T0, True, None, T0 + 0.02)
    assert not of(acts, TakeOver) and r.role is Role.STANDBY


def test_master_while_in_sync_takes_over() -> None:
    r = in_sync_standby(node=2, epoch=6, peer_epoch=7)
    acts = r.vrrp_state("MASTER", T0 + 0.5)
    assert takeover_epoch(acts) == 8
    assert r.role is Role.TAKING_OVER and r.eligible is True


def test_master_while_out_of_sync_is_refused() -> None:
    r = in_sync_standby()
    acts = r.vrrp_state("MASTER", T0 + LEASE)           # the lease of the check ran out, no tick came
    assert not of(acts, TakeOver)
    assert eligibility(acts) == [False] and events(acts) == ["refused"]
    assert r.role is Role.STANDBY


def test_master_after_a_failing_check_is_refused() -> None:
    r = standby()
    r.checked_sync(T0, False, "the table is being built", T0)
    acts = r.vrrp_state("MASTER", T0 + 0.1)
    assert not of(acts, TakeOver) and "refused" in events(acts)
    assert any("the table is being built" in a.message for a in of(acts, Event))


# --- eligibility follows the checks ---------------------------------------------------------

def test_an_ok_check_keeps_the_standby_eligible_for_a_lease_from_when_it_began() -> None:
    r = standby()
    sent = T0 + 0.3
    assert eligibility(r.checked_sync(sent, True, None, sent + 0.1)) == [True]
    assert r.tick(sent + LEASE - 0.001) == []              # still in sync: nothing emitted
    assert r.in_sync(sent + LEASE - 0.001)
    acts = r.tick(sent + LEASE)                            # measured from the check's start
    assert eligibility(acts) == [False] and events(acts) == ["out-of-sync"]
    assert not r.in_sync(sent + LEASE)
    assert r.tick(sent + LEASE + 0.5) == []               # emitted on change only


def test_a_failing_check_does_not_extend_the_lease() -> None:
    r = standby()
    r.checked_sync(T0, True, None, T0)
    acts = r.checked_sync(T0 + 0.5, False, "the active commits alone", T0 + 0.6)
    assert eligibility(acts) == []                        # no change yet
    acts = r.tick(T0 + LEASE)                              # the ok check's lease, not the failing one's
    assert eligibility(acts) == [False]
    assert any("the active commits alone" in a.message for a in of(acts, Event))


def test_eligibility_is_emitted_only_on_change() -> None:
    r = standby()
    assert eligibility(r.checked_sync(T0, True, None, T0)) == [True]
    for i in range(1, 5):                                  # checks every 0.2 s: always in sync
        t = T0 + 0.2 * i
        assert r.checked_sync(t, True, None, t) == []
        assert r.tick(t + 0.1) == []
    # and the lease runs from the last ok check
    assert r.tick(T0 + 0.8 + LEASE - 0.01) == []
    assert eligibility(r.tick(T0 + 0.8 + LEASE)) == [False]
    assert r.tick(T0 + 5) == []
    assert eligibility(r.checked_sync(T0 + 5, False, "link down", T0 + 5)) == []
    assert eligibility(r.checked_sync(T0 + 5.1, True, None, T0 + 5.1)) == [True]


def test_an_old_ok_check_answering_late_does_not_shorten_a_newer_one() -> None:
    r = standby()
    r.checked_sync(T0 + 0.5, True, None, T0 + 0.5)
    r.checked_sync(T0, True, None, T0 + 0.6)               # began earlier, answered later
    assert r.in_sync(T0 + 0.5 + LEASE - 0.01)


def test_an_ok_check_that_answers_after_its_lease_does_not_make_the_node_eligible() -> None:
    r = standby()
    acts = r.checked_sync(T0, True, None, T0 + LEASE + 0.1)
    assert eligibility(acts) == [] and events(acts) == ["out-of-sync"]  # ineligible since its start
    assert not r.eligible and not r.in_sync(T0 + LEASE + 0.1)
    assert not of(r.vrrp_state("MASTER", T0 + LEASE + 0.1), TakeOver)


# --- the active: forwarding and its proof ---------------------------------------------------

def test_took_over_is_active_eligible_and_forwards_while_master_with_proof() -> None:
    r = in_sync_standby()
    e = takeover_epoch(r.vrrp_state("MASTER", T0))
    assert not r.forwarding(T0)                           # taking over: the queues hold the packets
    acts = r.took_over(e, T0 + 0.05, 7)
    assert events(acts) == ["takeover"] and not of(acts, SetEligible)  # eligible already (taking over)
    assert r.role is Role.ACTIVE and r.eligible is True
    assert r.forwarding(T0 + 0.05) and r.forwarding(T0 + 0.05 + LEASE - 0.01)
    assert r.last_takeover is not None and r.last_takeover["epoch"] == e
    assert r.last_takeover["connections"] == 7 and r.last_takeover["duration_ms"] == pytest.approx(50, abs=0.2)
    st_ = r.status(T0 + 0.1)
    assert st_["role"] == "active" and st_["forwarding"] and st_["epoch"] == e and st_["eligible"]


def test_forwarding_stops_on_backup_and_resumes_on_master_with_fresh_proof() -> None:
    r = synced_active()
    assert r.forwarding(T0 + 0.1)
    acts = r.vrrp_state("BACKUP", T0 + 0.1)
    assert events(acts) == ["replication"]
    assert not r.forwarding(T0 + 0.1) and r.role is Role.ACTIVE
    r.vrrp_state("MASTER", T0 + 0.2)
    assert r.forwarding(T0 + 0.2)                          # the takeover's proof still holds
    r.vrrp_state("FAULT", T0 + 0.3)
    assert not r.forwarding(T0 + 0.3)
    r.peer_checked(T0 + 0.9, r.epoch, T0 + 0.95)           # proof renewed while not master
    r.vrrp_state("MASTER", T0 + 1.5)
    assert r.forwarding(T0 + 1.5)
    assert not r.forwarding(T0 + 0.9 + LEASE)


def test_master_again_with_stale_proof_does_not_forward() -> None:
    r = synced_active()
    r.vrrp_state("BACKUP", T0 + 0.1)
    r.vrrp_state("MASTER", T0 + LEASE + 0.1)
    assert not r.forwarding(T0 + LEASE + 0.1)


def test_a_frozen_and_thawed_active_forwards_nothing_until_the_peer_is_checked() -> None:
    r = synced_active()
    t = T0 + 10                                            # thawed, ten leases later
    assert not r.forwarding(t)
    assert r.tick(t) == []                                  # time alone changes nothing but the proof
    assert r.peer_checked(t, r.epoch, t + 0.01) == []        # the peer's epoch is not above this node's
    assert r.forwarding(t + 0.01) and r.forwarding(t + LEASE - 0.01) and not r.forwarding(t + LEASE)
    # an older epoch on the peer proves the role too
    r.peer_checked(t + 2, r.epoch - 1, t + 2)
    assert r.forwarding(t + 2)


def test_an_alone_active_thawed_with_the_peer_last_seen_out_of_reach_forwards_at_once() -> None:
    """What the role does today (see the report): the peer's reachability has no age, so an
    active alone for a lease whose last peer check failed forwards right after a freeze, before
    the peer is checked again.  Safe as long as its store's alone flag stays set (no standby can
    be in sync, so none took over); the theory of operation's 'a node frozen and thawed forwards
    nothing until the driver has checked the peer' is about the proof only."""
    r = synced_active()
    r.peer_checked(T0 + 0.5, None, T0 + 0.5)
    r.alone_marked(True, T0 + 0.6, "the peer's store is out of reach")
    assert r.forwarding(T0 + 100)
    r.peer_checked(T0 + 100, r.epoch + 1, T0 + 100.01)     # the first check after the thaw fences it
    assert not r.forwarding(T0 + 100.01) and r.role is Role.FENCED


def test_an_acked_commit_is_no_proof_of_the_role() -> None:
    """The standby's store cannot tell when it acknowledged a commit, so a takeover could not wait
    out a proof drawn from one: only grants (peer_checked) prove the role."""
    r = synced_active()
    r.committed(T0 + 3, True, T0 + 3.2)
    assert not r.forwarding(T0 + 3.2)
    r.peer_checked(T0 + 3.3, r.epoch, T0 + 3.4)
    assert r.forwarding(T0 + 3.4) and not r.forwarding(T0 + 3.3 + LEASE)


# --- a takeover waits out the former active's proof -----------------------------------------

@pytest.mark.parametrize("granted_ago, hold", [(None, LEASE), (0.0, LEASE), (0.3, LEASE - 0.3), (LEASE, 0.0),
                                               (5.0, 0.0)])
def test_a_takeover_forwards_only_a_lease_after_the_stores_last_grant(granted_ago: float | None,
                                                                     hold: float) -> None:
    r = in_sync_standby()
    e = takeover_epoch(r.vrrp_state("MASTER", T0))
    assert r.promoted(granted_ago, T0 + 0.01) == pytest.approx(hold)
    r.took_over(e, T0 + 0.02, 1)                          # (a driver that did not wait: still held)
    assert r.role is Role.ACTIVE
    if hold > 0.02:
        assert not r.forwarding(T0 + 0.01 + hold - 0.005)
    assert r.forwarding(T0 + 0.01 + hold)


@settings(max_examples=300, deadline=None)
@given(asked_before=st.floats(0, 0.5), grant_to_freeze=st.floats(0, 2), detect=st.floats(0, 2),
       reply=st.floats(0, 0.2), thaw=st.floats(0, 5))
def test_a_thawed_former_active_never_forwards_while_the_new_one_does(
        asked_before: float, grant_to_freeze: float, detect: float, reply: float, thaw: float) -> None:
    """Two nodes on one time line: the old active asks for a grant at ``g - asked_before``, the
    peer's store stamps it at ``g`` and the answer arrives ``reply`` later; the old node freezes
    ``grant_to_freeze`` after the grant, the peer promotes ``detect`` after the freeze, and the
    old node thaws ``thaw`` after the promotion.  Whatever the timing, the old node's last instant
    of forwarding comes before the new node's first (no frame from both at once)."""
    old = synced_active()
    g = T0 + 5
    sent = g - asked_before
    old.peer_checked(sent, old.epoch, g + reply)
    freeze = g + grant_to_freeze
    promote = freeze + detect
    new = in_sync_standby(node=2, epoch=old.epoch, now=promote - 0.01)
    e = takeover_epoch(new.vrrp_state("MASTER", promote))
    new.promoted(promote - g, promote)
    new.took_over(e, promote + 0.005, 1)
    first_new = max(promote + 0.005, new.forward_not_before)
    assert new.forwarding(first_new)
    # the old node forwards at most until its proof runs out, and not while frozen
    last_old = old.proof_until
    assert not old.forwarding(last_old)
    assert last_old <= first_new
    assert not old.forwarding(max(promote + thaw, first_new))


def test_a_newer_epoch_on_the_peer_fences_the_active() -> None:
    r = synced_active()
    t = T0 + 10
    acts = r.peer_checked(t, r.epoch + 1, t + 0.01)
    assert len(of(acts, Fence)) == 1 and "fenced" in events(acts)
    assert eligibility(acts) == [False]
    assert r.role is Role.FENCED and r.eligible is False
    assert not r.forwarding(t + 0.01)
    r.vrrp_state("MASTER", t + 0.02)                        # keepalived's MASTER changes nothing
    assert not r.forwarding(t + 0.02) and r.role is Role.FENCED
    assert not r.may_release(True, t + 0.02) and not r.may_release(False, t + 5)
    assert r.fence("again", t + 0.03) == []                 # fenced once
    assert r.known_epoch == r.epoch + 1
    st_ = r.status(t + 0.03)
    assert st_["role"] == "fenced" and st_["fenced_reason"] and not st_["forwarding"]
    # rejoining: a standby, ineligible until a check passes
    acts = r.demoted(t + 1)
    assert r.role is Role.STANDBY and not of(acts, SetEligible) and r.eligible is False
    assert not r.in_sync(t + 1)
    assert r.tick(t + 1.1) == []
    assert not of(r.vrrp_state("MASTER", t + 1.2), TakeOver)   # refused
    r.vrrp_state("BACKUP", t + 1.3)
    assert eligibility(r.checked_sync(t + 1.4, True, None, t + 1.4)) == [True]
    e = takeover_epoch(r.vrrp_state("MASTER", t + 1.5))
    assert e > r.epoch + 1 and e % 2 == 1


def test_a_fresh_proof_does_not_save_an_active_from_a_newer_epoch() -> None:
    r = synced_active()
    assert r.forwarding(T0 + 0.1)
    acts = r.peer_checked(T0 + 0.1, r.epoch + 2, T0 + 0.1)
    assert of(acts, Fence) and not r.forwarding(T0 + 0.1)


def test_fence_while_taking_over_and_demoted_only_when_fenced() -> None:
    r = in_sync_standby()
    r.vrrp_state("MASTER", T0)
    acts = r.fence("the store refused the promotion: FENCED", T0 + 0.01)
    assert of(acts, Fence) and r.role is Role.FENCED and eligibility(acts) == [False]
    s = in_sync_standby()
    assert s.fence("whatever", T0) == [] and s.role is Role.STANDBY
    assert s.demoted(T0) == [] and s.in_sync(T0)            # a standby is not demoted again


def test_takeover_failed_goes_back_to_an_ineligible_standby() -> None:
    r = in_sync_standby()
    r.vrrp_state("MASTER", T0)
    acts = r.takeover_failed("promote: connection refused", T0 + 0.1)
    assert r.role is Role.STANDBY and eligibility(acts) == [False] and "refused" in events(acts)
    assert not r.in_sync(T0 + 0.1)                           # the earlier check no longer counts
    assert eligibility(r.checked_sync(T0 + 0.2, True, None, T0 + 0.2)) == [True]


def test_a_standby_ignores_the_actives_inputs() -> None:
    r = in_sync_standby()
    assert r.committed(T0, False, T0) == [] and r.committed(T0, True, T0) == []
    assert r.peer_checked(T0, None, T0) == []
    assert not r.may_release(True, T0) and not r.forwarding(T0)


# --- committing alone -----------------------------------------------------------------------

def test_after_a_takeover_the_node_is_alone_at_once() -> None:
    """The theory of operation: 'A takeover marks the new active's store alone at once: no
    standby exists that could have seen that store's flag clear.'"""
    r, _ = active()
    assert r.alone_since is not None and r.status(T0)["alone"]
    assert r.may_release(False, T0)                         # no lease to wait
    assert r.may_release(True, T0)
    # and a commit not acknowledged does not mark it again (it is marked already)
    assert not of(r.committed(T0 + 0.1, False, T0 + 0.3), MarkAlone)


def test_an_unacked_commit_marks_alone_once_and_releases_a_lease_after_the_mark() -> None:
    r = synced_active()
    assert r.may_release(True, T0 + 0.5) and not r.may_release(False, T0 + 0.5)
    acts = r.committed(T0 + 0.5, False, T0 + 0.7)
    assert len(of(acts, MarkAlone)) == 1
    # not repeated while the mark is being stored
    assert r.committed(T0 + 0.7, False, T0 + 0.9) == []
    assert r.peer_checked(T0 + 0.8, None, T0 + 0.9) == []
    assert not r.may_release(False, T0 + 0.9) and r.release_at() is None
    # an acknowledged commit while marking: no clear (the mark is on its way)
    assert not of(r.committed(T0 + 0.9, True, T0 + 0.95), ClearAlone)
    mark = T0 + 1.0
    acts = r.alone_marked(True, mark, "the standby did not acknowledge a commit")
    assert events(acts) == ["degraded"]
    assert r.release_at() == mark + LEASE
    assert not r.may_release(False, mark) and not r.may_release(False, mark + LEASE - 0.001)
    assert r.may_release(False, mark + LEASE) and r.may_release(False, mark + 5)
    assert r.may_release(True, mark)                        # acknowledged batches are never held
    st_ = r.status(mark)
    assert st_["alone"] and st_["alone_reason"] == "the standby did not acknowledge a commit"
    # alone: no more marks
    assert r.committed(mark + 2, False, mark + 2.1) == []


def test_a_failed_mark_releases_nothing_and_the_next_unacked_commit_marks_again() -> None:
    r = synced_active()
    assert of(r.committed(T0 + 0.5, False, T0 + 0.7), MarkAlone)
    assert r.alone_marked(False, T0 + 0.8) == []
    assert r.alone_since is None and not r.may_release(False, T0 + 10)
    assert of(r.committed(T0 + 1, False, T0 + 1.2), MarkAlone)


def test_an_acked_commit_while_alone_clears_the_flag() -> None:
    r = synced_active()
    r.committed(T0 + 0.5, False, T0 + 0.7)
    r.alone_marked(True, T0 + 0.8, "the standby did not acknowledge a commit")
    acts = r.committed(T0 + 3, True, T0 + 3.01)
    assert of(acts, ClearAlone) and not of(acts, MarkAlone)
    acts = r.alone_cleared(True, T0 + 3.02)
    assert events(acts) == ["in-sync"]
    assert r.alone_since is None and not r.status(T0 + 3.02)["alone"]
    assert not r.may_release(False, T0 + 10)
    assert r.alone_cleared(True, T0 + 3.03) == []                 # cleared once
    # degraded again: marks again, and waits a lease again
    assert of(r.committed(T0 + 4, False, T0 + 4.2), MarkAlone)
    r.alone_marked(True, T0 + 4.3, "again")
    assert not r.may_release(False, T0 + 4.3 + LEASE - 0.01) and r.may_release(False, T0 + 4.3 + LEASE)


# --- the peer out of reach ------------------------------------------------------------------

def test_the_peer_out_of_reach_marks_the_active_alone() -> None:
    r = synced_active()
    acts = r.peer_checked(T0 + 0.5, None, T0 + 0.7)
    assert [type(a) for a in acts] == [MarkAlone]
    assert r.peer_reachable is False
    assert r.peer_checked(T0 + 0.7, None, T0 + 0.8) == []   # marking: not again


def test_alone_for_a_lease_with_the_peer_out_of_reach_forwards_without_proof_while_master() -> None:
    r = synced_active()
    r.peer_checked(T0 + 0.5, None, T0 + 0.7)
    mark = T0 + 0.8
    r.alone_marked(True, mark, "the peer's store is out of reach")
    t = mark + LEASE - 0.001
    r.peer_checked(t, None, t)
    assert r.proof_until < t and not r.forwarding(t)         # alone, but not for a lease yet
    t = mark + LEASE + 5                                      # no proof for long: only the alone path
    assert r.proof_until < t and r.forwarding(t)
    r.vrrp_state("BACKUP", t)
    assert not r.forwarding(t)
    r.vrrp_state("MASTER", t + 0.1)
    assert r.forwarding(t + 0.1)
    # the peer back: the proof rules again (its epoch is not newer: a proof)
    r.peer_checked(t + 0.2, r.epoch, t + 0.2)
    assert r.peer_reachable is True and r.forwarding(t + 0.2)
    assert not r.forwarding(t + 0.2 + LEASE)                 # reachable and no newer proof


def test_after_a_takeover_with_the_peer_out_of_reach_the_active_forwards_without_proof() -> None:
    r, _ = active()
    t = T0 + 5
    assert not r.forwarding(t)                                # peer not checked yet: no proof
    assert r.peer_checked(t, None, t) == []                   # alone already: no new mark
    assert r.forwarding(t)


# --- suspected bugs (see the report): the behaviour the theory of operation asks for ---------

def test_no_unacked_release_once_the_alone_flag_is_being_cleared() -> None:
    """ClearAlone sets the store's flag to 0; a standby check that reads it then is in sync for a
    lease.  A batch the standby did not acknowledge, released after that, can be missing on the
    standby when it takes over.  So from ClearAlone on, only acknowledged batches may go."""
    r = synced_active()
    r.committed(T0 + 0.5, False, T0 + 0.7)
    r.alone_marked(True, T0 + 0.8, "the standby did not acknowledge a commit")
    assert of(r.committed(T0 + 3, True, T0 + 3.01), ClearAlone)   # the driver runs SET repl:alone 0
    # the next batch (committed with WAIT 1 ms while alone) not acknowledged, before alone_cleared
    r.committed(T0 + 3.02, False, T0 + 3.03)
    assert not r.may_release(False, T0 + 3.03)


def test_took_over_below_a_known_epoch_does_not_forward() -> None:
    """Both nodes made master (fresh pair, VRRP split): node 1 takes epoch 1; its sync check in
    flight answers with the peer's epoch 2 while it is taking over.  'The active forwards only
    while it has a fresh proof that no newer epoch owns the connections'."""
    r = in_sync_standby(node=1)
    e = takeover_epoch(r.vrrp_state("MASTER", T0))
    assert e == 1
    r.checked_sync(T0, True, None, T0 + 0.01, peer_epoch=2)
    assert r.known_epoch == 2
    r.took_over(e, T0 + 0.02, 0)
    assert not r.forwarding(T0 + 0.02)


def test_a_takeover_done_after_a_fence_does_not_make_the_node_active() -> None:
    r = in_sync_standby()
    e = takeover_epoch(r.vrrp_state("MASTER", T0))
    assert of(r.fence("the store refused the promotion: FENCED", T0 + 0.01), Fence)
    r.took_over(e, T0 + 0.02, 0)                # the takeover task, already under way, completes
    assert r.role is not Role.ACTIVE and not r.forwarding(T0 + 0.02)


# --- random interleavings -------------------------------------------------------------------

DT = st.sampled_from([0.0, 0.001, 0.05, 0.3, LEASE - 0.001, LEASE, LEASE + 0.001, SYNC_LEASE - 0.001, SYNC_LEASE,
                      SYNC_LEASE + 0.001, 2.5])
AGE = st.sampled_from([0.0, 0.01, 0.5, LEASE - 0.001, LEASE, SYNC_LEASE - 0.001, SYNC_LEASE, 1.5 * SYNC_LEASE])
EPOCH = st.integers(0, 8) | st.integers(0, 40)


class PairRoleMachine(RuleBasedStateMachine):
    """One node's role driven as pairctl drives it: the answers to its actions (took_over,
    alone_marked, alone_cleared, demoted) come only after the action, possibly late and
    interleaved with anything else; the other inputs come at any time."""

    def __init__(self) -> None:
        super().__init__()
        self.r: PairRole = PairRole(1, 0, LEASE, T0, SYNC_LEASE)
        self.now = T0
        self.max_epoch_in = 0
        self.takeover: int | None = None      # a TakeOver being carried out (its epoch)
        self.fence_pending = False
        self.marks = 0                        # MarkAlone being stored
        self.clears = 0                       # ClearAlone being carried out
        # the alone mark, as seen from outside: "takeover", when alone_marked stored it, or None
        self.alone: str | float | None = None

    @initialize(node=st.sampled_from([1, 2]), epoch=EPOCH, start=st.sampled_from(["standby", "active", "synced"]))
    def init(self, node: int, epoch: int, start: str) -> None:
        """A node just started, or (to reach the active's states often) one brought to the
        active role by the same inputs: an ok check, MASTER, the takeover done; "synced": then
        an acknowledged commit cleared the takeover's alone mark."""
        self.r = PairRole(node, epoch, LEASE, self.now, SYNC_LEASE)
        self.max_epoch_in = epoch
        self.feed(self.r.start(self.now))
        if start != "standby":
            self.checked_sync(0.0, True, None)
            self.vrrp("MASTER")
            self.takeover_done(True, 1)
            assert self.r.role is Role.ACTIVE
        if start == "synced":
            self.committed(0.0, True)
            self.alone_cleared()
            assert self.alone is None

    def feed(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, TakeOver):
                assert a.epoch > self.max_epoch_in, (a.epoch, self.max_epoch_in)
                assert a.epoch % 2 == self.r.node % 2
                assert self.takeover is None
                self.takeover = a.epoch
            elif isinstance(a, Fence):
                self.fence_pending = True
                self.alone = None
            elif isinstance(a, MarkAlone):
                self.marks += 1
            elif isinstance(a, ClearAlone):
                self.clears += 1
        assert self.r.role is not Role.FENCED or self.r.eligible is False
        assert self.r.role not in (Role.ACTIVE, Role.TAKING_OVER) or self.r.eligible is True

    def saw(self, epoch: int | None) -> None:
        if epoch is not None:
            self.max_epoch_in = max(self.max_epoch_in, epoch)

    @rule(dt=DT)
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule()
    def tick(self) -> None:
        self.feed(self.r.tick(self.now))

    @rule(state=st.sampled_from(["MASTER", "BACKUP", "FAULT", "STOP"]))
    def vrrp(self, state: str) -> None:
        self.feed(self.r.vrrp_state(state, self.now))

    @rule(age=AGE, ok=st.booleans(), peer=st.none() | EPOCH)
    def checked_sync(self, age: float, ok: bool, peer: int | None) -> None:
        self.saw(peer)
        self.feed(self.r.checked_sync(self.now - age, ok, None if ok else "not in sync", self.now, peer))

    @precondition(lambda self: self.takeover is not None)
    @rule(ok=st.booleans(), conns=st.integers(0, 5))
    def takeover_done(self, ok: bool, conns: int) -> None:
        e, self.takeover = self.takeover, None
        assert e is not None
        if ok:
            self.saw(e)
            newer = self.r.known_epoch > e      # a newer epoch became known while taking this one
            self.alone = None if newer else "takeover"
            self.feed(self.r.took_over(e, self.now, conns))
            if newer:
                assert self.r.role is Role.FENCED and not self.r.forwarding(self.now)
            else:
                assert self.r.role is Role.ACTIVE and self.r.epoch == e
        else:
            self.feed(self.r.takeover_failed("promote failed", self.now))
            assert self.r.role is Role.STANDBY and self.r.eligible is False

    @rule(age=AGE, acked=st.booleans())
    def committed(self, age: float, acked: bool) -> None:
        self.feed(self.r.committed(self.now - age, acked, self.now))

    @precondition(lambda self: self.marks > 0)
    @rule(ok=st.booleans())
    def alone_marked(self, ok: bool) -> None:
        self.marks -= 1
        was = self.r.status(self.now)["alone"]
        self.feed(self.r.alone_marked(ok, self.now, "test"))
        if not was and self.r.status(self.now)["alone"]:
            assert ok
            self.alone = self.now

    @precondition(lambda self: self.clears > 0)
    @rule()
    def alone_cleared(self) -> None:
        self.clears -= 1
        self.feed(self.r.alone_cleared(True, self.now))
        if not self.r.status(self.now)["alone"]:
            self.alone = None

    @rule(age=AGE, epoch=st.none() | EPOCH)
    def peer_checked(self, age: float, epoch: int | None) -> None:
        self.saw(epoch)
        self.feed(self.r.peer_checked(self.now - age, epoch, self.now))

    @precondition(lambda self: self.r.role in (Role.ACTIVE, Role.FENCED))
    @rule()
    def fence(self) -> None:
        """As pairctl: a commit refused FENCED, or its own store's epoch raised (the active only;
        fence() while taking over: see test_a_takeover_done_after_a_fence_does_not_make_the_node_active)."""
        self.feed(self.r.fence("the store answered FENCED", self.now))

    @precondition(lambda self: self.fence_pending)
    @rule()
    def demoted(self) -> None:
        self.fence_pending = False
        self.feed(self.r.demoted(self.now))

    # --- the safety rules ---
    @invariant()
    def forwards_only_as_the_master_active(self) -> None:
        if self.r.forwarding(self.now):
            assert self.r.role is Role.ACTIVE and self.r.vrrp == "MASTER"

    @invariant()
    def releases_alone_only_a_sync_lease_after_the_mark(self) -> None:
        if self.r.may_release(False, self.now):
            assert self.r.role is Role.ACTIVE
            assert self.alone == "takeover" or (isinstance(self.alone, float) and self.now >= self.alone + SYNC_LEASE), \
                (self.alone, self.now)

    @invariant()
    def alone_as_seen_from_outside(self) -> None:
        assert self.r.status(self.now)["alone"] == (self.alone is not None) or self.r.role is not Role.ACTIVE

    @invariant()
    def the_epoch_is_never_below_what_it_took(self) -> None:
        assert self.r.known_epoch >= self.r.epoch


PairRoleMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=100, deadline=None,
                                             suppress_health_check=[HealthCheck.too_slow])
TestPairRoleMachine = PairRoleMachine.TestCase


def test_the_alone_flag_is_cleared_only_after_a_lease_so_a_lagging_replica_does_not_flap_it() -> None:
    r = synced_active()
    assert of(r.committed(T0 + 1, False, T0 + 1.2), MarkAlone)
    r.alone_marked(True, T0 + 1.25, "the standby did not acknowledge a commit")
    assert r.committed(T0 + 1.3, True, T0 + 1.31) == []          # acknowledged again, but marked 60 ms ago
    assert r.status(T0 + 1.31)["alone"]
    assert of(r.committed(T0 + 2.3, True, T0 + 2.31), ClearAlone)  # a lease after the mark


# --- the two leases apart: a proof of the role (short) and being in sync (longer) ---------------

def test_master_after_the_proofs_lease_but_within_the_sync_lease_takes_over() -> None:
    """The lab's failure: the active dies right after the standby's last passing check; keepalived's
    MASTER comes three adverts and some skew later, after a 0.4 s proof lease would have run out.
    The standby is in sync for the sync lease from that check, so it takes the role (a refusal
    leaves the pair with no active at all: the peer is dead, its store out of reach)."""
    r = PairRole(1, 0, 0.4, T0, sync_lease=1.0)
    r.start(T0)
    r.checked_sync(T0, True, None, T0 + 0.01)
    for k in range(1, 10):   # every later check fails: the dead active's store is out of reach
        r.checked_sync(T0 + 0.05 * k, False, "the peer's store is out of reach", T0 + 0.05 * k + 0.01)
    assert takeover_epoch(r.vrrp_state("MASTER", T0 + 0.5)) == 1
    old = PairRole(1, 0, 0.4, T0)   # one lease for both, as before: refused, nobody takes the role
    old.start(T0)
    old.checked_sync(T0, True, None, T0 + 0.01)
    assert events(old.vrrp_state("MASTER", T0 + 0.5)) == ["refused"]


def test_alone_the_active_releases_a_sync_lease_after_the_mark_not_a_proofs_lease() -> None:
    r = PairRole(1, 0, 0.4, T0, sync_lease=1.0)
    r.start(T0)
    r.checked_sync(T0, True, None, T0)
    r.vrrp_state("MASTER", T0)
    r.took_over(1, T0, 0)
    r.committed(T0, True, T0 + 1.5)             # the takeover's alone mark cleared ...
    r.alone_cleared(True, T0 + 1.5)
    assert of(r.committed(T0 + 2, False, T0 + 2.2), MarkAlone)
    r.alone_marked(True, T0 + 2.25, "the standby did not acknowledge a commit")
    assert not r.may_release(False, T0 + 2.25 + 0.5)   # a proof's lease after the mark: not yet
    assert r.release_at() == T0 + 2.25 + 1.0
    assert r.may_release(False, T0 + 2.25 + 1.0)
    assert r.status(T0 + 3)["sync_lease"] == 1.0 and r.status(T0 + 3)["lease"] == 0.4


@settings(max_examples=300, deadline=None)
@given(check=st.floats(0, 5), mark_after=st.floats(0.0001, 2), lease=st.sampled_from([0.2, 0.4, 1.0]),
       sync=st.sampled_from([0.4, 1.0, 3.0]), at=st.floats(0, 10))
def test_no_standby_is_in_sync_when_the_alone_active_releases(check: float, mark_after: float, lease: float,
                                                             sync: float, at: float) -> None:
    """Two nodes with the same leases: a standby whose last passing check began before the active
    stored its alone mark is out of sync whenever the active may release unacknowledged batches."""
    sby = PairRole(2, 0, lease, T0, sync)
    sby.start(T0)
    sby.checked_sync(T0 + check, True, None, T0 + check)
    act = PairRole(1, 0, lease, T0, sync)
    act.start(T0)
    act.checked_sync(T0, True, None, T0)
    act.vrrp_state("MASTER", T0)
    act.took_over(1, T0, 0)
    mark = T0 + check + mark_after
    assert of(act.committed(mark, True, mark), ClearAlone)   # the takeover's alone mark cleared: in sync
    act.alone_cleared(True, mark)
    assert not act.status(mark)["alone"]
    assert of(act.committed(mark, False, mark), MarkAlone)   # then the standby stops acknowledging
    act.alone_marked(True, mark, "the standby did not acknowledge a commit")
    t = mark + at
    assert not (act.may_release(False, t) and sby.in_sync(t))
