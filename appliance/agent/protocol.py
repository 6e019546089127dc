"""The agent's wire format: length-prefixed JSON, authenticated with HMAC-SHA256.

Theory of operation
-------------------
Every message, between agents and between the gateway and an agent, is one
*frame*: a 4-byte big-endian length, then that many bytes of UTF-8 JSON::

    {"v": 1, "type": "import", "id": "<request id>", "nonce": "<32 hex>",
     "ts": 1763700000.25, "body": {...}, "mac": "hmac-sha256:<64 hex>"}

``mac`` is HMAC-SHA256 under the shared key over the canonical JSON of the
message without ``mac`` (``sort_keys=True``, ``separators=(",", ":")``,
``ensure_ascii=True``: the same canonical form as
``checkpoint.document``).  A receiver checks, in this order: the length
against its limit, the JSON syntax, the version, the MAC (constant-time),
then replay: ``ts`` must be within ``window`` seconds of its clock and the
``nonce`` unseen within that window (a :class:`ReplayGuard` remembers the
nonces for ``2 * window``).  A reply carries the request's ``id`` and is
authenticated the same way, so a forged or replayed reply is refused too.

The local channel between an application (the SDK) and its agent is a
Unix stream socket: the same frames without ``mac`` (the socket file's
permissions and the peer's credentials are the authentication), and a
frame may carry one file descriptor as ``SCM_RIGHTS`` ancillary data on its
first byte.
"""

from __future__ import annotations

import array
import hashlib
import hmac
import json
import os
import secrets
import socket
import struct
import threading
import time
from typing import Any

VERSION = 1
MAX_FRAME = 64 * 1024 * 1024     # an ICI carries up to two socket buffers, base64
_LEN = struct.Struct("!I")


class ProtocolError(ValueError):
    """A frame refused; ``field`` names what was wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def canonical(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def mac(msg: dict[str, Any], key: bytes) -> str:
    body = {k: v for k, v in msg.items() if k != "mac"}
    return "hmac-sha256:" + hmac.new(key, canonical(body), hashlib.sha256).hexdigest()


class ReplayGuard:
    """Refuses a nonce seen before, and a timestamp outside the window."""

    def __init__(self, window: float = 30.0) -> None:
        self.window = window
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def check(self, nonce: Any, ts: Any, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if not isinstance(ts, (int, float)) or isinstance(ts, bool):
            raise ProtocolError("ts", "missing or not a number")
        if abs(now - ts) > self.window:
            raise ProtocolError("ts", f"{now - ts:+.1f} s from this host's clock (window {self.window:.0f} s)")
        if not isinstance(nonce, str) or not 16 <= len(nonce) <= 64:
            raise ProtocolError("nonce", "missing or not 16-64 characters")
        with self._lock:
            for n, t in list(self._seen.items()):
                if now - t > 2 * self.window:
                    del self._seen[n]
            if nonce in self._seen:
                raise ProtocolError("nonce", "already seen: a replayed message")
            self._seen[nonce] = now


def make(type_: str, body: dict[str, Any], key: bytes | None, req_id: str | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"v": VERSION, "type": type_, "id": req_id or secrets.token_hex(8),
                           "nonce": secrets.token_hex(16), "ts": time.time(), "body": body}
    if key is not None:
        msg["mac"] = mac(msg, key)
    return msg


def verify(msg: Any, key: bytes | None, guard: ReplayGuard | None) -> dict[str, Any]:
    """The message if it is well-formed, authentic and fresh; else ProtocolError."""
    if not isinstance(msg, dict):
        raise ProtocolError("message", "not a JSON object")
    if msg.get("v") != VERSION:
        raise ProtocolError("v", f"{msg.get('v')!r} is not version {VERSION}")
    if key is not None:
        got = msg.get("mac")
        if not isinstance(got, str) or not hmac.compare_digest(got, mac(msg, key)):
            raise ProtocolError("mac", "bad or missing HMAC: wrong key or altered message")
    if not isinstance(msg.get("type"), str):
        raise ProtocolError("type", "missing")
    if not isinstance(msg.get("body"), dict):
        raise ProtocolError("body", "missing or not an object")
    if guard is not None:
        guard.check(msg.get("nonce"), msg.get("ts"))
    return msg


# --- framing ---------------------------------------------------------------------------

def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("peer closed the channel" if not buf else "peer closed mid-frame")
        buf += chunk
    return bytes(buf)


def send_frame(sock: socket.socket, msg: dict[str, Any], fd: int | None = None) -> None:
    data = json.dumps(msg, separators=(",", ":")).encode()
    frame = _LEN.pack(len(data)) + data
    if fd is None:
        sock.sendall(frame)
        return
    fds = array.array("i", [fd])
    sent = sock.sendmsg([frame[:1]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    sock.sendall(frame[sent:])


def recv_frame(sock: socket.socket, max_frame: int = MAX_FRAME,
               want_fd: bool = False) -> tuple[Any, int | None]:
    """One frame's JSON (and the descriptor that came with it, if asked for)."""
    fd: int | None = None
    if want_fd:
        first, anc, _flags, _addr = sock.recvmsg(1, socket.CMSG_SPACE(4))
        if not first:
            raise ConnectionError("peer closed the channel")
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(data[: len(data) - len(data) % 4])
                for extra in got[1:]:
                    os.close(extra)
                fd = got[0] if got else None
        head = first + _recv_exact(sock, 3)
    else:
        head = _recv_exact(sock, 4)
    try:
        (n,) = _LEN.unpack(head)
        if n > max_frame:
            raise ProtocolError("length", f"{n} bytes exceed the limit {max_frame}")
        try:
            return json.loads(_recv_exact(sock, n)), fd
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProtocolError("json", f"not JSON: {exc}") from None
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise


