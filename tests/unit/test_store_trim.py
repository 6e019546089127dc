"""Trimmed logs and digests (HTTP-aware replay) in the checkpoint store and in plain-JSON
state: CommitPlanner + SqliteBackend on a temporary file, the format 1 -> 2 migration, and
checkpoint.state's optional base/bounds/grid/cuts/dropped.  No root, no network."""

from __future__ import annotations

import json
import random
import sqlite3
import time
from pathlib import Path

import pytest

from checkpoint.httpreplay import HttpTrack
from checkpoint.io.sqlite import FORMAT, SqliteBackend
from checkpoint.state import StateError, digest_from_state, digest_state, log_from_state, log_state, record_state
from checkpoint.store import CommitPlanner, Write
from checkpoint.streamlog import CHUNK, ByteLog, StreamDigest, StreamVerifier

from ._helpers import make_record

DATE = b"Sun, 06 Nov 1994 08:49:37 GMT"


def get(path: str) -> bytes:
    return b"GET /" + path.encode() + b" HTTP/1.1\r\nHost: example.com\r\n\r\n"


def ok(n: int, seed: int = 0) -> bytes:
    body = random.Random(seed).randbytes(n)
    return b"HTTP/1.1 200 OK\r\nDate: " + DATE + b"\r\nContent-Length: %d\r\n\r\n" % n + body


class Conn:
    """A connection record with a log, a digest and their HttpTrack, fed as the data plane does."""

    def __init__(self, cid: int = 1) -> None:
        self.rec = make_record(cid)
        self.rec.log = ByteLog(1 << 20)
        self.rec.digest = StreamDigest(("http-date",))
        self.track = HttpTrack(self.rec.log, self.rec.digest)
        self.server_stream = b""

    @property
    def log(self) -> ByteLog:
        assert self.rec.log is not None
        return self.rec.log

    @property
    def digest(self) -> StreamDigest:
        assert isinstance(self.rec.digest, StreamDigest)
        return self.rec.digest

    def client(self, data: bytes) -> None:
        self.log.add(self.log.end, data)
        self.track.client_logged()

    def server(self, data: bytes) -> None:
        base = len(self.server_stream)
        self.server_stream += data
        for i in range(0, len(data), 1448):
            self.digest.add(base + i, data[i:i + 1448])

    def ack(self, offset: int | None = None) -> bool:
        self.track.client_acked(len(self.server_stream) if offset is None else offset)
        return self.track.advance()


class Store:
    """A planner and a SQLite backend, committed by hand as the daemon's committer does."""

    def __init__(self, path: Path, ici_interval: float = 0.0) -> None:
        self.path = path
        self.planner = CommitPlanner(ici_interval=ici_interval)
        self.backend = SqliteBackend(path)

    def commit(self) -> list[Write]:
        batch = self.planner.plan(time.time())
        if batch is None:
            return []
        self.backend.write(batch)
        self.planner.done(batch)
        return batch.writes

    def rows(self, sql: str, *args) -> list[tuple]:
        db = sqlite3.connect(self.path)
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def reload(self):
        self.backend.close()
        again = SqliteBackend(self.path)
        loaded = again.load()
        assert again.load_errors == []
        again.close()
        return loaded


def exchange(conn: Conn, store: Store, path: str, n: int, seed: int = 0) -> None:
    conn.client(get(path))
    store.planner.touch(conn.rec)
    conn.server(ok(n, seed))
    store.planner.touch(conn.rec)


