#!/usr/bin/env python3
"""A file-streaming server whose downloads survive a move to another host.

Theory of operation
-------------------
Protocol: the client sends ``GET <name>\\n``; the server answers
``OK <size>\\n`` and then the file's bytes.  The application state of a
download is tiny: the file's name and the header's length.  Everything
else follows from the stream offset (tcpcp section 6): the file position
of the next byte to send is ``out_offset - header length``.

This server uses the agent SDK (``appliance.agent.sdk``), as an
application would copy it:

* on ``SIGUSR1`` every running download is exported to the agent given by
  ``--export-to`` (``export(sock, app_state, to=...)``); the thread serving
  it stops, the socket is gone from this host;
* a resumer thread waits in ``accept_resumed()``; a download moved here
  comes back with its offsets and state and is served on from the file
  position the offset maps to;
* it reports each download's state and consumed input offset to its agent
  (``report(sock, state, in_offset=...)``), so that a gateway in resume
  mode can move it without the application's help (a passive export by
  address, the state travelling with it) or resume it on a backup from the
  gateway's wire checkpoint after this host died.  A resumed download that
  comes without a state (the gateway had no report yet) starts with its
  request still unread in the socket (``in_offset`` 0): the server reads
  it again and goes on from ``out_offset`` — its state is a function of its
  input and the offsets;
* when a send fails because the agent took the socket (a gateway-driven
  move: repair mode), it waits for the outcome (``taken()``): moved — the
  thread ends; rolled back — it carries on.

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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from appliance.agent import sdk as agent_sdk
from appliance.agent.protocol import parse_hostport

CHUNK = 65536
move_now = threading.Event()
print_lock = threading.Lock()


def emit(**event: object) -> None:
    with print_lock:
        print(json.dumps(event), flush=True)


def report(sock: socket.socket, name: str, header_len: int, in_offset: int, args: argparse.Namespace) -> None:
    """Tell the agent this download's state and how much input it consumed."""
    state = json.dumps({"file": name, "header": header_len}).encode()
    try:
        agent_sdk.report(sock, state, in_offset=in_offset, agent=args.agent)
    except (OSError, ValueError, RuntimeError) as exc:   # no agent: the download still works, unprotected
        emit(event="report-failed", error=str(exc))


def serve(sock: socket.socket, root: Path, name: str, header_len: int, position: int, args: argparse.Namespace,
          header_left: bytes = b"") -> None:
    """Send ``header_left`` then ``name`` from ``position`` on; export the download when asked to."""
    path = root / name
    size = path.stat().st_size
    next_report = position + args.report
    with open(path, "rb") as f:
        f.seek(position)
        data = header_left
        while position < size or data:
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
            except OSError as exc:
                outcome = agent_sdk.taken(sock, exc)
                if outcome == "back":       # a move was tried and rolled back: carry on
                    emit(event="move-rolled-back", file=name, position=position)
                    continue
                emit(event="moved-away" if outcome == "moved" else "send-failed", file=name, position=position,
                     error=str(exc))
                sock.close()
                return
            if header_left:
                used = min(n, len(header_left))
                header_left = header_left[used:]
                data = data[n:]
                n -= used
            else:
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
    report(sock, name, len(header), len(line), args)
    host, port = sock.getpeername()[:2]  # (an AF_INET6 name has four fields)
    emit(event="started", file=name, peer=f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    serve(sock, root, name, len(header), 0, args, header_left=header)


def read_request(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n") and len(line) < 1024:
        b = sock.recv(1)
        if not b:
            break
        line += b
    return line


def resume(r: agent_sdk.Resumed, root: Path, args: argparse.Namespace) -> None:
    """Serve a download moved here from the offsets (and the state, if it came with one)."""
    out_offset = r.out_offset or 0
    if r.app_state:
        state = json.loads(r.app_state)
        name, header = state["file"], None
        header_len = state["header"]
        in_offset = r.in_offset
    elif r.in_offset == 0:
        # no state: the request is still unread in the socket; the state follows from it
        line = read_request(r.sock)
        parts = line.decode(errors="replace").split()
        name = parts[1] if len(parts) == 2 and parts[0] == "GET" else ""
        if not name or "/" in name or not (root / name).is_file():
            emit(event="resume-failed", error=f"bad request {line!r}")
            r.sock.close()
            return
        header = f"OK {(root / name).stat().st_size}\n".encode()
        header_len = len(header)
        in_offset = len(line)
    else:
        emit(event="resume-failed", error=f"no state and input consumed up to {r.in_offset}: cannot resume")
        r.sock.close()
        return
    position = max(0, out_offset - header_len)
    header_left = b""
    if out_offset < header_len:     # the client had not even all of the header
        header = header or f"OK {(root / name).stat().st_size}\n".encode()
        header_left = header[out_offset:]
    emit(event="resumed", file=name, position=position, out_offset=out_offset, in_offset=in_offset, peer=r.remote,
         state=bool(r.app_state))
    report(r.sock, name, header_len, in_offset or 0, args)
    serve(r.sock, root, name, header_len, position, args, header_left=header_left)


def resumer(root: Path, args: argparse.Namespace) -> None:
    while True:
        try:
            r = agent_sdk.accept_resumed(agent=args.agent)
        except (OSError, ValueError) as exc:   # no agent (yet, or it restarted): try again
            emit(event="agent-unavailable", error=str(exc))
            time.sleep(1.0)
            continue
        threading.Thread(target=resume, args=(r, root, args), daemon=True).start()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--listen", default="0.0.0.0:8000",
                   help="ADDR:PORT for new downloads ([IPV6]:PORT for IPv6; [::]:8000 takes both families)")
    p.add_argument("--root", required=True, help="directory of the files served")
    p.add_argument("--agent", default=agent_sdk.DEFAULT_SOCKET, help="the local agent's Unix socket")
    p.add_argument("--export-to", help="HOST:PORT of the agent that takes the downloads on SIGUSR1")
    p.add_argument("--report", type=int, default=1 << 20, help="report offsets every this many bytes")
    args = p.parse_args()
    host, port = parse_hostport(args.listen, "--listen")
    root = Path(args.root)
    signal.signal(signal.SIGUSR1, lambda *_: move_now.set())
    signal.signal(signal.SIGUSR2, lambda *_: move_now.clear())
    threading.Thread(target=resumer, args=(root, args), daemon=True).start()
    lst = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if ":" in host:
        lst.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)   # dual-stack on [::]
    lst.bind((host, int(port)))
    lst.listen()
    emit(event="listening", address=args.listen, pid=os.getpid())
    while True:
        conn, _ = lst.accept()
        threading.Thread(target=handle_new, args=(conn, root, args), daemon=True).start()


if __name__ == "__main__":
    main()
