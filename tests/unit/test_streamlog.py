"""checkpoint.streamlog: ByteLog, StreamDigest/StreamVerifier, Masker, sampled digests."""

from __future__ import annotations

import random

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from checkpoint.streamlog import (
    CHUNK, MAX_OOO_SEGMENTS, SAMPLE_CONTEXT, ByteLog, DigestSnapshot, Masker, SampledDigest,
    SampledVerifier, StreamDigest, StreamVerifier,
)

PROP = settings(max_examples=200, deadline=None)
SLOW_PROP = settings(max_examples=200, deadline=None)


# ----- ByteLog -------------------------------------------------------------------------

def test_bytelog_in_order():
    log = ByteLog(1 << 20)
    assert log.end == 0 and log.complete and log.read(0, 10) == b""
    log.add(0, b"GET / HTTP/1.1\r\n")
    log.add(16, memoryview(b"Host: x\r\n\r\n"))
    assert log.end == 27 and bytes(log.data) == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    assert log.read(4, 1) == b"/" and log.read(22, 100) == b"x\r\n\r\n"
    log.add(27, b"")  # empty payloads change nothing
    assert log.end == 27 and log.complete and log.fin_offset is None and not log.ooo


def test_bytelog_out_of_order_gap_filled_later():
    log = ByteLog(1 << 20)
    log.add(0, b"ab")
    log.add(7, b"hij")    # beyond a gap: aside
    log.add(5, b"fg")     # also aside
    assert log.end == 2 and set(log.ooo) == {5, 7}
    log.add(2, b"cde")    # fills the gap: everything held aside joins the prefix
    assert bytes(log.data) == b"abcdefghij" and not log.ooo and log.complete


def test_bytelog_duplicates_and_overlaps_never_overwrite():
    log = ByteLog(1 << 20)
    log.add(0, b"abcd")
    log.add(0, b"WXYZ")            # a full duplicate with other bytes: ignored
    log.add(2, b"XXef")            # overlaps: only the new bytes are taken
    log.add(1, b"Q")               # inside the prefix
    assert bytes(log.data) == b"abcdef"
    # held aside, then overlapped by the prefix growing over it: the prefix wins,
    # the held segment only contributes what lies beyond it
    log.add(10, b"KLMN")
    log.add(6, b"ghijkl")
    assert bytes(log.data) == b"abcdefghijklMN" and not log.ooo
    # a shorter copy at the same offset never replaces the one held aside
    log.add(20, b"uvwxyz")
    log.add(20, b"UV")
    log.add(14, b"opqrst")
    assert bytes(log.data) == b"abcdefghijklMNopqrstuvwxyz"


@PROP
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 5000))
def test_bytelog_any_arrival_order(seed, n):
    """A stream cut into overlapping segments, delivered in any order with
    duplicates, is logged exactly (as long as the limit is not hit)."""
    rng = random.Random(seed)
    data = rng.randbytes(n)
    segs = []
    pos = 0
    while pos < n:
        ln = rng.randint(1, 700)
        segs.append((pos, data[pos:pos + ln]))
        if rng.random() < 0.3:  # an overlapping retransmission
            a = max(0, pos - rng.randint(0, 300))
            segs.append((a, data[a:pos + ln + rng.randint(0, 300)]))
        pos += ln
    segs += rng.sample(segs, k=min(len(segs), 5))  # duplicates
    rng.shuffle(segs)
    log = ByteLog(1 << 20)
    for off, p in segs:
        log.add(off, p)
        assert bytes(log.data) == data[:log.end]  # never a wrong byte in the prefix
    assert bytes(log.data) == data and log.complete and not log.ooo


def test_bytelog_limit_overflows_and_stops_growing():
    log = ByteLog(10)
    log.add(0, b"0123456789")  # exactly the limit: fine
    assert log.end == 10 and log.complete
    log.add(10, b"x")
    assert not log.complete and "limit" in log.overflow and "10" in log.overflow
    assert log.end == 10
    log.add(10, b"yyyy")
    log.add(20, b"z")
    assert log.end == 10 and not log.ooo and bytes(log.data) == b"0123456789"


