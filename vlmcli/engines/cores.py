"""Threads for native code: the CPUs this process may use, shared with the vlm processes computing now.

llama.cpp's and ggml's worker threads meet at a spinning barrier after every op of a graph. When
two processes each start one thread per core, every barrier waits for a thread the other process
has preempted, and the two together do less than one alone (issue 14 measured 0.38x). So an engine
that was not given a thread count takes its share before each piece of work (an image, a batch of
CLIP inputs): the CPUs it may run on (affinity and cgroup quota) divided by the units of work
running at that moment in all vlm processes of this machine.

Each running unit holds a lock on its own file in one machine-wide folder (`VLM_CORES_DIR`, else
`vlmcli-cores` in the temp folder). A lock is released by the kernel when its process dies, so a
crashed process is never counted, and its file is removed by the next process that looks.

A finished unit keeps its file, locked and marked idle (one byte long, its mtime the end), and still
counts for LINGER_S: a server worker between two requests, or a batch between two images, is busy
in all but a few milliseconds, and a newcomer that started in such a gap would take every core and
then collide with the next unit for its whole length (vlm serve lost 30-40% at two concurrent
requests that way). The process's next unit takes the same file back.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

# Windows has no advisory locks: there every process takes all its CPUs.
if sys.platform != "win32":
    import fcntl

LINGER_S = 0.5  # a finished unit counts this long for the others (see above)

_units = itertools.count()
_held = threading.local()  # a unit already running on this thread (a nested call shares it)
_idle: list[tuple[Path, int]] = []  # this process's finished units' files, still locked, for reuse
_idle_lock = threading.Lock()


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, cpusets) and, in a container with
    a CPU quota (cgroup v2 cpu.max), the quota rounded up."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def folder() -> Path:
    return Path(os.environ.get("VLM_CORES_DIR") or Path(tempfile.gettempdir()) / "vlmcli-cores")


def running_units(skip: Path | None = None) -> int:
    """Units of work holding a lock in the folder now, or idle for less than LINGER_S (not counting
    `skip` nor this process's idle ones); stale files are removed."""
    if sys.platform == "win32":
        return 0
    d = folder()
    try:
        names = os.listdir(d)
    except OSError:
        return 0
    with _idle_lock:
        mine = {path for path, _ in _idle}
    count = 0
    now = time.time()
    for name in names:
        path = d / name
        if path == skip or path in mine or not name.endswith(".lock"):
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # removed meanwhile: that process is gone
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:  # locked: running, or finished within LINGER_S
            st = os.fstat(fd)
            count += st.st_size == 0 or now - st.st_mtime < LINGER_S
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)  # its process is gone
        finally:
            os.close(fd)
    return count


def share(cpus: int, others: int) -> int:
    """Threads for one unit when `others` more are running: an equal part of the CPUs, at least one."""
    return max(1, cpus // (others + 1))


class CoreShare:
    """The thread count of one engine. `fixed` (-t N, a Ray actor's CPUs) is used as given; None
    takes a share that `running()` decides again at the start of every unit of work."""

    def __init__(self, fixed: int | None = None):
        self.fixed = fixed
        self.cpus = available_cpus()

    @property
    def most(self) -> int:
        """The most threads this engine will use (what its native thread pools are sized for)."""
        return self.fixed or self.cpus

    @contextlib.contextmanager
    def running(self) -> Iterator[int]:
        """Announce a unit of work for its duration and give its thread count."""
        if getattr(_held, "threads", None) is not None:  # nested in a unit of this thread
            yield _held.threads
            return
        announced = self._announce()
        try:
            _held.threads = self.fixed or share(self.cpus, running_units(skip=announced[0] if announced else None))
            yield _held.threads
        finally:
            _held.threads = None
            if announced is not None:
                self._finish(*announced)

    @staticmethod
    def _announce() -> tuple[Path, int] | None:
        """The unit's file, locked, and its descriptor; None where units cannot be shared."""
        if sys.platform == "win32":
            return None
        d = folder()
        with _idle_lock:
            while _idle:  # take back the file of an earlier unit, emptied: running again
                path, fd = _idle.pop()
                try:
                    if path.parent == d and os.fstat(fd).st_nlink:
                        os.ftruncate(fd, 0)
                        return path, fd
                except OSError:
                    pass
                _drop(path, fd)  # the folder changed (VLM_CORES_DIR) or the file is gone
        try:
            if not d.is_dir():
                d.mkdir(parents=True, exist_ok=True)
                d.chmod(0o1777)  # machine-wide, like /tmp: every user's processes share the cores
            name = f"{os.getpid()}-{next(_units)}"
            fd = os.open(d / f"{name}.new", os.O_CREAT | os.O_RDWR, 0o644)
        except OSError:
            return None  # no folder to share through: run as if alone
        # Locked before it takes the name others count, so no one sees it unlocked and removes it.
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = d / f"{name}.lock"
        os.replace(d / f"{name}.new", path)
        return path, fd

    @staticmethod
    def _finish(path: Path, fd: int) -> None:
        """Mark the unit's file idle (one byte: the size change sets its mtime) and keep it locked for reuse."""
        try:
            os.ftruncate(fd, 1)
        except OSError:
            _drop(path, fd)
            return
        with _idle_lock:
            _idle.append((path, fd))


def _drop(path: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
    os.close(fd)


def _forget_idle_in_child() -> None:
    """A forked child does not own its parent's idle files: close its copies, keep the files."""
    global _idle_lock
    _idle_lock = threading.Lock()  # another thread may have held it at the fork
    for _, fd in _idle:
        with contextlib.suppress(OSError):
            os.close(fd)
    _idle.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_idle_in_child)
