"""Batch outputs and the resume index: JSONL, CSV, text lines, float32 .npy + JSONL metadata, sidecars.

Crash safety: every record is written as one complete line with one write() and flushed. A run
killed mid-write can leave at most one partial line at the end of a file; the next run cuts it off
before appending (`recover_lines`). For embeddings the rows are appended to the .npy (whose header
is rewritten in place) before their metadata lines are written; on resume the metadata is the truth:
.npy rows beyond the last recorded row are cut, and metadata pointing past the .npy's rows is dropped.

Resume: a record counts as done when it has no "error" and its identity fields (task, model,
quant, prompt / labels, options) equal this run's, and its file key matches: absolute path + size +
mtime, or the SHA-256 of the content with --hash. Records of other identities are left alone.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable

import numpy as np

from vlmcli.errors import VlmError

Record = dict[str, Any]


# ----------------------------------------------------------------------------- file keys


@dataclass(frozen=True)
class FileKey:
    abspath: str
    size: int
    mtime_ns: int
    sha256: str | None = None

    def as_record(self) -> dict[str, Any]:
        d: dict[str, Any] = {"abspath": self.abspath, "size": self.size, "mtime_ns": self.mtime_ns}
        if self.sha256:
            d["sha256"] = self.sha256
        return d


def file_key(path: str, with_hash: bool) -> FileKey | None:
    """The resume key of a file, or None when it cannot be read (its error is reported later)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    digest = None
    if with_hash:
        try:
            digest = sha256_file(path)
        except OSError:
            return None
    return FileKey(os.path.abspath(path), st.st_size, st.st_mtime_ns, digest)


def text_key(text: str) -> FileKey:
    """The resume key of a text input (embed --text): the text itself."""
    data = text.encode("utf-8", "surrogateescape")
    return FileKey("text:" + hashlib.sha256(data).hexdigest(), len(data), 0)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- resume index


def identity_matches(record: Record, identity: dict[str, Any]) -> bool:
    return all(record.get(k) == v for k, v in identity.items())


def record_abspath(record: Record) -> str | None:
    f = record.get("file") or {}
    if isinstance(f, dict) and f.get("abspath"):
        return str(f["abspath"])
    p = record.get("path")
    return os.path.abspath(p) if isinstance(p, str) else None


class ResumeIndex:
    """The images already done for this run's identity."""

    def __init__(self, identity: dict[str, Any], with_hash: bool):
        self.identity = identity
        self.with_hash = with_hash
        self._paths: set[tuple[str, int, int]] = set()
        self._hashes: set[str] = set()

    def add(self, record: Record) -> None:
        if record.get("error") or not identity_matches(record, self.identity):
            return
        f = record.get("file") or {}
        if not isinstance(f, dict):
            return
        if f.get("sha256"):
            self._hashes.add(str(f["sha256"]))
        ap = record_abspath(record)
        if ap is not None and "size" in f and "mtime_ns" in f:
            self._paths.add((ap, int(f["size"]), int(f["mtime_ns"])))

    def is_done(self, key: FileKey | None) -> bool:
        if key is None:
            return False
        if self.with_hash:
            return key.sha256 is not None and key.sha256 in self._hashes
        return (key.abspath, key.size, key.mtime_ns) in self._paths

    def __len__(self) -> int:
        return len(self._hashes) if self.with_hash else len(self._paths)