def test_bytelog_limit_reached_while_merging_held_segments():
    log = ByteLog(10)
    log.add(0, b"abcd")
    log.add(6, b"ghijkl")  # would end at 12 > 10, but it is only held aside for now
    assert log.complete
    log.add(4, b"ef")
    assert not log.complete and "limit" in log.overflow
    assert log.end <= 10 and bytes(log.data) == b"abcdef"
    log.add(6, b"gh")
    assert log.end == 6


def test_bytelog_too_many_out_of_order_segments():
    log = ByteLog(1 << 20)
    log.add(0, b"a")
    for i in range(MAX_OOO_SEGMENTS):
        log.add(2 + 2 * i, b"x")
    assert log.complete and len(log.ooo) == MAX_OOO_SEGMENTS
    log.add(5000, b"y")
    assert not log.complete and "out-of-order" in log.overflow
    log.add(1, b"b")  # no growth once overflowed
    assert log.end == 1


# ----- StreamDigest / StreamVerifier ---------------------------------------------------

def _cuts(rng: random.Random, n: int, max_seg: int = 9000, overlaps: bool = True) -> list[tuple[int, int]]:
    """(offset, length) covering [0, n), sorted by offset, with overlaps and duplicates."""
    out = []
    pos = 0
    while pos < n:
        ln = min(rng.randint(1, max_seg), n - pos)
        out.append((pos, ln))
        if overlaps and rng.random() < 0.25:
            a = max(0, pos - rng.randint(0, 2000))
            out.append((a, min(n, pos + ln + rng.randint(0, 2000)) - a))
        if overlaps and rng.random() < 0.1:
            out.append((pos, ln))
        pos += ln
    out.sort(key=lambda t: t[0])
    return out


def _digest(data: bytes, rng: random.Random, volatile=(), shuffle: bool = True) -> DigestSnapshot:
    d = StreamDigest(volatile)
    segs = _cuts(rng, len(data))
    if shuffle:  # the digest takes segments in any order (bounded reordering)
        for i in range(0, len(segs), 8):
            window = segs[i:i + 8]
            rng.shuffle(window)
            segs[i:i + 8] = window
    for off, ln in segs:
        d.add(off, data[off:off + ln])
    assert d.overflow is None and not d.ooo and d.end == len(data)
    return d.snapshot()


def _verify(snap: DigestSnapshot, data: bytes, rng: random.Random) -> StreamVerifier:
    v = StreamVerifier(snap)
    for off, ln in _cuts(rng, len(data)):
        ok = v.add(off, data[off:off + ln])
        good = v.verified_end()
        assert good <= v.end
        if v.mismatch_at is None:
            assert ok
            # known good: whole chunks, the snapshot's end, or everything once past it
            assert good % CHUNK == 0 or good >= snap.end
            assert (good >= snap.end) == v.done or v.end < snap.end
        else:
            assert not ok and good == 0
            break
    return v


stream_len = st.one_of(
    st.sampled_from([0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK]),
    st.integers(0, 3 * CHUNK + 5000),
    st.integers(CHUNK - 3000, 3 * CHUNK + 5000),  # (small streams come by themselves)
)


@SLOW_PROP
@given(seed=st.integers(0, 2**32 - 1), n=stream_len, extra=st.integers(0, 20000),
       volatile=st.sampled_from([(), ("http-date",)]))
def test_stream_verifies_against_itself(seed, n, extra, volatile):
    rng = random.Random(seed)
    data = rng.randbytes(n + extra)
    snap = _digest(data[:n], rng, volatile)
    assert snap.end == n and len(snap.chunks) == n // CHUNK and snap.partial_len == n % CHUNK
    v = _verify(snap, data, rng)
    assert v.mismatch_at is None and v.done
    assert v.end == n + extra
    assert v.verified_end() == n + extra  # trailing bytes count as verified
    assert v.verified == n


