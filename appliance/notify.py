"""Notifications: run a command or POST a webhook when chosen events happen.

Theory of operation
-------------------

Each ``[[notify]]`` entry of the configuration names the event kinds it wants
(``events``, kinds of :data:`appliance.events.KINDS`) and a ``command`` (argv,
keepalived style), a ``webhook`` URL (http or https), or both.  Every
command and every webhook is one *target* with a bounded queue of its own and
one worker task: events are delivered to a target one at a time, in order.

Nothing here runs on the packets' time.  One dispatcher task follows the
event log (:meth:`EventLog.subscribe`) and only files each event in the
queues of the targets that want it (``put_nowait``).  A full queue drops the
event for that target alone: the drop is counted and audited (the first of a
run of drops at once, the run's total when the queue takes events again), so
a dead or slow receiver costs its own queue and nothing else — not the
packets, not the other targets.

A command runs with :func:`asyncio.create_subprocess_exec` in a session of
its own: the event's JSON on its stdin, and in its environment
``APPLIANCE_EVENT_ID``, ``_KIND``, ``_REASON``, ``_TIME``, ``_SERVICE``,
``_BACKEND``, ``_CONNECTION`` and ``_JSON``.  Exit status 0 is success;
beyond ``timeout`` its process group is killed.  A webhook is a POST of the
event's JSON (``Content-Type: application/json`` plus the entry's
``headers``) made on a thread of the target's own (``http.client``); a 2xx
answer is success.  Beyond ``timeout`` the request's socket is shut down from
the loop, which ends the thread's wait at once.

A failed attempt is retried ``retries`` times, after ``backoff`` seconds,
doubling each time.  The outcome of each event's series of attempts is one
audit entry: who ``notify``, action ``notify.command`` or ``notify.webhook``,
target the command line or the URL (without its password), result ``ok`` or
``error: <reason> (N attempts)``, and in ``params`` the event, the number of
attempts and each failed attempt's reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import os
import re
import shlex
import signal
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from .configfields import _float, _int, _no_unknown, _table
from .errors import ConfigError
from .events import KINDS, Event, EventLog

log = logging.getLogger("appliance.notify")

HEALTH_STATES = ("up", "down", "unknown")
_HEALTH_NEW = re.compile(r" -> (\w+)(?::|$)")   # a health event's reason: "primary up -> down: detail"
STDERR_TAIL = 200                               # characters of a failed command's stderr kept in the audit
MAX_ANSWER = 1 << 16                            # bytes of a webhook's answer read (and thrown away)


# --- configuration --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class NotifyConfig:
    """One ``[[notify]]`` entry."""

    events: tuple[str, ...]                     # event kinds delivered
    command: tuple[str, ...] | None = None      # argv run for each event
    webhook: str | None = None                  # http(s) URL POSTed each event
    timeout: float = 5.0                        # seconds one attempt may take
    retries: int = 2                            # attempts after the first failed one
    backoff: float = 0.5                        # seconds before the first retry, doubled for each next one
    queue: int = 100                            # events waiting per target; beyond, new ones are dropped
    headers: tuple[tuple[str, str], ...] = ()   # extra webhook request headers
    states: tuple[str, ...] = ()                # health events: only these new states (empty: all)


NOTIFY_KEYS = {"events", "command", "webhook", "timeout", "retries", "backoff", "queue", "headers", "states"}


def parse_notify(raw: Any) -> tuple[NotifyConfig, ...]:
    """The ``[[notify]]`` entries; errors name the field (``notify[0].webhook``)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("notify", "must be an array of tables ([[notify]])")
    entries = []
    for i, item in enumerate(raw):
        where = f"notify[{i}]"
        data = _table(item, where)
        _no_unknown(data, NOTIFY_KEYS, where)
        events = _str_list(data, "events", where, required=True)
        for j, kind in enumerate(events):
            if kind not in KINDS:
                raise ConfigError(f"{where}.events[{j}]", f"unknown event kind {kind!r} (known: {', '.join(KINDS)})")
            if kind in events[:j]:
                raise ConfigError(f"{where}.events[{j}]", f"{kind!r} is listed twice")
        command = tuple(_str_list(data, "command", where)) if "command" in data else None
        webhook = _url(data, where) if "webhook" in data else None
        if command is None and webhook is None:
            raise ConfigError(f"{where}.command", "give a command, a webhook or both")
        timeout = _float(data, "timeout", where, 5.0, 0.0)
        if timeout <= 0:
            raise ConfigError(f"{where}.timeout", f"must be more than 0, got {timeout}")
        states = tuple(_str_list(data, "states", where)) if "states" in data else ()
        for j, st in enumerate(states):
            if st not in HEALTH_STATES:
                raise ConfigError(f"{where}.states[{j}]", f"must be one of {', '.join(HEALTH_STATES)}, got {st!r}")
        if states and "health" not in events:
            raise ConfigError(f"{where}.states", "filters health events: add \"health\" to events")
        entries.append(NotifyConfig(
            events=tuple(events), command=command, webhook=webhook, timeout=timeout,
            retries=_int(data, "retries", where, 2, 0, 100),
            backoff=_float(data, "backoff", where, 0.5, 0.0),
            queue=_int(data, "queue", where, 100, 1, 100000),
            headers=_headers(data, where) if "headers" in data else (),
            states=states,
        ))
    return tuple(entries)


