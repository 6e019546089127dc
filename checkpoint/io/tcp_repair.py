"""tcpcp's high-level API on mainline Linux TCP_REPAIR: get, create, activate.

Theory of operation
-------------------
tcpcp (Almesberger 2004) needed a kernel patch (``TCP_ICI``); since Linux
3.5 the same power is in ``TCP_REPAIR`` and its companions, which CRIU's
libsoccr uses (``soccr/soccr.c`` is the reference for the order of calls
below).

``get(sock)`` puts a connected socket into repair mode.  From then on the
kernel sends nothing on it (no data, no ACK, no window update), and
``close()`` drops it silently: no FIN, no RST.  That is tcpcp's
*isolation* on the sending side.  Incoming segments are still processed by
the kernel, so whoever moves the connection must keep the peer's packets
away from the origin while it is paused (the gateway holds them; the
tests re-route them).  It then reads, without consuming anything:

* the state, options and window scales (``TCP_INFO``), the MSS clamp
  (``TCP_MAXSEG``), the timestamp clock with the connection's offset
  (``TCP_TIMESTAMP``) and the windows (``TCP_REPAIR_WINDOW``);
* the queue lengths (``SIOCOUTQ``: written but unacknowledged,
  ``SIOCOUTQNSD``: written but never sent, ``SIOCINQ``: received, unread);
* each queue's bytes and sequence number: ``TCP_REPAIR_QUEUE`` selects
  the queue, ``recv(MSG_PEEK)`` copies it, ``TCP_QUEUE_SEQ`` gives
  ``write_seq`` (send) and ``rcv_nxt`` (receive).

``create(ici)`` first runs the sanity checks (:func:`check_ici`, pure, no
system call before it), then on a fresh (or the caller's pre-bound)
socket: repair on, bind (tcpcp 2.1's three local-port choices), set each
queue's starting sequence number, ``connect()`` (in repair mode it sends no
SYN and lands in ESTABLISHED), ``TCP_REPAIR_OPTIONS`` (SACK, window
scales, timestamps, MSS), ``TCP_TIMESTAMP`` (a per-connection offset: the
value the peer saw plus the ticks since, so its PAWS check holds), the
receive queue and the sent-but-unacknowledged bytes (written in repair
mode they are queued as *already sent*: snd_nxt ends where the origin's
was, so every ACK the peer may send is valid), then ``TCP_REPAIR_WINDOW``.
The socket stays in repair mode: still silent.

``activate(sock)`` leaves repair mode with ``TCP_REPAIR_OFF``, on which the
kernel sends a window probe (an ACK with sequence ``snd_una - 1``) that
makes the peer answer with its current ACK and window; then it writes
the bytes that were never sent.  Lost in-flight bytes are retransmitted by
the normal timers.

Errors: an ``EPERM`` from any repair option is
:class:`RepairPermissionError` ("needs CAP_NET_ADMIN"); any other refusal
is :class:`RepairError` naming the call that failed.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import socket
import struct
import time

from ..repair_ici import (
    ICI_VERSION,
    Ici,
    IciError,
    Limits,
    check_ici,
    ici_from_record,
    record_fields_from_ici,
)
from ..seqnum import MASK, seq_add

# include/uapi/linux/tcp.h
TCP_MAXSEG = 2
TCP_INFO = 11
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29
TCP_REPAIR_ON = 1
TCP_REPAIR_OFF = 0            # leaves repair mode and sends a window probe
TCP_REPAIR_OFF_NO_WP = -1     # leaves it silently
TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_SEND_QUEUE = 0, 1, 2
TCPOPT_MAXSEG, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4
SIOCINQ = 0x541B              # FIONREAD
SIOCOUTQ = 0x5411             # TIOCOUTQ
SIOCOUTQNSD = 0x894B
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33

TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
              6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING"}

_REPAIR_WINDOW = struct.Struct("=IIIII")   # snd_wl1 snd_wnd max_window rcv_wnd rcv_wup
_REPAIR_OPT = struct.Struct("=II")         # opt_code opt_val
_CHUNK = 256 * 1024


class RepairError(OSError):
    """The kernel refused a TCP_REPAIR step; the message names the call."""


class RepairPermissionError(RepairError, PermissionError):
    """TCP_REPAIR needs CAP_NET_ADMIN in the socket's network namespace."""


