"""The running appliance: data plane, failover controller, and what the API reads.

Theory of operation
-------------------
:class:`Gateway` owns the :class:`~appliance.dataplane.Dataplane` (per-packet
work), the :class:`~appliance.events.EventLog` and, when running for real,
the health checker and the packet injector.  It is the *failover controller*:

* ``failover(service, to=None, reason)`` picks a target (the named backend,
  or the first other backend that is ready and not down), makes it the
  service's active backend (new connections go there), points the kernel's
  fail-open NAT at it, and moves every open connection of the old backend
  to it: each is replayed (:meth:`Dataplane.move`), or reset cleanly when it
  is not protected (its log overflowed, it was picked up mid-stream).  One
  ``failover`` event says what happened; each connection's move ends in a
  ``migration`` event (with its timings), a ``divergence`` or a ``reset``.
* ``migrate(id, to)`` moves one connection.
* a service with ``failover.mode = "resume"`` moves its connections with the
  backends' agents instead (:mod:`appliance.resume`): a planned move
  (``migrate(id, to, mode="resume")``, or a failover away from a live
  backend) exports the live endpoint from its backend; a failover away from
  a dead one re-creates each endpoint on the target from the wire
  checkpoint.  The agents' requests run on a thread pool, driven from the
  event loop (``self.loop``).
* health transitions arrive through ``on_health``: an active backend going
  down fails its service over when ``failover.auto`` is set.
* a backend that closes or resets a connection is *suspected*: the data plane
  holds the FIN/RST back and the controller probes the backend at once; a dead
  backend fails over (the client never sees the close), a live one has its
  close released.

**One owner.**  Every change of the gateway's state — API and panel requests, the health
checker, probes, the agents' replies — runs on one event loop (``self.loop`` when running for
real); request handlers are coroutines on that loop and await the action.  The data plane hands
out typed events (:meth:`Dataplane.next_event`), drained by :meth:`pump_events` after every
batch of packets and every action, and says when its timers must next run
(:meth:`next_deadline`); nothing polls at a fixed rate.  A failover of many connections moves
them in chunks of ``gateway.failover_batch`` (32), letting the loop read the queues in between, so the
loop never stalls for the whole table.

Time comes from ``clock`` (``time.time`` by default); nothing here blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Generator
from typing import Any, TypeVar, cast

from checkpoint import memsearch
from checkpoint.addr import is_v6, with_port
from checkpoint.document import CheckpointError, ImportLimits, export_document, import_document
from checkpoint.ici import TcpState
from checkpoint.resurrect import check_resumable
from checkpoint.splice import Out, Phase, Splice
from checkpoint.state import MoveState, move_from_state
from checkpoint.store import Loaded
from nfq.build import tcp_options, tcp_packet
from nfq.queue import Queue, Verdict

from . import __version__, history
from .config import Config
from .connfilter import record_matches
from .errors import Conflict, NotFound
from .dataplane import (BackendRuntime, CloseSuspected, ConnectionClosed, Dataplane, HalfOpenEvicted, Held, HttpFallback, MoveEnded, MoveStarted,
                        MoveVerified, ResumeRefused, ServiceRuntime, Spliced, Suspect)
from .events import EventLog
from .failover_stats import FailoverStats
from .health import HealthChecker, Target
from .resume import ResumeController, ResumeFailed

log = logging.getLogger("appliance")
T = TypeVar("T")
EXPIRE_INTERVAL = 1.0  # seconds between sweeps of idle records
Flow = tuple[str, int, str, int]  # backend ip, port, client ip, port: the kernel's "moved" set


def _finish(steps: Generator[None, None, T]) -> T:
    """Run a stepwise action to its end at once (no loop to yield to)."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


def build_packet(o: Out) -> bytes:
    syn = bool(o.flags & 0x02)
    opts = tcp_options(mss=o.mss, wscale=o.wscale, sack_permitted=o.sack_permitted,
                       tsval=o.tsval, tsecr=o.tsecr, syn=syn)
    return tcp_packet(o.src, o.dst, o.sport, o.dport, o.seq, o.ack, o.flags, o.window, opts, o.payload)


