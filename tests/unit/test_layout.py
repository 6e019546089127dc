"""The house's layout holds: the agent runs on a backend host without the gateway's
dependencies, and the pure model imports nothing of the appliance."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BLOCK = r"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ImportError(f'{name} is not installed on this host')
        return None
sys.meta_path.insert(0, Block())
"""


def _run(blocked: set[str], code: str) -> subprocess.CompletedProcess[str]:
    prog = f"BLOCKED = {sorted(blocked)!r}\n" + BLOCK + code
    return subprocess.run([sys.executable, "-c", prog], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_agent_needs_only_the_standard_library() -> None:
    gateway_deps = {"netfilterqueue", "iptc", "fastapi", "uvicorn", "jinja2", "starlette", "pydantic",
                    "nfq", "webui"}
    res = _run(gateway_deps, "import appliance.agent.server, appliance.agent.sdk, appliance.agent.cli\n"
                             "appliance.agent.cli.main(['--help'])\n")
    assert res.returncode == 0, res.stderr
    assert "run" in res.stdout and "export" in res.stdout


def test_checkpoint_model_does_not_import_the_appliance() -> None:
    mods = ["checkpoint." + p.stem for p in (ROOT / "checkpoint").glob("*.py") if p.stem != "__init__"]
    res = _run({"appliance", "webui", "nfq", "sqlite3"}, "".join(f"import {m}\n" for m in mods))
    assert res.returncode == 0, res.stderr
