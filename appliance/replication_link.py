"""The replication stream's transport: TCP on the sync link between the two gateways (issue 13).

Theory of operation
-------------------
All protocol state lives in the endpoint, :class:`checkpoint.replication.Replicator` (active) or
:class:`~checkpoint.replication.Replica` (standby), which is sans-I/O.  This module only moves its
bytes: it keeps one TCP connection to the peer, either by dialling (``dial=(host, port)``,
reconnecting with exponential back-off from ``backoff_min`` to ``backoff_max``) or by accepting
(``listen=(host, port)``; a new connection from the peer replaces the current one, which the peer
has evidently given up).  Which node dials is a fixed choice of the caller (for example the node
whose sync address is lower), independent of the roles, which change at takeover: the endpoint
object is swapped with :meth:`ReplicationLink.set_endpoint`.

The connection is an :class:`asyncio.Protocol` (callbacks, no reader task: one wakeup less per
frame than streams).  On each new connection the endpoint's ``connected(now)`` queues its HELLO;
every byte received is cut into frames (:class:`~checkpoint.replication.FrameReader`) handed to ``on_frame(frame, now)``;
``tick(now)`` runs every ``tick_interval`` seconds, connected or not (the active's timers:
ACK timeout, lease, heartbeat); after each of these the owner's ``on_change()`` runs (it reads
``released_through``, answers ``wants_snapshot``, reads events) and then whatever the endpoint
queued (``frames_out(now)``) is written at once, TCP_NODELAY.  The owner calls :meth:`flush`
after ``submit``.  A connection that receives nothing for ``idle_timeout`` (the active pings every
``heartbeat`` and the standby answers) or that delivers a malformed frame is closed, and the
endpoint's ``disconnected(now)`` is called.  The clock is ``time.monotonic`` (only durations of
one node's clock are ever compared: see the lease in :mod:`checkpoint.replication`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from checkpoint.replication import Frame, FrameReader, ReplicationError

log = logging.getLogger(__name__)


class Endpoint(Protocol):
    def connected(self, now: float) -> None: ...
    def disconnected(self, now: float) -> None: ...
    def on_frame(self, frame: Frame, now: float) -> object: ...
    def tick(self, now: float) -> object: ...
    def frames_out(self, now: float) -> list[bytes]: ...


@dataclass
class LinkStats:
    sessions: int = 0
    frames_in: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    last_error: str | None = None


class ReplicationLink:
    def __init__(self, endpoint: Endpoint, *, listen: tuple[str, int] | None = None,
                 dial: tuple[str, int] | None = None, on_change: Callable[[], None] | None = None,
                 tick_interval: float = 0.01, idle_timeout: float = 3.0, connect_timeout: float = 1.0,
                 backoff_min: float = 0.05, backoff_max: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if (listen is None) == (dial is None):
            raise ValueError("a replication link either listens or dials")
        self.endpoint = endpoint
        self.listen_addr = listen
        self.dial_addr = dial
        self.on_change = on_change
        self.tick_interval = tick_interval
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.clock = clock
        self.stats = LinkStats()
        self._transport: asyncio.Transport | None = None
        self._reader = FrameReader()
        self._last_rx = 0.0
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    # --- the owner's side ------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._transport is not None

    @property
    def port(self) -> int | None:
        """The port listened on (useful with port 0)."""
        if self._server is None or not self._server.sockets:
            return None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._stopping = False
        if self.listen_addr is not None:
            host, port = self.listen_addr
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(lambda: _Proto(self), host, port)
        else:
            self._tasks.append(asyncio.create_task(self._dial_loop(), name="replication-dial"))
        self._tasks.append(asyncio.create_task(self._tick_loop(), name="replication-tick"))

    async def stop(self) -> None:
        self._stopping = True
        if self._server is not None:
            self._server.close()
        self.drop()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    def set_endpoint(self, endpoint: Endpoint) -> None:
        """Swap the protocol end (a role change): the current connection is dropped so that the
        new end starts its own session with a HELLO."""
        self.drop()
        self.endpoint = endpoint

    def flush(self) -> None:
        """Write whatever the endpoint queued (call after ``submit``/``snapshot``)."""
        frames = self.endpoint.frames_out(self.clock())
        t = self._transport
        if not frames or t is None:
            return
        data = b"".join(frames)
        self.stats.bytes_out += len(data)
        try:
            t.write(data)
        except (ConnectionError, RuntimeError, OSError) as exc:
            self._fail(t, f"write: {exc}")

    def drop(self) -> None:
        """Close the current connection (it will be re-established)."""
        t = self._transport
        if t is not None:
            self._fail(t, "dropped")

    # --- internals -------------------------------------------------------------------------
    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:  # the owner's bug must not kill the link
                log.exception("replication on_change failed")
        self.flush()

    def _fail(self, t: asyncio.Transport, why: str) -> None:
        if self._transport is t:
            self._transport = None
            self.stats.last_error = why
            self.endpoint.disconnected(self.clock())
            self._changed()
        t.abort()

    def _made(self, t: asyncio.Transport) -> None:
        if self._stopping:
            t.abort()
            return
        old = self._transport
        if old is not None:
            self._fail(old, "replaced by a new connection")
        sock = t.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._transport = t
        self._reader = FrameReader()
        self.stats.sessions += 1
        now = self.clock()
        self._last_rx = now
        self.endpoint.connected(now)
        self._changed()

    def _received(self, t: asyncio.Transport, data: bytes) -> None:
        if self._transport is not t:
            return
        now = self.clock()
        self._last_rx = now
        self.stats.bytes_in += len(data)
        try:
            frames = self._reader.feed(data)
        except ReplicationError as exc:
            log.warning("replication: bad frame: %s", exc)
            self._fail(t, f"bad frame: {exc}")
            return
        for f in frames:
            self.endpoint.on_frame(f, now)
        self.stats.frames_in += len(frames)
        self._changed()

    def _lost(self, t: asyncio.Transport, exc: Exception | None) -> None:
        self._fail(t, f"connection: {exc}" if exc else "closed by the peer")

    async def _dial_loop(self) -> None:
        assert self.dial_addr is not None
        host, port = self.dial_addr
        loop = asyncio.get_running_loop()
        backoff = self.backoff_min
        while not self._stopping:
            closed: asyncio.Future[None] = loop.create_future()
            try:
                await asyncio.wait_for(loop.create_connection(lambda: _Proto(self, closed), host, port),
                                       self.connect_timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                self.stats.last_error = f"connect: {exc or 'timeout'}"
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.backoff_max)
                continue
            started = self.clock()
            await closed
            if self.clock() - started > self.backoff_max:
                backoff = self.backoff_min  # it worked for a while: retry at once
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.backoff_max)

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.tick_interval)
            now = self.clock()
            t = self._transport
            if t is not None and now - self._last_rx > self.idle_timeout:
                self._fail(t, f"nothing received for {self.idle_timeout:.1f} s")
            self.endpoint.tick(now)
            self._changed()


class _Proto(asyncio.Protocol):
    """One TCP connection: callbacks straight into the link (no reader task, no extra wakeup)."""

    def __init__(self, link: ReplicationLink, closed: asyncio.Future[None] | None = None) -> None:
        self.link = link
        self.closed = closed
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.link._made(transport)

    def data_received(self, data: bytes) -> None:
        if self.transport is not None:
            self.link._received(self.transport, data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.link._lost(self.transport, exc)
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(None)