# --- a request over TCP ------------------------------------------------------------------

def hostport(addr: str, port: int) -> str:
    """``ADDR:PORT``, ``[ADDR]:PORT`` for IPv6 (RFC 3986): how the protocol writes an endpoint."""
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def parse_hostport(text: str, field: str = "address", default_port: int | None = None) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPV6]:PORT`` (or ``IPV6:PORT`` with the port after the last colon)."""
    if not isinstance(text, str):
        raise ProtocolError(field, f"{text!r} is not HOST:PORT")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ProtocolError(field, f"{text!r} is not [IPV6]:PORT")
        if not rest:
            if default_port is None:
                raise ProtocolError(field, f"{text!r} has no port")
            rest = f":{default_port}"
        text = f"{host}:{rest[1:]}"
        if not host:
            raise ProtocolError(field, f"{text!r} is not HOST:PORT")
    host, sep, port = text.rpartition(":")
    if not sep:
        if default_port is None:
            raise ProtocolError(field, f"{text!r} is not HOST:PORT")
        host, port = text, str(default_port)
    try:
        p = int(port)
    except ValueError:
        raise ProtocolError(field, f"{text!r}: port {port!r} is not a number") from None
    if not host or not 1 <= p <= 65535:
        raise ProtocolError(field, f"{text!r} is not HOST:PORT")
    return host, p


def request(addr: tuple[str, int], type_: str, body: dict[str, Any], key: bytes,
            timeout: float = 30.0, guard: ReplayGuard | None = None) -> dict[str, Any]:
    """Send one authenticated request to an agent and return its verified reply body.

    A reply with ``ok: false`` raises :class:`AgentError` with its message.
    """
    msg = make(type_, body, key)
    with socket.create_connection(addr, timeout=timeout) as s:
        send_frame(s, msg)
        raw, _ = recv_frame(s)
    reply = verify(raw, key, guard or ReplayGuard())
    if reply.get("id") != msg["id"]:
        raise ProtocolError("id", "the reply answers another request")
    rb = reply["body"]
    if not rb.get("ok"):
        raise AgentError(str(rb.get("error", "the agent refused without a reason")))
    return rb


class AgentError(RuntimeError):
    """The remote agent refused or failed; the message is its own."""


def load_key(key: str | None = None, key_file: str | None = None) -> bytes:
    """The shared key: given directly, or the first line of a file (at least 16 bytes)."""
    if key is None and key_file is None:
        raise ProtocolError("key", "no shared key: pass --key-file (or key/key_file in the config)")
    if key is None:
        try:
            with open(key_file or "", "rb") as f:
                raw = f.read().strip()
        except OSError as exc:
            raise ProtocolError("key_file", f"{key_file}: {exc.strerror}") from None
    else:
        raw = key.encode()
    if len(raw) < 16:
        raise ProtocolError("key", f"{len(raw)} bytes: a shared key needs at least 16")
    return raw
