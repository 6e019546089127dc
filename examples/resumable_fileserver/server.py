#!/usr/bin/env python3
"""A file-streaming server whose downloads survive a move to another host.

Theory of operation
-------------------
Protocol: the client sends ``GET <name>\\n``; the server answers
``OK <size>\\n`` and then the file's bytes.  The application state of a
download is tiny: the file's name and the header's length.  Everything
else follows from the stream offset (tcpcp section 6): the file position
of the next byte to send is ``out_offset - header length``.

This server uses the agent SDK (``appliance.agent_sdk``), as an
application would copy it:

* on ``SIGUSR1`` every running download is exported to the agent given by
  ``--export-to`` (``export(sock, app_state, to=...)``); the thread serving
  it stops, the socket is gone from this host;
* a resumer thread waits in ``accept_resumed()``; a download moved here
  comes back with its offsets and state and is served on from the file
  position the offset maps to.

Each event is one JSON line on stdout (``listening``, ``started``,
``offsets`` every ``--report`` bytes, ``exported``, ``resumed``, ``done``),
so an operator (or a test) can follow the offsets the application reports.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from appliance import agent_sdk

CHUNK = 65536
move_now = threading.Event()
print_lock = threading.Lock()


def emit(**event: object) -> None:
    with print_lock:
        print(json.dumps(event), flush=True)


def serve(sock: socket.socket, root: Path, name: str, header_len: int, position: int, args: argparse.Namespace) -> None:
    """Send ``name`` from ``position`` on; export the download when asked to."""
    path = root / name
    size = path.stat().st_size
    next_report = position + args.report
    with open(path, "rb") as f:
        f.seek(position)
        data = b""
        while position < size:
            if move_now.is_set() and args.export_to:
                state = json.dumps({"file": name, "header": header_len}).encode()
                try:
                    reply = agent_sdk.export(sock, state, to=args.export_to, agent=args.agent)
                except (OSError, ValueError, RuntimeError) as exc:   # the move failed: the socket is ours, go on
                    emit(event="export-failed", error=str(exc), position=position)
                    move_now.clear()
                else:
                    # everything up to `position` is in the kernel's queues and moved
                    # with the connection; the rest is read again from the file there
                    emit(event="exported", file=name, position=position, out_offset=header_len + position,
                         to=args.export_to, handle=reply.get("handle"))
                    return
            if not data:
                data = f.read(min(CHUNK, size - position))
            # never block in send: a move may be asked for while the peer is silent
            _, writable, _ = select.select([], [sock], [], 0.1)
            if not writable:
                continue
            try:
                n = sock.send(data, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            data = data[n:]
            position += n
            if position >= next_report:
                emit(event="offsets", file=name, out_offset=header_len + position)
                next_report += args.report
    emit(event="done", file=name, out_offset=header_len + position)
    sock.close()


def handle_new(sock: socket.socket, root: Path, args: argparse.Namespace) -> None:
    line = b""
    while not line.endswith(b"\n") and len(line) < 1024:
        b = sock.recv(1)
        if not b:
            sock.close()
            return
        line += b
    parts = line.decode(errors="replace").split()
    name = parts[1] if len(parts) == 2 and parts[0] == "GET" else ""
    path = root / name
    if not name or "/" in name or not path.is_file():
        sock.sendall(b"ERR no such file\n")
        sock.close()
        return
    header = f"OK {path.stat().st_size}\n".encode()
    sock.sendall(header)
    host, port = sock.getpeername()
    emit(event="started", file=name, peer=f"{host}:{port}")
    serve(sock, root, name, len(header), 0, args)


def resumer(root: Path, args: argparse.Namespace) -> None:
    while True:
        r = agent_sdk.accept_resumed(agent=args.agent)
        state = json.loads(r.app_state)
        position = (r.out_offset or 0) - state["header"]
        emit(event="resumed", file=state["file"], position=position, out_offset=r.out_offset,
             in_offset=r.in_offset, peer=r.remote)
        threading.Thread(target=serve, args=(r.sock, root, state["file"], state["header"], position, args),
                         daemon=True).start()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--listen", default="0.0.0.0:8000", help="ADDR:PORT for new downloads")
    p.add_argument("--root", required=True, help="directory of the files served")
    p.add_argument("--agent", default=agent_sdk.DEFAULT_SOCKET, help="the local agent's Unix socket")
    p.add_argument("--export-to", help="HOST:PORT of the agent that takes the downloads on SIGUSR1")
    p.add_argument("--report", type=int, default=1 << 20, help="report offsets every this many bytes")
    args = p.parse_args()
    host, _, port = args.listen.rpartition(":")
    root = Path(args.root)
    signal.signal(signal.SIGUSR1, lambda *_: move_now.set())
    signal.signal(signal.SIGUSR2, lambda *_: move_now.clear())
    threading.Thread(target=resumer, args=(root, args), daemon=True).start()
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind((host, int(port)))
    lst.listen()
    emit(event="listening", address=args.listen, pid=os.getpid())
    while True:
        conn, _ = lst.accept()
        threading.Thread(target=handle_new, args=(conn, root, args), daemon=True).start()


if __name__ == "__main__":
    main()
