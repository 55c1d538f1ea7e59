"""The one runner: many inputs through one loaded model, resumable, safe to interrupt, honest about failures.

Every task (ask, caption, classify, embed) runs here, a single image being a batch of one. A task
supplies how to prepare one input in a background thread, how to run the model on a batch of
prepared inputs, and the identity that makes a record reusable on resume; a `Sink` takes the
records; an `Observer` supplied by the front end hears about progress and failures.

    run_batch(task, inputs, sink, options, observer) -> BatchSummary
        worker threads: input key (stat / SHA-256) -> skip if done -> decode + preprocess (bounded window)
        main thread:    model on batches of task.batch_size -> records -> sink (+ sidecars) -> observer

`BatchSession` is the part that does not depend on where the model runs (resume index, skips,
records, sink, sidecars, summary, observer); `prepare_item` and `run_items` are what runs next to
the model. ray_batch.py runs the same three pieces with the model on Ray workers.

`Executor` is what a front end runs a task through, wherever its model is: `LocalExecutor` (here,
run_batch) and ray_batch.RemoteTask (a Ray pool) implement it; `execution.open_executor` picks one.

Ctrl-C: the first one finishes the batch in the model, writes its records and stops; a second one
stops at once (what is written is still whole: see sinks.py). Exit status from `exit_code(summary)`:
0 all done, EXIT_PARTIAL (3) some failed, EXIT_ERROR (1) all failed, 130 Ctrl-C.
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from vlmcli.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, VlmError
from vlmcli.tasks.resume import FileKey, Record, ResumePlan
from vlmcli.tasks.task import Task, TaskShape, Variant

if TYPE_CHECKING:
    from vlmcli.tasks.sidecars import Sidecars
    from vlmcli.tasks.sinks import Sink


class Observer:
    """What a front end hears during a run (progress bars, error lines); the default hears nothing."""

    def start(self, name: str, total: int) -> None: ...

    def advance(self, finished: int, done: int) -> None:
        """`finished` inputs finished in any way, `done` of them through the model."""

    def failure(self, input: str, error: VlmError) -> None: ...

    def stop(self) -> None: ...


@dataclass
class BatchOptions:
    redo: bool = False  # ignore earlier records and do every input again
    use_hash: bool = False  # resume key: content SHA-256 instead of path + size + mtime
    sidecars: Sidecars | None = None  # write IMAGE.txt files (text tasks)
    sidecar_text: Callable[[Record], str] | None = None
    workers: int = 2  # decoding threads
    prefetch: int | None = None  # inputs prepared ahead of the model (default: 2 batches, at least 4)
    handle_sigint: bool = True


@dataclass
class BatchSummary:
    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    interrupted: bool = False
    errors: list[tuple[str, VlmError]] = field(default_factory=list)  # (input, error), the first few

    @property
    def images_per_s(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def line(self, name: str) -> str:
        parts = [f"{name}: {self.done} done", f"{self.skipped} skipped", f"{self.failed} failed"]
        if self.interrupted:
            parts.append(f"{self.total - self.done - self.skipped - self.failed} not started (interrupted)")
        parts.append(f"{self.images_per_s:.2f} images/s")
        parts.append(f"{fmt_duration(self.elapsed_s)} elapsed")
        return ", ".join(parts)

    def __add__(self, other: BatchSummary) -> BatchSummary:
        """Two runs of one command (embed: images, then texts) as one."""
        return BatchSummary(
            total=self.total + other.total,
            done=self.done + other.done,
            skipped=self.skipped + other.skipped,
            failed=self.failed + other.failed,
            elapsed_s=self.elapsed_s + other.elapsed_s,
            interrupted=self.interrupted or other.interrupted,
            errors=self.errors + other.errors,
        )


def exit_code(summary: BatchSummary) -> int:
    """The documented exit status of a run."""
    if summary.interrupted:
        return EXIT_INTERRUPTED
    if summary.failed == 0:
        return EXIT_OK
    if summary.done == 0 and summary.skipped == 0:
        return EXIT_ERROR
    return EXIT_PARTIAL


def fmt_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# ----------------------------------------------------------------------------- work items


@dataclass
class Item:
    """One input on its way through a run (here, or on a Ray worker: see ray_batch.py)."""

    index: int
    input: str
    key: FileKey | None = None
    data: Any = None
    error: VlmError | None = None
    skipped: bool = False  # done earlier, or its sidecar exists
    prepare_ms: float = 0.0


def _lower_priority() -> None:
    """Decode threads yield to the model's threads: on a CPU the model keeps every core busy, and a
    decode thread that preempts one of llama.cpp / ggml's threads stalls all of them at the next barrier.
    Linux applies a nice value to a single thread; elsewhere this does nothing."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


