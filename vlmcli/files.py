"""Small file helpers shared by the store and batch outputs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so a reader (or a crash) sees the old file or the new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_lines(path: str | os.PathLike[str], what: str, comments: bool = True, strip: bool = True) -> list[str]:
    """The non-blank lines of a user's text file (labels, templates, class names, texts); with
    `comments`, lines starting with '#' are skipped. Errors name the file and what it should be."""
    from vlmcli.errors import VlmError

    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise VlmError(f"no such {what} file", p) from None
    except IsADirectoryError:
        raise VlmError(f"is a directory, not a {what} file", p) from None
    except (OSError, UnicodeDecodeError) as e:
        raise VlmError(f"cannot read {what} file ({e})", p) from None
    kept = [ln for ln in lines if ln.strip() and not (comments and ln.lstrip().startswith("#"))]
    return [ln.strip() for ln in kept] if strip else kept
