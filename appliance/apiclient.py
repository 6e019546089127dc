"""A small client of the gateway's REST API, for the CLI and the benchmarks."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any, NoReturn


def die(msg: str, code: int = 2) -> NoReturn:
    print(f"appliance: {msg}", file=sys.stderr)
    raise SystemExit(code)



def api_call(method: str, path: str, api: str, token: str, body: object = None) -> Any:
    """The decoded JSON answer (its shape is the endpoint's: Any to the caller)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(api.rstrip("/") + path, data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        try:
            detail = json.loads(detail).get("detail", detail)
        except (ValueError, AttributeError):
            pass
        die(f"{method} {path}: HTTP {exc.code}: {detail}")
    except OSError as exc:
        die(f"cannot reach the API at {api}: {exc}")


def api_get(path: str, api: str, token: str) -> Any:
    return api_call("GET", path, api, token)
