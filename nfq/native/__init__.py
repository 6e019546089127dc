"""The native NFQUEUE binding: :class:`NativeQueue`, a drop-in for :class:`nfq.queue.PacketQueue`.

The C part (``nfqbind.c``, its theory of operation at the top) binds a queue with whole-packet
copies up to 64 KiB, ``NFQA_CFG_F_GSO`` on every queue, big socket buffers, and reads a batch
of packets with one system call; verdicts go back in batches (``NFQNL_MSG_VERDICT_BATCH`` for
runs of plain accepts).  This wrapper runs the same handler as ``PacketQueue`` — bytes in, a
:class:`~nfq.queue.Verdict` out, always a verdict even when the handler raises — on each packet
of the batch, and commits the batch's verdicts at its end.

The gate (a node of a gateway pair that may stop forwarding) is asked for each packet and again
right before a batch's verdicts leave: packets accepted before a freeze are dropped at a thaw.

Order.  A verdict is sent at the end of the batch, so a packet the handler *sends* (an injected
segment, a held ACK) while handling packet k would leave before packets 0..k-1 of the batch are
let go.  The owner calls :meth:`NativeQueue.flush_verdicts` before every send
(``appliance.daemon`` wraps the gateway's send function): packets before k leave first, then
what k's handler sends, then k — the order the one-packet-at-a-time binding gave.

GSO.  With ``NFQA_CFG_F_GSO`` the kernel no longer finishes checksums before queueing: a
super-packet (up to 64 KiB), and any packet whose checksum a device would finish (every TCP
packet a local veth sends), arrives with only the pseudo-header's sum in its TCP checksum field
(``NFQA_SKB_CSUMNOTREADY``).  The handler must see a valid packet — it keeps copies to send
again later (an ACK held for its commit, a held client segment) — so the wrapper completes the
TCP checksum of its copy first (in C, about 5 µs for 64 KiB).  The kernel's own packet stays as
it was: left unchanged it goes on as it is; rewritten, the kernel takes the handler's bytes,
checksum included, as final.  A packet longer than the copy range (over 65,531 bytes, which
TCP's own GSO never builds) arrives truncated and is handled as a header-only copy.

Counted, never silent: ``ENOBUFS`` (the kernel could not deliver packets to the socket: they were
dropped, or accepted under fail-open), messages that did not parse, verdicts the kernel refused,
and the kernel's own per-queue counters (``/proc/net/netfilter/nfnetlink_queue``: packets
dropped for a full queue and for a failed delivery).
"""

from __future__ import annotations

import logging
import select
import time
from collections.abc import Callable
from typing import Any, Protocol

from nfq.queue import (
    NFQA_CFG_F_FAIL_OPEN,
    NFQA_CFG_F_GSO,
    Handler,
    QueueStats,
    Verdict,
)

log = logging.getLogger(__name__)

COPY_MAX = 0xFFFF - 4          # the kernel's NFQNL_MAX_COPY_RANGE
SKB_CSUM_NOT_READY = 1
SKB_GSO = 2
BATCH = 64


def available() -> bool:
    """Is the compiled module built (``python -m nfq.native.build``)?"""
    try:
        from . import _nfqbind  # noqa: F401
    except ImportError:
        return False
    return True


def _lib() -> tuple[Any, Any]:
    try:
        from ._nfqbind import ffi, lib  # type: ignore[import-not-found]
    except ImportError as exc:
        raise RuntimeError("the native NFQUEUE binding is not built: run deploy/bootstrap.sh "
                           "(or python -m nfq.native.build)") from exc
    return ffi, lib


def kernel_counters(queue_num: int) -> dict[str, int]:
    """The kernel's counters of one queue (``/proc/net/netfilter/nfnetlink_queue``), or {}."""
    try:
        with open("/proc/net/netfilter/nfnetlink_queue") as f:
            for line in f:
                cols = line.split()
                # queue, portid, waiting, copy mode, copy range, queue dropped, user dropped, last id, 1
                if len(cols) >= 7 and cols[0] == str(queue_num):
                    return {"waiting": int(cols[2]), "queue_dropped": int(cols[5]), "user_dropped": int(cols[6])}
    except OSError:
        pass
    return {}