def test_a_trim_is_written_by_the_next_batch_and_its_rows_go(tmp_path: Path):
    store = Store(tmp_path / "cp.db")
    conn = Conn()
    store.planner.track(conn.rec)
    store.commit()
    exchange(conn, store, "a", 150_000)
    exchange(conn, store, "b", 100_000, seed=1)  # pipelined behind the first
    (w,) = store.commit()
    assert w.log_base is None and w.digest_base is None and len(w.chunks) >= 4
    assert w.bounds == conn.digest.bounds[:len(w.bounds)]
    assert store.rows("SELECT count(*) FROM logdata") == [(1,)]
    n_chunks = store.rows("SELECT count(*) FROM chunk")[0][0]
    # the first exchange is finished: the log and the digest are trimmed to its end
    first_end = (len(get("a")), len(ok(150_000)))
    assert conn.ack(first_end[1]) and conn.track.point == first_end
    store.planner.touch(conn.rec)
    conn.client(get("c"))
    (w,) = store.commit()
    assert w.log_base == conn.log.base == first_end[0]
    assert w.digest_base == (conn.digest.base, conn.digest.dropped) == (first_end[1], conn.digest.dropped)
    assert w.log_off == conn.log.end - len(get("c")) and w.log_data == get("c")
    # the rows before the trim are gone, in the same transaction as the new bytes
    offs = store.rows("SELECT off, length(data) FROM logdata WHERE conn = 1 ORDER BY off")
    assert offs == [(0, len(get("a") + get("b"))), (len(get("a") + get("b")), len(get("c")))]  # straddles: kept
    idx = [i for (i,) in store.rows("SELECT idx FROM chunk WHERE conn = 1 ORDER BY idx")]
    assert idx == list(range(conn.digest.dropped, n_chunks))
    assert store.rows("SELECT log_base, digest_base, digest_dropped FROM conn") == [
        (first_end[0], first_end[1], conn.digest.dropped)]
    # read back: the same log and digest
    (loaded,) = store.reload()
    log, dg = loaded.rec.log, loaded.rec.digest
    assert (log.base, log.end, bytes(log.data)) == (conn.log.base, conn.log.end, bytes(conn.log.data))
    assert log.read(log.base, len(get("b"))) == get("b")
    assert isinstance(dg, StreamDigest)
    assert (dg.base, dg.dropped, dg.end) == (conn.digest.base, conn.digest.dropped, conn.digest.end)
    assert dg.bounds[:len(conn.digest.bounds)] == conn.digest.bounds
    assert dg.chunks[:len(conn.digest.chunks)] == conn.digest.chunks
    assert dg.cuts == conn.digest.cuts and dg.grid == conn.digest.grid
    snap = dg.snapshot()
    assert snap.chunk_starts()[0] == first_end[1]
    # the restored digest checks a regenerated stream from the trim point
    v = StreamVerifier(snap, snap.base)
    v.add(snap.base, conn.server_stream[snap.base:])
    assert v.done and v.mismatch_at is None


def test_a_keepalive_connection_keeps_only_its_last_request(tmp_path: Path):
    store = Store(tmp_path / "cp.db")
    conn = Conn()
    store.planner.track(conn.rec)
    store.commit()
    for i in range(5):
        exchange(conn, store, f"p{i}", 20_000 * (i + 1), seed=i)
        store.commit()
        conn.ack()
        store.planner.touch(conn.rec)
        store.commit()
    conn.client(get("last"))
    store.planner.touch(conn.rec)
    store.commit()
    assert store.rows("SELECT data FROM logdata") == [(get("last"),)]
    assert store.rows("SELECT count(*) FROM chunk") == [(0,)]
    assert store.planner.stats.held_total == len(get("last"))
    (loaded,) = store.reload()
    assert bytes(loaded.rec.log.data) == get("last") and loaded.rec.log.base == conn.log.base
    dg = loaded.rec.digest
    assert dg.base == dg.end == len(conn.server_stream) and dg.chunks == []


def test_held_total_counts_only_the_bytes_held(tmp_path: Path):
    store = Store(tmp_path / "cp.db")
    conns = [Conn(cid) for cid in (1, 2)]
    for conn in conns:
        store.planner.track(conn.rec)
    store.commit()
    for conn in conns:
        exchange(conn, store, "a", 1000)
    store.commit()
    held = store.planner.stats.held_total
    assert held == sum(c.log.end - c.log.base for c in conns) == 2 * len(get("a"))
    conns[0].ack()
    store.planner.touch(conns[0].rec)
    store.commit()
    assert store.planner.stats.held_total == len(get("a"))
    store.planner.forget(1)
    store.planner.forget(2)
    store.commit()
    assert store.planner.stats.held_total == 0
    assert store.rows("SELECT count(*) FROM conn") == [(0,)]


