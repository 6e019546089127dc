"""appliance.cadence: group commits start at least an interval apart, and a write that took
longer than the interval is followed at once (not after another whole interval)."""

from __future__ import annotations

import asyncio

from appliance.cadence import Cadence


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_the_first_cycle_starts_at_once_then_the_rest_of_the_interval_is_waited() -> None:
    clk = Clock()
    c = Cadence(0.005, clk)
    assert c.delay() == 0.0
    c.started()
    clk.t += 0.002                       # a quick write (2 ms)
    assert abs(c.delay() - 0.003) < 1e-9  # only the rest of the interval
    clk.t += 0.003
    assert c.delay() == 0.0


def test_a_write_longer_than_the_interval_is_followed_at_once() -> None:
    clk = Clock()
    c = Cadence(0.005, clk)
    c.started()
    clk.t += 0.020                       # a slow fsync: 20 ms
    assert c.delay() == 0.0
    c.started()
    assert abs(c.delay() - 0.005) < 1e-9  # and the next one waits a whole interval again


def test_next_waits_on_the_event_loop_and_marks_the_start() -> None:
    async def run() -> tuple[float, float]:
        c = Cadence(0.01)
        await c.next()
        first = c.last
        await c.next()
        return first, c.last
    first, second = asyncio.run(run())
    assert second - first >= 0.0099
