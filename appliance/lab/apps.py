"""Small servers the lab runs next to nginx on primary and backups.

``upload-hash``: an HTTP/1.1 server that answers a request whose body has a
``Content-Length`` (POST or PUT) with the SHA-256 of the body, hex, and closes.
Its answer is a function of the bytes received and nothing else (no ``Date:``,
no server name), so a backup that is replayed the same request gives the same
bytes — what a replay failover needs — and a client that gets the right digest
knows every byte it sent arrived exactly once, in order (invariant I5).

A request with the header ``X-Lab-Read-To-EOF: 1`` is answered as a server that reads to EOF
does: the response head at once, then the body is read until the client half-closes (whatever
its ``Content-Length`` says), then the digest and the close.

A request with the header ``X-Lab-Malformed: 1`` is answered with malformed HTTP (a
``Content-Length`` that is not a number): the lab's way to show what a gateway following HTTP
does with a server that breaks it.

Run: ``python -m appliance.lab.apps upload-hash --bind ADDRESS [--bind ADDRESS6] --port PORT [--port PORT2]``:
it listens on every address (IPv4 or IPv6, one socket each) and port given.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
from pathlib import Path

MAX_HEADER = 16 * 1024
READ = 256 * 1024


def response(status: str, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode() + body


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > MAX_HEADER:
            raise ValueError("header too long")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        length = int(headers.get("content-length", "0"))
        if headers.get("x-lab-malformed") == "1":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: not-a-number\r\n\r\nmalformed\n")
            await writer.drain()
            return
        if headers.get("x-lab-read-to-eof") == "1":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
            await writer.drain()
            h, n = hashlib.sha256(), 0
            while chunk := await reader.read(READ):
                h.update(chunk)
                n += len(chunk)
            writer.write(f"{h.hexdigest()}  {n}\n".encode())
            await writer.drain()
            return
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        h = hashlib.sha256()
        left = length
        while left:
            chunk = await reader.read(min(READ, left))
            if not chunk:
                raise ConnectionError("body cut short")
            h.update(chunk)
            left -= len(chunk)
        writer.write(response("200 OK", f"{h.hexdigest()}  {length}\n".encode()))
        await writer.drain()
    except (ValueError, asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        writer.write(response("400 Bad Request", b"bad request\n"))
    finally:
        writer.close()


async def serve(bind: list[str], ports: list[int]) -> None:
    # a list of hosts: one listening socket per address (an IPv6 one is IPV6_V6ONLY)
    servers = [await asyncio.start_server(handle, bind, port, limit=MAX_HEADER * 2, reuse_address=True)
               for port in ports]
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main() -> None:
    ap = argparse.ArgumentParser(prog="appliance.lab.apps")
    ap.add_argument("app", choices=["upload-hash"])
    ap.add_argument("--bind", action="append", required=True, help="an address; may be given more than once")
    ap.add_argument("--port", type=int, action="append", required=True, help="may be given more than once")
    ap.add_argument("--pidfile")
    a = ap.parse_args()
    if a.pidfile:
        Path(a.pidfile).write_text(f"{os.getpid()}\n")
    asyncio.run(serve(a.bind, a.port))


if __name__ == "__main__":
    main()
