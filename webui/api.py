"""The REST API under ``/api/v1`` (and ``/metrics``): everything the panel does.

Reads need the ``viewer`` role, traffic actions ``operator``, configuration
and tokens ``admin`` (see :mod:`webui.security`).  Every change goes through
:meth:`webui.context.Context.act`, which audits it.  Errors are status codes
with a ``detail`` naming the problem: 401/403 for who, 404 for what does
not exist, 409 for what cannot be done now (or a stale config version), 422
for input that does not validate (the field is named).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request, Response
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from appliance import admin, configdoc, history
from webui.auth import Principal
from appliance.events import KINDS, names_connection

from . import live, views
from .context import Context

NAME = r"^[A-Za-z0-9_.-]+$"


class FailoverRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: str | None = Field(None, description="backend to fail over to (default: the first ready, healthy one)",
                           min_length=1, max_length=64)


class MigrateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: str = Field(..., description="backend to move the connection to", min_length=1, max_length=64)
    mode: str = Field("replay", pattern="^(replay|resume)$",
                      description="how to resume it: replay (unmodified backend) or resume (the backends' agents "
                                  "move the live endpoint, TCP_REPAIR)")


class BackendStateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    admin_state: Literal["ready", "drain", "maint"] = Field(
        ..., description="ready: takes new connections; drain: keeps its connections, takes no new ones; "
                         "maint: no traffic (its connections are moved)")
    service: str | None = Field(None, min_length=1, max_length=64, pattern=NAME,
                                description="only in this service (default: every service that has the backend)")


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., min_length=1, max_length=64, pattern=NAME)
    role: Literal["viewer", "operator", "admin"]


class ConfigWrite(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(..., description="the version this change was made from (GET /api/v1/config)")
    config: dict[str, Any] = Field(..., description="the whole document, as GET returns it")


def json_response(doc: Any, headers: dict[str, str] | None = None) -> Response:
    """A large document straight to JSON: FastAPI's generic encoder and response validation cost
    milliseconds per thousand items, on the loop that carries the packets."""
    return Response(json.dumps(doc, default=str, separators=(",", ":")), media_type="application/json",
                    headers=headers)


def _kind(kind: str | None) -> str | None:
    if kind is not None and kind not in KINDS:
        raise HTTPException(422, [{"loc": ["query", "kind"], "msg": f"must be one of {', '.join(KINDS)}",
                                   "type": "value_error"}])
    return kind


def build(ctx: Context) -> APIRouter:
    gw = ctx.gw
    sec = ctx.security
    viewer = Depends(sec.require("viewer"))
    operator = Depends(sec.require("operator"))
    admin_ = Depends(sec.require("admin"))
    r = APIRouter()

    # --- reads -----------------------------------------------------------------
    def status_doc() -> dict[str, Any]:
        st = gw.status()
        services = gw.services()
        st["node"] = views.node(gw, services)
        st["config_version"] = ctx.config_version
        return st

    @r.get("/api/v1/status", tags=["status"])
    async def status(p: Principal = viewer) -> dict[str, Any]:
        return status_doc()

    @r.get("/api/v1/status/stream", tags=["status"], summary="The status, every second (SSE)")
    async def status_stream(request: Request, p: Principal = viewer,
                            interval: float = Query(1.0, ge=0.1, le=60),
                            timeout: float | None = Query(None, gt=0, le=86400)) -> Response:
        return live.response(live.snapshot_stream(request, status_doc, "status", interval, timeout))

    @r.get("/api/v1/loop", tags=["status"], summary="The event loop's stalls (the longest callbacks it ran)")
    async def loop_stalls(p: Principal = viewer, since: float = Query(0.0, ge=0, le=1e12,
                                                                      description="stalls after this time")
                          ) -> dict[str, Any]:
        if gw.loop_stats is None:
            raise HTTPException(409, "the loop monitor runs in 'appliance run' only")
        return gw.loop_stats(since)

    @r.get("/api/v1/whoami", tags=["auth"])
    async def whoami(p: Principal = viewer) -> dict[str, Any]:
        return {"name": p.name, "role": p.role, "via": p.via}

    @r.get("/api/v1/services", tags=["services"])
    async def services(p: Principal = viewer) -> list[dict[str, Any]]:
        return gw.services()

    @r.get("/api/v1/backends", tags=["services"], summary="Every backend of every service, HAProxy style")
    async def backends(p: Principal = viewer) -> list[dict[str, Any]]:
        return views.backends(gw.services())

    def connections_page(q: str | None, state: str | None, service: str | None, backend: str | None,
                         protected: bool | None, open_only: bool, offset: int, limit: int,
                         closed: bool | None = None, moved: bool | None = None) -> tuple[int, list]:
        # live and closed connections (appliance.history), each once
        total, page = history.connections_page(gw, q, state, service, backend, protected, open_only, offset, limit,
                                               closed=closed, moved=moved)
        return total, [views.decorate(c) for c in page]

    @r.get("/api/v1/connections", tags=["connections"], response_model=list[dict[str, Any]])
    async def connections(p: Principal = viewer,
                    q: str | None = Query(None, max_length=200, description="substring of id, client, backend..."),
                    state: str | None = Query(None, max_length=20), service: str | None = Query(None, max_length=64),
                    backend: str | None = Query(None, max_length=64), protected: bool | None = None,
                    open_only: bool = False, offset: int = Query(0, ge=0, le=10_000_000),
                    limit: int = Query(10000, ge=1, le=100000),
                    closed: bool | None = Query(None, description="only closed (true) or only open (false) ones"),
                    moved: bool | None = Query(None, description="moved at least once (true) or never (false)")
                    ) -> Response:
        """Tracked connections and closed ones (the history), filtered, in id order; ``X-Total-Count``
        says how many matched."""
        total, page = connections_page(q, state, service, backend, protected, open_only, offset, limit, closed, moved)
        return json_response(page, {"X-Total-Count": str(total)})

    @r.get("/api/v1/connections/stream", tags=["connections"], summary="A filtered page of connections (SSE)")
    async def connections_stream(request: Request, p: Principal = viewer, q: str | None = Query(None, max_length=200),
                                 state: str | None = Query(None, max_length=20),
                                 service: str | None = Query(None, max_length=64),
                                 backend: str | None = Query(None, max_length=64), protected: bool | None = None,
                                 open_only: bool = False, offset: int = Query(0, ge=0, le=10_000_000),
                                 limit: int = Query(50, ge=1, le=1000), interval: float = Query(1.0, ge=0.1, le=60),
                                 timeout: float | None = Query(None, gt=0, le=86400),
                                 closed: bool | None = None, moved: bool | None = None) -> Response:
        def produce() -> dict[str, Any]:
            total, page = connections_page(q, state, service, backend, protected, open_only, offset, limit,
                                           closed, moved)
            return {"total": total, "offset": offset, "limit": limit, "connections": page}

        return live.response(live.snapshot_stream(request, produce, "connections", interval, timeout))

    def one(cid: int) -> dict[str, Any]:
        c = history.connection_doc(gw, cid)  # a closed one from the history
        if c is None:
            raise HTTPException(404, f"no connection with id {cid}")
        return views.decorate(c)

    @r.get("/api/v1/connections/{cid}", tags=["connections"])
    async def connection(cid: int, p: Principal = viewer) -> dict[str, Any]:
        return one(cid)

    @r.get("/api/v1/connections/{cid}/stream", tags=["connections"], summary="One connection, live (SSE)")
    async def connection_stream(cid: int, request: Request, p: Principal = viewer,
                                interval: float = Query(0.5, ge=0.1, le=60),
                                timeout: float | None = Query(None, gt=0, le=86400)) -> Response:
        one(cid)

        def produce() -> dict[str, Any] | None:
            c = history.connection_doc(gw, cid)
            return None if c is None else views.decorate(c)

        return live.response(live.snapshot_stream(request, produce, "connection", interval, timeout))

    @r.get("/api/v1/connections/{cid}/pcap", tags=["connections"], summary="The connection's recent packets (pcap)")
    async def connection_pcap(cid: int, p: Principal = viewer) -> Response:
        from appliance import packetring

        one(cid)
        ring = packetring.of(gw)
        data = history.pcap(gw, cid)  # a closed connection's, copied when it ended
        if data is None:
            if ring is None:
                raise HTTPException(409, "packet recording is not enabled on this gateway")
            data = ring.pcap(cid)
        return Response(data, media_type="application/vnd.tcpdump.pcap",
                        headers={"Content-Disposition": f'attachment; filename="connection-{cid}.pcap"'})

    # --- traffic actions (operator) ------------------------------------------------
    @r.get("/api/v1/services/{name}/failover", tags=["failover"], summary="What a failover would touch")
    async def failover_impact(name: str, p: Principal = viewer) -> dict[str, Any]:
        svc = next((s for s in gw.services() if s["name"] == name), None)
        if svc is None:
            raise HTTPException(404, f"no service named {name!r}")
        active = svc["active_backend"]
        n = next(b["connections"] for b in svc["backends"] if b["name"] == active)
        return {"service": name, "from": active, "connections": n,
                "targets": [b["name"] for b in svc["backends"] if b["name"] != active
                            and b["admin_state"] == "ready" and b["health"].get("state") != "down"]}

    @r.post("/api/v1/services/{name}/failover", tags=["failover"], status_code=202)
    async def failover(name: str, body: FailoverRequest | None = Body(None), p: Principal = operator) -> dict[str, Any]:
        """Move every open connection of the service's active backend to another backend."""
        to = body.to if body else None
        return await ctx.act(p, "failover", f"service {name}", {"to": to},
                       lambda: gw.failover_async(name, to, reason=f"manual ({p.via} {p.name})"))

    @r.post("/api/v1/connections/{cid}/migrate", tags=["failover"], status_code=202)
    async def migrate(cid: int, body: MigrateRequest, p: Principal = operator) -> dict[str, Any]:
        """Move one connection to another backend."""
        return await ctx.act(p, "migrate", f"connection {cid}", {"to": body.to, "mode": body.mode},
                       lambda: gw.migrate_async(cid, body.to, body.mode, reason=f"manual ({p.via} {p.name})"))

    @r.delete("/api/v1/connections/{cid}", tags=["connections"])
    async def reset_connection(cid: int, p: Principal = operator) -> dict[str, Any]:
        """Reset a connection on both sides."""
        return await ctx.act(p, "reset", f"connection {cid}", {},
                       lambda: gw.reset_connection(cid, reason=f"manual ({p.via} {p.name})"))

    @r.get("/api/v1/backends/{name}", tags=["services"], summary="A backend, and what a change of state would touch")
    async def backend(name: str, p: Principal = viewer,
                admin_state: Literal["ready", "drain", "maint"] | None = None,
                service: str | None = Query(None, max_length=64)) -> dict[str, Any]:
        rows = [b for b in views.backends(gw.services())
                if b["name"] == name and (service is None or b["service"] == service)]
        if not rows:
            raise HTTPException(404, f"no backend named {name!r}")
        out: dict[str, Any] = {"name": name, "services": rows}
        if admin_state is not None:
            out["impact"] = admin.impact(gw, name, admin_state, service)
        return out

    @r.put("/api/v1/backends/{name}", tags=["services"])
    async def set_backend(name: str, body: BackendStateRequest, p: Principal = operator) -> dict[str, Any]:
        """Set a backend's admin state: ready, drain or maint (at run time; the file is not changed)."""
        return await ctx.act(p, "backend.admin_state", f"backend {name}", body.model_dump(),
                       lambda: admin.set_admin_state(gw, name, body.admin_state, body.service,
                                                     reason=f"admin ({p.via} {p.name})"),
                       changes_config=True)

    # --- events and audit -------------------------------------------------------------
    @r.get("/api/v1/events", tags=["events"], response_model=list[dict[str, Any]])
    async def events(p: Principal = viewer, kind: str | None = Query(None, max_length=20),
               service: str | None = Query(None, max_length=64), backend: str | None = Query(None, max_length=64),
               connection: int | None = None, q: str | None = Query(None, max_length=200),
               since_id: int | None = None, limit: int = Query(100, ge=1, le=10000)) -> Response:
        """Failovers, migrations, health transitions, divergences, resets, refusals, admin changes; oldest first."""
        found = gw.events.list(kind=_kind(kind), service=service, connection=connection, since_id=since_id,
                               limit=None)
        if backend:
            found = [e for e in found if e.backend == backend]
        if q:
            found = [e for e in found if q.lower() in e.reason.lower()]
        return json_response([e.to_dict() for e in found[-limit:]])

    @r.get("/api/v1/events/stream", tags=["events"], summary="New events as they happen (SSE)")
    async def events_stream(request: Request, p: Principal = viewer, kind: str | None = Query(None, max_length=20),
                            service: str | None = Query(None, max_length=64),
                            backend: str | None = Query(None, max_length=64), connection: int | None = None,
                            since_id: int | None = None,
                            timeout: float | None = Query(None, gt=0, le=86400)) -> Response:
        _kind(kind)
        last = request.headers.get("last-event-id")
        if since_id is None and last and last.isdigit():
            since_id = int(last)

        def match(e: Any) -> bool:
            return ((kind is None or e.kind == kind) and (service is None or e.service == service)
                    and (backend is None or e.backend == backend)
                    and (connection is None or names_connection(e, connection)))

        return live.response(live.events_stream(request, gw.events, match, since_id, timeout))

    @r.get("/api/v1/audit", tags=["audit"])
    async def audit(p: Principal = viewer, who: str | None = Query(None, max_length=64),
              action: str | None = Query(None, max_length=64), since_id: int | None = None,
              limit: int = Query(100, ge=1, le=10000)) -> list[dict[str, Any]]:
        """Every change asked of the appliance: who, what, when, and the result."""
        return [e.to_dict() for e in ctx.audit.list(who, action, since_id, limit)]

    # --- tokens and users (admin) ---------------------------------------------------------
    @r.get("/api/v1/tokens", tags=["auth"])
    async def tokens(p: Principal = admin_) -> list[dict[str, Any]]:
        return ctx.auth.list_tokens()

    @r.post("/api/v1/tokens", tags=["auth"], status_code=201)
    async def create_token(body: TokenRequest, p: Principal = admin_) -> dict[str, Any]:
        """Create an API token; the response is the only time the token is shown."""
        if body.name in ctx.auth.tokens:
            ctx._audit(p, "token.create", f"token {body.name}", {"role": body.role}, "error 409: exists")
            raise HTTPException(409, f"a token named {body.name!r} exists already")
        tok = await ctx.act(p, "token.create", f"token {body.name}", {"role": body.role},
                      lambda: ctx.auth.create_token(body.name, body.role, p.name))
        return {"name": body.name, "role": body.role, "token": tok}

    @r.delete("/api/v1/tokens/{name}", tags=["auth"])
    async def revoke_token(name: str, p: Principal = admin_) -> dict[str, Any]:
        def revoke() -> dict[str, Any]:
            try:
                return ctx.auth.revoke_token(name).public()
            except LookupError as exc:
                raise HTTPException(404, str(exc)) from None

        return await ctx.act(p, "token.revoke", f"token {name}", {}, revoke)

    @r.get("/api/v1/users", tags=["auth"])
    async def users(p: Principal = admin_) -> list[dict[str, Any]]:
        return ctx.auth.list_users()

    # --- configuration ------------------------------------------------------------------------
    @r.get("/api/v1/config", tags=["config"])
    async def config(response: Response, p: Principal = viewer) -> dict[str, Any]:
        """The running configuration (without [api]) and its version; ``ETag`` carries the version too."""
        response.headers["ETag"] = f'"{ctx.config_version}"'
        return {"version": ctx.config_version, "runtime_fields": list(configdoc.RUNTIME_FIELDS),
                "config": configdoc.document(gw)}

    @r.put("/api/v1/config", tags=["config"])
    async def write_config(body: ConfigWrite, p: Principal = admin_) -> dict[str, Any]:
        """Replace the configuration document.  ``version`` must be the current one (409 otherwise);
        only runtime fields may differ (others: 422 naming the field)."""
        def write() -> dict[str, Any]:
            if body.version != ctx.config_version:
                raise HTTPException(409, f"config version {body.version} is stale: the current one is "
                                         f"{ctx.config_version} (read it again)")
            changed = configdoc.apply(gw, body.config, reason=f"config write ({p.via} {p.name})")
            return {"changed": changed}

        out = await ctx.act(p, "config.write", "config", {"version": body.version}, write, changes_config=True)
        return {**out, "version": ctx.config_version}

    # --- metrics --------------------------------------------------------------------------------
    @r.get("/metrics", tags=["metrics"], response_class=PlainTextResponse)
    async def metrics(p: Principal = viewer) -> PlainTextResponse:
        """Prometheus text format, ``gateway_*`` names."""
        return PlainTextResponse(ctx.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return r
