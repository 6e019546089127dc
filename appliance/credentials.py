"""Credentials in the configuration: roles, panel users and API tokens of ``[api]``.

The configuration side of authentication (parsed and checked here, errors naming the field);
the web layer (:mod:`webui.auth`) checks passwords and tokens against them at run time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

ROLES: tuple[str, ...] = ("viewer", "operator", "admin")


def role_at_least(role: str, needed: str) -> bool:
    return ROLES.index(role) >= ROLES.index(needed)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class UserConfig:
    name: str
    role: str
    password_hash: str


@dataclass(frozen=True, slots=True)
class TokenConfig:
    name: str
    role: str
    sha256: str


# --- configuration --------------------------------------------------------------

def _err(field_: str, message: str) -> Exception:
    return ConfigError(field_, message)


def _entry_str(d: dict[str, Any], key: str, where: str) -> str:
    v = d.get(key)
    if not isinstance(v, str) or not v:
        raise _err(f"{where}.{key}", f"must be a non-empty string, got {v!r}")
    return v


def _entry_name_role(d: Any, where: str, allowed: set[str]) -> tuple[dict[str, Any], str, str]:
    if not isinstance(d, dict):
        raise _err(where, f"must be a table, got {type(d).__name__}")
    for key in d:
        if key not in allowed:
            raise _err(f"{where}.{key}", f"unknown setting (allowed: {', '.join(sorted(allowed))})")
    name = _entry_str(d, "name", where)
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise _err(f"{where}.name", f"{name!r}: use letters, digits, '-', '_' and '.' only")
    role = _entry_str(d, "role", where)
    if role not in ROLES:
        raise _err(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
    return d, name, role


def parse_users(raw: Any, where: str = "api.user") -> tuple[UserConfig, ...]:
    if not isinstance(raw, list):
        raise _err(where, "must be a list of tables ([[api.user]])")
    out: list[UserConfig] = []
    for i, d in enumerate(raw):
        w = f"{where}[{i}]"
        d, name, role = _entry_name_role(d, w, {"name", "role", "password_hash"})
        ph = _entry_str(d, "password_hash", w)
        parts = ph.split("$")
        if len(parts) != 6 or parts[0] != "scrypt" or not all(x.isdigit() for x in parts[1:4]):
            raise _err(f"{w}.password_hash", "must be scrypt$N$r$p$salt$hash (make one with appliance-hash-password)")
        if any(u.name == name for u in out):
            raise _err(f"{w}.name", f"duplicate user {name!r}")
        out.append(UserConfig(name, role, ph))
    return tuple(out)


def parse_tokens(raw: Any, where: str = "api.tokens") -> tuple[TokenConfig, ...]:
    if not isinstance(raw, list):
        raise _err(where, "must be a list of tables ([[api.tokens]])")
    out: list[TokenConfig] = []
    for i, d in enumerate(raw):
        w = f"{where}[{i}]"
        d, name, role = _entry_name_role(d, w, {"name", "role", "sha256", "token"})
        if ("sha256" in d) == ("token" in d):
            raise _err(f"{w}.sha256", "give exactly one of sha256 or token")
        if "token" in d:
            tok = _entry_str(d, "token", w)
            if len(tok) < 16:
                raise _err(f"{w}.token", "must be at least 16 characters")
            digest = token_digest(tok)
        else:
            digest = _entry_str(d, "sha256", w).lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise _err(f"{w}.sha256", "must be 64 hex digits")
        if any(t.name == name for t in out):
            raise _err(f"{w}.name", f"duplicate token name {name!r}")
        out.append(TokenConfig(name, role, digest))
    return tuple(out)
