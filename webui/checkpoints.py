"""The REST API of the checkpoint store and of portable checkpoints.

* ``GET /api/v1/store`` — mode, group-commit statistics, held ACKs;
* ``GET /api/v1/store/commits`` — the commit log: when each connection's
  commit point moved (what the client may have been acknowledged, when);
* ``GET /api/v1/connections/{id}/checkpoint`` — the connection's ICI, client
  log and digest as a signed, versioned JSON document (operator: it carries
  the client's bytes);
* ``POST /api/v1/checkpoints`` — take over a connection from such a document
  (verified, sanity-checked, refused with the field named).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request

from webui.auth import Principal

from .context import Context

MAX_DOCUMENT = 512 << 20


def build(ctx: Context) -> APIRouter:
    gw = ctx.gw
    sec = ctx.security
    viewer = Depends(sec.require("viewer"))
    operator = Depends(sec.require("operator"))
    r = APIRouter(tags=["checkpoints"])

    @r.get("/api/v1/store", summary="The checkpoint store: mode, group commits, held ACKs")
    async def store(p: Principal = viewer) -> dict[str, Any]:
        return gw.store_status()

    @r.get("/api/v1/store/commits", summary="When each connection's commit point moved")
    async def commits(p: Principal = viewer, connection: int | None = Query(None, ge=0, le=2**63 - 1),
                since: float = Query(0.0, ge=0, le=1e12)) -> list[dict[str, Any]]:
        return gw.store_commits(connection, since)

    @r.get("/api/v1/connections/{cid}/checkpoint", summary="The connection's signed, portable checkpoint")
    async def export(cid: int, request: Request, p: Principal = operator) -> dict[str, Any]:
        return await ctx.act(p, "checkpoint.export", f"connection/{cid}", {}, lambda: gw.export_checkpoint(cid))

    @r.post("/api/v1/checkpoints", status_code=201, summary="Take over a connection from a signed checkpoint")
    async def import_(request: Request, p: Principal = operator) -> dict[str, Any]:
        body = await request.body()
        if len(body) > MAX_DOCUMENT:
            raise HTTPException(413, f"a checkpoint document is at most {MAX_DOCUMENT} bytes")
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise HTTPException(422, [{"loc": ["body"], "field": "document", "msg": f"not JSON: {exc}",
                                       "type": "value_error"}]) from None
        return await ctx.act(p, "checkpoint.import", "checkpoints", {"bytes": len(body)}, lambda: _import(doc))

    def _import(doc: Any) -> dict[str, Any]:
        from checkpoint.document import CheckpointError

        try:
            return gw.import_checkpoint(doc)
        except CheckpointError as exc:
            raise HTTPException(422, [{"loc": ["body", *exc.field.split(".")], "field": exc.field,
                                       "msg": exc.message, "type": "checkpoint"}]) from None

    return r
