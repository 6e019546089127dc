"""Health checks of the backends: is each one up, and since when.

Theory of operation
-------------------

Each backend of each service has a :class:`BackendHealth`, a state machine
free of I/O that is fed probe results with the time injected::

               first result ok                 `fall` consecutive failures
    unknown ──────────────────> up ───────────────────────────────────────> down
       │                         ^                                            │
       │ `fall` failures first   └──────── `rise` consecutive successes ──────┘
       └──────────────────────────────────────────────────────────────────> down

A first success decides at once (an appliance that has just started must
know where to send new connections); *down* always takes ``fall``
consecutive failures, from unknown too — a link that is still coming up
when the appliance starts must not fail its service over.  After that,
hysteresis keeps one lost probe from triggering a failover and one lucky
probe from ending one.  The
machine keeps counters and the time spent down, for operators, and
``fail_since``: when the first failed probe since the last success started,
the backend's death as the checks can know it (the failover decision's
histogram measures from there, :mod:`appliance.failover_stats`).

The probes are the I/O: :func:`probe_tcp` (a connect) and :func:`probe_http`
(a ``GET`` whose status line must fall in the expected range).  Both return
``(ok, latency, detail)`` and never raise for a network failure.

:class:`HealthChecker` runs one asyncio task per :class:`Target`, starting a
probe every ``interval`` seconds (the schedule does not drift by the probe's
own duration; a probe that overruns makes the next one start at once), and
calls ``on_change(target, old, new, detail)`` on each transition.  An
exception in the callback is logged and the checks go on.  ``probe_now``
runs one out-of-band probe, recorded like a scheduled one — for an operator
or a failover that wants a fresh answer before acting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger("appliance.health")

UNKNOWN, UP, DOWN = "unknown", "up", "down"


@dataclass(frozen=True, slots=True)
class HealthConfig:
    check: str = "tcp"                  # "tcp" | "http"
    interval: float = 0.1               # seconds between probe starts
    timeout: float | None = None        # None: the interval
    rise: int = 2                       # consecutive successes to go down -> up
    fall: int = 3                       # consecutive failures to go up -> down
    path: str = "/"                     # http only
    expect: tuple[int, int] = (200, 399)  # http statuses that count as up

    @property
    def probe_timeout(self) -> float:
        return self.interval if self.timeout is None else self.timeout


class BackendHealth:
    """The up/down state machine of one backend (see the module docstring)."""

    def __init__(self, rise: int = 2, fall: int = 3) -> None:
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be at least 1")
        self.rise = rise
        self.fall = fall
        self.state = UNKNOWN
        self.checks = 0
        self.failures = 0
        self.consecutive_ok = 0
        self.consecutive_fail = 0
        self.last_result: str | None = None     # "ok" | "fail"
        self.last_detail = ""
        self.last_latency: float | None = None
        self.last_check: float | None = None
        self.last_change: float | None = None
        self.transitions = 0
        self.downtime_total = 0.0               # closed down periods only; see downtime()
        self._down_since: float | None = None
        # when the first failed probe since the last success started: the backend's death as
        # the checks can know it (None while the last probe succeeded)
        self.fail_since: float | None = None

    def record(self, ok: bool, latency: float | None, now: float, detail: str,
               started: float | None = None) -> tuple[str, str] | None:
        """Feed one probe result (``now``: when it ended; ``started``: when it began, default
        ``now``); returns ``(old, new)`` if the state changed."""
        self.checks += 1
        self.last_result = "ok" if ok else "fail"
        self.last_detail = detail
        self.last_latency = latency
        self.last_check = now
        if ok:
            self.consecutive_ok += 1
            self.consecutive_fail = 0
            self.fail_since = None
        else:
            if self.consecutive_fail == 0:
                self.fail_since = now if started is None else started
            self.failures += 1
            self.consecutive_fail += 1
            self.consecutive_ok = 0

        old = self.state
        if old == UNKNOWN and ok:
            new = UP
        elif old in (UNKNOWN, UP) and self.consecutive_fail >= self.fall:
            new = DOWN
        elif old == DOWN and self.consecutive_ok >= self.rise:
            new = UP
        else:
            return None
        self._enter(new, now)
        return old, new

    def _enter(self, new: str, now: float) -> None:
        if self._down_since is not None:
            self.downtime_total += max(0.0, now - self._down_since)
            self._down_since = None
        if new == DOWN:
            self._down_since = now
        self.state = new
        self.last_change = now
        self.transitions += 1

    def downtime(self, now: float | None = None) -> float:
        """Seconds spent down; with ``now``, including the ongoing down period."""
        ongoing = max(0.0, now - self._down_since) if now is not None and self._down_since is not None else 0.0
        return self.downtime_total + ongoing

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        return {
            "state": self.state,
            "rise": self.rise,
            "fall": self.fall,
            "checks": self.checks,
            "failures": self.failures,
            "consecutive_ok": self.consecutive_ok,
            "consecutive_fail": self.consecutive_fail,
            "last_result": self.last_result,
            "last_detail": self.last_detail,
            "last_latency": self.last_latency,
            "last_check": self.last_check,
            "last_change": self.last_change,
            "transitions": self.transitions,
            "fail_since": self.fail_since,
            "downtime_total": self.downtime(now),
        }


# --- probes ---------------------------------------------------------------------

def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):          # asyncio.TimeoutError is TimeoutError (3.11)
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


async def _close(writer: asyncio.StreamWriter | None, timeout: float) -> None:
    if writer is None:
        return
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), timeout)


async def probe_tcp(address: str, port: int, timeout: float) -> tuple[bool, float | None, str]:
    """Connect and close; ``(True, seconds, "connected")`` on success."""
    start = time.monotonic()
    writer: asyncio.StreamWriter | None = None
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), timeout)
        return True, time.monotonic() - start, "connected"
    except (OSError, asyncio.TimeoutError) as exc:
        return False, None, _describe(exc)
    finally:
        await _close(writer, timeout)


async def probe_http(address: str, port: int, path: str, timeout: float,
                     expect: tuple[int, int] = (200, 399)) -> tuple[bool, float | None, str]:
    """``GET path``; up if the status line's code is within ``expect``."""
    start = time.monotonic()
    writer: asyncio.StreamWriter | None = None

    async def exchange() -> bytes:
        nonlocal writer
        reader, writer = await asyncio.open_connection(address, port)
        host = f"[{address}]" if ":" in address else address  # RFC 7230: an IPv6 literal in brackets
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
            f"User-Agent: appliance-health\r\n\r\n".encode("latin-1")
        )
        await writer.drain()
        return await reader.readline()

    try:
        line = await asyncio.wait_for(exchange(), timeout)
    except (OSError, asyncio.TimeoutError, EOFError, ValueError) as exc:
        return False, None, _describe(exc)
    finally:
        await _close(writer, timeout)
    latency = time.monotonic() - start
    if not line:
        return False, latency, "closed without a response"
    parts = line.decode("latin-1").split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not (parts[1].isdigit() and len(parts[1]) == 3):
        return False, latency, f"bad status line {line[:60]!r}"
    status = int(parts[1])
    return expect[0] <= status <= expect[1], latency, f"HTTP {status}"


