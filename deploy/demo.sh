#!/usr/bin/env bash
# The main job: set up everything, build the lab, run a download through the
# gateway and leave the web panel up at http://127.0.0.1:8080.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/deploy/bootstrap.sh"
exec "$here/.venv/bin/appliance" lab demo "$@"