@SLOW_PROP
@given(seed=st.integers(0, 2**32 - 1), n=stream_len.filter(lambda n: n > 0), extra=st.integers(0, 3000),
       where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_flipped_byte_is_detected(seed, n, extra, where, bit):
    rng = random.Random(seed)
    data = rng.randbytes(n + extra)
    snap = _digest(data[:n], rng)
    p = int(where * n)
    bad = bytearray(data)
    bad[p] ^= 1 << bit
    v = _verify(snap, bytes(bad), rng)
    assert v.mismatch_at == p // CHUNK * CHUNK
    assert v.verified == v.mismatch_at  # every chunk before it matched
    assert not v.done and v.verified_end() == 0
    assert v.add(v.end, b"more") is False  # stays failed


def test_exact_chunk_multiple_and_empty():
    data = random.Random(1).randbytes(2 * CHUNK)
    d = StreamDigest()
    d.add(0, data)
    snap = d.snapshot()
    assert snap.end == 2 * CHUNK and len(snap.chunks) == 2 and snap.partial_len == 0
    v = StreamVerifier(snap)
    assert v.add(0, data[:CHUNK]) and v.verified_end() == CHUNK and not v.done
    assert v.add(CHUNK, data[CHUNK:]) and v.done and v.verified_end() == 2 * CHUNK
    assert v.add(2 * CHUNK, b"tail") and v.verified_end() == 2 * CHUNK + 4

    empty = StreamDigest().snapshot()
    assert empty.end == 0 and empty.chunks == ()
    v = StreamVerifier(empty)
    assert v.done and v.verified_end() == 0
    assert v.add(0, b"anything") and v.verified_end() == 8 and v.done


def test_verifier_ignores_gaps_and_old_bytes():
    data = random.Random(2).randbytes(5000)
    d = StreamDigest()
    d.add(0, data)
    v = StreamVerifier(d.snapshot())
    assert v.add(1000, b"x" * 100)  # beyond a gap: ignored, not a mismatch
    assert v.end == 0
    assert v.add(0, data[:3000]) and v.end == 3000 and v.verified_end() == 0
    assert v.add(0, b"\xff" * 2000)  # entirely old: not compared again
    assert v.add(2500, data[2500:5000]) and v.done and v.verified_end() == 5000


def test_digest_overflows_with_too_many_held_segments():
    d = StreamDigest()
    for i in range(MAX_OOO_SEGMENTS + 1):
        d.add(10 + 2 * i, b"x")
    assert d.overflow and "out-of-order" in d.overflow
    d.add(0, b"0123456789")
    assert d.end == 0


# ----- volatile fields -----------------------------------------------------------------

def http_response(date: bytes = b"Sun, 06 Nov 1994 08:49:37 GMT", server: bytes = b"nginx/1.24.0",
                  body: bytes = b"", prefix: bytes = b"") -> bytes:
    assert len(date) == 29
    return prefix + (b"HTTP/1.1 200 OK\r\nServer: " + server + b"\r\nDate: " + date +
                     b"\r\nContent-Type: text/html\r\nContent-Length: " + str(len(body)).encode() +
                     b"\r\nConnection: keep-alive\r\n\r\n" + body)


BODY = random.Random(3).randbytes(3000)
DATE2 = b"Fri, 21 Nov 2025 05:44:00 GMT"


def _check(orig: bytes, regen: bytes, cuts_a, cuts_b, volatile=("http-date",)) -> StreamVerifier:
    d = StreamDigest(volatile)
    for off, ln in cuts_a:
        d.add(off, orig[off:off + ln])
    v = StreamVerifier(d.snapshot())
    for off, ln in cuts_b:
        v.add(off, regen[off:off + ln])
    return v


def _fixed_cuts(n: int, points) -> list[tuple[int, int]]:
    pts = sorted({0, n, *[p for p in points if 0 < p < n]})
    return [(a, b - a) for a, b in zip(pts, pts[1:])]


def test_masker_replaces_the_date_value():
    resp = http_response()
    m = Masker(("http-date",))
    out = bytes(m(resp))
    i = resp.index(b"\r\nDate: ") + 8
    assert out[:i] == resp[:i] and out[i:i + 29] == b"*" * 29 and out[i + 29:] == resp[i + 29:]
    assert Masker(())(resp) is resp  # no fields: untouched
    assert bytes(Masker(("http-date",))(b"HTTP/1.1 200 OK\r\nDated: x")) == b"HTTP/1.1 200 OK\r\nDated: x"


@PROP
@given(points=st.lists(st.integers(0, 200), max_size=12))
def test_masker_is_independent_of_the_cuts(points):
    resp = http_response(body=b"\r\nDate: " + b"y" * 40)  # a second occurrence, in the body
    whole = bytes(Masker(("http-date",))(resp))
    m = Masker(("http-date",))
    pieces = b"".join(bytes(m(resp[off:off + ln])) for off, ln in _fixed_cuts(len(resp), points))
    assert pieces == whole
    assert whole.count(b"*" * 29) == 2


def test_date_only_difference_verifies_other_header_does_not():
    a = http_response(body=BODY)
    b = http_response(date=DATE2, body=BODY)
    assert a != b and len(a) == len(b)
    cuts = _fixed_cuts(len(a), [700, 1448, 2896])
    v = _check(a, b, cuts, cuts)
    assert v.mismatch_at is None and v.done and v.verified_end() == len(a)
    # without masking the same two responses differ
    v = _check(a, b, cuts, cuts, volatile=())
    assert v.mismatch_at == 0
    # another header differs: detected even with masking
    c = http_response(date=DATE2, server=b"nginx/1.25.0", body=BODY)
    v = _check(a, c, cuts, cuts)
    assert v.mismatch_at == 0 and not v.done
    # the body differs
    d = bytearray(http_response(date=DATE2, body=BODY))
    d[-5] ^= 0x20
    assert _check(a, bytes(d), cuts, cuts).mismatch_at == 0


@PROP
@given(pa=st.lists(st.integers(1, 140), max_size=6), pb=st.lists(st.integers(1, 140), max_size=6))
def test_date_split_across_segments_is_masked(pa, pb):
    """Pattern and value cut anywhere (the Date header is at bytes 33..72), differently
    on the two sides."""
    a = http_response(body=BODY)
    b = http_response(date=DATE2, body=BODY)
    v = _check(a, b, _fixed_cuts(len(a), pa), _fixed_cuts(len(b), pb))
    assert v.mismatch_at is None and v.verified_end() == len(a)


@pytest.mark.parametrize("shift", [-40, -33, -30, -8, -4, -1, 0, 3])
def test_date_across_a_chunk_boundary(shift):
    """A keep-alive stream whose second response's pattern or Date value straddles 64 KiB."""
    date_at = http_response().index(b"\r\nDate: ") + 8  # value offset within a response
    filler = random.Random(4).randbytes(CHUNK + shift - date_at)  # the end of an earlier response
    a = filler + http_response(body=BODY)
    b = filler + http_response(date=DATE2, body=BODY)
    assert b.index(DATE2) == CHUNK + shift
    cuts = _fixed_cuts(len(a), list(range(1448, len(a), 1448)))
    v = _check(a, b, cuts, cuts)
    assert v.mismatch_at is None and v.done
    assert _check(a, b, cuts, _fixed_cuts(len(a), [CHUNK + shift + 5, CHUNK])).done
    assert _check(a, b, cuts, cuts, volatile=()).mismatch_at == (CHUNK if shift >= 0 else 0)


# ----- sampled digests -----------------------------------------------------------------

MAX_CAPTURE = 4016


def _sample(data: bytes, rng: random.Random, volatile=()) -> SampledDigest:
    """The return path as NFQUEUE shows it: (GSO) packets of any size, of
    which only the first MAX_CAPTURE bytes are copied."""
    d = SampledDigest(volatile)
    pos = 0
    while pos < len(data):
        total = min(rng.choice([rng.randint(1, 1448), rng.randint(1, 64000)]), len(data) - pos)
        d.add(pos, data[pos:pos + min(total, MAX_CAPTURE)], total)
        if rng.random() < 0.1:  # a retransmission: never a sample out of order
            a = max(0, pos - 100)
            piece = data[a:pos + 10]
            d.add(a, piece, len(piece))
        pos += total
    assert d.end == len(data)
    offs = [s[0] for s in d.samples]
    assert offs == sorted(set(offs))
    assert all(ln > SAMPLE_CONTEXT and ln <= MAX_CAPTURE for _, ln, _ in d.samples)
    return d


def _feed_sampled(snap, data: bytes, rng: random.Random) -> SampledVerifier:
    v = SampledVerifier(snap)
    for off, ln in _cuts(rng, len(data), max_seg=20000):
        v.add(off, data[off:off + ln])
        good = v.verified_end()
        if v.mismatch_at is not None:
            assert good == 0
            break
        assert good <= v.end
        checked = sum(1 for o, n, _ in snap.samples if o + n <= v.end)
        assert v.i == checked  # every complete sample was checked, no other
        if v.i < len(snap.samples):
            assert good <= snap.samples[v.i][0]  # never past an unchecked sample
    return v


@SLOW_PROP
@given(seed=st.integers(0, 2**32 - 1), n=st.one_of(st.integers(0, 400000), st.integers(100000, 400000)),
       extra=st.integers(0, 5000))
def test_sampled_stream_verifies_against_itself(seed, n, extra):
    rng = random.Random(seed)
    data = rng.randbytes(n + extra)
    snap = _sample(data[:n], rng).snapshot()
    v = _feed_sampled(snap, data, rng)
    assert v.mismatch_at is None and v.done and v.i == len(snap.samples)
    assert v.verified_end() == n + extra


@SLOW_PROP
@given(seed=st.integers(0, 2**32 - 1), n=st.one_of(st.integers(5000, 300000), st.integers(100000, 300000)), which=st.floats(0, 1, exclude_max=True),
       where=st.floats(0, 1, exclude_max=True))
def test_sampled_flip_inside_a_sample_is_detected(seed, n, which, where):
    rng = random.Random(seed)
    data = rng.randbytes(n)
    snap = _sample(data, rng).snapshot()
    assert snap.samples
    off, ln, _ = snap.samples[int(which * len(snap.samples))]
    p = off + SAMPLE_CONTEXT + int(where * (ln - SAMPLE_CONTEXT))
    bad = bytearray(data)
    bad[p] ^= 0x01
    v = _feed_sampled(snap, bytes(bad), rng)
    assert v.mismatch_at is not None and v.mismatch_at <= p
    # the first sample holding p (after its context bytes) is the one that fails
    first = min(o for o, ln2, _ in snap.samples if o + SAMPLE_CONTEXT <= p < o + ln2)
    assert v.mismatch_at == first
    assert not v.done and v.verified_end() == 0


def test_sampled_flip_outside_every_sample_is_not_detected():
    """The documented limitation: only the sampled bytes are checked."""
    rng = random.Random(5)
    data = rng.randbytes(200000)
    d = SampledDigest()
    for pos in range(0, len(data), 20000):  # 20 kB GSO packets, 4016 bytes copied of each
        d.add(pos, data[pos:pos + MAX_CAPTURE], 20000)
    snap = d.snapshot()
    assert len(snap.samples) == 10
    for p in (10000, 4016, 19999, 20000 + SAMPLE_CONTEXT - 1):  # outside (or in the context bytes)
        bad = bytearray(data)
        bad[p] ^= 0xFF
        v = SampledVerifier(snap)
        assert v.add(0, bytes(bad)) and v.done and v.mismatch_at is None
    bad = bytearray(data)
    bad[20000 + SAMPLE_CONTEXT] ^= 0xFF
    v = SampledVerifier(snap)
    assert not v.add(0, bytes(bad)) and v.mismatch_at == 20000


def test_sampled_verified_end_stops_at_unchecked_sample():
    data = random.Random(6).randbytes(50000)
    d = SampledDigest()
    d.add(0, data[:MAX_CAPTURE], 10000)
    d.add(10000, data[10000:10000 + MAX_CAPTURE], 10000)
    d.add(20000, data[20000:20030], 30000)  # too short to be a sample
    snap = d.snapshot()
    assert [s[0] for s in snap.samples] == [0, 10000] and snap.end == 50000
    v = SampledVerifier(snap)
    v.add(0, data[:3000])
    assert v.verified_end() == 0  # the first sample is not complete yet
    v.add(3000, data[3000:12000])
    assert v.i == 1 and v.verified_end() == 10000
    v.add(12000, data[12000:14016])
    assert v.i == 2 and v.verified_end() == 14016 and not v.done
    v.add(14016, data[14016:])
    assert v.done and v.verified_end() == 50000


def test_sampled_date_difference_verifies():
    rng = random.Random(7)
    body = rng.randbytes(20000)
    a = http_response(body=body)
    b = http_response(date=DATE2, body=body)
    d = SampledDigest(("http-date",))
    d.add(0, a[:MAX_CAPTURE], 8000)
    d.add(8000, a[8000:8000 + MAX_CAPTURE], len(a) - 8000)
    v = SampledVerifier(d.snapshot())
    assert v.add(0, b) and v.done
    d2 = SampledDigest(())
    d2.add(0, a[:MAX_CAPTURE], len(a))
    assert not SampledVerifier(d2.snapshot()).add(0, b)


# ----- restored digests (a checkpoint reloaded: blind partial chunk, resync) -----------

def _restore(data: bytes, r: int, volatile=()) -> StreamDigest:
    """A digest of data[:r] saved as the store saves it (chunk hashes only) and reloaded."""
    d = StreamDigest(volatile)
    d.add(0, data[:r])
    return StreamDigest.restored(list(d.chunks), d.end, volatile)


def test_restored_digest_is_blind_for_its_partial_chunk_only():
    rng = random.Random(21)
    data = rng.randbytes(4 * CHUNK + 300)
    r = CHUNK + 1000
    d = _restore(data, r)
    d.add(r, data[r:])
    snap = d.snapshot()
    assert snap.end == len(data) and snap.chunks[1] is None
    assert all(c is not None for i, c in enumerate(snap.chunks) if i != 1) and snap.partial is not None
    v = StreamVerifier(snap)
    assert v.add(0, data) and v.done and v.mismatch_at is None
    assert v.unverified_bytes == CHUNK and v.verified_end() == len(data)
    # a difference inside a known chunk after the blind one is still caught
    bad = bytearray(data)
    bad[3 * CHUNK + 5] ^= 1
    v = StreamVerifier(snap)
    assert not v.add(0, bytes(bad)) and v.mismatch_at == 3 * CHUNK and v.verified == 3 * CHUNK
    # ... and in the partial chunk at the end
    bad = bytearray(data)
    bad[-1] ^= 1
    assert StreamVerifier(snap).add(0, bytes(bad)) is False
    # a difference only inside the blind chunk cannot be seen: it passes, counted as unverified
    bad = bytearray(data)
    bad[CHUNK + 10] ^= 1
    bad[r + 10] ^= 1
    v = StreamVerifier(snap)
    assert v.add(0, bytes(bad)) and v.done and v.unverified_bytes > 0


def test_restored_snapshot_while_still_blind_has_no_partial():
    data = random.Random(22).randbytes(CHUNK + 500)
    d = _restore(data, CHUNK + 100)
    d.add(CHUNK + 100, data[CHUNK + 100:])
    snap = d.snapshot()
    assert snap.partial is None and len(snap.chunks) == 1 and snap.chunks[0] is not None
    v = StreamVerifier(snap)
    assert v.add(0, data) and v.done and v.unverified_bytes == 500
    bad = bytearray(data)
    bad[7] ^= 1
    assert StreamVerifier(snap).add(0, bytes(bad)) is False  # the known chunk still counts


def test_restored_at_a_chunk_boundary_is_not_blind():
    data = random.Random(23).randbytes(3 * CHUNK)
    d = _restore(data, CHUNK)
    assert d.cur is not None and d.blind_until == 0
    d.add(CHUNK, data[CHUNK:])
    snap = d.snapshot()
    assert None not in snap.chunks
    bad = bytearray(data)
    bad[CHUNK + 1] ^= 1
    assert StreamVerifier(snap).add(0, bytes(bad)) is False


def test_restored_then_a_gap_jumps_and_later_gaps_wait():
    """After a restore a segment may start beyond end (bytes passed while the
    appliance was down): the digest jumps there; once the owner ends the resync,
    later gaps are reordering, held aside."""
    data = random.Random(24).randbytes(6 * CHUNK)
    d = _restore(data, 100)
    j = 3 * CHUNK + 50
    d.add(j, data[j:j + 1000])
    assert d.end == j + 1000 and d.chunks == [None, None, None] and not d.ooo
    d.resync = False  # caught up (the data plane's call)
    d.add(j + 2000, data[j + 2000:j + 3000])  # a gap after the resync: held aside, no jump
    assert d.end == j + 1000 and set(d.ooo) == {j + 2000}
    d.add(j + 1000, data[j + 1000:])
    snap = d.snapshot()
    assert snap.end == len(data) and snap.chunks[:4] == (None,) * 4 and None not in snap.chunks[4:]
    v = StreamVerifier(snap)
    assert v.add(0, data) and v.done and v.unverified_bytes == 4 * CHUNK
    bad = bytearray(data)
    bad[4 * CHUNK] ^= 1
    assert StreamVerifier(snap).add(0, bytes(bad)) is False


def test_restored_with_chunk_hashes_missing_at_the_end():
    """A store may hold fewer chunk hashes than its end says (not written yet): blind."""
    data = random.Random(27).randbytes(4 * CHUNK)
    d = StreamDigest()
    d.add(0, data[:3 * CHUNK + 10])
    r = StreamDigest.restored(d.chunks[:1], 3 * CHUNK + 10)
    assert r.chunks == [d.chunks[0], None, None]
    r.add(3 * CHUNK + 10, data[3 * CHUNK + 10:])
    v = StreamVerifier(r.snapshot())
    assert v.add(0, data) and v.done and v.unverified_bytes == 3 * CHUNK
    bad = bytearray(data)
    bad[5] ^= 1
    assert StreamVerifier(r.snapshot()).add(0, bytes(bad)) is False
    with pytest.raises(ValueError, match="3 chunk hashes for 100 bytes"):
        StreamDigest.restored(d.chunks, 100)


def test_normal_digest_never_jumps():
    d = StreamDigest()
    d.add(0, b"abc")
    d.add(10, b"xyz")
    assert d.end == 3 and set(d.ooo) == {10} and not d.resync


@pytest.mark.parametrize("shift", [-36, -30, -10, -1, 0, 5])
@pytest.mark.parametrize("cut", [-4, 3])  # inside the pattern, inside the value
@pytest.mark.parametrize("jump", [False, True])
def test_restore_point_inside_a_volatile_field(shift, cut, jump):
    """The masker's state is lost with the restore: a Date header cut by the restore
    point (or the gap) whose value reaches the next chunk must not cause a false
    mismatch, so blindness extends over the masker's horizon."""
    date_at = http_response().index(b"\r\nDate: ") + 8
    filler = random.Random(25).randbytes(CHUNK + shift - date_at)
    tail = random.Random(26).randbytes(2 * CHUNK)
    a = filler + http_response(body=BODY) + tail
    b = filler + http_response(date=DATE2, body=BODY) + tail
    r = CHUNK + shift + cut
    d = _restore(a, r if not jump else r - 500, ("http-date",))
    d.add(r, a[r:])
    snap = d.snapshot()
    v = StreamVerifier(snap)
    assert v.add(0, b) and v.done and v.mismatch_at is None
    bad = bytearray(b)
    bad[-3] ^= 1  # still checked after the blind stretch
    assert StreamVerifier(snap).add(0, bytes(bad)) is False


@SLOW_PROP
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 5 * CHUNK), r=st.floats(0, 1, exclude_max=True),
       j=st.floats(0, 1, exclude_max=True),
       where=st.floats(0, 1, exclude_max=True), volatile=st.sampled_from([(), ("http-date",)]))
