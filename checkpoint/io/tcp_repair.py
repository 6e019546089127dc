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

Families and states: AF_INET and AF_INET6 alike; ESTABLISHED and the
closing states, rebuilt as CRIU does (ESTABLISHED in repair mode, then our
FIN re-applied with ``shutdown()`` and the peer's injected as a segment:
:func:`_restore_fins`); listening and bound sockets travel as a
:class:`SocketDoc` (:func:`get_socket`, :func:`create_socket`).

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
    CONNECTED_STATES,
    ICI_VERSION,
    SOCKET_OPTIONS,
    SocketDoc,
    check_socket_doc,
    Ici,
    IciError,
    Limits,
    check_ici,
    ici_from_record,
    record_fields_from_ici,
)
from ..seqnum import MASK, seq_add, seq_diff

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


def _unmap(addr: str) -> str:
    """``::ffff:192.0.2.10`` (an IPv4 peer of a dual-stack socket) -> ``192.0.2.10``."""
    if addr.lower().startswith("::ffff:") and "." in addr:
        return addr[7:]
    return addr


def _endpoint_family(sock: socket.socket, local: str, remote: str | None) -> str:
    if sock.family == socket.AF_INET:
        return "ipv4"
    if sock.family != socket.AF_INET6:
        raise ValueError(f"sock: family {sock.family!r} is not AF_INET or AF_INET6")
    v4 = ":" not in _unmap(local) and (remote is None or ":" not in _unmap(remote))
    return "ipv4" if v4 else "ipv6"


