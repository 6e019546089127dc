"""Read models shared by the API and the panel: the status banner, backends, filtered connections."""

from __future__ import annotations

from typing import Any

CLOSED_STATES = ("TIME_WAIT", "CLOSED")


def node(gw: Any, services: list[dict[str, Any]]) -> dict[str, Any]:
    """This node's role and health for the banner.

    One gateway per service address for now: the node is ``active``.  Health is
    ``ok`` when every service's active backend is up, ``degraded`` when one is
    not up (down, or never probed), ``failed`` when a service has no backend up."""
    problems = []
    health = "ok"
    for s in services:
        active = next((b for b in s["backends"] if b["active"]), None)
        up = [b for b in s["backends"] if b["health"].get("state") == "up"]
        if not up:
            health = "failed"
            problems.append(f"{s['name']}: no backend up")
        elif active is None or active["health"].get("state") != "up":
            health = "degraded" if health == "ok" else health
            problems.append(f"{s['name']}: active backend {s['active_backend']} is not up")
    return {"role": "active", "health": health, "problems": problems}


def backends(services: list[dict[str, Any]], conns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per service backend, HAProxy style, with bytes summed over its connections."""
    bytes_in: dict[tuple[str, str], int] = {}
    bytes_out: dict[tuple[str, str], int] = {}
    total: dict[tuple[str, str], int] = {}
    for c in conns:
        k = (c.get("service_name") or "", c.get("backend") or "")
        bytes_in[k] = bytes_in.get(k, 0) + (c.get("bytes_from_client") or 0)
        bytes_out[k] = bytes_out.get(k, 0) + (c.get("bytes_from_server") or 0)
        total[k] = total.get(k, 0) + 1
    rows = []
    for s in services:
        for b in s["backends"]:
            h = b["health"]
            k = (s["name"], b["name"])
            rows.append({
                "service": s["name"], "name": b["name"], "address": f"{b['address']}:{b['port']}",
                "active": b["active"], "admin_state": b["admin_state"], "state": h.get("state", "unknown"),
                "last_result": h.get("last_result"), "last_detail": h.get("last_detail"),
                "last_check": h.get("last_check"), "latency_ms": _ms(h.get("last_latency")),
                "checks": h.get("checks", 0), "failures": h.get("failures", 0),
                "transitions": h.get("transitions", 0), "downtime": round(h.get("downtime_total") or 0.0, 3),
                "since": h.get("last_change"), "connections": b["connections"], "tracked": total.get(k, 0),
                "bytes_from_client": bytes_in.get(k, 0), "bytes_from_server": bytes_out.get(k, 0),
            })
    return rows


def _ms(v: Any) -> float | None:
    return None if v is None else round(float(v) * 1000, 2)


def decorate(c: dict[str, Any]) -> dict[str, Any]:
    """Add the panel's derived columns to a connection document (in place)."""
    c.setdefault("commit_lag", None)
    c.setdefault("checkpoint_age", c.get("idle_seconds"))
    return c


def filter_connections(conns: list[dict[str, Any]], q: str | None = None, state: str | None = None,
                       service: str | None = None, backend: str | None = None,
                       protected: bool | None = None, open_only: bool = False) -> list[dict[str, Any]]:
    out = []
    ql = q.lower() if q else None
    st = state.upper() if state else None
    for c in conns:
        if st and c["state"] != st:
            continue
        if open_only and c["state"] in CLOSED_STATES:
            continue
        if service and service not in (c.get("service_name"), c.get("service")):
            continue
        if backend and c.get("backend") != backend:
            continue
        if protected is not None and bool(c.get("protected")) != protected:
            continue
        if ql and not any(ql in str(c.get(k, "")).lower() for k in ("id", "client", "service", "service_name",
                                                                     "backend", "backend_address", "state")):
            continue
        out.append(decorate(c))
    return out