def test_held_total_when_bytes_are_trimmed_before_they_were_saved(tmp_path: Path):
    """Request, response and acknowledgment within one commit interval (a fast LAN): the trim
    comes before the request was ever written.  The planner's count of bytes held must still be
    the bytes held (it bounds the store: max_total_bytes)."""
    store = Store(tmp_path / "cp.db")
    conn = Conn()
    store.planner.track(conn.rec)
    store.commit()
    exchange(conn, store, "a", 1000)
    conn.track.client_acked(len(conn.server_stream))
    conn.client(get("b"))
    assert conn.track.advance()
    store.planner.touch(conn.rec)
    (w,) = store.commit()
    assert w.log_base == len(get("a")) and w.log_off == len(get("a")) and w.log_data == get("b")
    (loaded,) = store.reload()
    assert bytes(loaded.rec.log.data) == get("b") and loaded.rec.log.base == len(get("a"))
    assert store.planner.stats.held_total == conn.log.end - conn.log.base == len(get("b"))
    store.planner.forget(1)
    assert store.planner.stats.held_total == 0


def test_a_trim_in_a_batch_without_the_ici_reloads_a_sane_digest(tmp_path: Path):
    """The ICI (and with it the digest's end, grid and cuts) is rewritten only every
    ici_interval; the trim and the chunks every batch.  A store read back between the two must
    still give a digest that starts at its base and ends at or after it."""
    store = Store(tmp_path / "cp.db", ici_interval=100.0)
    conn = Conn()
    store.planner.track(conn.rec)
    store.commit()  # the ICI and digest metadata: end 0
    exchange(conn, store, "a", 100_000)
    (w,) = store.commit()
    assert w.ici is None and w.chunks
    conn.track.client_acked(len(conn.server_stream))
    conn.client(get("b"))
    assert conn.track.advance()
    store.planner.touch(conn.rec)
    (w,) = store.commit()
    assert w.ici is None and w.digest_base == (len(ok(100_000)), conn.digest.dropped)
    (loaded,) = store.reload()
    dg = loaded.rec.digest
    assert dg.base == conn.digest.base
    assert dg.end >= dg.base, f"digest reloaded with end {dg.end} before its base {dg.base}"
    assert (dg.end, dg.grid) == (conn.digest.end, conn.digest.grid)


def test_adopted_trimmed_record_writes_only_what_is_new(tmp_path: Path):
    store = Store(tmp_path / "cp.db")
    conn = Conn()
    store.planner.track(conn.rec)
    store.commit()
    exchange(conn, store, "a", 70_000)
    conn.ack()
    conn.client(get("b"))
    store.planner.touch(conn.rec)
    store.commit()
    (loaded,) = store.reload()
    rec = loaded.rec
    planner = CommitPlanner(ici_interval=0)
    planner.adopt(rec, 2000.0)
    assert rec.commit_offset == rec.log.end and planner.stats.held_total == len(get("b"))
    rec.log.add(rec.log.end, b"xyz")
    planner.touch(rec)
    batch = planner.plan(2001.0)
    assert batch is not None
    (w,) = batch.writes
    assert (w.log_off, w.log_data, w.log_base, w.digest_base) == (conn.log.end, b"xyz", None, None)
    assert w.chunks == []


# ----- the format 1 -> 2 migration -----------------------------------------------------------

# checkpoint/io/sqlite.py's SCHEMA of format "1" (git show HEAD~3:checkpoint/io/sqlite.py)
SCHEMA_1 = """
CREATE TABLE IF NOT EXISTS conn (
    id INTEGER PRIMARY KEY,
    ici TEXT NOT NULL,
    saved REAL NOT NULL,
    log_end INTEGER NOT NULL DEFAULT 0,
    fin INTEGER NOT NULL DEFAULT 0,
    digest TEXT
);
CREATE TABLE IF NOT EXISTS logdata (conn INTEGER NOT NULL, off INTEGER NOT NULL, data BLOB NOT NULL,
                                    PRIMARY KEY (conn, off)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunk (conn INTEGER NOT NULL, idx INTEGER NOT NULL, hash BLOB,
                                  PRIMARY KEY (conn, idx)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sample (conn INTEGER NOT NULL, off INTEGER NOT NULL, len INTEGER NOT NULL,
                                   hash BLOB NOT NULL, PRIMARY KEY (conn, off)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
"""


