"""checkpoint.streamlog for HTTP-aware replay: trimmed logs, digests cut at message
boundaries (a verifier may start at a cut, or mid-message with a primed masker), trimmed
digests.  Sans-I/O: byte streams only."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpoint.streamlog import (
    CHUNK, MAX_OOO_SEGMENTS, ByteLog, DigestSnapshot, StreamDigest, StreamVerifier, mask_horizon,
)

PROP = settings(max_examples=100, deadline=None)
VOLATILE = ("http-date",)
DATE1 = b"Sun, 06 Nov 1994 08:49:37 GMT"
DATE2 = b"Fri, 21 Nov 2025 05:44:00 GMT"


# ----- ByteLog.trim ------------------------------------------------------------------------

def test_trim_frees_the_prefix_and_keeps_the_end():
    log = ByteLog(1 << 20)
    data = bytes(range(100))
    log.add(0, data)
    assert log.trim(40) == 40
    assert (log.base, log.end, len(log.data)) == (40, 100, 60)
    assert bytes(log.data) == data[40:]
    assert log.read(40, 10) == data[40:50] and log.read(95, 100) == data[95:]
    assert log.complete


@pytest.mark.parametrize("offset", [0, 1, 39])
def test_read_below_the_base_raises(offset):
    log = ByteLog(1 << 20)
    log.add(0, b"x" * 100)
    log.trim(40)
    with pytest.raises(ValueError, match="trimmed"):
        log.read(offset, 5)


def test_trim_below_the_base_or_past_the_end():
    log = ByteLog(1 << 20)
    log.add(0, b"a" * 50)
    assert log.trim(0) == 0 and log.base == 0
    log.trim(20)
    assert log.trim(20) == 0 and log.trim(10) == 0 and log.base == 20  # never goes back
    assert log.trim(500) == 30  # past the end: trimmed to the end, nothing more
    assert (log.base, log.end, bytes(log.data)) == (50, 50, b"")
    log.add(50, b"bc")
    assert (log.base, log.end, log.read(50, 2)) == (50, 52, b"bc")


def test_add_after_trim_at_absolute_offsets():
    log = ByteLog(1 << 20)
    log.add(0, b"GET /a HTTP/1.1\r\n\r\n")
    log.trim(19)
    log.add(19, b"GET /b")
    log.add(25, b" HTTP/1.1\r\n\r\n")
    assert log.end == 19 + 19 and log.read(19, 19) == b"GET /b HTTP/1.1\r\n\r\n"
    # a retransmission entirely below the base is ignored; one straddling the end adds only its new bytes
    log.add(0, b"XXXXXXXXXXXXXXXXXXX")
    log.add(10, b"Y" * 30)
    assert log.end == 40 and log.read(19, 21) == b"GET /b HTTP/1.1\r\n\r\nYY"
    assert not log.ooo


def test_limit_counts_only_the_bytes_held():
    log = ByteLog(1000)
    log.add(0, b"a" * 1000)
    assert log.complete
    log.trim(900)
    log.add(1000, b"b" * 900)  # past offset 1000: 1000 bytes held, the limit
    assert log.complete and (log.base, log.end) == (900, 1900)
    assert log.read(1890, 20) == b"b" * 10
    log.trim(1900)
    for off in range(1900, 5000, 500):  # a keep-alive connection goes on for ever
        log.add(off, b"c" * 500)
        log.trim(off)
    assert log.complete and log.end == 5400 and len(log.data) == 500
    log.add(log.end, b"d" * 501)  # but never more than the limit at once
    assert not log.complete and "limit" in log.overflow and log.end == 5400


def test_limit_with_a_base_from_a_restore():
    log = ByteLog(10, base=1_000_000)
    assert (log.base, log.end) == (1_000_000, 1_000_000)
    log.add(1_000_000, b"0123456789")
    assert log.complete and log.read(1_000_005, 5) == b"56789"


def test_out_of_order_segments_around_a_trim():
    log = ByteLog(1 << 20)
    log.add(0, b"a" * 100)
    log.add(150, b"c" * 50)  # beyond a gap: held aside
    log.trim(80)
    # held bytes beyond the end are kept by a trim (the end never passes them)
    assert set(log.ooo) == {150}
    # below the trim point: dropped, never held aside, never logged
    log.add(10, b"z" * 20)
    log.add(0, b"z" * 80)
    assert set(log.ooo) == {150} and log.read(80, 20) == b"a" * 20
    log.add(100, b"b" * 50)  # the gap fills: what was held joins
    assert not log.ooo and log.end == 200 and log.read(80, 120) == b"a" * 20 + b"b" * 50 + b"c" * 50
    log.trim(200)
    assert log.base == log.end == 200 and len(log.data) == 0


def test_held_segments_count_towards_the_ooo_bound_after_a_trim():
    log = ByteLog(1 << 20)
    log.add(0, b"a")
    log.trim(1)
    for i in range(MAX_OOO_SEGMENTS):
        log.add(3 + 2 * i, b"x")
    assert log.complete
    log.add(0, b"a")  # below the base: ignored, not an out-of-order segment
    assert log.complete
    log.add(10_000, b"y")
    assert not log.complete and "out-of-order" in log.overflow


# ----- StreamDigest: cuts at message boundaries ----------------------------------------------

def response(n_body: int, date: bytes = DATE1, seed: int = 0, body: bytes | None = None) -> bytes:
    if body is None:
        body = random.Random(seed).randbytes(n_body)
    return (b"HTTP/1.1 200 OK\r\nServer: t\r\nDate: " + date + b"\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


def stream(date: bytes = DATE1, sizes=(500, 70_000, 3000, 140_000, 10)) -> tuple[bytes, list[int]]:
    """Responses back to back, and the offsets where each ends (a new message starts)."""
    parts = [response(n, date, seed=i) for i, n in enumerate(sizes)]
    ends, pos = [], 0
    for p in parts:
        pos += len(p)
        ends.append(pos)
    return b"".join(parts), ends


def boundary_cutter(dg: StreamDigest, boundaries: list[int]):
    """A cutter (as HttpTrack's): the boundaries inside each contiguous piece."""
    seen: list[tuple[int, int]] = []

    def cutter(mv: memoryview) -> list[int]:
        a, b = dg.end, dg.end + len(mv)
        seen.append((a, b))
        return [x for x in boundaries if a < x <= b]
    cutter.seen = seen  # type: ignore[attr-defined]
    return cutter


def feed(dg: StreamDigest, data: bytes, points, base: int = 0) -> None:
    pts = sorted({0, len(data), *[p for p in points if 0 < p < len(data)]})
    for a, b in zip(pts, pts[1:]):
        dg.add(base + a, data[a:b])


def cut_digest(data: bytes, ends: list[int], points=(), volatile=VOLATILE) -> StreamDigest:
    dg = StreamDigest(volatile)
    dg.cutter = boundary_cutter(dg, ends)
    feed(dg, data, points or range(0, len(data), 1448))
    return dg


def verify(snap: DigestSnapshot, data: bytes, start: int, prime: int = 0, seg: int = 1448,
           data_base: int = 0) -> StreamVerifier:
    """A verifier from ``start`` fed ``data`` (stream offsets from data_base) from start - prime."""
    v = StreamVerifier(snap, start, prime)
    pos = start - prime
    while pos < data_base + len(data):
        v.add(pos, data[pos - data_base:pos - data_base + seg])
        pos += seg
    return v


def test_cuts_are_chunk_starts_and_restart_the_grid():
    data, ends = stream()
    dg = cut_digest(data, ends)
    snap = dg.snapshot()
    assert snap.end == len(data) and list(snap.cuts) == ends
    starts = snap.chunk_starts()
    assert set(ends) <= set(starts)
    assert starts == sorted(set(starts))
    # between two cuts the chunks are on a 64 KiB grid from the first of them
    grid = 0
    for a, b in zip(starts, starts[1:]):
        assert 0 < b - a <= CHUNK
        if b not in ends:
            assert (b - grid) % CHUNK == 0
        else:
            grid = b
    # a chunk ends early at each cut: 70 KiB response: one full chunk and a short one
    first = ends[0]
    assert first + CHUNK in starts and ends[1] in starts
    assert dg.grid == ends[-1] and dg.cuts == ends


def test_cutter_sees_every_byte_once_in_order():
    data, ends = stream()
    dg = StreamDigest(VOLATILE)
    dg.cutter = cut = boundary_cutter(dg, ends)
    rng = random.Random(5)
    segs = []
    pos = 0
    while pos < len(data):
        n = rng.randint(1, 5000)
        segs.append((pos, data[pos:pos + n]))
        if rng.random() < 0.3:  # a retransmission overlapping it
            a = max(0, pos - rng.randint(0, 3000))
            segs.append((a, data[a:pos + n]))
        pos += n
    for i in range(0, len(segs), 6):  # reordered within a window
        w = segs[i:i + 6]
        rng.shuffle(w)
        segs[i:i + 6] = w
    for off, p in segs:
        dg.add(off, p)
    pieces = cut.seen
    assert pieces[0][0] == 0 and pieces[-1][1] == len(data)
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))  # contiguous, no byte twice
    assert dg.snapshot() == cut_digest(data, ends).snapshot()


