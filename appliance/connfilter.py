"""The connection filters of the API and the panel, applied to records before any document is
built (a document costs microseconds; the table may hold tens of thousands)."""

from __future__ import annotations

from typing import Any

from checkpoint.addr import family, with_port

FINISHED_STATES = ("TIME_WAIT", "CLOSED")


def record_matches(rec: Any, q: str | None = None, state: str | None = None, service: str | None = None,
                   backend: str | None = None, protected: bool | None = None, open_only: bool = False) -> bool:
    """Whether a connection record passes the filters: ``q`` a case-insensitive substring of its
    id, client, service, backend, state or family (``q=ipv6`` keeps the IPv6 ones); ``service`` its
    name or VIP:port (``[VIP6]:port``)."""
    rs = rec.state.value
    if state and rs != state.upper():
        return False
    if open_only and rs in FINISHED_STATES:
        return False
    if service and service != rec.service and service != with_port(rec.vip, rec.vport):
        return False
    if backend and rec.backend != backend:
        return False
    if protected is not None and bool(rec.protected) != protected:
        return False
    if q:
        ql = q.lower()
        return any(ql in v.lower() for v in (
            str(rec.id), with_port(rec.client_ip, rec.client_port), with_port(rec.vip, rec.vport), rec.service,
            rec.backend, with_port(rec.backend_ip, rec.backend_port), rs, family(rec.client_ip)))
    return True
