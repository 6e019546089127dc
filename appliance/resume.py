"""Resume mode: connections moved by the backends' endpoint agents (TCP_REPAIR).

Theory of operation
-------------------
A service with ``failover.mode = "resume"`` has an agent (``appliance
agent``) on every backend.  The gateway keeps its usual wire checkpoint of
every connection; the agents re-create endpoints with ``TCP_REPAIR`` and hand
them to the application (``docs/ENDPOINT_PASSING.md``).  Because the endpoint
is re-created with the very sequence numbers the client knows, the gateway
then only rewrites the destination address (``Dataplane.switch``); the
kernel NAT already gives every backend's return path the VIP.

**Planned move** (:meth:`ResumeController.migrate`, ``POST
/api/v1/connections/{id}/migrate {"to", "mode": "resume"}``), tcpcp's
get/create/activate across two live hosts:

1. *hold*: the data plane isolates the connection (client packets logged and
   dropped — data segments and the newest pure ACK kept —, the origin's
   packets dropped);
2. *export*: the origin's agent takes the socket by its address pair (the
   backend sees the client's real address: ``{local: backend ip:port,
   remote: client ip:port}``), reads its ICI (repair mode: the origin is
   silent from here on) and has the destination's agent create it, silent,
   answering from the destination's own service address (``to_local``);
   the stream bases come from the gateway's record, so the offsets are right
   however often the connection moved before;
3. *switch*: the record points at the destination (address rewrite only);
4. *activate*: the destination's agent leaves repair mode (its window probe
   reaches the client, whose answer is kept by the hold) and hands the
   socket to the application;
5. *release*: the hold ends, the kept client segments are re-injected to the
   destination; then the origin's agent *finishes* the export: the origin
   socket, still open in its application, is disconnected silently so the
   address pair is free for a move back (A→B→A).

A failed step rolls back: the destination's pending endpoint is released,
the origin socket leaves repair mode (``rollback``), the forwarding is put
back, the hold ends; the event says which step failed and why.

**Resume after a failure** (:meth:`ResumeController.resume_from_wire`): the
active backend died (health checker, or a probe after a held close).  Each
protected connection is re-created on the backup from the gateway's *wire*
checkpoint: ``ici_from_record(rec, client_bytes=log[consumed:],
consumed=consumed)``, imported silent, switched, activated.  ``consumed`` is
the input offset the application last reported for the connection
(``agent_sdk.report``, collected from every agent by :meth:`heartbeat`),
with its state blob; without a report it is 0, the conservative choice: the
application gets its whole input again and must rebuild its state from it
and the offsets (the example file server does).  The new sender starts at
what the client acknowledged; the client may already have more, so its ACKs
above the new sender's ``snd_nxt`` are absorbed (I6,
``Dataplane.resumed_from_wire``).  A connection that cannot be resumed (its
log overflowed, a checkpoint beyond tcpcp 6.1's limits, the agent refused)
is reset cleanly, with an event.

Agent requests are blocking socket calls; they run on a thread pool
(``run_in_executor``), never on the event loop that carries the packets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Protocol

from checkpoint.addr import is_v6, with_port
from checkpoint.ici import ConnectionRecord, TcpState

from .agent import protocol as proto
from .config import Config
from .dataplane import BackendRuntime, Dataplane
from .events import EventLog

log = logging.getLogger("appliance")

Rpc = Callable[[str, str, dict[str, Any]], dict[str, Any]]  # (agent "ip:port", type, body) -> reply body


class ResumeFailed(RuntimeError):
    """A resume-mode move failed; ``step`` names where."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step


def hostport(addr: str, port: int) -> str:
    """``ADDR:PORT`` as the agents' protocol writes it (``[ADDR]:PORT`` for IPv6)."""
    return with_port(addr, port)


class ResumeHost(Protocol):
    """What the resume controller needs of the gateway that owns it."""

    config: Config
    clock: Callable[[], float]
    dataplane: Dataplane
    events: EventLog

    def flush(self) -> None: ...

    def resume_done(self, cid: int) -> None: ...


