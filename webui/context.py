"""What the web layer shares between its routers: the gateway, who is who, the audit trail.

``Context.act`` runs one change on behalf of a principal, on the gateway's event loop (the one
owner of its state: ``Gateway.call``), and audits it,
whatever its outcome: controller errors become HTTP errors (NotFound 404,
Conflict 409, a bad value 422) and the audit entry records the status.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fastapi import HTTPException

from webui.audit import AuditLog
from webui.auth import AuthStore, Principal
from appliance.config import ConfigError
from appliance.errors import Conflict, NotFound
from webui.metrics import Metrics

from .security import Security, Sessions


@dataclass
class Context:
    gw: Any
    auth: AuthStore
    sessions: Sessions
    audit: AuditLog
    security: Security
    metrics: Metrics
    config_version: int = 1

    @classmethod
    def for_gateway(cls, gw: Any) -> "Context":
        api = gw.config.api
        auth = AuthStore.from_api_config(api)
        path = getattr(api, "audit_file", None)
        audit = AuditLog(path=Path(path) if path else None)
        sessions = Sessions()
        return cls(gw=gw, auth=auth, sessions=sessions, audit=audit, security=Security(auth, sessions, audit),
                   metrics=Metrics(gw))

    async def act(self, who: Principal, action: str, target: str, params: dict[str, Any],
                  fn: Callable[[], Any], changes_config: bool = False) -> Any:
        """Run ``fn`` on the gateway's loop (awaiting it when it is a coroutine) and audit it."""
        try:
            result = await self.gw.call(fn)
        except HTTPException as exc:
            self._audit(who, action, target, params, f"error {exc.status_code}: {exc.detail}")
            raise
        except NotFound as exc:
            self._audit(who, action, target, params, f"error 404: {exc}")
            raise HTTPException(404, str(exc)) from None
        except Conflict as exc:
            self._audit(who, action, target, params, f"error 409: {exc}")
            raise HTTPException(409, str(exc)) from None
        except ConfigError as exc:
            self._audit(who, action, target, params, f"error 422: {exc}")
            raise HTTPException(422, [{"loc": ["body", "config", *exc.field.split(".")], "msg": exc.message,
                                       "field": exc.field, "type": "config"}]) from None
        except (ValueError, LookupError) as exc:
            self._audit(who, action, target, params, f"error 422: {exc}")
            raise HTTPException(422, str(exc)) from None
        if changes_config:
            self.config_version += 1
        self._audit(who, action, target, params, "ok")
        return result

    def _audit(self, who: Principal, action: str, target: str, params: dict[str, Any], result: str) -> None:
        self.audit.record(who.name, who.role, who.via, action, target, params, result)
