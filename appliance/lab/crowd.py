"""Many concurrent connections held open through the gateway: the lab's scale probe.

``start_crowd(n, path)`` runs a client in ``lab-client`` that opens ``n`` keep-alive HTTP
connections to a service (in waves, so the server's listen queue never overflows), fetches
``path`` once on each, checks each body's length, and then keeps every connection open, idle,
until told to close (:meth:`Crowd.close`).  It says when all are done (:meth:`Crowd.ready`),
with how many bytes and how long it took, so a test can look at the gateway while ``n``
tracked connections, each having carried the object, are open at once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

CLIENT = textwrap.dedent("""
    import asyncio, json, resource, sys, time
    host, port, path, n, wave = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    resource.setrlimit(resource.RLIMIT_NOFILE, (n + 1024, n + 1024))

    async def one(i, conns, errors):
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
            w.write(f"GET {path} HTTP/1.1\\r\\nHost: {host}\\r\\n\\r\\n".encode())
            head = await asyncio.wait_for(r.readuntil(b"\\r\\n\\r\\n"), 60)
            length = int(next(l.split(b":")[1] for l in head.split(b"\\r\\n") if l.lower().startswith(b"content-length")))
            got = 0
            while got < length:
                chunk = await asyncio.wait_for(r.read(min(1 << 20, length - got)), 60)
                if not chunk:
                    raise ConnectionError("closed early")
                got += len(chunk)
            conns.append((r, w, got))
        except Exception as exc:
            errors.append(f"{i}: {type(exc).__name__}: {exc}")

    async def main():
        conns, errors = [], []
        t0 = time.monotonic()
        for start in range(0, n, wave):
            await asyncio.gather(*(one(i, conns, errors) for i in range(start, min(n, start + wave))))
        print(json.dumps({"open": len(conns), "bytes": sum(g for _, _, g in conns), "errors": errors[:10],
                          "failed": len(errors), "seconds": round(time.monotonic() - t0, 2)}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # until told to close
        for _, w, _ in conns:
            w.close()
        print(json.dumps({"closed": len(conns)}), flush=True)

    asyncio.run(main())
""")


@dataclass
class Crowd:
    proc: subprocess.Popen

    def ready(self, timeout: float) -> dict:
        """Wait until every connection has its body (or failed): the client's report."""
        assert self.proc.stdout is not None
        import select

        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            raise TimeoutError(f"the crowd did not finish within {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the crowd's client died: {self.proc.stderr.read() if self.proc.stderr else ''}")
        out: dict = json.loads(line)
        return out

    def close(self) -> None:
        """Close every connection, and the client."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("close\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def start_crowd(host: str, port: int, path: str, n: int, wave: int = 500, ns: str = "lab-client") -> Crowd:
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, host, str(port), path, str(n),
                             str(wave)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    return Crowd(proc)


def vm_rss(pid: int) -> int:
    """Resident memory of ``pid`` in bytes (from /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise RuntimeError(f"no VmRSS for pid {pid}")


def appliance_rss_mb() -> float:
    """The resident memory of every appliance process together (the daemon and any child)."""
    from . import topology as lab

    pid = lab.pid_alive(lab.run_dir() / "appliance.pid")
    if not pid:
        raise RuntimeError("no appliance is running in the lab")
    pids, todo = set(), [pid]
    while todo:
        p = todo.pop()
        pids.add(p)
        todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
    return sum(vm_rss(p) for p in pids) / (1 << 20)


def measure(n: int, path: str, timeout: float) -> dict:
    """In a running lab: ``n`` connections through the ``web`` service, each fetching ``path``;
    the time, the table and the appliance's memory while all are open."""
    from ..apiclient import api_get
    from . import topology as lab

    token = (lab.run_dir() / "token").read_text().strip()
    api = f"http://{lab.API_HOST}:{lab.API_PORT}"
    before = appliance_rss_mb()
    c = start_crowd(lab.VIP, lab.SERVICE_PORT, path, n)
    try:
        report = c.ready(timeout=timeout)
        st = api_get("/api/v1/status", api, token)
        rss = appliance_rss_mb()
    finally:
        c.close()
    return {"connections": n, "path": path, "opened": report["open"], "failed": report["failed"],
            "errors": report["errors"], "bytes": report["bytes"], "seconds": report["seconds"],
            "established": st["connections_by_state"].get("ESTABLISHED", 0), "table": st["table"],
            "rss_mb": round(rss, 1), "rss_before_mb": round(before, 1),
            "kib_per_connection": round((rss - before) * 1024 / n, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m appliance.lab.crowd",
                                 description="N connections held open through the lab's gateway: time, table, memory")
    ap.add_argument("--connections", type=int, default=10_000)
    ap.add_argument("--path", default="/1M.bin")
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args(argv)
    from . import topology as lab

    lab.up()
    print(json.dumps(measure(args.connections, args.path, args.timeout), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