class ResumeController:
    """Drives the agents for the gateway's resume-mode moves (see the module doc)."""

    def __init__(self, gw: ResumeHost, rpc: Rpc | None = None, workers: int = 16) -> None:
        self.gw = gw
        cfg = gw.config.agent
        self.key = cfg.key
        self.timeout = cfg.timeout
        self.rpc: Rpc = rpc or self._request
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="agent-rpc")
        # agent "ip:port" -> {(local, remote): report}; kept from the last poll that answered
        self.reports: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
        self.agent_errors: dict[str, str] = {}
        self.moving: set[int] = set()

    # --- agent requests --------------------------------------------------------------------
    def _request(self, agent: str, type_: str, body: dict[str, Any]) -> dict[str, Any]:
        return proto.request(proto.parse_hostport(agent, "agent"), type_, body, self.key, timeout=self.timeout)

    async def call(self, agent: str, type_: str, body: dict[str, Any]) -> dict[str, Any]:
        """One agent request on the thread pool (the event loop never blocks on it)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self.rpc, agent, type_, body)

    # --- the applications' reports ------------------------------------------------------------
    async def poll_reports(self) -> None:
        """Ask every agent for its applications' reports (one round)."""
        agents = sorted({b.agent for s in self.gw.config.services for b in s.backends if b.agent})

        async def one(agent: str) -> None:
            try:
                reply = await self.call(agent, "reports", {})
            except Exception as exc:  # a dead host's agent: keep its last reports
                self.agent_errors[agent] = f"{type(exc).__name__}: {exc}"
                return
            self.agent_errors.pop(agent, None)
            self.reports[agent] = {(r["local"], r["remote"]): r for r in reply.get("reports", [])
                                   if isinstance(r, dict) and "local" in r and "remote" in r}

        await asyncio.gather(*(one(a) for a in agents))

    async def heartbeat(self, interval: float) -> None:
        while True:
            try:
                await self.poll_reports()
            except Exception:  # the loop must survive whatever one round does
                log.exception("agent heartbeat failed")
            await asyncio.sleep(interval)

    def report_for(self, rec: ConnectionRecord, be: BackendRuntime) -> dict[str, Any] | None:
        """The last report of ``rec``'s application on backend ``be``, if any."""
        agent = self._agent(rec.service, be)
        return self.reports.get(agent or "", {}).get(
            (hostport(be.addr(is_v6(rec.client_ip)), be.port), hostport(rec.client_ip, rec.client_port)))

    def _agent(self, service: str, be: BackendRuntime) -> str | None:
        sc = self.gw.config.service(service)
        bc = sc.backend(be.name) if sc is not None else None
        return bc.agent if bc is not None else None

    # --- planned move ---------------------------------------------------------------------------
    async def migrate(self, rec: ConnectionRecord, origin: BackendRuntime, target: BackendRuntime,
                      reason: str) -> dict[str, Any]:
        """Move ``rec``'s endpoint from ``origin`` to ``target`` (both alive).
        Returns the ``migration`` event; raises :class:`ResumeFailed` after
        rolling back (a ``refusal`` event says why)."""
        gw, dp = self.gw, self.gw.dataplane
        src_agent, dst_agent = self._agent(rec.service, origin), self._agent(rec.service, target)
        if not src_agent or not dst_agent:
            raise ResumeFailed("agent", f"backend {origin.name if not src_agent else target.name!r} has no agent")
        local = hostport(origin.addr(is_v6(rec.client_ip)), origin.port)
        remote = hostport(rec.client_ip, rec.client_port)
        self.moving.add(rec.id)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        dp.hold(rec, gw.clock())
        step, handle, switched = "export", None, False
        try:
            body: dict[str, Any] = {"local": local, "remote": remote, "to": dst_agent,
                                    "to_local": hostport(target.addr(is_v6(rec.client_ip)), target.port), "activate": False,
                                    "port_choice": "same"}
            if rec.server.data_base is not None and rec.client.data_base is not None:
                body["send_base"], body["recv_base"] = rec.server.data_base, rec.client.data_base
            reply = await self.call(src_agent, "export", body)
            handle = reply.get("handle")
            if not isinstance(handle, str):
                raise proto.AgentError(f"the destination answered without a handle: {reply!r:.200}")
            t1 = time.perf_counter()
            timings["export"] = (t1 - t0) * 1000
            step = "switch"
            dp.switch(rec, target)
            switched = True
            t2 = time.perf_counter()
            timings["switch"] = (t2 - t1) * 1000
            step = "activate"
            await self.call(dst_agent, "activate", {"handle": handle})
            t3 = time.perf_counter()
            timings["activate"] = (t3 - t2) * 1000
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
            rolled = await self._roll_back(rec, origin, src_agent, dst_agent, local, remote, handle, switched, step)
            dp.release(rec)
            gw.flush()
            self.moving.discard(rec.id)
            gw.events.add("refusal", f"{reason}: resume move to {target.name} failed at {step}: {why}; {rolled}",
                          service=rec.service, backend=origin.name, connection=rec.id, now=gw.clock(),
                          step=step, to=target.name, mode="resume")
            raise ResumeFailed(step, f"{why}; {rolled}") from exc
        reinjected = dp.release(rec)
        gw.flush()
        t4 = time.perf_counter()
        timings["hold_to_release"] = (t4 - t0) * 1000
        rec.moves += 1
        finished = "finished"
        try:
            await self.call(src_agent, "finish", {"local": local, "remote": remote})
        except Exception as exc:  # the move stands; the origin's copy lingers in repair mode (silent)
            finished = f"origin copy not disconnected: {type(exc).__name__}: {exc}"
        timings["finish"] = (time.perf_counter() - t4) * 1000
        self.moving.discard(rec.id)
        ev = gw.events.add("migration", f"{reason}: resumed", service=rec.service, backend=target.name,
                           connection=rec.id, now=gw.clock(),
                           **{"from": origin.name, "outcome": "resumed", "mode": "resume",
                              "timings_ms": {k: round(v, 3) for k, v in timings.items()},
                              "reinjected": reinjected, "in_offset": reply.get("in_offset"),
                              "out_offset": reply.get("out_offset"), "origin": finished,
                              "queued": _queued(reply)})
        return ev.to_dict()

    async def _roll_back(self, rec: ConnectionRecord, origin: BackendRuntime, src_agent: str, dst_agent: str,
                         local: str, remote: str, handle: str | None, switched: bool, step: str) -> str:
        """Undo a failed planned move; says what was done."""
        done = []
        if switched:
            self.gw.dataplane.switch(rec, origin)
            done.append("forwarding back to " + origin.name)
        if handle is not None:
            try:
                await self.call(dst_agent, "release", {"handle": handle})
                done.append("destination endpoint released")
            except Exception as exc:
                done.append(f"destination release failed ({exc})")
        if step != "export" or handle is None:
            # the agent rolls a failed import back itself; anything else (a timeout, a
            # failed activation) leaves the origin in repair mode: take it out
            try:
                await self.call(src_agent, "rollback", {"local": local, "remote": remote})
                done.append("origin socket out of repair mode")
            except Exception as exc:
                done.append(f"origin rollback: {exc}")
        return "rolled back: " + ", ".join(done) if done else "nothing to roll back"

    # --- resume after a failure ------------------------------------------------------------------
    async def resume_from_wire(self, rec: ConnectionRecord, old: BackendRuntime, target: BackendRuntime,
                               reason: str) -> str:
        """Re-create ``rec`` on ``target`` from the wire checkpoint (``old``
        died).  The caller has held it already.  Returns "resumed" or "reset"."""
        from checkpoint.repair_ici import IciError, check_ici, ici_from_record
        from checkpoint.resurrect import check_resumable

        gw, dp = self.gw, self.gw.dataplane
        dst_agent = self._agent(rec.service, target)
        now = gw.clock()
        t0 = time.perf_counter()
        handle = None
        switched = False
        rep = self.report_for(rec, old)
        try:
            if not dst_agent:
                raise ResumeFailed("agent", f"backend {target.name!r} has no agent")
            why = rec.unprotected_reason
            logb = rec.log
            if why is None and logb is None:
                why = "no client log (picked up mid-stream)"
            if why is not None or logb is None:
                raise ResumeFailed("checkpoint", f"unprotected: {why}")
            why = check_resumable(rec, rec.last_seen, now, gw.config.checkpoint.msl)
            if why is not None:
                raise ResumeFailed("checkpoint", why)
            consumed, state, source = 0, "", "none (0: the application re-reads its input)"
            if rep is not None and isinstance(rep.get("in_offset"), int) and 0 <= rep["in_offset"] <= logb.end:
                consumed, state, source = rep["in_offset"], str(rep.get("app_state", "")), "reported"
            client_bytes = logb.read(consumed, logb.end - consumed)
            ici = ici_from_record(rec, client_bytes=client_bytes, consumed=consumed,
                                  local_addr=target.addr(is_v6(rec.client_ip)), local_port=target.port)
            check_ici(ici)   # the gateway's own sanity check before anything is sent
            reply = await self.call(dst_agent, "import", {"ici": ici.to_dict(), "activate": False,
                                                          "port_choice": "same", "app_state": state})
            handle = reply.get("handle")
            if not isinstance(handle, str):
                raise proto.AgentError(f"the backup answered without a handle: {reply!r:.200}")
            dp.switch(rec, target)
            switched = True
            dp.resumed_from_wire(rec, ici.snd_nxt)
            await self.call(dst_agent, "activate", {"handle": handle})
        except (Exception, asyncio.CancelledError) as exc:
            why = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ResumeFailed) else str(exc)
            if isinstance(exc, IciError):
                why = f"checkpoint: {exc}"
            if handle is not None and dst_agent:
                try:
                    await self.call(dst_agent, "release", {"handle": handle})
                except Exception:
                    pass
            if switched:
                dp.forget_resumed(rec)
            dp.release(rec)
            if rec.state not in (TcpState.TIME_WAIT, TcpState.CLOSED):
                dp.reset(rec, gw.clock())
            gw.flush()
            gw.events.add("reset", f"{reason}: not resumed on {target.name}: {why}", service=rec.service,
                          backend=target.name, connection=rec.id, now=gw.clock(), mode="resume")
            gw.resume_done(rec.id)
            return "reset"
        reinjected = dp.release(rec)
        gw.flush()
        rec.moves += 1
        ms = (time.perf_counter() - t0) * 1000
        gw.events.add("migration", f"{reason}: resumed from the wire checkpoint", service=rec.service,
                      backend=target.name, connection=rec.id, now=gw.clock(),
                      **{"from": old.name, "outcome": "resumed", "mode": "resume", "source": "wire",
                         "consumed": consumed, "consumed_from": source, "in_offset": reply.get("in_offset"),
                         "out_offset": reply.get("out_offset"), "reinjected": reinjected,
                         "timings_ms": {"resume": round(ms, 3)}})
        gw.resume_done(rec.id)
        return "resumed"

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _queued(reply: dict[str, Any]) -> int | None:
    """Bytes the endpoint carried in its send queue (written, not acknowledged)."""
    out, acked = reply.get("out_offset"), reply.get("acked_offset")
    return out - acked if isinstance(out, int) and isinstance(acked, int) else None
