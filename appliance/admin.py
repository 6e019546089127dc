"""Runtime administrative states of backends: ready, drain, maint (HAProxy's terms).

* ``ready``: may take new connections and be a failover target.
* ``drain``: keeps the connections it has, takes no new ones and is never a
  failover target.  Draining a service's *active* backend makes another
  ready, not-down backend the active one for new connections; the existing
  connections stay where they are until they end.
* ``maint``: takes no traffic at all.  Its open connections are moved to the
  service's active backend (a failover when it is the active one itself).

Failover targets are chosen by :meth:`appliance.gateway.Gateway._target`,
which already skips backends that are not ``ready``; new connections go to
the service's active backend (``ServiceRuntime.active``).  So the whole
runtime hook is: set ``BackendRuntime.admin_state``, and move the active
backend (and with it the kernel's fail-open NAT) off a backend leaving ready.
"""

from __future__ import annotations

from typing import Any

from checkpoint.ici import TcpState

STATES: tuple[str, ...] = ("ready", "drain", "maint")
_OPEN_EXCLUDED = (TcpState.TIME_WAIT, TcpState.CLOSED)


def open_connections(gw: Any, service: str, backend: str) -> list[int]:
    return [r.id for r in gw.dataplane.table
            if r.service == service and r.backend == backend and r.state not in _OPEN_EXCLUDED]


def impact(gw: Any, backend: str, state: str, service: str | None = None) -> dict[str, Any]:
    """How many connections a change of admin state touches, per service (for confirmations)."""
    per: dict[str, dict[str, Any]] = {}
    for svc in gw.dataplane.services.values():
        if (service is not None and svc.name != service) or backend not in svc.backends:
            continue
        conns = open_connections(gw, svc.name, backend)
        per[svc.name] = {"connections": len(conns), "active": svc.active == backend,
                         "moved": len(conns) if state == "maint" else 0}
    return {"backend": backend, "state": state, "services": per,
            "connections": sum(v["connections"] for v in per.values()),
            "moved": sum(v["moved"] for v in per.values())}


def set_admin_state(gw: Any, backend: str, state: str, service: str | None = None,
                    reason: str = "admin") -> dict[str, Any]:
    """Set ``backend``'s admin state in every service that has it (or in ``service`` only).

    Raises ``NotFound`` for an unknown backend/service, ``Conflict`` when the
    active backend would leave ready with no other backend to take over (the
    change is then not made anywhere)."""
    from .errors import Conflict, NotFound

    if state not in STATES:
        raise ValueError(f"admin_state must be one of {', '.join(STATES)}")
    services = [s for s in gw.dataplane.services.values()
                if (service is None or s.name == service) and backend in s.backends]
    if service is not None and service not in gw.dataplane.services:
        raise NotFound(f"no service named {service!r}")
    if not services:
        raise NotFound(f"no backend named {backend!r}" + (f" in service {service!r}" if service else ""))
    # check every service first: all or nothing
    plans: list[tuple[Any, Any, Any]] = []
    for svc in services:
        b = svc.backends[backend]
        new_active = None
        if state != "ready" and svc.active == backend:
            old_state, b.admin_state = b.admin_state, state
            try:
                new_active = gw._target(svc, None, exclude=backend)
            except Conflict as exc:
                raise Conflict(f"cannot set {backend!r} to {state} in service {svc.name!r}: {exc}") from None
            finally:
                b.admin_state = old_state
        plans.append((svc, b, new_active))
    out: dict[str, Any] = {"backend": backend, "admin_state": state, "services": {}}
    for svc, b, new_active in plans:
        old = b.admin_state
        b.admin_state = state
        entry: dict[str, Any] = {"from": old, "to": state, "moved": [], "staying": []}
        if new_active is not None and state == "maint":
            ev = gw.failover(svc.name, new_active.name, reason=f"{reason}: {backend} to maint")
            entry.update(active=new_active.name, moved=ev["details"].get("moved", []),
                         reset=ev["details"].get("reset", []))
        elif new_active is not None:                      # drain the active backend
            svc.active = new_active.name
            if gw.on_active_change is not None:
                gw.on_active_change()
            entry.update(active=new_active.name, staying=open_connections(gw, svc.name, backend))
        elif state == "maint":                            # not active: move its connections off it
            for cid in open_connections(gw, svc.name, backend):
                try:
                    gw.migrate(cid, svc.active, reason=f"{reason}: {backend} to maint")
                    entry["moved"].append(cid)
                except (Conflict, NotFound) as exc:
                    entry.setdefault("failed", {})[cid] = str(exc)
        else:
            entry["staying"] = open_connections(gw, svc.name, backend)
        gw.events.add("admin", f"{backend} {old} -> {state}", service=svc.name, backend=backend,
                      cause=reason, **{k: v for k, v in entry.items() if k not in ("from", "to")})
        out["services"][svc.name] = entry
    return out