class RepairedSocket(socket.socket):
    """A socket made by :func:`create`: still in repair mode until :func:`activate`.

    Carries the bytes that were written but never sent (they go out on
    activation) and the ICI it was made from (``stream offsets``).
    """

    ici: Ici | None = None
    unsent: bytes = b""
    activated: bool = False
    sndbuf_after: int | None = None   # SO_SNDBUFFORCE once the queues are in


def _fail(call: str, exc: OSError) -> RepairError:
    if exc.errno == errno.EPERM:
        return RepairPermissionError(exc.errno, f"{call}: operation not permitted: TCP_REPAIR needs "
                                                "CAP_NET_ADMIN (run as root or grant the capability)")
    return RepairError(exc.errno, f"{call} refused by the kernel: {os.strerror(exc.errno or 0)}")


def _setint(sock: socket.socket, opt: int, value: int, name: str) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, opt, struct.pack("=i", value))
    except OSError as exc:
        raise _fail(f"setsockopt({name}={value})", exc) from None


def _setbuf(sock: socket.socket, opt: int, value: bytes, name: str) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, opt, value)
    except OSError as exc:
        raise _fail(f"setsockopt({name})", exc) from None


def _getint(sock: socket.socket, opt: int, name: str) -> int:
    try:
        value: int = struct.unpack("=i", sock.getsockopt(socket.IPPROTO_TCP, opt, 4))[0]
        return value
    except OSError as exc:
        raise _fail(f"getsockopt({name})", exc) from None


def _ioctl(sock: socket.socket, req: int, name: str) -> int:
    try:
        value: int = struct.unpack("=i", fcntl.ioctl(sock.fileno(), req, b"\0" * 4))[0]
        return value
    except OSError as exc:
        raise _fail(f"ioctl({name})", exc) from None


