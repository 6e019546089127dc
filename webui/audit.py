"""The audit trail: every change asked of the appliance, who asked, and what came of it.

One :class:`AuditEntry` per change request (fail over, migrate, reset, a
backend's admin state, a configuration write, a token created or revoked,
logins) — also the refused ones: a 403 or a 409 is recorded with its result.
The log is a bounded ring in memory, like the event log, and optionally
appended to a JSON-lines file (``path``) so the trail outlives the process.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(slots=True)
class AuditEntry:
    id: int
    time: float
    who: str            # user or token name ("-" when nobody could be identified)
    role: str | None
    via: str            # "token" | "session" | "-"
    action: str         # e.g. "failover", "backend.admin_state", "config.write", "token.create", "login"
    target: str         # what it was about: "service web", "backend primary", "connection 7"
    params: dict[str, Any] = field(default_factory=dict)
    result: str = "ok"  # "ok" or "error <status>: <detail>"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AuditLog:
    def __init__(self, maxlen: int = 10000, path: Path | None = None) -> None:
        self._entries: deque[AuditEntry] = deque(maxlen=maxlen)
        self._next_id = 1
        self.path = path

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, who: str, role: str | None, via: str, action: str, target: str,
               params: dict[str, Any] | None = None, result: str = "ok") -> AuditEntry:
        e = AuditEntry(self._next_id, time.time(), who, role, via, action, target, dict(params or {}), result)
        self._next_id += 1
        self._entries.append(e)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(e.to_dict(), default=str) + "\n")
        return e

    def list(self, who: str | None = None, action: str | None = None, since_id: int | None = None,
             limit: int = 100) -> list[AuditEntry]:
        found = [e for e in self._entries
                 if (who is None or e.who == who) and (action is None or e.action == action)
                 and (since_id is None or e.id > since_id)]
        return found[-limit:] if limit > 0 else []
