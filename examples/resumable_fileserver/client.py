#!/usr/bin/env python3
"""Download a file from the resumable file server and print its sha256.

Theory of operation
-------------------
An ordinary TCP client: it knows nothing of moves.  It sends ``GET
<name>\\n``, reads ``OK <size>\\n`` and then exactly ``size`` bytes (at
most ``--rate`` bytes per second, so a demo or a test has time to move the
server mid-transfer), and prints ``<sha256>  <bytes>``.  Exit status 0 only
when all ``size`` bytes arrived and the server then closed cleanly.
"""

from __future__ import annotations

import argparse
import hashlib
import socket
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("server", help="HOST:PORT ([IPV6]:PORT for an IPv6 address)")
    p.add_argument("file")
    p.add_argument("--rate", type=float, default=0, help="bytes per second (0: as fast as possible)")
    p.add_argument("--timeout", type=float, default=30)
    args = p.parse_args()
    host, _, port = args.server.rpartition(":")
    s = socket.create_connection((host.strip("[]"), int(port)), timeout=args.timeout)
    s.sendall(f"GET {args.file}\n".encode())
    f = s.makefile("rb")
    head = f.readline().decode(errors="replace").split()
    if len(head) != 2 or head[0] != "OK":
        print(f"client: server said {' '.join(head)!r}", file=sys.stderr)
        return 1
    size = int(head[1])
    h = hashlib.sha256()
    got = 0
    t0 = time.monotonic()
    while got < size:
        data = f.read1(min(65536, size - got))
        if not data:
            break
        h.update(data)
        got += len(data)
        if args.rate:
            ahead = got / args.rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
    rest = f.read1(1) if got == size else b""
    print(f"{h.hexdigest()}  {got}", flush=True)
    if got != size:
        print(f"client: short download: {got} of {size} bytes", file=sys.stderr)
        return 1
    if rest:
        print("client: bytes after the end of the file", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