def tcp_info(sock: socket.socket) -> dict[str, int]:
    """The fields of ``struct tcp_info`` this module uses."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 232)
    wscales = raw[6]
    out = {"state": raw[0], "options": raw[5], "snd_wscale": wscales & 15, "rcv_wscale": wscales >> 4,
           "snd_mss": struct.unpack_from("=I", raw, 16)[0], "rcv_mss": struct.unpack_from("=I", raw, 20)[0]}
    if len(raw) >= 136:
        out["bytes_acked"], out["bytes_received"] = struct.unpack_from("=QQ", raw, 120)
    return out


def in_repair(sock: socket.socket) -> bool:
    """Whether the socket is in repair mode (``getsockopt(TCP_REPAIR)``)."""
    return _getint(sock, TCP_REPAIR, "TCP_REPAIR") != 0


def _peek_queue(sock: socket.socket, queue: int, length: int, name: str) -> tuple[int, bytes]:
    _setint(sock, TCP_REPAIR_QUEUE, queue, "TCP_REPAIR_QUEUE")
    seq = _getint(sock, TCP_QUEUE_SEQ, f"TCP_QUEUE_SEQ ({name})") & MASK
    data = b""
    if length:
        try:
            data = sock.recv(length + 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError as exc:
            raise _fail(f"recv(MSG_PEEK) of the {name} queue", exc) from None
        if len(data) != length:
            raise RepairError(errno.EIO, f"the {name} queue changed while read: {len(data)} bytes, "
                                         f"expected {length} (is the peer's traffic held?)")
    return seq, data


def get(sock: socket.socket, *, send_base: int | None = None, recv_base: int | None = None) -> Ici:
    """Isolate a connected socket and return its ICI (tcpcp's ``tcpcp_get``).

    The socket is left in repair mode: nothing is sent on it any more and
    closing it sends no FIN or RST.  ``send_base``/``recv_base`` (sequence
    numbers of stream byte 0) default to what ``TCP_INFO``'s byte counters
    imply, which is right for a socket that was accepted or connected
    normally; pass them for a socket made by :func:`create` (its counters
    restart there — :class:`RepairedSocket` remembers them).
    """
    info = tcp_info(sock)
    state = TCP_STATES.get(info["state"], str(info["state"]))
    if state != "ESTABLISHED":
        raise IciError("state", f"the socket is {state}: only ESTABLISHED connections can be taken")
    _setint(sock, TCP_REPAIR, TCP_REPAIR_ON, "TCP_REPAIR")
    try:
        taken_at = time.time()
        info = tcp_info(sock)
        outq = _ioctl(sock, SIOCOUTQ, "SIOCOUTQ")
        unsent_len = _ioctl(sock, SIOCOUTQNSD, "SIOCOUTQNSD")
        inq = _ioctl(sock, SIOCINQ, "SIOCINQ")
        mss = _getint(sock, TCP_MAXSEG, "TCP_MAXSEG")
        opts = info["options"]
        ts_val = None
        if opts & TCPI_OPT_TIMESTAMPS:
            ts_val = _getint(sock, TCP_TIMESTAMP, "TCP_TIMESTAMP") & MASK
        try:
            win = _REPAIR_WINDOW.unpack(sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW,
                                                         _REPAIR_WINDOW.size))
        except OSError as exc:
            raise _fail("getsockopt(TCP_REPAIR_WINDOW)", exc) from None
        rcv_nxt, recv_q = _peek_queue(sock, TCP_RECV_QUEUE, inq, "receive")
        write_seq, send_q = _peek_queue(sock, TCP_SEND_QUEUE, outq, "send")
        _setint(sock, TCP_REPAIR_QUEUE, TCP_NO_QUEUE, "TCP_REPAIR_QUEUE")
        sent_len = outq - unsent_len
        snd_una = seq_add(write_seq, -outq)
        snd_nxt = seq_add(snd_una, sent_len)
        if isinstance(sock, RepairedSocket) and sock.ici is not None:
            send_base = sock.ici.send_base if send_base is None else send_base
            recv_base = sock.ici.recv_base if recv_base is None else recv_base
        elif "bytes_acked" in info:
            # a normal socket's counters start at the handshake: bytes_acked
            # counts stream bytes acknowledged, bytes_received those received
            if send_base is None:
                send_base = seq_add(snd_una, -info["bytes_acked"])
            if recv_base is None:
                recv_base = seq_add(rcv_nxt, -info["bytes_received"])
        local = sock.getsockname()
        remote = sock.getpeername()
        wscale = bool(opts & TCPI_OPT_WSCALE)
        return Ici(
            local_addr=local[0], local_port=local[1], remote_addr=remote[0], remote_port=remote[1],
            snd_una=snd_una, snd_nxt=snd_nxt, rcv_nxt=rcv_nxt, mss=mss,
            snd_wscale=info["snd_wscale"] if wscale else None,
            rcv_wscale=info["rcv_wscale"] if wscale else None,
            sack_permitted=bool(opts & TCPI_OPT_SACK),
            timestamps=ts_val is not None, ts_val=ts_val,
            ts_hz=1_000_000 if ts_val is not None and ts_val & 1 else 1000,
            taken_at=taken_at,
            snd_wl1=win[0], snd_wnd=win[1], max_window=win[2], rcv_wnd=win[3], rcv_wup=win[4],
            sent_queue=send_q[:sent_len], unsent_queue=send_q[sent_len:], recv_queue=recv_q,
            send_base=send_base, recv_base=recv_base,
        )
    except BaseException:
        # leave the connection as we found it (silently: no probe)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, struct.pack("=i", TCP_REPAIR_OFF_NO_WP))
        except OSError:
            pass
        raise


def _write_queue(sock: socket.socket, queue: int, data: bytes, name: str) -> None:
    _setint(sock, TCP_REPAIR_QUEUE, queue, "TCP_REPAIR_QUEUE")
    view = memoryview(data)
    chunk = _CHUNK
    while view:
        try:
            # never block: in repair mode nothing drains the queue, a full one would hang
            n = sock.send(view[:chunk], socket.MSG_DONTWAIT)
        except BlockingIOError:
            raise RepairError(errno.ENOBUFS, f"the {name} queue does not fit the socket's buffer "
                                             f"({len(view)} of {len(data)} bytes left)") from None
        except OSError as exc:
            # the receive queue is restored as one linear skb per call: a large
            # one may not be allocatable; smaller pieces may (CRIU does the same)
            if exc.errno == errno.ENOMEM and chunk > 1024:
                chunk //= 2
                continue
            raise _fail(f"send() into the {name} queue ({len(view)} bytes left)", exc) from None
        view = view[n:]


def create(ici: Ici, *, port_choice: str = "same", sock: socket.socket | None = None,
           local_addr: str | None = None, limits: Limits | None = None) -> RepairedSocket:
    """A socket re-created from ``ici``, in repair mode (tcpcp's ``tcpcp_create``).

    ``port_choice`` (tcpcp 2.1): ``"same"`` binds the ICI's local port,
    ``"prebound"`` uses ``sock``, which the caller bound already (the ICI's
    port is ignored), ``"any"`` lets the kernel pick a free port.
    ``local_addr`` overrides the ICI's local address (it must be local).
    Nothing is sent until :func:`activate`.
    """
    if port_choice == "prebound":
        if sock is None:
            raise ValueError("port_choice 'prebound' needs sock=, a bound socket")
    elif sock is not None:
        raise ValueError(f"sock= is only for port_choice 'prebound' (got {port_choice!r})")
    check_ici(ici if local_addr is None else dataclasses.replace(ici, local_addr=local_addr),
              limits if limits is not None else Limits.read(), port_choice)
    if sock is not None:
        if sock.family != socket.AF_INET or sock.type != socket.SOCK_STREAM:
            raise ValueError("sock: a prebound socket must be AF_INET/SOCK_STREAM")
        bound = sock.getsockname()
        if bound[1] == 0:
            raise ValueError("sock: the prebound socket is not bound (bind it first)")
        s = RepairedSocket(socket.AF_INET, socket.SOCK_STREAM, fileno=os.dup(sock.fileno()))
        sock.close()
    else:
        s = RepairedSocket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        _setint(s, TCP_REPAIR, TCP_REPAIR_ON, "TCP_REPAIR")
        if port_choice != "prebound":
            addr = local_addr or ici.local_addr
            port = ici.local_port if port_choice == "same" else 0
            try:
                s.bind((addr, port))
            except OSError as exc:
                raise _fail(f"bind({addr}:{port})", exc) from None
        # The queues are written in one go and nothing drains them before
        # activation (the peer's ACKs may still be held), so the buffers must
        # hold them whole: a new socket's are small.  The kernel doubles the
        # value given; check_ici() bounded the queues by the system's maxima.
        lim = limits if limits is not None else Limits.read()
        total = len(ici.sent_queue) + len(ici.unsent_queue)
        forced_sndbuf = total > 64 * 1024
        if forced_sndbuf:
            s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, min(total + total // 2 + 65536, lim.wmem_max))
        if len(ici.recv_queue) > 64 * 1024:
            n = len(ici.recv_queue)
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, min(n + n // 2 + 65536, lim.rmem_max))
        _setint(s, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE, "TCP_REPAIR_QUEUE")
        _setint(s, TCP_QUEUE_SEQ, _signed(ici.copied_seq), "TCP_QUEUE_SEQ (receive)")
        _setint(s, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, "TCP_REPAIR_QUEUE")
        _setint(s, TCP_QUEUE_SEQ, _signed(ici.snd_una), "TCP_QUEUE_SEQ (send)")
        # the MSS clamp before connect(): connect() computes the segment size
        # from it; set only later (TCP_REPAIR_OPTIONS) it would not be applied
        # until the path MTU changes, and the connection would crawl at 524-byte segments
        # (TCP_MAXSEG takes at most 32767, MAX_TCP_WINDOW: loopback's 65495 is cut)
        _setint(s, TCP_MAXSEG, min(ici.mss, 32767), "TCP_MAXSEG")
        try:
            s.connect((ici.remote_addr, ici.remote_port))
        except OSError as exc:
            raise _fail(f"connect({ici.remote_addr}:{ici.remote_port}) in repair mode", exc) from None
        opts = []
        if ici.sack_permitted:
            opts.append(_REPAIR_OPT.pack(TCPOPT_SACK_PERM, 0))
        if ici.snd_wscale is not None and ici.rcv_wscale is not None:
            opts.append(_REPAIR_OPT.pack(TCPOPT_WINDOW, ici.snd_wscale | (ici.rcv_wscale << 16)))
        if ici.timestamps:
            opts.append(_REPAIR_OPT.pack(TCPOPT_TIMESTAMP, 0))
        opts.append(_REPAIR_OPT.pack(TCPOPT_MAXSEG, ici.mss))
        _setbuf(s, TCP_REPAIR_OPTIONS, b"".join(opts), "TCP_REPAIR_OPTIONS")
        if ici.timestamps:
            ts = ici.ts_now()
            assert ts is not None
            _setint(s, TCP_TIMESTAMP, _signed(ts), "TCP_TIMESTAMP")
        if ici.recv_queue:
            _write_queue(s, TCP_RECV_QUEUE, ici.recv_queue, "receive")
        if ici.sent_queue:
            _write_queue(s, TCP_SEND_QUEUE, ici.sent_queue, "send")
        if ici.snd_wl1 is not None:
            _setbuf(s, TCP_REPAIR_WINDOW,
                    _REPAIR_WINDOW.pack(ici.snd_wl1, ici.snd_wnd, ici.max_window, ici.rcv_wnd, ici.rcv_wup),
                    "TCP_REPAIR_WINDOW")
        _setint(s, TCP_REPAIR_QUEUE, TCP_NO_QUEUE, "TCP_REPAIR_QUEUE")
    except BaseException:
        s.close()   # still in repair mode: closes silently
        raise
    s.ici = ici
    s.unsent = bytes(ici.unsent_queue)
    s.sndbuf_after = lim.wmem_max // 2 if forced_sndbuf else None
    return s


def activate(sock: socket.socket, unsent: bytes | None = None) -> None:
    """Leave repair mode and wake the peer (tcpcp's ``tcpcp_activate``).

    The kernel sends a window probe on ``TCP_REPAIR_OFF``; the bytes that
    were written but never sent at the origin follow.  ``unsent`` is for a
    plain socket object that shares the descriptor of the one ``create()``
    returned (a :class:`RepairedSocket` carries its own).
    """
    if unsent is None:
        unsent = sock.unsent if isinstance(sock, RepairedSocket) else b""
    _setint(sock, TCP_REPAIR, TCP_REPAIR_OFF, "TCP_REPAIR")
    if unsent:
        # create() sized the buffer for them: this does not wait for the peer
        sock.sendall(unsent)
    if isinstance(sock, RepairedSocket):
        sock.activated = True
        sock.unsent = b""
        if sock.sndbuf_after is not None:
            # back to the system's largest autotuned size, so the application
            # cannot queue more than the next move may carry
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, sock.sndbuf_after)


def release(sock: socket.socket) -> None:
    """Close an isolated (repair-mode) socket: the peer sees nothing."""
    sock.close()


def _signed(v: int) -> int:
    """A u32 as the C ``int`` the socket option takes."""
    v &= MASK
    return v - (1 << 32) if v >= 1 << 31 else v


__all__ = ["ICI_VERSION", "Ici", "IciError", "Limits", "RepairError", "RepairPermissionError",
           "RepairedSocket", "activate", "check_ici", "create", "get", "ici_from_record", "in_repair",
           "record_fields_from_ici", "release", "tcp_info"]
