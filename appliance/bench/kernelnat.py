"""Benchmark: kernel NAT ``moved`` set updates, one ``nft`` process per flow vs
one in-process libnftables transaction.

Theory of operation
-------------------
Makes a network namespace of its own (``kn-<pid>-bench``), re-runs itself in
it (``ip netns exec``), and there installs the appliance's NAT table for two
services (:func:`nfq.kernelnat.install`).  Each round fills the ``moved`` set
with ``--flows`` flows in one transaction, then empties it one of two ways:

* **old**: what ``kernelnat.del_moved`` did before it went in process, one
  ``nft delete element`` process per flow (kept here, only here, as
  :func:`old_del_moved`);
* **new**: ``kernelnat.del_moved``, one libnftables transaction for all of
  them, naming only the present elements.

Both are timed with the wall clock the event loop would lose, and each
round checks the set is empty afterwards.  Also reported: ``add_moved`` of
the same flows (one transaction) and the old way of adding (one ``nft -f``
process).  Medians of ``--rounds``; the namespace is deleted at the end,
also on failure.

    sudo .venv/bin/python -m appliance.bench.kernelnat [--flows 500] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from nfq import kernelnat
from nfq.kernelnat import Flow, ServiceNat

SERVICES = [
    ServiceNat("192.0.2.10", 80, ("198.51.100.10", 80), (("198.51.100.10", 80), ("198.51.100.11", 8080))),
    ServiceNat("192.0.2.11", 443, ("198.51.100.20", 443), (("198.51.100.20", 443), ("198.51.100.21", 443))),
]


def flows(n: int) -> list[Flow]:
    return [("198.51.100.10" if i % 2 else "198.51.100.20", 80 if i % 2 else 443,
             f"203.0.113.{1 + i % 250}", 10000 + i) for i in range(n)]


def _elements(fs: list[Flow]) -> str:
    return ", ".join(f"{b} . {bp} . {c} . {cp}" for b, bp, c, cp in fs)


def old_del_moved(fs: list[Flow]) -> None:
    """The former ``kernelnat.del_moved``: one ``nft`` process per flow."""
    for f in fs:  # one at a time: deleting an absent element fails the whole batch
        subprocess.run(["nft", "delete", "element", kernelnat.FAMILY, kernelnat.TABLE, "moved", f"{{ {_elements([f])} }}"],
                       check=False, capture_output=True, text=True)


def old_add_moved(fs: list[Flow]) -> None:
    """The former ``kernelnat.add_moved``: one ``nft -f`` process."""
    res = subprocess.run(["nft", "-f", "-"], input=f"add element {kernelnat.FAMILY} {kernelnat.TABLE} moved {{ {_elements(fs)} }}\n",
                         check=False, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr)


def _in_set() -> int:
    out = subprocess.run(["nft", "list", "set", kernelnat.FAMILY, kernelnat.TABLE, "moved"],
                         check=True, capture_output=True, text=True).stdout
    return len(kernelnat.parse_elements(out))


def _timed(fn: object, arg: list[Flow]) -> float:
    assert callable(fn)
    t0 = time.perf_counter()
    fn(arg)
    return (time.perf_counter() - t0) * 1000


def measure(n: int, rounds: int) -> dict[str, object]:
    """In the namespace: medians (ms) of each way, over ``rounds``."""
    fs = flows(n)
    ms: dict[str, list[float]] = {"old_del": [], "new_del": [], "old_add": [], "new_add": []}
    for _ in range(rounds):
        kernelnat.install(SERVICES)
        ms["old_add"].append(_timed(old_add_moved, fs))
        assert _in_set() == n
        ms["old_del"].append(_timed(old_del_moved, fs))
        assert _in_set() == 0
        kernelnat.install(SERVICES)  # fresh set, bookkeeping reset
        ms["new_add"].append(_timed(kernelnat.add_moved, fs))
        assert _in_set() == n
        ms["new_del"].append(_timed(kernelnat.del_moved, fs))
        assert _in_set() == 0
    assert kernelnat.remove()
    med = {k: round(statistics.median(v), 2) for k, v in ms.items()}
    return {"flows": n, "rounds": rounds, "median_ms": med,
            "del_speedup": round(med["old_del"] / med["new_del"], 1) if med["new_del"] else None,
            "all_ms": {k: [round(x, 2) for x in v] for k, v in ms.items()}}


def report(r: dict[str, object]) -> str:
    med = r["median_ms"]
    assert isinstance(med, dict)
    n = r["flows"]
    return "\n".join([
        f"kernel NAT moved set, {n} flows, median of {r['rounds']} (ms):",
        f"  del_moved  old (one nft process per flow): {med['old_del']:9.2f}",
        f"  del_moved  new (one libnftables transaction): {med['new_del']:7.2f}   x{r['del_speedup']}",
        f"  add_moved  old (one nft -f process):       {med['old_add']:9.2f}",
        f"  add_moved  new (one libnftables transaction): {med['new_add']:7.2f}",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m appliance.bench.kernelnat", description=__doc__.split("\n")[0])
    ap.add_argument("--flows", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)  # the re-run inside the namespace
    a = ap.parse_args(argv)
    if a.in_netns:
        r = measure(a.flows, a.rounds)
        print(json.dumps(r) if a.json else report(r))
        return 0
    if os.geteuid() != 0:
        print("needs root (network namespace, nftables)", file=sys.stderr)
        return 2
    ns = f"kn-{os.getpid()}-bench"
    root = Path(__file__).resolve().parents[2]
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "appliance.bench.kernelnat", "--in-netns",
               "--flows", str(a.flows), "--rounds", str(a.rounds)] + (["--json"] if a.json else [])
        return subprocess.run(cmd, check=False, cwd=root).returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    sys.exit(main())
