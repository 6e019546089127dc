"""Server-sent events: the live half of the API and the panel.

* ``events_stream``: every new event (``event: <kind>``, ``id: <event id>``,
  the event as JSON), after replaying those since ``Last-Event-ID`` /
  ``since_id``, so a reconnecting browser misses nothing the ring still has.
* ``snapshot_stream``: a document produced by a function, every ``interval``
  seconds (status for the banner, a filtered page of connections, one
  connection's counters for its chart).

Each stream sends a comment every 15 s to keep proxies from closing it, ends
when the client goes away, and ends after ``timeout`` seconds when one is
given (tests, scripts).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

KEEPALIVE = 15.0


def sse(data: Any, event: str | None = None, id_: int | None = None) -> str:
    out = []
    if id_ is not None:
        out.append(f"id: {id_}")
    if event:
        out.append(f"event: {event}")
    out.append("data: " + json.dumps(data, default=str, separators=(",", ":")))
    return "\n".join(out) + "\n\n"


def response(gen: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def events_stream(request: Request, events: Any, match: Callable[[Any], bool], since_id: int | None,
                        timeout: float | None) -> AsyncIterator[str]:
    q = events.subscribe()
    try:
        last = since_id or 0
        if since_id is not None:
            for e in events.list(since_id=since_id, limit=None):
                last = e.id
                if match(e):
                    yield sse(e.to_dict(), e.kind, e.id)
        yield ": connected\n\n"
        deadline = None if timeout is None else time.monotonic() + timeout
        last_beat = time.monotonic()
        while True:
            if await request.is_disconnected():
                return
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return
            try:
                e = await asyncio.wait_for(q.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if now - last_beat >= KEEPALIVE:
                    last_beat = now
                    yield ": keep-alive\n\n"
                continue
            if e.id <= last:
                continue
            last = e.id
            if match(e):
                yield sse(e.to_dict(), e.kind, e.id)
    finally:
        events.unsubscribe(q)


async def snapshot_stream(request: Request, produce: Callable[[], Any], event: str, interval: float,
                          timeout: float | None) -> AsyncIterator[str]:
    deadline = None if timeout is None else time.monotonic() + timeout
    n = 0
    while True:
        n += 1
        yield sse(produce(), event, n)
        wait = interval
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            wait = min(interval, left)
        await asyncio.sleep(wait)
        if await request.is_disconnected():
            return