def _str_list(data: dict[str, Any], key: str, where: str, required: bool = False) -> list[str]:
    if key not in data:
        if required:
            raise ConfigError(f"{where}.{key}", "is required")
        return []
    v = data[key]
    if not isinstance(v, list) or not v:
        raise ConfigError(f"{where}.{key}", f"must be a non-empty list of strings, got {v!r}")
    for j, s in enumerate(v):
        if not isinstance(s, str) or not s:
            raise ConfigError(f"{where}.{key}[{j}]", f"must be a non-empty string, got {s!r}")
    return list(v)


def _url(data: dict[str, Any], where: str) -> str:
    v = data["webhook"]
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{where}.webhook", f"must be an http:// or https:// URL, got {v!r}")
    try:
        parts = urlsplit(v)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{where}.webhook", f"{v!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"{where}.webhook", f"must be an http:// or https:// URL, got {v!r}")
    if not parts.hostname:
        raise ConfigError(f"{where}.webhook", f"{v!r} names no host")
    if port == 0:
        raise ConfigError(f"{where}.webhook", f"{v!r}: port 0")
    if any(c in v for c in "\r\n \t"):
        raise ConfigError(f"{where}.webhook", "must not contain whitespace")
    return v


_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _headers(data: dict[str, Any], where: str) -> tuple[tuple[str, str], ...]:
    h = data["headers"]
    if not isinstance(h, dict):
        raise ConfigError(f"{where}.headers", f"must be a table of strings, got {type(h).__name__}")
    if "webhook" not in data:
        raise ConfigError(f"{where}.headers", "are for the webhook: set webhook too")
    out = []
    for k, v in h.items():
        if not _TOKEN.match(k):
            raise ConfigError(f"{where}.headers.{k}", "is not a valid header name")
        if k.lower() in ("content-length", "host", "transfer-encoding"):
            raise ConfigError(f"{where}.headers.{k}", "is set by the appliance")
        if not isinstance(v, str) or "\r" in v or "\n" in v:
            raise ConfigError(f"{where}.headers.{k}", "must be a string on one line")
        out.append((k, v))
    return tuple(out)


# --- delivery ---------------------------------------------------------------------------------

class AuditSink(Protocol):
    """What the notifier needs of :class:`webui.audit.AuditLog`."""

    def record(self, who: str, role: str | None, via: str, action: str, target: str,
               params: dict[str, Any] | None = None, result: str = "ok") -> Any: ...


class AttemptFailed(Exception):
    """One attempt failed; the message is the reason audited."""


def event_json(event: Event) -> str:
    return json.dumps(event.to_dict(), default=str, separators=(",", ":"))


def event_env(event: Event, body: str) -> dict[str, str]:
    """The command's environment: the appliance's own plus the event."""
    env = dict(os.environ)
    env.update({
        "APPLIANCE_EVENT_ID": str(event.id),
        "APPLIANCE_EVENT_KIND": event.kind,
        "APPLIANCE_EVENT_REASON": event.reason,
        "APPLIANCE_EVENT_TIME": repr(event.time),
        "APPLIANCE_EVENT_SERVICE": event.service or "",
        "APPLIANCE_EVENT_BACKEND": event.backend or "",
        "APPLIANCE_EVENT_CONNECTION": "" if event.connection is None else str(event.connection),
        "APPLIANCE_EVENT_JSON": body,
    })
    return env