def test_cutter_and_explicit_cuts_agree():
    data, ends = stream()
    a = cut_digest(data, ends)
    b = StreamDigest(VOLATILE)
    pos = 0
    for e in ends:
        feed(b, data[pos:e], range(0, e - pos, 1000), base=pos)
        b.cut()
        pos = e
    assert a.snapshot() == b.snapshot()
    b.cut()  # a second cut at the same place changes nothing
    assert a.snapshot() == b.snapshot()


@PROP
@given(points=st.lists(st.integers(0, 230_000), max_size=40), seed=st.integers(0, 2**32 - 1))
def test_any_segmentation_gives_the_same_snapshot(points, seed):
    data, ends = stream()
    whole = cut_digest(data, ends, points=[len(data)])
    assert cut_digest(data, ends, points=points).snapshot() == whole.snapshot()
    # boundaries and Date values split at random places, the date header near each cut too
    rng = random.Random(seed)
    near = [e + d for e in ends for d in (rng.randint(-40, 40),)]
    assert cut_digest(data, ends, points=points + near).snapshot() == whole.snapshot()


def test_byte_at_a_time_gives_the_same_snapshot():
    data, ends = stream(sizes=(200, 600, 65_400, 300))
    one = cut_digest(data, ends, points=[len(data)])
    dg = StreamDigest(VOLATILE)
    dg.cutter = boundary_cutter(dg, ends)
    for i in range(len(data)):
        dg.add(i, data[i:i + 1])
    assert dg.snapshot() == one.snapshot()


