"""The configuration as a versioned document, read and written through the API.

``document(gw)`` is the running configuration in the TOML file's shape (as
JSON), with the backends' *runtime* admin state, and without the ``[api]``
section (it holds credentials: it is changed in the file only).

``apply(gw, doc)`` validates a whole new document with the same parser as the
file (so an error names the dotted field, ``service[0].backend[1].address``)
and applies what can change while connections run: backends' admin states
and ``failover.auto``.  A change to anything else is refused with the field
named: it needs the file and a restart.  The caller checks the version.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import Config, ConfigError, parse

RUNTIME_FIELDS = ("service[].backend[].admin_state", "service[].failover.auto")


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v


def document(gw: Any) -> dict[str, Any]:
    cfg: Config = gw.config
    g = cfg.gateway
    gateway = {k: _plain(getattr(g, k)) for k in ("queue_num", "on_malformed", "max_connections", "fail_open",
                                                   "queue_full", "engine")}
    gateway["timeouts"] = dataclasses.asdict(g.timeouts)
    services = []
    for s in cfg.services:
        rt = gw.dataplane.services.get(s.name)
        h = s.health
        health = {"check": h.check, "interval": h.interval, "rise": h.rise, "fall": h.fall, "path": h.path,
                  "expect": list(h.expect)}
        if h.timeout is not None:
            health["timeout"] = h.timeout
        fo = rt.failover if rt is not None else s.failover
        failover = {k: _plain(getattr(fo, k)) for k in ("auto", "mode", "max_log_bytes", "verify", "syn_retries",
                                                         "move_timeout", "volatile")}
        backends = []
        for b in s.backends:
            state = rt.backends[b.name].admin_state if rt is not None else b.admin_state
            bd = {"name": b.name, "port": b.port, "admin_state": state}
            for k in ("address", "address6"):
                if getattr(b, k, None) is not None:
                    bd[k] = getattr(b, k)
            if getattr(b, "agent", None) is not None:
                bd["agent"] = b.agent
            backends.append(bd)
        sd: dict[str, Any] = {"name": s.name}
        for k in ("vip", "vip6"):
            if getattr(s, k, None) is not None:
                sd[k] = getattr(s, k)
        sd.update({"port": s.port, "health": health, "failover": failover, "backend": backends})
        services.append(sd)
    return {"gateway": gateway, "service": services}


def _diff(old: Any, new: Any, path: str, out: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            _diff(old.get(k), new.get(k), f"{path}.{k}" if path else k, out)
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new) and all(
            isinstance(x, dict) for x in old + new):
        for i, (a, b) in enumerate(zip(old, new)):
            _diff(a, b, f"{path}[{i}]", out)
    elif old != new:
        out.append(path)


def _runtime(path: str) -> bool:
    import re

    generic = re.sub(r"\[\d+\]", "[]", path)
    return generic in RUNTIME_FIELDS


def plan(gw: Any, doc: Any) -> tuple[Config, list[str]]:
    """Validate ``doc``; the fields it changes.  Raises ConfigError naming the field."""
    if not isinstance(doc, dict):
        raise ConfigError("config", "must be an object")
    if "api" in doc:
        raise ConfigError("config.api", "the [api] section holds credentials: change it in the file")
    if "agent" in doc:
        raise ConfigError("config.agent", "the [agent] section holds the agents' key: change it in the file")
    # the same parser as the file; the api and agent sections are the running ones (not part of the document)
    new = parse({**doc, "api": {"token": "x" * 8}, "agent": {"key": "x" * 16}})
    new_doc = document(_Shadow(new))
    changed: list[str] = []
    _diff(document(gw), new_doc, "", changed)
    for path in changed:
        if not _runtime(path):
            raise ConfigError(path, "cannot change while the appliance runs (edit the file and restart)")
    return new, changed


def apply(gw: Any, doc: Any, reason: str = "config write") -> list[str]:
    """Apply a validated document's runtime changes; the dotted fields changed."""
    from .admin import set_admin_state

    new, changed = plan(gw, doc)
    for s in new.services:
        rt = gw.dataplane.services[s.name]
        if rt.failover.auto != s.failover.auto:
            rt.failover = dataclasses.replace(rt.failover, auto=s.failover.auto)
        for b in s.backends:
            if rt.backends[b.name].admin_state != b.admin_state:
                set_admin_state(gw, b.name, b.admin_state, service=s.name, reason=reason)
    return changed


class _Shadow:
    """A parsed Config dressed as a gateway for :func:`document` (no runtime state)."""

    def __init__(self, config: Config) -> None:
        self.config = config

        class _DP:
            services: dict[str, Any] = {}

        self.dataplane = _DP()
