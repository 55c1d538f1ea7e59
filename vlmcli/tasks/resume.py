"""Resume: which inputs an earlier run already did, and which of its records to drop.

A record counts as done when it has no "error", its identity fields (task, model, quant, prompt /
labels, options) equal this run's, and its file key matches: absolute path + size + mtime, or the
SHA-256 of the content with --hash. Records of other identities are left alone.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from vlmcli.files import sha256_file

Record = dict[str, Any]


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
        digest = sha256_file(path) if with_hash else None
    except OSError:
        return None
    return FileKey(os.path.abspath(path), st.st_size, st.st_mtime_ns, digest)


def text_key(text: str) -> FileKey:
    """The resume key of a text input (embed --text): the text itself."""
    data = text.encode("utf-8", "surrogateescape")
    return FileKey("text:" + hashlib.sha256(data).hexdigest(), len(data), 0)


def identity_matches(record: Record, identity: dict[str, Any]) -> bool:
    return all(record.get(k) == v for k, v in identity.items())


def record_abspath(record: Record) -> str | None:
    f = record.get("file") or {}
    if isinstance(f, dict) and f.get("abspath"):
        return str(f["abspath"])
    p = record.get("path")
    return os.path.abspath(p) if isinstance(p, str) else None


class ResumeIndex:
    """The inputs already done for this run's identity."""

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

    A record of this run's identity for one of this run's inputs is dropped (and the input done
    again) when it is an error (retried), when --redo was given, or when the file changed since
    (its size or mtime differ): so each input keeps exactly one record.
    """

    identity: dict[str, Any]
    inputs: dict[str, tuple[int, int] | None]  # absolute path -> (size, mtime_ns) now, None if unreadable
    redo: bool

    @classmethod
    def for_inputs(
        cls,
        identity: dict[str, Any],
        inputs: Iterable[str],
        redo: bool,
        key: Callable[[str], FileKey | None] = lambda p: file_key(p, False),
    ) -> ResumePlan:
        """`key` gives an input's key without hashing (default: the file's path, size and mtime)."""
        now: dict[str, tuple[int, int] | None] = {}
        for p in inputs:
            k = key(p)
            ap = k.abspath if k is not None else os.path.abspath(p)
            now[ap] = (k.size, k.mtime_ns) if k is not None else None
        return cls(identity, now, redo)

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