def get(sock: socket.socket, *, send_base: int | None = None, recv_base: int | None = None) -> Ici:
    """Isolate a connected socket and return its ICI (tcpcp's ``tcpcp_get``).

    The socket is left in repair mode: nothing is sent on it any more and
    closing it sends no FIN or RST.  ``send_base``/``recv_base`` (sequence
    numbers of stream byte 0) default to what ``TCP_INFO``'s byte counters
    imply, which is right for a socket that was accepted or connected
    normally; pass them for a socket made by :func:`create` (its counters
    restart there — :class:`RepairedSocket` remembers them).

    States: ESTABLISHED and the closing ones a socket can still be held in
    (FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING).  As CRIU's
    libsoccr does, the FINs are taken out of the sequence numbers and
    queue lengths (a FIN occupies one sequence number but is no byte) and
    recorded as ``fin`` (ours: unsent, sent, acked) and ``peer_fin``.
    An IPv4 peer of a dual-stack AF_INET6 socket (``::ffff:a.b.c.d``) is
    recorded as family ipv4 with plain IPv4 addresses.
    """
    info = tcp_info(sock)
    state = TCP_STATES.get(info["state"], str(info["state"]))
    if state not in CONNECTED_STATES:
        raise IciError("state", f"the socket is {state}: a connection is taken in one of "
                                f"{', '.join(CONNECTED_STATES)} (listening and bound sockets: get_socket())")
    _setint(sock, TCP_REPAIR, TCP_REPAIR_ON, "TCP_REPAIR")
    try:
        taken_at = time.time()
        info = tcp_info(sock)
        state = TCP_STATES.get(info["state"], str(info["state"]))
        if state not in CONNECTED_STATES:
            raise IciError("state", f"the socket became {state} while taken")
        fins, peer_fin = CONNECTED_STATES[state]
        outq = _ioctl(sock, SIOCOUTQ, "SIOCOUTQ")
        unsent_len = _ioctl(sock, SIOCOUTQNSD, "SIOCOUTQNSD")
        inq = _ioctl(sock, SIOCINQ, "SIOCINQ")      # data only: the kernel leaves a FIN out
        mss = _getint(sock, TCP_MAXSEG, "TCP_MAXSEG")
        opts = info["options"]
        ts_val = None
        if opts & TCPI_OPT_TIMESTAMPS:
            ts_val = _getint(sock, TCP_TIMESTAMP, "TCP_TIMESTAMP") & MASK
        try:
            win = list(_REPAIR_WINDOW.unpack(sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW,
                                                              _REPAIR_WINDOW.size)))
        except OSError as exc:
            raise _fail("getsockopt(TCP_REPAIR_WINDOW)", exc) from None
        fin = "none"
        if fins != ("none",):
            # our FIN is the last sequence number of the send queue: outq and
            # the unsent count include it while it is unacknowledged / unsent
            if outq == 0:
                fin = "acked"
            else:
                outq -= 1
                if unsent_len > 0:
                    fin = "unsent"
                    unsent_len -= 1
                else:
                    fin = "sent"
        rcv_nxt, recv_q = _peek_queue(sock, TCP_RECV_QUEUE, inq, "receive")
        write_seq, send_q = _peek_queue(sock, TCP_SEND_QUEUE, outq, "send")
        _setint(sock, TCP_REPAIR_QUEUE, TCP_NO_QUEUE, "TCP_REPAIR_QUEUE")
        if fin != "none":
            write_seq = seq_add(write_seq, -1)
        if peer_fin:
            # rcv_nxt counts the peer's FIN; the window record may too (CRIU: rcv_wup-1, rcv_wnd+1)
            rcv_nxt = seq_add(rcv_nxt, -1)
            if seq_diff(win[4], rcv_nxt) > 0:
                win[4] = rcv_nxt
                win[3] += 1
        sent_len = outq - unsent_len
        snd_una = seq_add(write_seq, -outq)
        snd_nxt = seq_add(snd_una, sent_len)
        if isinstance(sock, RepairedSocket) and sock.ici is not None:
            send_base = sock.ici.send_base if send_base is None else send_base
            recv_base = sock.ici.recv_base if recv_base is None else recv_base
        elif "bytes_acked" in info:
            # a normal socket's counters start at the handshake: bytes_acked
            # counts stream bytes acknowledged, bytes_received those received
            # (both count a FIN: they follow snd_una and rcv_nxt, which do)
            if send_base is None:
                send_base = seq_add(snd_una, -(info["bytes_acked"] - (1 if fin == "acked" else 0)))
            if recv_base is None:
                recv_base = seq_add(rcv_nxt, -(info["bytes_received"] - (1 if peer_fin else 0)))
        local = sock.getsockname()
        remote = sock.getpeername()
        family = _endpoint_family(sock, local[0], remote[0])
        wscale = bool(opts & TCPI_OPT_WSCALE)
        return Ici(
            local_addr=_unmap(local[0]), local_port=local[1], remote_addr=_unmap(remote[0]), remote_port=remote[1],
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
            state=state, family=family, fin=fin, peer_fin=peer_fin,
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
    af = socket.AF_INET6 if ici.family == "ipv6" else socket.AF_INET
    if sock is not None:
        if sock.family != af or sock.type != socket.SOCK_STREAM:
            raise ValueError(f"sock: a prebound socket for family {ici.family} must be "
                             f"{'AF_INET6' if af == socket.AF_INET6 else 'AF_INET'}/SOCK_STREAM")
        bound = sock.getsockname()
        if bound[1] == 0:
            raise ValueError("sock: the prebound socket is not bound (bind it first)")
        s = RepairedSocket(af, socket.SOCK_STREAM, fileno=os.dup(sock.fileno()))
        sock.close()
    else:
        s = RepairedSocket(af, socket.SOCK_STREAM)
    try:
        _setint(s, TCP_REPAIR, TCP_REPAIR_ON, "TCP_REPAIR")
        if port_choice != "prebound":
            addr = local_addr or ici.local_addr
            port = ici.local_port if port_choice == "same" else 0
            _freebind(s, transparent=True)
            try:
                s.bind((addr, port))
            except OSError as exc:
                raise _fail(f"bind({_hostport(addr, port)})", exc) from None
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
            raise _fail(f"connect({_hostport(ici.remote_addr, ici.remote_port)}) in repair mode", exc) from None
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
        _restore_fins(s, ici)
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
    were written but never sent at the origin follow, then our FIN if it
    was among them (``fin == "unsent"``).  A :class:`PassedSocket` from
    :func:`create_socket` starts listening (kind ``listen``).  ``unsent`` is for a
    plain socket object that shares the descriptor of the one ``create()``
    returned (a :class:`RepairedSocket` carries its own).
    """
    if unsent is None:
        unsent = sock.unsent if isinstance(sock, RepairedSocket) else b""
    if isinstance(sock, PassedSocket):
        if sock.doc.kind == "listen" and not sock.activated:
            sock.listen(sock.doc.backlog)
        sock.activated = True
        return
    _setint(sock, TCP_REPAIR, TCP_REPAIR_OFF, "TCP_REPAIR")
    if unsent:
        # create() sized the buffer for them: this does not wait for the peer
        sock.sendall(unsent)
    if isinstance(sock, RepairedSocket) and sock.ici is not None and sock.ici.fin == "unsent" \
            and not sock.activated:
        # our FIN was queued behind bytes never sent: it follows them now
        sock.shutdown(socket.SHUT_WR)
    if isinstance(sock, RepairedSocket):
        sock.activated = True
        sock.unsent = b""
        if sock.sndbuf_after is not None:
            # back to the system's largest autotuned size, so the application
            # cannot queue more than the next move may carry
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, sock.sndbuf_after)


# --- the FINs of the closing states (CRIU's libsoccr, soccr.c: libsoccr_restore) ---------

IP_FREEBIND, IP_TRANSPARENT = 15, 19          # SOL_IP
IPV6_FREEBIND, IPV6_TRANSPARENT = 78, 75      # SOL_IPV6
_FIN_FIRST = ("FIN_WAIT1", "FIN_WAIT2", "CLOSING")   # our FIN went before the peer's


def _hostport(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _freebind(s: socket.socket, transparent: bool = False) -> None:
    """Let ``bind()`` take an address that is not (yet) local: a move binds on
    the destination before the address (or the route) follows.  A socket
    that also connects from it needs ``IP_TRANSPARENT``/``IPV6_TRANSPARENT``
    (the route lookup refuses a foreign source otherwise: ENETUNREACH);
    both need CAP_NET_ADMIN, as TCP_REPAIR does."""
    v6 = s.family == socket.AF_INET6
    level = socket.IPPROTO_IPV6 if v6 else socket.IPPROTO_IP
    opts = [("IPV6_FREEBIND" if v6 else "IP_FREEBIND", IPV6_FREEBIND if v6 else IP_FREEBIND)]
    if transparent:
        opts.append(("IPV6_TRANSPARENT" if v6 else "IP_TRANSPARENT", IPV6_TRANSPARENT if v6 else IP_TRANSPARENT))
    for name, opt in opts:
        try:
            s.setsockopt(level, opt, 1)
        except OSError as exc:
            raise _fail(f"setsockopt({name})", exc) from None


def _state(s: socket.socket) -> str:
    return TCP_STATES.get(tcp_info(s)["state"], "?")


def _shutdown_as_sent(s: socket.socket) -> None:
    """Our FIN, queued as *already sent* (CRIU's restore_fin_in_snd_queue with
    the send queue selected): in repair mode nothing goes out, the FIN
    takes its sequence number after the data and is retransmitted by the
    normal timers if the peer never got it; the peer's ACK for it (the
    answer to activate()'s window probe) completes the state."""
    _setint(s, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, "TCP_REPAIR_QUEUE")
    try:
        s.shutdown(socket.SHUT_WR)
    except OSError as exc:
        raise _fail("shutdown(SHUT_WR) in repair mode", exc) from None
    finally:
        _setint(s, TCP_REPAIR_QUEUE, TCP_NO_QUEUE, "TCP_REPAIR_QUEUE")


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def peer_segment(ici: Ici, local: tuple[str, int], *, fin: bool = True, ack: int | None = None) -> bytes:
    """A segment from the peer as an IP packet addressed to the re-created socket.

    Sequence ``rcv_nxt`` (a FIN follows the data), acknowledging ``ack``
    (default ``snd_una``: nothing new), the peer's window as it announced
    it; no options (a segment without timestamps passes PAWS, and one with
    a made-up TSval would poison ``ts_recent``)."""
    src, dst = ici.remote_addr, local[0]
    v6 = ici.family == "ipv6"
    af = socket.AF_INET6 if v6 else socket.AF_INET
    saddr, daddr = socket.inet_pton(af, src), socket.inet_pton(af, dst)
    wnd = min(0xFFFF, ici.snd_wnd >> (ici.snd_wscale or 0))
    ack = ici.snd_una if ack is None else ack
    tcp = struct.pack("!HHIIBBHHH", ici.remote_port, local[1], ici.rcv_nxt & MASK, ack & MASK,
                      5 << 4, 0x11 if fin else 0x10, wnd, 0, 0)     # FIN|ACK or ACK
    if v6:
        pseudo = saddr + daddr + struct.pack("!IxxxB", len(tcp), socket.IPPROTO_TCP)
    else:
        pseudo = saddr + daddr + struct.pack("!xBH", socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _csum(pseudo + tcp)) + tcp[18:]
    if v6:
        return struct.pack("!IHBB", 6 << 28, len(tcp), socket.IPPROTO_TCP, 64) + saddr + daddr + tcp
    # IPv4, DF; the kernel fills in the id and the header checksum (IP_HDRINCL)
    return struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, socket.IPPROTO_TCP, 0) \
        + saddr + daddr + tcp


