"""The operator's panel: server-rendered pages (Jinja2) with a small JS layer (``static/panel.js``).

Pages render the current state on the server, then ``panel.js`` keeps them
live from the API's server-sent-event streams and performs actions through
the REST API with the session cookie and the page's CSRF token (every action
first shows how many connections it touches and asks for confirmation).
Login takes a user and password from the configuration, or an API token.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from appliance import configdoc, history
from appliance.events import KINDS

from . import views
from .context import Context
from .security import COOKIE, Session

HERE = Path(__file__).parent
PAGE = 50


def _fmt_time(t: float | None) -> str:
    return "" if not t else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def build(ctx: Context) -> APIRouter:
    gw = ctx.gw
    sec = ctx.security
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["when"] = _fmt_time
    templates.env.filters["bytes"] = _fmt_bytes
    templates.env.filters["pair_lag"] = views.pair_lag
    r = APIRouter(include_in_schema=False)

    def session(request: Request) -> Session | None:
        return sec.session_of(request)

    def page(request: Request, name: str, s: Session, nav: str, **data: Any) -> Response:
        services = gw.services()
        status = gw.status()
        status["node"] = views.node(gw, services)
        return templates.TemplateResponse(request, name, {
            "me": s.principal, "csrf": s.csrf, "nav": nav, "status": status, "services": services, "kinds_all": KINDS,
            **data})

    def login_redirect() -> Response:
        return RedirectResponse("/login", status_code=303)

    @r.get("/login", response_class=HTMLResponse)
    def login_form(request: Request) -> Response:
        return templates.TemplateResponse(request, "login.html", {"error": None})

    @r.post("/login")
    def login(request: Request, username: str = Form(""), password: str = Form(""), token: str = Form("")) -> Response:
        # a sync handler: scrypt runs on a worker thread, off the loop; the limiter refuses before it runs
        source = request.client.host if request.client else "-"
        keys = [f"addr {source}"] + ([f"user {username}"] if username and not token else [])
        wait, stamp = sec.logins.begin(keys)
        if wait is not None:
            msg = sec.logins.message(wait)
            ctx.audit.record("(token)" if token else username or "-", None, "-", "login", "panel",
                             {"source": source}, f"error 429: {msg}")
            return templates.TemplateResponse(request, "login.html", {"error": msg}, status_code=429,
                                              headers={"Retry-After": str(sec.logins.seconds(wait))})
        p = None
        if token:
            p = ctx.auth.by_token(token)
            who = "(token)"
        elif username:
            p = ctx.auth.by_password(username, password)
            who = username
        else:
            who = "-"
        if p is None:
            ctx.audit.record(who, None, "-", "login", "panel", {}, "error 401: wrong credentials")
            return templates.TemplateResponse(request, "login.html", {"error": "wrong user, password or token"},
                                              status_code=401)
        from webui.auth import Principal

        sec.logins.succeeded(keys, stamp)
        sid, _ = ctx.sessions.open(Principal(p.name, p.role, "session"))
        ctx.audit.record(p.name, p.role, "session", "login", "panel", {}, "ok")
        resp = RedirectResponse("/", status_code=303)
        resp.set_cookie(COOKIE, sid, httponly=True, samesite="strict", max_age=int(ctx.sessions.ttl),
                        secure=sec.secure_cookies)
        return resp

    @r.post("/logout")
    async def logout(request: Request) -> Response:
        s = session(request)
        if s is not None and not await sec.csrf_ok(request, s):
            raise HTTPException(403, "missing or wrong CSRF token")
        ctx.sessions.close(request.cookies.get(COOKIE))
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE)
        return resp

    @r.get("/", response_class=HTMLResponse)
    async def index(request: Request) -> Response:
        s = session(request)
        if s is None:
            return login_redirect()
        total, found = gw.connections_page(limit=20)
        return page(request, "index.html", s, "status", connections=[views.decorate(c) for c in found],
                    total=total, offset=0,
                    limit=20,
                    events=[e.to_dict() for e in gw.events.list(limit=15)][::-1])

    @r.get("/services", response_class=HTMLResponse)
    async def services_page(request: Request) -> Response:
        s = session(request)
        if s is None:
            return login_redirect()
        return page(request, "services.html", s, "services",
                    backends=views.backends(gw.services()))

    @r.get("/connections", response_class=HTMLResponse)
    async def connections_page(request: Request, q: str = Query("", max_length=200), state: str = Query("", max_length=20),
                         service: str = Query("", max_length=64), backend: str = Query("", max_length=64),
                         protected: str = Query("", pattern="^(|yes|no)$"),
                         closed: str = Query("", pattern="^(|true|false)$"),
                         moved: str = Query("", pattern="^(|true|false)$"),
                         offset: int = Query(0, ge=0, le=10_000_000)) -> Response:
        s = session(request)
        if s is None:
            return login_redirect()
        prot = {"yes": True, "no": False}.get(protected)
        yes_no = {"true": True, "false": False}
        total, found = history.connections_page(gw, q or None, state or None, service or None, backend or None, prot,
                                                offset=offset, limit=PAGE, closed=yes_no.get(closed),
                                                moved=yes_no.get(moved))
        filters = {"q": q, "state": state, "service": service, "backend": backend, "protected": protected,
                   "closed": closed, "moved": moved}
        return page(request, "connections.html", s, "connections", connections=[views.decorate(c) for c in found],
                    total=total, offset=offset, limit=PAGE, filters=filters,
                    states=["SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK",
                            "TIME_WAIT", "CLOSED"],
                    backend_names=sorted({b["name"] for sv in gw.services() for b in sv["backends"]}))

    @r.get("/connections/{cid}", response_class=HTMLResponse)
    async def connection_page(request: Request, cid: int) -> Response:
        s = session(request)
        if s is None:
            return login_redirect()
        c = history.connection_doc(gw, cid)  # a closed one from the history
        if c is None:
            raise HTTPException(404, f"no connection with id {cid}")
        views.decorate(c)
        # its events, and the failovers that name it in their details; kept past the event log's
        # bound for a closed one
        timeline = history.timeline(gw, cid)
        svc = next((sv for sv in gw.services() if sv["name"] == c.get("service_name")), None)
        targets = [b["name"] for b in svc["backends"] if b["name"] != c["backend"]] if svc else []
        move = c.pop("move", None)
        http = c.pop("http", None)
        from appliance.connlog import moves_of

        return page(request, "connection.html", s, "connections", c=c, move=move, http=http, timeline=timeline,
                    targets=targets, moves=moves_of(c | {"move": move}, timeline))

    @r.get("/events", response_class=HTMLResponse)
    async def events_page(request: Request, kind: str = Query("", max_length=20), service: str = Query("", max_length=64),
                    backend: str = Query("", max_length=64), q: str = Query("", max_length=200)) -> Response:
        s = session(request)
        if s is None:
            return login_redirect()
        found = gw.events.list(kind=kind if kind in KINDS else None, service=service or None, limit=None)
        if backend:
            found = [e for e in found if e.backend == backend]
        if q:
            found = [e for e in found if q.lower() in e.reason.lower()]
        return page(request, "events.html", s, "events", events=[e.to_dict() for e in found[-500:]][::-1],
                    kinds=KINDS, filters={"kind": kind, "service": service, "backend": backend, "q": q})

    @r.get("/audit", response_class=HTMLResponse)
    async def audit_page(request: Request) -> Response:
        s = session(request)
        if s is None:
            return login_redirect()
        return page(request, "audit.html", s, "audit",
                    entries=[e.to_dict() for e in ctx.audit.list(limit=500)][::-1])

    @r.get("/admin", response_class=HTMLResponse)
    async def admin_page(request: Request) -> Response:
        s = session(request)
        if s is None:
            return login_redirect()
        if not s.principal.can("admin"):
            raise HTTPException(403, f"{s.principal.name} has role {s.principal.role}; this page needs admin")
        import json

        return page(request, "admin.html", s, "admin", tokens=ctx.auth.list_tokens(), users=ctx.auth.list_users(),
                    config_json=json.dumps(configdoc.document(gw), indent=2), config_version=ctx.config_version)

    return r
