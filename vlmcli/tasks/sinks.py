"""Where records go: JSONL and CSV files (resumable), or stdout as JSON lines, text or tables.

Crash safety: every record is written as one complete line with one write() and flushed. A run
killed mid-write can leave at most one partial line at the end of a file; the next run cuts it off
before appending (`recover_lines`). The .npy embedding sink is in npy.py.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from vlmcli.errors import VlmError
from vlmcli.files import atomic_write
from vlmcli.tasks.resume import Record, ResumeIndex, ResumePlan


class Sink:
    """Where records go. `open` reads what an earlier run left and returns the resume index."""

    resumable = False

    def open(self, plan: ResumePlan, with_hash: bool) -> ResumeIndex:
        return ResumeIndex(plan.identity, with_hash)

    def write_batch(self, records: list[Record]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- record lines


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
                continue  # not ours or damaged: ignored (and dropped if the file is rewritten)
            if isinstance(rec, dict):
                out.append(rec)
    return out


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
        pos, block, keep = size, 1 << 16, 0  # scan back for the last terminator, a block at a time
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


def write_failed(error: OSError, path: Path, kept: str) -> VlmError:
    """An output file that could not be written, named, with what it keeps and how to go on."""
    return VlmError(
        f"cannot write ({error.strerror or error}): {kept}; free space (or raise the limit) and run the same "
        "command again to go on from there",
        path,
    )


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
        try:
            start: int | None = os.lseek(self._fd, 0, os.SEEK_END)
        except OSError:  # a pipe or terminal: nothing to cut
            start = None
        view = memoryview(data)
        try:
            while view:  # write() to a regular file writes everything; loop for the odd short write
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as e:
            # A full disk (ENOSPC, EDQUOT) or file-size limit (EFBIG): cut what this batch got onto the
            # disk, so the file ends on its last whole record, and say which file and what it keeps.
            if start is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, start)
            raise write_failed(e, self.path, "every record written before this batch is kept") from None

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None


# ----------------------------------------------------------------------------- resumable line sinks


class LineSink(Sink):
    """Record lines appended to a file (resumable) or written to a stream (stdout when path is None).

    Subclasses say how records become bytes (`encode`) and how an earlier run's file reads back
    (`read_existing`: (raw line, record) pairs); opening a file is the same for every format: cut a
    half-written last line, drop what the plan redoes (rewriting the file atomically), index the rest.
    """

    terminator = b"\n"

    def __init__(self, path: Path | None, stream: IO[str] | None = None):
        self.path = path
        self.stream = stream
        self.resumable = path is not None
        self._file = LineFile(path) if path is not None else None

    def encode(self, records: list[Record]) -> bytes:
        raise NotImplementedError

    def read_existing(self, plan: ResumePlan) -> list[tuple[bytes, Record]]:
        raise NotImplementedError

    def header(self) -> bytes:
        """What a rewritten file starts with (CSV: its header row)."""
        return b""

    def open(self, plan: ResumePlan, with_hash: bool) -> ResumeIndex:
        index = ResumeIndex(plan.identity, with_hash)
        if self.path is None or self._file is None:
            return index
        if self.path.exists() and self.path.stat().st_size > 0:
            recover_lines(self.path, self.terminator)
            entries = self.read_existing(plan)
            kept = [(raw, rec) for raw, rec in entries if not plan.drop(rec)]
            if len(kept) != len(entries):
                atomic_write(self.path, self.header() + b"".join(raw for raw, _ in kept))
            for _, rec in kept:
                index.add(rec)
        self._file.open_append()
        return index

    def write_batch(self, records: list[Record]) -> None:
        if records:
            self._emit(self.encode(records))

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


class JsonlSink(LineSink):
    """JSON lines to a file (resumable) or to stdout."""

    def __init__(self, path: Path | None, stream: IO[str] | None = None, number_rows: bool = False):
        super().__init__(path, stream)
        self.number_rows = number_rows  # embed to stdout: "row" counts the successful records of this run
        self._row = 0

    def read_existing(self, plan: ResumePlan) -> list[tuple[bytes, Record]]:
        assert self.path is not None
        return [(to_json_line(r), r) for r in read_jsonl(self.path)]

    def encode(self, records: list[Record]) -> bytes:
        if self.number_rows:
            for r in records:
                if not r.get("error"):
                    r["row"] = self._row
                    self._row += 1
        return b"".join(to_json_line(r) for r in records)


# CSV keeps the columns a person wants first, then what resume needs.
CSV_TRAILER = ["error", "model", "quant", "settings", "size", "mtime_ns", "sha256"]
CSV_TERMINATOR = "\r\n"


class CsvSink(LineSink):
    """CSV rows (caption, classify). Fields never hold "\\r\\n", so a row ends at the first "\\r\\n"."""

    terminator = CSV_TERMINATOR.encode()

    def __init__(
        self,
        path: Path | None,
        columns: list[str],
        row: Callable[[Record], dict[str, Any]],
        stream: IO[str] | None = None,
    ):
        super().__init__(path, stream)
        self.columns = ["path", *columns, *CSV_TRAILER]
        self.row = row
        self.settings_keys: list[str] = []  # the identity beyond model and quant, set by open()
        self._need_header = True

    def _rows(self, rows: list[list[Any]]) -> bytes:
        buf = io.StringIO()
        csv.writer(buf, lineterminator=CSV_TERMINATOR).writerows(rows)
        return buf.getvalue().encode("utf-8", "surrogateescape")

    def header(self) -> bytes:
        return self._rows([self.columns])

    def encode(self, records: list[Record]) -> bytes:
        head = self.header() if self._need_header else b""
        self._need_header = False
        return head + self._rows([[_csv_cell(v) for v in self._flatten(r)] for r in records])

    def open(self, plan: ResumePlan, with_hash: bool) -> ResumeIndex:
        self.settings_keys = [k for k in plan.identity if k not in ("model", "quant")]
        return super().open(plan, with_hash)

    def read_existing(self, plan: ResumePlan) -> list[tuple[bytes, Record]]:
        assert self.path is not None
        with open(self.path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            rows = list(csv.reader(f))
        if not rows:
            return []
        if rows[0] != self.columns:
            raise VlmError("exists with other CSV columns (another command's output?); use another --out", self.path)
        self._need_header = False
        return [(self._rows([r]), self._unflatten(dict(zip(self.columns, r)))) for r in rows[1:]]

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


def _csv_cell(v: Any) -> Any:
    if isinstance(v, str):
        return v.replace("\r\n", "\n").replace("\r", "\n")
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


# ----------------------------------------------------------------------------- stdout displays


class CallbackSink(Sink):
    """Each successful record to a function (a table printer, the C API, a test); failures are
    reported through the run's observer."""

    def __init__(self, emit: Callable[[Record], None]):
        self.emit = emit

    def write_batch(self, records: list[Record]) -> None:
        for r in records:
            if not r.get("error"):
                self.emit(r)


class NullSink(Sink):
    """No records (sidecar-only runs, streamed single answers)."""

    def write_batch(self, records: list[Record]) -> None:
        pass


class TextSink(Sink):
    """Plain text on stdout: `PATH<TAB>text` per image, or just the text for a single image."""

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
