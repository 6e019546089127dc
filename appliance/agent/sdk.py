"""The application side of the agent: export a connection, accept resumed ones.

Theory of operation
-------------------
An application that wants its connections to survive a move links this
module (stdlib only) and talks to the agent on its host over the agent's
Unix socket (``/run/appliance-agent.sock`` by default):

* :func:`export` hands the agent one of its sockets (``SCM_RIGHTS``): a
  connection (ESTABLISHED or closing, IPv4 or IPv6), a listener or a bound socket,
  together with an opaque *application state* blob and where to send it.
  The agent isolates the endpoint, reads its ICI and has the destination's
  agent import it.  On success the application closes its socket (nothing
  is sent: it is in repair mode) and forgets the connection.

* :func:`accept_resumed` waits for a connection imported on this host (or
  a listening or bound socket: ``kind`` says which, ``state`` the TCP state
  it was taken in; a connection may arrive in a closing state, e.g.
  CLOSE_WAIT: reading gives the rest of the peer's bytes, then EOF).  It
  returns a :class:`Resumed`: the socket (already active, a normal TCP
  socket), the stream offsets — ``out_offset`` is the offset of the next
  byte the application writes, ``in_offset`` of the next byte it reads
  (bytes that were unread at the origin are still in the socket) — and the
  state blob.  tcpcp section 6's example: a file server maps
  ``out_offset`` to a file position.

* :func:`report` tells the agent, for one connection, how far the
  application has consumed its input (``in_offset``) and its state blob.
  The gateway polls the agents for these reports: after a failure it
  resumes the connection on a backup with the client bytes from that offset
  on and the blob (``consumed`` of ``ici_from_record``), and a planned move
  driven by the gateway (a passive export by address) carries the blob.

* :func:`taken` is for the application's own thread after a call on a
  socket failed: the gateway may have had the agent take the socket away
  (repair mode, sends fail with ``EINVAL``).  It waits until the move is
  over and says ``"moved"`` (the connection lives on elsewhere: close the
  socket and forget it), ``"back"`` (the move was rolled back: carry on) or
  ``"error"`` (a genuine error).

Offsets count from stream byte 0 of the connection (the byte after the
SYN).  A resumed socket's kernel counters restart at the move, so the SDK
remembers each resumed socket's stream bases and passes them on when the
socket is exported again (A→B→A).
"""

from __future__ import annotations

import base64
import errno
import os
import socket
import struct
import time
from dataclasses import dataclass

from . import protocol as proto

DEFAULT_SOCKET = "/run/appliance-agent.sock"
TCP_REPAIR = 19
TCP_CLOSE = 7

# socket inode -> (send_base, recv_base) of sockets this process resumed
_bases: dict[int, tuple[int | None, int | None]] = {}


@dataclass
class Resumed:
    sock: socket.socket
    out_offset: int | None      # next byte this application writes (stream offset)
    in_offset: int | None       # next byte it reads
    acked_offset: int | None    # how far the peer had acknowledged our bytes
    app_state: bytes
    local: str
    remote: str
    handle: str
    kind: str = "connection"    # or "listen" (a listening socket, listening already), "bound"
    state: str = "ESTABLISHED"  # the TCP state it was taken in (a closing state, LISTEN, BOUND)


def _connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError as exc:
        s.close()
        raise ConnectionError(f"no agent at {path}: {exc.strerror}") from None
    return s


def export(sock: socket.socket, app_state: bytes = b"", *, to: str, app: str = "default",
           activate: bool = True, agent: str = DEFAULT_SOCKET, timeout: float = 60.0) -> dict:
    """Move ``sock``'s connection to the agent at ``to`` (``HOST:PORT``).

    Returns the destination's answer (``handle``, offsets); raises
    :class:`agent_proto.AgentError` if the move failed (then the socket is
    back in normal operation and still the application's).  On success the
    socket is closed here.
    """
    proto.parse_hostport(to, "to")
    body: dict = {"to": to, "app": app, "activate": activate,
                  "app_state": base64.b64encode(app_state).decode()}
    bases = _bases.get(os.fstat(sock.fileno()).st_ino)
    if bases is not None:
        body["send_base"], body["recv_base"] = bases
    with _connect(agent) as ch:
        ch.settimeout(timeout)
        proto.send_frame(ch, proto.make("export", body, None), fd=sock.fileno())
        raw, _ = proto.recv_frame(ch)
    reply = raw.get("body", {}) if isinstance(raw, dict) else {}
    if not reply.get("ok"):
        raise proto.AgentError(str(reply.get("error", "the agent refused without a reason")))
    _bases.pop(os.fstat(sock.fileno()).st_ino, None)
    sock.close()
    return reply


