"""Authentication, roles and CSRF for the API and the panel.

* REST: ``Authorization: Bearer <token>``; the token's role decides.
* Panel: a login (user and password, or a token) opens a server-side session;
  the browser holds only its random id in an HttpOnly, SameSite=Strict
  cookie.  Each session has a CSRF token (in the page's ``<meta>``); any
  request that is not a read and is authorised by the cookie must carry it,
  as the ``X-CSRF-Token`` header (the panel's JS) or a ``csrf_token`` form
  field (plain forms).  Bearer requests need no CSRF token: a browser never
  adds that header by itself.
* ``require(role)`` gives a FastAPI dependency: 401 without credentials,
  403 for a role too low or a missing CSRF token (refused changes are
  audited too).
* :class:`LoginLimiter`: failed sign-ins per source address and per user in
  a sliding window (``[api] login_attempts`` within ``login_window``
  seconds); beyond it a sign-in is refused (429) before its password is
  checked.  The login handler runs on worker threads (scrypt is slow), so the
  limiter holds a lock.
"""

from __future__ import annotations

import hmac
import math
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from fastapi import HTTPException, Request

from webui.audit import AuditLog
from webui.auth import AuthStore, Principal

COOKIE = "appliance_session"
SESSION_SECONDS = 12 * 3600
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


@dataclass
class Session:
    principal: Principal
    csrf: str
    expires: float
    created: float = field(default_factory=time.time)


class Sessions:
    """Server-side sessions: the cookie is a random id, never a credential."""

    def __init__(self, ttl: float = SESSION_SECONDS, max_sessions: int = 10000) -> None:
        self.ttl = ttl
        self.max_sessions = max_sessions
        self._by_id: dict[str, Session] = {}

    def open(self, principal: Principal) -> tuple[str, Session]:
        now = time.time()
        if len(self._by_id) >= self.max_sessions:  # drop expired ones, then the oldest
            for sid in [k for k, s in self._by_id.items() if s.expires < now]:
                del self._by_id[sid]
            while len(self._by_id) >= self.max_sessions:
                del self._by_id[next(iter(self._by_id))]
        sid = secrets.token_urlsafe(32)
        s = Session(principal, secrets.token_urlsafe(24), now + self.ttl)
        self._by_id[sid] = s
        return sid, s

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        s = self._by_id.get(sid)
        if s is None:
            return None
        if s.expires < time.time():
            del self._by_id[sid]
            return None
        return s

    def close(self, sid: str | None) -> None:
        if sid:
            self._by_id.pop(sid, None)


class LoginLimiter:
    """Failed sign-ins per key (``addr <ip>``, ``user <name>``) in a sliding window of ``window`` s.

    ``begin(keys)`` is atomic: it refuses (the seconds until the oldest counted attempt leaves
    the window) when any key already has ``attempts`` in the window, else counts this attempt
    for every key at once, before the credentials are checked — so concurrent sign-ins on
    worker threads can never run more checks than the limit allows.  ``succeeded`` takes the
    attempt back (a successful sign-in does not count).  Refused attempts are not counted:
    a client hammering a locked key does not extend its lock.
    """

    def __init__(self, attempts: int = 5, window: float = 60.0, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.attempts = attempts
        self.window = window
        self.max_keys = max_keys
        self.clock = clock
        self._lock = threading.Lock()
        self._tries: dict[str, deque[float]] = {}

    def _live(self, key: str, now: float) -> deque[float] | None:
        q = self._tries.get(key)
        if q is None:
            return None
        while q and q[0] <= now - self.window:
            q.popleft()
        if not q:
            del self._tries[key]
            return None
        return q

    def begin(self, keys: list[str]) -> tuple[float | None, float]:
        """(None, stamp) when the attempt may go on (``stamp`` for :meth:`succeeded`);
        (seconds to wait, 0.0) when it is refused."""
        with self._lock:
            now = self.clock()
            wait = 0.0
            for k in keys:
                q = self._live(k, now)
                if q is not None and len(q) >= self.attempts:
                    wait = max(wait, q[-self.attempts] + self.window - now)
            if wait > 0:
                return wait, 0.0
            if len(self._tries) + len(keys) > self.max_keys:  # bounded: forget expired keys, then the oldest
                for k in list(self._tries):
                    self._live(k, now)
                while len(self._tries) + len(keys) > self.max_keys:
                    del self._tries[next(iter(self._tries))]
            for k in keys:
                self._tries.setdefault(k, deque()).append(now)
            return None, now

    def succeeded(self, keys: list[str], stamp: float) -> None:
        with self._lock:
            for k in keys:
                q = self._tries.get(k)
                if q is not None:
                    try:
                        q.remove(stamp)
                    except ValueError:
                        pass
                    if not q:
                        del self._tries[k]

    @staticmethod
    def seconds(wait: float) -> int:
        """Whole seconds to wait (the ``Retry-After``), at least 1."""
        return max(1, math.ceil(wait))

    @classmethod
    def message(cls, wait: float) -> str:
        return f"too many sign-in attempts; try again in {cls.seconds(wait)} s"


class Security:
    def __init__(self, auth: AuthStore, sessions: Sessions, audit: AuditLog,
                 logins: LoginLimiter | None = None, secure_cookies: bool = False) -> None:
        self.auth = auth
        self.sessions = sessions
        self.audit = audit
        self.logins = logins if logins is not None else LoginLimiter()
        self.secure_cookies = secure_cookies    # TLS is on: the session cookie is marked Secure

    def session_of(self, request: Request) -> Session | None:
        return self.sessions.get(request.cookies.get(COOKIE))

    async def identify(self, request: Request) -> tuple[Principal, Session | None]:
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, cred = header.partition(" ")
            p = self.auth.by_token(cred.strip()) if scheme.lower() == "bearer" and cred.strip() else None
            if p is None:
                raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})
            return p, None
        s = self.session_of(request)
        if s is None:
            raise HTTPException(401, "missing bearer token or session", headers={"WWW-Authenticate": "Bearer"})
        return s.principal, s

    async def csrf_ok(self, request: Request, s: Session) -> bool:
        sent = request.headers.get("x-csrf-token")
        if sent is None and request.headers.get("content-type", "").startswith(
                ("application/x-www-form-urlencoded", "multipart/form-data")):
            form = await request.form()
            v = form.get("csrf_token")
            sent = v if isinstance(v, str) else None
        if not sent:
            return False
        return hmac.compare_digest(sent, s.csrf)

    def require(self, role: str) -> Callable[[Request], Any]:
        async def dependency(request: Request) -> Principal:
            p, s = await self.identify(request)
            unsafe = request.method not in SAFE_METHODS
            if unsafe and s is not None and not await self.csrf_ok(request, s):
                self._refused(request, p, "403: missing or wrong CSRF token")
                raise HTTPException(403, "missing or wrong CSRF token (X-CSRF-Token header or csrf_token field)")
            if not p.can(role):
                if unsafe:
                    self._refused(request, p, f"403: needs role {role}")
                raise HTTPException(403, f"{p.name} has role {p.role}; this needs {role}")
            return p

        dependency.__name__ = f"require_{role}"
        return dependency

    def _refused(self, request: Request, p: Principal, result: str) -> None:
        self.audit.record(p.name, p.role, p.via, f"{request.method} {request.url.path}", request.url.path,
                          {}, f"error {result}")
