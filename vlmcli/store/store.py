"""The local model store: installed models, each in its own folder with a manifest.

Layout under the store root ($VLM_HOME, else the platform cache folder, e.g. ~/.cache/vlmcli):

    models/NAME/QUANT/manifest.json + the GGUF files    an installed model
    tmp/NAME/XXXX/                                      a pull being assembled (renamed into models/)
    downloads/NAME/...                                  files of an unfinished pull, kept for the retry
    locks/NAME.lock                                     one pull (or rm) of NAME at a time
    models.toml                                         the user's own registry entries (optional)

A model counts as installed only when models/NAME/QUANT/manifest.json exists and names files that
exist: the folder is built in tmp/ and renamed into place as the last step, so an interrupted or
failed pull never leaves something later commands would use.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vlmcli.errors import VlmError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


class StoreError(VlmError):
    """The store cannot be read or written (read-only, full, not a directory...)."""


def _platform_dir(kind: str) -> Path:
    home = Path.home()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA" if kind == "cache" else "APPDATA") or str(home / "AppData" / "Local")
        return Path(base) / "vlmcli" / ("cache" if kind == "cache" else "")
    if sys.platform == "darwin":
        return home / "Library" / ("Caches" if kind == "cache" else "Application Support") / "vlmcli"
    xdg = os.environ.get("XDG_CACHE_HOME" if kind == "cache" else "XDG_CONFIG_HOME")
    return Path(xdg) / "vlmcli" if xdg else home / (".cache" if kind == "cache" else ".config") / "vlmcli"


def store_root() -> Path:
    """$VLM_HOME, else the platform cache folder (~/.cache/vlmcli, ~/Library/Caches/vlmcli, %LOCALAPPDATA%)."""
    env = os.environ.get("VLM_HOME")
    return Path(env).expanduser() if env else _platform_dir("cache")


def config_dir() -> Path:
    """Where a user models.toml may live besides the store: ~/.config/vlmcli and the platform equivalents."""
    return _platform_dir("config")


_ERRNO_CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EROFS: "the store is on a read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this file system",
}


def os_error_message(e: OSError) -> str:
    cause = _ERRNO_CAUSES.get(e.errno or 0) or e.strerror or str(e)
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR):
        cause += "; set VLM_HOME to a writable folder"
    elif e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        cause += "; free some space or set VLM_HOME to a folder on another disk"
    return cause


def store_os_error(e: OSError, action: str, path: str | os.PathLike[str] | None = None) -> StoreError:
    """One line for an OSError met while writing the store: what failed, where, and why."""
    where = path if path is not None else (e.filename or None)
    return StoreError(f"cannot {action}: {os_error_message(e)}", where)


def dir_size(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
    return total


@dataclass
class InstalledModel:
    name: str
    kind: str
    quant: str
    path: Path  # the model's folder
    manifest: dict[str, Any] = field(repr=False)

    @property
    def files(self) -> dict[str, str]:
        return dict(self.manifest.get("files", {}))

    @property
    def model_path(self) -> Path:
        return self.path / self.files["model"]

    @property
    def mmproj_path(self) -> Path | None:
        m = self.files.get("mmproj")
        return self.path / m if m else None

    @property
    def size_bytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in self.files.values() if (self.path / f).is_file())

    @property
    def revision(self) -> str:
        return str(self.manifest.get("commit") or self.manifest.get("revision") or "")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "quant": self.quant,
            "size": self.size_bytes,
            "path": str(self.path),
            "model": str(self.model_path),
            "mmproj": str(self.mmproj_path) if self.mmproj_path else None,
            "source": self.manifest.get("source"),
            "repo": self.manifest.get("repo"),
            "revision": self.manifest.get("revision"),
            "commit": self.manifest.get("commit"),
            "installed": self.manifest.get("installed"),
        }


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest if the folder holds a complete install, else None (treated as not installed)."""
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or "model" not in files:
        return None
    if not all(isinstance(f, str) and (folder / f).is_file() for f in files.values()):
        return None
    return data


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    manifest = {
        "format": MANIFEST_FORMAT,
        **manifest,
        "installed": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    tmp = folder / (MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)


class _FileLock:
    """An exclusive advisory lock on a file (flock on POSIX, msvcrt on Windows), held by this process."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self, blocking: bool) -> bool:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if sys.platform == "win32":
                import msvcrt

                msvcrt.locking(self.fd, msvcrt.LK_NBLCK if not blocking else msvcrt.LK_LOCK, 1)
            else:
                import fcntl

                fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            return True
        except OSError:
            os.close(self.fd)
            self.fd = None
            if blocking:
                raise
            return False

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock
            self.fd = None


class Store:
    def __init__(self, root: Path | None = None):
        self.root = (root or store_root()).expanduser()
        self.models_dir = self.root / "models"
        self.tmp_dir = self.root / "tmp"
        self.downloads_dir = self.root / "downloads"
        self.locks_dir = self.root / "locks"

    # -- reading ---------------------------------------------------------------------------

    def installed(self) -> list[InstalledModel]:
        found: list[InstalledModel] = []
        if not self.models_dir.is_dir():
            return found
        for name_dir in sorted(self.models_dir.iterdir()):
            if not name_dir.is_dir():
                continue
            for quant_dir in sorted(name_dir.iterdir()):
                manifest = read_manifest(quant_dir) if quant_dir.is_dir() else None
                if manifest is not None:
                    found.append(
                        InstalledModel(
                            name=str(manifest.get("name", name_dir.name)),
                            kind=str(manifest.get("kind", "")),
                            quant=str(manifest.get("quant", quant_dir.name)),
                            path=quant_dir,
                            manifest=manifest,
                        )
                    )
        return found

    def installed_quants(self, name: str) -> list[InstalledModel]:
        return [m for m in self.installed() if m.name == name.lower()]

    def find(self, name: str, quant: str | None = None, prefer: str | None = None) -> InstalledModel | None:
        """An installed model: that quant, else `prefer` (the default quant), else the only/first one."""
        have = self.installed_quants(name)
        if quant is not None:
            return next((m for m in have if m.quant == quant), None)
        return next((m for m in have if m.quant == prefer), None) or (have[0] if have else None)

    def model_dir(self, name: str, quant: str) -> Path:
        return self.models_dir / name / quant

    # -- writing ---------------------------------------------------------------------------

    def ensure_writable(self) -> None:
        """Create the store's folders, or say in one line why they cannot be."""
        for d in (self.root, self.models_dir, self.tmp_dir, self.downloads_dir, self.locks_dir):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise store_os_error(e, "create the model store", d) from None
        # mkdir succeeds on an existing read-only folder: probe with a real write.
        try:
            fd, probe = tempfile.mkstemp(dir=self.tmp_dir, prefix=".probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise store_os_error(e, "write to the model store", self.root) from None

    @contextlib.contextmanager
    def lock(self, name: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold the store lock for model `name` (pulls and removals of one model run one at a time)."""
        path = self.locks_dir / f"{name}.lock"
        with contextlib.suppress(OSError):
            self.locks_dir.mkdir(parents=True, exist_ok=True)
        lock = _FileLock(path)
        try:
            if not lock.acquire(blocking=False):
                if on_wait:
                    on_wait()
                lock.acquire(blocking=True)
        except OSError as e:
            raise store_os_error(e, "lock the model store", path) from None
        try:
            yield
        finally:
            lock.release()

    def clean_tmp(self, name: str) -> None:
        """Remove staging folders a killed pull of `name` left behind (call with the lock held)."""
        shutil.rmtree(self.tmp_dir / name, ignore_errors=True)

    def new_staging_dir(self, name: str) -> Path:
        parent = self.tmp_dir / name
        try:
            parent.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(dir=parent, prefix=f"{int(time.time())}-"))
        except OSError as e:
            raise store_os_error(e, "create a staging folder", parent) from None

    def downloads_for(self, name: str) -> Path:
        return self.downloads_dir / name

    def install(self, staging: Path, name: str, quant: str) -> InstalledModel:
        """Move a complete staging folder (with its manifest) into place atomically; replaces an old install."""
        target = self.model_dir(name, quant)
        old: Path | None = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                old = staging.parent / (staging.name + ".old")
                os.replace(target, old)
            os.replace(staging, target)
            _fsync_dir(target.parent)
        except OSError as e:
            if old is not None and not target.exists():
                with contextlib.suppress(OSError):
                    os.replace(old, target)
            raise store_os_error(e, "install the model", target) from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        found = self.find(name, quant)
        if found is None:  # the manifest named a file that is not there: a bug in the pull
            raise StoreError("installed folder is incomplete", target)
        return found

    def remove(self, name: str, quant: str | None = None) -> list[InstalledModel]:
        """Remove the installed quantizations of `name` (all, or one); returns what was removed."""
        victims = [m for m in self.installed_quants(name) if quant is None or m.quant == quant]
        for m in victims:
            # Rename first so a reader never sees a half-deleted model, then delete.
            trash = self.tmp_dir / name / f"rm-{m.quant}-{os.getpid()}-{time.time_ns()}"
            try:
                trash.parent.mkdir(parents=True, exist_ok=True)
                os.replace(m.path, trash)
            except OSError as e:
                raise store_os_error(e, "remove the model", m.path) from None
            shutil.rmtree(trash, ignore_errors=True)
        name_dir = self.models_dir / name.lower()
        with contextlib.suppress(OSError):
            name_dir.rmdir()  # only if empty
        if not self.installed_quants(name):
            shutil.rmtree(self.downloads_for(name), ignore_errors=True)
        return victims


def _fsync_dir(path: Path) -> None:
    if sys.platform == "win32":
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
