"""How long the event loop is kept from its other work: the longest callbacks it runs.

Theory of operation
-------------------
The gateway's one loop carries every packet (the queues are readers on it), the API, the health
checks and the timers; a callback that runs long delays all of them (packets wait in the kernel's
queue).  :class:`LoopMonitor` times every callback the loop runs — asyncio's ``Handle._run``,
which every ready callback, task step and reader goes through — with ``perf_counter`` (about
half a microsecond a callback), and keeps: the longest one and what it was, a histogram of
callbacks over a millisecond, and the recent stalls over :data:`RECENT_MS` with their times, so
that a benchmark can read the longest stall during a failover.  Installed by ``appliance run``
only (it patches the class, for every loop of the process).
"""

from __future__ import annotations

import asyncio.events
import time
from collections import deque
from typing import Any

BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
RECENT_MS = 2.0


class LoopMonitor:
    def __init__(self) -> None:
        self.max_ms = 0.0
        self.max_at: float | None = None
        self.max_callback: str | None = None
        self.histogram = [0] * (len(BUCKETS_MS) + 1)   # callbacks over 1 ms, by upper bound
        self.recent: deque[tuple[float, float, str]] = deque(maxlen=512)  # (time, ms, callback)
        self._installed = False

    def record(self, seconds: float, what: object) -> None:
        ms = seconds * 1000
        i = 0
        while i < len(BUCKETS_MS) and ms > BUCKETS_MS[i]:
            i += 1
        self.histogram[i] += 1
        now = time.time()
        if ms >= RECENT_MS:
            self.recent.append((now, round(ms, 3), _describe(what)))
        if ms > self.max_ms:
            self.max_ms, self.max_at, self.max_callback = ms, now, _describe(what)

    def install(self) -> None:
        """Time every callback of every asyncio loop in this process from now on."""
        if self._installed:
            return
        self._installed = True
        orig = asyncio.events.Handle._run
        perf = time.perf_counter
        mon = self

        def _run(handle: asyncio.events.Handle) -> None:
            t0 = perf()
            try:
                orig(handle)
            finally:
                dt = perf() - t0
                if dt > 0.001:
                    mon.record(dt, handle)

        asyncio.events.Handle._run = _run  # type: ignore[method-assign,assignment]

    def stats(self, since: float | None = None) -> dict[str, Any]:
        """The figures for the status document; with ``since`` (a time), also every recent stall
        of :data:`RECENT_MS` or more after it (``GET /api/v1/loop``)."""
        out = self.summary()
        if since is not None:
            out["recent_stalls"] = [{"time": t, "ms": ms, "callback": what} for t, ms, what in self.recent
                                    if t >= since]
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "max_stall_ms": round(self.max_ms, 3),
            "max_stall_at": self.max_at,
            "max_stall_callback": self.max_callback,
            "stalls_by_ms": {f"le_{b}" if i < len(BUCKETS_MS) else "more": n
                             for i, (b, n) in enumerate(zip((*BUCKETS_MS, None), self.histogram))},
        }


def _describe(handle: object) -> str:
    cb = getattr(handle, "_callback", None)
    name = getattr(cb, "__qualname__", None) or repr(cb)
    owner = getattr(cb, "__self__", None)
    if owner is not None and hasattr(owner, "get_coro"):  # a task step: name the coroutine
        coro = owner.get_coro()
        name = getattr(coro, "__qualname__", name)
    return str(name)[:200]
