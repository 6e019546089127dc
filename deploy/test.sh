#!/usr/bin/env bash
# Set up everything, type-check, then run the whole test suite (unit, property, lab).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/deploy/bootstrap.sh"
cd "$here"
# types first: the configuration is pyproject.toml's [tool.mypy] (set -e stops on errors)
.venv/bin/python -m mypy
# a lab left over from a crashed run would break the lab tests
.venv/bin/appliance lab down >/dev/null 2>&1 || true
exec .venv/bin/python -m pytest tests "$@"
