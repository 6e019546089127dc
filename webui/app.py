"""The REST API and the panel (FastAPI).

``create_app(gateway)`` takes any object with the read methods of
:class:`appliance.daemon.Gateway` (``status``, ``services``, ``connections``,
``connection``) and its ``config.api.token``: the web layer holds no state of
its own and never touches the kernel.

Authentication: the API wants ``Authorization: Bearer <token>``.  The panel
logs in with the same token through a form, which sets an HttpOnly,
SameSite=Strict session cookie; the cookie is accepted for reads only.
``/healthz`` is open (load balancers and systemd probe it).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path
from typing import Any, Protocol

from fastapi import Body, Depends, FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field

HERE = Path(__file__).parent
COOKIE = "appliance_session"


class GatewayView(Protocol):
    config: Any
    events: Any

    def status(self) -> dict[str, Any]: ...
    def services(self) -> list[dict[str, Any]]: ...
    def connections(self) -> list[dict[str, Any]]: ...
    def connection(self, cid: int) -> dict[str, Any] | None: ...
    def failover(self, service: str, to: str | None = None, reason: str = "manual") -> dict[str, Any]: ...
    def migrate(self, cid: int, to: str, mode: str = "replay", reason: str = "manual") -> dict[str, Any]: ...
    def reset_connection(self, cid: int, reason: str = "manual") -> dict[str, Any]: ...


class FailoverRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: str | None = Field(None, description="backend to fail over to (default: the first ready, healthy one)",
                           min_length=1, max_length=64)


class MigrateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: str = Field(..., description="backend to move the connection to", min_length=1, max_length=64)
    mode: str = Field("replay", pattern="^(replay)$", description="how to resume it: replay (unmodified backend)")


def _call(fn, *args, **kwargs) -> dict[str, Any]:
    """Controller errors as HTTP: NotFound -> 404, Conflict -> 409."""
    from appliance.gateway import Conflict, NotFound

    try:
        return fn(*args, **kwargs)
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except Conflict as exc:
        raise HTTPException(409, str(exc)) from None


def create_app(gw: GatewayView) -> FastAPI:
    app = FastAPI(
        title="Failover gateway",
        version="0.1.0",
        description="Keeps TCP connections alive when the server behind the gateway dies.",
    )
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    token = gw.config.api.token
    # the cookie holds a keyed digest of the token, never the token itself
    session_key = secrets.token_bytes(32)
    session_value = hmac.new(session_key, token.encode(), hashlib.sha256).hexdigest()
    bearer = HTTPBearer(auto_error=False)

    def authenticated(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if creds is not None:
            if creds.scheme.lower() == "bearer" and hmac.compare_digest(creds.credentials, token):
                return
            raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})
        cookie = request.cookies.get(COOKIE)
        if cookie and hmac.compare_digest(cookie, session_value) and request.method == "GET":
            return
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(authenticated)]

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/v1/status", dependencies=auth, tags=["status"])
    def status() -> dict[str, Any]:
        return gw.status()

    @app.get("/api/v1/services", dependencies=auth, tags=["services"])
    def services() -> list[dict[str, Any]]:
        return gw.services()

    @app.get("/api/v1/connections", dependencies=auth, tags=["connections"])
    def connections(state: str | None = None, service: str | None = None, backend: str | None = None) -> list[dict[str, Any]]:
        out = gw.connections()
        if state:
            out = [c for c in out if c["state"] == state.upper()]
        if service:
            out = [c for c in out if c["service_name"] == service or c["service"] == service]
        if backend:
            out = [c for c in out if c["backend"] == backend]
        return out

    @app.get("/api/v1/connections/{cid}", dependencies=auth, tags=["connections"])
    def connection(cid: int) -> dict[str, Any]:
        c = gw.connection(cid)
        if c is None:
            raise HTTPException(404, f"no connection with id {cid}")
        return c

    @app.post("/api/v1/services/{name}/failover", dependencies=auth, tags=["failover"], status_code=202)
    def failover(name: str, body: FailoverRequest | None = Body(None)) -> dict[str, Any]:
        """Move every open connection of the service's active backend to another backend."""
        return _call(gw.failover, name, body.to if body else None, reason="manual (API)")

    @app.post("/api/v1/connections/{cid}/migrate", dependencies=auth, tags=["failover"], status_code=202)
    def migrate(cid: int, body: MigrateRequest) -> dict[str, Any]:
        """Move one connection to another backend."""
        return _call(gw.migrate, cid, body.to, body.mode, reason="manual (API)")

    @app.delete("/api/v1/connections/{cid}", dependencies=auth, tags=["connections"])
    def reset_connection(cid: int) -> dict[str, Any]:
        """Reset a connection on both sides."""
        return _call(gw.reset_connection, cid, reason="manual (API)")

    @app.get("/api/v1/events", dependencies=auth, tags=["events"])
    def events(kind: str | None = None, service: str | None = None, connection: int | None = None,
               since_id: int | None = None, limit: int = 100) -> list[dict[str, Any]]:
        limit = max(1, min(limit, 10000))
        return [e.to_dict() for e in gw.events.list(kind=kind, service=service, connection=connection,
                                                      since_id=since_id, limit=limit)]

    # --- panel --------------------------------------------------------------------
    def logged_in(request: Request) -> bool:
        cookie = request.cookies.get(COOKIE)
        return bool(cookie) and hmac.compare_digest(cookie, session_value)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index(request: Request) -> Response:
        if not logged_in(request):
            return RedirectResponse("/login", status_code=303)
        return templates.TemplateResponse(
            request, "index.html",
            {"status": gw.status(), "services": gw.services(), "connections": gw.connections()},
        )

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_form(request: Request) -> Response:
        return templates.TemplateResponse(request, "login.html", {"error": None})

    @app.post("/login", include_in_schema=False)
    def login(request: Request, token_in: str = Form("", alias="token")) -> Response:
        if not hmac.compare_digest(token_in.encode(), token.encode()):
            return templates.TemplateResponse(request, "login.html", {"error": "wrong token"}, status_code=401)
        resp = RedirectResponse("/", status_code=303)
        resp.set_cookie(COOKIE, session_value, httponly=True, samesite="strict")
        return resp

    @app.post("/logout", include_in_schema=False)
    def logout() -> Response:
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE)
        return resp

    return app
