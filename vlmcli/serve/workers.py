"""The process pool behind `vlm serve`: one loaded model per worker process, supervised one-for-one.

Each worker is a `multiprocessing` spawn child that opens its model once (tasks.models.open_model) and
then runs jobs from its pipe through the same tasks as the CLI (AskTask, EmbedImagesTask,
EmbedTextsTask). The engines are not thread-safe and native code can abort or segfault, so a worker
holds one model and runs one job at a time; when it dies, only the job in flight fails (WorkerDied),
its supervisor thread starts a new process (with backoff) and the queued jobs go to the next free
worker. A job that runs past its deadline kills its worker (the only way to stop native code) and
fails with JobTimeout.

This module imports no numpy, Pillow or llama.cpp at the top: the children import the tasks inside
`_child_main`, and the parent never does.
"""

from __future__ import annotations

import itertools
import multiprocessing
import multiprocessing.connection
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlmcli.tasks.models import Kind

# Job outcomes the front end maps to HTTP statuses.


class QueueFull(Exception):
    """The model's queue holds --queue jobs already (HTTP 429)."""


class WorkerDied(Exception):
    """The worker running the job exited (signal, OOM kill, native abort) (HTTP 503)."""


class JobTimeout(Exception):
    """The job ran past its deadline; its worker was killed and restarted (HTTP 504)."""


class JobFailed(Exception):
    """A structured error from the task layer, already classified by the child (HTTP 400/500)."""

    def __init__(self, kind: str, message: str, param: str | None = None):
        super().__init__(message)
        self.kind = kind  # image | option | context | model | error | internal
        self.message = message
        self.param = param


@dataclass
class WorkerSpec:
    """What one worker opens: `vlm serve --model` with the shared options."""

    model: str
    kind: Kind
    name: str  # the id clients use (GET /v1/models)
    mmproj: str | None = None
    n_threads: int | None = None
    n_gpu_layers: int = 0
    n_ctx: int = 4096
    detail: str | None = None
    max_tiles: int | None = None
    max_n: int = 1  # sequences the engine is opened for: the largest `n` a request may ask
    max_pixels: int = 64_000_000
    offline: bool = True


# ---- the child process -----------------------------------------------------------------------


class InputFailed(Exception):
    """One input of a request failed (an embeddings item): the failure, and the param that names the input."""

    def __init__(self, param: str, error: BaseException):
        super().__init__(f"{param}: {error}")
        self.param, self.error = param, error


def _classify(exc: BaseException) -> tuple[str, str, str | None]:
    from vlmcli.errors import ContextOverflow, ImageError, InvalidOption, ModelError, VlmError

    if isinstance(exc, InputFailed):
        kind, message, _ = _classify(exc.error)
        return kind, f"{exc.param}: {message}", exc.param
    if isinstance(exc, InvalidOption):
        return "option", exc.message, exc.option
    if isinstance(exc, ContextOverflow):
        return "context", str(exc), "messages"
    if isinstance(exc, ImageError):
        return "image", exc.message, None
    if isinstance(exc, ModelError):
        return "model", str(exc), None
    if isinstance(exc, VlmError):
        return "error", exc.message, None
    if isinstance(exc, MemoryError):
        return "internal", "out of memory", None
    return "internal", f"internal error: {type(exc).__name__}: {exc}", None


def _decode_image(data: bytes, max_pixels: int) -> Any:
    """Image bytes -> the decoded RGB image, through vlmcli.images.load_image (formats, EXIF, pixel cap)."""
    import io

    from vlmcli.images import load_image

    return load_image(io.BytesIO(data), max_pixels=max_pixels)


def _decode_media(kind: str, data: bytes, max_pixels: int, frame_size: int) -> Any:
    """A request's image (decoded as any image) or video (its frames sampled as the CLI samples them)."""
    import io

    if kind == "video":
        from vlmcli.tasks.video import load_video

        return load_video(io.BytesIO(data), frame_size)
    return _decode_image(data, max_pixels)


