"""Progress on stderr: rich bars on a terminal, plain lines every few seconds when piped, or nothing."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from vlmcli.cli.app import stderr, stderr_is_terminal
from vlmcli.cli.messages import describe
from vlmcli.errors import VlmError
from vlmcli.tasks.runner import BatchSummary, Observer, fmt_duration


def _bar(total: int | None, description: str) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=stderr,
        transient=False,
    )
    bar.add_task(description, total=total, rate="")
    return bar


@contextlib.contextmanager
def progress(total: int | None, description: str, quiet: bool = False) -> Iterator[Any]:
    """A rich progress bar on stderr when it is a terminal; None (no output) when piped or quiet."""
    if quiet or not stderr_is_terminal():
        yield None
        return
    with _bar(total, description) as bar:
        yield bar


class BatchProgress(Observer):
    """A batch run on stderr: a bar with images/s and ETA on a terminal, otherwise a plain line every
    `interval` seconds; failures as `vlm: error: PATH: cause` lines, even with `quiet`."""

    def __init__(self, quiet: bool = False, interval: float = 10.0):
        self.quiet = quiet
        self.interval = interval
        self._bar: Any = None

    def start(self, name: str, total: int) -> None:
        self.name, self.total = name, total
        self.count = self.done = 0  # inputs finished in any way / through the model (for the rate)
        self._t0 = self._last_line = time.perf_counter()
        if not self.quiet and stderr_is_terminal():
            self._bar = _bar(total, name)
            self._bar.__enter__()

    def advance(self, finished: int, done: int) -> None:
        self.count += finished
        self.done += done
        now = time.perf_counter()
        rate = self.done / (now - self._t0) if now > self._t0 else 0.0
        if self._bar is not None:
            self._bar.update(self._bar.task_ids[0], advance=finished, rate=f"{rate:.2f} img/s")
        elif not self.quiet and now - self._last_line >= self.interval:
            self._last_line = now
            left = self.total - self.count
            eta = f", eta {fmt_duration(left / rate)}" if rate > 0 and left else ""
            _line(f"{self.name}: {self.count}/{self.total} images, {rate:.2f} images/s{eta}")

    def failure(self, input: str, error: VlmError) -> None:
        _line(f"vlm: error: {input}: {describe(error, with_path=False)}")

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None

    @staticmethod
    def summary_line(name: str, summary: BatchSummary) -> None:
        """The end-of-run line."""
        _line(summary.line(name))


def _line(message: str) -> None:
    stderr.print(message, markup=False, highlight=False, soft_wrap=True)
