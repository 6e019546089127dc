"""Shared pytest set-up: the repository root on sys.path, and the ``root`` and
``lab`` markers (pyproject.toml) enforced: a test that needs root and runs
without it FAILS with a message saying so; it is never skipped (a skipped
test would look like a pass in a hurried read of the summary)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LAB = ROOT / "tests" / "lab"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test under tests/lab builds or uses the lab: marked ``lab`` by
    directory, so a new module there cannot forget it (tests/repair marks its
    own, by fixture: see its conftest).  ``-m 'not root and not lab'`` then
    selects exactly what runs unprivileged."""
    for item in items:
        if Path(str(item.path)).is_relative_to(LAB) and item.get_closest_marker("lab") is None:
            item.add_marker("lab")


@pytest.fixture(autouse=True)
def _root_required(request: pytest.FixtureRequest) -> None:
    needs = [m for m in ("root", "lab") if request.node.get_closest_marker(m)]
    if needs and os.geteuid() != 0:
        pytest.fail(f"this test is marked {needs[0]!r} and needs root (network namespaces, iptables, "
                    f"TCP_REPAIR): run it as root, or deselect it with -m 'not root and not lab'",
                    pytrace=False)


CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Debian's Chromium, headless, driven by Playwright (the panel's browser tests)."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: deploy/bootstrap.sh installs it")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()