def _run_chat(
    opened: Any, spec: WorkerSpec, job: dict[str, Any], send: Callable[[tuple], None], cancelled: threading.Event
) -> dict[str, Any]:
    from vlmcli.engines.llama import GenerationOptions
    from vlmcli.errors import InvalidOption
    from vlmcli.tasks.ask import ChatTask, turns_from
    from vlmcli.tasks.best_of import temperature_for

    n = job["n"]
    if n > spec.max_n:
        raise InvalidOption(
            "n", f"{n} choices, but this server opened the model for at most {spec.max_n} (vlm serve --max-n)"
        )
    media = [_decode_media(kind, data, spec.max_pixels, opened.engine.vision.tile_size) for kind, data in job["media"]]
    temperature = temperature_for(n, job["temperature"])
    gen = GenerationOptions(
        max_tokens=job["max_tokens"],
        temperature=temperature,
        top_p=job["top_p"],
        seed=job["seed"],
        logprobs=job.get("logprobs"),
    )
    task = ChatTask(
        opened.engine,
        turns_from(job["turns"]),
        gen,
        spec.max_pixels,
        n_best=n,
        select="logprob",
        structure=job.get("structure"),
    )
    send(("accepted",))
    stops: list[str] = job.get("stop") or []
    held: dict[int, _Held] = {}
    if job["stream"] or stops:
        # Pieces go out as they come, held back while they may be the start of a stop sequence;
        # a stop sequence (or the client leaving) ends that answer.
        def on_piece(index: int, piece: str) -> bool | None:
            h = held.setdefault(
                index, _Held(stops, (lambda text: send(("token", text, index))) if job["stream"] else None)
            )
            return False if h.feed(piece) or cancelled.is_set() else None

        if n == 1:
            task.on_token = lambda piece: on_piece(0, piece)
        else:
            task.on_candidate_token = on_piece
    answers = task.generate(media)  # the task's record, and the encoder passes the engine ran (for /metrics)
    result = task.record(answers)
    for h in held.values():
        h.flush()  # what was held back at the end, when no stop sequence came
    answer = result["answers"][0]
    if stops:
        answer["answer"] = _cut_at_stop(answer["answer"], stops)
        for c in answer.get("candidates", []):
            cut = _cut_at_stop(c["text"], stops)
            c["stop_reason"] = "stopped" if cut != c["text"] else c["stop_reason"]
            c["text"] = cut
    if "candidates" in answer:  # best-of: the chosen candidate first, then the others in order
        cands = answer["candidates"]
        order = [answer["chosen"]] + [i for i in range(len(cands)) if i != answer["chosen"]]
        choices = [
            {
                "text": cands[i]["text"],
                "stop_reason": cands[i]["stop_reason"],
                "generated_tokens": cands[i]["tokens"],
                "score": cands[i]["score"],
                "candidate": i,
            }
            for i in order
        ]
    else:
        choices = [
            {
                "text": answer["answer"],
                "stop_reason": answer["stop_reason"],
                "generated_tokens": answer["generated_tokens"],
                "candidate": 0,
                **({"logprobs": _token_logprobs(answers[0])} if job.get("logprobs") is not None else {}),
            }
        ]
    return {
        "choices": choices,
        "tokens": result["tokens"],
        "timings": result["timings"],
        "encoder_passes": answers[0].generation.image.encoder_passes,
    }


def _token_logprobs(answer: Any) -> list[dict[str, Any]]:
    return [{"piece": t.piece, "logprob": t.logprob, "top": t.top} for t in answer.generation.logprobs]