def _caught(e: BaseException) -> VlmError:
    if isinstance(e, VlmError):
        return e
    if isinstance(e, MemoryError):
        return VlmError("out of memory decoding this image")
    return VlmError(f"{type(e).__name__}: {e}")  # a decoder bug on one file must not end the batch


def prepare_item(task: Task, item: Item, source: str | None = None) -> None:
    """task.prepare on one item (reading `source`, default the input itself); a failure becomes its error."""
    t0 = time.perf_counter()
    try:
        item.data = task.prepare(item.input) if source is None else task.prepare_from(item.input, source)
    except Exception as e:  # a decoder bug on one file must not end the batch (see _caught)
        item.error = _caught(e)
    item.prepare_ms += (time.perf_counter() - t0) * 1000


def run_prepared(task: Task, prepared: Sequence[Any]) -> list[Record | VlmError]:
    """The model on inputs a front end prepared itself (the server, the C library), `task.batch_size`
    at a time as run_batch groups them: result fields or error per input, in order."""
    step = max(1, int(task.batch_size))
    out: list[Record | VlmError] = []
    for start in range(0, len(prepared), step):
        chunk = list(prepared[start : start + step])
        try:
            results = list(task.run(chunk))
        except VlmError as e:
            results = [e] * len(chunk)
        if len(results) != len(chunk):
            raise RuntimeError(f"{task.name}: {len(results)} results for {len(chunk)} inputs")
        out += results
    return out


def run_items(task: Task, items: Sequence[Item]) -> dict[int, Record | VlmError]:
    """The model on the prepared items (those without an error): result fields or error, by item index."""
    ready = [it for it in items if it.error is None]
    if not ready:
        return {}
    try:
        results = list(task.run([it.data for it in ready]))
    except VlmError as e:
        results = [e] * len(ready)
    if len(results) != len(ready):
        raise RuntimeError(f"{task.name}: {len(results)} results for {len(ready)} inputs")
    return {it.index: r for it, r in zip(ready, results)}


class _Interrupts:
    """First SIGINT: stop after the current model call. Second: KeyboardInterrupt right away."""

    def __init__(self, enabled: bool):
        self.requested = False
        self._old: Any = None
        self.enabled = enabled and threading.current_thread() is threading.main_thread()

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _Interrupts:
        if self.enabled:
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._old)


Interrupts = _Interrupts


# ----------------------------------------------------------------------------- the run


class BatchSession:
    """One run's bookkeeping around the model, the same wherever the model runs (run_batch below, or
    Ray workers: ray_batch.py): the resume index, which inputs are skipped, the records of finished
    items through the sink (and sidecars), the summary, and the observer."""

    def __init__(self, task: Task, inputs: Sequence[str], sink: Sink, options: BatchOptions, observer: Observer):
        self.task, self.sink, self.options, self.observer = task, sink, options, observer
        self.total = len(inputs)
        self.summary = BatchSummary(total=len(inputs))
        plan = ResumePlan.for_inputs(task.identity, inputs, options.redo, lambda p: task.key(p, False))
        self.index = sink.open(plan, options.use_hash)
        self._t0 = time.perf_counter()

    def __enter__(self) -> BatchSession:
        self.observer.start(self.task.name, self.total)
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.sink.close()
        finally:
            self.observer.stop()
            self.summary.elapsed_s = time.perf_counter() - self._t0

    def check(self, input: str, index: int) -> Item:
        """The input's resume key, and whether it is skipped (done earlier, or its sidecar exists)."""
        task, options = self.task, self.options
        item = Item(index, input)
        try:
            item.key = task.key(input, options.use_hash)
            if (not options.redo and self.index.is_done(item.key)) or (
                options.sidecars is not None and options.sidecars.blocks(input)
            ):
                item.skipped = True
        except Exception as e:  # a decoder bug on one file must not end the batch (see _caught)
            item.error = _caught(e)
        return item

    def skip(self) -> None:
        self.summary.skipped += 1
        self.observer.advance(1, 0)

    def finish(self, items: Sequence[Item], results: dict[int, Record | VlmError]) -> None:
        """Records for finished items, in their order (failed ones included), to the sink in one write."""
        if not items:
            return
        records: list[Record] = []
        n_done = 0
        for it in items:
            it.data = None  # free decoded pixels now
            r = results.get(it.index)
            rec = dict(self.task.base(it.input))
            if isinstance(r, VlmError):
                it.error = r
            elif r is not None:
                rec.update(r)
                it.error = self._write_sidecar(it.input, rec)
            if it.error is not None:
                rec = {**self.task.base(it.input), "error": it.error.message}
                self._failed(it)
            else:
                n_done += 1
            records.append(_finish_record(rec, it))
        self.sink.write_batch(records)
        self.summary.done += n_done
        self.observer.advance(len(items), n_done)

    def _write_sidecar(self, input: str, rec: Record) -> VlmError | None:
        o = self.options
        if o.sidecars is None or o.sidecar_text is None:
            return None
        problem = o.sidecars.write(input, o.sidecar_text(rec), rec)
        return VlmError(problem) if problem else None

    def _failed(self, it: Item) -> None:
        assert it.error is not None
        self.summary.failed += 1
        if len(self.summary.errors) < 20:
            self.summary.errors.append((it.input, it.error))
        self.observer.failure(it.input, it.error)


