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

from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.templating import Jinja2Templates

HERE = Path(__file__).parent
COOKIE = "appliance_session"


class GatewayView(Protocol):
    config: Any

    def status(self) -> dict[str, Any]: ...
    def services(self) -> list[dict[str, Any]]: ...
    def connections(self) -> list[dict[str, Any]]: ...
    def connection(self, cid: int) -> dict[str, Any] | None: ...


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