def format1_store(path: Path, data: bytes, server: bytes) -> StreamDigest:
    """A store written by the format-1 appliance: one connection, its log and digest."""
    rec = make_record(7)
    dg = StreamDigest(("http-date",))
    dg.add(0, server)
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_1)
    db.execute("INSERT INTO meta VALUES ('format', '1')")
    meta = json.dumps({"kind": "stream", "end": dg.end, "volatile": ["http-date"], "overflow": None})
    db.execute("INSERT INTO conn VALUES (?, ?, ?, ?, ?, ?)",
               (7, json.dumps(record_state(rec)), 1234.5, len(data), 0, meta))
    db.execute("INSERT INTO logdata VALUES (7, 0, ?)", (data[:1000],))
    db.execute("INSERT INTO logdata VALUES (7, 1000, ?)", (data[1000:],))
    db.executemany("INSERT INTO chunk VALUES (7, ?, ?)", list(enumerate(dg.chunks)))
    db.commit()
    db.close()
    return dg


def test_a_format_1_store_is_migrated(tmp_path: Path):
    path = tmp_path / "cp.db"
    data = bytes(range(256)) * 10
    server = random.Random(4).randbytes(3 * CHUNK + 500)
    old = format1_store(path, data, server)
    backend = SqliteBackend(path)
    (loaded,) = backend.load()
    assert backend.load_errors == []
    assert loaded.rec.id == 7 and loaded.saved_at == 1234.5
    log, dg = loaded.rec.log, loaded.rec.digest
    assert log is not None
    assert (log.base, log.end, bytes(log.data)) == (0, len(data), data)
    assert isinstance(dg, StreamDigest) and dg.base == 0 and dg.dropped == 0
    assert dg.bounds == [CHUNK, 2 * CHUNK, 3 * CHUNK] and dg.chunks == old.chunks and dg.end == len(server)
    backend.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT v FROM meta WHERE k = 'format'").fetchone() == (FORMAT,) == ("2",)
    cols = {r[1] for r in db.execute("PRAGMA table_info(conn)")}
    assert {"log_base", "digest_base", "digest_dropped"} <= cols
    assert "bound" in {r[1] for r in db.execute("PRAGMA table_info(chunk)")}
    db.close()
    # the migrated store takes trims like a new one, and opens again without migrating twice
    store = Store(path)
    planner = store.planner
    rec = loaded.rec
    planner.adopt(rec, 2000.0)
    assert rec.log is not None and isinstance(rec.digest, StreamDigest)
    rec.log.trim(1500)
    rec.digest.trim(2 * CHUNK)
    planner.touch(rec)
    (w,) = store.commit()
    assert w.log_base == 1500 and w.digest_base == (2 * CHUNK, 2)
    (again,) = store.reload()
    assert (again.rec.log.base, bytes(again.rec.log.data)) == (1500, data[1500:])
    assert again.rec.digest.base == 2 * CHUNK and again.rec.digest.chunks[0] == old.chunks[2]


def test_an_unknown_format_is_refused(tmp_path: Path):
    path = tmp_path / "cp.db"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_1)
    db.execute("INSERT INTO meta VALUES ('format', '3')")
    db.commit()
    db.close()
    with pytest.raises(RuntimeError, match="format 3"):
        SqliteBackend(path).load()


# ----- checkpoint.state: log and digest with a base ------------------------------------------

def test_log_state_round_trip_with_a_base():
    log = ByteLog(1000)
    log.add(0, b"a" * 800)
    log.trim(700)
    log.add(800, b"b" * 300)
    log.fin_offset = 1100
    s = log_state(log)
    assert s == {"limit": 1000, "end": 1100, "fin_offset": 1100, "overflow": None, "base": 700}
    back = log_from_state(json.loads(json.dumps(s)), bytes(log.data))
    assert (back.base, back.end, bytes(back.data), back.fin_offset) == (700, 1100, bytes(log.data), 1100)
    assert back.read(700, 5) == b"aaaaa"
    with pytest.raises(ValueError):
        back.read(699, 1)