def test_cuts_matter():
    """The same bytes without the cuts: other chunk boundaries (so the cuts are what makes a
    verifier able to start at a message boundary)."""
    data, ends = stream()
    plain = StreamDigest(VOLATILE)
    feed(plain, data, range(0, len(data), 1448))
    assert plain.snapshot() != cut_digest(data, ends).snapshot()
    with pytest.raises(ValueError):
        StreamVerifier(plain.snapshot(), ends[1])


@pytest.mark.parametrize("k", range(5))
def test_verifier_from_each_cut_verifies_the_suffix(k):
    data, ends = stream(DATE1)
    regen, ends2 = stream(DATE2)  # the backup's: only the Date values differ
    assert ends == ends2
    snap = cut_digest(data, ends).snapshot()
    start = ends[k]
    v = verify(snap, regen, start)
    assert v.done and v.mismatch_at is None and v.verified_end() == len(data)
    if start < len(data):
        # one byte changed anywhere past the cut is found
        masked = {i + 8 + j for i in range(len(data)) if data.startswith(b"\r\nDate: ", i) for j in range(29)}
        for where in sorted({start, start + 2, start + 80, (start + len(data)) // 2, len(data) - 1} - masked):
            bad = bytearray(regen)
            bad[where] ^= 0x01
            v = verify(snap, bytes(bad), start)
            assert v.mismatch_at is not None and not v.done, where
            assert v.mismatch_at <= where and v.verified_end() == 0


def test_verifier_from_a_cut_past_the_snapshot():
    """Bytes past what the digest covers are new: verified once everything before is."""
    data, ends = stream()
    snap = cut_digest(data[:ends[2] + 100], ends).snapshot()
    v = verify(snap, data, ends[1])
    assert v.done and v.end == len(data) and v.verified_end() == len(data)


@pytest.mark.parametrize("tail", [b"\r\nDate: ", b"\r\nDate: Sun, 06", b"\r\nDa"])
def test_a_cut_restarts_the_masker(tail):
    """A message that ends in (part of) a volatile field: the digest and the verifier both
    restart the masker at the cut, so the next message's first bytes are hashed as they are."""
    first = response(0, body=b"x" * 100 + tail)
    second = b"te: HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"  # its start must not be masked
    data = first + second
    cut = len(first)
    snap = cut_digest(data, [cut, len(data)]).snapshot()
    # from the cut: a verifier with a fresh masker agrees with the digest
    assert verify(snap, data, cut).done
    # from before the cut: the verifier restarts its masker at the cut, as the digest did
    assert verify(snap, data, 0, seg=7).done
    # the first 29 bytes after the cut are checked: a change there is found
    bad = bytearray(data)
    bad[cut + 1] ^= 0x01
    assert verify(snap, bytes(bad), cut).mismatch_at == cut
    assert verify(snap, bytes(bad), 0).mismatch_at == cut


# ----- a verifier starting mid-message: the masker is primed -------------------------------

def date_across(start_shift: int) -> tuple[bytes, bytes, int]:
    """Two streams (original and regenerated: only a Date value differs) of a 2 KiB response
    then a large one whose body holds ``\\r\\nDate: <29>`` placed ``start_shift`` bytes before
    the first 64 KiB boundary after the cut; returns (orig, regen, that boundary)."""
    first = response(2000, seed=9)
    cut = len(first)
    boundary = cut + CHUNK

    def big(date: bytes) -> bytes:
        head = response(0, date)[:-len(b"Content-Length: 0\r\n\r\n")]
        n = 200_000
        head += b"Content-Length: " + str(n).encode() + b"\r\n\r\n"
        body = bytearray(random.Random(11).randbytes(n))
        at = boundary - start_shift - cut - len(head)
        field = b"\r\nDate: " + date
        body[at:at + len(field)] = field
        return head + bytes(body)
    return first + big(DATE1), first + big(DATE2), boundary


# the pattern is 8 bytes, the value 29: shifts 1..36 put the value (or the pattern) across the start
@pytest.mark.parametrize("shift", [1, 4, 8, 9, 20, 36])
def test_primed_verifier_at_a_grid_boundary_inside_a_message(shift):
    orig, regen, boundary = date_across(shift)
    cut = orig.index(b"HTTP/1.1", 10)
    dg = cut_digest(orig, [cut, len(orig)])
    snap = dg.snapshot()
    assert boundary in snap.chunk_starts()
    v = verify(snap, regen, boundary, prime=64)
    assert v.done and v.mismatch_at is None and v.verified_end() == len(orig)
    # a change just after the straddling value is still found
    bad = bytearray(regen)
    bad[boundary - shift + 40] ^= 0x01
    assert verify(snap, bytes(bad), boundary, prime=64).mismatch_at == boundary
    # the prime is needed: without it the same bytes (the original ones even) do not verify,
    # nor with a prime too short to reach back to the pattern
    assert verify(snap, orig, boundary).mismatch_at == boundary
    assert verify(snap, regen, boundary).mismatch_at == boundary
    assert verify(snap, orig, boundary, prime=shift - 1).mismatch_at == boundary
    # a prime reaching the pattern's start is enough; the horizon always is
    assert verify(snap, regen, boundary, prime=shift).done
    assert verify(snap, regen, boundary, prime=mask_horizon(VOLATILE)).done


def test_prime_bytes_are_not_checked():
    orig, regen, boundary = date_across(20)
    cut = orig.index(b"HTTP/1.1", 10)
    snap = cut_digest(orig, [cut, len(orig)]).snapshot()
    bad = bytearray(regen)
    bad[boundary - 60] ^= 0x01  # in the prime, away from the Date: only feeds the masker
    v = verify(snap, bytes(bad), boundary, prime=64)
    assert v.done and v.verified_end() == len(orig)


def test_prime_far_from_any_volatile_field_is_harmless():
    data, ends = stream()
    snap = cut_digest(data, ends).snapshot()
    start = ends[0] + CHUNK
    for prime in (0, 1, 64, 500):
        assert verify(snap, data, start, prime=prime).done


# ----- StreamDigest.trim ---------------------------------------------------------------------

def test_trim_drops_the_chunks_before_a_cut():
    data, ends = stream()
    dg = cut_digest(data, ends)
    before = dg.snapshot()
    to = ends[1]
    k = before.chunk_starts().index(to)  # chunks that end at or before it
    assert dg.trim(to) == k
    assert (dg.base, dg.dropped) == (to, k)
    snap = dg.snapshot()
    assert snap.base == to and snap.chunk_starts()[0] == to
    assert snap.bounds is not None and before.bounds is not None
    assert snap.chunks == before.chunks[k:] and snap.bounds == before.bounds[k:]
    assert snap.end == before.end and snap.partial == before.partial
    assert list(snap.cuts) == ends[1:] and all(c >= to for c in snap.cuts)
    # verification from the trim point (or a later cut) still works; from before it cannot start
    regen, _ = stream(DATE2)
    assert verify(snap, regen, to).done
    assert verify(snap, regen, ends[2]).done
    bad = bytearray(regen)
    bad[to + 5] ^= 0x20
    assert verify(snap, bytes(bad), to).mismatch_at == to
    with pytest.raises(ValueError):
        StreamVerifier(snap, ends[0])
    with pytest.raises(ValueError):
        StreamVerifier(snap, 0)


def test_trims_accumulate_and_hashing_goes_on():
    data, ends = stream()
    ref = cut_digest(data, ends)
    dg = StreamDigest(VOLATILE)
    dg.cutter = boundary_cutter(dg, ends)
    dropped = 0
    pos = 0
    for e in ends:
        feed(dg, data[pos:e], range(0, e - pos, 1448), base=pos)
        pos = e
        n = dg.trim(e)
        dropped += n
        assert dg.base == e and dg.dropped == dropped and dg.chunks == [] and dg.bounds == []
        assert dropped == ref.snapshot().chunk_starts().index(e)
    assert dg.trim(ends[-1]) == 0 and dg.trim(ends[0]) == 0  # nothing more, never back
    assert dg.dropped == len(ref.chunks)
    assert (dg.base, dg.end, dg.grid) == (ref.end, ref.end, ref.grid)
    snap = dg.snapshot()
    assert snap.chunk_starts() == [len(data)] and verify(snap, data + b"more", len(data), data_base=0).done


def test_trim_mid_message_then_more_bytes_match_an_untrimmed_digest():
    data, ends = stream()
    ref = cut_digest(data, ends)
    dg = StreamDigest(VOLATILE)
    dg.cutter = boundary_cutter(dg, ends)
    half = ends[3] - 50_000
    feed(dg, data[:half], range(0, half, 1448))
    dg.trim(ends[2])
    feed(dg, data[half:], range(0, len(data) - half, 1448), base=half)
    k = dg.dropped
    assert dg.chunks == ref.chunks[k:] and dg.bounds == ref.bounds[k:]
    assert dg.snapshot().partial == ref.snapshot().partial
    # trimming to an offset that is not a chunk start keeps the chunk it is in
    inside = ends[3] - 10
    dg.trim(inside)
    assert dg.base < inside and dg.base in ref.snapshot().chunk_starts()
    assert verify(dg.snapshot(), data, dg.base).done


def test_trim_when_a_message_ends_on_the_grid():
    """A response that ends exactly on a 64 KiB boundary: the cut adds no chunk, the trim still
    lands on it."""
    resp = response(CHUNK - len(response(0)) - 4)  # a 5-digit Content-Length
    assert len(resp) == CHUNK
    data = resp + response(100, seed=3)
    dg = cut_digest(data, [CHUNK, len(data)])
    snap = dg.snapshot()
    assert snap.bounds is not None
    assert snap.bounds[0] == CHUNK and snap.bounds.count(CHUNK) == 1 and CHUNK in snap.cuts
    assert dg.trim(CHUNK) == 1 and dg.base == CHUNK
    assert verify(dg.snapshot(), data, CHUNK).done