# --- the checker -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Target:
    service: str
    backend: str
    address: str
    port: int
    config: HealthConfig
    # a dual-stack backend's other address: each probe checks both (concurrently), and the
    # backend counts as up only when both answer (its IPv4 and IPv6 clients are both served)
    also: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.service}/{self.backend}"


OnChange = Callable[[Target, str, str, str], None]


class HealthChecker:
    """Probes every target on its own schedule and reports transitions."""

    def __init__(self, targets: list[Target], on_change: OnChange) -> None:
        self.targets = {t.key: t for t in targets}
        if len(self.targets) != len(targets):
            raise ValueError("two targets share a service/backend")
        self.health = {key: BackendHealth(t.config.rise, t.config.fall) for key, t in self.targets.items()}
        self.on_change = on_change
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    async def run(self) -> None:
        """Probe every target forever (until :meth:`stop` or cancellation).
        A ``stop()`` that came first wins: ``run`` then returns at once."""
        if self._stopping:
            return
        self._tasks = [asyncio.create_task(self._watch(t), name=f"health {t.key}")
                       for t in self.targets.values()]
        try:
            await asyncio.gather(*self._tasks)
        except asyncio.CancelledError:
            if not self._stopping:
                raise
        finally:
            for task in self._tasks:
                task.cancel()

    def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()

    async def probe_now(self, service: str, backend: str) -> bool:
        """One probe of that target at once, recorded like a scheduled one."""
        return await self._probe(self._target(service, backend))

    def state(self, service: str, backend: str) -> str:
        return self.health[self._target(service, backend).key].state

    def fail_since(self, service: str, backend: str) -> float | None:
        """When the first failed probe of that target since its last success started (None: none)."""
        return self.health[self._target(service, backend).key].fail_since

    def status(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        now = time.time() if now is None else now
        return {key: h.as_dict(now) for key, h in self.health.items()}

    # --- internals ---------------------------------------------------------------
    def _target(self, service: str, backend: str) -> Target:
        try:
            return self.targets[f"{service}/{backend}"]
        except KeyError:
            raise KeyError(f"no health target {service}/{backend}") from None

    async def _watch(self, target: Target) -> None:
        loop = asyncio.get_running_loop()
        interval = target.config.interval
        next_start = loop.time()
        while not self._stopping:
            await self._probe(target)
            next_start += interval
            delay = next_start - loop.time()
            if delay < 0:                   # the probe overran: start the next one now
                next_start, delay = loop.time(), 0.0
            await asyncio.sleep(delay)

    @staticmethod
    async def _probe_one(address: str, port: int, cfg: HealthConfig) -> tuple[bool, float | None, str]:
        if cfg.check == "http":
            return await probe_http(address, port, cfg.path, cfg.probe_timeout, cfg.expect)
        return await probe_tcp(address, port, cfg.probe_timeout)

    async def _probe(self, target: Target) -> bool:
        cfg = target.config
        started = time.time()
        try:
            addrs = (target.address, *target.also)
            results = await asyncio.gather(*(self._probe_one(a, target.port, cfg) for a in addrs))
            ok, latency, detail = results[0]
            if target.also:
                failed = [f"{a}: {r[2]}" for a, r in zip(addrs, results) if not r[0]]
                ok = not failed
                latency = max((r[1] for r in results if r[1] is not None), default=None) if ok else None
                detail = "; ".join(failed) if failed else detail
        except Exception as exc:            # a probe bug must not stop the checks
            log.exception("health probe of %s failed", target.key)
            ok, latency, detail = False, None, f"probe error: {exc}"
        change = self.health[target.key].record(ok, latency, time.time(), detail, started)
        if change is not None:
            old, new = change
            log.info("health %s: %s -> %s (%s)", target.key, old, new, detail)
            try:
                self.on_change(target, old, new, detail)
            except Exception:
                log.exception("health on_change callback failed for %s", target.key)
        return ok
