"""Image encodings kept on disk, so a question about an image already seen skips the vision encoder.

SmolVLM2 spends nearly all of a first answer in the vision encoder (13 passes at full detail). What
the engine keeps here, per image content and model files:

- "embd" entries: the projector's output embeddings of one image chunk (tile or overview), keyed by
  the image's pixels, the mmproj file's SHA-256, the detail level / tile cap and the chunk's index.
  Any language model that shares the projector reuses them.
- "kv" entries: the language model's KV cells for the whole prompt prefix up to and including the
  image (llama.cpp's per-sequence state), keyed additionally by the model file's SHA-256, the prefix
  text and the llama.cpp build. Restoring them skips the prefill of ~900 image tokens as well.

An entry is one file: a magic line, a JSON header holding the full key, the payload's length and
SHA-256, then the payload. A file whose key differs (a hash collision, a foreign file), whose length
or checksum does not match, or which cannot be parsed is deleted and counts as a miss: it is never
handed to the model. Writes go to a temporary file renamed into place (atomic on POSIX and
Windows), so concurrent processes sharing the folder see whole entries or none. Hits touch the
file's mtime; when the folder outgrows its bound the least recently used entries are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAGIC = b"VLMENC1\n"
SUFFIX = ".enc"
DEFAULT_MAX_BYTES = 2 * 1024**3
RESCAN_SECONDS = 30.0

# Notes for `-v` (cli/app.show_notes): INFO, so nothing is printed unless a front end asks for it.
_log = logging.getLogger(__name__)


@dataclass
class CacheStats:
    path: Path
    entries: int
    bytes: int
    max_bytes: int


@dataclass
class CacheHit:
    meta: dict[str, Any]
    payload: bytes


def parse_size(text: str) -> int:
    """'2G', '500M', '0' (off), '123456' -> bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}.get(t[-1:], 1)
    number = t[:-1] if t[-1:] in "KMGT" and t[-1:] else t
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"{text!r} is not a size (e.g. 2G, 500M, 0 for off)") from None
    if value < 0:
        raise ValueError(f"{text!r} is not a size (e.g. 2G, 500M, 0 for off)")
    return int(value * scale)


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class EncodingCache:
    """A bounded folder of entries; safe to share between processes."""

    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_BYTES):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._file_hashes: dict[tuple[str, int, int], str] = {}
        # The folder's size as of the last scan plus what this process wrote since: a scan (a stat of
        # every entry) runs when that passes the bound, or when it is old (other processes write too).
        self._estimate: int | None = None
        self._scanned_at = 0.0

    def _path(self, key: dict[str, Any]) -> Path:
        d = _digest(key)
        return self.root / d[:2] / (d + SUFFIX)

    # -- entries ---------------------------------------------------------------------------------

    def get(self, key: dict[str, Any]) -> CacheHit | None:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                blob = f.read()
        except OSError:
            return None
        hit = _parse(blob, key)
        if hit is None:
            with contextlib.suppress(OSError):
                path.unlink()  # corrupt or foreign: recomputed by the caller, rewritten by put()
            _log.info(
                "encoding cache entry %s was damaged (or another key's): removed, the image is encoded again", path
            )
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # least recently used = oldest mtime
        return hit

    def put(self, key: dict[str, Any], meta: dict[str, Any], payload: bytes) -> None:
        """Store an entry; a full disk or a read-only folder only means no caching."""
        if len(payload) > self.max_bytes:
            return
        path = self._path(key)
        header = json.dumps(
            {"key": key, "meta": meta, "length": len(payload), "sha256": hashlib.sha256(payload).hexdigest()},
            sort_keys=True,
        ).encode()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=SUFFIX)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(MAGIC + struct.pack("<Q", len(header)) + header)
                    f.write(payload)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError:
            return
        if self._estimate is not None:
            self._estimate += len(MAGIC) + 8 + len(header) + len(payload)
        if (
            self._estimate is None
            or self._estimate > self.max_bytes
            or time.monotonic() - self._scanned_at > RESCAN_SECONDS
        ):
            self._evict()

    def _entries(self) -> list[tuple[float, int, Path]]:
        out: list[tuple[float, int, Path]] = []
        if not self.root.is_dir():
            return out
        for sub in self.root.iterdir():
            if not sub.is_dir() or len(sub.name) != 2:
                continue
            for p in sub.iterdir():
                if p.suffix == SUFFIX and not p.name.startswith(".tmp-"):
                    with contextlib.suppress(OSError):
                        st = p.stat()
                        out.append((st.st_mtime, st.st_size, p))
        return out

    def _evict(self) -> None:
        entries = self._entries()
        total = sum(size for _, size, _ in entries)
        for _, size, p in sorted(entries):
            if total <= self.max_bytes:
                break
            with contextlib.suppress(OSError):
                p.unlink()  # another process may have removed it first
            total -= size
        self._estimate, self._scanned_at = total, time.monotonic()

    def stats(self) -> CacheStats:
        entries = self._entries()
        return CacheStats(self.root, len(entries), sum(size for _, size, _ in entries), self.max_bytes)

    # -- keys ------------------------------------------------------------------------------------

    def file_sha256(self, path: Path) -> str:
        """A model file's SHA-256, remembered per (path, size, mtime) in this process and on disk, so a
        500 MB file is hashed once, not at every start; a file replaced in place gets a new one."""
        path = Path(path).resolve()
        st = path.stat()
        memo_key = (str(path), st.st_size, st.st_mtime_ns)
        if memo_key in self._file_hashes:
            return self._file_hashes[memo_key]
        memo = self.root / "files" / (_digest({"path": str(path)}) + ".json")
        try:
            doc = json.loads(memo.read_text())
            if [doc.get("path"), doc.get("size"), doc.get("mtime_ns")] == list(memo_key) and len(
                doc.get("sha256", "")
            ) == 64:
                self._file_hashes[memo_key] = doc["sha256"]
                return doc["sha256"]
        except (OSError, ValueError, AttributeError):
            pass
        from vlmcli.files import sha256_file

        digest = sha256_file(path)
        self._file_hashes[memo_key] = digest
        with contextlib.suppress(OSError):
            memo.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=memo.parent, prefix=".tmp-")
            with os.fdopen(fd, "w") as f:
                json.dump({"path": memo_key[0], "size": memo_key[1], "mtime_ns": memo_key[2], "sha256": digest}, f)
            os.replace(tmp, memo)
        return digest