class Gateway:
    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.dataplane = Dataplane(config)
        self.events = EventLog()
        self.started = clock()
        self.queues: list[Queue] = []
        self.health: HealthChecker | None = None
        self.send: Callable[[bytes], None] | None = None  # the injector, when running for real
        self.on_active_change: Callable[[], None] | None = None  # re-point the kernel's fallback
        # tell the kernel which flows (backend ip, port, client ip, port) are moved: their
        # packets must reach the full-copy queue, whatever the service's return path
        self.on_moved: Callable[[list[tuple[str, int, str, int]]], None] | None = None
        self.on_unmoved: Callable[[list[tuple[str, int, str, int]]], None] | None = None
        self.unsent: list[Out] = []       # what was to be sent without an injector (tests)
        self.unsent_raw: list[bytearray] = []
        self.store_error: str | None = None  # the checkpoint store's last write failure
        self.last_failover: dict[str, Any] | None = None
        self._next_expire = clock() + EXPIRE_INTERVAL
        self._wake: asyncio.Event | None = None  # set when the deadline may have moved earlier
        self.loop_stats: Callable[..., dict[str, Any]] | None = None  # the loop's stall monitor (appliance run)
        self.notify_stats: Callable[[], list[dict[str, Any]]] | None = None  # the notifier's targets (appliance run)
        # told of every connection that is over, once, at the batch it ended in: (record, why, now)
        self.closed_listeners: list[Callable[[Any, str, float], None]] = []
        self.history = history.attach(self)  # what is kept of a connection once it is over
        self._probing: dict[tuple[str, str], asyncio.Task] = {}
        self._probe_waiters: dict[tuple[str, str], list[Suspect]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop that carries the packets (appliance run)
        self.resume = None  # the agents' controller (resume mode), when an [agent] key is configured
        if config.agent.key:
            self.resume = ResumeController(self)
        self._tasks: set[asyncio.Future] = set()
        # how long failovers take: decision, first byte and catch-up histograms (GET /metrics)
        self.failover_stats = FailoverStats((s.name, s.failover.mode) for s in config.services)
        self.pair: Any = None  # appliance.pairctl.PairController: the gateway pair (store.mode = "peer")

    # --- the one owner ------------------------------------------------------------------
    async def call(self, fn: Callable[[], T | Awaitable[T]]) -> T:
        """Run ``fn`` on the gateway's loop and return its result (awaiting it if it is a
        coroutine).  A caller on another thread or loop (a test client, a worker) is marshalled
        over; a caller on the loop runs it in place.  Every change of state goes through here
        or runs on the loop already."""
        loop = self.loop
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        async def here_and_now() -> T:
            out = fn()
            return cast(T, await out) if asyncio.iscoroutine(out) else cast(T, out)

        if loop is None or not loop.is_running() or loop is here:
            return await here_and_now()
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(here_and_now(), loop))

    def wake(self) -> None:
        """The next deadline may have moved earlier (a move started): the timer task looks again."""
        if self._wake is not None:
            self._wake.set()

    # --- output and engine events -------------------------------------------------------
    def flush(self) -> None:
        """Take the engine's events, then send what it asked to send: the kernel learns of a
        moved flow before that flow's SYN leaves.  A node of a pair that does not forward now
        (a standby, a master without a fresh proof of its role) keeps it until it does."""
        self.pump_events()
        if self.pair is not None and not self.pair.forwarding():
            return
        dp = self.dataplane
        if dp.raw_out:
            raw = dp.raw_out[:]
            dp.raw_out.clear()
            if self.send is None:
                self.unsent_raw.extend(raw)
            else:
                for pkt in raw:
                    self.send(bytes(pkt))
        if not dp.outbox:
            return
        dp.gate_outbox()
        out = dp.outbox[:]
        dp.outbox.clear()
        if self.send is None:
            self.unsent.extend(out)
            return
        for o in out:
            self.send(build_packet(o))

    def flush_discard(self) -> int:
        """Throw away what the data plane asked to send (a fenced node: a newer epoch owns its
        connections); how many packets."""
        self.pump_events()
        dp = self.dataplane
        n = len(dp.raw_out) + len(dp.outbox)
        dp.raw_out.clear()
        dp.outbox.clear()
        return n

    def drop_queued(self) -> int:
        """Drop every packet waiting in the queues, unseen (a fenced node); how many."""
        n = 0
        offload = self.dataplane.offload
        if offload is not None:
            offload.enabled = False  # every packet to the dropping handler, none to the fast path
        try:
            for q in self.queues:
                handler, before = q.handler, q.stats.dropped
                q.handler = lambda buf: Verdict.DROP
                try:
                    q.process_pending(budget=1 << 20)
                finally:
                    q.handler = handler
                n += q.stats.dropped - before
        finally:
            if offload is not None:
                offload.enabled = True
        return n

    def pump_events(self) -> None:
        """Act on every event the data plane has queued, in order."""
        dp = self.dataplane
        marks: dict[Flow, None] = {}
        gone: dict[Flow, None] = {}
        now = self.clock()
        while (ev := dp.next_event()) is not None:
            if isinstance(ev, MoveStarted):
                flow = self._flow(ev.splice)
                gone.pop(flow, None)
                marks[flow] = None
                self.wake()
            elif isinstance(ev, MoveVerified):
                self._report(ev.splice, now)
                self.failover_stats.move_verified(ev.splice, now)
            elif isinstance(ev, MoveEnded):
                if not ev.verified:
                    self._report(ev.splice, now)
                flow = self._flow(ev.splice)
                marks.pop(flow, None)
                gone[flow] = None
            elif isinstance(ev, CloseSuspected):
                self._suspect(ev.suspect)
            elif isinstance(ev, ResumeRefused):
                self.events.add("reset", f"not resumed after the restart: {ev.reason}", service=ev.rec.service,
                                connection=ev.rec.id, now=now)
            elif isinstance(ev, ConnectionClosed):
                for listener in self.closed_listeners:
                    listener(ev.rec, ev.why, now)
            elif isinstance(ev, HttpFallback):
                self.events.add("http-fallback", f"HTTP tracking stopped, stream replay from the last exchange "
                                                 f"boundary: {ev.reason}", service=ev.rec.service,
                                connection=ev.rec.id, now=now, side=ev.side)
            elif isinstance(ev, HalfOpenEvicted):
                self.events.add("overload", f"connection table full: {ev.count} half-open connection(s) evicted "
                                            f"for new ones (a SYN flood?)", now=now, evicted=ev.count, total=ev.total)
        if gone and self.on_unmoved is not None:
            self.on_unmoved(list(gone))
        if marks and self.on_moved is not None:
            self.on_moved(list(marks))

    @staticmethod
    def _flow(sp: Splice) -> Flow:
        return (sp.target.ip, sp.target.port, sp.rec.client_ip, sp.rec.client_port)

    # --- failover ----------------------------------------------------------------------
    def _service(self, name: str) -> ServiceRuntime:
        svc = self.dataplane.services.get(name)
        if svc is None:
            raise NotFound(f"no service named {name!r}")
        return svc

    def _health_state(self, svc: ServiceRuntime, b: BackendRuntime) -> str:
        return self.health.state(svc.name, b.name) if self.health else "unknown"

    def _target(self, svc: ServiceRuntime, to: str | None, exclude: str) -> BackendRuntime:
        if to is not None:
            b = svc.backends.get(to)
            if b is None:
                raise NotFound(f"service {svc.name!r} has no backend named {to!r}")
            if b.name == exclude:
                raise Conflict(f"{to!r} is already the backend in use")
            if b.admin_state != "ready":
                raise Conflict(f"backend {to!r} is in admin state {b.admin_state!r}")
            if self._health_state(svc, b) == "down":
                raise Conflict(f"backend {to!r} is down")
            return b
        candidates = [b for b in svc.backends.values() if b.name != exclude and b.admin_state == "ready"
                      and self._health_state(svc, b) != "down"]
        candidates.sort(key=lambda b: self._health_state(svc, b) != "up")  # up before unknown
        if not candidates:
            raise Conflict(f"service {svc.name!r} has no other backend that is ready and not down")
        return candidates[0]

    def failover(self, service: str, to: str | None = None, reason: str = "manual",
                 dead: bool | None = None) -> dict[str, Any]:
        """Fail ``service`` over, all at once (no loop needed: tests, the CLI's direct use).
        ``dead``: the old backend is known dead (a health check or a failed probe); None: its
        health state says.  Only resume mode cares: a live backend's connections are exported
        from it, a dead one's are re-created from the wire checkpoint."""
        return _finish(self._failover_steps(service, to, reason, dead))

    async def failover_async(self, service: str, to: str | None = None, reason: str = "manual",
                             dead: bool | None = None) -> dict[str, Any]:
        """The same on the loop, ``gateway.failover_batch`` connections at a time: the queues are read
        between chunks, so a failover of thousands of connections never stalls the packets."""
        steps = self._failover_steps(service, to, reason, dead)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            await asyncio.sleep(0)  # the queues are read here

    def _failover_steps(self, service: str, to: str | None, reason: str,
                        dead: bool | None) -> Generator[None, None, dict[str, Any]]:
        now = self.clock()
        dp = self.dataplane
        svc = self._service(service)
        old = svc.active
        target = self._target(svc, to, old)
        if dead:  # an automatic failover: how long since the backend's death could be known
            self._observe_decision(service, old, reason, now)
        if svc.failover.mode == "resume":
            return self._failover_resume(svc, target, reason, dead, now)
        svc.active = target.name
        if self.on_active_change is not None:
            self.on_active_change()
        recs = [rec for rec in dp.table if rec.service == service and rec.backend == old
                and rec.state not in (TcpState.TIME_WAIT, TcpState.CLOSED)]
        # the event first, naming what it will move, so that every migration event follows it
        self.last_failover = {
            "time": now, "service": service, "from": old, "to": target.name, "reason": reason,
            "connections": len(recs), "reset": 0, "pending": {r.id for r in recs}, "duration_ms": None,
        }
        details: dict[str, Any] = {"from": old, "moved": [r.id for r in recs], "repinned": [], "reset": []}
        ev = self.events.add("failover", reason, service=service, backend=target.name, now=now, **details)
        outcomes: dict[str, list[int]] = {"moved": [], "repinned": [], "reset": []}
        lf = self.last_failover
        chunk = self.config.gateway.failover_batch
        for i in range(0, len(recs), chunk):
            for rec in recs[i:i + chunk]:
                if rec.backend != old or rec.state in (TcpState.TIME_WAIT, TcpState.CLOSED):
                    lf["pending"].discard(rec.id)  # closed or moved meanwhile
                    continue
                outcome = self._move(rec, target, self.clock(), reason)
                outcomes[outcome].append(rec.id)
                if outcome != "moved":
                    lf["pending"].discard(rec.id)
            self.flush()
            if i + chunk < len(recs):
                yield
        ev.details.update(outcomes)
        lf["connections"], lf["reset"] = len(outcomes["moved"]), len(outcomes["reset"])
        if not lf["pending"] and lf["duration_ms"] is None:
            lf["duration_ms"] = round((self.clock() - now) * 1000, 3)
        log.warning("failover of %s: %s -> %s (%s): %d moved, %d reset", service, old, target.name, reason,
                    len(outcomes["moved"]), len(outcomes["reset"]))
        return ev.to_dict()

    def _observe_decision(self, service: str, backend: str, reason: str, now: float) -> None:
        """Failover decision time: from the earliest sign of ``backend``'s death (its first failed
        probe since the last success, or a held close) to ``now`` (appliance.failover_stats)."""
        stats = self.failover_stats
        fail_since = self.health.fail_since(service, backend) if self.health is not None else None
        died = stats.died_at(service, backend, fail_since)
        stats.close_released(service, backend)
        if died is not None:
            stats.observe_decision(service, reason, now - died)

    def _move(self, rec: Any, target: BackendRuntime, now: float, reason: str) -> str:
        """Move one connection (the kernel learns of its flow from the engine's MoveStarted
        event, at the next flush, before its SYN leaves)."""
        dp = self.dataplane
        try:
            dp.move(rec, target, now)
            return "moved"
        except LookupError:
            return "repinned"
        except ValueError as exc:
            dp.reset(rec, now)
            self.events.add("reset", str(exc), service=rec.service, backend=target.name, connection=rec.id,
                            now=now, cause=reason)
            return "reset"

    # --- resume mode (appliance.resume) ------------------------------------------------------
    def _spawn(self, coro: Any, wait: float | None = None) -> Any:
        """Run a coroutine of the resume controller on the packets' loop.
        ``wait``: block this (non-loop) thread for its result, at most that long."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None:
            if wait is not None:
                coro.close()
                raise Conflict("a resume move cannot be awaited from the event loop")
            task = running.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return task
        if self.loop is not None and self.loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
            return fut.result(wait) if wait is not None else fut
        return asyncio.run(coro)  # no running appliance (tests): here and now

    def _resume_pair(self, svc: ServiceRuntime, origin: BackendRuntime, target: BackendRuntime) -> None:
        if self.resume is None:
            raise Conflict("resume mode needs the agents' key ([agent] key or key_file)")
        sc = self.config.service(svc.name)
        for b in (origin, target):
            bc = sc.backend(b.name) if sc is not None else None
            if bc is None or not bc.agent:
                raise Conflict(f"backend {b.name!r} of service {svc.name!r} has no agent (backend.agent)")

    def _resume_plan(self, cid: int, to: str) -> tuple[Any, BackendRuntime, BackendRuntime]:
        """Check a resume-mode move of one connection: its record, origin and target."""
        dp = self.dataplane
        rec = dp.table.by_id(cid)
        if rec is None:
            raise NotFound(f"no connection with id {cid}")
        if rec.state is not TcpState.ESTABLISHED:
            raise Conflict(f"connection {cid} is {rec.state.value}: only ESTABLISHED connections can be resumed")
        if dp.splice_of(cid) is not None:
            raise Conflict(f"connection {cid} is being replayed; a resume move must wait until it has ended")
        if isinstance(dp.mode_of(cid), Held) or (self.resume is not None and cid in self.resume.moving):
            raise Conflict(f"connection {cid} is being moved already")
        svc = self._service(rec.service)
        origin = svc.backends.get(rec.backend)
        if origin is None:
            raise Conflict(f"connection {cid} has no backend (it was reset)")
        target = self._target(svc, to, rec.backend)
        self._resume_pair(svc, origin, target)
        return rec, origin, target

    def _migrate_resume(self, cid: int, to: str, reason: str) -> dict[str, Any]:
        """A resume move from a thread that is not the loop's (tests): blocks for the result."""
        rec, origin, target = self._resume_plan(cid, to)
        assert self.resume is not None
        wait = 4 * self.config.agent.timeout + 5
        try:
            return self._spawn(self.resume.migrate(rec, origin, target, reason), wait=wait)  # type: ignore[no-any-return]
        except ResumeFailed as exc:
            raise Conflict(f"connection {cid} was not moved (resume, {exc.step}): {exc}") from None

    async def migrate_async(self, cid: int, to: str, mode: str = "replay", reason: str = "manual") -> dict[str, Any]:
        """:meth:`migrate` on the loop: a resume move is awaited (the agents' requests run on
        their thread pool), a replay move is started at once."""
        if mode != "resume":
            return self.migrate(cid, to, mode, reason)
        rec, origin, target = self._resume_plan(cid, to)
        assert self.resume is not None
        try:
            ev = await self.resume.migrate(rec, origin, target, reason)
            self.failover_stats.resumed(rec.service, ev)
            return ev
        except ResumeFailed as exc:
            raise Conflict(f"connection {cid} was not moved (resume, {exc.step}): {exc}") from None

    def _failover_resume(self, svc: ServiceRuntime, target: BackendRuntime, reason: str, dead: bool | None,
                         now: float) -> dict[str, Any]:
        dp = self.dataplane
        old = svc.backends[svc.active]
        self._resume_pair(svc, old, target)
        if dead is None:
            dead = self._health_state(svc, old) == "down"
        svc.active = target.name
        if self.on_active_change is not None:
            self.on_active_change()
        recs = [r for r in dp.table if r.service == svc.name and r.backend == old.name
                and r.state not in (TcpState.TIME_WAIT, TcpState.CLOSED) and dp.splice_of(r.id) is None]
        moving, repinned = [], []
        for rec in recs:
            if rec.server.isn is None:
                # the old backend never answered the SYN: the client's retransmitted SYN goes to the new one
                rec.backend, rec.backend_ip, rec.backend_port = (target.name, target.addr(is_v6(rec.client_ip)),
                                                                  target.port)
                repinned.append(rec.id)
                continue
            moving.append(rec)
        self.last_failover = {
            "time": now, "service": svc.name, "from": old.name, "to": target.name, "reason": reason,
            "connections": len(moving), "reset": 0, "pending": {r.id for r in moving}, "duration_ms": None,
        }
        if not moving:
            self.last_failover["duration_ms"] = 0.0
        details: dict[str, Any] = {"from": old.name, "moved": [r.id for r in moving], "repinned": repinned,
                                   "reset": [], "mode": "resume", "source": "wire" if dead else "live"}
        ev = self.events.add("failover", reason, service=svc.name, backend=target.name, now=now, **details)
        log.warning("failover of %s: %s -> %s (%s, resume from the %s): %d connection(s)", svc.name, old.name,
                    target.name, reason, "wire checkpoint" if dead else "live endpoints", len(moving))
        if moving:
            for rec in moving:
                if dead or rec.state is not TcpState.ESTABLISHED:
                    dp.hold(rec, now)  # isolated at once: nothing reaches the backup before its endpoint
            self._spawn(self._resume_all(moving, old, target, reason, dead))
        return ev.to_dict()

    async def _resume_all(self, recs: list, old: BackendRuntime, target: BackendRuntime, reason: str,
                          dead: bool) -> None:
        resume = self.resume
        assert resume is not None
        held = self.clock()  # the failover held the connections just before

        async def one(rec: Any) -> None:
            if dead or rec.state is not TcpState.ESTABLISHED:
                if await resume.resume_from_wire(rec, old, target, reason) == "resumed":
                    self.failover_stats.resumed(rec.service, seconds=self.clock() - held)
                return
            try:
                self.failover_stats.resumed(rec.service, await resume.migrate(rec, old, target, reason))
            except ResumeFailed:
                pass  # the refusal event says why; the connection stays where it was
            self.resume_done(rec.id)

        await asyncio.gather(*(one(r) for r in recs))
        self.flush()

    def resume_done(self, cid: int) -> None:
        """A connection of the last failover has been resumed (or reset)."""
        lf = self.last_failover
        if lf and cid in lf["pending"]:
            lf["pending"].discard(cid)
            if not lf["pending"]:
                lf["duration_ms"] = round((self.clock() - lf["time"]) * 1000, 3)

    def migrate(self, cid: int, to: str | None, mode: str = "replay", reason: str = "manual") -> dict[str, Any]:
        if mode == "resume":
            if to is None:
                raise Conflict("a resume-mode move needs its target backend")
            return self._migrate_resume(cid, to, reason)
        if mode != "replay":
            raise Conflict(f"mode {mode!r} is not available: 'replay' or 'resume'")
        dp = self.dataplane
        rec = dp.table.by_id(cid)
        if rec is None:
            raise NotFound(f"no connection with id {cid}")
        if rec.state in (TcpState.TIME_WAIT, TcpState.CLOSED):
            raise Conflict(f"connection {cid} is {rec.state.value}")
        sp = dp.splice_of(cid)
        if sp is not None and not (sp.phase is Phase.SPLICED and sp.verifier.done):
            raise Conflict(f"connection {cid} is being moved already ({sp.phase.value})")
        svc = self._service(rec.service)
        target = self._target(svc, to, rec.backend)
        now = self.clock()
        old = rec.backend
        outcome = self._move(rec, target, now, reason)
        self.flush()
        ev = self.events.add("migration", f"{reason}: {outcome}", service=svc.name, backend=target.name,
                             connection=cid, now=now, **{"from": old, "outcome": outcome})
        if outcome == "reset":
            last = self.events.last("reset")
            raise Conflict(f"connection {cid} could not be moved and was reset: {last.reason if last else ''}")
        return ev.to_dict()

    def reset_connection(self, cid: int, reason: str = "manual") -> dict[str, Any]:
        rec = self.dataplane.table.by_id(cid)
        if rec is None:
            raise NotFound(f"no connection with id {cid}")
        self.dataplane.reset(rec, self.clock())
        self.flush()
        return self.events.add("reset", reason, service=rec.service, backend=rec.backend, connection=cid).to_dict()

    # --- health -----------------------------------------------------------------------
    def health_targets(self) -> list[Target]:
        return [Target(service=s.name, backend=b.name, address=b.addresses[0], port=b.port, config=sc.health,
                       also=b.addresses[1:])
                for sc in self.config.services for s in [self.dataplane.services[sc.name]]
                for b in s.backends.values()]

    def on_health(self, target: Target, old: str, new: str, detail: str) -> None:
        self.events.add("health", f"{target.backend} {old} -> {new}: {detail}", service=target.service,
                        backend=target.backend)
        svc = self.dataplane.services.get(target.service)
        if svc is None or new != "down" or svc.active != target.backend or not svc.failover.auto:
            return
        self._spawn(self._failover_or_refuse(svc.name, f"health check: {target.backend} down ({detail})",
                                             target.backend))

    async def _failover_or_refuse(self, service: str, reason: str, backend: str) -> None:
        try:
            await self.failover_async(service, reason=reason, dead=True)
        except Conflict as exc:
            self.events.add("refusal", f"cannot fail over: {exc}", service=service, backend=backend)

    # --- timers ---------------------------------------------------------------------------
    def next_deadline(self) -> float:
        """When :meth:`service` must next run (on ``clock``'s scale): the engine's earliest timer,
        or the next sweep of idle records."""
        t = self.dataplane.next_deadline()
        return self._next_expire if t is None else min(t, self._next_expire)

    def service(self) -> None:
        """Run what is due: the moves' timers, the sweep of idle records; then act on the events."""
        dp = self.dataplane
        now = self.clock()
        t = dp.next_deadline()
        if t is not None and t <= now:
            dp.poll(now)
        if now >= self._next_expire:
            self._next_expire = now + EXPIRE_INTERVAL
            dp.expire(now)
        self.flush()

    def tick(self) -> None:
        """Run the moves' timers now, due or not, and act on the events (tests drive time by hand)."""
        self.dataplane.poll(self.clock())
        self.flush()

    async def run_timers(self) -> None:
        """The timer task of a running gateway: sleeps until :meth:`next_deadline` (or until
        :meth:`wake` says it moved earlier), then :meth:`service`.  No fixed-rate tick."""
        self._wake = asyncio.Event()
        while True:
            delay = min(max(self.next_deadline() - self.clock(), 0.001), EXPIRE_INTERVAL)
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                self.service()
            except Exception:  # the loop must survive whatever one run does
                log.exception("gateway timers failed")

    def _report(self, sp: Splice, now: float) -> None:
        d = sp.describe()
        self.failover_stats.move_reported(sp.rec.service, sp.strategy, sp.regenerated_bytes)
        if sp.phase is Phase.FAILED:
            kind = "divergence" if (sp.reason or "").startswith("divergence") else "reset"
            self.events.add(kind, sp.reason or "move failed", service=sp.rec.service, backend=sp.target.name,
                            connection=sp.rec.id, now=now, **d)
        elif sp.phase is Phase.CLOSED and not sp.verifier.done:
            # ended before it was verified: the connection closed, was reset or moved again
            self.events.add("migration", "move ended before it was verified", service=sp.rec.service,
                            backend=sp.target.name, connection=sp.rec.id, now=now, outcome="ended", **d)
        else:
            self.events.add("migration", "moved", service=sp.rec.service, backend=sp.target.name,
                            connection=sp.rec.id, now=now, **d)
        lf = self.last_failover
        if lf and sp.rec.id in lf["pending"]:
            lf["pending"].discard(sp.rec.id)
            if not lf["pending"]:
                lf["duration_ms"] = round((now - lf["time"]) * 1000, 3)

    def _suspect(self, s: Suspect) -> None:
        key = (s.service, s.backend)
        self._probe_waiters.setdefault(key, []).append(s)
        if key in self._probing or self.health is None:
            if self.health is None:  # nothing to ask: let the close through
                for w in self._probe_waiters.pop(key, []):
                    self.dataplane.release_suspect(w)
            return
        self.failover_stats.close_held(s.service, s.backend, self.clock())  # a sign of death, if it is one
        self._probing[key] = asyncio.get_running_loop().create_task(self._probe_suspect(key))

    async def _probe_suspect(self, key: tuple[str, str]) -> None:
        service, backend = key
        health = self.health
        try:
            ok = health is not None and await health.probe_now(service, backend)
        except Exception as exc:  # a probe that cannot run says nothing good
            log.warning("probe of %s/%s failed to run: %s", service, backend, exc)
            ok = False
        finally:
            self._probing.pop(key, None)
        waiters = self._probe_waiters.pop(key, [])
        if ok:
            self.failover_stats.close_released(service, backend)
            for w in waiters:
                self.dataplane.release_suspect(w)
            return
        svc = self.dataplane.services[service]
        reason = f"{backend} closed {len(waiters)} connection(s) and failed a probe"
        try:
            if svc.active == backend:
                await self.failover_async(service, reason=reason, dead=True)
            else:
                for w in waiters:
                    rec = self.dataplane.table.by_id(w.conn_id)
                    if rec is not None and rec.backend == backend:
                        self.migrate(w.conn_id, svc.active, reason=reason)
        except (Conflict, NotFound) as exc:
            self.events.add("refusal", f"cannot move after {reason}: {exc}", service=service, backend=backend)
            for w in waiters:
                self.dataplane.release_suspect(w)
        self.failover_stats.close_released(service, backend)  # acted on (a failover took it already)
        self.flush()

    # --- restart -------------------------------------------------------------------------
    def restore(self, loaded: list[Loaded], *, takeover: bool = False) -> dict[str, Any]:
        """Connections read back from the checkpoint store after a restart (or, ``takeover``,
        from the pair's replicated store): re-attached, or — when tcpcp 6.1's rules refuse the
        checkpoint, or the configuration no longer has their service — reset cleanly.

        A connection moved by replay whose move had completed is restored spliced to its
        backup (its translation is in the checkpoint).  One caught mid-move: after a restart,
        reset on both sides, with an event saying so (``checkpoint.splice``: a restart of the
        gateway); at a takeover, re-attached to the backend it was moving from when that was
        its first move, and listed in ``restart`` (connection id, target) for the caller to
        move again once the target's half-replayed socket is fenced (:meth:`restart_move`); a
        later move is reset.  At a takeover no client byte can have bypassed the queues, so a
        backend ahead of the log is not taken for one (``Resyncing.bypass_possible``)."""
        mid_move, why = ("restart", "the takeover") if takeover else ("reset", "the restart")
        dp = self.dataplane
        now = self.clock()
        kept = reset = moved = 0
        restart: list[tuple[int, str]] = []
        for item in loaded:
            rec = item.rec
            svc = dp.services.get(rec.service)
            reason: str | None = None
            move: MoveState | None = None
            if item.move is not None:
                try:
                    move = move_from_state(json.loads(item.move))
                except ValueError as exc:  # a StateError, or not JSON
                    reason = f"its move state cannot be read back ({exc})"
            if svc is None or rec.backend not in svc.backends or rec.vip not in svc.vips or svc.port != rec.vport:
                reason = "its service or backend is no longer configured"
            elif rec.state in (TcpState.CLOSED, TcpState.TIME_WAIT):
                if dp.store is not None:
                    dp.store.drop_loaded(rec.id)
                continue
            elif reason is not None:
                pass
            elif move is not None and move.phase != "spliced" and mid_move == "restart" and rec.moves == 1 \
                    and move.old[0] in svc.backends and move.target[0] in svc.backends \
                    and (svc.backends[move.old[0]].addr(is_v6(rec.client_ip)), svc.backends[move.old[0]].port) \
                    == move.old[1:]:
                # its first move: the old backend's sequence space is the client's view, so the
                # connection goes on there while the target's half-replayed socket is fenced
                rec.backend, rec.backend_ip, rec.backend_port = move.old
                rec.moves = 0
                restart.append((rec.id, move.target[0]))
                move = None
                reason = check_resumable(rec, item.saved_at, now, self.config.checkpoint.msl)
            elif move is not None and move.phase != "spliced":
                reason = (f"{why} caught it mid-move to {move.target[0]}: the backup holds a half-replayed "
                          f"connection with the client's address, port and ISN, which a new SYN would land on, "
                          f"so the move is not restarted")
            elif move is not None:
                be = svc.backends[rec.backend]
                if (rec.backend, rec.backend_ip, rec.backend_port) != move.target or \
                        (be.addr(is_v6(rec.client_ip)), be.port) != move.target[1:]:
                    reason = "its service or backend is no longer configured"
                else:
                    reason = check_resumable(rec, item.saved_at, now, self.config.checkpoint.msl)
            elif rec.moves:
                reason = "it had been moved: the translation to its new backend is not in the checkpoint"
            else:
                reason = check_resumable(rec, item.saved_at, now, self.config.checkpoint.msl)
            if reason is None:
                try:
                    attached = dp.reattach(rec, now, move, bypass_possible=not takeover)
                except ValueError as exc:
                    reason = str(exc)
                else:
                    if attached:
                        kept += 1
                        moved += move is not None
                        continue
            reason = reason or "its client address and port are taken"
            reset += 1
            if svc is not None:
                dp.reset(rec, now)
            if dp.store is not None:
                dp.store.drop_loaded(rec.id)
            restart = [r for r in restart if r[0] != rec.id]
            self.events.add("reset", f"not resumed after {why}: {reason}", service=rec.service,
                            backend=rec.backend, connection=rec.id, now=now)
        for cid, target in restart:
            found = dp.table.by_id(cid)
            if found is not None:
                dp.probe_target(found, target)
        if loaded:
            self.events.add("restart", f"{kept} connection(s) re-attached after {why} "
                                       f"({moved} of them moved, spliced to their backup again; {len(restart)} caught "
                                       f"mid-move, to be moved again), {reset} reset",
                            now=now, reattached=kept, reset=reset, moved=moved, restarted=len(restart))
        out: dict[str, Any] = {"reattached": kept, "reset": reset}
        if mid_move == "restart":
            out["restart"] = restart
        return out

    async def restart_move(self, cid: int, target: str, timeout: float = 3.0) -> None:
        """A connection a takeover caught mid-move (:meth:`restore`): once the target's
        half-replayed socket is fenced (it answered the probe, or retransmitted, and got a RST at
        exactly its ``rcv_nxt``) or ``timeout`` passed, the move starts again."""
        dp = self.dataplane
        deadline = time.monotonic() + timeout
        while dp.fenced_at(cid) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.02)  # the RST ahead of the new SYN
        rec = dp.table.by_id(cid)
        if rec is None or rec.state in (TcpState.TIME_WAIT, TcpState.CLOSED):
            return
        reason = "the takeover caught it mid-move: the move restarts"
        try:
            self.migrate(cid, target, reason=reason)
        except (Conflict, NotFound) as exc:
            try:
                self.migrate(cid, None, reason=reason)
            except (Conflict, NotFound) as exc2:
                self.events.add("reset", f"the move caught by the takeover could not restart: {exc}; {exc2}",
                                service=rec.service, connection=cid)

    # --- what the API shows ---------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        dp = self.dataplane
        states: dict[str, int] = {}
        protected = 0
        for rec in dp.table:
            states[rec.state.value] = states.get(rec.state.value, 0) + 1
            protected += rec.protected
        per_queue = {("held" if i == 0 else "return" if i == 1 else str(i)): q.stats.as_dict()
                     for i, q in enumerate(self.queues)}
        lf = None
        if self.last_failover:
            lf = {k: v for k, v in self.last_failover.items() if k != "pending"}
            lf["pending"] = len(self.last_failover["pending"])
        return {
            "version": __version__,
            "uptime_seconds": round(self.clock() - self.started, 3),
            "queue_num": self.config.gateway.queue_num,
            "on_failure": self.config.gateway.on_failure,
            "connections": len(dp.table),
            "protected": protected,
            "moving": sum(1 for m in dp.modes.values() if isinstance(m, Spliced) and not m.verified),
            "translated": sum(1 for m in dp.modes.values() if isinstance(m, Spliced) and m.verified),
            "connections_by_state": states,
            "table": {
                "max_connections": dp.table.max_connections,
                "created": dp.table.created,
                "expired": dp.table.expired,
                "evicted": dp.table.evicted,
                "refused_full": dp.table.refused_full,
                "early_drops": dp.table.early_drops,
            },
            "loop": self.loop_stats() if self.loop_stats is not None else None,
            "history": self.history.stats(),
            "notify": self.notify_stats() if self.notify_stats is not None else [],
            "dataplane": dp.counters.as_dict(),
            "digest_search": memsearch.implementation(),   # the volatile-field search in use (memfind: SIMD)
            # the compiled fast path (appliance.dataplane.offload): flows offloaded, packets it
            # decided and left to the Python engine, by reason; None: off (python engine, or
            # gateway.fastpath = false)
            "fastpath": dp.offload.stats() if dp.offload is not None else None,
            "queues": per_queue,
            "last_failover": lf,
            "events": len(self.events),
            "pair": self.pair.status() if self.pair is not None else None,  # the gateway pair (issue 13)
        }

    def services(self) -> list[dict[str, Any]]:
        out = []
        counts: dict[tuple[str, str], int] = {}
        tracked: dict[tuple[str, str], int] = {}
        for rec in self.dataplane.table:
            k = (rec.service, rec.backend)
            tracked[k] = tracked.get(k, 0) + 1
            if rec.state not in (TcpState.TIME_WAIT, TcpState.CLOSED):
                counts[k] = counts.get(k, 0) + 1
        health = self.health.status(self.clock()) if self.health else {}
        for s in self.dataplane.services.values():
            out.append({
                "name": s.name,
                "vip": s.vip,
                "vip6": s.vip6,
                "port": s.port,
                "active_backend": s.active,
                "failover": {"auto": s.failover.auto, "mode": s.failover.mode, "verify": s.failover.verify},
                "backends": [
                    {
                        "name": b.name,
                        "address": b.address,
                        "address6": b.address6,
                        "port": b.port,
                        "active": b.name == s.active,
                        "admin_state": b.admin_state,
                        "health": health.get(f"{s.name}/{b.name}", {"state": "unknown"}),
                        "connections": counts.get((s.name, b.name), 0),
                        "tracked": tracked.get((s.name, b.name), 0),
                        "bytes_from_client": b.bytes_from_client,
                        "bytes_from_server": b.bytes_from_server,
                    }
                    for b in s.backends.values()
                ],
            })
        return out

    def connection_gauges(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        """Per service, what /metrics shows of the table — connections by state, protected ones,
        the largest commit lag and checkpoint age — from the records, without building a
        document per connection (a scrape must not cost the loop the whole table's documents)."""
        now = self.clock() if now is None else now
        planner = self.dataplane.store
        out: dict[str, dict[str, Any]] = {}
        for rec in self.dataplane.table:
            g = out.setdefault(rec.service, {"by_state": {}, "by_family": {}, "protected": 0, "lag_max": 0.0,
                                             "age_max": 0.0})
            st = rec.state.value
            g["by_state"][st] = g["by_state"].get(st, 0) + 1
            fam = "ipv6" if ":" in rec.client_ip else "ipv4"
            g["by_family"][fam] = g["by_family"].get(fam, 0) + 1
            g["protected"] += bool(rec.protected)
            if rec.log is not None:
                g["lag_max"] = max(g["lag_max"], float(rec.log.end - rec.commit_offset))
            if planner is not None:  # memory mode: the record is the checkpoint (age 0)
                age = planner.checkpoint_age(rec.id, now)
                if age is not None:
                    g["age_max"] = max(g["age_max"], round(age, 3))
        return out

    def connections_page(self, q: str | None = None, state: str | None = None, service: str | None = None,
                         backend: str | None = None, protected: bool | None = None, open_only: bool = False,
                         offset: int = 0, limit: int = 50) -> tuple[int, list[dict[str, Any]]]:
        """A filtered page of connections in id order, and how many matched: the records are
        filtered and paged first, and only the page's documents are built (a document costs
        microseconds; the table may hold tens of thousands)."""
        found = [rec for rec in self.dataplane.table
                 if record_matches(rec, q, state, service, backend, protected, open_only)]
        found.sort(key=lambda r: r.id)
        now = self.clock()
        return len(found), [self._connection_doc(r, now) for r in found[offset:offset + limit]]

    def connection(self, cid: int) -> dict[str, Any] | None:
        rec = self.dataplane.table.by_id(cid)
        return None if rec is None else self._connection_doc(rec, self.clock())

    def _connection_doc(self, rec: Any, now: float) -> dict[str, Any]:
        d = rec.to_dict(now)
        d["move"] = self.dataplane.describe_move(rec.id)
        ht = self.dataplane.http.get(rec.id)
        d["http"] = ht.describe() if ht is not None else None
        planner = self.dataplane.store
        if planner is None:
            d["checkpoint_age"] = 0.0 if rec.log is not None else None  # memory: the record is the checkpoint
        else:
            age = planner.checkpoint_age(rec.id, now)
            d["checkpoint_age"] = None if age is None else round(age, 3)
        return d

    # --- checkpoints (tcpcp 6, 7) -----------------------------------------------------------
    def store_status(self) -> dict[str, Any]:
        st = self.config.store
        planner = self.dataplane.store
        doc: dict[str, Any] = {"mode": st.mode, "path": st.path if st.mode == "disk" else None,
                               "commit_interval": st.commit_interval, "max_total_bytes": st.max_total_bytes,
                               "error": self.store_error, "held_acks": len(self.dataplane.held)}
        if planner is not None:
            doc.update(planner.stats.as_dict())
        return doc

    def store_commits(self, cid: int | None = None, since: float = 0.0) -> list[dict[str, Any]]:
        """The commit log: when each connection's commit point moved (disk mode)."""
        planner = self.dataplane.store
        return planner.commits(cid, since) if planner is not None else []

    def export_checkpoint(self, cid: int) -> dict[str, Any]:
        """The connection's ICI, log and digest as a signed, portable document."""
        key = self.config.checkpoint.key
        if not key:
            raise Conflict("no checkpoint key is configured ([checkpoint] key or key_file)")
        rec = self.dataplane.table.by_id(cid)
        if rec is None:
            raise NotFound(f"no connection {cid}")
        if rec.log is None:
            raise Conflict(f"connection {cid} has no client log (picked up mid-stream)")
        now = self.clock()
        return export_document(rec, key, now, checkpoint_time=now)

    def import_checkpoint(self, raw: bytes | str | dict[str, Any]) -> dict[str, Any]:
        """Take over a connection from a signed checkpoint document: verified,
        sanity-checked (tcpcp 7), refused when too old (tcpcp 6.1), then
        tracked and protected like one of ours.  Raises ``CheckpointError``
        (a ValueError naming the field) or Conflict."""
        key = self.config.checkpoint.key
        if not key:
            raise Conflict("no checkpoint key is configured ([checkpoint] key or key_file)")
        svc_limits = max((s.failover.max_log_bytes for s in self.config.services), default=16 << 20)
        imp = import_document(raw, key, self.config.services, ImportLimits(max_log_bytes=svc_limits))
        rec = imp.rec
        now = self.clock()
        why = check_resumable(rec, imp.checkpoint_time, now, self.config.checkpoint.msl)
        if why is not None:
            self.events.add("refusal", f"checkpoint import refused: {why}", service=rec.service, now=now)
            raise CheckpointError("checkpoint_time", why)
        dp = self.dataplane
        if dp.table.get(rec.key) is not None:
            raise Conflict(f"a connection from {with_port(rec.client_ip, rec.client_port)} to {with_port(rec.vip, rec.vport)} "
                           "is already tracked")
        rec.id = dp.table.next_id()
        rec.log, rec.digest = imp.log, imp.digest
        rec.moves = 0
        if not dp.reattach(rec, now):
            raise Conflict("the connection table is full")
        if dp.store is None:
            rec.commit_offset = rec.log.end
            rec.commit_fin = rec.log.fin_offset is not None
        self.events.add("checkpoint", "imported", service=rec.service, backend=rec.backend, connection=rec.id,
                        now=now, log_bytes=rec.log.end)
        return rec.to_dict(now)
