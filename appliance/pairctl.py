"""The gateway pair at run time (issue 13): what :class:`~appliance.pairrole.PairRole` decides,
carried out against keepalived, Redis and the data path.

One :class:`PairController` per appliance with ``store.mode = "peer"``, on the gateway's loop
(one owner: no locks).  Its tasks:

* **keepalived's channel**: every group transition from ``vrrp_fifo``
  (:class:`appliance.vrrp.FifoReader`) goes to the role;
* **the standby's check** (every :data:`CHECK_INTERVAL`): is the local Redis a live replica of
  the peer's, the table (:class:`~appliance.replication_redis.RedisStandby`) built, the active
  not committing alone?  A fresh pair (both stores empty, epoch 0) counts as in sync.  A local
  store that does not follow an active peer is made its replica (``REPLICAOF``: Redis does the
  bulk resync, the table is rebuilt from the keyspace);
* **the active's heartbeat**: the peer's epoch (and the local one) checked when no acknowledged
  commit has proved the role for a third of a lease; the alone flag probed back to clear;
* **the group commit** (:meth:`PairController.run_commits`): a batch of the checkpoint store
  (``checkpoint.store``) as replication ops, one ``EVALSHA`` + ``WAIT 1`` through
  :class:`~appliance.replication_redis.RedisPrimary`; its held ACKs are released when the standby
  acknowledged it, or — committing alone — once no standby can believe it is in sync;
* the eligibility file keepalived tracks, written on every change;
* the data path's gate: the queues are read, and the gateway sends, only while the role says the
  node forwards (:meth:`PairController.forwarding`); otherwise packets wait in the kernel's queues.

A takeover (:meth:`PairController._take_over`): the epoch written to ``epoch_file`` first, the
local store promoted (``REPLICAOF NO ONE``, epoch raised, marked alone) and drained into the table,
every connection rebuilt (``ReplConn.to_record``) and re-attached as after a restart
(``Gateway.restore``: sequence numbers re-learned from the wire, moved connections spliced to
their backup again), then, once a lease has passed since the local store last granted the
former active a proof of its role (:meth:`PairRole.promoted`), the queues are read.  A
connection caught mid-move (its first move) goes on with the backend it was leaving, the
target's half-replayed socket is fenced (a probe draws its duplicate ACK, answered with a RST
at exactly its ``rcv_nxt``), and the move starts again (``Gateway.restart_move``): *the move
restarts*.  The former active's store is fenced in the background (best effort: a dead one is
fenced when it comes back and finds the peer's newer epoch).

Fencing (:meth:`PairController._fence`): the queues stop being read, what they hold is dropped,
every connection is forgotten without a packet sent, the local store becomes the peer's replica,
and the node is a standby again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import statistics
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from checkpoint.replication import ops_from_batch
from checkpoint.state import StateError
from checkpoint.store import Loaded

from .cadence import Cadence
from .config import PairConfig
from .pairrole import (
    Action,
    ClearAlone,
    Event,
    Fence,
    MarkAlone,
    PairRole,
    Role,
    SetEligible,
    TakeOver,
)
from .replication_redis import (
    DURABILITY,
    NO_ID,
    Fenced,
    RedisClient,
    RedisError,
    RedisPrimary,
    RedisStandby,
    _str,
    demote,
    fence_peer,
    grant,
    id_tuple,
    not_durable,
    parse_info,
)
from .vrrp import FifoReader, Transition

if TYPE_CHECKING:
    from .gateway import Gateway

log = logging.getLogger(__name__)

CHECK_INTERVAL = 0.05     # seconds between the standby's sync checks (and the role's ticks)
PEER_TIMEOUT = 0.2        # seconds a request to the peer's store may take


def split_addr(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host.strip("[]"), int(port)


def read_epoch(path: str | Path) -> int:
    try:
        return int(Path(path).read_text().strip() or 0)
    except FileNotFoundError:
        return 0
    except ValueError as exc:
        raise ValueError(f"{path}: not an epoch number: {exc}") from None


def write_epoch(path: str | Path, epoch: int) -> None:
    """Durably: a node must never take an epoch twice, even across a crash."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(f"{epoch}\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(p)