def test_log_state_without_a_base_reads_as_from_zero():
    s = {"limit": 100, "end": 3, "fin_offset": None, "overflow": None}  # as older states
    log = log_from_state(s, b"abc")
    assert log.base == 0 and log.read(0, 3) == b"abc"
    assert "base" not in log_state(log)


@pytest.mark.parametrize("change,data,field", [
    ({"base": 1200}, b"", "log.base"),                 # after its end
    ({"base": -1}, b"", "log.base"),
    ({"base": "7"}, b"", "log.base"),
    ({"base": 700}, b"x" * 10, "log.end"),             # the data does not fit [base, end)
    ({"base": 0}, b"x" * 400, "log.end"),              # 1100 bytes held: over the limit
])
def test_bad_log_base_names_the_field(change, data, field):
    s = {"limit": 1000, "end": 1100, "fin_offset": None, "overflow": None, **change}
    with pytest.raises(StateError) as e:
        log_from_state(s, data, "log")
    assert e.value.field == field and str(e.value).startswith(field)


def trimmed_digest() -> tuple[StreamDigest, bytes, list[int]]:
    """A digest cut at three message ends, trimmed to the second: chunks after the base, cuts, a
    grid that is not 0."""
    parts = [ok(30_000, 1), ok(90_000, 2), ok(200_000, 3)]
    ends = [sum(len(p) for p in parts[:i + 1]) for i in range(3)]
    data = b"".join(parts)
    dg = StreamDigest(("http-date",))
    dg.cutter = lambda mv: [e for e in ends if dg.end < e <= dg.end + len(mv)]
    for i in range(0, len(data) - 20_000, 1448):
        dg.add(i, data[i:min(i + 1448, len(data) - 20_000)])
    dg.cutter = None
    dg.trim(ends[1])
    assert dg.base == ends[1] and dg.dropped > 0 and dg.chunks
    return dg, data, ends


def test_digest_state_round_trip_with_base_bounds_and_cuts():
    dg, data, ends = trimmed_digest()
    s = digest_state(dg)
    assert (s["base"], s["bounds"], s["grid"], s["cuts"], s["dropped"]) == (
        dg.base, dg.bounds, dg.grid, dg.cuts, dg.dropped)
    back = digest_from_state(json.loads(json.dumps(s)), "digest")
    assert isinstance(back, StreamDigest)
    assert (back.base, back.dropped, back.grid, back.cuts, back.end) == (dg.base, dg.dropped, dg.grid, dg.cuts, dg.end)
    assert back.bounds[:len(dg.bounds)] == dg.bounds and back.chunks[:len(dg.chunks)] == dg.chunks
    # restored: blind up to the next boundary, then it hashes as the original does
    end = len(data) - 20_000
    for i in range(end, len(data), 1448):
        back.add(i, data[i:i + 1448])
        dg.add(i, data[i:i + 1448])
    assert back.bounds == dg.bounds and back.end == dg.end
    known = [i for i, h in enumerate(back.chunks) if h is not None]
    assert [back.chunks[i] for i in known] == [dg.chunks[i] for i in known]
    assert len(known) >= len(dg.chunks) - 2
    # its state again is the same (exactly, but for the blind chunk)
    again = digest_state(back)
    assert (again["base"], again["bounds"], again["cuts"], again["dropped"]) == (
        dg.base, dg.bounds, dg.cuts, dg.dropped)
    # a verifier from the base checks the rest of the stream against the restored digest
    snap = back.snapshot()
    v = StreamVerifier(snap, snap.base)
    v.add(snap.base, data[snap.base:])
    assert v.done and v.unverified_bytes > 0