def _finish_record(rec: Record, item: Item) -> Record:
    timings = dict(rec.pop("timings", None) or {})
    timings["prepare_ms"] = round(item.prepare_ms, 2)
    rec["timings"] = timings
    if item.key is not None:
        rec["file"] = item.key.as_record()
    return rec


def _prepare(task: Task, session: BatchSession, input: str, index: int) -> Item:
    """In a decode thread: the key, the skip check, then task.prepare."""
    t0 = time.perf_counter()
    item = session.check(input, index)
    if not item.skipped and item.error is None:
        prepare_item(task, item)
    item.prepare_ms = (time.perf_counter() - t0) * 1000
    return item


def run_batch(
    task: Task, inputs: Sequence[str], sink: Sink, options: BatchOptions | None = None, observer: Observer | None = None
) -> BatchSummary:
    """Run a task over inputs in order, writing one record per input; see the module doc."""
    options = options or BatchOptions()
    observer = observer or Observer()
    batch_size = max(1, int(task.batch_size))
    # A task may ask for fewer decode threads / a shorter window (the VLM: its model uses every core).
    workers = task.workers or options.workers
    window = options.prefetch or task.prefetch or max(4, 2 * batch_size)
    with BatchSession(task, inputs, sink, options, observer) as session:
        pool = ThreadPoolExecutor(
            max_workers=max(1, workers), thread_name_prefix="vlm-prepare", initializer=_lower_priority
        )
        pending: collections.deque[Future[Item]] = collections.deque()
        next_index = 0
        batch: list[Item] = []  # items for one model call, in input order, with failed ones between them

        def flush() -> None:
            session.finish(batch, run_items(task, batch))
            batch.clear()

        try:
            with _Interrupts(options.handle_sigint) as interrupts:

                def fill() -> None:
                    nonlocal next_index
                    while next_index < len(inputs) and len(pending) < window:
                        pending.append(pool.submit(_prepare, task, session, inputs[next_index], next_index))
                        next_index += 1

                fill()
                while pending and not interrupts.requested:
                    item = pending.popleft().result()
                    fill()
                    if item.skipped:
                        session.skip()
                        continue
                    batch.append(item)
                    if sum(1 for it in batch if it.error is None) >= batch_size:
                        flush()
                if interrupts.requested:
                    session.summary.interrupted = True  # what is in the batch was not run: the next run does it
                else:
                    flush()
        finally:
            for f in pending:
                f.cancel()
            pool.shutdown(wait=False, cancel_futures=True)
    return session.summary


# ----------------------------------------------------------------------------- executors


class Executor(Protocol):
    """A task bound to where its model runs: here (LocalExecutor) or on a Ray pool (ray_batch.RemoteTask).
    Front ends and eval run every batch through this, never asking which one they hold."""

    @property
    def name(self) -> str: ...

    @property
    def workers(self) -> int | None:
        """Ray actors running the model now; None here (the model's memory is this process's)."""

    def shape(self) -> TaskShape:
        """The task's name, identity, batch size and run_info, without its model."""

    def derive(self, variant: Variant) -> Executor:
        """`variant(task)`: another task over the same model, run the same way."""

    def run(
        self, inputs: Sequence[str], sink: Sink, options: BatchOptions | None = None, observer: Observer | None = None
    ) -> BatchSummary: ...


class LocalExecutor:
    """The model in this process: run_batch."""

    def __init__(self, task: Task):
        self.task = task

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def workers(self) -> int | None:
        return None

    def shape(self) -> TaskShape:
        return TaskShape.of(self.task)

    def derive(self, variant: Variant) -> LocalExecutor:
        return LocalExecutor(variant(self.task))

    def run(
        self, inputs: Sequence[str], sink: Sink, options: BatchOptions | None = None, observer: Observer | None = None
    ) -> BatchSummary:
        return run_batch(self.task, inputs, sink, options, observer)