def write_eligible(path: str | Path, eligible: bool) -> None:
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text("0\n" if eligible else "1\n")
    tmp.rename(p)  # one inotify event, one whole value


class PairController:
    def __init__(self, gw: Gateway, cfg: PairConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.gw = gw
        self.cfg = cfg
        self.clock = clock
        self.local = split_addr(cfg.redis)
        self.peer = split_addr(cfg.peer_redis)
        self.role = PairRole(cfg.node, read_epoch(cfg.epoch_file), cfg.lease, clock(), cfg.sync_lease)
        self.query = RedisClient(*self.local, timeout=1.0)
        self.peer_client = RedisClient(*self.peer, timeout=PEER_TIMEOUT)
        self.standby: RedisStandby | None = None
        self.primary: RedisPrimary | None = None
        self.on_forwarding: Callable[[bool], None] | None = None  # the data path: read the queues, or not
        self._forwarding = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._fifo: FifoReader | None = None
        self.last_check: dict[str, Any] = {}
        self.lag: dict[str, Any] = {"bytes": None, "ms": None}
        self.commit_us: deque[float] = deque(maxlen=2000)
        self.counters = {"commits_acked": 0, "commits_alone": 0, "commit_errors": 0, "takeovers": 0, "fenced": 0,
                         "resyncs": 0, "sync_checks_failed": 0, "refused": 0,
                         "dropped_not_forwarding": 0, "unsent_not_forwarding": 0}
        self.last_takeover: dict[str, Any] | None = None
        self._lag_at = 0.0

    # --- the data path's gate ----------------------------------------------------------------
    def forwarding(self) -> bool:
        return self.role.forwarding(self.clock())

    def _update_gate(self) -> None:
        fwd = self.forwarding()
        if fwd != self._forwarding:
            self._forwarding = fwd
            log.info("pair: %s (role %s, epoch %d, keepalived %s)", "forwarding" if fwd else "not forwarding",
                     self.role.role.value, self.role.epoch, self.role.vrrp)
            if self.on_forwarding is not None:
                self.on_forwarding(fwd)
            if fwd:
                self.gw.flush()

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self._apply(self.role.start(self.clock()))
        self._fifo = FifoReader(self.cfg.vrrp_fifo)
        for coro in (self._read_vrrp(), self._standby_loop(), self._heartbeat()):
            self._spawn(coro)

    async def stop(self) -> None:
        if self._fifo is not None:
            self._fifo.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.standby is not None:
            await self.standby.stop()
        if self.primary is not None:
            await self.primary.close()
        for c in (self.query, self.peer_client):
            await c.aclose()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._done)
        return t

    def _done(self, t: asyncio.Task[Any]) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.error("pair: task failed", exc_info=t.exception())

    # --- actions -----------------------------------------------------------------------------
    def _apply(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, SetEligible):
                try:
                    write_eligible(self.cfg.eligibility_file, a.eligible)
                except OSError as exc:
                    log.error("pair: cannot write %s: %s", self.cfg.eligibility_file, exc)
                log.info("pair: %s (%s)", "eligible" if a.eligible else "ineligible", a.reason)
            elif isinstance(a, TakeOver):
                self._spawn(self._take_over(a.epoch))
            elif isinstance(a, Fence):
                self._spawn(self._fence(a.reason))
            elif isinstance(a, MarkAlone):
                self._spawn(self._mark_alone(a.reason))
            elif isinstance(a, ClearAlone):
                self._spawn(self._clear_alone())
            elif isinstance(a, Event):
                self.gw.events.add("pair", a.message, what=a.kind, node=self.cfg.node, epoch=self.role.epoch)
                log.info("pair: %s", a.message)
        self._update_gate()

    async def _mark_alone(self, reason: str) -> None:
        try:
            await self.query.execute("SET", "repl:alone", "1")
        except RedisError as exc:
            self._apply(self.role.alone_marked(False, self.clock()))
            log.error("pair: cannot mark the store alone: %s", exc)
            return
        self._apply(self.role.alone_marked(True, self.clock(), reason))

    async def _clear_alone(self) -> None:
        try:
            await self.query.execute("SET", "repl:alone", "0")
        except RedisError:
            self._apply(self.role.alone_cleared(False, self.clock()))
            return
        self._apply(self.role.alone_cleared(True, self.clock()))

    # --- keepalived --------------------------------------------------------------------------
    async def _read_vrrp(self) -> None:
        assert self._fifo is not None
        async for notice in self._fifo:
            if isinstance(notice, Transition):
                if notice.is_role and notice.scope.value == "GROUP":
                    self._apply(self.role.vrrp_state(notice.state.value, self.clock()))
            else:
                log.warning("pair: keepalived's channel: %s: %r", notice.reason, notice.line)

    # --- the standby -------------------------------------------------------------------------
    async def _standby_loop(self) -> None:
        while True:
            try:
                await self._standby_step()
            except Exception:  # the control loop must outlive any surprise answer
                log.exception("pair: the standby's check failed")
                self.counters["sync_checks_failed"] += 1
            await asyncio.sleep(CHECK_INTERVAL)

    async def _standby_step(self) -> None:
        if self.role.role is Role.STANDBY and self.clock() >= self._lag_at:
            self._lag_at = self.clock() + 0.25
            await self.refresh_lag()      # the lag shown (status, metrics, panel), 4 times a second
        if self.role.role is Role.STANDBY:
            t = self.clock()
            try:
                ok, why, epoch = await self._check_sync()
            except (RedisError, ValueError) as exc:   # a store loading its bulk resync answers errors
                ok, why, epoch = False, f"a store answered: {exc}", None
            if not ok:
                self.counters["sync_checks_failed"] += 1
            self.last_check = {"ok": ok, "reason": why, "at": time.time()}
            self._apply(self.role.checked_sync(t, ok, why, self.clock(), epoch))
        self._apply(self.role.tick(self.clock()))

    async def _peer_state(self) -> tuple[dict[str, str], int, str | None, str | None] | None:
        """The peer's store: its replication info, epoch, alone flag and last batch; None when it
        cannot say (out of reach, or answering errors: a replica still loading its bulk resync)."""
        try:
            info, epoch, alone, last = await self.peer_client.pipeline(
                [["INFO", "replication"], ["GET", "repl:epoch"], ["GET", "repl:alone"], ["GET", "repl:last"]])
            return parse_info(info), int(_str(epoch) or 0), _str(alone), _str(last)
        except (RedisError, ValueError):
            return None

    async def _check_sync(self) -> tuple[bool, str | None, int | None]:
        peer = await self._peer_state()
        if peer is None:
            return False, "the peer's store is out of reach", None
        pinfo, pepoch, palone, plast = peer
        try:
            linfo_r, lepoch_r, llast_r, lpers_r, lfsync_r = await self.query.pipeline(
                [["INFO", "replication"], ["GET", "repl:epoch"], ["GET", "repl:last"], *DURABILITY])
        except RedisError as exc:
            return False, f"this node's store is out of reach ({exc})", pepoch
        if self.cfg.disk and (why := not_durable(lpers_r, lfsync_r)) is not None:
            return False, f"pair.disk: this node's Redis {why}", pepoch
        linfo = parse_info(linfo_r)
        lepoch = int(_str(lepoch_r) or 0) if not isinstance(lepoch_r, RedisError) else 0
        llast = _str(llast_r) if not isinstance(llast_r, RedisError) else None
        if pinfo.get("role") == "master" and linfo.get("role") == "master" and max(pepoch, lepoch) >= 1:
            # both stores masters of the pair's data: both gateways' Redis restarted (peer plus disk
            # keeps it); the newest store (epoch, then last batch, then node 1) takes the role, and
            # the other follows it.  On a tie with a live active the data is the same: its next
            # commit makes it the newer, and this node follows before the commit is released.
            mine = (lepoch, id_tuple(llast or NO_ID), -self.cfg.node)
            theirs = (pepoch, id_tuple(plast or NO_ID), -(3 - self.cfg.node))
            if mine > theirs:
                return True, None, pepoch
        if pinfo.get("role") == "master" and pepoch >= 1:
            if linfo.get("role") != "slave" or (linfo.get("master_host"), linfo.get("master_port")) != (
                    self.peer[0], str(self.peer[1])):
                await self._follow_peer()
                return False, "resyncing from the active's store", pepoch
            if linfo.get("master_link_status") != "up":
                why = ("the bulk resync is under way" if linfo.get("master_sync_in_progress") == "1"
                       else "the replication link is down")
                return False, why, pepoch
            sb = self.standby
            if sb is None:
                await self._follow_peer()
                return False, "the table is being built", pepoch
            if sb.need_rebuild:
                return False, "the table is being rebuilt from the store", pepoch
            if palone == "1":
                return False, "the active commits alone (it did not wait for this node)", pepoch
            return True, None, pepoch
        if (pinfo.get("role") == "master" and pepoch == 0 and lepoch == 0 and linfo.get("role") == "master"
                and plast is None and _str(llast_r) is None and self.role.epoch == 0):
            return True, None, 0     # a fresh pair: nothing to lose, either may start
        follows_us = (pinfo.get("role") == "slave" and pinfo.get("master_port") == str(self.local[1])
                      and pinfo.get("master_host") == self.local[0])
        if linfo.get("role") == "master" and lepoch >= 1 and (follows_us or pepoch < lepoch):
            # this node's store is the newest (it was the active, both appliances restarted): it holds
            # everything, and a takeover re-attaches its connections from it
            return True, None, pepoch
        return False, f"the peer is not an active gateway's store (role {pinfo.get('role')}, epoch {pepoch})", pepoch

    async def _follow_peer(self) -> None:
        """Make the local store the peer's replica and (re)build the table from it."""
        if self.standby is not None:
            await self.standby.stop()
            self.standby = None
        await demote(self.query, *self.peer)
        self.counters["resyncs"] += 1
        sb = RedisStandby(*self.local)
        await sb.start()
        self.standby = sb
        self._apply([Event("replication", f"following the active's store {self.cfg.peer_redis}: bulk resync, "
                                          f"then the table is rebuilt")])

    # --- takeover ----------------------------------------------------------------------------
    async def _take_over(self, epoch: int) -> None:
        t0 = self.clock()
        gw = self.gw
        try:
            write_epoch(self.cfg.epoch_file, epoch)
            # the table: from the replica this node followed, or from its own store (a fresh pair: empty;
            # or the newest store of a pair whose appliances both restarted)
            sb = self.standby if self.standby is not None else RedisStandby(*self.local)
            self.standby = None
            try:
                table, _ = await sb.promote(epoch, fence=False)
            finally:
                await sb.stop()
            hold = self.role.promoted(sb.granted_ago, self.clock())
            await self.query.execute("SET", "repl:alone", "1")
        except (RedisError, OSError, ValueError) as exc:
            self._apply(self.role.takeover_failed(str(exc), self.clock()))
            return
        loaded: list[Loaded] = []
        now = time.time()
        unreadable = 0
        for cid, rc in table.items():
            try:
                rec = rc.to_record()
            except (StateError, KeyError, ValueError, TypeError) as exc:
                unreadable += 1
                gw.events.add("reset", f"not taken over: its replicated checkpoint cannot be read ({exc})",
                              connection=cid)
                continue
            loaded.append(Loaded(rec, now, None if rc.move is None else json.dumps(rc.move)))
        self.primary = RedisPrimary(*self.local, epoch, wait_ms=self.cfg.wait_ms, peer=self.peer)
        result = gw.restore(loaded, takeover=True)
        self.counters["takeovers"] += 1
        # the former active may still hold a proof this node's store granted it: wait it out
        # (the queues hold every packet meanwhile)
        if (left := self.role.forward_not_before - self.clock()) > 0:
            await asyncio.sleep(left)
        self._apply(self.role.took_over(epoch, self.clock(), result["reattached"]))
        if self.role.role is not Role.ACTIVE:   # fenced during the takeover: its _fence drops them
            gw.dataplane.drop_all("fenced")
            return
        ms = (self.clock() - t0) * 1000
        self.last_takeover = {"at": time.time(), "epoch": epoch, "reason": "keepalived made this node master "
                              "(the active's adverts stopped)", "reattached": result["reattached"],
                              "reset": result["reset"] + unreadable, "duration_ms": round(ms, 1),
                              "lease_wait_ms": round(hold * 1000, 1)}
        for rec in gw.dataplane.connections():  # both ends answer at once: no wait for a retransmission timer
            gw.dataplane.prompt(rec)
        gw.flush()
        for cid, target in result.get("restart", ()):
            self._spawn(gw.restart_move(cid, target))
        self._spawn(fence_peer(*self.peer, epoch, timeout=PEER_TIMEOUT))

    # --- fencing -----------------------------------------------------------------------------
    async def _fence(self, reason: str) -> None:
        gw = self.gw
        self.counters["fenced"] += 1
        self._update_gate()                       # stop reading the queues
        dropped = gw.drop_queued()
        forgotten = gw.dataplane.drop_all("fenced")
        gw.flush_discard()
        if self.primary is not None:
            await self.primary.close()
            self.primary = None
        self._apply([Event("fenced", f"{forgotten} connection(s) forgotten and {dropped} queued packet(s) dropped "
                                     f"without a frame sent ({reason})")])
        while True:
            try:
                await self._follow_peer()
                break
            except RedisError as exc:
                log.warning("pair: cannot follow the peer yet: %s", exc)
                await asyncio.sleep(0.2)
        self._apply(self.role.demoted(self.clock()))

    # --- the active --------------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.lease / 6)
            try:
                await self._heartbeat_step()
            except Exception:  # as the standby's loop: it must go on
                log.exception("pair: the active's heartbeat failed")

    async def _heartbeat_step(self) -> None:
        """The active's proof of its role, renewed every tick: its own store's epoch (raised by a
        new active: fenced), then a grant from the peer's store (:func:`grant`: its epoch, stamped
        there so that a takeover waits out the lease this proof gives)."""
        r = self.role
        if r.role is not Role.ACTIVE:
            return
        try:
            mine = int(_str(await self.query.execute("GET", "repl:epoch")) or 0)
        except (RedisError, ValueError):
            mine = r.epoch
        if mine > r.epoch:
            self._apply(r.fence(f"this node's store was raised to epoch {mine} by the peer", self.clock()))
            return
        t = self.clock()  # the grant's lease runs from here: before the peer's store stamps it
        try:
            peer_epoch: int | None = (await grant(self.peer_client, r.epoch))[0]
        except RedisError as exc:
            peer_epoch = None
            if exc.message.startswith("READONLY"):
                log.error("pair: the peer's Redis refuses the grant of a proof (%s): run it with "
                          "replica-read-only no", exc.message)
        self._apply(r.peer_checked(t, peer_epoch, self.clock()))
        if peer_epoch is not None and r.alone_since is not None and self.primary is not None:
            await self._probe_replica()
        self._update_gate()

    async def _probe_replica(self) -> None:
        """Alone: does the standby's store hold everything again?  (``WAIT 1`` on the latest.)"""
        assert self.primary is not None
        try:
            n = await self.primary.client.execute("WAIT", 1, 5)
        except RedisError:
            return
        if isinstance(n, int) and n >= 1:
            self._apply(self.role.committed(self.clock(), True, self.clock()))

    async def run_commits(self, interval: float) -> None:
        """The group commit of the active (see the module's description)."""
        gw = self.gw
        planner = gw.dataplane.store
        assert planner is not None
        cadence = Cadence(interval)
        while True:
            await cadence.next()
            r = self.role
            if r.role is not Role.ACTIVE or self.primary is None:
                continue
            batch = planner.plan(time.time())
            if batch is None:
                continue
            moves = {w.cid: (None if w.move is None else json.loads(w.move)) for w in batch.writes if w.move_set}
            ops = ops_from_batch(batch, moves)
            t = self.clock()
            alone = r.alone_since is not None
            try:
                acked = await self.primary.commit(batch.seq, ops, wait_ms=1 if alone else self.cfg.wait_ms,
                                                  check_peer=not alone)
            except Fenced as exc:
                planner.failed(batch)
                self._apply(r.fence(str(exc), self.clock()))
                continue
            except RedisError as exc:
                planner.failed(batch)
                self.counters["commit_errors"] += 1
                gw.store_error = f"replication: {exc}"
                log.error("pair: commit refused: %s", exc)
                continue
            self.commit_us.append((self.clock() - t) * 1e6)
            batch.written = time.time()
            if acked:
                self.counters["commits_acked"] += 1
            else:
                self.counters["commits_alone"] += 1
            self._apply(r.committed(t, acked, self.clock()))
            # not acknowledged within wait_ms: released when the standby's store does acknowledge it
            # (a slow replica, WAIT again), or alone once a lease has passed since the alone mark
            while r.role is Role.ACTIVE and not r.may_release(acked, self.clock()):
                if r.alone_since is None and not r.marking and not r.clearing:
                    self._apply(r.committed(t, False, self.clock()))  # a failed mark, or cleared meanwhile
                at = r.release_at()
                wait = 0.05 if at is None else max(0.001, min(0.05, at - self.clock()))
                try:
                    n = await self.primary.client.execute("WAIT", 1, max(1, int(wait * 1000)))
                except RedisError:
                    await asyncio.sleep(wait)
                    continue
                if isinstance(n, int) and n >= 1:
                    acked = True
                    self._apply(r.committed(t, True, self.clock()))
            if r.role is not Role.ACTIVE:
                planner.failed(batch)
                continue
            gw.store_error = None if self.primary.last_error is None or acked else f"replication: {self.primary.last_error}"
            gw.dataplane.committed(planner.done(batch))
            gw.flush()

    # --- what the API shows ------------------------------------------------------------------
    async def refresh_lag(self) -> None:
        sb = self.standby
        if sb is None or self.role.role is not Role.STANDBY:
            self.lag = {"bytes": 0 if self.role.role is Role.ACTIVE else None, "ms": None}
            return
        with contextlib.suppress(RedisError):
            st = await sb.status()
            self.lag = {"bytes": st.lag_bytes, "ms": round(st.lag_ms, 1), "applied": st.applied,
                        "master_last": st.master_last, "link_up": st.link_up, "rebuilds": st.rebuilds}

    def status(self) -> dict[str, Any]:
        now = self.clock()
        us = list(self.commit_us)
        doc = self.role.status(now)
        doc.update({
            "redis": self.cfg.redis,
            "peer_redis": self.cfg.peer_redis,
            "disk": self.cfg.disk,
            "peer": ("reachable" if self.role.peer_reachable else "unreachable" if self.role.peer_reachable is False
                     else "unknown") if self.role.role is not Role.STANDBY else (
                "in sync" if self.role.in_sync(now) else f"not in sync: {self.role.out_of_sync_reason}"),
            "lag": self.lag,
            "last_check": self.last_check,
            "last_takeover": self.last_takeover,
            "commit_us": {"count": len(us), "p50": round(statistics.median(us), 1) if us else None,
                          "p99": round(sorted(us)[int(len(us) * 0.99) - 1], 1) if len(us) >= 100 else None},
            "counters": {**self.counters, "refused": self.role.refusals},
            "degraded": self._degraded(now),
        })
        return doc

    def _degraded(self, now: float) -> str | None:
        """Why the pair does not protect against this gateway's death now (None: it does)."""
        r = self.role
        if r.role is Role.ACTIVE:
            return None if r.alone_since is None else f"the standby is not in sync ({r.alone_reason})"
        if r.role is Role.STANDBY and not r.in_sync(now):
            return f"this standby is not in sync: {r.out_of_sync_reason}"
        if r.role is Role.FENCED:
            return f"fenced: {r.fenced_reason}"
        return None
