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
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from . import api, panel
from .context import Context

HERE = Path(__file__).parent


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

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 naming each bad field; the rejected input is not echoed (it may not even be JSON: NaN)."""
        detail = [{"loc": list(e.get("loc", ())), "field": ".".join(str(x) for x in e.get("loc", ())[1:]) or None,
                   "msg": e.get("msg", "invalid"), "type": e.get("type", "value_error")} for e in exc.errors()]
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