def image_digest(rgb: bytes | memoryview, width: int, height: int) -> str:
    """The key of an image's content: its decoded RGB pixels and size (not the file: the same photo
    as PNG and as a lossless copy is one entry, and a re-saved JPEG with other pixels is another)."""
    h = hashlib.sha256(f"{width}x{height}:".encode())
    h.update(rgb)
    return h.hexdigest()


def read_entry(path: Path) -> tuple[dict[str, Any], CacheHit] | None:
    """An entry file's own key and contents, checked (for tools and benchmarks that list the folder)."""
    blob = Path(path).read_bytes()
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 8:
        return None
    (n,) = struct.unpack_from("<Q", blob, len(MAGIC))
    try:
        key = json.loads(blob[len(MAGIC) + 8 : len(MAGIC) + 8 + n])["key"]
    except (ValueError, KeyError, TypeError):
        return None
    hit = _parse(blob, key)
    return (key, hit) if hit is not None else None


def _parse(blob: bytes, key: dict[str, Any]) -> CacheHit | None:
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 8:
        return None
    (n,) = struct.unpack_from("<Q", blob, len(MAGIC))
    start = len(MAGIC) + 8
    if n > len(blob) - start:
        return None
    try:
        header = json.loads(blob[start : start + n])
    except ValueError:
        return None
    if not isinstance(header, dict) or header.get("key") != key:
        return None
    payload = blob[start + n :]
    if header.get("length") != len(payload) or header.get("sha256") != hashlib.sha256(payload).hexdigest():
        return None
    meta = header.get("meta")
    return CacheHit(meta if isinstance(meta, dict) else {}, payload)
