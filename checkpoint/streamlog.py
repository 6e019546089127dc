"""The two byte-stream records a replay failover needs.

Theory of operation
-------------------
**ByteLog** — every byte the client sent, from stream offset 0 (the byte
after its SYN), kept so that a backup can be sent the same input again.
Segments arrive in any order and overlap; the log keeps the contiguous prefix
in one ``bytearray`` and holds segments beyond a gap aside (bounded) until
the gap fills.  A byte already logged is never overwritten (the first copy is
the one the server may have consumed).  When the prefix would exceed
``limit`` the log stops growing and says why: the connection is then
*unprotected* (failing it over would lose bytes, so it is reset cleanly
instead).

**StreamDigest** — what the server sent, not kept but hashed: XXH3-128 per
64 KiB chunk of the contiguous stream, plus a running hash of the current
partial chunk.  The threat it answers is *accidental* divergence (a backup
serving another version of a file, another rendering of a page, a different
configuration), not a backup that forges a collision: past the verified
point a backup's bytes go to the client unchecked anyway, so a backup is
trusted as much as the primary, and a cryptographic hash (BLAKE2b, which this
used, hashes at a thirtieth of XXH3's speed here) would buy nothing against it.
A 128-bit hash makes an accidental match of two different chunks
(2**-128 per chunk) negligible.  A :class:`DigestSnapshot` taken at failover time pins the
stream as far as the client may have seen it.

**StreamVerifier** — fed the backup's regenerated stream in order, it
recomputes the same chunk hashes and compares them with the snapshot; it
reports how far the backup's stream is *verified* (every chunk up to there
matched, the last partial chunk included once reached) and the first
mismatch.  Bytes past the snapshot's end are new to the client and count as
verified once everything before them is.

**Restored digests** — a digest reloaded from a checkpoint store
(:meth:`StreamDigest.restored`) knows its full chunks' hashes but not the
running hash of its partial chunk (a hash object cannot be saved), nor what
the server sent while the appliance was down.  It is *blind* up to the next
chunk boundary: those bytes are counted (``end`` advances) but not hashed,
and their chunk's entry is ``None``.  Right after a restore (the *resync*
state) a segment may start beyond ``end``; the digest then jumps there,
blind again up to the next boundary, instead of waiting for bytes that will
never come.  This lasts until the owner clears ``resync`` — the data plane
does once the digest has passed what the client acknowledged after the
restart: a server retransmitting from its oldest unacknowledged byte first
covers the restore point, then leaps to new data past what the client already
holds, and that leap is a gap no retransmission fills.  A verifier skips ``None`` chunks (and a ``None``
partial) and counts them in ``unverified_bytes``: those bytes are taken on
trust, every later chunk is checked as usual.  Blindness also covers the
volatile-field masker's horizon: the masker's state is lost with the
restore, so a value whose pattern lay before the restart point must not
reach a hashed chunk.

Both digest and verifier can *mask volatile fields* first: a regenerated
HTTP response is the same bytes as the original except its ``Date:`` header,
so a service can name such fields (``VOLATILE``: a byte pattern and the
fixed length of the value after it) and their values are replaced by ``*``
on both sides before hashing.  The mask is a function of the bytes before
the position, so two streams equal up to a point are masked alike up to it.

Offsets are stream offsets (0-based, relative to ISN + 1), always smaller than
2**31 here: a log is capped well below, and a digest stops at 2**31 (tcpcp
section 6: a checkpoint with 2**31 bytes or more since it is not used).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable

import xxhash

from . import memsearch, xxh3
from .xxh3 import Hasher

CHUNK = 64 * 1024
DIGEST_SIZE = 16
MAX_OOO_SEGMENTS = 256
STREAM_LIMIT = 1 << 31


# name -> (pattern, length of the value that follows it)
VOLATILE: dict[str, tuple[bytes, int]] = {
    # RFC 9110 IMF-fixdate is exactly 29 characters: "Sun, 06 Nov 1994 08:49:37 GMT"
    "http-date": (b"\r\nDate: ", 29),
}


def _h() -> Hasher:
    """A hasher of the verifiers and samples (Python's xxhash: the cheapest call per segment)."""
    return xxhash.xxh3_128()


def _shared() -> Hasher:
    """The running hasher of a :class:`StreamDigest`: its state shared with the native engine's
    fast path when built (:mod:`checkpoint.xxh3`)."""
    return xxh3.new()


_EMPTY_DIGEST = _h().digest()  # the partial chunk's digest when it holds no bytes


class Masker:
    """Streaming replacement of volatile field values by ``*`` (fed in order)."""

    __slots__ = ("fields", "keep", "tail", "left")

    def __init__(self, names: tuple[str, ...]) -> None:
        self.fields = [VOLATILE[n] for n in names]
        self.keep = max((len(p) for p, _ in self.fields), default=1) - 1
        self.tail = b""
        self.left = 0  # bytes still to mask at the start of the next data

    def __call__(self, data: bytes | memoryview) -> bytes | bytearray | memoryview:
        if not self.fields:
            return data
        n = len(data)
        out: bytearray | None = None
        if self.left:
            k = min(self.left, n)
            out = bytearray(data)
            out[:k] = b"*" * k
            self.left -= k
        t = len(self.tail)
        # a match that begins in the tail (the previous data's last bytes) lies in this edge
        edge = self.tail + bytes(data[:self.keep]) if t else b""
        for pat, ln in self.fields:
            ends: list[int] = []  # where each match's value starts, in data's coordinates
            i = edge.find(pat)
            while 0 <= i < t:
                if i + len(pat) > t:  # it ends inside the new data (else it was handled before)
                    ends.append(i + len(pat) - t)
                i = edge.find(pat, i + 1)
            i = memsearch.find(data, pat)  # the bulk, in place: the whole stream goes through here
            while i >= 0:
                ends.append(i + len(pat))
                i = memsearch.find(data, pat, i + 1)
            for start in ends:
                stop = start + ln
                if out is None:
                    out = bytearray(data)
                k = max(0, min(stop, n) - start)
                out[start:start + k] = b"*" * k
                if stop > n:
                    self.left = max(self.left, stop - n)
        if self.keep:
            self.tail = bytes(data[-self.keep:]) if n >= self.keep else (self.tail + bytes(data))[-self.keep:]
        return data if out is None else out


class ByteLog:
    __slots__ = ("limit", "data", "ooo", "overflow", "fin_offset", "fin_server_offset", "base")

    def __init__(self, limit: int, base: int = 0) -> None:
        self.limit = limit      # bytes held at most (what follows ``base``)
        self.base = base        # stream offset of data[0]: the bytes before it were trimmed
        self.data = bytearray()
        self.ooo: dict[int, bytes] = {}
        self.overflow: str | None = None  # why the log stopped (None: complete)
        self.fin_offset: int | None = None
        # the server stream offset the primary had sent up to when the client's FIN was logged
        # (None: not known, a log from an older gateway): where a replay gives the backup the FIN
        self.fin_server_offset: int | None = None

    @property
    def end(self) -> int:
        """Stream offset after the contiguous prefix logged."""
        return self.base + len(self.data)

    @property
    def complete(self) -> bool:
        return self.overflow is None

    def _append(self, new: bytes | memoryview) -> bool:
        if len(self.data) + len(new) > self.limit:
            self.overflow = f"client sent more than the log limit ({self.limit} bytes)"
            return False
        self.data += new
        return True

    def add(self, offset: int, payload: bytes | memoryview) -> None:
        if self.overflow is not None or not payload:
            return
        end = self.end
        n = len(payload)
        if offset + n <= end:
            return  # all of it logged already
        if offset > end:
            if len(self.ooo) >= MAX_OOO_SEGMENTS:
                self.overflow = "too many out-of-order client segments"
                return
            old = self.ooo.get(offset)
            if old is None or len(old) < n:
                self.ooo[offset] = bytes(payload)
            return
        if not self._append(payload[end - offset:]):
            return
        while self.ooo:
            end = self.end
            ready = [o for o in self.ooo if o <= end]
            if not ready:
                break
            for o in sorted(ready):
                seg = self.ooo.pop(o)
                end = self.end
                if o + len(seg) > end and not self._append(seg[end - o:]):
                    return

    def read(self, offset: int, n: int) -> bytes:
        if offset < self.base:
            raise ValueError(f"log offset {offset} was trimmed (the log starts at {self.base})")
        i = offset - self.base
        return bytes(self.data[i:i + n])

    def trim(self, to: int) -> int:
        """Forget the bytes before stream offset ``to`` (no replay will need them: an
        HTTP-aware replay starts at a later message boundary).  Returns the bytes freed."""
        to = min(to, self.end)
        if to <= self.base:
            return 0
        k = to - self.base
        del self.data[:k]
        self.base = to
        for o in [o for o, seg in self.ooo.items() if o + len(seg) <= to]:
            del self.ooo[o]
        return k


def mask_horizon(names: tuple[str, ...]) -> int:
    """How far past a point a masked value can reach when its pattern started
    before the point (so a masker started there would miss it)."""
    return max((len(p) + ln - 1 for p, ln in (VOLATILE[n] for n in names)), default=0)


@dataclass(frozen=True, slots=True)
class DigestSnapshot:
    chunks: tuple[bytes | None, ...]  # None: a chunk not hashed (blind after a restore)
    partial: bytes | None  # digest of the bytes after the last full chunk (None: blind)
    end: int            # stream bytes covered
    volatile: tuple[str, ...] = ()  # fields masked before hashing
    base: int = 0       # where chunks[0] starts (the stream before it was trimmed)
    bounds: tuple[int, ...] | None = None  # each chunk's end offset (None: every CHUNK from base)
    cuts: tuple[int, ...] = ()  # offsets (>= base) where the chunk grid and the masker restart

    def bound(self, i: int) -> int:
        """End offset of chunk ``i``."""
        return self.bounds[i] if self.bounds is not None else self.base + (i + 1) * CHUNK

    @property
    def partial_start(self) -> int:
        return self.bound(len(self.chunks) - 1) if self.chunks else self.base

    @property
    def partial_len(self) -> int:
        return self.end - self.partial_start

    def chunk_starts(self) -> list[int]:
        """Every offset a verifier may start at: each chunk's start, and the partial's."""
        return [self.base] + [self.bound(i) for i in range(len(self.chunks))]


class StreamDigest:
    __slots__ = ("chunks", "bounds", "base", "dropped", "grid", "cuts", "cutter", "cur", "end", "ooo",
                 "overflow", "volatile", "mask", "blind_until", "resync")

    def __init__(self, volatile: tuple[str, ...] = ()) -> None:
        self.volatile = volatile
        self.mask = Masker(volatile)
        self.chunks: list[bytes | None] = []
        self.bounds: list[int] = []  # chunks[i] covers [bounds[i-1] (or base), bounds[i])
        self.base = 0        # start of chunks[0]: the stream before it was trimmed
        self.dropped = 0     # chunks trimmed (chunks[0] is the stream's chunk number ``dropped``)
        self.grid = 0        # chunks end at grid + k * CHUNK (the last cut)
        self.cuts: list[int] = []  # offsets >= base where the grid and the masker restarted
        # HTTP-aware replay: told the contiguous bytes before they are hashed, it returns
        # the stream offsets in them where a new message starts (there the digest cuts)
        self.cutter: Callable[[memoryview], list[int]] | None = None
        self.cur: Hasher | None = _shared()  # None while blind (end < blind_until)
        self.end = 0
        self.ooo: dict[int, bytes] = {}   # segments beyond a gap, until it fills
        self.overflow: str | None = None  # why hashing stopped (None: contiguous)
        self.blind_until = 0  # bytes below this are counted, not hashed (a chunk boundary)
        self.resync = False   # restored: a segment may jump over a gap (until the owner clears it)

    @classmethod
    def restored(cls, chunks: list[bytes | None] | tuple[bytes | None, ...], end: int,
                 volatile: tuple[str, ...] = (), *, base: int = 0, bounds: list[int] | None = None,
                 grid: int | None = None, cuts: list[int] | tuple[int, ...] = (), dropped: int = 0) -> "StreamDigest":
        """A digest reloaded from a checkpoint: ``chunks`` are the hashes of its full
        chunks from ``base`` (``bounds`` their end offsets; by default every CHUNK from
        ``base``); chunks missing at the end (not saved yet) are blind: None.  The partial
        chunk is blind, and the first segment fed may start beyond ``end`` (see the module)."""
        d = cls(volatile)
        d.base, d.dropped, d.cuts = base, dropped, [c for c in cuts if c >= base]
        d.grid = grid if grid is not None else (d.cuts[-1] if d.cuts else base)
        d.grid = max(d.grid, base)  # a trim point is a chunk start: the lattice from it is the same
        if bounds is None:
            bounds = [base + (i + 1) * CHUNK for i in range(len(chunks))]
        if len(bounds) != len(chunks) or any(b > end for b in bounds):
            raise ValueError(f"{len(chunks)} chunk hashes for {end} bytes ({len(bounds)} bounds)")
        d.chunks, d.bounds = list(chunks), list(bounds)
        d.end = d.bounds[-1] if d.bounds else base
        while d._next_bound() <= end:
            d.chunks.append(None)
            d.bounds.append(d._next_bound())
            d.end = d.bounds[-1]
        d.end = end
        d.resync = True
        d._blind_from(end)
        return d

    @property
    def chunk_start(self) -> int:
        """Start of the current (partial) chunk."""
        return self.bounds[-1] if self.bounds else self.base

    def _next_bound(self) -> int:
        """End of the chunk ``end`` is in (the next one if ``end`` is on a boundary)."""
        return self.grid + ((self.end - self.grid) // CHUNK + 1) * CHUNK

    def _blind_from(self, start: int) -> None:
        """Bytes from ``start`` are not hashed up to the first chunk boundary at or
        past ``start`` plus the masker's horizon (a boundary itself is not blind
        when there is no horizon)."""
        reach = start + mask_horizon(self.volatile)
        until = self.grid + -(-(reach - self.grid) // CHUNK) * CHUNK
        if until > start:
            self.blind_until = until
            self.cur = None

    def _jump(self, offset: int) -> None:
        """Resync: skip to ``offset``; the chunks in between become blind."""
        while self._next_bound() <= offset:  # the current chunk ends before offset
            self.chunks.append(None)
            self.bounds.append(self._next_bound())
            self.end = self.bounds[-1]
        self.end = offset
        self.mask = Masker(self.volatile)  # its state was for bytes before the gap
        self.cur = _shared()
        self.blind_until = 0
        self._blind_from(offset)

    def add(self, offset: int, payload: bytes | memoryview) -> None:
        if self.overflow is not None:
            return
        n = len(payload)
        if offset + n <= self.end or n == 0:
            return
        if self.resync and offset > self.end and offset + n <= STREAM_LIMIT:
            # bytes the old process saw (or that passed while it was down) never come
            # again: jump over the gap, until the owner says the stream is caught up
            self._jump(offset)
        if offset > self.end:
            if len(self.ooo) >= MAX_OOO_SEGMENTS:
                self.overflow = "too many out-of-order server segments"
            elif len(self.ooo.get(offset, b"")) < n:
                self.ooo[offset] = bytes(payload)
            return
        if offset + n > STREAM_LIMIT:
            self.overflow = "server stream reached 2**31 bytes"
            return
        self._feed(memoryview(payload)[self.end - offset:])
        while self.ooo:
            ready = sorted(o for o in self.ooo if o <= self.end)
            if not ready:
                break
            for o in ready:
                seg = self.ooo.pop(o)
                if o + len(seg) > self.end:
                    self._feed(memoryview(seg)[self.end - o:])

    def _feed(self, mv: memoryview) -> None:
        """Contiguous bytes at ``end``: hashed, cut where the cutter says a message starts."""
        if self.cutter is None:
            return self._hash(mv)
        for c in self.cutter(mv):
            k = c - self.end
            if 0 <= k <= len(mv):
                self._hash(mv[:k])
                mv = mv[k:]
                self.cut()
        self._hash(mv)

    def cut(self) -> None:
        """A new message starts at ``end``: the current chunk ends here (early), and the
        chunk grid and the masker restart, so that a verifier can start here with nothing
        of the stream before it."""
        if self.end > self.chunk_start:
            self.chunks.append(None if self.cur is None else self.cur.digest())
            self.bounds.append(self.end)
        self.grid = self.end
        if not self.cuts or self.cuts[-1] != self.end:
            self.cuts.append(self.end)
        self.mask = Masker(self.volatile)
        self.cur = _shared()
        self.blind_until = 0

    def trim(self, to: int) -> int:
        """Forget the chunks that end at or before ``to`` (a replay never starts before
        it again).  ``to`` should be a chunk start (a cut).  Returns the chunks dropped."""
        k = bisect.bisect_right(self.bounds, to)
        if k == 0:
            return 0
        self.base = self.bounds[k - 1]
        del self.chunks[:k]
        del self.bounds[:k]
        self.dropped += k
        self.cuts = [c for c in self.cuts if c >= self.base]
        return k

    def _hash(self, mv: memoryview) -> None:
        if not len(mv):
            return
        mv = memoryview(self.mask(mv))
        if self.end < self.blind_until:
            mv = self._skip(mv)
        while len(mv):
            cur = self.cur
            assert cur is not None, "hashing while blind"  # _skip counted every blind byte
            nb = self._next_bound()
            part = mv[:nb - self.end]
            cur.update(part)
            self.end += len(part)
            mv = mv[len(part):]
            if self.end == nb:
                self.chunks.append(cur.digest())
                self.bounds.append(nb)
                cur.reset()  # in place: the fast path may hold this state (appliance.dataplane.offload)

    def _skip(self, mv: memoryview) -> memoryview:
        """Count (not hash) the blind bytes at the start of ``mv``."""
        while len(mv) and self.end < self.blind_until:
            nb = self._next_bound()
            k = min(len(mv), nb - self.end, self.blind_until - self.end)
            self.end += k
            mv = mv[k:]
            if self.end == nb:
                self.chunks.append(None)
                self.bounds.append(nb)
        if self.end >= self.blind_until:
            self.cur = _shared()
        return mv

    def snapshot(self) -> DigestSnapshot:
        """What the stream is so far.  ``partial`` is None only when the bytes after
        the last full chunk are blind: an empty partial chunk (``end`` on a boundary)
        has nothing blind in it, so it is the empty digest even while the digest is
        blind past ``end`` (a horizon reaching into the next chunk)."""
        partial: bytes | None
        if self.end == self.chunk_start:
            partial = _EMPTY_DIGEST
        else:
            partial = None if self.cur is None else self.cur.copy().digest()
        return DigestSnapshot(tuple(self.chunks), partial, self.end, self.volatile, self.base,
                              tuple(self.bounds), tuple(self.cuts))


class StreamVerifier:
    """Checks a regenerated stream, fed in order, against a snapshot.

    ``start`` (a chunk start of the snapshot: its base, a chunk's end, a cut) is the stream
    offset the regenerated stream is checked from; ``prime`` bytes before it, when given,
    only feed the masker (a verifier starting mid-message sees a value whose pattern lay
    before ``start`` as the digest did)."""

    __slots__ = ("snap", "cur", "end", "start", "verified", "mismatch_at", "mask", "unverified_bytes", "i", "cuts")

    def __init__(self, snap: DigestSnapshot, start: int | None = None, prime: int = 0) -> None:
        self.snap = snap
        start = snap.base if start is None else start
        starts = snap.chunk_starts()
        i = bisect.bisect_left(starts, start)
        if i == len(starts) or starts[i] != start:
            raise ValueError(f"a verifier cannot start at {start}: not a chunk start of the snapshot")
        self.i = i            # the chunk being checked (len(chunks): the partial)
        self.mask = Masker(snap.volatile)
        self.cur = _h()
        self.start = start
        self.end = start - prime  # contiguous bytes received (from here on)
        self.verified = start     # [start, verified) matched the snapshot (blind chunks taken on trust)
        self.mismatch_at: int | None = None
        self.unverified_bytes = 0  # bytes in blind chunks (None in the snapshot): not checked
        self.cuts = [c for c in snap.cuts if c > start]

    @property
    def done(self) -> bool:
        """Everything the snapshot covers has been checked and matched."""
        return self.mismatch_at is None and self.end >= self.snap.end

    def verified_end(self) -> int:
        """Bytes [start, verified_end) are known good (past the snapshot: all received)."""
        if self.mismatch_at is not None:
            return 0
        return self.end if self.end >= self.snap.end else self.verified

    def add(self, offset: int, payload: bytes | memoryview) -> bool:
        """Feed bytes at ``offset``; False once a mismatch was found.  Bytes
        beyond ``end`` (a gap) are ignored: the caller feeds in order."""
        if self.mismatch_at is not None:
            return False
        n = len(payload)
        if offset + n <= self.end or offset > self.end:
            return True
        if self.end >= self.snap.end:  # past the snapshot: nothing to check, nothing to mask
            self.end = offset + n
            return True
        mv = memoryview(payload)[self.end - offset:]
        while len(mv):
            cut = self.cuts[0] if self.cuts else None
            k = len(mv) if cut is None else min(len(mv), cut - self.end)
            if not self._check(memoryview(self.mask(mv[:k]))):
                return False
            mv = mv[k:]
            if cut is not None and self.end >= cut:
                self.cuts.pop(0)
                self.mask = Masker(self.snap.volatile)
        return True

    def _check(self, mv: memoryview) -> bool:
        if self.end < self.start:  # priming: masked, not hashed
            k = min(len(mv), self.start - self.end)
            self.end += k
            mv = mv[k:]
        snap = self.snap
        nchunks = len(snap.chunks)
        while len(mv) and self.end < snap.end:
            if self.i < nchunks:
                stop, want = snap.bound(self.i), snap.chunks[self.i]
            else:
                stop, want = snap.end, snap.partial
            part = mv[:stop - self.end]
            if want is None:
                self.unverified_bytes += len(part)
            else:
                self.cur.update(part)
            self.end += len(part)
            mv = mv[len(part):]
            if self.end == stop:
                if want is not None and self.cur.digest() != want:
                    self.mismatch_at = snap.bound(self.i - 1) if self.i else snap.base
                    return False
                self.cur = _h()
                self.verified = self.end
                self.i += 1
        self.end += len(mv)  # past the snapshot: new bytes
        return True

# --- sampled verification ------------------------------------------------------------
#
# With ``verify = "sampled"`` the return path is observed, not held: the
# gateway gets the headers and the first few KiB of each (GSO super-)packet,
# never all of the stream.  It hashes what it gets, as *samples* at their
# stream offsets; a backup's regenerated stream (which the gateway does see in
# full) is checked against every sample below the point the client has seen.
# The first SAMPLE_CONTEXT bytes of a sample feed the volatile-field masker
# but are not hashed, so a sample that starts inside a masked value (its
# pattern lay before the sample) cannot cause a false mismatch.

SAMPLE_CONTEXT = 64
MAX_SAMPLES = 8192


def _sample_digest(data: bytes | bytearray | memoryview, volatile: tuple[str, ...]) -> bytes:
    mask = Masker(volatile)
    masked = bytes(mask(bytes(data)))
    h = _h()
    h.update(masked[SAMPLE_CONTEXT:])
    return h.digest()


@dataclass(frozen=True, slots=True)
class SampledSnapshot:
    samples: tuple[tuple[int, int, bytes], ...]  # (offset, length, digest), by offset
    end: int                                     # stream bytes the client may have seen
    volatile: tuple[str, ...] = ()


class SampledDigest:
    """Samples of a stream seen through header-and-prefix copies."""

    __slots__ = ("samples", "end", "volatile", "stride", "overflow", "_count")

    def __init__(self, volatile: tuple[str, ...] = ()) -> None:
        self.samples: list[tuple[int, int, bytes]] = []
        self.end = 0
        self.volatile = volatile
        self.stride = 1          # keep one sample in ``stride`` (doubles when the list is full)
        self.overflow: str | None = None
        self._count = 0

    def add(self, offset: int, captured: bytes | memoryview, total: int) -> None:
        """A segment of ``total`` payload bytes at ``offset``, of which the
        first ``len(captured)`` were copied to us."""
        if offset + total > self.end:
            self.end = min(offset + total, STREAM_LIMIT)
        if len(captured) <= SAMPLE_CONTEXT or offset + len(captured) > STREAM_LIMIT:
            return
        self._count += 1
        if self._count % self.stride:
            return
        if self.samples and offset <= self.samples[-1][0]:
            return  # a retransmission or reordering: keep samples in stream order
        self.samples.append((offset, len(captured), _sample_digest(captured, self.volatile)))
        if len(self.samples) >= MAX_SAMPLES:
            self.samples = self.samples[::2]
            self.stride *= 2

    def snapshot(self) -> SampledSnapshot:
        return SampledSnapshot(tuple(self.samples), self.end, self.volatile)


class SampledVerifier:
    """Checks a regenerated stream, fed in order, against the samples."""

    __slots__ = ("snap", "end", "buf", "buf_start", "i", "mismatch_at")

    def __init__(self, snap: SampledSnapshot) -> None:
        self.snap = snap
        self.end = 0
        self.buf = bytearray()   # regenerated bytes from buf_start to end
        self.buf_start = 0
        self.i = 0               # next sample to check
        self.mismatch_at: int | None = None

    @property
    def done(self) -> bool:
        return self.mismatch_at is None and self.end >= self.snap.end

    def verified_end(self) -> int:
        if self.mismatch_at is not None:
            return 0
        if self.i < len(self.snap.samples):
            return min(self.end, self.snap.samples[self.i][0])
        return self.end

    def add(self, offset: int, payload: bytes | memoryview) -> bool:
        if self.mismatch_at is not None:
            return False
        n = len(payload)
        if offset + n <= self.end or offset > self.end:
            return True
        self.buf += memoryview(payload)[self.end - offset:]
        self.end = offset + n
        samples = self.snap.samples
        while self.i < len(samples):
            off, ln, digest = samples[self.i]
            if off + ln > self.end:
                break
            a = off - self.buf_start
            if _sample_digest(self.buf[a:a + ln], self.snap.volatile) != digest:
                self.mismatch_at = off
                return False
            self.i += 1
        keep_from = min(samples[self.i][0], self.end) if self.i < len(samples) else self.end
        if keep_from > self.buf_start:
            del self.buf[:keep_from - self.buf_start]
            self.buf_start = keep_from
        return True
