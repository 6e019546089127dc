"""The errors the control plane raises to its callers (API, CLI, panel)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem; ``field`` is the dotted path of the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class NotFound(LookupError):
    """No such service, connection or backend."""


class Conflict(RuntimeError):
    """The request cannot be carried out in the current state."""
