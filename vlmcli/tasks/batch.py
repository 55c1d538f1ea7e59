"""Batch mode: many images through one loaded model, resumable, safe to interrupt, honest about failures.

The machinery here is shared by caption, ask, classify and embed; a command supplies a `BatchTask`
(how to prepare one image in a background thread, how to run the model on a batch of prepared
images, and the identity that makes a record reusable on resume) and a `Sink` (records.py).

    expand_inputs (inputs.py) -> paths
    run_batch(task, paths, sink, options) -> BatchSummary
        worker threads: file key (stat / SHA-256) -> skip if done -> decode + preprocess (bounded window)
        main thread:    model on batches of task.batch_size -> records -> sink (+ sidecars) -> progress

Ctrl-C: the first one finishes the image (or batch) in the model, writes its records and stops;
a second one stops at once (what is written is still whole: see records.py). Exit status from
`exit_code(summary)`: 0 all done, EXIT_PARTIAL (3) some failed, EXIT_ERROR (1) all failed, 130 Ctrl-C.
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from vlmcli.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, VlmError
from vlmcli.tasks.records import FileKey, Record, ResumePlan, Sidecars, Sink, file_key

# ----------------------------------------------------------------------------- the task protocol


class BatchTask(Protocol):
    """What a command plugs into run_batch."""

    name: str  # "caption", "ask", "classify", "embed"
    identity: dict[str, Any]  # written into every record; resume reuses records whose fields are equal
    batch_size: int  # images per model call (CLIP: many; the VLM: 1)

    def prepare(self, path: str) -> Any:
        """Decode + preprocess one image (runs in a worker thread; raise VlmError for a bad image)."""
        ...

    # Optional hooks (looked up with getattr):
    #   base(path) -> Record: the fields every record of this input starts with
    #       (default {"path": path, **identity});
    #   key(path, use_hash) -> FileKey | None: the resume key (default: the file's, vlmcli.tasks.records.file_key);
    #   workers / prefetch: decode threads and images decoded ahead, instead of BatchOptions'.

    def run(self, prepared: list[Any]) -> list[Record | VlmError]:
        """The model on a batch of prepared images (main thread): result fields per image."""
        ...


@dataclass
class BatchOptions:
    redo: bool = False  # ignore earlier records and do every image again
    use_hash: bool = False  # resume key: content SHA-256 instead of path + size + mtime
    sidecars: Sidecars | None = None  # write IMAGE.txt files (text tasks)
    sidecar_text: Callable[[Record], str] | None = None
    workers: int = 2  # decoding threads
    prefetch: int | None = None  # images decoded ahead of the model (default: 2 batches, at least 4)
    quiet: bool = False  # no progress and no summary (failures are still reported)
    single: bool = False  # one named image: no progress, no summary
    progress_interval: float = 10.0  # seconds between plain progress lines when stderr is not a terminal
    handle_sigint: bool = True


@dataclass
class BatchSummary:
    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    interrupted: bool = False
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, message), first few

    @property
    def images_per_s(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def line(self, name: str) -> str:
        parts = [f"{name}: {self.done} done", f"{self.skipped} skipped", f"{self.failed} failed"]
        if self.interrupted:
            parts.append(f"{self.total - self.done - self.skipped - self.failed} not started (interrupted)")
        parts.append(f"{self.images_per_s:.2f} images/s")
        parts.append(f"{_fmt_duration(self.elapsed_s)} elapsed")
        return ", ".join(parts)


def exit_code(summary: BatchSummary) -> int:
    """The documented exit status of a batch run."""
    if summary.interrupted:
        return EXIT_INTERRUPTED
    if summary.failed == 0:
        return EXIT_OK
    if summary.done == 0 and summary.skipped == 0:
        return EXIT_ERROR
    return EXIT_PARTIAL


# ----------------------------------------------------------------------------- work items


@dataclass
class _Item:
    index: int
    path: str
    key: FileKey | None = None
    data: Any = None
    error: str | None = None
    skipped: str | None = None  # why: "done" / "sidecar exists"
    prepare_ms: float = 0.0


def _lower_priority() -> None:
    """Decode threads yield to the model's threads: on a CPU the model keeps every core busy, and a
    decode thread that preempts one of llama.cpp / ggml's threads stalls all of them at the next barrier.
    Linux applies a nice value to a single thread; elsewhere this does nothing."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


