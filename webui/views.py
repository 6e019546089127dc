"""Read models shared by the API and the panel: the status banner, backends, a connection's derived columns."""

from __future__ import annotations

from typing import Any

from checkpoint.addr import with_port


def node(gw: Any, services: list[dict[str, Any]]) -> dict[str, Any]:
    """This node's role and health for the banner.

    The node is ``active``, or, one of a gateway pair, its role there (standby, taking-over,
    active, fenced: the pair's own banner says more).  Health is
    ``failed`` when a service has no backend up, ``degraded`` when a service's
    active backend is not up or one of its backends is down (no failover left
    for it, or one fewer), else ``ok``."""
    problems = []
    rank = {"ok": 0, "unknown": 1, "degraded": 2, "failed": 3}
    health = "ok"

    def worse(h: str) -> None:
        nonlocal health
        health = h if rank[h] > rank[health] else health

    for s in services:
        active = next((b for b in s["backends"] if b["active"]), None)
        up = [b for b in s["backends"] if b["health"].get("state") == "up"]
        down = [b["name"] for b in s["backends"] if b["health"].get("state") == "down"]
        if not up and not down:
            worse("unknown")
            problems.append(f"{s['name']}: no backend checked yet")
        elif not up:
            worse("failed")
            problems.append(f"{s['name']}: no backend up")
        elif active is None or active["health"].get("state") != "up":
            worse("degraded")
            problems.append(f"{s['name']}: active backend {s['active_backend']} is not up")
        elif down:
            worse("degraded")
            problems.append(f"{s['name']}: {', '.join(down)} down (no spare)" if len(up) == 1
                            else f"{s['name']}: {', '.join(down)} down")
    pair = getattr(gw, "pair", None)
    role = "active" if pair is None else pair.role.role.value
    return {"role": role, "health": health, "problems": problems, "last_failover": last_failover(gw)}


def last_failover(gw: Any) -> dict[str, Any] | None:
    """The most recent failover that moved connections (else the most recent one): when, why,
    and how long until its last connection finished moving (None while some are still moving)."""
    fos = gw.events.list(kind="failover", limit=None)
    if not fos:
        return None
    f = next((e for e in reversed(fos) if e.details.get("moved")), fos[-1])
    pending = set(f.details.get("moved", []))
    end = f.time
    for e in gw.events.list(since_id=f.id, limit=None):
        if e.connection in pending and e.kind in ("migration", "divergence", "reset"):
            pending.discard(e.connection)
            end = max(end, e.time)
    return {"time": f.time, "service": f.service, "from": f.details.get("from"), "to": f.backend,
            "reason": f.reason, "moved": len(f.details.get("moved", [])), "reset": len(f.details.get("reset", [])),
            "pending": len(pending), "duration_ms": None if pending else round((end - f.time) * 1000, 1)}


def pair_lag(lag: dict[str, Any] | None) -> str:
    """The replication lag as the banner shows it (``panel.js`` writes the same)."""
    lag = lag or {}
    b, ms = lag.get("bytes"), lag.get("ms")
    if b is None and ms is None:
        return "not measured"
    return f"{'–' if b is None else b} B, {'–' if ms is None else ms} ms"


def backends(services: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per service backend, HAProxy style; bytes are cumulative (every connection the
    backend ever carried, as HAProxy's bytes in/out), connections the open and tracked ones."""
    rows = []
    for s in services:
        for b in s["backends"]:
            h = b["health"]
            rows.append({
                "service": s["name"], "name": b["name"], "address": " ".join(with_port(b[k], b["port"]) for k in ("address", "address6") if b.get(k)),
                "active": b["active"], "admin_state": b["admin_state"], "state": h.get("state", "unknown"),
                "last_result": h.get("last_result"), "last_detail": h.get("last_detail"),
                "last_check": h.get("last_check"), "latency_ms": _ms(h.get("last_latency")),
                "checks": h.get("checks", 0), "failures": h.get("failures", 0),
                "transitions": h.get("transitions", 0), "downtime": round(h.get("downtime_total") or 0.0, 3),
                "since": h.get("last_change"), "connections": b["connections"], "tracked": b.get("tracked", 0),
                "bytes_from_client": b.get("bytes_from_client", 0), "bytes_from_server": b.get("bytes_from_server", 0),
            })
    return rows


def _ms(v: Any) -> float | None:
    return None if v is None else round(float(v) * 1000, 2)


def decorate(c: dict[str, Any]) -> dict[str, Any]:
    """Add the panel's derived columns to a connection document (in place)."""
    c.setdefault("commit_lag", None)
    c.setdefault("checkpoint_age", c.get("idle_seconds"))
    return c