@dataclass
class ResumePlan:
    """What to do with an existing output: which old records to drop before appending.

    A record of this run's identity for one of this run's inputs is dropped (and the image done
    again) when it is an error (retried), when --redo was given, or when the file changed since
    (its size or mtime differ): so each image keeps exactly one record.
    """

    identity: dict[str, Any]
    inputs: dict[str, tuple[int, int] | None]  # absolute path -> (size, mtime_ns) now, None if unreadable
    redo: bool

    @classmethod
    def for_paths(
        cls, identity: dict[str, Any], paths: Iterable[str], redo: bool, key: Callable[[str], FileKey | None] | None = None
    ) -> ResumePlan:
        """`key` gives an input's key without hashing (default: the file's path, size and mtime)."""
        inputs: dict[str, tuple[int, int] | None] = {}
        for p in paths:
            k = key(p) if key is not None else file_key(p, False)
            ap = k.abspath if k is not None else os.path.abspath(p)
            inputs[ap] = (k.size, k.mtime_ns) if k is not None else None
        return cls(identity, inputs, redo)

    def drop(self, record: Record) -> bool:
        if not identity_matches(record, self.identity):
            return False
        ap = record_abspath(record)
        if ap not in self.inputs:
            return False
        if record.get("error") or self.redo:
            return True
        f = record.get("file") or {}
        now = self.inputs[ap]
        try:
            return now is None or (int(f["size"]), int(f["mtime_ns"])) != now
        except (KeyError, TypeError, ValueError):
            return True


# ----------------------------------------------------------------------------- line files


def recover_lines(path: Path, terminator: bytes = b"\n") -> None:
    """Cut a partial last record (a run killed mid-write) so appends start on a record boundary."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    with open(path, "r+b") as f:
        f.seek(max(0, size - len(terminator)))
        if f.read() == terminator:
            return
        # Scan back for the last terminator, a block at a time.
        pos = size
        block = 1 << 16
        keep = 0
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start + len(terminator) - 1)
            i = chunk.rfind(terminator)
            if i >= 0:
                keep = start + i + len(terminator)
                break
            pos = start
        f.truncate(keep)


def _atomic_rewrite(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class LineFile:
    """An append-only file of records, one complete record per write()."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def open_append(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:  # write() to a regular file writes everything; loop for the odd short write
            n = os.write(self._fd, view)
            view = view[n:]

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None


# ----------------------------------------------------------------------------- sinks