def accept_resumed(app: str = "default", *, agent: str = DEFAULT_SOCKET,
                   timeout: float | None = None) -> Resumed:
    """Wait for a connection the agent imported for application ``app``.

    Returns once the endpoint is active.  A move the orchestrator cancelled
    (``release``) is skipped and the wait goes on.
    """
    while True:
        with _connect(agent) as ch:
            ch.settimeout(timeout)
            proto.send_frame(ch, proto.make("listen", {"app": app}, None))
            raw, fd = proto.recv_frame(ch, want_fd=True)
            if not isinstance(raw, dict) or raw.get("type") != "resumed" or fd is None:
                if fd is not None:
                    os.close(fd)
                raise proto.ProtocolError("type", f"unexpected message from the agent: {raw!r:.200}")
            info = raw["body"]
            sock = socket.socket(fileno=fd)
            proto.send_frame(ch, proto.make("ack", {"handle": info.get("handle")}, None))
            ch.settimeout(None)        # activation may wait for the gateway's switch
            nxt, _ = proto.recv_frame(ch)
        if isinstance(nxt, dict) and nxt.get("type") == "active":
            _bases[os.fstat(sock.fileno()).st_ino] = (info.get("send_base"), info.get("recv_base"))
            return Resumed(sock=sock, out_offset=info.get("out_offset"), in_offset=info.get("in_offset"),
                           acked_offset=info.get("acked_offset"),
                           app_state=base64.b64decode(info.get("app_state", "")),
                           local=info.get("local", ""), remote=info.get("remote", ""),
                           handle=info.get("handle", ""), kind=info.get("kind", "connection"),
                           state=info.get("state", "ESTABLISHED"))
        sock.close()                   # released: still silent, drop it and wait again


def report(sock: socket.socket, app_state: bytes = b"", *, in_offset: int | None = None, app: str = "default",
           agent: str = DEFAULT_SOCKET, timeout: float = 5.0) -> None:
    """Tell the agent how far this application has consumed ``sock``'s input
    (``in_offset``, a stream offset: the next byte it will read) and its
    state blob for the connection.  Call it whenever either changes in a way
    a resumed copy of the application must know; raises
    :class:`agent_proto.AgentError` if the agent refused."""
    local = proto.hostport(*_unmapped(sock.getsockname()))
    remote = proto.hostport(*_unmapped(sock.getpeername()))
    body = {"local": local, "remote": remote, "in_offset": in_offset, "app": app,
            "app_state": base64.b64encode(app_state).decode()}
    with _connect(agent) as ch:
        ch.settimeout(timeout)
        proto.send_frame(ch, proto.make("report", body, None))
        raw, _ = proto.recv_frame(ch)
    reply = raw.get("body", {}) if isinstance(raw, dict) else {}
    if not reply.get("ok"):
        raise proto.AgentError(str(reply.get("error", "the agent refused the report")))


def _unmapped(name: tuple) -> tuple[str, int]:
    """(address, port) of a socket name; an IPv4 peer of a dual-stack socket as plain IPv4
    (the form the agent and the gateway write)."""
    addr = str(name[0])
    if addr.lower().startswith("::ffff:") and "." in addr:
        addr = addr[7:]
    return addr, int(name[1])


def _repair_state(sock: socket.socket) -> tuple[bool, int]:
    repair = struct.unpack("=i", sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 4))[0] != 0
    state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    return repair, state


def taken(sock: socket.socket, exc: OSError, timeout: float = 60.0) -> str:
    """After ``exc`` from a call on ``sock``: was the socket taken by the agent?

    ``"moved"``: the connection was moved to another host (the agent
    disconnected this copy silently): close the socket, forget the
    connection.  ``"back"``: a move was tried and rolled back; the socket
    works again.  ``"error"``: a genuine error, not a move.  Waits (polling)
    while a move is under way, at most ``timeout`` seconds ("moved" then:
    the copy here is no use any more)."""
    if exc.errno == errno.ECONNABORTED:
        return "moved"
    try:
        in_repair, state = _repair_state(sock)
    except OSError:
        return "error"
    if not in_repair:
        return "moved" if state == TCP_CLOSE and exc.errno == errno.EINVAL else "error"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            in_repair, state = _repair_state(sock)
        except OSError:
            return "moved"
        if state == TCP_CLOSE:
            return "moved"
        if not in_repair:
            return "back"
        time.sleep(0.005)
    return "moved"
