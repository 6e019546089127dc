"""keepalived's notify channel: this node's VRRP role transitions, read from a FIFO.

keepalived (``vrrp_notify_fifo PATH`` in ``global_defs``) writes one line per
transition of a VRRP instance or sync group to a FIFO, in the order they happen
(keepalived 2.2.7, ``keepalived/vrrp/vrrp_notify.c``)::

    INSTANCE "client" MASTER 150
    GROUP "lab" BACKUP 0

The priority is the instance's effective priority (0 for a group).  Besides the
role states (MASTER, BACKUP, FAULT, STOP, DELETED) the same channel carries
events: ``MASTER_RX_LOWER_PRI`` (a master heard a lower-priority master) and,
with ``notify_priority_changes``, ``MASTER_PRIORITY`` / ``BACKUP_PRIORITY``.

Theory of operation
-------------------
Two layers.  The sans-I/O layer (:func:`parse_line`, :class:`LineBuffer`) turns
bytes into typed :class:`Transition` values, or into :class:`Refused` values that
carry the line and the reason it was refused (wrong shape, unknown state, a
priority out of 0..255, a line too long, bytes that are not ASCII).  It never
raises on input: whatever a writer puts in the FIFO, the reader goes on.

The I/O layer (:class:`FifoReader`) is an async iterator over a FIFO.  keepalived
opens its FIFO read-write and non-blocking (it creates it if missing), so it
never blocks on a slow reader, and the reader sees end-of-file when keepalived
exits (or is killed).  The reader opens the FIFO read-only and non-blocking and
waits for it to become readable in the event loop; on end-of-file it closes the
descriptor and opens the path again (a restarted keepalived may have made a new
FIFO).  Linux reports a FIFO without writers as readable (hang-up) only after a
writer has come and gone since the reader opened it, so a freshly opened FIFO
with no writer simply waits; the reopen delay (backing off to
``max_backoff``) only guards against spinning where that does not hold, and
against a path that does not exist yet.  An idle reader also checks every
``recheck`` seconds that the path still names the FIFO it has open (a reader that
reopened the old FIFO just before keepalived replaced it would wait forever).  Errors opening the FIFO are counted and
kept in ``last_error``; the iterator only ends when :meth:`FifoReader.close` is
called.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import os
import re
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAX_LINE = 512  # a keepalived instance name is far shorter; a longer line is garbage


class Scope(enum.Enum):
    INSTANCE = "INSTANCE"
    GROUP = "GROUP"


class State(enum.Enum):
    MASTER = "MASTER"
    BACKUP = "BACKUP"
    FAULT = "FAULT"
    STOP = "STOP"
    DELETED = "DELETED"
    # events, not roles
    MASTER_RX_LOWER_PRI = "MASTER_RX_LOWER_PRI"
    MASTER_PRIORITY = "MASTER_PRIORITY"
    BACKUP_PRIORITY = "BACKUP_PRIORITY"


ROLES = frozenset({State.MASTER, State.BACKUP, State.FAULT, State.STOP, State.DELETED})


@dataclass(frozen=True)
class Transition:
    """One line of the channel: ``scope`` ``name`` reached ``state`` with ``priority``."""

    scope: Scope
    name: str
    state: State
    priority: int

    @property
    def is_role(self) -> bool:
        """A change of role (MASTER, BACKUP, FAULT, STOP, DELETED), not an event."""
        return self.state in ROLES

    @property
    def is_master(self) -> bool:
        return self.state is State.MASTER


@dataclass(frozen=True)
class Refused:
    """A line that is not a transition, and why."""

    line: str
    reason: str


Notice = Transition | Refused

_LINE = re.compile(r'(INSTANCE|GROUP) "([^"\s]{1,128})" ([A-Z_]+) (\d{1,3})')


def parse_line(line: str | bytes) -> Notice:
    """A line of keepalived's notify FIFO (with or without its newline)."""
    if isinstance(line, bytes):
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            return Refused(line.decode("ascii", "backslashreplace"), "not ASCII")
    else:
        text = line
    text = text.rstrip("\r\n")
    if len(text) > MAX_LINE:
        return Refused(text[:MAX_LINE], f"line longer than {MAX_LINE} characters")
    if not text.strip():
        return Refused(text, "empty line")
    m = _LINE.fullmatch(text)
    if m is None:
        first = text.split(" ", 1)[0]
        if first not in ("INSTANCE", "GROUP"):
            return Refused(text, f"not a VRRP line (starts with {first!r})")
        return Refused(text, 'not of the form INSTANCE|GROUP "name" STATE PRIORITY')
    scope, name, state, prio = m.groups()
    try:
        st = State(state)
    except ValueError:
        return Refused(text, f"unknown state {state!r}")
    priority = int(prio)
    if priority > 255:
        return Refused(text, f"priority {priority} out of 0..255")
    return Transition(Scope(scope), name, st, priority)