class Sink:
    """Where records go. `open` reads what an earlier run left and returns the resume index."""

    resumable = True

    def open(self, plan: ResumePlan, with_hash: bool) -> ResumeIndex:
        return ResumeIndex(plan.identity, with_hash)

    def write_batch(self, records: list[Record]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class LineSink(Sink):
    """A sink of text lines: appended to its file (resumable) or written to a stream (stdout)."""

    _file: LineFile | None
    stream: IO[str] | None

    def _emit(self, data: bytes) -> None:
        if self._file is not None:
            self._file.append(data)
        else:
            stream = self.stream or sys.stdout
            stream.write(data.decode("utf-8", "surrogateescape"))
            stream.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def to_json_line(record: Record) -> bytes:
    return (json.dumps(_jsonable(record), ensure_ascii=False) + "\n").encode("utf-8", "surrogateescape")


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return [round(float(x), 7) for x in value.reshape(-1)]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_jsonl(path: Path) -> list[Record]:
    out = []
    with open(path, "rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # not ours or damaged: ignored (and dropped if the file is compacted)
            if isinstance(rec, dict):
                out.append(rec)
    return out


class JsonlSink(LineSink):
    """JSON lines to a file (resumable) or to stdout."""

    def __init__(self, path: Path | None, stream: IO[str] | None = None, number_rows: bool = False):
        self.path = path
        self.stream = stream
        self.resumable = path is not None
        self._file = LineFile(path) if path is not None else None
        self.number_rows = number_rows  # embed to stdout: "row" counts the successful records of this run
        self._row = 0

    def open(self, plan: ResumePlan, with_hash: bool) -> ResumeIndex:
        index = ResumeIndex(plan.identity, with_hash)
        if self.path is None or self._file is None:
            return index
        if self.path.exists():
            recover_lines(self.path)
            records = read_jsonl(self.path)
            kept = [r for r in records if not plan.drop(r)]
            if len(kept) != len(records):
                _atomic_rewrite(self.path, b"".join(to_json_line(r) for r in kept))
            for r in kept:
                index.add(r)
        self._file.open_append()
        return index

    def write_batch(self, records: list[Record]) -> None:
        if not records:
            return
        if self.number_rows:
            for r in records:
                if not r.get("error"):
                    r["row"] = self._row
                    self._row += 1
        self._emit(b"".join(to_json_line(r) for r in records))


# CSV keeps the columns a person wants first, then what resume needs.
CSV_TRAILER = ["error", "model", "quant", "settings", "size", "mtime_ns", "sha256"]
CSV_TERMINATOR = "\r\n"


class CsvSink(LineSink):
    """CSV rows (caption, classify). Fields never hold "\\r\\n", so a row ends at the first "\\r\\n"."""

    def __init__(
        self,
        path: Path | None,
        columns: list[str],
        row: Callable[[Record], dict[str, Any]],
        stream: IO[str] | None = None,
    ):
        self.path = path
        self.columns = ["path", *columns, *CSV_TRAILER]
        self.row = row
        self.settings_keys: list[str] = []  # the identity beyond model and quant, set by open()
        self.stream = stream
        self.resumable = path is not None
        self._file = LineFile(path) if path is not None else None
        self._need_header = True

    def _encode_rows(self, records: list[Record]) -> bytes:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator=CSV_TERMINATOR)
        if self._need_header:
            w.writerow(self.columns)
            self._need_header = False
        for r in records:
            w.writerow([_csv_cell(v) for v in self._flatten(r)])
        return buf.getvalue().encode("utf-8", "surrogateescape")

    def _flatten(self, r: Record) -> list[Any]:
        f = r.get("file") or {}
        values = {"path": r.get("path"), **self.row(r)}
        values["error"] = r.get("error") or ""
        values["model"] = r.get("model", "")
        values["quant"] = r.get("quant", "")
        values["settings"] = json.dumps({k: r.get(k) for k in self.settings_keys}, ensure_ascii=False, sort_keys=True)
        values["size"] = f.get("size", "")
        values["mtime_ns"] = f.get("mtime_ns", "")
        values["sha256"] = f.get("sha256", "")
        return [values.get(c, "") for c in self.columns]

    def _unflatten(self, row: dict[str, str]) -> Record:
        rec: Record = {"path": row.get("path"), "model": row.get("model"), "quant": row.get("quant") or None}
        try:
            rec.update(json.loads(row.get("settings") or "{}"))
        except ValueError:
            pass
        if row.get("error"):
            rec["error"] = row["error"]
        f: dict[str, Any] = {}
        try:
            f["size"] = int(row.get("size") or "")
            f["mtime_ns"] = int(row.get("mtime_ns") or "")
        except ValueError:
            pass
        if row.get("sha256"):
            f["sha256"] = row["sha256"]
        rec["file"] = f
        return rec

    def open(self, plan: ResumePlan, with_hash: bool) -> ResumeIndex:
        index = ResumeIndex(plan.identity, with_hash)
        self.settings_keys = [k for k in plan.identity if k not in ("model", "quant")]
        if self.path is None or self._file is None:
            return index
        if self.path.exists() and self.path.stat().st_size > 0:
            recover_lines(self.path, CSV_TERMINATOR.encode())
            with open(self.path, newline="", encoding="utf-8", errors="surrogateescape") as f:
                rows = list(csv.reader(f))
            if rows:
                if rows[0] != self.columns:
                    raise VlmError("exists with other CSV columns (another command's output?); use another --out", self.path)
                raw = rows[1:]
                dicts = [dict(zip(self.columns, r)) for r in raw]
                records = [self._unflatten(d) for d in dicts]
                keep = [not plan.drop(r) for r in records]
                if not all(keep):
                    buf = io.StringIO()
                    w = csv.writer(buf, lineterminator=CSV_TERMINATOR)
                    w.writerow(self.columns)
                    w.writerows(r for r, k in zip(raw, keep) if k)
                    _atomic_rewrite(self.path, buf.getvalue().encode("utf-8", "surrogateescape"))
                for r, k in zip(records, keep):
                    if k:
                        index.add(r)
                self._need_header = False
        self._file.open_append()
        return index

    def write_batch(self, records: list[Record]) -> None:
        if not records:
            return
        self._emit(self._encode_rows(records))


def _csv_cell(v: Any) -> Any:
    if isinstance(v, str):
        return v.replace("\r\n", "\n").replace("\r", "\n")
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


class CallbackSink(Sink):
    """Each successful record to a function (e.g. a table printer); failures are reported on stderr."""

    resumable = False

    def __init__(self, emit: Callable[[Record], None]):
        self.emit = emit

    def write_batch(self, records: list[Record]) -> None:
        for r in records:
            if not r.get("error"):
                self.emit(r)


class NullSink(Sink):
    """No records (sidecar-only runs)."""

    resumable = False

    def write_batch(self, records: list[Record]) -> None:
        pass


class TextSink(Sink):
    """Plain text on stdout: `PATH<TAB>text` per image, or just the text for a single image."""

    resumable = False

    def __init__(self, text: Callable[[Record], str], with_path: bool, stream: IO[str] | None = None):
        self.text = text
        self.with_path = with_path
        self.stream = stream

    def write_batch(self, records: list[Record]) -> None:
        stream = self.stream or sys.stdout
        for r in records:
            if r.get("error"):
                continue  # reported on stderr
            t = self.text(r)
            stream.write(f"{r['path']}\t{t}\n" if self.with_path else f"{t}\n")
        stream.flush()


# ----------------------------------------------------------------------------- embeddings (.npy)

NPY_HEADER_BYTES = 128  # fixed, so the header (shape) can be rewritten in place as rows are appended


def _npy_header(rows: int, dim: int, total: int = NPY_HEADER_BYTES) -> bytes:
    d = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, %d), }" % (rows, dim)
    body_len = total - 10  # magic(6) + version(2) + header length(2)
    body = d.ljust(body_len - 1) + "\n"
    if len(body) != body_len:
        raise VlmError("the .npy header does not fit")
    return b"\x93NUMPY\x01\x00" + body_len.to_bytes(2, "little") + body.encode("latin1")