def _prepare(task: BatchTask, path: str, index: int, options: BatchOptions, is_done: Callable[[FileKey | None], bool]) -> _Item:
    item = _Item(index, path)
    t0 = time.perf_counter()
    try:
        key_of = getattr(task, "key", None)
        item.key = key_of(path, options.use_hash) if key_of is not None else file_key(path, options.use_hash)
        if not options.redo and is_done(item.key):
            item.skipped = "done"
            return item
        if options.sidecars is not None and options.sidecars.blocks(path):
            item.skipped = "sidecar exists"
            return item
        item.data = task.prepare(path)
    except VlmError as e:
        item.error = e.message
    except MemoryError:
        item.error = "out of memory decoding this image"
    except Exception as e:  # noqa: BLE001 - a decoder bug on one file must not end the batch
        item.error = f"{type(e).__name__}: {e}"
    item.prepare_ms = (time.perf_counter() - t0) * 1000
    return item


# ----------------------------------------------------------------------------- progress


class Reporter:
    """Progress on stderr: a rich bar on a terminal, plain lines every few seconds otherwise, or nothing."""

    def __init__(self, name: str, total: int, options: BatchOptions):
        from vlmcli.cli.app import progress, stderr, stderr_is_terminal  # the shared stderr console

        self.name = name
        self.total = total
        self.console = stderr
        self.quiet = options.quiet or options.single
        self.single = options.single  # the command reports the one image's failure itself
        self.interval = options.progress_interval
        self.tty = stderr_is_terminal() and not self.quiet
        self._bar_cm = progress(total, name, quiet=not self.tty) if self.tty else None
        self._bar = None
        self._t0 = time.perf_counter()
        self._last_line = self._t0
        self.done = 0  # images through the model (for the rate)
        self.count = 0  # images finished in any way

    def __enter__(self) -> Reporter:
        if self._bar_cm is not None:
            self._bar = self._bar_cm.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar_cm is not None:
            self._bar_cm.__exit__(*exc)

    def advance(self, n: int, done: int) -> None:
        self.count += n
        self.done += done
        now = time.perf_counter()
        rate = self.done / (now - self._t0) if now > self._t0 else 0.0
        if self._bar is not None:
            task_id = self._bar.task_ids[0]
            self._bar.update(task_id, advance=n, rate=f"{rate:.2f} img/s")
        elif not self.quiet and now - self._last_line >= self.interval:
            self._last_line = now
            left = self.total - self.count
            eta = f", eta {_fmt_duration(left / rate)}" if rate > 0 and left else ""
            self.note(f"{self.name}: {self.count}/{self.total} images, {rate:.2f} images/s{eta}")

    def note(self, message: str) -> None:
        self.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def failure(self, path: str, message: str) -> None:
        if not self.single:
            self.note(f"vlm: error: {path}: {message}")


def _fmt_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# ----------------------------------------------------------------------------- Ctrl-C


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


def base_record(task: BatchTask, path: str) -> Record:
    base = getattr(task, "base", None)
    if base is not None:
        return dict(base(path))
    return {"path": path, **task.identity}


def _finish_record(rec: Record, item: _Item) -> Record:
    timings = dict(rec.pop("timings", None) or {})
    timings["prepare_ms"] = round(item.prepare_ms, 2)
    rec["timings"] = timings
    if item.key is not None:
        rec["file"] = item.key.as_record()
    return rec


def run_batch(task: BatchTask, paths: Sequence[str], sink: Sink, options: BatchOptions | None = None) -> BatchSummary:
    """Run a task over paths in order, writing one record per image; see the module doc."""
    options = options or BatchOptions()
    summary = BatchSummary(total=len(paths))
    key_of = getattr(task, "key", None)
    plan = ResumePlan.for_paths(task.identity, paths, options.redo, (lambda p: key_of(p, False)) if key_of else None)
    index = sink.open(plan, options.use_hash)
    batch_size = max(1, int(task.batch_size))
    # A task may ask for fewer decode threads / a shorter window (the VLM: its model uses every core).
    workers = getattr(task, "workers", None) or options.workers
    window = options.prefetch or getattr(task, "prefetch", None) or max(4, 2 * batch_size)
    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="vlm-prepare", initializer=_lower_priority)
    pending: collections.deque[Future[_Item]] = collections.deque()
    next_index = 0
    try:
        with _Interrupts(options.handle_sigint) as interrupts, Reporter(task.name, len(paths), options) as reporter:

            def fill() -> None:
                nonlocal next_index
                while next_index < len(paths) and len(pending) < window:
                    pending.append(pool.submit(_prepare, task, paths[next_index], next_index, options, index.is_done))
                    next_index += 1

            batch: list[_Item] = []  # in input order: items for the model, and failed ones between them

            def flush() -> None:
                if not batch:
                    return
                ready = [it for it in batch if it.error is None]
                results: list[Record | VlmError] = []
                if ready:
                    try:
                        results = list(task.run([it.data for it in ready]))
                    except VlmError as e:
                        results = [e] * len(ready)
                    if len(results) != len(ready):
                        raise RuntimeError(f"{task.name}: {len(results)} results for {len(ready)} images")
                by_index = {it.index: r for it, r in zip(ready, results)}
                records: list[Record] = []
                n_done = 0
                for it in batch:
                    it.data = None  # free decoded pixels now
                    r = by_index.get(it.index)
                    rec = base_record(task, it.path)
                    if isinstance(r, VlmError):
                        it.error = r.message
                    elif r is not None:
                        rec.update(r)
                        if options.sidecars is not None and options.sidecar_text is not None:
                            problem = options.sidecars.write(it.path, options.sidecar_text(rec))
                            if problem:
                                it.error = problem
                    if it.error is not None:
                        rec = {**base_record(task, it.path), "error": it.error}
                        summary.failed += 1
                        if len(summary.errors) < 20:
                            summary.errors.append((it.path, it.error))
                        reporter.failure(it.path, it.error)
                    else:
                        n_done += 1
                    records.append(_finish_record(rec, it))
                sink.write_batch(records)
                summary.done += n_done
                reporter.advance(len(batch), n_done)
                batch.clear()

            fill()
            while pending and not interrupts.requested:
                item = pending.popleft().result()
                fill()
                if item.skipped is not None:
                    summary.skipped += 1
                    reporter.advance(1, 0)
                    continue
                batch.append(item)
                if sum(1 for it in batch if it.error is None) >= batch_size:
                    flush()
            if interrupts.requested:
                summary.interrupted = True  # what is in `batch` was not run: the next run does it
            else:
                flush()
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
        sink.close()
        summary.elapsed_s = time.perf_counter() - t0
    return summary


