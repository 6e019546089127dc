"""The ``disk`` backend of the checkpoint store: SQLite at the disk boundary.

SQLite in WAL mode with ``synchronous = FULL``: a commit is one append to the
write-ahead log and one fsync, readers never block the writer, crash recovery
and space reuse after deletes are SQLite's, and it is in the standard library.
It implements :class:`checkpoint.store.Backend`; the pure commit planner lives
in :mod:`checkpoint.store`.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from ..store import Batch, Loaded
from ..streamlog import CHUNK, ByteLog, SampledDigest, StreamDigest

SCHEMA = """
CREATE TABLE IF NOT EXISTS conn (
    id INTEGER PRIMARY KEY,
    ici TEXT NOT NULL,
    saved REAL NOT NULL,
    log_end INTEGER NOT NULL DEFAULT 0,
    fin INTEGER NOT NULL DEFAULT 0,
    digest TEXT,
    log_base INTEGER NOT NULL DEFAULT 0,
    digest_base INTEGER NOT NULL DEFAULT 0,
    digest_dropped INTEGER NOT NULL DEFAULT 0,
    fin_server INTEGER,
    move TEXT
);
CREATE TABLE IF NOT EXISTS logdata (conn INTEGER NOT NULL, off INTEGER NOT NULL, data BLOB NOT NULL,
                                    PRIMARY KEY (conn, off)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunk (conn INTEGER NOT NULL, idx INTEGER NOT NULL, hash BLOB, bound INTEGER,
                                  PRIMARY KEY (conn, idx)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sample (conn INTEGER NOT NULL, off INTEGER NOT NULL, len INTEGER NOT NULL,
                                   hash BLOB NOT NULL, PRIMARY KEY (conn, off)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
"""
FORMAT = "2"
# format 1 -> 2: trimmed logs and digests (HTTP-aware replay), chunks with their end offsets
MIGRATE_1 = [
    "ALTER TABLE conn ADD COLUMN log_base INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE conn ADD COLUMN digest_base INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE conn ADD COLUMN digest_dropped INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE chunk ADD COLUMN bound INTEGER",
]
# within format 2, a column added: what the server had sent when the client's FIN was logged
# (NULL: unknown, as in rows an older appliance wrote; older appliances ignore the column)
ADD_FIN_SERVER = "ALTER TABLE conn ADD COLUMN fin_server INTEGER"
# within format 2, a column added: the move state of a connection moved by replay
# (checkpoint.state.move_state JSON; NULL: not moved by replay, as in rows an older appliance wrote)
ADD_MOVE = "ALTER TABLE conn ADD COLUMN move TEXT"


class SqliteBackend:
    """``store.mode = "disk"``: SQLite, WAL, one fsync per batch."""

    def __init__(self, path: str | Path, *, commit_delay: float = 0.0) -> None:
        self.path = Path(path)
        self.commit_delay = commit_delay  # test only: a slow disk
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            fresh = db.execute("SELECT name FROM sqlite_master WHERE name = 'conn'").fetchone() is None
            row = None if fresh else db.execute("SELECT v FROM meta WHERE k='format'").fetchone()
            if row is not None and row[0] == "1":
                for stmt in MIGRATE_1:
                    db.execute(stmt)
                db.execute("UPDATE meta SET v = ? WHERE k = 'format'", (FORMAT,))
                row = (FORMAT,)
            db.executescript(SCHEMA)
            if row is None:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('format', ?)", (FORMAT,))
            elif row[0] != FORMAT:
                raise RuntimeError(f"{self.path}: checkpoint store format {row[0]}, this appliance reads {FORMAT}")
            columns = {r[1] for r in db.execute("PRAGMA table_info(conn)")}
            if "fin_server" not in columns:
                db.execute(ADD_FIN_SERVER)
            if "move" not in columns:
                db.execute(ADD_MOVE)
            self._db = db
        return self._db

    def write(self, batch: Batch) -> None:
        db = self._conn()
        if self.commit_delay:
            time.sleep(self.commit_delay)
        db.execute("BEGIN")
        try:
            for cid in batch.forget:
                for table in ("conn", "logdata", "chunk", "sample"):
                    db.execute(f"DELETE FROM {table} WHERE {'id' if table == 'conn' else 'conn'} = ?", (cid,))
            for w in batch.writes:
                if w.ici is not None:
                    db.execute(
                        "INSERT INTO conn (id, ici, saved, log_end, fin, digest) VALUES (?, ?, ?, ?, ?, ?) "
                        "ON CONFLICT(id) DO UPDATE SET ici = excluded.ici, saved = excluded.saved, "
                        "digest = COALESCE(excluded.digest, conn.digest)",
                        (w.cid, w.ici, batch.planned, 0, 0, w.digest_meta))
                if w.move_set:
                    db.execute("UPDATE conn SET move = ? WHERE id = ?", (w.move, w.cid))
                if w.log_data:
                    db.execute("INSERT OR REPLACE INTO logdata VALUES (?, ?, ?)", (w.cid, w.log_off, w.log_data))
                if w.log_base is not None:
                    db.execute("UPDATE conn SET log_base = ? WHERE id = ?", (w.log_base, w.cid))
                    db.execute("DELETE FROM logdata WHERE conn = ? AND off + length(data) <= ?", (w.cid, w.log_base))
                if w.digest_base is not None:
                    db.execute("UPDATE conn SET digest_base = ?, digest_dropped = ? WHERE id = ?",
                               (w.digest_base[0], w.digest_base[1], w.cid))
                    db.execute("DELETE FROM chunk WHERE conn = ? AND idx < ?", (w.cid, w.digest_base[1]))
                db.execute("UPDATE conn SET log_end = MAX(log_end, ?), fin = MAX(fin, ?), "
                           "fin_server = COALESCE(fin_server, ?) WHERE id = ?",
                           (w.log_end, int(w.fin), w.fin_server if w.fin else None, w.cid))
                if w.chunks:
                    bounds: list[int | None] = list(w.bounds) if w.bounds else [None] * len(w.chunks)
                    db.executemany("INSERT OR REPLACE INTO chunk VALUES (?, ?, ?, ?)",
                                   [(w.cid, w.chunks_from + i, h, b) for i, (h, b) in enumerate(zip(w.chunks, bounds))])
                if w.samples is not None:
                    db.execute("DELETE FROM sample WHERE conn = ?", (w.cid,))
                    db.executemany("INSERT OR REPLACE INTO sample VALUES (?, ?, ?, ?)",
                                   [(w.cid, o, n, h) for o, n, h in w.samples])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        batch.written = time.time()

    def load(self) -> list[Loaded]:
        """Every stored connection, its log and digest rebuilt.  A record that
        cannot be read back is skipped and named in ``self.load_errors``."""
        from ..state import record_from_state

        db = self._conn()
        out: list[Loaded] = []
        self.load_errors: list[str] = []
        for cid, ici, saved, log_end, fin, digest, log_base, digest_base, dropped, fin_server, move in db.execute(
                "SELECT id, ici, saved, log_end, fin, digest, log_base, digest_base, digest_dropped, fin_server, move "
                "FROM conn ORDER BY id").fetchall():
            try:
                rec = record_from_state(json.loads(ici))
            except Exception as exc:  # a damaged row must not stop the others
                self.load_errors.append(f"connection {cid}: {exc}")
                continue
            data = bytearray()
            for off, chunk in db.execute("SELECT off, data FROM logdata WHERE conn = ? ORDER BY off", (cid,)):
                end = log_base + len(data)
                if off > end:
                    break  # never happens with in-order writes; a gap ends the usable log
                if off + len(chunk) > end:
                    data += chunk[end - off:]
            del data[max(0, log_end - log_base):]
            log = ByteLog(1 << 31, base=log_base)
            log.data = data
            if fin:
                log.fin_offset = log.end
                log.fin_server_offset = fin_server
            rec.log = log
            rec.digest = self._digest(db, cid, digest, digest_base, dropped)
            out.append(Loaded(rec, saved, move))
        return out

    @staticmethod
    def _digest(db: sqlite3.Connection, cid: int, meta: str | None, base: int = 0,
                dropped: int = 0) -> StreamDigest | SampledDigest | None:
        if meta is None:
            return None
        m = json.loads(meta)
        volatile = tuple(m.get("volatile", ()))
        if m["kind"] == "sampled":
            sdg = SampledDigest(volatile)
            sdg.samples = [(o, n, bytes(h)) for o, n, h in
                          db.execute("SELECT off, len, hash FROM sample WHERE conn = ? ORDER BY off", (cid,))]
            sdg.end, sdg.stride, sdg.overflow = m["end"], m.get("stride", 1), m.get("overflow")
            return sdg
        rows = db.execute("SELECT idx, hash, bound FROM chunk WHERE conn = ? AND idx >= ? ORDER BY idx",
                          (cid, dropped)).fetchall()
        chunks: list[bytes | None] = []
        bounds: list[int] = []
        for idx, h, bound in rows:
            if idx != dropped + len(chunks):
                break  # a gap: the rest is blind
            chunks.append(None if h is None else bytes(h))
            bounds.append(bound if bound is not None else (idx + 1) * CHUNK)
        end = max([m["end"], base, *bounds[-1:]])  # the trim may be newer than the metadata
        dg = StreamDigest.restored(chunks, end, volatile, base=base, bounds=bounds, grid=m.get("grid"),
                                   cuts=m.get("cuts", ()), dropped=dropped)
        dg.overflow = m.get("overflow")
        return dg

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

