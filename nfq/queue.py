"""The NFQUEUE binding: packets in, one verdict out for every one of them.

``PacketQueue`` wraps NetfilterQueue.  The handler is a plain function from
the packet's bytes (a ``bytearray`` it may rewrite in place) to a
:class:`Verdict`; the wrapper turns that into the library calls and
guarantees a verdict even when the handler raises (the packet is then
treated by the error policy and the error counted): NetfilterQueue leaves a
packet without a verdict if the callback raises, and the kernel would hold it
until the queue fills.

Reading is non-blocking and bounded: ``process_pending`` handles at most
``budget`` packets and returns, so under a sustained load the event loop the
queue is plugged into (``add_reader``) still runs its timers and health
probes between batches.  (NetfilterQueue's own ``run(block=False)`` drains
until the socket is empty, which under load is never; ``run_socket`` with a
socket whose ``recv`` reports EAGAIN after ``budget`` messages bounds it.)

Queue flags are set by sending an ``NFQNL_MSG_CONFIG`` message on the
queue's own netlink socket (the library has no API for them):

* ``fail_open`` (``NFQA_CFG_F_FAIL_OPEN``): when the queue is full the kernel
  accepts packets instead of dropping them;
* ``gso`` (``NFQA_CFG_F_GSO``): GSO super-packets are queued whole instead of
  being segmented first — one verdict per up to 64 KiB.  Only for a queue
  whose handler never rewrites (with a header-only ``copy_range``).
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol, cast

if TYPE_CHECKING:
    from netfilterqueue import Packet

log = logging.getLogger(__name__)

# Copy at most this much of each packet.  NetfilterQueue's receive buffer is
# 4096 bytes with 80 of metadata; a payload set on a truncated copy would
# truncate the real packet, so the handler refuses to rewrite those
# (PacketView raises on a truncated copy) and they pass unmodified.
COPY_RANGE = 4016


class Verdict(enum.IntEnum):
    ACCEPT = 0      # pass unchanged
    REWRITTEN = 1   # pass with the handler's changes to the bytes
    DROP = 2


Handler = Callable[[bytearray], Verdict]


@dataclass
class QueueStats:
    packets: int = 0
    accepted: int = 0
    rewritten: int = 0
    dropped: int = 0
    handler_errors: int = 0
    gated: int = 0              # dropped at the last moment by the queue's gate
    busy_seconds: float = 0.0
    last_error: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "binding": "python",
            "packets": self.packets,
            "accepted": self.accepted,
            "rewritten": self.rewritten,
            "dropped": self.dropped,
            "handler_errors": self.handler_errors,
            "gated": self.gated,
            "busy_seconds": round(self.busy_seconds, 6),
            "last_error": self.last_error,
        }


class Queue(Protocol):
    """What the data path needs of a queue binding: this module's :class:`PacketQueue`
    (NetfilterQueue) or :class:`nfq.native.NativeQueue`."""

    queue_num: int
    handler: Handler

    @property
    def stats(self) -> QueueStats: ...
    def fileno(self) -> int: ...
    def process_pending(self, budget: int = 64) -> None: ...
    def flush_verdicts(self) -> None: ...
    def close(self) -> None: ...


class PacketQueue:
    def __init__(
        self,
        queue_num: int,
        handler: Handler,
        *,
        on_error: Verdict = Verdict.ACCEPT,
        max_len: int = 16384,
        sock_len: int = 8 * 1024 * 1024,
        copy_range: int = COPY_RANGE,
        fail_open: bool = False,
        gso: bool = False,
        clear_mark: int | None = None,
        gate: Callable[[], bool] | None = None,
    ) -> None:
        from netfilterqueue import NetfilterQueue

        if not 0 < copy_range <= COPY_RANGE:
            raise ValueError(f"copy_range must be 1..{COPY_RANGE}")
        self.queue_num = queue_num
        self.clear_mark = clear_mark  # a mark that only routed the packet here: removed on the way out
        self.handler = handler
        # asked right before a packet is let through: False drops it (a node of a gateway pair
        # that lost its role while this packet was being handled, e.g. stopped and thawed)
        self.gate = gate
        self.on_error = on_error
        self.stats = QueueStats()
        self._nfq = NetfilterQueue()
        self._nfq.bind(queue_num, self._callback, max_len=max_len, range=copy_range, sock_len=sock_len)
        self._budget = _Budget(self.fileno())
        flags = (NFQA_CFG_F_FAIL_OPEN if fail_open else 0) | (NFQA_CFG_F_GSO if gso else 0)
        if flags:
            set_queue_flags(self.fileno(), queue_num, flags, NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO)

    def fileno(self) -> int:
        return self._nfq.get_fd()

    def _callback(self, pkt: Packet) -> None:
        t0 = time.perf_counter()
        st = self.stats
        st.packets += 1
        try:
            buf = bytearray(pkt.get_payload())
            verdict = self.handler(buf)
        except Exception as exc:  # never leave a packet without a verdict
            st.handler_errors += 1
            st.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("handler failed; verdict %s", self.on_error.name)
            verdict = self.on_error
            buf = None
        if self.gate is not None and verdict is not Verdict.DROP and not self.gate():
            verdict = Verdict.DROP
            st.gated += 1
        if self.clear_mark is not None and pkt.get_mark() == self.clear_mark:
            pkt.set_mark(0)  # no second trip through a queue rule (bridged copies, a later hook)
        if verdict is Verdict.REWRITTEN and buf is not None:
            pkt.set_payload(bytes(buf))
            pkt.accept()
            st.rewritten += 1
        elif verdict is Verdict.DROP:
            pkt.drop()
            st.dropped += 1
        else:
            pkt.accept()
            st.accepted += 1
        st.busy_seconds += time.perf_counter() - t0

    def flush_verdicts(self) -> None:
        """Nothing to do: every packet's verdict is sent before the next packet is read."""

    def process_pending(self, budget: int = 64) -> None:
        """Handle up to ``budget`` waiting packets, then return."""
        self._budget.left = budget
        # run_socket only calls recv(); its stub asks for a whole socket
        self._nfq.run_socket(cast(socket.socket, self._budget))

    def run_forever(self) -> None:
        """Serve the queue until it is closed (for a dedicated thread or process)."""
        import select

        fd = self.fileno()
        while True:
            select.select([fd], [], [])
            self.process_pending(budget=1 << 30)

    def close(self) -> None:
        self._budget.sock.close()
        try:
            self._nfq.unbind()
        except Exception:  # already unbound
            pass