def report_summary(task_name: str, summary: BatchSummary, options: BatchOptions) -> None:
    """The end-of-run line on stderr (unless --quiet or a single image)."""
    if options.quiet or options.single:
        return
    from vlmcli.cli.app import info

    info(summary.line(task_name))


# ----------------------------------------------------------------------------- SmolVLM2 tasks (caption, ask)


class VlmTask:
    """caption (one prompt, record field "caption") or ask (several prompts, "answers") on SmolVLM2."""

    batch_size = 1  # see benchmarks/bench_batch.py: multi-sequence decoding is measured there
    # One image decoded ahead is enough to hide decoding behind a caption (a second or more per
    # image); more decode threads only take CPU from llama.cpp's own threads.
    workers = 1
    prefetch = 2

    def __init__(self, engine: Any, name: str, prompts: list[str], generation: Any, max_pixels: int | None):
        self.engine = engine
        self.name = name
        self.prompts = list(prompts)
        self.generation = generation
        self.max_pixels = max_pixels
        opts = engine.options
        g = generation
        inputs: dict[str, Any] = {"prompt": self.prompts[0]} if name == "caption" else {"prompts": self.prompts}
        self.identity = {
            "task": name,
            "model": engine.model_path.name,
            "mmproj": engine.mmproj_path.name,
            "quant": getattr(engine.model_info, "file_type", None),
            **inputs,
            "options": {
                "max_tokens": g.max_tokens,
                "temperature": g.temperature,
                "top_p": g.top_p,
                "seed": g.seed,
                "detail": opts.detail,
                "max_tiles": opts.max_tiles,
            },
        }

    def prepare(self, path: str) -> Any:
        from vlmcli.images import load_image

        return load_image(path, max_pixels=self.max_pixels)

    def run(self, prepared: list[Any]) -> list[Record | VlmError]:
        out: list[Record | VlmError] = []
        for image in prepared:
            try:
                gens = list(self.engine.ask(image, self.prompts, self.generation))
            except VlmError as e:
                out.append(e)
                continue
            out.append(self.record(gens))
        return out

    def record(self, gens: list[Any]) -> Record:
        first = gens[0]
        enc = first.image
        timings: dict[str, float] = {}
        for g in gens:
            for k, v in g.timings.as_dict().items():
                if k.endswith("_ms"):
                    timings[k] = round(timings.get(k, 0.0) + v, 2)
        timings["load_ms"] = 0.0  # the model loads once per run, not per image
        rec: Record = {}
        if self.name == "caption":
            rec["caption"] = first.text.strip()
            rec["stop_reason"] = first.stop_reason
        else:
            rec["answers"] = [
                {"prompt": p, "answer": g.text.strip(), "stop_reason": g.stop_reason, "generated_tokens": g.generated_tokens}
                for p, g in zip(self.prompts, gens)
            ]
        rec["image_size"] = [enc.width, enc.height]
        rec["detail"] = enc.detail
        rec["tiles"] = enc.tiles
        rec["tokens"] = {
            "prompt": first.prompt_tokens,
            "image": enc.image_tokens,
            "generated": sum(g.generated_tokens for g in gens),
        }
        rec["timings"] = timings
        return rec


