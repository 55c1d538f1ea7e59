"""The one runner: many inputs through one loaded model, resumable, safe to interrupt, honest about failures.

Every task (ask, caption, classify, embed) runs here, a single image being a batch of one. A task
supplies how to prepare one input in a background thread, how to run the model on a batch of
prepared inputs, and the identity that makes a record reusable on resume; a `Sink` takes the
records; an `Observer` supplied by the front end hears about progress and failures.

    run_batch(task, inputs, sink, options, observer) -> BatchSummary
        worker threads: input key (stat / SHA-256) -> skip if done -> decode + preprocess (bounded window)
        main thread:    model on batches of task.batch_size -> records -> sink (+ sidecars) -> observer

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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

from vlmcli.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, VlmError
from vlmcli.tasks.resume import FileKey, Record, ResumePlan, file_key

if TYPE_CHECKING:
    from vlmcli.tasks.sidecars import Sidecars
    from vlmcli.tasks.sinks import Sink


class Task(Protocol):
    """What a task plugs into run_batch."""

    name: str  # "caption", "ask", "classify", "embed"
    identity: dict[str, Any]  # written into every record; resume reuses records whose fields are equal
    batch_size: int  # inputs per model call (CLIP: many; the VLM: 1)

    def prepare(self, input: str) -> Any:
        """Decode + preprocess one input (runs in a worker thread; raise VlmError for a bad one)."""
        ...

    def run(self, prepared: list[Any]) -> list[Record | VlmError]:
        """The model on a batch of prepared inputs (main thread): result fields per input."""
        ...

    # Optional (looked up with getattr):
    #   base(input) -> Record: the fields every record of this input starts with (default {"path": input, **identity});
    #   key(input, use_hash) -> FileKey | None: the resume key (default: the file's, resume.file_key);
    #   workers / prefetch: decode threads and inputs prepared ahead, instead of BatchOptions'.


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
            total=self.total + other.total, done=self.done + other.done, skipped=self.skipped + other.skipped,
            failed=self.failed + other.failed, elapsed_s=self.elapsed_s + other.elapsed_s,
            interrupted=self.interrupted or other.interrupted, errors=self.errors + other.errors,
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
class _Item:
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


def _prepare(task: Task, input: str, index: int, options: BatchOptions, is_done: Callable[[FileKey | None], bool]) -> _Item:
    item = _Item(index, input)
    t0 = time.perf_counter()
    try:
        key_of = getattr(task, "key", None)
        item.key = key_of(input, options.use_hash) if key_of is not None else file_key(input, options.use_hash)
        if (not options.redo and is_done(item.key)) or (options.sidecars is not None and options.sidecars.blocks(input)):
            item.skipped = True
            return item
        item.data = task.prepare(input)
    except VlmError as e:
        item.error = e
    except MemoryError:
        item.error = VlmError("out of memory decoding this image")
    except Exception as e:  # noqa: BLE001 - a decoder bug on one file must not end the batch
        item.error = VlmError(f"{type(e).__name__}: {e}")
    item.prepare_ms = (time.perf_counter() - t0) * 1000
    return item


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


# ----------------------------------------------------------------------------- the run


def base_record(task: Task, input: str) -> Record:
    base = getattr(task, "base", None)
    return dict(base(input)) if base is not None else {"path": input, **task.identity}


class _Batch:
    """Items for one model call, in input order, with failed ones between them."""

    def __init__(self, task: Task, sink: Sink, options: BatchOptions, summary: BatchSummary, observer: Observer):
        self.task, self.sink, self.options, self.summary, self.observer = task, sink, options, summary, observer
        self.items: list[_Item] = []

    def ready(self) -> int:
        return sum(1 for it in self.items if it.error is None)

    def _results(self) -> dict[int, Record | VlmError]:
        ready = [it for it in self.items if it.error is None]
        if not ready:
            return {}
        try:
            results = list(self.task.run([it.data for it in ready]))
        except VlmError as e:
            results = [e] * len(ready)
        if len(results) != len(ready):
            raise RuntimeError(f"{self.task.name}: {len(results)} results for {len(ready)} inputs")
        return {it.index: r for it, r in zip(ready, results)}

    def flush(self) -> None:
        if not self.items:
            return
        results = self._results()
        records: list[Record] = []
        n_done = 0
        for it in self.items:
            it.data = None  # free decoded pixels now
            r = results.get(it.index)
            rec = base_record(self.task, it.input)
            if isinstance(r, VlmError):
                it.error = r
            elif r is not None:
                rec.update(r)
                it.error = self._write_sidecar(it.input, rec)
            if it.error is not None:
                rec = {**base_record(self.task, it.input), "error": it.error.message}
                self._failed(it)
            else:
                n_done += 1
            records.append(_finish_record(rec, it))
        self.sink.write_batch(records)
        self.summary.done += n_done
        self.observer.advance(len(self.items), n_done)
        self.items.clear()

    def _write_sidecar(self, input: str, rec: Record) -> VlmError | None:
        o = self.options
        if o.sidecars is None or o.sidecar_text is None:
            return None
        problem = o.sidecars.write(input, o.sidecar_text(rec))
        return VlmError(problem) if problem else None

    def _failed(self, it: _Item) -> None:
        assert it.error is not None
        self.summary.failed += 1
        if len(self.summary.errors) < 20:
            self.summary.errors.append((it.input, it.error))
        self.observer.failure(it.input, it.error)


def _finish_record(rec: Record, item: _Item) -> Record:
    timings = dict(rec.pop("timings", None) or {})
    timings["prepare_ms"] = round(item.prepare_ms, 2)
    rec["timings"] = timings
    if item.key is not None:
        rec["file"] = item.key.as_record()
    return rec


def run_batch(
    task: Task, inputs: Sequence[str], sink: Sink, options: BatchOptions | None = None, observer: Observer | None = None
) -> BatchSummary:
    """Run a task over inputs in order, writing one record per input; see the module doc."""
    options = options or BatchOptions()
    observer = observer or Observer()
    summary = BatchSummary(total=len(inputs))
    key_of = getattr(task, "key", None)
    plan = ResumePlan.for_inputs(task.identity, inputs, options.redo, *([lambda p: key_of(p, False)] if key_of else []))
    index = sink.open(plan, options.use_hash)
    batch_size = max(1, int(task.batch_size))
    # A task may ask for fewer decode threads / a shorter window (the VLM: its model uses every core).
    workers = getattr(task, "workers", None) or options.workers
    window = options.prefetch or getattr(task, "prefetch", None) or max(4, 2 * batch_size)
    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="vlm-prepare", initializer=_lower_priority)
    pending: collections.deque[Future[_Item]] = collections.deque()
    next_index = 0
    batch = _Batch(task, sink, options, summary, observer)
    observer.start(task.name, len(inputs))
    try:
        with _Interrupts(options.handle_sigint) as interrupts:

            def fill() -> None:
                nonlocal next_index
                while next_index < len(inputs) and len(pending) < window:
                    pending.append(pool.submit(_prepare, task, inputs[next_index], next_index, options, index.is_done))
                    next_index += 1

            fill()
            while pending and not interrupts.requested:
                item = pending.popleft().result()
                fill()
                if item.skipped:
                    summary.skipped += 1
                    observer.advance(1, 0)
                    continue
                batch.items.append(item)
                if batch.ready() >= batch_size:
                    batch.flush()
            if interrupts.requested:
                summary.interrupted = True  # what is in the batch was not run: the next run does it
            else:
                batch.flush()
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
        sink.close()
        observer.stop()
        summary.elapsed_s = time.perf_counter() - t0
    return summary
