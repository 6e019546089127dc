"""The role of one gateway of the pair, sans-I/O (issue 13): when it may take over, when it may
forward, when it must stop for good.

Theory of operation
-------------------
Each gateway runs one :class:`PairRole`, driven by :mod:`appliance.pairctl` with what it
observed and the node's monotonic clock ``now``; every input returns the :data:`Action` s to
carry out (write the eligibility file, begin a takeover, fence this node, mark or clear the
store's *alone* flag, log an event).  It touches nothing itself.

*Roles.*  ``standby`` (the table follows the active's store), ``taking-over`` (keepalived made
this node master and the table is being re-attached; its queues hold every packet),
``active`` (it owns the connections and commits) and ``fenced`` (it was active, a newer epoch
owns the connections: it sends and forwards nothing until its store is a replica again, then
it is a standby).

*Epochs.*  Every takeover uses a new epoch, above any this node has known (its epoch file, its
store, the peer's store).  Node 1 takes odd epochs and node 2 even ones, so two nodes that both
believe they took over can never own the same epoch.

*In sync, and eligible* (the standby).  The driver checks, every ``check_interval``, that the
standby's store is a live replica of the active's, that its table is built, and that the active
is not committing *alone* (the ``repl:alone`` flag in the active's store, read on the active's
store itself).  A check begun at ``t`` that passes keeps the standby in sync until
``t + sync_lease``, which must outlast keepalived's detection of a dead master (three adverts
plus skew, slower right after FAULT) and the gap between two checks: keepalived's MASTER after
the active's death must find the standby still in sync, or it refuses the role and nobody takes
it.  The node is eligible (its keepalived track file says 0) while it is in sync, or active;
keepalived puts an ineligible node in FAULT: it never takes the role.  keepalived's
``MASTER`` on a standby starts a takeover when it is in sync (or, right after start, once the
first check passes); otherwise the node refuses the role (ineligible: keepalived gives it up).
A node starts ineligible (keepalived's FAULT): a restarted appliance cannot know keepalived's
state until a transition is announced, and a node that held the role gives it to a peer in sync.

*Committing alone* (the active).  A batch is released to the clients when the standby's store
acknowledged it (``WAIT``).  When it does not within ``wait_ms`` the active marks its store
*alone* and may release batches only ``sync_lease`` after that mark was stored: every check that
saw the flag clear began before the mark, so no standby believes it is in sync any more (the
lease is measured on each node's own clock; only durations are compared); a batch the standby's
store acknowledges late (the driver asks again) is released then.  An acknowledged commit clears
the flag once it has been set for a sync lease (a replica that lags now and then does not flap the
pair's state).  A takeover marks the new active's store alone at once: no standby
exists that could have seen that store's flag clear.

*Proof of the role, and fencing* (the active).  The active forwards only while it holds
keepalived's ``MASTER`` and has a fresh proof that no newer epoch owns the connections: a
*grant* from the peer's store (its epoch no higher than this node's; the driver asks every
``lease / 6``), begun less than ``lease`` ago; or, alone for a sync lease already, the peer's store
out of reach (then the peer cannot be in sync, so cannot have taken over; the VRRP paths, which
are not the sync link, settle who holds the addresses).  The peer's store stamps every grant
with its own clock, and a takeover reads how long ago the last one was when it raises the epoch
(after which no grant is given): the new active forwards nothing until a lease has passed since
that grant (:meth:`PairRole.promoted`), so a former active frozen and thawed at any moment has
seen its proof run out before the new one forwards, and forwards nothing until the driver has
asked the peer again: the higher epoch there fences it.  An acknowledged commit is no proof (the
standby could not tell when it gave it).  A commit refused by its own store (``FENCED``: the new
active raised its epoch) fences it too.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Union


class Role(enum.Enum):
    STANDBY = "standby"
    TAKING_OVER = "taking-over"
    ACTIVE = "active"
    FENCED = "fenced"


@dataclass(frozen=True, slots=True)
class SetEligible:
    eligible: bool
    reason: str


@dataclass(frozen=True, slots=True)
class TakeOver:
    epoch: int


@dataclass(frozen=True, slots=True)
class Fence:
    reason: str


@dataclass(frozen=True, slots=True)
class MarkAlone:
    reason: str


@dataclass(frozen=True, slots=True)
class ClearAlone:
    pass


@dataclass(frozen=True, slots=True)
class Event:
    kind: str           # takeover | refused | fenced | degraded | in-sync | out-of-sync | replication
    message: str


Action = Union[SetEligible, TakeOver, Fence, MarkAlone, ClearAlone, Event]


def next_epoch(known: int, node: int) -> int:
    """The smallest epoch above ``known`` of node ``node``'s parity (1: odd, 2: even)."""
    e = known + 1
    return e if e % 2 == node % 2 else e + 1