def tcp_offset(buf: bytearray) -> int:
    """Where the TCP header starts (the packet parsed already, so its headers are whole)."""
    if buf[0] >> 4 == 4:
        return (buf[0] & 0x0F) * 4
    if buf[6] == 6:
        return 40
    from nfq.packet import PacketView

    return PacketView(buf).ihl  # IPv6 with extension headers: walk them


class FastPath(Protocol):
    """The owner of a flow cache (``fastpath.c``; ``appliance.dataplane.offload.Offload``)."""

    cache: Any        # struct fpc *
    enabled: bool
    wants_packets: bool  # give sync the fast packets' bytes (the panel's packet ring)

    def sync(self, now: float, fast_packets: list[memoryview] | None = None) -> int: ...


class NativeStats(QueueStats):
    """``QueueStats`` plus the binding's own counters and the kernel's."""

    def __init__(self, owner: NativeQueue) -> None:
        super().__init__()
        self._owner = owner

    def as_dict(self) -> dict[str, object]:
        d = super().as_dict()
        d["binding"] = "native"  # (the base class says "python")
        d.update(self._owner.native_counters())
        return d


class NativeQueue:
    def __init__(
        self,
        queue_num: int,
        handler: Handler,
        *,
        on_error: Verdict = Verdict.ACCEPT,
        max_len: int = 16384,
        sock_len: int = 32 * 1024 * 1024,
        copy_range: int = COPY_MAX,
        fail_open: bool = False,
        gso: bool = True,
        clear_mark: int | None = None,
        gate: Callable[[], bool] | None = None,
        batch: int = BATCH,
        fastpath: FastPath | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        ffi, lib = _lib()
        self._ffi, self._lib = ffi, lib
        if not 0 < copy_range <= COPY_MAX:
            raise ValueError(f"copy_range must be 1..{COPY_MAX}")
        self.queue_num = queue_num
        self.handler = handler
        self.on_error = on_error
        self.clear_mark = clear_mark
        self.gate = gate
        self.stats = NativeStats(self)
        flags = (NFQA_CFG_F_FAIL_OPEN if fail_open else 0) | (NFQA_CFG_F_GSO if gso else 0)
        err = ffi.new("char[]", 256)
        q = lib.nfqb_open(queue_num, copy_range, flags, max_len, sock_len, batch, err, 256)
        if q == ffi.NULL:
            raise OSError(f"NFQUEUE {queue_num}: {ffi.string(err).decode(errors='replace')}")
        self._q = q
        self._pkts = lib.nfqb_packets(q)
        self._keep: list[bytearray] = []  # rewritten payloads, alive until their verdict is sent
        self._decided = 0   # packets of the current batch whose verdicts are sent
        self._current = 0   # the packet being handled
        self._closed = False
        self.checksums_completed = 0  # copies whose TCP checksum the wrapper finished
        # the compiled fast path: packets of offloaded flows decided in C before the handler runs
        self.fastpath = fastpath
        self.clock = clock
        self.fast = 0  # packets the fast path decided
        self._punted = ffi.new("int32_t[]", batch)
        self._fast = ffi.new("int32_t[]", batch)
        self._nfast = ffi.new("int *")

    def fileno(self) -> int:
        return int(self._lib.nfqb_fileno(self._q))

    def native_counters(self) -> dict[str, int]:
        if self._closed:
            return {}
        s = self._lib.nfqb_stats(self._q)
        out = {k: int(getattr(s, k)) for k in (
            "received", "gso_packets", "enobufs", "recv_errors", "parse_errors", "verdicts", "batch_verdicts",
            "verdict_errors")}
        out["checksums_completed"] = self.checksums_completed
        out["fast_path"] = self.fast
        out.update({f"kernel_{k}": v for k, v in kernel_counters(self.queue_num).items()})
        return out

    def flush_verdicts(self) -> None:
        """Send the verdicts of the packets handled so far in this batch (before a send)."""
        if self._current > self._decided:
            self._commit(self._decided, self._current)
            self._decided = self._current
            self._keep.clear()

    def _commit(self, start: int, end: int) -> None:
        """Send the verdicts of packets [start, end).  The gate is asked again right before: a
        node of a gateway pair stopped in the middle of a batch (SIGSTOP, a paused VM) and thawed
        after a takeover must not let the batch's accepted packets go, which the one-packet
        binding guaranteed by asking it before each verdict."""
        lib, st = self._lib, self.stats
        if self.gate is not None and not self.gate():
            for i in range(start, end):
                p = self._pkts[i]
                if p.verdict == 0:  # NF_DROP already
                    continue
                if p.new_data != self._ffi.NULL:
                    st.rewritten -= 1
                else:
                    st.accepted -= 1
                st.dropped += 1
                st.gated += 1
                lib.nfqb_decide(self._q, i, 0, self._ffi.NULL, 0, -1)
        if lib.nfqb_commit(self._q, start, end) < 0:
            st.last_error = "a verdict batch was refused by the kernel"

    def process_pending(self, budget: int = 64) -> None:
        """Handle up to ``budget`` waiting packets (in batches), then return."""
        lib, ffi, q, pkts = self._lib, self._ffi, self._q, self._pkts
        st = self.stats
        left = budget
        while left > 0:
            n = lib.nfqb_recv(q, min(left, BATCH))
            if n <= 0:
                break
            left -= n
            t0 = time.perf_counter()
            self._decided = 0
            order: range | list[int] = range(n)
            fp = self.fastpath
            if fp is not None and fp.enabled and (self.gate is None or self.gate()):
                # the fast path decides what it can; the records are synced before the handler
                # sees the rest (a connection's later packets in the batch all come here)
                k = lib.fpc_batch(fp.cache, q, n, -1 if self.clear_mark is None else self.clear_mark,
                                  self._punted, self._fast, self._nfast)
                nf = self._nfast[0]
                if nf:
                    self.fast += nf
                    st.packets += nf
                    st.accepted += nf
                    fast = self._fast
                    try:
                        fp.sync(self.clock(), [memoryview(ffi.buffer(pkts[fast[j]].data, pkts[fast[j]].len))
                                               for j in range(nf)] if fp.wants_packets else None)
                    except Exception as exc:  # the batch's verdicts go out whatever happens here
                        st.handler_errors += 1
                        st.last_error = f"fast path sync: {type(exc).__name__}: {exc}"
                        log.exception("fast path sync failed")
                order = self._punted[0:k] if k < n else range(n)
            for i in order:
                self._current = i
                p = pkts[i]
                st.packets += 1
                buf: bytearray | None
                try:
                    buf = bytearray(ffi.buffer(p.data, p.len))
                    if p.skbinfo & SKB_CSUM_NOT_READY and p.orig_len == p.len:
                        self._complete_checksum(buf)
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
                mark = 0 if self.clear_mark is not None and p.mark == self.clear_mark else -1
                if verdict is Verdict.REWRITTEN and buf is not None and p.orig_len == p.len:
                    # (its checksum was completed on arrival and kept right by the handler's
                    # incremental updates)
                    self._keep.append(buf)
                    if lib.nfqb_decide(q, i, 1, ffi.from_buffer(buf), len(buf), mark) < 0:
                        st.handler_errors += 1
                        st.last_error = "rewritten packet refused by the binding"
                        lib.nfqb_decide(q, i, 1 if self.on_error is not Verdict.DROP else 0, ffi.NULL, 0, mark)
                        self._count(self.on_error)
                    else:
                        st.rewritten += 1
                elif verdict is Verdict.DROP:
                    lib.nfqb_decide(q, i, 0, ffi.NULL, 0, mark)
                    st.dropped += 1
                else:  # accept (a rewrite of a truncated copy cannot be applied: PacketView refuses it)
                    if mark >= 0:
                        lib.nfqb_decide(q, i, 1, ffi.NULL, 0, mark)
                    st.accepted += 1
            self._current = n
            self._commit(self._decided, n)
            self._decided = self._current = 0
            self._keep.clear()
            st.busy_seconds += time.perf_counter() - t0

    def _complete_checksum(self, buf: bytearray) -> None:
        """Finish the TCP checksum the kernel left to the device (see the module's doc)."""
        try:
            l4 = tcp_offset(buf)
        except Exception:  # not a packet the handler can parse either: it counts it
            return
        if self._lib.nfqb_tcp_checksum(self._ffi.from_buffer(buf), len(buf), l4) == 0:
            self.checksums_completed += 1

    def _count(self, verdict: Verdict) -> None:
        if verdict is Verdict.DROP:
            self.stats.dropped += 1
        else:
            self.stats.accepted += 1

    def run_forever(self) -> None:
        fd = self.fileno()
        while True:
            select.select([fd], [], [])
            self.process_pending(budget=1 << 30)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._lib.nfqb_close(self._q)
