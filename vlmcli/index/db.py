"""One index = one SQLite file: which image files it holds and their CLIP vectors.

Files are keyed by absolute path, with size, mtime and the content's SHA-256; vectors are keyed by
(SHA-256, model file hash), so a moved, renamed or copied file finds its vector by content, and two
CLIP models can share one index. Every vector carries the model's name and file hash.

Durability: WAL journal, and every change an index run makes lands in one transaction per batch
(`transaction()`), so a run killed at any moment (kill -9 included) leaves whole batches only and a
rerun carries on from there. Captions live in their own table with an FTS5 index over their text.

Locks: another process holding the file (a concurrent `vlm index` between batches, any program with
a transaction open) is waited for, as long as the command can afford (READ_WAIT_S, WRITE_WAIT_S), then
the command stops with one line saying the index is locked.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlmcli.errors import VlmError

SCHEMA_VERSION = 1
# Vectors are stored as little-endian float32: the ranking the index gives is the ranking of the
# exact vectors `vlm embed` writes (float16 halves the file but reorders near-ties).
VECTOR_DTYPE = "<f4"

# How long one statement waits for another process's lock before the command gives up, by name.
# Readers (search, dupes, the search page, the server) answer people who are waiting for them;
# a writer's run is long anyway, and a concurrent `vlm index` holds the file for one batch's commit.
READ_WAIT_S = 5.0
WRITE_WAIT_S = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,          -- absolute
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    indexed_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_sha256 ON files (sha256);
CREATE TABLE IF NOT EXISTS models (
    hash TEXT PRIMARY KEY,          -- SHA-256 of the model file
    name TEXT NOT NULL,
    path TEXT,                      -- where the file was when it was last used (size + mtime: its hash is current)
    size INTEGER,
    mtime_ns INTEGER
);
CREATE TABLE IF NOT EXISTS vectors (
    sha256 TEXT NOT NULL,           -- the image's content
    model_hash TEXT NOT NULL,
    model TEXT NOT NULL,
    dtype TEXT NOT NULL,
    dim INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (sha256, model_hash)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS captions (
    id INTEGER PRIMARY KEY,
    sha256 TEXT NOT NULL,
    model TEXT NOT NULL,
    detail TEXT NOT NULL,
    text TEXT NOT NULL,
    UNIQUE (sha256, model, detail)
);
CREATE VIRTUAL TABLE IF NOT EXISTS captions_fts USING fts5 (text, content='captions', content_rowid='id');
CREATE TRIGGER IF NOT EXISTS captions_ai AFTER INSERT ON captions BEGIN
    INSERT INTO captions_fts (rowid, text) VALUES (new.id, new.text);
END;
CREATE TRIGGER IF NOT EXISTS captions_ad AFTER DELETE ON captions BEGIN
    INSERT INTO captions_fts (captions_fts, rowid, text) VALUES ('delete', old.id, old.text);
END;
CREATE TRIGGER IF NOT EXISTS captions_au AFTER UPDATE ON captions BEGIN
    INSERT INTO captions_fts (captions_fts, rowid, text) VALUES ('delete', old.id, old.text);
    INSERT INTO captions_fts (rowid, text) VALUES (new.id, new.text);
END;
"""


class IndexLocked(VlmError):
    """Another process held the index's lock for longer than this command waits (the server: 503)."""


@dataclass(frozen=True)
class ModelRef:
    """A CLIP model as the index knows it: its name and the SHA-256 of its file."""

    name: str
    hash: str
    path: str | None = None


@dataclass(frozen=True)
class FileRow:
    path: str
    size: int
    mtime_ns: int
    sha256: str


@dataclass
class Vectors:
    """The vectors of one model for some files, one row per file (copies of one image share a vector)."""

    files: list[FileRow]
    matrix: np.ndarray  # (len(files), dim) float32, unit rows

    def __len__(self) -> int:
        return len(self.files)


def folder_bounds(folder: str) -> tuple[str, str]:
    """Paths under `folder` are those in [folder + "/", folder + "0"): "0" follows "/" in code points."""
    base = os.path.abspath(folder).rstrip(os.sep) + os.sep
    return base, base[:-1] + chr(ord(os.sep) + 1)