class _Budget:
    """A non-blocking view of the queue socket whose ``recv`` says EAGAIN after
    ``left`` messages (what ``NetfilterQueue.run_socket`` stops on)."""

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=os.dup(fd))
        self.sock.setblocking(False)
        self.left = 0

    def recv(self, size: int) -> bytes:
        if self.left <= 0:
            raise BlockingIOError(errno.EAGAIN, "batch done")
        self.left -= 1
        return self.sock.recv(size)


# --- nfnetlink queue configuration (linux/netfilter/nfnetlink_queue.h) ------
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_CONFIG = 2
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQA_CFG_F_FAIL_OPEN = 1 << 0
NFQA_CFG_F_GSO = 1 << 2
NLM_F_REQUEST = 1


def config_message(queue_num: int, flags: int, mask: int, seq: int = 0) -> bytes:
    """An ``NFQNL_MSG_CONFIG`` netlink message setting ``flags`` under ``mask``."""
    # nlattr headers are host-endian; attribute payloads are big-endian
    attrs = struct.pack("=HH", 8, NFQA_CFG_MASK) + struct.pack("!I", mask)
    attrs += struct.pack("=HH", 8, NFQA_CFG_FLAGS) + struct.pack("!I", flags)
    nfgen = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack("!H", queue_num)
    body = nfgen + attrs
    header = struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG, NLM_F_REQUEST, seq, 0)
    return header + body


def set_queue_flags(fd: int, queue_num: int, flags: int, mask: int) -> None:
    sock = socket.socket(fileno=os.dup(fd))
    try:
        sock.sendto(config_message(queue_num, flags, mask), (0, 0))
    finally:
        sock.close()
