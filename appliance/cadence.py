"""The group commit's cadence: starts at least ``interval`` apart, not ``interval`` after each end.

A commit cycle used to sleep the whole interval after each write, so an acknowledgment held for
its commit waited the interval *plus* the write (the fsync, or the standby's WAIT).  With the
starts paced instead, a write that took longer than the interval is followed at once (what came
meanwhile waits no longer than it must) and one that took less waits only the rest: a commit
every ``max(interval, write time)``, and still no more than one per interval.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable


class Cadence:
    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self.last = -math.inf   # when the current cycle started

    def delay(self) -> float:
        """Seconds to wait before the next cycle may start."""
        return max(0.0, self.last + self.interval - self.clock())

    def started(self) -> None:
        self.last = self.clock()

    async def next(self) -> None:
        """Wait for the next cycle's start (at least a pass through the event loop)."""
        await asyncio.sleep(self.delay())
        self.started()