def _inject(s: socket.socket, ici: Ici, want: str, *, fin: bool = True, ack: int | None = None,
            timeout: float = 2.0) -> None:
    """Restore what the peer sent that no socket option can (as CRIU's
    send_fin): its FIN, or its ACK of our FIN.  The segment is sent from the
    peer's address to the socket through a raw socket in the socket's own
    network namespace (the caller's thread is there); the kernel takes it
    in like the original (repair mode still processes arriving segments).
    A FIN is ACKed: the peer sees a duplicate ACK for a FIN it knows
    acknowledged.  Waits until the socket is in ``want``."""
    local = s.getsockname()
    pkt = peer_segment(ici, (local[0], local[1]), fin=fin, ack=ack)
    af = socket.AF_INET6 if ici.family == "ipv6" else socket.AF_INET
    try:
        with socket.socket(af, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
            raw.sendto(pkt, (local[0], 0))
    except OSError as exc:
        raise _fail("sendto(raw socket) of the peer's segment", exc) from None
    deadline = time.monotonic() + timeout
    while (now := _state(s)) != want:
        if time.monotonic() > deadline:
            raise RepairError(errno.EPROTO, f"the peer's {'FIN' if fin else 'ACK'} was not taken in: the socket is {now}, "
                                            f"expected {want} (dropped by the kernel or a firewall?)")
        time.sleep(0.001)


def _restore_fins(s: socket.socket, ici: Ici) -> None:
    """Bring an ESTABLISHED re-created socket into the ICI's closing state.

    ``TCP_REPAIR`` only re-creates ESTABLISHED sockets (connect() in repair
    mode); the FINs are re-applied in the order they happened: ours with
    shutdown() (as sent: :func:`_shutdown_as_sent`; an unsent one waits for
    activate(), after the unsent bytes), the peer's as a segment
    (:func:`_inject_peer_fin`)."""
    ours_sent = ici.fin in ("sent", "acked")
    if ours_sent and ici.state in _FIN_FIRST:
        _shutdown_as_sent(s)
    if ici.fin == "acked":
        # the peer's ACK of our FIN (CRIU: SNDQ_FIN_ACKED): FIN_WAIT1 -> FIN_WAIT2 now, not at
        # the FIN's retransmission (leaving repair mode sends no window probe outside ESTABLISHED)
        _inject(s, ici, "FIN_WAIT2", fin=False, ack=seq_add(ici.snd_nxt, 1))
    if ici.peer_fin:
        _inject(s, ici, "CLOSING" if ours_sent and ici.state in _FIN_FIRST else "CLOSE_WAIT")
    if ours_sent and ici.state not in _FIN_FIRST:
        _shutdown_as_sent(s)
    want = ici.state
    if ici.fin == "unsent":
        want = "CLOSE_WAIT" if ici.peer_fin else "ESTABLISHED"      # the FIN follows on activate()
    if (now := _state(s)) != want:
        raise RepairError(errno.EPROTO, f"restoring state {ici.state}: the socket is {now}, expected {want}")


# --- listening and bound sockets --------------------------------------------------------

class PassedSocket(socket.socket):
    """A listening or bound socket made by :func:`create_socket`; a listener
    starts listening on :func:`activate`."""

    doc: SocketDoc
    activated: bool = False


def get_socket(sock: socket.socket, *, drain: bool = True) -> tuple[SocketDoc, list[socket.socket]]:
    """The document of a listening or bound socket, and (for a listener) the
    connections it had completed but the application had not accepted.

    Those are accepted here and returned as ordinary ESTABLISHED sockets:
    move each with :func:`get` (or serve it locally); closing the listener
    would otherwise reset them.  Hold the listener's traffic first (the
    gateway, or the caller's route), or a handshake completing after the
    accept queue was drained is lost with the listener.  Handshakes still
    half-open (SYN_RECV) are not carried (see docs/ENDPOINT_PASSING.md).
    The socket itself is not changed: the caller closes it after the move.
    ``drain=False`` leaves the accept queue alone (the list is empty).
    """
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise ValueError("sock: not a TCP socket of family AF_INET or AF_INET6")
    raw = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 232)
    state = TCP_STATES.get(raw[0], str(raw[0]))
    local = sock.getsockname()
    if state == "LISTEN":
        kind = "listen"
        backlog = struct.unpack_from("=I", raw, 28)[0]    # tcpi_sacked: sk_max_ack_backlog on a listener
    elif state == "CLOSE" and local[1] != 0:
        kind, backlog = "bound", 0
    else:
        raise IciError("state", f"the socket is {state}{' and not bound' if state == 'CLOSE' else ''}: "
                                "get_socket() takes listening and bound sockets (connections: get())")
    family = "ipv6" if sock.family == socket.AF_INET6 else "ipv4"
    options: dict[str, int] = {}
    for name, (level, opt) in SOCKET_OPTIONS.items():
        if name == "IPV6_V6ONLY" and family != "ipv6":
            continue
        try:
            options[name] = sock.getsockopt(level, opt)
        except OSError:
            continue
    doc = SocketDoc(kind=kind, local_addr=local[0], local_port=local[1], family=family,
                    backlog=min(backlog, 65535), options=options, taken_at=time.time())
    children: list[socket.socket] = []
    if kind == "listen" and drain:
        was = sock.gettimeout()
        sock.setblocking(False)
        try:
            while True:
                try:
                    child, _ = sock.accept()
                except (BlockingIOError, InterruptedError):
                    break
                child.setblocking(True)
                children.append(child)
        finally:
            sock.settimeout(was)
    return doc, children