def read_npy_header(path: Path) -> tuple[int, int, int]:
    """(rows, dim, data offset) of a 2-D little-endian float32 C-order .npy, or VlmError."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
        except (ValueError, OSError) as e:
            raise VlmError(f"not a readable .npy file ({e})", path) from None
        offset = f.tell()
    if dtype != np.dtype("<f4") or fortran or len(shape) != 2:
        raise VlmError(f"is not a 2-D float32 embedding matrix (dtype {dtype}, shape {shape})", path)
    return int(shape[0]), int(shape[1]), offset


class NpySink(Sink):
    """Embeddings: float32 rows in OUT.npy and one JSONL metadata record per image in OUT.jsonl.

    Metadata record i with "row": r says .npy row r is that image's embedding; failed images have
    "row": null. All rows of one .npy come from one identity (model, quant, options).
    """

    def __init__(self, npy_path: Path, meta_path: Path | None = None, vector_key: str = "embedding"):
        self.npy_path = npy_path
        self.meta_path = meta_path or npy_path.with_suffix(".jsonl")
        self.vector_key = vector_key
        self._meta = LineFile(self.meta_path)
        self._npy: IO[bytes] | None = None
        self.rows = 0
        self.dim: int | None = None
        self._header_len = NPY_HEADER_BYTES

    def open(self, plan: ResumePlan, with_hash: bool) -> ResumeIndex:
        index = ResumeIndex(plan.identity, with_hash)
        self._finish_compaction()
        npy_exists = self.npy_path.exists()
        meta_exists = self.meta_path.exists()
        if not npy_exists and not meta_exists:
            self._start_fresh()
            return index
        if npy_exists and not meta_exists:
            if plan.redo:
                self._start_fresh()
                return index
            raise VlmError(f"exists without its metadata {self.meta_path.name}; move it away or pass --redo", self.npy_path)
        recover_lines(self.meta_path)
        records = read_jsonl(self.meta_path)
        other = [r for r in records if not identity_matches(r, plan.identity)]
        if other:
            if plan.redo:
                self._start_fresh()
                return index
            r = other[0]
            raise VlmError(
                f"holds embeddings of another model or settings ({r.get('model')}, {r.get('quant')}); "
                "use another --out or pass --redo to start it over",
                self.npy_path,
            )
        if npy_exists:
            _, dim, offset = read_npy_header(self.npy_path)
            self.dim = dim
            self._header_len = offset
            data_rows = (self.npy_path.stat().st_size - offset) // (4 * dim) if dim else 0
        else:
            data_rows = 0
        # The metadata is the truth, but only for rows that reached the .npy.
        reached = [r for r in records if r.get("row") is None or int(r["row"]) < data_rows]
        rows = sorted(int(r["row"]) for r in reached if r.get("row") is not None)
        if rows != list(range(len(rows))):
            raise VlmError(f"rows and {self.meta_path.name} disagree (rows not 0..n-1); pass --redo to start over", self.npy_path)
        kept = [r for r in reached if not plan.drop(r)]
        if any(r.get("row") is not None for r in reached if plan.drop(r)):
            self._compact(kept)  # rows of redone / changed images go: every image keeps one row
        elif len(kept) != len(records):
            _atomic_rewrite(self.meta_path, b"".join(to_json_line(r) for r in kept))
        self.rows = sum(1 for r in kept if r.get("row") is not None)
        if self.npy_path.exists() and self.dim is not None:
            self._npy = open(self.npy_path, "r+b")
            self._npy.truncate(self._header_len + self.rows * 4 * self.dim)
            self._write_header()
        for r in kept:
            index.add(r)
        self._meta.open_append()
        return index

    # Compaction writes both files beside the originals, then renames the .npy and then the
    # metadata. A run killed between the two renames leaves OUT.jsonl.compact, which the next
    # open renames into place (roll forward); a run killed before them leaves both temporaries,
    # which are deleted (the originals are intact).
    def _tmp(self, p: Path) -> Path:
        return p.with_name(p.name + ".compact")

    def _finish_compaction(self) -> None:
        tmp_npy, tmp_meta = self._tmp(self.npy_path), self._tmp(self.meta_path)
        if tmp_meta.exists() and not tmp_npy.exists():
            os.replace(tmp_meta, self.meta_path)
        for p in (tmp_npy, tmp_meta):
            if p.exists():
                p.unlink()

    def _compact(self, kept: list[Record]) -> None:
        assert self.dim is not None
        old_rows = [int(r["row"]) for r in kept if r.get("row") is not None]
        src = np.memmap(self.npy_path, dtype="<f4", mode="r", offset=self._header_len,
                        shape=(max(old_rows) + 1 if old_rows else 0, self.dim))
        tmp_npy, tmp_meta = self._tmp(self.npy_path), self._tmp(self.meta_path)
        with open(tmp_npy, "wb") as f:
            f.write(_npy_header(len(old_rows), self.dim))
            for i in range(0, len(old_rows), 4096):
                f.write(np.ascontiguousarray(src[old_rows[i : i + 4096]]).tobytes())
            f.flush()
            os.fsync(f.fileno())
        del src
        new_row = 0
        renumbered = []
        for r in kept:
            r = dict(r)
            if r.get("row") is not None:
                r["row"] = new_row
                new_row += 1
            renumbered.append(r)
        with open(tmp_meta, "wb") as f:
            f.write(b"".join(to_json_line(r) for r in renumbered))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_npy, self.npy_path)
        os.replace(tmp_meta, self.meta_path)
        kept[:] = renumbered
        self._header_len = NPY_HEADER_BYTES

    def _start_fresh(self) -> None:
        self.npy_path.parent.mkdir(parents=True, exist_ok=True)
        for p in (self.meta_path, self.npy_path):
            if p.exists():
                p.unlink()
        self.rows = 0
        self._npy = None
        self._meta.open_append()

    def _write_header(self) -> None:
        assert self._npy is not None and self.dim is not None
        self._npy.seek(0)
        self._npy.write(_npy_header(self.rows, self.dim, self._header_len))
        self._npy.flush()

    def write_batch(self, records: list[Record]) -> None:
        vectors = [r.pop(self.vector_key) for r in records if r.get(self.vector_key) is not None and not r.get("error")]
        if vectors:
            block = np.ascontiguousarray(np.stack([np.asarray(v, dtype="<f4").reshape(-1) for v in vectors]))
            if self.dim is None:
                self.dim = int(block.shape[1])
            if block.shape[1] != self.dim:
                raise VlmError(f"embedding width {block.shape[1]} differs from the file's {self.dim}", self.npy_path)
            if self._npy is None:
                self._npy = open(self.npy_path, "w+b")
                self._header_len = NPY_HEADER_BYTES
                self._write_header()
            # Rows first, then the header, then the metadata that points at them (see module doc).
            self._npy.seek(self._header_len + self.rows * 4 * self.dim)
            self._npy.write(block.tobytes())
            self._npy.flush()
        row = self.rows
        for r in records:
            r.pop(self.vector_key, None)
            if r.get("error"):
                r["row"] = None
            else:
                r["row"] = row
                row += 1
        if vectors:
            self.rows = row
            self._write_header()
        self._meta.append(b"".join(to_json_line(r) for r in records))

    def close(self) -> None:
        if self._npy is not None:
            self._npy.flush()
            os.fsync(self._npy.fileno())
            self._npy.close()
            self._npy = None
        self._meta.close()


# ----------------------------------------------------------------------------- sidecars


@dataclass
class Sidecars:
    """IMAGE.txt next to each image (photo.jpg -> photo.txt, as captioning tools write them)."""

    overwrite: bool = False
    suffix: str = ".txt"
    written: dict[str, str] = field(default_factory=dict)  # sidecar -> image, in this run

    def path_for(self, image: str) -> str:
        return os.path.splitext(image)[0] + self.suffix

    def blocks(self, image: str) -> bool:
        """True when the image should be skipped: its sidecar exists and --overwrite was not given."""
        return not self.overwrite and os.path.exists(self.path_for(image))

    def write(self, image: str, text: str) -> str | None:
        """Write the sidecar atomically; returns an error message instead of clobbering."""
        target = self.path_for(image)
        other = self.written.get(os.path.abspath(target))
        if other is not None and other != os.path.abspath(image):
            return f"sidecar {target} was already written for {other} in this run (same name, other extension)"
        if not self.overwrite and os.path.exists(target):
            return f"sidecar {target} exists (pass --overwrite to replace it)"
        tmp = f"{target}.tmp{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text.strip() + "\n")
            os.replace(tmp, target)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return f"cannot write sidecar {target} ({e.strerror})"
        self.written[os.path.abspath(target)] = os.path.abspath(image)
        return None


def default_meta_path(npy: Path) -> Path:
    return npy.with_suffix(".jsonl")


__all__ = [
    "CallbackSink",
    "CsvSink",
    "FileKey",
    "JsonlSink",
    "NpySink",
    "NullSink",
    "Record",
    "ResumeIndex",
    "ResumePlan",
    "Sidecars",
    "Sink",
    "TextSink",
    "default_meta_path",
    "file_key",
    "text_key",
    "read_jsonl",
    "read_npy_header",
    "recover_lines",
    "sha256_file",
    "to_json_line",
]
