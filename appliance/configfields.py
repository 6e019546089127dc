"""The primitives of the configuration parser: typed fields read from a TOML table, each error
naming the dotted field (``service[0].health.interval: must be a number``).  Shared by
:mod:`appliance.config` and the sections parsed in their own modules (:mod:`appliance.notify`)."""

from __future__ import annotations

from typing import Any

from .errors import ConfigError


def _table(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(where, f"must be a table, got {type(data).__name__}")
    return data


def _no_unknown(data: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            path = f"{where}.{key}" if where else key
            raise ConfigError(path, f"unknown setting (allowed: {', '.join(sorted(allowed))})")


def _int(data: dict[str, Any], key: str, where: str, default: int, lo: int, hi: int) -> int:
    v = data.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{where}.{key}", f"must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise ConfigError(f"{where}.{key}", f"must be between {lo} and {hi}, got {v}")
    return v


def _float(data: dict[str, Any], key: str, where: str, default: float, lo: float) -> float:
    v = data.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{where}.{key}", f"must be a number, got {v!r}")
    if v < lo:
        raise ConfigError(f"{where}.{key}", f"must be at least {lo}, got {v}")
    return float(v)


def _bool(data: dict[str, Any], key: str, where: str, default: bool) -> bool:
    v = data.get(key, default)
    if not isinstance(v, bool):
        raise ConfigError(f"{where}.{key}", f"must be true or false, got {v!r}")
    return v


def _str(data: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    if key not in data:
        if default is None:
            raise ConfigError(f"{where}.{key}", "is required")
        return default
    v = data[key]
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{where}.{key}", f"must be a non-empty string, got {v!r}")
    return v