def create_socket(doc: SocketDoc) -> PassedSocket:
    """A listening or bound socket re-made from its document: same options,
    same address and port (``IP_FREEBIND``/``IPV6_FREEBIND``: the address
    need not be local yet).  A listener listens on :func:`activate`."""
    check_socket_doc(doc)
    af = socket.AF_INET6 if doc.family == "ipv6" else socket.AF_INET
    s = PassedSocket(af, socket.SOCK_STREAM)
    try:
        for name, value in doc.options.items():
            level, opt = SOCKET_OPTIONS[name]
            try:
                s.setsockopt(level, opt, value)
            except OSError as exc:
                raise _fail(f"setsockopt({name}={value})", exc) from None
        _freebind(s)
        try:
            s.bind((doc.local_addr, doc.local_port))
        except OSError as exc:
            raise _fail(f"bind({_hostport(doc.local_addr, doc.local_port)})", exc) from None
    except BaseException:
        s.close()
        raise
    s.doc = doc
    s.activated = doc.kind == "bound"
    return s


def release(sock: socket.socket) -> None:
    """Close an isolated (repair-mode) socket: the peer sees nothing."""
    sock.close()


def _signed(v: int) -> int:
    """A u32 as the C ``int`` the socket option takes."""
    v &= MASK
    return v - (1 << 32) if v >= 1 << 31 else v


__all__ = ["ICI_VERSION", "Ici", "IciError", "Limits", "PassedSocket", "RepairError", "RepairPermissionError",
           "RepairedSocket", "SocketDoc", "activate", "check_ici", "create", "create_socket", "get", "get_socket",
           "ici_from_record", "in_repair", "peer_segment", "record_fields_from_ici", "release", "tcp_info"]