def caption_text(record: Record) -> str:
    """A caption on one line (text output, CSV, sidecars)."""
    return " ".join(str(record.get("caption", "")).split())


def answers_text(record: Record) -> str:
    return " | ".join(" ".join(str(a.get("answer", "")).split()) for a in record.get("answers", []))


# ----------------------------------------------------------------------------- CLIP tasks (classify, embed)


class ClipImageTask:
    """embed (record field "embedding": the L2-normalised row) or classify (top labels with scores).

    Images are decoded (JPEG draft mode) and preprocessed in the worker threads; the model encodes
    them `batch_size` at a time in one ggml graph. Records carry "input" and "kind" (as `vlm embed`
    always wrote them) besides "path".
    """

    def __init__(
        self,
        model: Any,
        name: str = "embed",
        batch_size: int = 32,
        max_pixels: int | None = None,
        labels: Any = None,  # classify: vlmcli.tasks.classify.LabelEmbeddings
        top_k: int = 5,
        model_name: str | None = None,
    ):
        from vlmcli.images import DEFAULT_MAX_PIXELS

        self.model = model
        self.name = name
        self.batch_size = batch_size
        self.max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
        self.labels = labels
        self.top_k = top_k
        cfg = model.config
        self.identity: dict[str, Any] = {"task": name, "model": model_name or _model_name(model), "quant": cfg.file_type}
        if name == "classify":
            if labels is None:
                raise ValueError("classify needs labels")
            self.identity["candidates"] = list(labels.labels)
            self.identity["options"] = {"templates": list(labels.templates), "top_k": top_k}
        else:
            self.identity["options"] = {"normalized": True}

    def base(self, path: str) -> Record:
        return {"path": path, "input": path, "kind": "image", **self.identity}

    def prepare(self, path: str) -> Any:
        from vlmcli.tasks.embed import prepare_image

        return prepare_image(path, self.model.config, self.max_pixels)

    def run(self, prepared: list[Any]) -> list[Record | VlmError]:
        import numpy as np

        pixels = np.stack(prepared)
        t0 = time.perf_counter()
        if self.name == "classify":
            from vlmcli.tasks.classify import classify_pixels

            tops = classify_pixels(self.model, pixels, self.labels, self.top_k)
            per_image = (time.perf_counter() - t0) * 1000 / len(prepared)
            return [
                {
                    "label": top[0][0],
                    "score": top[0][1],
                    "labels": [{"label": lab, "score": p} for lab, p in top],
                    "timings": {"model_ms": round(per_image, 2)},
                }
                for top in tops
            ]
        from vlmcli.tasks.embed import embed_pixels

        vectors = embed_pixels(self.model, pixels)
        per_image = (time.perf_counter() - t0) * 1000 / len(prepared)
        return [{"dim": int(v.shape[0]), "embedding": v, "timings": {"model_ms": round(per_image, 2)}} for v in vectors]


class ClipTextTask:
    """embed --text: texts as inputs (keyed by their content for resume), encoded in batches."""

    workers = 1
    prefetch = 256

    def __init__(self, image_task: ClipImageTask, batch_size: int = 64):
        self.model = image_task.model
        self.name = "embed"
        self.identity = image_task.identity  # same model and options: the rows share one matrix
        self.batch_size = batch_size
        self.truncated: list[str] = []

    def base(self, text: str) -> Record:
        return {"input": text, "kind": "text", **self.identity}

    def key(self, text: str, use_hash: bool) -> FileKey:
        from vlmcli.tasks.records import text_key

        return text_key(text)

    def prepare(self, text: str) -> str:
        return text

    def run(self, prepared: list[Any]) -> list[Record | VlmError]:
        from vlmcli.tasks.embed import embed_texts

        t0 = time.perf_counter()
        result = embed_texts(self.model, prepared, self.batch_size)
        per_text = (time.perf_counter() - t0) * 1000 / len(prepared)
        self.truncated += [t for t, cut in zip(prepared, result.truncated) if cut]
        return [
            {"dim": int(v.shape[0]), "embedding": v, "truncated": cut, "timings": {"model_ms": round(per_text, 2)}}
            for v, cut in zip(result.vectors, result.truncated)
        ]


def _model_name(model: Any) -> str:
    path = getattr(model, "path", None)
    return os.path.basename(str(path)) if path is not None else str(getattr(model.config, "name", "clip"))


def classify_csv_row(record: Record) -> dict[str, Any]:
    top = record.get("labels") or []
    return {
        "label": record.get("label", ""),
        "score": record.get("score", ""),
        "top": "; ".join(f"{t['label']}={float(t['score']):.4f}" for t in top),
    }


def classify_text(record: Record) -> str:
    return f"{record.get('label', '')}\t{float(record.get('score', 0.0)):.4f}"