class _Held:
    """One answer's streamed text, held back while it may be the start of a stop sequence."""

    def __init__(self, stops: list[str], send: Callable[[str], None] | None):
        self.stops, self.send, self.text = stops, send, ""
        self.hold = max((len(x) for x in stops), default=1) - 1
        self.done = False

    def feed(self, piece: str) -> bool:
        """Take a piece; True when a stop sequence has ended the answer."""
        if self.done:
            return True
        self.text += piece
        cut = _first_stop(self.text, self.stops)
        if cut is not None:
            self._send(self.text[:cut])
            self.text, self.done = "", True
            return True
        ready = len(self.text) - self.hold
        if ready > 0:
            self._send(self.text[:ready])
            self.text = self.text[ready:]
        return False

    def flush(self) -> None:
        self._send(self.text)
        self.text = ""

    def _send(self, text: str) -> None:
        if text and self.send is not None:
            self.send(text)


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(x) for x in stops) if i >= 0]
    return min(found) if found else None


def _cut_at_stop(text: str, stops: list[str]) -> str:
    cut = _first_stop(text, stops)
    return text if cut is None else text[:cut].rstrip()


def _run_embed(opened: Any, spec: WorkerSpec, job: dict[str, Any]) -> dict[str, Any]:
    from vlmcli.errors import VlmError
    from vlmcli.tasks.embed import EmbedImagesTask, EmbedTextsTask
    from vlmcli.tasks.runner import run_prepared

    images = EmbedImagesTask(opened.engine, max_pixels=spec.max_pixels, model_name=opened.name)
    texts = EmbedTextsTask(images)
    rows: list[Any] = [None] * len(job["items"])
    image_items = [(i, data) for i, (kind, data) in enumerate(job["items"]) if kind == "image"]
    text_items = [(i, data) for i, (kind, data) in enumerate(job["items"]) if kind == "text"]
    prepared = []
    for i, data in image_items:
        try:
            prepared.append(images.prepare_decoded(_decode_image(data, spec.max_pixels)))
        except VlmError as e:
            raise InputFailed(f"input[{i}]", e) from None
    for (i, _), r in zip(image_items, run_prepared(images, prepared)):
        rows[i] = r
    for (i, _), r in zip(text_items, run_prepared(texts, [t for _, t in text_items])):
        rows[i] = r
    out = []
    tokens = 0
    for i, r in enumerate(rows):
        if isinstance(r, VlmError):
            raise InputFailed(f"input[{i}]", r)
        out.append(r["embedding"].astype("<f4").tobytes())
    for _, t in text_items:
        tokens += len(t.split())  # whitespace words: a rough count for `usage` (CLIP truncates at 77 tokens)
    return {
        "embeddings": out,
        "dim": int(rows[0]["dim"]) if rows else 0,
        "tokens": tokens,
        "encoder_passes": len(image_items),
    }  # one vision-tower pass per image


