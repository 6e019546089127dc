"""The web layer of the appliance: REST API, operator panel, metrics (FastAPI).

``create_app(gateway)`` takes a :class:`appliance.gateway.Gateway` (or
anything with its read and action methods, ``config``, ``events`` and
``dataplane``) and serves:

* ``/api/v1/...`` and ``/metrics`` (:mod:`webui.api`), documented at ``/docs``;
* the panel's pages (:mod:`webui.panel`), live through server-sent events;
* ``/healthz``, open (load balancers and systemd probe it).

Who may do what is :mod:`webui.security` (tokens, sessions, roles, CSRF);
every change is audited (:mod:`webui.audit`).  The web layer never
touches the kernel: the gateway's methods do.

Errors: the API (``/api/...``, ``/metrics``, ``/healthz``, ``/docs``) answers
JSON with a ``detail``; a browser never sees that.  A request to a panel
path, or one whose ``Accept`` prefers ``text/html`` (a browser navigating),
gets the error as a page of the panel (``templates/error.html``): the same
status code, the message, a link back.
"""

from __future__ import annotations

import importlib.util
import logging
from http import HTTPStatus
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from appliance.events import KINDS

from . import api, panel, views
from .context import Context
from .security import LoginLimiter

HERE = Path(__file__).parent
log = logging.getLogger("appliance.web")

# answered in JSON (with ``detail``) unless the client prefers HTML; everything else is the panel's
API_PATHS = ("/api/", "/metrics", "/healthz", "/docs", "/redoc", "/openapi.json")
TITLES = {400: "Bad request", 401: "Sign-in needed", 403: "Forbidden", 404: "Not found",
          405: "Method not allowed", 409: "Refused", 422: "Invalid request", 429: "Too many requests",
          500: "Internal error"}
SECTIONS = {"services": "the services", "connections": "the connections", "events": "the events",
            "audit": "the audit trail", "admin": "the admin page"}


def _accept_q(accept: str) -> dict[str, float]:
    """Media ranges of an ``Accept`` header and their q-values."""
    out: dict[str, float] = {}
    for part in accept.split(","):
        media, *params = [x.strip() for x in part.split(";")]
        if not media:
            continue
        q = 1.0
        for prm in params:
            k, _, v = prm.partition("=")
            if k.strip().lower() == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        out[media.lower()] = max(q, out.get(media.lower(), 0.0))
    return out


def prefers_html(request: Request) -> bool:
    """The client asks for HTML over JSON (a browser's navigation does; ``fetch`` sends ``*/*``)."""
    q = _accept_q(request.headers.get("accept", ""))
    html = max(q.get("text/html", 0.0), q.get("application/xhtml+xml", 0.0))
    json = q.get("application/json", q.get("application/*", q.get("*/*", 0.0)))
    return html > 0 and html > json


def wants_html(request: Request) -> bool:
    path = request.url.path
    return not (path.startswith(API_PATHS) or path == "/api") or prefers_html(request)


def _messages(detail: Any) -> list[str]:
    """A ``detail`` as sentences: a string as it is, validation errors as 'field: message'."""
    if isinstance(detail, list):
        out = []
        for e in detail:
            if isinstance(e, dict):
                field = e.get("field") or ".".join(str(x) for x in (e.get("loc") or ())[1:]) or None
                out.append(f"{field}: {e.get('msg', 'invalid')}" if field else str(e.get("msg", "invalid")))
            else:
                out.append(str(e))
        return out or ["invalid request"]
    return [str(detail)] if detail not in (None, "") else []


def create_app(gw: Any) -> FastAPI:
    app = FastAPI(
        title="Failover gateway",
        version="0.1.0",
        description="Keeps TCP connections alive when the server behind the gateway dies. "
                    "Send `Authorization: Bearer <token>`; roles: viewer (read), operator (fail over, migrate, "
                    "reset, drain), admin (configuration, tokens).",
    )
    ctx = Context.for_gateway(gw)
    app.state.ctx = ctx
    api_cfg = gw.config.api
    ctx.security.logins = LoginLimiter(getattr(api_cfg, "login_attempts", 5), getattr(api_cfg, "login_window", 60.0))
    ctx.security.secure_cookies = bool(getattr(api_cfg, "tls_cert", None))
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["when"] = panel._fmt_time
    templates.env.filters["bytes"] = panel._fmt_bytes

    def error_page(request: Request, status: int, detail: Any, headers: dict[str, str] | None = None) -> Response:
        """The error as a page of the panel: its layout (with the banner when signed in), the code,
        the message, a link back."""
        data: dict[str, Any] = {"me": None, "csrf": None, "kinds_all": KINDS}
        s = ctx.security.session_of(request)
        if s is not None:
            try:
                services = gw.services()
                status_doc = gw.status()
                status_doc["node"] = views.node(gw, services)
                data.update(me=s.principal, csrf=s.csrf, status=status_doc, services=services)
            except Exception:  # the page must still render: without the banner
                log.exception("error page: no banner")
        section = request.url.path.strip("/").split("/")[0]
        if status == 401 or s is None and not request.url.path.startswith(API_PATHS):
            back, back_text = "/login", "Sign in"
        elif section in SECTIONS and request.url.path.rstrip("/") != f"/{section}":
            back, back_text = f"/{section}", f"Back to {SECTIONS[section]}"
        else:
            back, back_text = "/", "Back to the status page"
        try:
            title = TITLES.get(status) or HTTPStatus(status).phrase
        except ValueError:
            title = "Error"
        data.update(status_code=status, title=title, messages=_messages(detail), back=back, back_text=back_text,
                    nav=section if section in SECTIONS else "")
        return templates.TemplateResponse(request, "error.html", data, status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if wants_html(request):
            return error_page(request, exc.status_code, exc.detail, getattr(exc, "headers", None))
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        """422 naming each bad field; the rejected input is not echoed (it may not even be JSON: NaN)."""
        detail = [{"loc": list(e.get("loc", ())), "field": ".".join(str(x) for x in e.get("loc", ())[1:]) or None,
                   "msg": e.get("msg", "invalid"), "type": e.get("type", "value_error")} for e in exc.errors()]
        if wants_html(request):
            return error_page(request, 422, detail)
        return JSONResponse({"detail": detail}, status_code=422)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    app.include_router(api.build(ctx))
    # checkpoint export/import routes live in their own module (issue 4)
    if importlib.util.find_spec("webui.checkpoints") is not None:
        from . import checkpoints

        app.include_router(checkpoints.build(ctx))
    app.include_router(panel.build(ctx))
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    return app