def test_old_style_digest_state_still_reads():
    dg = StreamDigest(("http-date",))
    data = random.Random(5).randbytes(2 * CHUNK + 100)
    dg.add(0, data)
    s = digest_state(dg)
    assert not {"base", "bounds", "grid", "cuts", "dropped"} & set(s)  # nothing trimmed or cut
    back = digest_from_state(s)
    assert isinstance(back, StreamDigest)
    assert (back.base, back.dropped, back.cuts, back.grid) == (0, 0, [], 0)
    assert back.bounds[:2] == [CHUNK, 2 * CHUNK] and back.chunks[:2] == dg.chunks


def _trimmed_state() -> dict:
    return digest_state(trimmed_digest()[0])


def _with(key, value):
    def mutate(s):
        s[key] = value(s) if callable(value) else value
    return mutate


@pytest.mark.parametrize("mutate,field", [
    (lambda s: s["bounds"].reverse(), "digest.bounds[1]"),                                  # decreasing
    (lambda s: s["bounds"].__setitem__(1, s["bounds"][0]), "digest.bounds[1]"),             # not increasing
    (lambda s: s["bounds"].__setitem__(0, s["base"]), "digest.bounds[0]"),                  # an empty chunk
    (lambda s: s["bounds"].__setitem__(-1, s["end"] + 1), "digest.bounds["),                # past the end
    (lambda s: s["bounds"].__setitem__(0, s["base"] + CHUNK + 1), "digest.bounds"),         # longer than 64 KiB
    (lambda s: s["bounds"].pop(), "digest.chunks"),                                         # one hash too many
    (_with("bounds", "x"), "digest.bounds"),
    (_with("base", -5), "digest.base"),
    (_with("cuts", lambda s: [s["base"] - 1]), "digest.cuts[0]"),                           # before the base
    (_with("cuts", lambda s: [s["end"] + 1]), "digest.cuts[0]"),
    (_with("grid", lambda s: s["end"] + 1), "digest.grid"),
    (_with("dropped", -1), "digest.dropped"),
    (_with("dropped", 1.5), "digest.dropped"),
])
def test_bad_trimmed_digest_state_names_the_field(mutate, field):
    s = _trimmed_state()
    mutate(s)
    with pytest.raises(StateError) as e:
        digest_from_state(s, "digest")
    assert e.value.field.startswith(field) and str(e.value).startswith(e.value.field)


def test_a_chunk_longer_than_64k_is_refused():
    s = _trimmed_state()
    s["bounds"][0] = s["base"] + CHUNK + 1
    with pytest.raises(StateError, match="longer than 65536") as e:
        digest_from_state(s, "digest")
    assert e.value.field == "digest.bounds"
    s["bounds"][0] = s["base"] + CHUNK  # exactly 64 KiB: fine
    assert isinstance(back := digest_from_state(s, "digest"), StreamDigest) and back.base == s["base"]


def test_a_trim_of_every_byte_logged_before_it_was_written_moves_the_commit_point(tmp_path: Path):
    """Request, response and acknowledgment inside one commit interval, nothing after them: the
    log is trimmed to its end before its bytes were ever written.  Nothing is left to write,
    and the commit point must still reach the trim (no replay starts before it) — else the
    delayed-ACK gate holds the connection's acknowledgments for good (found in the lab: a
    keep-alive client stalled after its first request with a disk store)."""
    store = Store(tmp_path / "cp.db")
    conn = Conn()
    store.planner.track(conn.rec)
    store.commit()
    assert conn.rec.commit_offset == 0
    exchange(conn, store, "a", 1000)
    assert conn.ack() and conn.log.base == conn.log.end == len(get("a"))
    store.planner.touch(conn.rec)
    (w,) = store.commit()
    assert w.log_data == b"" and w.log_base == len(get("a")) and w.log_end == len(get("a"))
    assert conn.rec.commit_offset == len(get("a"))
    # and the next request is written from there, its commit point moving on
    conn.client(get("b"))
    store.planner.touch(conn.rec)
    (w,) = store.commit()
    assert (w.log_off, w.log_data) == (len(get("a")), get("b"))
    assert conn.rec.commit_offset == len(get("a")) + len(get("b"))
    assert store.planner.stats.held_total == len(get("b"))