class IndexDB:
    """An open index file. Use as a context manager; `transaction()` groups writes."""

    def __init__(self, path: str | os.PathLike[str], create: bool = True, wait_s: float = READ_WAIT_S):
        self.path = Path(path)
        self.wait_s = wait_s
        if not create and not self.path.exists():
            raise VlmError("no index here yet (build one with `vlm index PATH`)", self.path)
        if self.path.is_dir():
            raise VlmError("is a directory, not an index file", self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE ... COMMIT) in transaction().
            self.conn = sqlite3.connect(self.path, isolation_level=None, timeout=wait_s, check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a killed process loses no commit
            self._migrate()
        except (sqlite3.DatabaseError, UnicodeDecodeError) as e:  # not UTF-8: a text column's bytes damaged
            if is_locked(e):
                raise self.locked_error() from None
            raise VlmError(f"cannot open the index ({' '.join(str(e).split())})", self.path) from None
        except OSError as e:
            raise VlmError(f"cannot open the index ({e.strerror or e})", self.path) from None

    def _migrate(self) -> None:
        has_meta = self.conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
        if has_meta:
            row = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            version = self._meta_int(row, "schema_version")
            if version > SCHEMA_VERSION:
                raise VlmError(
                    f"the index has schema version {version}; this vlm reads up to {SCHEMA_VERSION} (upgrade vlm)",
                    self.path,
                )
            if version == SCHEMA_VERSION:
                return
        # One script, one transaction (executescript commits anything pending before it runs).
        self.conn.executescript(
            "BEGIN IMMEDIATE;"
            + _SCHEMA
            + f"INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', '{SCHEMA_VERSION}');COMMIT;"
        )

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> IndexDB:
        return self

    def __exit__(self, kind: object, error: object, tb: object) -> None:
        self.close()
        if isinstance(error, sqlite3.OperationalError) and is_locked(error):
            raise self.locked_error() from None
        # A damaged file found past the open (a table gone, text that is not UTF-8): named, one line.
        if isinstance(error, (sqlite3.DatabaseError, UnicodeDecodeError)):
            raise VlmError(f"the index cannot be used ({' '.join(str(error).split())})", self.path) from None

    def locked_error(self) -> IndexLocked:
        return IndexLocked(
            f"the index is locked by another process (gave up after {self.wait_s:g} s; "
            "run this again once that process is done with it)",
            self.path,
        )

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it is committed, or (an error, a killed process) none of it.
        One that changed anything raises the index's generation (what files derived from it check)."""
        self.conn.execute("BEGIN IMMEDIATE")
        before = self.conn.total_changes
        try:
            yield self.conn
            if self.conn.total_changes != before:
                self.conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('generation', '1') "
                    "ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
                )
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def generation(self) -> int:
        row = self.conn.execute("SELECT value FROM meta WHERE key='generation'").fetchone()
        return self._meta_int(row, "generation")

    def _meta_int(self, row: tuple | None, key: str) -> int:
        if row is None:
            return 0
        try:
            return int(row[0])
        except (TypeError, ValueError):
            raise VlmError(f"the index is damaged (its {key} is {str(row[0])[:40]!r})", self.path) from None

    # ------------------------------------------------------------------------- models

    def cached_model_hash(self, path: str, size: int, mtime_ns: int) -> str | None:
        """The hash of a model file seen before with this size and mtime (hashing a large GGUF takes seconds)."""
        row = self.conn.execute(
            "SELECT hash FROM models WHERE path=? AND size=? AND mtime_ns=?", (path, size, mtime_ns)
        ).fetchone()
        digest = str(row[0]) if row else ""
        # Only a SHA-256 is taken: it names files beside the index (ann.py); a damaged row is hashed again.
        return digest if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest) else None

    def put_model(self, model: ModelRef, size: int | None = None, mtime_ns: int | None = None) -> None:
        row = self.conn.execute("SELECT name, path, size, mtime_ns FROM models WHERE hash=?", (model.hash,)).fetchone()
        if row is not None and tuple(row) == (model.name, model.path, size, mtime_ns):
            return
        with self.transaction() as c:
            c.execute(
                "INSERT INTO models (hash, name, path, size, mtime_ns) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (hash) DO UPDATE SET name=excluded.name, path=excluded.path, "
                "size=excluded.size, mtime_ns=excluded.mtime_ns",
                (model.hash, model.name, model.path, size, mtime_ns),
            )

    def models(self) -> list[tuple[ModelRef, int]]:
        """The models with vectors in the index, and how many vectors each has."""
        rows = self.conn.execute(
            "SELECT m.name, m.hash, m.path, COUNT(v.sha256) FROM models m "
            "JOIN vectors v ON v.model_hash = m.hash GROUP BY m.hash ORDER BY m.name"
        ).fetchall()
        return [(ModelRef(name, h, path), int(n)) for name, h, path, n in rows]

    # ------------------------------------------------------------------------- files

    def files_under(self, folders: Sequence[str] = (), paths: Sequence[str] = ()) -> dict[str, FileRow]:
        """The files in the index under any of `folders` (recursively) or named in `paths` (absolute)."""
        out: dict[str, FileRow] = {}
        for folder in folders:
            lo, hi = folder_bounds(folder)
            for r in self.conn.execute(
                "SELECT path, size, mtime_ns, sha256 FROM files WHERE path >= ? AND path < ?", (lo, hi)
            ):
                out[r[0]] = FileRow(*r)
        for p in paths:
            row = self.file(p)
            if row is not None:
                out[row.path] = row
        return out

    def file(self, path: str) -> FileRow | None:
        r = self.conn.execute("SELECT path, size, mtime_ns, sha256 FROM files WHERE path=?", (path,)).fetchone()
        return FileRow(*r) if r else None

    def all_files(self) -> list[FileRow]:
        return [FileRow(*r) for r in self.conn.execute("SELECT path, size, mtime_ns, sha256 FROM files ORDER BY path")]

    def shas_with_vectors(self, model_hash: str, shas: Iterable[str]) -> set[str]:
        wanted = list(set(shas))
        have: set[str] = set()
        for i in range(0, len(wanted), 500):  # SQLite's bound-parameter limit
            chunk = wanted[i : i + 500]
            marks = ",".join("?" * len(chunk))
            have.update(
                r[0]
                for r in self.conn.execute(
                    f"SELECT sha256 FROM vectors WHERE model_hash=? AND sha256 IN ({marks})", (model_hash, *chunk)
                )
            )
        return have

    @staticmethod
    def put_files(conn: sqlite3.Connection, rows: Iterable[FileRow]) -> None:
        """Inside a transaction: add or update file rows."""
        now = time.time()
        conn.executemany(
            "INSERT INTO files (path, size, mtime_ns, sha256, indexed_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (path) DO UPDATE SET size=excluded.size, mtime_ns=excluded.mtime_ns, "
            "sha256=excluded.sha256, indexed_at=excluded.indexed_at",
            [(r.path, r.size, r.mtime_ns, r.sha256, now) for r in rows],
        )

    @staticmethod
    def put_vector(conn: sqlite3.Connection, sha256: str, model: ModelRef, vector: np.ndarray) -> None:
        """Inside a transaction: the vector of one image content for one model."""
        v = np.ascontiguousarray(vector, dtype=VECTOR_DTYPE).reshape(-1)
        conn.execute(
            "INSERT OR REPLACE INTO vectors (sha256, model_hash, model, dtype, dim, data) VALUES (?, ?, ?, ?, ?, ?)",
            (sha256, model.hash, model.name, "float32", int(v.shape[0]), v.tobytes()),
        )

    @staticmethod
    def delete_files(conn: sqlite3.Connection, paths: Iterable[str]) -> None:
        """Inside a transaction: drop file rows (their vectors go with `prune` once no file has them)."""
        conn.executemany("DELETE FROM files WHERE path=?", [(p,) for p in paths])

    def prune(self) -> int:
        """Drop vectors and captions no file refers to any more (after deletions and edits)."""
        with self.transaction() as c:
            n = c.execute("DELETE FROM vectors WHERE sha256 NOT IN (SELECT sha256 FROM files)").rowcount
            c.execute("DELETE FROM captions WHERE sha256 NOT IN (SELECT sha256 FROM files)")
        return int(n)

    def counts(self) -> dict[str, int]:
        def one(sql: str) -> int:
            return int(self.conn.execute(sql).fetchone()[0])

        return {
            "files": one("SELECT COUNT(*) FROM files"),
            "vectors": one("SELECT COUNT(*) FROM vectors"),
            "captions": one("SELECT COUNT(*) FROM captions"),
        }

    # ------------------------------------------------------------------------- vectors

    def files_with_vectors(self, model_hash: str) -> list[FileRow]:
        """The files that have a vector of the model, in the order `vectors` gives their rows."""
        rows = self.conn.execute(
            "SELECT f.path, f.size, f.mtime_ns, f.sha256 FROM files f JOIN vectors v ON v.sha256 = f.sha256 "
            "WHERE v.model_hash = ? ORDER BY f.path",
            (model_hash,),
        )
        return [FileRow(*r) for r in rows]

    def vectors(
        self,
        model_hash: str,
        folders: Sequence[str] = (),
        since_ns: int | None = None,
        until_ns: int | None = None,
    ) -> Vectors:
        """The model's vectors of the files in the index, in path order, optionally only files under
        `folders` and with an mtime in [since_ns, until_ns)."""
        where = ["v.model_hash = ?"]
        args: list[object] = [model_hash]
        if folders:
            parts = []
            for folder in folders:
                lo, hi = folder_bounds(folder)
                parts.append("(f.path >= ? AND f.path < ?)")
                args += [lo, hi]
            where.append("(" + " OR ".join(parts) + ")")
        if since_ns is not None:
            where.append("f.mtime_ns >= ?")
            args.append(since_ns)
        if until_ns is not None:
            where.append("f.mtime_ns < ?")
            args.append(until_ns)
        rows = self.conn.execute(
            "SELECT f.path, f.size, f.mtime_ns, f.sha256, v.dim, v.data FROM files f "
            "JOIN vectors v ON v.sha256 = f.sha256 WHERE " + " AND ".join(where) + " ORDER BY f.path",
            args,
        ).fetchall()
        files = [FileRow(r[0], r[1], r[2], r[3]) for r in rows]
        if not rows:
            return Vectors(files, np.zeros((0, 0), np.float32))
        dim = int(rows[0][4])
        data = b"".join(r[5] if isinstance(r[5], bytes) else b"" for r in rows)
        if dim <= 0 or any(r[4] != dim for r in rows) or len(data) != len(rows) * dim * 4:
            raise VlmError(f"the index is damaged (vectors of dimension {dim} do not match their data)", self.path)
        matrix = np.frombuffer(data, dtype=VECTOR_DTYPE).reshape(len(rows), dim)
        return Vectors(files, matrix.astype(np.float32, copy=False))

    # ------------------------------------------------------------------------- captions

    @staticmethod
    def put_caption(conn: sqlite3.Connection, sha256: str, model: str, detail: str, text: str) -> None:
        conn.execute(
            "INSERT INTO captions (sha256, model, detail, text) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (sha256, model, detail) DO UPDATE SET text=excluded.text",
            (sha256, model, detail, text),
        )

    def caption_shas(self, model: str, detail: str) -> set[str]:
        rows = self.conn.execute("SELECT sha256 FROM captions WHERE model=? AND detail=?", (model, detail))
        return {r[0] for r in rows}

    def captions_of(self, shas: Iterable[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        wanted = list(set(shas))
        for i in range(0, len(wanted), 500):
            chunk = wanted[i : i + 500]
            marks = ",".join("?" * len(chunk))
            for sha, text in self.conn.execute(
                f"SELECT sha256, text FROM captions WHERE sha256 IN ({marks}) ORDER BY id", chunk
            ):
                out.setdefault(sha, text)
        return out

    def caption_matches(self, query: str) -> dict[str, float]:
        """Image contents whose captions match the full-text query: SHA-256 -> relevance in (0, 1]
        (FTS5's bm25, scaled so the best match is 1)."""
        match = fts_query(query)
        if not match:
            return {}
        try:
            rows = self.conn.execute(
                "SELECT c.sha256, bm25(captions_fts) FROM captions_fts JOIN captions c ON c.id = captions_fts.rowid "
                "WHERE captions_fts MATCH ?",
                (match,),
            ).fetchall()
        except sqlite3.OperationalError as e:  # a query FTS5 cannot parse matches nothing; a lock is no answer
            if is_locked(e):
                raise
            return {}
        best: dict[str, float] = {}
        for sha, score in rows:  # bm25: more negative is better
            best[sha] = min(best.get(sha, 0.0), float(score))
        top = min(best.values(), default=0.0)
        return {sha: (s / top if top < 0 else 0.0) for sha, s in best.items()}


def is_locked(error: sqlite3.DatabaseError | UnicodeDecodeError) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED: the busy timeout ran out (Python 3.10 has no error codes: the text)."""
    return isinstance(error, sqlite3.OperationalError) and str(error).startswith(
        ("database is locked", "database table is locked")
    )


def fts_query(text: str) -> str:
    """A user's words as an FTS5 query matching any of them (each quoted: no FTS syntax from users)."""
    words = ["".join(ch for ch in w if ch.isalnum()) for w in text.split()]
    return " OR ".join(f'"{w}"' for w in words if w)
