"""The operators' event log: ids, filters, bound, counts and live subscribers."""

from __future__ import annotations

import asyncio

import pytest

from appliance.events import KINDS, Event, EventLog


def test_ids_increase_from_one_and_fields_are_kept() -> None:
    log = EventLog()
    a = log.add("failover", "health", service="web", backend="backup", now=100.0, old="primary")
    b = log.add("migration", "replayed", service="web", connection=7, now=101.0)
    assert (a.id, b.id) == (1, 2)
    assert a.to_dict() == {"id": 1, "time": 100.0, "kind": "failover", "reason": "health", "service": "web",
                           "backend": "backup", "connection": None, "details": {"old": "primary"}}
    assert b.connection == 7 and b.details == {}
    c = log.add("admin", "drain")
    assert c.time > 1_600_000_000          # epoch seconds when no now is given


def test_unknown_kind_is_rejected() -> None:
    log = EventLog()
    with pytest.raises(ValueError, match="unknown event kind"):
        log.add("failvoer", "typo")
    with pytest.raises(ValueError):
        log.list(kind="nope")
    assert len(log) == 0
    assert set(KINDS) == {"failover", "migration", "health", "divergence", "refusal", "fence", "reset", "admin", "overload", "http-fallback",
                          "restart", "checkpoint", "pair"}


def test_filters_since_and_limit_newest_last() -> None:
    log = EventLog()
    for i in range(10):
        log.add("health" if i % 2 else "migration", "r", service="web" if i < 5 else "db", connection=i % 3, now=i)
    assert [e.id for e in log.list()] == list(range(1, 11))
    assert [e.id for e in log.list(kind="health")] == [2, 4, 6, 8, 10]
    assert [e.id for e in log.list(service="db")] == [6, 7, 8, 9, 10]
    assert [e.id for e in log.list(connection=0)] == [1, 4, 7, 10]
    assert [e.id for e in log.list(since_id=7)] == [8, 9, 10]
    assert [e.id for e in log.list(limit=3)] == [8, 9, 10]          # the newest, oldest first
    assert [e.id for e in log.list(kind="health", service="web", limit=1)] == [4]
    assert log.list(limit=0) == []
    assert log.last("migration").id == 9
    assert log.last("fence") is None


def test_oldest_events_are_dropped_beyond_maxlen() -> None:
    log = EventLog(maxlen=3)
    for _ in range(5):
        log.add("reset", "r")
    assert len(log) == 3
    assert [e.id for e in log.list()] == [3, 4, 5]
    assert log.add("reset", "r").id == 6                              # ids are never reused


def test_counts_by_field_or_detail() -> None:
    log = EventLog()
    log.add("failover", "health", service="web", to="b1")
    log.add("failover", "health", service="db", to="b2")
    log.add("failover", "admin", service="web", to="b1")
    log.add("refusal", "health", service="web")
    assert log.counts_by("failover", "reason") == {"health": 2, "admin": 1}
    assert log.counts_by("failover", "service") == {"web": 2, "db": 1}
    assert log.counts_by("failover", "to") == {"b1": 2, "b2": 1}
    assert log.counts_by("fence", "reason") == {}


def test_subscribers_receive_events_until_unsubscribed() -> None:
    async def main() -> None:
        log = EventLog()
        q = log.subscribe()
        other = log.subscribe()
        log.add("health", "down", backend="primary")
        got = await asyncio.wait_for(q.get(), 1)
        assert isinstance(got, Event) and got.reason == "down"
        assert other.qsize() == 1
        log.unsubscribe(q)
        log.add("health", "up")
        assert q.empty() and other.qsize() == 2

    asyncio.run(main())


def test_a_full_subscriber_loses_its_oldest_event() -> None:
    async def main() -> None:
        log = EventLog()
        q = log.subscribe()
        assert q.maxsize == 1000
        for i in range(1005):
            log.add("divergence", f"r{i}")
        assert q.qsize() == 1000
        assert q.get_nowait().id == 6                                  # 1..5 dropped
        rest = [q.get_nowait().id for _ in range(999)]
        assert rest[-1] == 1005

    asyncio.run(main())


def test_a_connections_events_include_the_failovers_that_name_it() -> None:
    """The panel's timeline of a connection (and its live stream) shows the failover that moved
    it: a failover event names its connections in its details, not in its connection field."""
    log = EventLog()
    fo = log.add("failover", "health check", service="web", backend="backup", moved=[7, 8], reset=[9],
                 repinned=[])
    mv = log.add("migration", "moved", service="web", backend="backup", connection=7)
    other = log.add("migration", "moved", service="web", backend="backup", connection=8)
    assert [e.id for e in log.list(connection=7, limit=None)] == [fo.id, mv.id]
    assert [e.id for e in log.list(connection=9, limit=None)] == [fo.id]
    assert [e.id for e in log.list(connection=8, limit=None)] == [fo.id, other.id]
    assert log.list(connection=10, limit=None) == []
