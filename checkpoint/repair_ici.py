"""The socket ICI: a portable document of one TCP endpoint, and its sanity checks.

Theory of operation
-------------------
tcpcp (Almesberger 2004, section 4 and Table 1) calls everything needed to
re-create a TCP endpoint its *Internal Connection Information*.  :class:`Ici`
is that document for mainline Linux ``TCP_REPAIR``: the connection's
identity, its sequence numbers, the options fixed at the handshake (MSS,
window scales, SACK-permitted, timestamps), the flow-control windows
(``TCP_REPAIR_WINDOW``), the timestamp clock, and the three queues CRIU's
libsoccr carries:

* ``sent_queue`` — bytes sent but not yet acknowledged, starting at
  ``snd_una`` and ending at ``snd_nxt``;
* ``unsent_queue`` — bytes the application wrote that were never sent
  (they follow ``snd_nxt``);
* ``recv_queue`` — bytes received (and acknowledged) that the application
  has not read yet; they end at ``rcv_nxt``.

The document is versioned and JSON-able (``to_dict``/``from_dict``, queues
in base64) so it can cross hosts and architectures (tcpcp 4: "the ICI is
portable").  All sequence numbers are modulo 2**32.

*Stream offsets.*  tcpcp 6 maps sequence numbers to application state (a
file position).  ``send_base``/``recv_base`` are the sequence numbers of
stream byte 0 in each direction (ISN + 1), when known; then
``out_offset`` (the offset of the next byte the application writes) and
``in_offset`` (the next byte it reads) follow.

*Sanity checks (tcpcp 7.1).*  :func:`check_ici` is a pure function of the
document and the local limits (:class:`Limits`): it refuses, naming the
field, anything the kernel must not be handed — a state other than
ESTABLISHED or a closing state (FIN_WAIT1/2, CLOSE_WAIT, LAST_ACK, CLOSING,
with the FINs that state implies), addresses not of the document's family
(ipv4/ipv6), sequence numbers that disagree with the queue lengths, window
scales above 14, an MSS outside what Linux accepts, windows that the
peer's or our window scale cannot express or that exceed the local buffer
limits, queues larger than the local buffers.  ``create()`` runs it before
the first system call.

*Versions.*  Version 2 adds IPv6 (``family``), the closing states
(``fin``: ours none/unsent/sent/acked; ``peer_fin``) and
:class:`SocketDoc` (listening and bound sockets).  A version-1 document
reads as an IPv4 ESTABLISHED endpoint, and one that version 1 can
express is still written as version 1.

*From the wire.*  The gateway keeps the same information learnt from the
wire (:class:`checkpoint.ici.ConnectionRecord`).  :func:`ici_from_record`
turns a wire checkpoint plus the client bytes the server application has
not consumed yet into an :class:`Ici` for the *server* endpoint, and
:func:`record_fields_from_ici` goes the other way for the fields a record
knows, so a checkpoint from the wire and one from a socket are
interchangeable where they overlap.
"""

from __future__ import annotations

import base64
import ipaddress
import math
import time
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from .seqnum import MASK, MAX_JUMP, seq_add, seq_diff

ICI_VERSION = 2          # 2: family ipv6, the closing states (fin, peer_fin); 1 still reads
READABLE_VERSIONS = (1, 2)
MAX_WSCALE = 14          # RFC 7323 section 2.3; the kernel answers EFBIG above
MIN_MSS = 88             # TCP_MIN_MSS in include/net/tcp.h
MAX_MSS = 65535 - 40     # an IPv4 datagram's payload minus the minimum TCP header
PORT_CHOICES = ("same", "prebound", "any")   # tcpcp 2.1
FAMILIES = ("ipv4", "ipv6")
FIN_STATES = ("none", "unsent", "sent", "acked")
# connected states create() can rebuild, and what each says about the two FINs:
# state -> (our FIN values allowed, the peer's FIN received)
CONNECTED_STATES: dict[str, tuple[tuple[str, ...], bool]] = {
    "ESTABLISHED": (("none",), False),
    "FIN_WAIT1": (("unsent", "sent"), False),     # we shut down, our FIN not acknowledged
    "FIN_WAIT2": (("acked",), False),             # our FIN acknowledged, the peer still sends
    "CLOSE_WAIT": (("none",), True),              # the peer shut down, we still send
    "LAST_ACK": (("unsent", "sent"), True),       # both FINs, ours not acknowledged
    "CLOSING": (("unsent", "sent"), True),        # simultaneous close, ours not acknowledged
}
SOCKET_KINDS = ("listen", "bound")