# the stream ends on a chunk boundary while the masker's horizon makes the next chunk
# blind: the (empty) partial chunk has nothing blind in it, so it has a digest
@example(seed=0, n=CHUNK, r=0.5, j=0.9999, where=0.5, volatile=("http-date",))
@example(seed=0, n=2 * CHUNK, r=0.0, j=0.9999, where=0.25, volatile=("http-date",))
def test_restored_digest_checks_exactly_the_known_chunks(seed, n, r, j, where, volatile):
    """Restore at r, resume at j >= r: the chunks from r's chunk up to the first boundary
    at or past j (plus the masker's horizon) are blind, every other chunk is checked: a
    flip is caught exactly when it lies outside the blind chunks."""
    rng = random.Random(seed)
    data = rng.randbytes(n)
    r = int(r * n)
    j = r + int(j * (n - r))
    d = _restore(data, r, volatile)
    for off, ln in _cuts(rng, n - j):
        d.add(j + off, data[j + off:j + off + ln])
    snap = d.snapshot()
    assert snap.end == n and d.overflow is None and not d.ooo
    horizon = 36 if volatile else 0
    blind = set(range(r // CHUNK, -(-(j + horizon) // CHUNK)))
    full = n // CHUNK
    assert {i for i, c in enumerate(snap.chunks) if c is None} == {i for i in blind if i < full}
    assert (snap.partial is None) == (full in blind and n % CHUNK != 0)
    v = _verify(snap, data, rng)
    assert v.done and v.unverified_bytes == sum(min(CHUNK, n - i * CHUNK) for i in blind if i * CHUNK < n)
    p = int(where * n)
    bad = bytearray(data)
    bad[p] ^= 0x80
    v = StreamVerifier(snap)
    v.add(0, bytes(bad))
    if p // CHUNK in blind:
        assert v.mismatch_at is None and v.done
    else:
        assert v.mismatch_at == p // CHUNK * CHUNK


def test_a_retransmission_across_the_restore_point_then_a_leap_still_jumps():
    """A server retransmits from its oldest unacknowledged byte (covering the restore
    point), then leaps to new data past what the client already holds: that gap is
    never filled, so while resyncing the digest jumps it too."""
    data = random.Random(31).randbytes(8 * CHUNK)
    d = _restore(data, 2 * CHUNK + 700)
    r = 2 * CHUNK + 100
    d.add(r, data[r:r + 1448])  # crosses the restore point: contiguous
    assert d.resync and not d.ooo
    leap = 5 * CHUNK + 10
    d.add(leap, data[leap:])
    assert not d.ooo and d.end == len(data) and d.overflow is None
    v = StreamVerifier(d.snapshot())
    assert v.add(0, data) and v.done


@given(parts=st.lists(st.binary(max_size=3000), max_size=8), cut=st.integers(0, 8))
@settings(max_examples=200, deadline=None)
def test_the_shared_state_hasher_gives_xxhashs_digests(parts: list[bytes], cut: int) -> None:
    """The digest's hasher (checkpoint/native/xxh3.c, whose state the fast path shares) and the
    xxhash package agree on every digest, split anyhow, through copy and reset."""
    import xxhash

    from checkpoint import xxh3

    assert xxh3.native()  # built by the README's set-up (python -m nfq.native.build)
    mine, theirs = xxh3.NativeXXH3(), xxhash.xxh3_128()
    for i, p in enumerate(parts):
        mine.update(memoryview(p) if i % 2 else p)
        theirs.update(p)
        if i == cut:
            snap = mine.copy()
            assert snap.digest() == theirs.digest()
    assert mine.digest() == theirs.digest() and mine.hexdigest() == theirs.hexdigest()
    mine.reset()
    assert mine.digest() == xxhash.xxh3_128().digest()
