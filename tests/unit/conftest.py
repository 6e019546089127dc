"""Shared setup for the unit tests.

The helpers themselves live in ``_helpers.py`` (a plain module, importable
with ``from ._helpers import ...``); this file only makes the repository root
importable and exposes a few of them as fixtures.
"""

from __future__ import annotations

import os
import sys

try:  # the repo root must be importable (checkpoint, nfq)
    import checkpoint  # noqa: F401
except ImportError:  # pragma: no cover - depends on how pytest was started
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import pytest

from ._helpers import handshake, make_record


@pytest.fixture
def rec():
    """A fresh record for CLIENT -> VIP."""
    return make_record()


@pytest.fixture
def established():
    """A record that has seen a full handshake (client ISN 1000, server ISN 5000)."""
    r = make_record()
    handshake(r, 1000, 5000)
    return r
