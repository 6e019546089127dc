"""The gateway's data plane: the per-packet engine, its connection modes, the delayed-ACK gate,
and the typed events it hands its owner (see :mod:`.engine` for the theory of operation)."""

from .engine import FENCE_RST_INTERVAL, NO_BACKEND, Dataplane, apply_rewrite
from .events import (CloseSuspected, ConnectionClosed, EngineEvent, HalfOpenEvicted, HttpFallback, MoveEnded, MoveStarted, MoveVerified,
                     ResumeRefused, Suspect)
from .modes import MAX_HELD_SEGMENTS, Held, ResumedFlow, Spliced
from .runtime import BackendRuntime, DataplaneCounters, ServiceRuntime

ResumeHold = Held  # the name the resume controller's callers knew

__all__ = ["Dataplane", "apply_rewrite", "NO_BACKEND", "FENCE_RST_INTERVAL", "BackendRuntime", "ServiceRuntime",
           "DataplaneCounters", "Suspect", "ConnectionClosed", "EngineEvent", "MoveStarted", "MoveVerified", "MoveEnded",
           "CloseSuspected", "ResumeRefused", "HalfOpenEvicted", "HttpFallback", "Held", "ResumeHold", "ResumedFlow",
           "MAX_HELD_SEGMENTS", "Spliced"]