class LineBuffer:
    """Bytes as they come out of the FIFO -> notices, one per complete line.
    A line longer than :data:`MAX_LINE` is refused once and skipped up to its end."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> list[Notice]:
        out: list[Notice] = []
        self._buf += data
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > MAX_LINE:
                    if not self._skipping:
                        out.append(Refused(bytes(self._buf[:MAX_LINE]).decode("ascii", "backslashreplace"),
                                           f"line longer than {MAX_LINE} characters"))
                    self._skipping = True
                    self._buf.clear()
                return out
            raw = bytes(self._buf[:nl])
            del self._buf[:nl + 1]
            if self._skipping:
                self._skipping = False  # the end of the overlong line
                continue
            out.append(parse_line(raw))

    def eof(self) -> list[Notice]:
        """The writer went away: a partial last line is refused (keepalived writes whole lines)."""
        rest, skipping = bytes(self._buf), self._skipping
        self._buf.clear()
        self._skipping = False
        if rest and not skipping:
            return [Refused(rest.decode("ascii", "backslashreplace"), "incomplete line at end of file")]
        return []


class FifoReader:
    """``async for notice in FifoReader(path)``: every :class:`Transition` (or
    :class:`Refused` line) keepalived writes to the FIFO at ``path``, across
    keepalived restarts, until :meth:`close`."""

    def __init__(self, path: str | Path, min_backoff: float = 0.05, max_backoff: float = 1.0,
                 recheck: float = 1.0) -> None:
        self.path = Path(path)
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.recheck = recheck  # how often an idle reader checks that the path is still its FIFO
        self.opens = 0          # successful opens of the FIFO
        self.writer_gone = 0    # end-of-file seen (keepalived exited or restarted)
        self.refused = 0        # lines refused
        self.last_error: str | None = None
        self._closed = asyncio.Event()

    def close(self) -> None:
        self._closed.set()

    def _open(self) -> int | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            self.last_error = f"open {self.path}: {exc.strerror or exc}"
            return None
        try:
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                self.last_error = f"{self.path} is not a FIFO"
                os.close(fd)
                return None
        except OSError as exc:
            os.close(fd)
            self.last_error = f"fstat {self.path}: {exc.strerror or exc}"
            return None
        self.opens += 1
        return fd

    def _replaced(self, fd: int) -> bool:
        """Whether the path no longer names the FIFO open as ``fd`` (removed, or made anew)."""
        try:
            st, cur = os.stat(self.path), os.fstat(fd)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != (cur.st_dev, cur.st_ino)

    async def _readable(self, fd: int) -> str:
        """Wait until ``fd`` is readable ("ready"), the reader is closed ("closed") or the
        path was given to another FIFO while no writer was on this one ("replaced")."""
        loop = asyncio.get_running_loop()
        while True:
            ready: asyncio.Future[None] = loop.create_future()

            def wake(fut: asyncio.Future[None] = ready) -> None:
                if not fut.done():
                    fut.set_result(None)

            loop.add_reader(fd, wake)
            closed: asyncio.Future[None] = asyncio.ensure_future(self._wait_closed())
            try:
                await asyncio.wait({ready, closed}, timeout=self.recheck, return_when=asyncio.FIRST_COMPLETED)
            finally:
                loop.remove_reader(fd)
                closed.cancel()
                if not ready.done():
                    ready.cancel()
            if self._closed.is_set():
                return "closed"
            if ready.done():
                return "ready"
            if self._replaced(fd):
                return "replaced"

    async def _wait_closed(self) -> None:
        await self._closed.wait()

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._closed.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

    async def __aiter__(self) -> AsyncIterator[Notice]:
        backoff = self.min_backoff
        while not self._closed.is_set():
            fd = self._open()
            if fd is None:
                await self._pause(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            lines = LineBuffer()
            got_data = False
            try:
                while True:
                    why = await self._readable(fd)
                    if why == "closed":
                        return
                    if why == "replaced":
                        got_data = True  # reopen at once
                        break
                    try:
                        data = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        if exc.errno == errno.EINTR:
                            continue
                        self.last_error = f"read {self.path}: {exc.strerror or exc}"
                        break
                    if not data:
                        self.writer_gone += 1
                        for notice in lines.eof():
                            self.refused += 1
                            yield notice
                        break
                    got_data = True
                    for notice in lines.feed(data):
                        if isinstance(notice, Refused):
                            self.refused += 1
                            log.warning("vrrp notify fifo %s: refused %r: %s", self.path, notice.line, notice.reason)
                        yield notice
            finally:
                os.close(fd)
            if got_data:
                backoff = self.min_backoff
            else:  # end of file with nothing read: do not spin on a FIFO that keeps saying so
                await self._pause(backoff)
                backoff = min(backoff * 2, self.max_backoff)