class IciError(ValueError):
    """An ICI refused by the sanity checks; ``field`` names the culprit."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"ici.{field_name}: {message}")
        self.field = field_name


DEFAULT_RMEM_MAX = 6 * 1024 * 1024   # Linux's default tcp_rmem[2]
DEFAULT_WMEM_MAX = 4 * 1024 * 1024   # Linux's default tcp_wmem[2]


@dataclass(slots=True)
class Limits:
    """The local system's constraints an ICI must fit (tcpcp 7.1)."""

    rmem_max: int = DEFAULT_RMEM_MAX    # tcp_rmem[2]: largest receive buffer
    wmem_max: int = DEFAULT_WMEM_MAX    # tcp_wmem[2]: largest send buffer
    max_future_seconds: float = 5.0     # clock skew tolerated on ``taken_at``

    @classmethod
    def read(cls) -> Limits:
        """The limits of the network namespace of the calling thread."""

        def third(path: str, default: int) -> int:
            try:
                with open(path) as f:
                    return int(f.read().split()[2])
            except (OSError, ValueError, IndexError):
                return default

        # (not cls.rmem_max: in a slots dataclass that is the slot's descriptor, not the default)
        return cls(rmem_max=third("/proc/sys/net/ipv4/tcp_rmem", DEFAULT_RMEM_MAX),
                   wmem_max=third("/proc/sys/net/ipv4/tcp_wmem", DEFAULT_WMEM_MAX))