class PairRole:
    def __init__(self, node: int, epoch: int, lease: float, now: float, sync_lease: float | None = None) -> None:
        if node not in (1, 2):
            raise ValueError("node is 1 or 2")
        self.node = node
        self.epoch = epoch               # the epoch this node owns (active) or last knew
        self.known_epoch = epoch         # the highest epoch known anywhere
        self.lease = lease               # a proof of the role holds this long (a takeover waits it out)
        # a passing sync check keeps a standby in sync this long, and an active alone waits it
        # before releasing what the standby did not acknowledge (None: the same as ``lease``)
        self.sync_lease = lease if sync_lease is None else sync_lease
        self.role = Role.STANDBY
        self.vrrp: str | None = None     # keepalived's last group state
        self.eligible: bool | None = None
        self.in_sync_until = float("-inf")
        self.checked = False             # a sync check has answered since start
        self.pending_master = False      # MASTER came before the first check answered
        self.out_of_sync_reason: str | None = "not checked yet"
        self.proof_until = float("-inf")
        self.forward_not_before = float("-inf")   # a takeover: until the former active's proof ran out
        self.lease_wait = 0.0            # how long that was, from the promotion
        self.alone_since: float | None = None   # the alone mark was stored at (None: not alone)
        self.alone_reason: str | None = None
        self.marking = False             # a MarkAlone is being carried out
        self.clearing = False            # a ClearAlone is being carried out
        self.last_takeover: dict[str, Any] | None = None
        self.takeover_started: float | None = None
        self.fenced_reason: str | None = None
        self.peer_reachable: bool | None = None
        self.refusals = 0                # MASTER refused while out of sync
        self.reported_in_sync: bool | None = None   # what the last in-sync / out-of-sync event said

    # --- queries ------------------------------------------------------------------------------
    @property
    def vrrp_master(self) -> bool:
        return self.vrrp == "MASTER"

    def in_sync(self, now: float) -> bool:
        return self.role is Role.STANDBY and now < self.in_sync_until

    def forwarding(self, now: float) -> bool:
        """May the data path read its queues and send?"""
        if self.role is not Role.ACTIVE or not self.vrrp_master or now < self.forward_not_before:
            return False
        if now < self.proof_until:
            return True
        return self.alone_since is not None and now >= self.alone_since + self.sync_lease and self.peer_reachable is False

    def may_release(self, acked: bool, now: float) -> bool:
        """May a batch committed at ``now`` be released to the clients (``acked``: the standby's
        store acknowledged it)?"""
        if self.role is not Role.ACTIVE:
            return False
        if acked:
            return True
        # while the flag is being cleared a standby may read it clear: nothing goes out unacknowledged
        return not self.clearing and self.alone_since is not None and now >= self.alone_since + self.sync_lease

    def release_at(self) -> float | None:
        """When batches not acknowledged may be released (None: not alone yet)."""
        return None if self.alone_since is None else self.alone_since + self.sync_lease

    # --- inputs -------------------------------------------------------------------------------
    def _eligible(self, now: float, out: list[Action]) -> None:
        want = self.role in (Role.ACTIVE, Role.TAKING_OVER) or self.in_sync(now)
        if want != self.eligible:
            self.eligible = want
            why = (f"the {self.role.value} node" if self.role is not Role.STANDBY
                   else "in sync with the active" if want else f"not in sync: {self.out_of_sync_reason}")
            out.append(SetEligible(want, why))

    def start(self, now: float) -> list[Action]:
        """A node starts ineligible: keepalived puts it in FAULT (giving the role up if it held
        it), so the appliance learns keepalived's state from the transitions that follow, and a
        peer in sync takes the role meanwhile; the first passing check makes it eligible."""
        self.eligible = False
        return [SetEligible(False, "starting: not checked yet")]

    def vrrp_state(self, state: str, now: float) -> list[Action]:
        """keepalived's sync group went to ``state`` (MASTER, BACKUP, FAULT, STOP)."""
        out: list[Action] = []
        was = self.vrrp
        self.vrrp = state
        if state != "MASTER":
            self.pending_master = False
            if self.role is Role.ACTIVE and was == "MASTER":
                out.append(Event("replication", f"keepalived moved this node to {state}: it stops forwarding "
                                                "until it holds the role again"))
            return out
        if self.role is Role.STANDBY:
            if self.in_sync(now):
                out += self._take_over(now)
            elif not self.checked:
                self.pending_master = True
            else:
                out += self._refuse(now)
        return out

    def _take_over(self, now: float) -> list[Action]:
        self.role = Role.TAKING_OVER
        self.pending_master = False
        self.takeover_started = now
        epoch = next_epoch(max(self.epoch, self.known_epoch), self.node)
        self.known_epoch = epoch
        return [TakeOver(epoch)]

    def _refuse(self, now: float) -> list[Action]:
        self.refusals += 1
        self.pending_master = False      # a later MASTER is needed: this one is refused
        self.eligible = False
        why = self.out_of_sync_reason or "not in sync"
        return [SetEligible(False, f"made master while not in sync ({why}): the role is refused"),
                Event("refused", f"keepalived made this node master, but its table is not in sync with the "
                                 f"active's ({why}); it refuses the role rather than lose acknowledged bytes")]

    def checked_sync(self, sent_at: float, ok: bool, reason: str | None, now: float,
                     peer_epoch: int | None = None) -> list[Action]:
        """A standby's sync check begun at ``sent_at`` answered (``reason``: why not in sync)."""
        out: list[Action] = []
        if peer_epoch is not None:
            self.known_epoch = max(self.known_epoch, peer_epoch)
        if self.role is not Role.STANDBY:
            return out
        self.checked = True
        if ok:
            self.in_sync_until = max(self.in_sync_until, sent_at + self.sync_lease)
            self.out_of_sync_reason = None
        else:
            self.out_of_sync_reason = reason or "not in sync"
        self._sync_event(now, out)
        self._eligible(now, out)
        if self.pending_master:
            out += self._take_over(now) if self.in_sync(now) else self._refuse(now)
        return out

    def promoted(self, granted_ago: float | None, now: float) -> float:
        """The takeover's store is the master of the new epoch; its last grant of a proof to the
        former active was ``granted_ago`` seconds before ``now`` (None: no record of one).  That
        proof lets a thawed former active forward until a lease after the grant, so this node
        forwards nothing before then; returns how long that is from ``now``."""
        hold = self.lease if granted_ago is None else max(0.0, self.lease - granted_ago)
        self.forward_not_before = max(self.forward_not_before, now + hold)
        self.lease_wait = hold
        return hold

    def took_over(self, epoch: int, now: float, connections: int) -> list[Action]:
        """The takeover is done: this node's store is the master of ``epoch``, the table is
        re-attached; its store is marked alone (no standby follows it yet)."""
        out: list[Action] = []
        if self.role is not Role.TAKING_OVER:
            return out                   # fenced meanwhile: the driver drops what it re-attached
        if self.known_epoch > epoch:     # a newer epoch appeared while this one was taken: not ours
            self.epoch = epoch
            self.role = Role.ACTIVE
            return self.fence(f"epoch {self.known_epoch} is known, newer than the {epoch} just taken", now)
        self.role = Role.ACTIVE
        self.epoch = epoch
        self.known_epoch = max(self.known_epoch, epoch)
        self.proof_until = now + self.lease
        self.alone_since = float("-inf")   # marked with the promotion, before any standby could read it
        self.alone_reason = "the former active is gone"
        self.peer_reachable = None
        ms = (now - self.takeover_started) * 1000 if self.takeover_started is not None else 0.0
        self.last_takeover = {"at_monotonic": now, "epoch": epoch, "connections": connections,
                              "duration_ms": round(ms, 1), "lease_wait_ms": round(self.lease_wait * 1000, 1),
                              "reason": "keepalived made this node master"}
        out.append(Event("takeover", f"took over as active in epoch {epoch}: {connections} connection(s) "
                                     f"re-attached in {ms:.0f} ms ({self.lease_wait * 1000:.0f} ms of it waiting "
                                     f"out the former active's proof)"))
        self.lease_wait = 0.0
        self._eligible(now, out)
        return out

    def takeover_failed(self, why: str, now: float) -> list[Action]:
        if self.role is not Role.TAKING_OVER:
            return []
        self.role = Role.STANDBY
        self.in_sync_until = float("-inf")
        self.out_of_sync_reason = f"the takeover failed: {why}"
        out: list[Action] = [Event("refused", f"the takeover failed: {why}")]
        self._eligible(now, out)
        return out

    def committed(self, sent_at: float, acked: bool, now: float) -> list[Action]:
        """The active's commit sent at ``sent_at`` answered: ``acked`` by the standby's store
        within ``wait_ms``, or not."""
        out: list[Action] = []
        if self.role is not Role.ACTIVE:
            return out
        if acked:   # (not a proof of the role: only a grant is, which a takeover waits out)
            self.peer_reachable = True
            # alone for a lease at least (a replica that lags now and then does not flap the pair's
            # state, and its standby stays ineligible that long)
            if (self.alone_since is not None and now >= self.alone_since + self.sync_lease and not self.marking
                    and not self.clearing):
                self.clearing = True
                out.append(ClearAlone())
        elif self.alone_since is None and not self.marking:
            self.marking = True
            out.append(MarkAlone("the standby did not acknowledge a commit"))
        return out

    def alone_marked(self, ok: bool, now: float, reason: str = "") -> list[Action]:
        """The alone mark is stored (``ok``; at ``now``), or could not be."""
        self.marking = False
        out: list[Action] = []
        if ok and self.alone_since is None:
            self.alone_since = now
            self.alone_reason = reason
            out.append(Event("degraded", f"replication degraded: {reason}; commits go on alone in "
                                         f"{self.sync_lease:g} s, when no standby can believe it is in sync"))
        return out

    def alone_cleared(self, ok: bool, now: float) -> list[Action]:
        """The alone flag is cleared in the store (``ok``), or could not be (it stays alone)."""
        self.clearing = False
        if not ok or self.alone_since is None:
            return []
        self.alone_since = None
        self.alone_reason = None
        return [Event("in-sync", "the standby acknowledges commits again: replication is synchronous")]

    def peer_checked(self, sent_at: float, epoch: int | None, now: float) -> list[Action]:
        """A check of the peer's store begun at ``sent_at``: its epoch (None: unreachable)."""
        out: list[Action] = []
        self.peer_reachable = epoch is not None
        if epoch is None:
            if self.role is Role.ACTIVE and self.alone_since is None and not self.marking:
                self.marking = True
                out.append(MarkAlone("the peer's store is out of reach"))
            return out
        self.known_epoch = max(self.known_epoch, epoch)
        if self.role is Role.ACTIVE:
            if epoch > self.epoch:
                out += self.fence(f"the peer's store holds epoch {epoch}, newer than this node's {self.epoch}", now)
            else:
                self.proof_until = max(self.proof_until, sent_at + self.lease)
        return out

    def fence(self, reason: str, now: float) -> list[Action]:
        """A newer epoch owns the connections (a FENCED store, the peer's epoch)."""
        if self.role in (Role.FENCED, Role.STANDBY):
            return []
        self.role = Role.FENCED
        self.fenced_reason = reason
        self.proof_until = float("-inf")
        self.alone_since = None
        self.marking = self.clearing = False
        out: list[Action] = [Fence(reason), Event("fenced", f"fenced: {reason}; this node sends and forwards "
                                                            f"nothing, and rejoins as the standby")]
        self._eligible(now, out)
        return out

    def demoted(self, now: float) -> list[Action]:
        """A fenced node's store follows the active again: it is a standby (not yet in sync)."""
        out: list[Action] = []
        if self.role is Role.FENCED:
            self.role = Role.STANDBY
            self.in_sync_until = float("-inf")
            self.out_of_sync_reason = "rejoining: the bulk resync has not finished"
            self.reported_in_sync = False
            self._eligible(now, out)
        return out

    def _sync_event(self, now: float, out: list[Action]) -> None:
        """An event when the standby's being in sync changed since the last one said."""
        if self.role is not Role.STANDBY or not self.checked:
            return
        now_in = self.in_sync(now)
        if now_in == self.reported_in_sync:
            return
        self.reported_in_sync = now_in
        if now_in:
            out.append(Event("in-sync", "the standby's table is in sync with the active: eligible"))
        else:
            self.out_of_sync_reason = self.out_of_sync_reason or "no passing sync check for a lease"
            out.append(Event("out-of-sync", f"the standby is not in sync: {self.out_of_sync_reason}; "
                                            f"it cannot take the role"))

    def tick(self, now: float) -> list[Action]:
        """Time passed: a lease may have run out."""
        out: list[Action] = []
        self._sync_event(now, out)
        self._eligible(now, out)
        return out

    def status(self, now: float) -> dict[str, Any]:
        return {
            "node": self.node,
            "role": self.role.value,
            "epoch": self.epoch,
            "known_epoch": self.known_epoch,
            "vrrp": self.vrrp,
            "eligible": bool(self.eligible),
            "in_sync": self.in_sync(now) if self.role is Role.STANDBY else None,
            "out_of_sync_reason": self.out_of_sync_reason if self.role is Role.STANDBY else None,
            "forwarding": self.forwarding(now),
            "alone": self.alone_since is not None,
            "alone_reason": self.alone_reason,
            "peer_reachable": self.peer_reachable,
            "fenced_reason": self.fenced_reason if self.role is Role.FENCED else None,
            "lease": self.lease,
            "sync_lease": self.sync_lease,
        }