def _child_main(spec: WorkerSpec, conn: Any) -> None:
    """The worker process: open the model, then run jobs until the pipe closes."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle
    send_lock = threading.Lock()

    def send(message: tuple) -> None:
        with send_lock:
            conn.send(message)

    try:
        from vlmcli.tasks.models import ModelSpec, open_model

        opened = open_model(
            ModelSpec(
                spec.model,
                spec.mmproj,
                spec.offline or None,
                spec.n_threads,
                spec.n_gpu_layers,
                spec.n_ctx,
                spec.detail,
                spec.max_tiles,
                n_sequences=spec.max_n if spec.kind == "vlm" else 1,
            ),
            spec.kind,
        )
    except BaseException as e:  # reported to the parent, which refuses to start
        kind, message, param = _classify(e)
        send(("failed", message))
        return
    send(("ready", {"name": opened.name, "path": str(opened.path), "pid": os.getpid()}))

    jobs: queue.Queue[Any] = queue.Queue()
    cancelled = threading.Event()

    def reader() -> None:  # jobs in order; a cancel may arrive while a job runs
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                jobs.put(None)
                return
            if message[0] == "cancel":
                cancelled.set()
            else:
                jobs.put(message)

    threading.Thread(target=reader, daemon=True).start()
    while True:
        message = jobs.get()
        if message is None:
            return
        _, kind, job = message
        cancelled.clear()
        try:
            if kind == "chat":
                result = _run_chat(opened, spec, job, send, cancelled)
            elif kind == "embed":
                result = _run_embed(opened, spec, job)
            elif kind == "crash":  # tests: native code aborting
                os.abort()
            else:
                raise ValueError(f"unknown job kind {kind!r}")
            send(("done", result))
        except BaseException as e:  # every failure becomes a reply; the worker goes on
            ekind, emessage, param = _classify(e)
            send(("error", ekind, emessage, param))


# ---- the parent: jobs, workers, supervision --------------------------------------------------


_job_ids = itertools.count(1)


@dataclass
class Job:
    """One request for a worker. `emit(event)` is called from the worker's supervisor thread with
    ("accepted",), ("token", text), ("done", result) or ("error", exception); the last two end it."""

    kind: str
    payload: dict[str, Any]
    emit: Callable[[tuple], None]
    timeout: float
    id: int = field(default_factory=lambda: next(_job_ids))
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False

    @property
    def deadline(self) -> float:
        return self.submitted + self.timeout


class Worker:
    """One worker process and the thread that feeds it jobs and restarts it when it dies."""

    def __init__(self, pool: ModelPool, index: int):
        self.pool = pool
        self.index = index
        self.process: Any = None
        self.conn: Any = None
        self.current: Job | None = None
        self.restarts = 0
        self.info: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._loop, name=f"vlm-worker-{pool.spec.name}-{index}", daemon=True)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    @property
    def exited(self) -> bool:
        """Its process was started and has ended (a worker whose process is not started yet has not)."""
        return self.process is not None and not self.process.is_alive()

    def _watch(self, process: Any) -> None:
        """Wake the supervisor the moment `process` exits, idle or not: it restarts the worker at once,
        so /health never lists a dead one for long and no job is sent to it."""
        multiprocessing.connection.wait([process.sentinel])
        with self.pool._idle_changed:
            self.pool._idle_changed.notify_all()

    def start_process(self, timeout: float = 600.0) -> None:
        """Start the process and wait for its model to load; raise RuntimeError with the child's reason."""
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        process = ctx.Process(
            target=_child_main, args=(self.pool.spec, child), name=f"vlm-serve-worker-{self.index}", daemon=True
        )
        process.start()
        child.close()
        if not parent.poll(timeout):
            process.kill()
            raise RuntimeError(f"worker for {self.pool.spec.name} did not load its model within {timeout:.0f} s")
        try:
            message = parent.recv()
        except (EOFError, OSError):
            process.join(5)
            raise RuntimeError(
                f"worker for {self.pool.spec.name} exited while loading its model (exit code {process.exitcode})"
            ) from None
        if message[0] != "ready":
            process.join(5)
            raise RuntimeError(message[1])
        self.info = message[1]
        self.process, self.conn = process, parent
        threading.Thread(target=self._watch, args=(process,), name=f"{self.thread.name}-watch", daemon=True).start()

    def _stop_process(self) -> None:
        if self.process is None:
            return
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        try:
            self.conn.close()
        except OSError:
            pass
        self.process = self.conn = None

    def _restart(self) -> None:
        """Start a new process after the old one died, with exponential backoff while starts fail."""
        self._stop_process()
        delay = 0.1
        while not self.pool.closing:
            try:
                self.start_process()
                self.restarts += 1
                self.pool.restarts += 1
                return
            except RuntimeError:
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    def _loop(self) -> None:
        pool = self.pool
        while not pool.closing:
            if not self.alive:
                self._restart()  # it died while idle (take() returned when it did)
                continue
            job = pool.take(self)
            if job is None:
                continue  # closing, or the process exited while it waited
            if job.cancelled:
                continue
            if time.monotonic() >= job.deadline:
                job.emit(("error", JobTimeout("the request timed out waiting for a worker")))
                continue
            self.current = job
            try:
                self._run(job)
            except Exception as e:  # the supervisor must outlive any one job
                job.emit(("error", e))
            finally:
                self.current = None

    def _run(self, job: Job) -> None:
        if not self.alive:  # died between taking the job and now: the job goes to its replacement
            self._restart()
        conn = self.conn
        try:
            conn.send(("job", job.kind, job.payload))
        except (OSError, ValueError):
            job.emit(("error", WorkerDied("the worker was not running; it is being restarted")))
            self._restart()
            return
        cancel_sent = False
        while True:
            if job.cancelled and not cancel_sent:
                cancel_sent = True
                try:
                    conn.send(("cancel",))
                except (OSError, ValueError):
                    pass
            remaining = job.deadline - time.monotonic()
            if remaining <= 0:
                job.emit(("error", JobTimeout(f"the request took more than {job.timeout:g} s (vlm serve --timeout)")))
                self._restart()  # the only way to stop native code mid-run
                return
            try:
                ready = conn.poll(min(remaining, 0.2))
                if not ready:
                    if not self.process.is_alive():
                        raise EOFError
                    continue
                message = conn.recv()
            except (EOFError, OSError):
                self.process.join(1)
                code = self.process.exitcode
                why = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                job.emit(("error", WorkerDied(f"the worker running this request died ({why}); it is being restarted")))
                self._restart()
                return
            tag = message[0]
            if tag == "done":
                self.pool.count_encoder_passes(int(message[1].get("encoder_passes", 0)))
                job.emit(("done", message[1]))
                return
            if tag == "error":
                job.emit(("error", JobFailed(message[1], message[2], message[3])))
                return
            job.emit(message)  # accepted, token


