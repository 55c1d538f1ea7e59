"""Embeddings on disk: float32 rows in OUT.npy, one JSONL metadata record per input in OUT.jsonl.

Rows are appended to the .npy (whose header is rewritten in place) before their metadata lines are
written; on resume the metadata is the truth: .npy rows beyond the last recorded row are cut, and
metadata pointing past the .npy's rows is dropped. So Ctrl-C or a crash never leaves a misaligned pair.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO

import numpy as np

from vlmcli.errors import VlmError
from vlmcli.files import atomic_write
from vlmcli.tasks.resume import Record, ResumeIndex, ResumePlan, identity_matches
from vlmcli.tasks.sinks import LineFile, Sink, read_jsonl, recover_lines, to_json_line, write_failed

NPY_HEADER_BYTES = 128  # fixed, so the header (shape) can be rewritten in place as rows are appended


def _npy_header(rows: int, dim: int, total: int = NPY_HEADER_BYTES) -> bytes:
    d = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {dim}), }}"
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
    """Metadata record i with "row": r says .npy row r is that input's embedding; failed inputs
    have "row": null. All rows of one .npy come from one identity (model, quant, options)."""

    resumable = True

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
        npy_exists, meta_exists = self.npy_path.exists(), self.meta_path.exists()
        if not meta_exists and (not npy_exists or plan.redo):
            self._start_fresh()
            return index
        if not meta_exists:
            raise VlmError(
                f"exists without its metadata {self.meta_path.name}; move it away or pass --redo", self.npy_path
            )
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
        data_rows = 0
        if npy_exists and self.npy_path.stat().st_size >= NPY_HEADER_BYTES:  # shorter: a full disk cut its header
            _, self.dim, self._header_len = read_npy_header(self.npy_path)
            data_rows = (self.npy_path.stat().st_size - self._header_len) // (4 * self.dim) if self.dim else 0
        # The metadata is the truth, but only for rows that reached the .npy.
        reached = [r for r in records if r.get("row") is None or int(r["row"]) < data_rows]
        rows = sorted(int(r["row"]) for r in reached if r.get("row") is not None)
        if rows != list(range(len(rows))):
            raise VlmError(
                f"rows and {self.meta_path.name} disagree (rows not 0..n-1); pass --redo to start over", self.npy_path
            )
        kept = [r for r in reached if not plan.drop(r)]
        if any(r.get("row") is not None for r in reached if plan.drop(r)):
            kept = self._compact(kept)  # rows of redone / changed inputs go: every input keeps one row
        elif len(kept) != len(records):
            atomic_write(self.meta_path, b"".join(to_json_line(r) for r in kept))
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

    def _compact(self, kept: list[Record]) -> list[Record]:
        assert self.dim is not None
        old_rows = [int(r["row"]) for r in kept if r.get("row") is not None]
        src = np.memmap(
            self.npy_path,
            dtype="<f4",
            mode="r",
            offset=self._header_len,
            shape=(max(old_rows) + 1 if old_rows else 0, self.dim),
        )
        tmp_npy, tmp_meta = self._tmp(self.npy_path), self._tmp(self.meta_path)
        with open(tmp_npy, "wb") as f:
            f.write(_npy_header(len(old_rows), self.dim))
            for i in range(0, len(old_rows), 4096):
                f.write(np.ascontiguousarray(src[old_rows[i : i + 4096]]).tobytes())
            f.flush()
            os.fsync(f.fileno())
        del src
        renumbered, new_row = [], 0
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
        self._header_len = NPY_HEADER_BYTES
        return renumbered

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
            try:
                if self._npy is None:
                    self._npy = open(self.npy_path, "w+b")
                    self._header_len = NPY_HEADER_BYTES
                    self._write_header()
                # Rows first, then the header, then the metadata that points at them (see module doc).
                self._npy.seek(self._header_len + self.rows * 4 * self.dim)
                self._npy.write(block.tobytes())
                self._npy.flush()
            except OSError as e:  # a full disk: the rows of this batch have no records, so resume redoes them
                raise write_failed(e, self.npy_path, self._kept()) from None
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
        try:
            if self._npy is not None:
                try:
                    self._npy.flush()
                    os.fsync(self._npy.fileno())
                except OSError as e:  # rows a full disk did not take: their records were never written
                    raise write_failed(e, self.npy_path, self._kept()) from None
                finally:
                    with contextlib.suppress(OSError):
                        self._npy.close()
                    self._npy = None
        finally:
            self._meta.close()

    def _kept(self) -> str:
        return f"the rows before this batch and their records in {self.meta_path.name} are kept"
