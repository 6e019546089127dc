"""The agent: moves TCP endpoints off and onto its host (SockMi's daemon, tcpcp's API).

Theory of operation
-------------------
One agent runs on each server host (primary, backups).  It listens on two
channels:

* **TCP, authenticated** (``agent_proto``: HMAC-SHA256, nonce and time
  window) for the gateway and the other agents.  Requests:

  ``ping`` → ``{"ok": true, "host": ...}``

  ``export {"pid", "fd"} | {"local", "remote"}, "to"?, "activate"?, "app"?, "app_state"?``
      take a socket of a local process (SockMi's *passive* export:
      ``pidfd_open`` + ``pidfd_getfd``, or found by its address pair in
      ``/proc``), read its ICI (``checkpoint.io.tcp_repair.get``: the endpoint is
      isolated from then on) and, with ``to``, send it to that agent as an
      ``import``; the reply is the destination's.  Without ``to`` the reply
      carries the ICI document.  If the import fails the origin socket
      leaves repair mode again (a failed move rolls back: the caller must
      let the peer's traffic reach the origin again).

  ``import {"ici", "app_state"?, "app"?, "activate"?, "port_choice"?}``
      ``create()`` the endpoint, hand it to a local application waiting in
      ``accept_resumed()`` (Unix socket, ``SCM_RIGHTS``) with its stream
      offsets and the application's state blob, wait for the application's
      acknowledgment, then ``activate()`` it — or, with ``"activate":
      false``, keep it silent and reply with a ``handle`` for a later
      ``activate`` (so the gateway can switch the forwarding in between).

  ``activate {"handle"}`` / ``release {"handle"}``
      activate a created endpoint / drop it silently.

  ``rollback {"local", "remote"}`` / ``finish {"local", "remote"}``
      the end of a two-phase passive export (``activate: false``) driven by
      the gateway: the origin socket, still held by its application in
      repair mode, either leaves repair mode again (the move failed: the
      application carries on) or is disconnected silently (the move
      succeeded: no FIN, no RST; the application's next call fails with
      ``ECONNABORTED`` and it lets the connection go, and the address pair
      is free for a move back).  Both refuse a socket not in repair mode.

  ``reports {}``
      what the local applications reported about their connections
      (``agent_sdk.report``: the input offset they consumed up to and their
      state blob), for the gateway's heartbeat; connections no longer
      ESTABLISHED here are forgotten.  A passive export by address carries
      the reported state blob to the destination.

  An ``import`` may carry ``"local": "ip:port"``: the endpoint answers from
  that address instead of the ICI's (the destination's own service address,
  when the gateway rewrites addresses); an ``export`` passes its
  ``"to_local"`` on as the import's ``local``.

* **Unix stream socket** (file mode 0600) for the local applications
  (``agent_sdk``): ``listen`` (an application waits for resumed
  connections) and ``export`` (*active* export: the application passes its
  socket and its state, the agent does the rest and answers).

Ordering (tcpcp section 2): the peer's traffic must be held away from the
origin before the export (repair mode stops the origin's output, not the
kernel's processing of arriving segments), and must reach the destination
only once the endpoint exists there; the orchestrator (the gateway, or a
test) holds, exports, switches, activates and releases.
"""

from __future__ import annotations

import base64
import ctypes
import dataclasses
import os
import queue
import secrets
import socket
import socketserver
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from checkpoint.io import tcp_repair as repair
from checkpoint.repair_ici import Ici, IciError, SocketDoc, socket_doc_from_dict

from . import protocol as proto

SYS_PIDFD_OPEN = 434      # x86_64 and arm64 alike (the unified syscall table)
SYS_PIDFD_GETFD = 438
_libc = ctypes.CDLL(None, use_errno=True)


def steal_fd(pid: int, fd: int) -> socket.socket:
    """A duplicate of process ``pid``'s descriptor ``fd`` (needs ptrace access: root)."""
    pidfd = _libc.syscall(SYS_PIDFD_OPEN, ctypes.c_int(pid), ctypes.c_uint(0))
    if pidfd < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"pidfd_open({pid}): {os.strerror(e)}")
    try:
        got = _libc.syscall(SYS_PIDFD_GETFD, ctypes.c_int(pidfd), ctypes.c_int(fd), ctypes.c_uint(0))
        if got < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"pidfd_getfd(pid {pid}, fd {fd}): {os.strerror(e)}"
                             + (" (needs ptrace permission: run as root)" if e == 1 else ""))
    finally:
        os.close(pidfd)
    try:
        s = socket.socket(fileno=got)
    except OSError:
        os.close(got)
        raise
    if s.family not in (socket.AF_INET, socket.AF_INET6) or s.type != socket.SOCK_STREAM:
        s.detach()
        os.close(got)
        raise ValueError(f"pid {pid} fd {fd} is not a TCP socket (IPv4 or IPv6)")
    return s