class ModelPool:
    """The workers of one model and their bounded queue."""

    def __init__(self, spec: WorkerSpec, workers: int, queue_size: int):
        self.spec = spec
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=max(1, queue_size))
        self.workers = [Worker(self, i) for i in range(max(1, workers))]
        self.closing = False
        self.restarts = 0
        self.encoder_passes = 0  # vision encoder passes of the jobs done (SmolVLM2 tiles, CLIP images)
        self._count_lock = threading.Lock()  # the workers' supervisor threads all count
        # Idle workers, the most recently idle last: it takes the next job. One request at a time then
        # stays on one worker, which keeps every core (engines/cores.py counts another worker's
        # just-finished request for a moment, its own not).
        self._idle: list[Worker] = []
        self._idle_changed = threading.Condition()

    def start(self) -> None:
        """Load the model in every worker (in parallel); raise RuntimeError if one cannot."""
        errors: list[BaseException] = []

        def start(w: Worker) -> None:
            try:
                w.start_process()
            except BaseException as e:  # reported by start(), which closes the pool
                errors.append(e)

        threads = [threading.Thread(target=start, args=(w,)) for w in self.workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.close()
            raise RuntimeError(str(errors[0]))
        for w in self.workers:
            w.thread.start()

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the queue for {self.spec.name} is full ({self.queue.maxsize} requests waiting)") from None
        with self._idle_changed:
            self._idle_changed.notify_all()

    def take(self, worker: Worker) -> Job | None:
        """The next job for `worker` once it is the most recently idle worker; None when closing or when
        the worker's process has exited (its watcher wakes this wait)."""
        with self._idle_changed:
            self._idle.append(worker)
            try:
                while not self.closing and not worker.exited:
                    if self._idle[-1] is worker:
                        try:
                            return self.queue.get_nowait()
                        except queue.Empty:
                            pass
                    self._idle_changed.wait(0.2)
                return None
            finally:
                self._idle.remove(worker)
                self._idle_changed.notify_all()  # the next idle worker may take a waiting job

    def count_encoder_passes(self, n: int) -> None:
        with self._count_lock:
            self.encoder_passes += n

    @property
    def queue_depth(self) -> int:
        return self.queue.qsize()

    @property
    def busy(self) -> int:
        return sum(1 for w in self.workers if w.current is not None)

    def close(self) -> None:
        self.closing = True
        for w in self.workers:
            w._stop_process()