@dataclass(slots=True)
class Ici:
    """One TCP endpoint, as ``get()`` reads it and ``create()`` needs it."""

    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int
    snd_una: int                    # first unacknowledged byte (start of sent_queue)
    snd_nxt: int                    # next byte to send (end of sent_queue)
    rcv_nxt: int                    # next byte expected from the peer (end of recv_queue)
    mss: int                        # MSS clamp (TCP_MAXSEG)
    snd_wscale: int | None = None   # the peer's shift (applied to windows we receive)
    rcv_wscale: int | None = None   # our shift (applied to windows we announce)
    sack_permitted: bool = False
    timestamps: bool = False
    ts_val: int | None = None       # TCP_TIMESTAMP when taken: our clock incl. offset
    ts_hz: int = 1000               # our timestamp clock rate (Linux: 1 kHz; usec mode 1 MHz)
    taken_at: float = 0.0           # wall-clock time of ts_val (seconds since the epoch)
    snd_wl1: int | None = None      # TCP_REPAIR_WINDOW (None: not carried)
    snd_wnd: int = 0                # window the peer announced, bytes
    max_window: int = 0             # largest window the peer announced, bytes
    rcv_wnd: int = 0                # window we announced, bytes
    rcv_wup: int = 0                # rcv_nxt when we last announced it
    sent_queue: bytes = b""
    unsent_queue: bytes = b""
    recv_queue: bytes = b""
    send_base: int | None = None    # sequence number of outbound stream byte 0
    recv_base: int | None = None    # sequence number of inbound stream byte 0
    state: str = "ESTABLISHED"
    family: str = "ipv4"
    version: int = ICI_VERSION
    # version 2: the closing states (CRIU's sk-tcp/libsoccr approach).  The
    # sequence numbers above count data only: a FIN is not in them.
    fin: str = "none"               # our FIN: none, unsent (follows unsent_queue), sent, acked
    peer_fin: bool = False          # the peer's FIN was received (it follows rcv_nxt)

    # --- derived ------------------------------------------------------------------

    @property
    def write_seq(self) -> int:
        """Sequence number after the last byte the application wrote."""
        return seq_add(self.snd_nxt, len(self.unsent_queue))

    @property
    def copied_seq(self) -> int:
        """Sequence number of the next byte the application will read."""
        return seq_add(self.rcv_nxt, -len(self.recv_queue))

    @property
    def out_offset(self) -> int | None:
        """Stream offset of the next byte the application writes (None: base unknown)."""
        return None if self.send_base is None else seq_diff(self.write_seq, self.send_base)

    @property
    def in_offset(self) -> int | None:
        """Stream offset of the next byte the application reads (None: base unknown)."""
        return None if self.recv_base is None else seq_diff(self.copied_seq, self.recv_base)

    @property
    def acked_offset(self) -> int | None:
        """Stream offset up to which the peer acknowledged our bytes."""
        return None if self.send_base is None else seq_diff(self.snd_una, self.send_base)

    def ts_now(self, now: float | None = None) -> int | None:
        """A conservative TSval for *now*: never below what the peer saw (tcpcp 6.1).

        ``ts_val`` was read when the ICI was taken; the ticks since then are
        estimated from the wall clock, rounded up, plus one tick.
        """
        if self.ts_val is None:
            return None
        now = time.time() if now is None else now
        elapsed = max(0.0, now - self.taken_at) if self.taken_at else 0.0
        v = (self.ts_val + math.ceil(elapsed * self.ts_hz) + 2) & MASK
        # the low bit is the kernel's mode flag: set in usec mode, clear in ms mode
        return v | 1 if self.ts_val & 1 else v & ~1

    # --- the document -------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON document, in the lowest version that expresses it: an IPv4
        ESTABLISHED endpoint is written as version 1 (no FIN fields), so an
        agent with the version-1 library still imports it."""
        d: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            d[f.name] = base64.b64encode(v).decode("ascii") if isinstance(v, bytes) else v
        if self.family == "ipv4" and self.state == "ESTABLISHED" and self.fin == "none" and not self.peer_fin:
            del d["fin"], d["peer_fin"]
            d["version"] = 1
        return d

    @classmethod
    def from_dict(cls, d: object) -> Ici:
        """The document back; a missing, unknown or mistyped field is named."""
        if not isinstance(d, dict):
            raise IciError("<document>", f"expected an object, got {type(d).__name__}")
        version = d.get("version", None)
        if version not in READABLE_VERSIONS or isinstance(version, bool):
            raise IciError("version", f"{version!r} is not supported (this library reads "
                                      f"{', '.join(map(str, READABLE_VERSIONS))})")
        if "kind" in d:
            raise IciError("kind", f"{d['kind']!r}: a socket document (listening/bound), not a connection: "
                                   "read it with socket_doc_from_dict()")
        known = {f.name: f for f in fields(cls)}
        if version == 1:
            # version 1 knew IPv4 ESTABLISHED connections only and had no FIN fields
            known = {k: v for k, v in known.items() if k not in ("fin", "peer_fin")}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise IciError(unknown[0], "unknown field")
        kwargs: dict[str, Any] = {}
        for name, f in known.items():
            if name not in d:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise IciError(name, "missing")
                continue
            v = d[name]
            if name in _BYTES_FIELDS:
                if not isinstance(v, str):
                    raise IciError(name, "expected base64 text")
                try:
                    v = base64.b64decode(v.encode("ascii"), validate=True)
                except (ValueError, UnicodeEncodeError) as exc:
                    raise IciError(name, f"not base64: {exc}") from None
            elif name in _INT_FIELDS:
                if v is None and name in _OPTIONAL_FIELDS:
                    pass
                elif isinstance(v, bool) or not isinstance(v, int):
                    raise IciError(name, f"expected an integer, got {v!r}")
            elif name in _BOOL_FIELDS:
                if not isinstance(v, bool):
                    raise IciError(name, f"expected true or false, got {v!r}")
            elif name in _STR_FIELDS:
                if not isinstance(v, str):
                    raise IciError(name, f"expected a string, got {v!r}")
            elif name == "taken_at":
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise IciError(name, f"expected a number, got {v!r}")
                v = float(v)
            kwargs[name] = v
        kwargs["version"] = ICI_VERSION     # read into the current model
        if version == 1:
            kwargs.setdefault("family", "ipv4")
        return cls(**kwargs)


_BYTES_FIELDS = {"sent_queue", "unsent_queue", "recv_queue"}
_BOOL_FIELDS = {"sack_permitted", "timestamps", "peer_fin"}
_STR_FIELDS = {"local_addr", "remote_addr", "state", "family", "fin"}
_OPTIONAL_FIELDS = {"snd_wscale", "rcv_wscale", "ts_val", "snd_wl1", "send_base", "recv_base"}
_INT_FIELDS = {"local_port", "remote_port", "snd_una", "snd_nxt", "rcv_nxt", "mss", "snd_wscale",
               "rcv_wscale", "ts_val", "ts_hz", "snd_wl1", "snd_wnd", "max_window", "rcv_wnd",
               "rcv_wup", "send_base", "recv_base", "version"}


# --- sanity checks (tcpcp 7.1) -------------------------------------------------------

def _u32(ici: Ici, name: str, optional: bool = False) -> None:
    v = getattr(ici, name)
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, int):
        raise IciError(name, f"expected an integer, got {v!r}")
    if not 0 <= v <= MASK:
        raise IciError(name, f"{v} is not a 32-bit unsigned value")


def _address(obj: Any, name: str, family: str) -> None:
    v = getattr(obj, name)
    cls = ipaddress.IPv6Address if family == "ipv6" else ipaddress.IPv4Address
    try:
        cls(v)
    except (ipaddress.AddressValueError, ValueError, TypeError):
        raise IciError(name, f"{v!r} is not an {'IPv6' if family == 'ipv6' else 'IPv4'} address "
                             f"(family {family})") from None


def _family(obj: Any) -> None:
    if obj.family not in FAMILIES:
        raise IciError("family", f"{obj.family!r} is not one of {', '.join(FAMILIES)}")


def _port(ici: Any, name: str, zero_ok: bool) -> None:
    v = getattr(ici, name)
    if isinstance(v, bool) or not isinstance(v, int) or not (0 if zero_ok else 1) <= v <= 65535:
        raise IciError(name, f"{v!r} is not a port number{'' if zero_ok else ' (1-65535)'}")


def check_ici(ici: Ici, limits: Limits | None = None, port_choice: str = "same",
              now: float | None = None) -> None:
    """Refuse an ICI the kernel must not be handed; raises :class:`IciError`.

    Pure: looks at nothing but its arguments (``limits`` defaults to
    :class:`Limits`' built-in values, ``now`` to the clock).
    """
    limits = limits if limits is not None else Limits()
    if port_choice not in PORT_CHOICES:
        raise ValueError(f"port_choice: {port_choice!r} is not one of {', '.join(PORT_CHOICES)}")
    if ici.version != ICI_VERSION:
        raise IciError("version", f"{ici.version!r} is not supported (this library reads {ICI_VERSION})")
    _family(ici)
    if ici.state not in CONNECTED_STATES:
        raise IciError("state", f"{ici.state!r}: a connection is created in one of "
                                f"{', '.join(CONNECTED_STATES)} (TIME_WAIT and the handshake states are not)")
    fins, peer_fin = CONNECTED_STATES[ici.state]
    if ici.fin not in fins:
        raise IciError("fin", f"{ici.fin!r} does not go with state {ici.state} (expected {' or '.join(fins)})")
    if ici.peer_fin is not peer_fin:
        raise IciError("peer_fin", f"{ici.peer_fin!r} does not go with state {ici.state}")
    if ici.fin in ("sent", "acked") and ici.unsent_queue:
        raise IciError("unsent_queue", f"our FIN is {ici.fin} but bytes before it were never sent")
    if ici.fin == "acked" and ici.sent_queue:
        raise IciError("sent_queue", "our FIN is acknowledged but bytes before it are not")
    _address(ici, "local_addr", ici.family)
    _address(ici, "remote_addr", ici.family)
    _port(ici, "local_port", zero_ok=port_choice != "same")
    _port(ici, "remote_port", zero_ok=False)
    for name in ("snd_una", "snd_nxt", "rcv_nxt", "snd_wnd", "max_window", "rcv_wnd", "rcv_wup"):
        _u32(ici, name)
    for name in ("snd_wl1", "ts_val", "send_base", "recv_base"):
        _u32(ici, name, optional=True)
    for name in _BYTES_FIELDS:
        if not isinstance(getattr(ici, name), (bytes, bytearray)):
            raise IciError(name, "expected bytes")

    # options fixed at the handshake
    if isinstance(ici.mss, bool) or not isinstance(ici.mss, int) or not MIN_MSS <= ici.mss <= MAX_MSS:
        raise IciError("mss", f"{ici.mss!r} is outside {MIN_MSS}..{MAX_MSS}")
    if (ici.snd_wscale is None) != (ici.rcv_wscale is None):
        raise IciError("snd_wscale" if ici.snd_wscale is None else "rcv_wscale",
                       "window scaling is on for one direction only: both scales or neither")
    for name in ("snd_wscale", "rcv_wscale"):
        v = getattr(ici, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_WSCALE):
            raise IciError(name, f"{v!r} is outside 0..{MAX_WSCALE}")
    for name in ("sack_permitted", "timestamps"):
        if not isinstance(getattr(ici, name), bool):
            raise IciError(name, "expected true or false")
    if ici.timestamps:
        if ici.ts_val is None:
            raise IciError("ts_val", "timestamps are on but no clock value was taken")
        if isinstance(ici.ts_hz, bool) or not isinstance(ici.ts_hz, int) or not 1 <= ici.ts_hz <= 1_000_000:
            raise IciError("ts_hz", f"{ici.ts_hz!r} is outside 1..1000000")
        if not isinstance(ici.taken_at, (int, float)) or not math.isfinite(ici.taken_at) or ici.taken_at < 0:
            raise IciError("taken_at", f"{ici.taken_at!r} is not a time")
        now = time.time() if now is None else now
        if ici.taken_at > now + limits.max_future_seconds:
            raise IciError("taken_at", f"{ici.taken_at - now:.1f} s in the future (clock skew?)")
        # tcpcp 6.1: a checkpoint older than the MSL is not used
        if ici.taken_at and now - ici.taken_at > 120:
            raise IciError("taken_at", f"{now - ici.taken_at:.0f} s old: older than the MSL (120 s)")
    elif ici.ts_val is not None:
        raise IciError("ts_val", "set although timestamps are off")

    # queues against the local buffers
    sent, unsent, recv = len(ici.sent_queue), len(ici.unsent_queue), len(ici.recv_queue)
    if sent + unsent > limits.wmem_max:
        raise IciError("sent_queue", f"{sent} + {unsent} unsent bytes exceed the send buffer limit {limits.wmem_max}")
    if recv > limits.rmem_max:
        raise IciError("recv_queue", f"{recv} bytes exceed the receive buffer limit {limits.rmem_max}")

    # sequence consistency
    d = (ici.snd_nxt - ici.snd_una) & MASK
    if d != sent:
        raise IciError("snd_nxt", f"snd_nxt - snd_una = {d} but sent_queue holds {sent} bytes")
    if ici.send_base is not None:
        off = seq_diff(ici.snd_una, ici.send_base)
        if not 0 <= off < MAX_JUMP * 2 - (sent + unsent):
            raise IciError("send_base", f"snd_una is {off} bytes from it: not within 0..2**31")
    if ici.recv_base is not None:
        off = seq_diff(ici.copied_seq, ici.recv_base)
        if not 0 <= off < MAX_JUMP * 2 - recv:
            raise IciError("recv_base", f"the first unread byte is {off} bytes from it: not within 0..2**31")

    # windows (tcp_repair_set_window's rules, and what the scales can express)
    peer_max = 65535 << (ici.snd_wscale or 0)
    our_max = 65535 << (ici.rcv_wscale or 0)
    if ici.snd_wl1 is not None:
        if ici.snd_wnd > ici.max_window:
            raise IciError("snd_wnd", f"{ici.snd_wnd} exceeds max_window {ici.max_window}")
        if ici.max_window > peer_max:
            raise IciError("max_window", f"{ici.max_window} cannot be announced with snd_wscale {ici.snd_wscale}")
        if ici.rcv_wnd > our_max:
            raise IciError("rcv_wnd", f"{ici.rcv_wnd} cannot be announced with rcv_wscale {ici.rcv_wscale}")
        if ici.rcv_wnd > limits.rmem_max:
            raise IciError("rcv_wnd", f"{ici.rcv_wnd} exceeds the receive buffer limit {limits.rmem_max}")
        if seq_diff(ici.rcv_wup, ici.rcv_nxt) > 0:
            raise IciError("rcv_wup", "is after rcv_nxt")
        if seq_diff(ici.rcv_nxt, ici.rcv_wup) > ici.rcv_wnd + recv + MAX_MSS:
            raise IciError("rcv_wup", "is further below rcv_nxt than the window allows")
        if seq_diff(ici.snd_wl1, seq_add(ici.rcv_nxt, ici.rcv_wnd)) > 0:
            raise IciError("snd_wl1", "is after rcv_nxt + rcv_wnd")
        if seq_diff(ici.rcv_nxt, ici.snd_wl1) > MAX_JUMP:
            raise IciError("snd_wl1", "is implausibly far below rcv_nxt")


# --- listening and bound sockets (SockMi passes a socket in any state) ----------------

# the options a listening or bound socket carries: name -> (level, optname); the
# ones a listener's accepted connections inherit, and those that decide where
# it may bind
SOCKET_OPTIONS: dict[str, tuple[int, int]] = {
    "SO_REUSEADDR": (1, 2), "SO_REUSEPORT": (1, 15), "SO_KEEPALIVE": (1, 9),
    "TCP_NODELAY": (6, 1), "TCP_KEEPIDLE": (6, 4), "TCP_KEEPINTVL": (6, 5), "TCP_KEEPCNT": (6, 6),
    "TCP_DEFER_ACCEPT": (6, 9), "TCP_USER_TIMEOUT": (6, 18), "TCP_FASTOPEN": (6, 23),
    "IPV6_V6ONLY": (41, 26),
}
MAX_BACKLOG = 65535


@dataclass(slots=True)
class SocketDoc:
    """A TCP socket that is not connected: ``kind`` ``listen`` (with its
    backlog) or ``bound`` (bound, neither listening nor connected).

    Nothing of a connection travels: the new host binds the same address
    and port (``IP_FREEBIND``/``IPV6_FREEBIND``: the address may arrive
    later) with the same options and, for a listener, listens with the same
    backlog.  Connections the origin had completed but not accepted are not
    in the document: :func:`checkpoint.io.tcp_repair.get_socket` hands them
    to the caller as sockets (move each as a connection).
    """

    kind: str
    local_addr: str
    local_port: int
    family: str = "ipv4"
    backlog: int = 0
    options: dict[str, int] = field(default_factory=dict)
    taken_at: float = 0.0
    version: int = ICI_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "local_addr": self.local_addr, "local_port": self.local_port,
                "family": self.family, "backlog": self.backlog, "options": dict(self.options),
                "taken_at": self.taken_at, "version": self.version}


def socket_doc_from_dict(d: object) -> SocketDoc:
    """A listening/bound socket's document back; checked by :func:`check_socket_doc`."""
    if not isinstance(d, dict):
        raise IciError("<document>", f"expected an object, got {type(d).__name__}")
    if d.get("version") != ICI_VERSION:
        raise IciError("version", f"{d.get('version')!r}: socket documents exist since version {ICI_VERSION}")
    unknown = sorted(set(d) - {"kind", "local_addr", "local_port", "family", "backlog", "options",
                               "taken_at", "version"})
    if unknown:
        raise IciError(unknown[0], "unknown field")
    for name in ("kind", "local_addr", "local_port", "family"):
        if name not in d:
            raise IciError(name, "missing")
    opts = d.get("options", {})
    if not isinstance(opts, dict):
        raise IciError("options", "expected an object")
    taken = d.get("taken_at", 0.0)
    if isinstance(taken, bool) or not isinstance(taken, (int, float)):
        raise IciError("taken_at", f"expected a number, got {taken!r}")
    doc = SocketDoc(kind=d["kind"], local_addr=d["local_addr"], local_port=d["local_port"], family=d["family"],
                    backlog=d.get("backlog", 0), options=dict(opts), taken_at=float(taken))
    check_socket_doc(doc)
    return doc


def check_socket_doc(doc: SocketDoc) -> None:
    """Refuse a listening/bound socket document the kernel must not be handed."""
    if doc.kind not in SOCKET_KINDS:
        raise IciError("kind", f"{doc.kind!r} is not one of {', '.join(SOCKET_KINDS)}")
    _family(doc)
    _address(doc, "local_addr", doc.family)
    _port(doc, "local_port", zero_ok=False)
    if isinstance(doc.backlog, bool) or not isinstance(doc.backlog, int) or not 0 <= doc.backlog <= MAX_BACKLOG:
        raise IciError("backlog", f"{doc.backlog!r} is outside 0..{MAX_BACKLOG}")
    for name, v in doc.options.items():
        if name not in SOCKET_OPTIONS:
            raise IciError(f"options.{name}", "not an option this library carries")
        if isinstance(v, bool) or not isinstance(v, int) or not -(1 << 31) <= v < 1 << 31:
            raise IciError(f"options.{name}", f"{v!r} is not a C int")
    if "IPV6_V6ONLY" in doc.options and doc.family != "ipv6":
        raise IciError("options.IPV6_V6ONLY", "only for family ipv6")


# --- the wire record ---------------------------------------------------------------

def ici_from_record(rec: Any, *, client_bytes: bytes = b"", consumed: int = 0,
                    local_addr: str | None = None, local_port: int | None = None,
                    now: float | None = None) -> Ici:
    """The *server* endpoint of a wire checkpoint, for ``create()`` on a backup.

    ``rec`` is a :class:`checkpoint.ici.ConnectionRecord` (only read).
    ``consumed`` is the stream offset of the first client byte the server
    application has *not* consumed (its last reported input offset) and
    ``client_bytes`` the client's bytes from there on (from the gateway's
    log); they become the receive queue, so the application reads them
    first.  Outbound, the new endpoint starts at what the client
    acknowledged (``rec.client.ack``): nothing in flight, the application
    resumes writing at ``out_offset`` = that point's stream offset, and a
    client ACK above it (bytes the dead server sent) is the case tcpcp 6.1
    and the gateway's I6 rule handle.  The local address defaults to the
    service address the client knows (``rec.vip``:``rec.vport``).
    """
    c, s = rec.client, rec.server
    if s.data_base is None or c.data_base is None:
        raise IciError("send_base", "the record has no stream base (picked up mid-stream?)")
    if c.ack is None:
        raise IciError("snd_una", "the client never acknowledged anything: no outbound position")
    if c.mss is None:
        raise IciError("mss", "the client's SYN carried no MSS (not seen)")
    if consumed < 0:
        raise IciError("recv_base", f"consumed offset {consumed} is negative")
    logged = c.bytes
    if consumed + len(client_bytes) > logged or consumed > logged:
        raise IciError("recv_queue", f"client bytes {consumed}..{consumed + len(client_bytes)} go beyond "
                                     f"what the client sent ({logged})")
    wscale_ok = rec.wscale_ok
    snd_una = c.ack
    rcv_nxt = seq_add(c.data_base, consumed + len(client_bytes))
    ts_on = bool(rec.ts_ok and s.tsval is not None)
    tick = s.tick_rate
    ts_hz = 1000 if tick is None else max(1, min(1_000_000, math.ceil(tick)))
    rcv_wnd = max(s.window, len(client_bytes))
    local = local_addr or rec.vip
    return Ici(
        family="ipv6" if ":" in str(rec.client_ip) else "ipv4",
        local_addr=local,
        local_port=rec.vport if local_port is None else local_port,
        remote_addr=rec.client_ip,
        remote_port=rec.client_port,
        snd_una=snd_una,
        snd_nxt=snd_una,
        rcv_nxt=rcv_nxt,
        mss=max(MIN_MSS, min(MAX_MSS, c.mss)),
        snd_wscale=c.wscale if wscale_ok else None,
        rcv_wscale=s.wscale if wscale_ok else None,
        sack_permitted=rec.sack_ok,
        timestamps=ts_on,
        ts_val=((s.tsval + 1) & ~1) & MASK if ts_on else None,   # even: the kernel's ms mode
        ts_hz=ts_hz,
        taken_at=rec.last_seen if ts_on else 0.0,
        snd_wl1=rcv_nxt,
        snd_wnd=c.window,
        max_window=max(c.max_window, c.window),
        rcv_wnd=rcv_wnd,
        rcv_wup=rcv_nxt,
        recv_queue=bytes(client_bytes),
        send_base=s.data_base,
        recv_base=c.data_base,
    )


def record_fields_from_ici(ici: Ici) -> dict[str, dict[str, Any]]:
    """What a :class:`ConnectionRecord`'s halves would say about this endpoint.

    Returns ``{"server": {...}, "client": {...}}`` with the
    :class:`HalfConnection` field names, taking the socket's endpoint as the
    server (as the gateway sees a backend).  Only fields a socket knows are
    filled; the caller merges them into a record.
    """
    server: dict[str, Any] = {
        "next_seq": ici.snd_nxt,
        "ack": ici.rcv_nxt,
        "window": ici.rcv_wnd,
        "mss": ici.mss,
        "wscale": ici.rcv_wscale,
        "sack_permitted": ici.sack_permitted,
        "ts_offered": ici.timestamps,
        "tsval": ici.ts_val,
        "data_base": ici.send_base,
    }
    client: dict[str, Any] = {
        "ack": ici.snd_una,
        "window": ici.snd_wnd,
        "max_window": ici.max_window,
        "wscale": ici.snd_wscale,
        "sack_permitted": ici.sack_permitted,
        "ts_offered": ici.timestamps,
        "data_base": ici.recv_base,
        "next_seq": ici.rcv_nxt,
    }
    return {"server": server, "client": client}


__all__ = [
    "CONNECTED_STATES",
    "SOCKET_OPTIONS",
    "SocketDoc",
    "check_socket_doc",
    "socket_doc_from_dict",
    "ICI_VERSION",
    "PORT_CHOICES",
    "Ici",
    "IciError",
    "Limits",
    "check_ici",
    "ici_from_record",
    "record_fields_from_ici",
]