# /proc/net/tcp states (include/net/tcp_states.h) the agent moves: the connected
# ones get() takes, and listeners
PROC_CONNECTED = {"01": "ESTABLISHED", "04": "FIN_WAIT1", "05": "FIN_WAIT2", "08": "CLOSE_WAIT",
                  "09": "LAST_ACK", "0B": "CLOSING"}
PROC_LISTEN = "0A"


def proc_addr(text: str) -> tuple[str, int]:
    """An address of ``/proc/net/tcp`` or ``/proc/net/tcp6``: ``HEX:PORT``.

    IPv4 is one 32-bit word printed in host byte order; IPv6 is four such
    words (each word's bytes reversed on a little-endian host), so the
    bytes are put back word by word.  An IPv4-mapped address of a
    dual-stack socket (``::ffff:a.b.c.d``) comes back as plain IPv4."""
    hexaddr, port = text.split(":")
    raw = bytes.fromhex(hexaddr)
    if len(raw) == 4:
        words = [raw]
    elif len(raw) == 16:
        words = [raw[i:i + 4] for i in range(0, 16, 4)]
    else:
        raise ValueError(f"{text!r}: not an address of /proc/net/tcp or tcp6")
    order = sys.byteorder
    b = b"".join(int.from_bytes(w, "big").to_bytes(4, order) for w in words)
    if len(b) == 4:
        addr = socket.inet_ntop(socket.AF_INET, b)
    elif b[:12] == b"\0" * 10 + b"\xff\xff":
        addr = socket.inet_ntop(socket.AF_INET, b[12:])
    else:
        addr = socket.inet_ntop(socket.AF_INET6, b)
    return addr, int(port, 16)


def proc_sockets(paths: tuple[str, ...] = ("/proc/net/tcp", "/proc/net/tcp6")) -> list[tuple[tuple[str, int], tuple[str, int], str, str]]:
    """(local, remote, state hex, inode) of every TCP socket of this netns, both families."""
    out = []
    for path in paths:
        try:
            f = open(path)
        except FileNotFoundError:       # IPv6 disabled
            continue
        with f:
            next(f)
            for line in f:
                parts = line.split()
                out.append((proc_addr(parts[1]), proc_addr(parts[2]), parts[3].upper(), parts[9]))
    return out


def _same(a: tuple[str, int], b: tuple[str, int]) -> bool:
    return a[1] == b[1] and socket.inet_pton(_af(a[0]), a[0]) == socket.inet_pton(_af(b[0]), b[0])