def redact(url: str) -> str:
    """The URL without a password (the audit trail is readable by viewers)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@dataclass
class TargetStats:
    delivered: int = 0      # events delivered (an attempt succeeded)
    failed: int = 0         # events given up on after every attempt
    attempts: int = 0       # attempts made, successful or not
    dropped: int = 0        # events dropped because the queue was full


class Target:
    """One command or webhook of one ``[[notify]]`` entry: its queue, worker and counters."""

    action = ""

    def __init__(self, index: int, config: NotifyConfig, audit: AuditSink | None) -> None:
        self.index = index
        self.config = config
        self.audit = audit
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=config.queue)
        self.stats = TargetStats()
        self._dropping = 0          # events dropped in the current run of drops

    @property
    def name(self) -> str:
        raise NotImplementedError

    def wants(self, event: Event) -> bool:
        if event.kind not in self.config.events:
            return False
        if event.kind == "health" and self.config.states:
            m = _HEALTH_NEW.search(event.reason)
            return m is not None and m.group(1) in self.config.states
        return True

    def offer(self, event: Event) -> None:
        """File ``event`` in the queue, or drop it if the queue is full (never waits)."""
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.stats.dropped += 1
            self._dropping += 1
            if self._dropping == 1:
                self._record(event, {"dropped": 1}, f"error: queue full ({self.config.queue} events waiting), "
                                                    f"event {event.id} dropped")
            return
        if self._dropping:
            n, self._dropping = self._dropping, 0
            self._record(event, {"dropped": n},
                         f"error: queue full: {n} event(s) dropped before event {event.id}")

    async def run(self) -> None:
        while True:
            event = await self.queue.get()
            await self.deliver(event)

    async def deliver(self, event: Event) -> bool:
        """Every attempt for ``event``, then one audit entry."""
        body = event_json(event)
        errors: list[str] = []
        attempts = 1 + self.config.retries
        for n in range(attempts):
            if n:
                await asyncio.sleep(self.config.backoff * (2 ** (n - 1)))
            self.stats.attempts += 1
            try:
                await self.attempt(event, body)
            except AttemptFailed as exc:
                errors.append(str(exc))
                continue
            except Exception as exc:  # a bug or an OS error must not end the worker
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            self.stats.delivered += 1
            self._record(event, {"attempts": n + 1, "errors": errors}, "ok")
            return True
        self.stats.failed += 1
        self._record(event, {"attempts": attempts, "errors": errors},
                     f"error: {errors[-1]} ({attempts} attempt{'s' if attempts > 1 else ''})")
        log.warning("notify %s: event %d not delivered: %s", self.name, event.id, errors[-1])
        return False

    async def attempt(self, event: Event, body: str) -> None:
        raise NotImplementedError

    def _record(self, event: Event, params: dict[str, Any], result: str) -> None:
        if self.audit is None:
            return
        self.audit.record("notify", None, "-", self.action, self.name,
                          {"notify": self.index, "event": event.id, "kind": event.kind, **params}, result)

    def close(self) -> None:
        pass


class CommandTarget(Target):
    action = "notify.command"

    def __init__(self, index: int, config: NotifyConfig, audit: AuditSink | None) -> None:
        super().__init__(index, config, audit)
        assert config.command is not None
        self.argv = config.command

    @property
    def name(self) -> str:
        return shlex.join(self.argv)

    async def attempt(self, event: Event, body: str) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE, env=event_env(event, body), start_new_session=True)
        except OSError as exc:
            raise AttemptFailed(f"cannot run: {exc.strerror or exc}") from None
        try:
            _, err = await asyncio.wait_for(proc.communicate(body.encode()), self.config.timeout)
        except asyncio.TimeoutError:
            await _kill(proc)
            raise AttemptFailed(f"timeout after {self.config.timeout:g} s (killed)") from None
        except BaseException:         # cancelled (the appliance stops): no orphan
            await _kill(proc)
            raise
        rc = proc.returncode
        if rc != 0:
            tail = err.decode(errors="replace").strip()[-STDERR_TAIL:]
            why = f"signal {-rc}" if rc is not None and rc < 0 else f"exit status {rc}"
            raise AttemptFailed(f"{why}: {tail}" if tail else why)


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)     # its session: what it started goes too
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(proc.wait(), 5)


class _Post:
    """One POST on a worker thread, which the loop can abort (the socket is shut down)."""

    def __init__(self, url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> None:
        self.url = url
        self.body = body
        self.headers = headers
        self.timeout = timeout
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self._aborted = False

    def run(self) -> int:
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(host, parts.port, timeout=self.timeout,
                                               context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(host, parts.port, timeout=self.timeout)
        with self._lock:
            if self._aborted:
                raise TimeoutError("aborted")
            self._conn = conn
        try:
            conn.connect()
            with self._lock:
                if self._aborted:
                    raise TimeoutError("aborted")
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            conn.request("POST", path, self.body, dict(self.headers))
            resp = conn.getresponse()
            resp.read(MAX_ANSWER)
            return resp.status
        finally:
            conn.close()

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            sock = self._conn.sock if self._conn is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class WebhookTarget(Target):
    action = "notify.webhook"

    def __init__(self, index: int, config: NotifyConfig, audit: AuditSink | None) -> None:
        super().__init__(index, config, audit)
        assert config.webhook is not None
        self.url = config.webhook
        # a thread of its own: a receiver that hangs holds up its own queue, nobody else's
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=f"notify-{index}")
        self.headers = {"Content-Type": "application/json", "User-Agent": "appliance-notify",
                        **dict(config.headers)}

    @property
    def name(self) -> str:
        return redact(self.url)

    async def attempt(self, event: Event, body: str) -> None:
        loop = asyncio.get_running_loop()
        post = _Post(self.url, body.encode(), {**self.headers, "X-Appliance-Event": str(event.id)},
                     self.config.timeout)
        started = time.monotonic()
        fut = loop.run_in_executor(self.pool, post.run)
        try:
            status = await asyncio.wait_for(asyncio.shield(fut), self.config.timeout)
        except asyncio.TimeoutError:
            post.abort()
            with contextlib.suppress(Exception):
                await fut           # ends at once: its socket is shut down
            raise AttemptFailed(f"timeout after {self.config.timeout:g} s") from None
        except asyncio.CancelledError:
            post.abort()
            raise
        except (OSError, http.client.HTTPException) as exc:
            if isinstance(exc, TimeoutError) or time.monotonic() - started >= self.config.timeout:
                raise AttemptFailed(f"timeout after {self.config.timeout:g} s") from None
            raise AttemptFailed(f"{type(exc).__name__}: {exc}") from None
        if not 200 <= status < 300:
            raise AttemptFailed(f"HTTP {status}")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class Notifier:
    """The dispatcher and the targets' workers, on the running loop."""

    events: EventLog
    targets: list[Target] = field(default_factory=list)
    _sub: asyncio.Queue[Event] | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def start(cls, configs: tuple[NotifyConfig, ...], events: EventLog, audit: AuditSink | None) -> "Notifier":
        """Start following ``events`` (nothing at all when there are no entries)."""
        n = cls(events)
        for i, c in enumerate(configs):
            if c.command is not None:
                n.targets.append(CommandTarget(i, c, audit))
            if c.webhook is not None:
                n.targets.append(WebhookTarget(i, c, audit))
        if n.targets:
            n._sub = events.subscribe()
            n._tasks.append(asyncio.create_task(n._dispatch(), name="notify-dispatch"))
            n._tasks += [asyncio.create_task(t.run(), name=f"notify-{t.index}-{t.action}") for t in n.targets]
            log.info("notifications: %d target(s)", len(n.targets))
        return n

    async def _dispatch(self) -> None:
        assert self._sub is not None
        while True:
            event = await self._sub.get()
            for t in self.targets:
                if t.wants(event):
                    t.offer(event)

    def stats(self) -> list[dict[str, Any]]:
        return [{"notify": t.index, "action": t.action, "target": t.name, "queued": t.queue.qsize(),
                 "delivered": t.stats.delivered, "failed": t.stats.failed, "attempts": t.stats.attempts,
                 "dropped": t.stats.dropped} for t in self.targets]

    async def stop(self) -> None:
        if self._sub is not None:
            self.events.unsubscribe(self._sub)
            self._sub = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for t in self.targets:
            t.close()
