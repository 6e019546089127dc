"""appliance.replication_link: the replication stream over real TCP on 127.0.0.1 — two asyncio
endpoints, an active (Replicator) listening and a standby (Replica) dialling: batches flow, ACKs
come back, a dropped connection reconnects and resends, a long outage degrades the active and a
restarted standby is caught up by a snapshot.  No root."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Callable

from appliance.replication_link import ReplicationLink
from checkpoint.replication import Append, Op, Record, Replica, Replicator, Table, apply_ops


async def until(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


class Active:
    """What the gateway's integration does around a Replicator: snapshot on request, collect
    events, submit and flush."""

    def __init__(self) -> None:
        self.r = Replicator("gw1", 1, ack_timeout=0.2, lease=0.3, heartbeat=0.05)
        self.model: Table = {}
        self.events: list[str] = []
        self.link = ReplicationLink(self.r, listen=("127.0.0.1", 0), on_change=self.changed, tick_interval=0.005,
                                    idle_timeout=1.0)

    def changed(self) -> None:
        now = time.monotonic()
        if self.r.wants_snapshot:
            self.r.snapshot(copy.deepcopy(self.model), now)
        self.events += [f"{e.kind}: {e.message}" for e in self.r.pop_events()]

    def submit(self, ops: list[Op]) -> int:
        apply_ops(self.model, ops)
        seq = self.r.submit(ops, time.monotonic())
        self.link.flush()
        return seq

    def append(self, cid: int, data: bytes) -> int:
        rc = self.model.get(cid)
        ops: list[Op] = [] if rc is not None else [Record(cid, {"id": cid})]
        return self.submit([*ops, Append(cid, rc.log_end if rc else 0, data)])


def standby_link(p: Replica, port: int) -> ReplicationLink:
    return ReplicationLink(p, dial=("127.0.0.1", port), tick_interval=0.005, idle_timeout=1.0,
                           backoff_min=0.01, backoff_max=0.1)


def test_batches_flow_acks_return_and_a_dropped_connection_resyncs():
    async def main() -> None:
        a = Active()
        a.append(1, b"before the standby")
        await a.link.start()
        port = a.link.port
        assert port is not None
        p = Replica("gw2")
        b = standby_link(p, port)
        await b.start()
        try:
            await until(lambda: a.r.in_sync and p.in_sync(time.monotonic()), what="in sync after the snapshot")
            assert p.table == a.model
            assert sum("snapshot of 1 connections" in e for e in a.events) == 1

            # batches, pipelined: each commits only once the standby acknowledged it
            last = 0
            for i in range(200):
                last = a.append(1 + i % 3, bytes([i % 256]) * 1448)
                assert a.r.released_through < last or p.applied >= last
            await until(lambda: a.r.released_through == last, what="every batch acknowledged")
            assert p.applied == last and p.table == a.model and a.r.in_sync

            # the connection breaks (the standby's end closes it) while batches are in flight
            mid = a.append(2, b"in flight")
            b.drop()
            more = [a.append(3, b"during the outage %d" % i) for i in range(5)]
            await until(lambda: a.r.released_through == more[-1], what="the resend acknowledged")
            assert mid < more[0]
            assert p.table == a.model and a.r.in_sync and p.in_sync(time.monotonic())
            assert any(e.startswith("resend") for e in a.events)
            assert sum("snapshot of" in e for e in a.events) == 1       # no second snapshot
            assert not any(e.startswith("degraded") for e in a.events)  # shorter than ack_timeout
            assert b.stats.sessions == 2
        finally:
            await b.stop()
            await a.link.stop()

    asyncio.run(main())


def test_a_long_outage_degrades_and_a_restarted_standby_gets_a_snapshot():
    async def main() -> None:
        a = Active()
        await a.link.start()
        port = a.link.port
        assert port is not None
        p = Replica("gw2")
        b = standby_link(p, port)
        await b.start()
        try:
            a.append(1, b"x" * 1000)
            await until(lambda: a.r.in_sync and p.in_sync(time.monotonic()), what="in sync")
            await b.stop()                          # the standby is gone
            seq = a.append(1, b"y" * 1000)
            t0 = time.monotonic()
            await until(lambda: a.r.released_through >= seq, what="committed alone once degraded")
            waited = time.monotonic() - t0
            assert a.r.degraded in ("sync link down", f"no ACK for seq {seq} within 200 ms")
            assert waited >= 0.15                     # not before the ACK timeout (and the lease)
            assert not p.in_sync(time.monotonic())    # its lease ran out
            for i in range(20):
                a.append(2, b"alone %d" % i)
            # it comes back restarted (an empty table, its epoch persisted)
            p2 = Replica("gw2", epoch=1)
            b2 = standby_link(p2, port)
            await b2.start()
            try:
                await until(lambda: a.r.in_sync and p2.in_sync(time.monotonic()), what="in sync again")
                assert p2.table == a.model
                assert sum("snapshot of" in e for e in a.events) == 2
                assert any(e.startswith("degraded: sync link down") or "no ACK" in e for e in a.events)
                last = a.append(1, b"synchronous again")
                assert a.r.released_through < last
                await until(lambda: a.r.released_through == last, what="acknowledged")
            finally:
                await b2.stop()
        finally:
            await a.link.stop()

    asyncio.run(main())
