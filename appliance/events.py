"""The operators' event log: what the appliance decided, and why.

Theory of operation
-------------------

Every decision an operator may want to audit later — a failover, a
connection migrated or refused, a backend's health changing, a fence, an
administrative action — is recorded as one :class:`Event` with a kind from
:data:`KINDS`, a short machine-readable ``reason`` and free-form details.

The log is a bounded ring in memory: ids increase from 1 and are never
reused, and beyond ``maxlen`` the oldest events are dropped, so a client
that remembers the last id it saw can ask for what came after it
(``list(since_id=...)``) and tell from a gap that it missed some.

Live followers (a server-sent-events endpoint, say) ``subscribe()`` and get
an :class:`asyncio.Queue` that every ``add()`` feeds without blocking.  The
queue is bounded; a follower too slow to keep up loses its *oldest* unread
events, never the newest, and never slows down the appliance.  Like the
rest of the appliance the log lives on one asyncio loop and takes no locks:
call ``add()`` from that loop's thread.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

KINDS: tuple[str, ...] = (
    "failover", "migration", "health", "divergence", "refusal", "fence", "reset", "admin", "restart",
    "checkpoint", "overload", "http-fallback", "pair",
)

# bound of each subscriber's queue
SUBSCRIBER_QUEUE = 1000


@dataclass(slots=True)
class Event:
    id: int
    time: float                 # epoch seconds
    kind: str
    reason: str
    service: str | None = None
    backend: str | None = None
    connection: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FAILOVER_LISTS = ("moved", "reset", "repinned")  # a failover event names its connections in these


def names_connection(e: Event, cid: int) -> bool:
    """Whether ``e`` is about connection ``cid``: its own, or a failover that lists it."""
    if e.connection == cid:
        return True
    return e.kind == "failover" and any(cid in e.details.get(k, ()) for k in FAILOVER_LISTS)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown event kind {kind!r} (known: {', '.join(KINDS)})")


class EventLog:
    """A bounded, filterable, subscribable log of :class:`Event`."""

    def __init__(self, maxlen: int = 10000) -> None:
        if maxlen < 1:
            raise ValueError("maxlen must be at least 1")
        self.maxlen = maxlen
        self._events: deque[Event] = deque(maxlen=maxlen)
        self._next_id = 1
        self._subscribers: list[asyncio.Queue[Event]] = []

    def __len__(self) -> int:
        return len(self._events)

    def add(self, kind: str, reason: str, *, service: str | None = None, backend: str | None = None,
            connection: int | None = None, now: float | None = None, **details: Any) -> Event:
        _check_kind(kind)
        event = Event(
            id=self._next_id, time=time.time() if now is None else now, kind=kind, reason=reason,
            service=service, backend=backend, connection=connection, details=details,
        )
        self._next_id += 1
        self._events.append(event)
        for q in self._subscribers:
            if q.full():
                q.get_nowait()          # a slow follower loses its oldest unread event
            q.put_nowait(event)
        return event

    def list(self, kind: str | None = None, service: str | None = None, connection: int | None = None,
             since_id: int | None = None, limit: int | None = 100) -> list[Event]:
        """The newest ``limit`` events matching every filter given, oldest first (``connection``:
        its events and the failovers that moved, reset or re-pinned it)."""
        if kind is not None:
            _check_kind(kind)
        found = [
            e for e in self._events
            if (kind is None or e.kind == kind)
            and (service is None or e.service == service)
            and (connection is None or names_connection(e, connection))
            and (since_id is None or e.id > since_id)
        ]
        if limit is not None:
            found = found[-limit:] if limit > 0 else []
        return found

    def last(self, kind: str) -> Event | None:
        _check_kind(kind)
        return next((e for e in reversed(self._events) if e.kind == kind), None)

    def counts_by(self, kind: str, key: str) -> dict[str, int]:
        """Events of ``kind`` counted by ``key``: an Event field or a details key.

        ``counts_by("failover", "reason")`` -> ``{"health": 3, "admin": 1}``.
        Events without a value for ``key`` are not counted.
        """
        _check_kind(kind)
        counts: dict[str, int] = {}
        for e in self._events:
            if e.kind != kind:
                continue
            value = getattr(e, key) if key in Event.__slots__ and key != "details" else e.details.get(key)
            if value is not None:
                counts[str(value)] = counts.get(str(value), 0) + 1
        return counts

    def subscribe(self) -> asyncio.Queue[Event]:
        q: asyncio.Queue[Event] = asyncio.Queue(maxsize=SUBSCRIBER_QUEUE)
        self._subscribers.append(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[Event]) -> None:
        if q in self._subscribers:
            self._subscribers.remove(q)