def _af(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def find_socket(local: tuple[str, int], remote: tuple[str, int] | None) -> tuple[int, int]:
    """(pid, fd) of a process holding the connected socket local ↔ remote
    (ESTABLISHED or a closing state), or with ``remote`` None the listener
    on ``local`` (this netns, IPv4 or IPv6)."""
    inode = None
    for loc, rem, state, ino in proc_sockets():
        if not _same(loc, local):
            continue
        if remote is None and state == PROC_LISTEN or remote is not None and state in PROC_CONNECTED \
                and _same(rem, remote):
            inode = ino
            break
    if inode is None:
        what = f"listener on {proto.hostport(*local)}" if remote is None else \
            f"connected socket {proto.hostport(*local)} <-> {proto.hostport(*remote)}"
        raise LookupError(f"no {what} here")
    target = f"socket:[{inode}]"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return int(pid), int(fd)
        except OSError:
            continue
    raise LookupError(f"socket {target} is held by no process visible here")


AF_UNSPEC_ADDR = struct.pack("=H14x", socket.AF_UNSPEC)   # struct sockaddr with sa_family AF_UNSPEC


def disconnect_silently(sock: socket.socket) -> None:
    """Disconnect a repair-mode socket: ``connect(AF_UNSPEC)`` runs the
    kernel's ``tcp_disconnect``, which in repair mode sends nothing (no RST)
    and sets ``ECONNABORTED`` on the socket; it leaves the address pair free.
    Refuses a socket not in repair mode (that would reset the peer)."""
    if not repair.in_repair(sock):
        raise proto.ProtocolError("local", "the socket is not in repair mode: refusing to disconnect a live one")
    if _libc.connect(sock.fileno(), AF_UNSPEC_ADDR, len(AF_UNSPEC_ADDR)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"connect(AF_UNSPEC): {os.strerror(e)}")


def addr_key(local: str, remote: str) -> tuple[tuple[str, int], tuple[str, int]]:
    return proto.parse_hostport(local, "local"), proto.parse_hostport(remote, "remote")


def established_pairs() -> set[tuple[str, str]]:
    """``("ip:port", "ip:port")`` (local, remote; ``[ip6]:port`` for IPv6) of every
    connected TCP socket here (ESTABLISHED or closing: still movable), both families."""
    return {(proto.hostport(*loc), proto.hostport(*rem)) for loc, rem, state, _ in proc_sockets()
            if state in PROC_CONNECTED}


# --- exporting ----------------------------------------------------------------------------

def export_socket(sock: socket.socket, *, key: bytes, to: tuple[str, int] | None, activate: bool = True,
                  app: str = "default", app_state: bytes = b"", send_base: int | None = None,
                  recv_base: int | None = None, port_choice: str = "same",
                  dest_local: str | None = None) -> dict[str, Any]:
    """Take ``sock``'s ICI and, with ``to``, have that agent import it.

    Returns the destination's reply (``handle``, offsets), or ``{"ici": ...}``
    without ``to``.  On a failed import the socket is put back to work.

    A listening or bound socket travels as its socket document (same
    ``ici`` field, with a ``kind``); a listener's completed but unaccepted
    connections are accepted here and each exported as a connection to the
    same destination and application after it (``children`` in the reply).
    """
    if repair.TCP_STATES.get(repair.tcp_info(sock)["state"]) in ("LISTEN", "CLOSE"):
        return _export_unconnected(sock, key=key, to=to, activate=activate, app=app, app_state=app_state,
                                   dest_local=dest_local)
    ici = repair.get(sock, send_base=send_base, recv_base=recv_base)
    doc = ici.to_dict()
    if to is None:
        return {"ok": True, "ici": doc}
    try:
        body = {"ici": doc, "app": app, "activate": activate, "port_choice": port_choice,
                "app_state": base64.b64encode(app_state).decode()}
        if dest_local is not None:
            body["local"] = dest_local
        return proto.request(to, "import", body, key)
    except BaseException as exc:
        try:
            repair.activate(sock, unsent=b"")   # roll back: the origin carries on
            rolled = "; the origin socket left repair mode again (rolled back)"
        except OSError as again:
            rolled = f"; rolling back failed too: {again}"
        raise proto.AgentError(f"import at {to[0]}:{to[1]} failed: {exc}{rolled}") from exc


def _export_unconnected(sock: socket.socket, *, key: bytes, to: tuple[str, int] | None, activate: bool,
                        app: str, app_state: bytes, dest_local: str | None) -> dict[str, Any]:
    doc, children = repair.get_socket(sock, drain=False)
    if to is None:
        return {"ok": True, "ici": doc.to_dict()}
    body: dict[str, Any] = {"ici": doc.to_dict(), "app": app, "activate": activate,
                            "app_state": base64.b64encode(app_state).decode()}
    if dest_local is not None:
        body["local"] = dest_local
    reply = proto.request(to, "import", body, key)   # nothing to roll back: the origin socket is unchanged
    if doc.kind == "listen":
        _, children = repair.get_socket(sock, drain=True)
        moved = []
        for child in children:
            try:
                moved.append(export_socket(child, key=key, to=to, activate=True, app=app))
            except (proto.AgentError, OSError, ValueError) as exc:
                # rolled back: the connection is ours (the agent's) now, and nobody serves it
                moved.append({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
            finally:
                child.close()   # moved: in repair mode, silent
        reply = {**reply, "children": moved}
    return reply


# --- the agent ------------------------------------------------------------------------------

@dataclass
class AgentConfig:
    key: bytes
    listen: tuple[str, int] | None = None
    socket_path: str = "/run/appliance-agent.sock"
    window: float = 30.0            # seconds a message's timestamp may be off
    app_wait: float = 10.0          # seconds an import waits for an application


@dataclass
class _Waiter:
    """An application's channel waiting in accept_resumed(); its handler
    thread keeps the channel open until ``done`` (socketserver closes a
    request when its handler returns)."""

    conn: socket.socket
    done: threading.Event = field(default_factory=threading.Event)

    def close(self) -> None:
        self.conn.close()
        self.done.set()


@dataclass
class _Pending:
    sock: socket.socket               # a RepairedSocket, or a PassedSocket (listening/bound)
    app: _Waiter


@dataclass
class Agent:
    cfg: AgentConfig
    guard: proto.ReplayGuard = field(init=False)
    waiting: dict[str, queue.Queue[_Waiter]] = field(default_factory=dict)
    pending: dict[str, _Pending] = field(default_factory=dict)
    # (local "ip:port", remote "ip:port") -> what the application reported (agent_sdk.report)
    reports: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    servers: list[socketserver.BaseServer] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.guard = proto.ReplayGuard(self.cfg.window)

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> Agent:
        agent = self

        class TcpHandler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                agent._serve_tcp(self.request)

        class UnixHandler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                agent._serve_unix(self.request)

        if self.cfg.listen is not None:
            v6 = ":" in self.cfg.listen[0]

            class Server(socketserver.ThreadingTCPServer):
                allow_reuse_address = True
                address_family = socket.AF_INET6 if v6 else socket.AF_INET

            tcp = Server(self.cfg.listen, TcpHandler)
            tcp.daemon_threads = True
            self.servers.append(tcp)
        try:
            os.unlink(self.cfg.socket_path)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            unix = socketserver.ThreadingUnixStreamServer(self.cfg.socket_path, UnixHandler)
        finally:
            os.umask(old)
        unix.daemon_threads = True
        self.servers.append(unix)
        for srv in self.servers:
            threading.Thread(target=srv.serve_forever, name=f"agent-{type(srv).__name__}", daemon=True).start()
        return self

    def stop(self) -> None:
        for srv in self.servers:
            srv.shutdown()
            srv.server_close()
        self.servers.clear()
        try:
            os.unlink(self.cfg.socket_path)
        except FileNotFoundError:
            pass
        with self.lock:
            for p in self.pending.values():
                p.sock.close()
                p.app.close()
            self.pending.clear()
            for q in self.waiting.values():
                while not q.empty():
                    q.get_nowait().close()

    # --- the authenticated channel ------------------------------------------------------

    def _serve_tcp(self, conn: socket.socket) -> None:
        conn.settimeout(60)
        try:
            raw, _ = proto.recv_frame(conn)
            msg = proto.verify(raw, self.cfg.key, self.guard)
        except (proto.ProtocolError, ConnectionError, OSError) as exc:
            # unauthenticated: answer nothing useful to the sender, log locally
            print(f"agent: refused a message: {exc}", file=sys.stderr, flush=True)
            return
        try:
            body = self.dispatch(msg["type"], msg["body"])
        except (IciError, repair.RepairError, proto.ProtocolError, proto.AgentError, LookupError,
                ValueError, OSError, TimeoutError) as exc:
            body = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        try:
            proto.send_frame(conn, proto.make("reply", body, self.cfg.key, req_id=msg.get("id")))
        except OSError:
            pass

    def dispatch(self, type_: str, body: dict[str, Any]) -> dict[str, Any]:
        if type_ == "ping":
            return {"ok": True, "host": socket.gethostname(), "pending": len(self.pending)}
        if type_ == "import":
            return self.do_import(body)
        if type_ == "export":
            return self.do_export(body)
        if type_ in ("rollback", "finish"):
            return self.end_export(type_, body)
        if type_ == "reports":
            return {"ok": True, "reports": self.current_reports()}
        if type_ in ("activate", "release"):
            handle = body.get("handle")
            with self.lock:
                p = self.pending.pop(handle, None) if isinstance(handle, str) else None
            if p is None:
                raise LookupError(f"handle: {handle!r} is not a pending endpoint here")
            if type_ == "activate":
                self._activate(p)
                return {"ok": True, "handle": handle, "active": True}
            self._notify(p.app, "released", {"handle": handle})
            try:
                pair = (proto.hostport(*p.sock.getsockname()[:2]), proto.hostport(*p.sock.getpeername()[:2]))
                with self.lock:
                    self.reports.pop(pair, None)
            except OSError:
                pass
            p.sock.close()
            return {"ok": True, "handle": handle, "released": True}
        raise proto.ProtocolError("type", f"{type_!r} is not a request this agent knows")

    def end_export(self, type_: str, body: dict[str, Any]) -> dict[str, Any]:
        """``rollback``: the origin socket leaves repair mode (a window probe
        wakes the peer); ``finish``: it is disconnected silently."""
        local, remote = body.get("local"), body.get("remote")
        if not isinstance(local, str) or not isinstance(remote, str):
            raise proto.ProtocolError("local", "name the socket: local and remote, as \"ip:port\"")
        lk, rk = addr_key(local, remote)
        pid, fd = find_socket(lk, rk)
        sock = steal_fd(pid, fd)
        try:
            if not repair.in_repair(sock):
                raise proto.ProtocolError("local", f"{local} <-> {remote} is not in repair mode (not exported)")
            if type_ == "rollback":
                repair.activate(sock, unsent=b"")
            else:
                disconnect_silently(sock)
                with self.lock:
                    self.reports.pop((local, remote), None)
        finally:
            sock.close()
        return {"ok": True, "local": local, "remote": remote, type_: True}

    def report(self, body: dict[str, Any]) -> dict[str, Any]:
        """An application's report on one of its connections (local channel)."""
        local, remote = body.get("local"), body.get("remote")
        if not isinstance(local, str) or not isinstance(remote, str):
            raise proto.ProtocolError("local", "a report names local and remote as \"ip:port\"")
        addr_key(local, remote)
        in_offset = body.get("in_offset")
        if in_offset is not None and (isinstance(in_offset, bool) or not isinstance(in_offset, int) or in_offset < 0):
            raise proto.ProtocolError("in_offset", f"{in_offset!r} is not a stream offset")
        state = body.get("app_state", "")
        try:
            base64.b64decode(state, validate=True)
        except (ValueError, TypeError) as exc:
            raise proto.ProtocolError("app_state", f"not base64: {exc}") from None
        with self.lock:
            self.reports[(local, remote)] = {"local": local, "remote": remote, "in_offset": in_offset,
                                             "app_state": state, "app": str(body.get("app", "default")),
                                             "time": time.time()}
        return {"ok": True}

    def current_reports(self) -> list[dict[str, Any]]:
        """The reports of connections still ESTABLISHED here (the others are forgotten)."""
        before = time.time()
        live = established_pairs()
        with self.lock:
            # a report made after the listing was read may be of a socket it could not show
            for k in [k for k, v in self.reports.items() if k not in live and v["time"] < before]:
                del self.reports[k]
            return [dict(v) for v in self.reports.values()]

    # --- import ------------------------------------------------------------------------------

    def do_import(self, body: dict[str, Any]) -> dict[str, Any]:
        doc = body.get("ici")
        if isinstance(doc, dict) and "kind" in doc:
            return self._import_unconnected(body, socket_doc_from_dict(doc))
        ici = Ici.from_dict(doc)
        if body.get("local") is not None:
            if not isinstance(body["local"], str):
                raise proto.ProtocolError("local", "not \"ip:port\"")
            la, lp = proto.parse_hostport(body["local"], "local")
            ici = dataclasses.replace(ici, local_addr=la, local_port=lp)
        app, state = self._app_and_state(body)
        port_choice = body.get("port_choice", "same")
        sock = repair.create(ici, port_choice=port_choice if isinstance(port_choice, str) else "?")
        handle = secrets.token_hex(8)
        local = proto.hostport(ici.local_addr, sock.getsockname()[1])
        remote = proto.hostport(ici.remote_addr, ici.remote_port)
        try:
            offsets = {"in_offset": ici.in_offset, "out_offset": ici.out_offset,
                       "acked_offset": ici.acked_offset, "send_base": ici.send_base, "recv_base": ici.recv_base}
            waiter = self._hand_over(app, sock, {"handle": handle, **offsets, "kind": "connection",
                                               "state": ici.state, "family": ici.family,
                                               "local": local, "remote": remote,
                                               "app_state": base64.b64encode(state).decode()})
        except BaseException:
            sock.close()      # still in repair mode: the peer sees nothing
            raise
        p = _Pending(sock, waiter)
        # what the application will report about it, known already: a move on before
        # the application's own report arrives still carries its state
        pair = (local, remote)
        with self.lock:
            self.reports[pair] = {"local": pair[0], "remote": pair[1], "in_offset": ici.in_offset,
                                  "app_state": base64.b64encode(state).decode(), "app": app, "time": time.time()}
        if body.get("activate", True):
            self._activate(p)
            return {"ok": True, "handle": handle, "active": True, "state": ici.state, **offsets}
        with self.lock:
            self.pending[handle] = p
        return {"ok": True, "handle": handle, "active": False, "state": ici.state, **offsets}

    @staticmethod
    def _app_and_state(body: dict[str, Any]) -> tuple[str, bytes]:
        app = body.get("app", "default")
        if not isinstance(app, str):
            raise proto.ProtocolError("app", "not a string")
        try:
            state = base64.b64decode(body.get("app_state", ""), validate=True)
        except (ValueError, TypeError) as exc:
            raise proto.ProtocolError("app_state", f"not base64: {exc}") from None
        return app, state

    def _import_unconnected(self, body: dict[str, Any], doc: SocketDoc) -> dict[str, Any]:
        """A listening or bound socket: bound here (free-bind), handed to the
        application; a listener listens on activation."""
        if body.get("local") is not None:
            la, lp = proto.parse_hostport(str(body["local"]), "local")
            doc = dataclasses.replace(doc, local_addr=la, local_port=lp)
        app, state = self._app_and_state(body)
        sock = repair.create_socket(doc)
        handle = secrets.token_hex(8)
        try:
            waiter = self._hand_over(app, sock, {"handle": handle, "kind": doc.kind, "state": doc.kind.upper(),
                                               "family": doc.family, "backlog": doc.backlog,
                                               "local": proto.hostport(doc.local_addr, doc.local_port),
                                               "remote": "", "app_state": base64.b64encode(state).decode()})
        except BaseException:
            sock.close()
            raise
        p = _Pending(sock, waiter)
        if body.get("activate", True):
            self._activate(p)
            return {"ok": True, "handle": handle, "active": True, "kind": doc.kind}
        with self.lock:
            self.pending[handle] = p
        return {"ok": True, "handle": handle, "active": False, "kind": doc.kind}

    def _hand_over(self, app: str, sock: socket.socket, info: dict[str, Any]) -> _Waiter:
        """Give the endpoint to an application waiting in accept_resumed()."""
        q = self._queue(app)
        while True:
            try:
                w = q.get(timeout=self.cfg.app_wait)
            except queue.Empty:
                raise TimeoutError(f"app: no application {app!r} is waiting in accept_resumed() "
                                   f"(waited {self.cfg.app_wait:.0f} s)") from None
            try:
                proto.send_frame(w.conn, proto.make("resumed", info, None), fd=sock.fileno())
                w.conn.settimeout(self.cfg.app_wait)
                raw, _ = proto.recv_frame(w.conn)
                if not isinstance(raw, dict) or raw.get("type") != "ack":
                    raise proto.ProtocolError("type", "the application did not acknowledge")
                return w
            except (OSError, ConnectionError, proto.ProtocolError):
                w.close()         # that application is gone; try the next one waiting
                continue

    def _activate(self, p: _Pending) -> None:
        try:
            repair.activate(p.sock)
            self._notify(p.app, "active", {})
        finally:
            p.sock.close()        # the application holds its own descriptor

    @staticmethod
    def _notify(w: _Waiter, type_: str, body: dict[str, Any]) -> None:
        try:
            proto.send_frame(w.conn, proto.make(type_, body, None))
        except OSError:
            pass
        finally:
            w.close()

    def _queue(self, app: str) -> queue.Queue[_Waiter]:
        with self.lock:
            return self.waiting.setdefault(app, queue.Queue())

    # --- export ------------------------------------------------------------------------------

    def do_export(self, body: dict[str, Any], sock: socket.socket | None = None) -> dict[str, Any]:
        to = proto.parse_hostport(body["to"], "to") if body.get("to") else None
        if sock is None:
            if "pid" in body and "fd" in body:
                pid, fd = body["pid"], body["fd"]
                if not isinstance(pid, int) or not isinstance(fd, int):
                    raise proto.ProtocolError("pid", "pid and fd must be integers")
            elif "local" in body and body.get("remote") is None and body.get("kind") == "listen":
                pid, fd = find_socket(proto.parse_hostport(body["local"], "local"), None)
            elif "local" in body and "remote" in body:
                pid, fd = find_socket(proto.parse_hostport(body["local"], "local"),
                                      proto.parse_hostport(body["remote"], "remote"))
                with self.lock:
                    rep = self.reports.get((body["local"], body["remote"]))
                if rep is not None and "app_state" not in body:
                    body = {**body, "app_state": rep["app_state"], "app": body.get("app", rep["app"])}
            else:
                raise proto.ProtocolError("pid", "name the socket: pid and fd, or local and remote")
            sock = steal_fd(pid, fd)
        try:
            state = base64.b64decode(body.get("app_state", ""), validate=True)
        except (ValueError, TypeError) as exc:
            raise proto.ProtocolError("app_state", f"not base64: {exc}") from None
        try:
            reply = export_socket(sock, key=self.cfg.key, to=to, activate=bool(body.get("activate", True)),
                                  app=str(body.get("app", "default")), app_state=state,
                                  send_base=body.get("send_base"), recv_base=body.get("recv_base"),
                                  port_choice=str(body.get("port_choice", "same")),
                                  dest_local=str(body["to_local"]) if body.get("to_local") else None)
        finally:
            sock.close()          # our duplicate; the owner's descriptor stays (isolated, silent)
        return {**reply, "ok": True}

    # --- the local channel -----------------------------------------------------------------

    def _serve_unix(self, conn: socket.socket) -> None:
        fd = None
        try:
            uid = peer_uid(conn)
            if uid not in (0, os.geteuid()):
                proto.send_frame(conn, proto.make("reply", {"ok": False, "error": "uid not allowed"}, None))
                return
            raw, fd = proto.recv_frame(conn, want_fd=True)
            msg = proto.verify(raw, None, None)
            if msg["type"] == "listen":
                app = msg["body"].get("app", "default")
                w = _Waiter(conn)
                self._queue(str(app)).put(w)
                w.done.wait()     # until an import used (and closed) the channel
                return
            if msg["type"] == "report":
                try:
                    body = self.report(msg["body"])
                except proto.ProtocolError as exc:
                    body = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                proto.send_frame(conn, proto.make("reply", body, None))
                return
            if msg["type"] == "export":
                if fd is None:
                    raise proto.ProtocolError("fd", "an export must carry the socket (SCM_RIGHTS)")
                sock = socket.socket(fileno=fd)
                fd = None
                try:
                    body = self.do_export(msg["body"], sock=sock)
                except (IciError, repair.RepairError, proto.ProtocolError, proto.AgentError, ValueError,
                        OSError) as exc:
                    body = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                proto.send_frame(conn, proto.make("reply", body, None))
                return
            raise proto.ProtocolError("type", f"{msg['type']!r} is not a local request")
        except (proto.ProtocolError, ConnectionError, OSError) as exc:
            try:
                proto.send_frame(conn, proto.make("reply", {"ok": False, "error": str(exc)}, None))
            except OSError:
                pass
        finally:
            if fd is not None:
                os.close(fd)
            conn.close()


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


# --- configuration -------------------------------------------------------------------------

def load_config(path: str | None, *, listen: str | None = None, key: str | None = None,
                key_file: str | None = None, socket_path: str | None = None) -> AgentConfig:
    """Options override the ``[agent]`` table of a TOML file; a bad value names its field."""
    table: dict[str, Any] = {}
    if path:
        import tomllib

        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except OSError as exc:
            raise proto.ProtocolError("config", f"{path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise proto.ProtocolError("config", f"{path}: {exc}") from None
        table = doc.get("agent", {})
        if not isinstance(table, dict):
            raise proto.ProtocolError("agent", "must be a table")
        unknown = sorted(set(table) - {"listen", "key", "key_file", "socket", "window", "app_wait"})
        if unknown:
            raise proto.ProtocolError(f"agent.{unknown[0]}", "unknown key")
    for name in ("listen", "key", "key_file", "socket"):
        if name in table and not isinstance(table[name], str):
            raise proto.ProtocolError(f"agent.{name}", "must be a string")
    listen = listen or table.get("listen")
    cfg = AgentConfig(
        key=proto.load_key(key or table.get("key"), key_file or table.get("key_file")),
        listen=proto.parse_hostport(listen, "agent.listen", 7400) if listen else None,
        socket_path=socket_path or table.get("socket", AgentConfig.socket_path),
    )
    for name in ("window", "app_wait"):
        if name in table:
            v = table[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise proto.ProtocolError(f"agent.{name}", f"{v!r} is not a positive number of seconds")
            setattr(cfg, name, float(v))
    return cfg
