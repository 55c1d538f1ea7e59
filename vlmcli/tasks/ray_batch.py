"""Batch mode on a Ray cluster: the same run as run_batch, with the model on a pool of Ray actors.

The driver (this process) does everything run_batch does around the model, through the same
`BatchSession`: it lists the inputs, keys them and skips what is done, and writes every record
through the same sink and sidecars, so a Ray run and a local run leave the same files. The actors
each build the task once, with the same code the CLI runs locally (a `TaskRecipe`: a module-level
function, its ModelSpec and arguments), and run `prepare_item` + `run_items` on chunks of
`task.batch_size` inputs, reading the images themselves (shared storage) or from bytes the driver
ships (`ship_files`).

    driver:  inputs -> key / skip (BatchSession.check) -> chunks -> actors (2 in flight each)
    actor:   prepare (decode + preprocess; overlaps the other chunk's model call) -> task.run
    driver:  results -> BatchSession.finish -> records -> sink (+ sidecars) -> observer

Faults: an actor that dies (its process, or its node) has its unfinished chunks put back at the
front of the queue for the other actors, and a replacement is started; only results that came back
are written, so no input is lost or written twice. An input whose chunk killed its actor
`MAX_ATTEMPTS` times gets an error record. Ctrl-C: the first stops dispatching, lets the chunks
already running finish and writes them; a second stops at once. Either way the actors are killed.

Ray is an optional dependency, imported only when a pool starts (`pip install 'vlmcli[ray]'`).
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmcli.errors import InvalidOption, VlmError
from vlmcli.tasks.resume import Record
from vlmcli.tasks.runner import (
    BatchOptions,
    BatchSession,
    BatchSummary,
    Interrupts,
    Item,
    Observer,
    prepare_item,
    run_items,
)
from vlmcli.tasks.task import Task, TaskRecipe, TaskShape, Variant

if TYPE_CHECKING:
    from vlmcli.tasks.models import ModelSpec
    from vlmcli.tasks.sinks import Sink

RAY_MISSING = "batch mode on Ray needs Ray, an optional extra: pip install 'vlmcli[ray]'"
IN_FLIGHT = 2  # chunks per actor: one decoding while the other is in the model
MAX_ATTEMPTS = 3  # an input whose actor died this many times gets an error record
WORKER_CLASS = "VlmBatchWorker"  # the actors' class (their processes are named ray::VlmBatchWorker)


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise VlmError(RAY_MISSING) from None
    return ray


def check_address(address: str | None) -> str | None:
    """None / "local": start a local cluster; "auto": join the running one; HOST:PORT or ray://HOST:PORT."""
    if address is None:
        return None
    a = address.strip()
    if a in ("", "local"):
        return None
    if a == "auto" or ":" in a:
        return a
    raise InvalidOption(
        "ray",
        f"{address!r} is not a cluster address (auto, local, HOST:PORT or ray://HOST:PORT); "
        "if it is an input, put --ray after the inputs or write --ray=local",
    )


@dataclass
class RayOptions:
    address: str | None = None  # see check_address
    workers: int | None = None  # actors (default: as many as the cluster's CPUs / GPUs hold)
    cpus: float | None = None  # per actor (default: 1 with GPUs, else min(4, the smallest node's CPUs))
    gpus: float = 0.0  # per actor
    ship_files: bool = False  # the driver reads the images and ships their bytes (no shared storage)
    worker_logs: bool = False  # the actors' own output (llama.cpp logs) on the driver's stderr (--debug)
    notify: Callable[[str], None] | None = None  # notices for the user (pool size, lost workers)


# ----------------------------------------------------------------------------- the actor


class VlmBatchWorker:
    """One Ray actor: one model, built once by the recipe; runs chunks of inputs (two at a time:
    one decoding while the other holds the model)."""

    def __init__(self, recipe: TaskRecipe, threads: int | None):
        self.recipe = recipe
        self.threads = threads
        self.base: Task | None = None
        self.tasks: dict[Variant, Task] = {}
        self.model_lock = threading.Lock()
        self.setup_lock = threading.Lock()

    def setup(self) -> dict[str, Any] | VlmError:
        """Build the task (the model loads here). A VlmError is returned, not raised, to reach the
        driver whole."""
        spec = self.recipe.spec
        if spec.n_threads is None and self.threads:
            spec = replace(spec, n_threads=self.threads)
        try:
            with self.setup_lock:
                if self.base is None:
                    self.base = replace(self.recipe, spec=spec)()
        except VlmError as e:
            return e
        import socket

        return {"pid": os.getpid(), "host": socket.gethostname(), "threads": spec.n_threads}

    def _task(self, variant: Variant | None) -> Task:
        assert self.base is not None, "setup() builds the task first"
        if variant is None:
            return self.base
        with self.setup_lock:
            if variant not in self.tasks:
                self.tasks[variant] = variant(self.base)
            return self.tasks[variant]

    def shape(self, variant: Variant | None) -> TaskShape:
        return TaskShape.of(self._task(variant))

    def run(
        self, variant: Variant | None, chunk: list[tuple[int, str, bytes | None]]
    ) -> list[tuple[int, VlmError | None, float, Record | VlmError | None]]:
        """Prepare and run one chunk: per input (index, prepare error, prepare ms, result fields or error)."""
        task = self._task(variant)
        items: list[Item] = []
        tmp = None
        try:
            for index, input, data in chunk:
                item = Item(index, input)
                source = None
                if data is not None:  # shipped bytes: a file of the same name, so decoding sees what the driver saw
                    tmp = tmp or tempfile.mkdtemp(prefix="vlm-ray-")
                    folder = os.path.join(tmp, str(index))
                    os.mkdir(folder)
                    source = os.path.join(folder, os.path.basename(input) or "image")
                    with open(source, "wb") as f:
                        f.write(data)
                prepare_item(task, item, source)
                items.append(item)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        with self.model_lock:
            results = run_items(task, items)
        return [(it.index, it.error, round(it.prepare_ms, 2), results.get(it.index)) for it in items]


# ----------------------------------------------------------------------------- the driver


class RemoteTask:
    """The driver's handle on a task that runs on the pool's actors: an Executor (runner.py), as
    LocalExecutor is for a task here. `derive(variant)` is a task built on the actors from this one
    by `variant(task)` (embed: EmbedTextsTask over the images' task, same model)."""

    def __init__(self, pool: RayPool, variant: Variant | None = None):
        self.pool = pool
        self.variant = variant

    @property
    def name(self) -> str:
        return self.pool.recipe.name

    @property
    def workers(self) -> int | None:
        """Actors in the pool now."""
        return len(self.pool.actors)

    def shape(self) -> TaskShape:
        """The task as the actors built it, without its model."""
        return self.pool.shape(self.variant)

    def derive(self, variant: Variant) -> RemoteTask:
        return RemoteTask(self.pool, variant)

    def run(
        self, inputs: Sequence[str], sink: Sink, options: BatchOptions | None = None, observer: Observer | None = None
    ) -> BatchSummary:
        return self.pool.run(self.variant, inputs, sink, options or BatchOptions(), observer or Observer())


@dataclass
class _Actor:
    handle: Any
    number: int
    ready: bool = False
    setup_ref: Any = None
    in_flight: int = 0
    info: dict[str, Any] | None = None


class RayPool:
    """Ray connection + actors for one command (context manager); `task()` is the RemoteTask."""

    def __init__(self, recipe: TaskRecipe, options: RayOptions):
        self.recipe = recipe
        self.options = options
        self.ray: Any = None
        self._started_ray = False
        self.actors: list[_Actor] = []
        self._spawned = 0
        self._budget = 0  # replacements left
        self.cpus = 0.0
        self.gpus = 0.0
        self._worker_class: Any = None

    # -- connection and actors

    def __enter__(self) -> RayPool:
        self.ray = import_ray()
        self._connect()
        try:
            self._start_actors()
            self._wait_ready(1)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        ray = self.ray
        if ray is None:
            return
        for a in self.actors:
            try:
                ray.kill(a.handle, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors.clear()
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def task(self) -> RemoteTask:
        return RemoteTask(self)

    def _notify(self, message: str) -> None:
        if self.options.notify is not None:
            self.options.notify(message)

    def _connect(self) -> None:
        ray = self.ray
        if ray.is_initialized():
            return  # this process is already a driver (a test, a notebook): use its cluster
        address = check_address(self.options.address)
        kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": self.options.worker_logs}
        if address is None:
            kwargs["include_dashboard"] = False
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as e:
            where = (
                "no running Ray cluster found" if address == "auto" else f"cannot reach the Ray cluster at {address}"
            )
            raise VlmError(
                f"{where} ({e}); start one with `ray start --head`, or drop the address for a local one"
            ) from None
        self._started_ray = True

    def _resources(self) -> tuple[float, float, float]:
        """(total CPUs, total GPUs, the smallest alive node's CPUs)."""
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        cpus = [float(n.get("Resources", {}).get("CPU", 0)) for n in nodes]
        gpus = [float(n.get("Resources", {}).get("GPU", 0)) for n in nodes]
        return sum(cpus), sum(gpus), min([c for c in cpus if c > 0] or [0.0])

    def _start_actors(self) -> None:
        o = self.options
        total_cpus, total_gpus, node_cpus = self._resources()
        gpus = float(o.gpus or 0)
        if gpus and total_gpus < gpus:
            raise InvalidOption("ray_gpus", f"the Ray cluster has {total_gpus:g} GPUs, fewer than {gpus:g} per worker")
        if o.cpus is not None:
            cpus = float(o.cpus)
        elif gpus:
            cpus = 1.0
        elif o.workers:
            cpus = max(1.0, min(node_cpus, float(int(total_cpus // o.workers))))
        else:
            cpus = max(1.0, min(4.0, node_cpus))
        if cpus > max(node_cpus, 1.0) and cpus > total_cpus:
            raise InvalidOption(
                "ray_cpus", f"no node of the Ray cluster has {cpus:g} CPUs (the cluster has {total_cpus:g})"
            )
        if o.workers:
            workers = int(o.workers)
        elif gpus:
            workers = max(1, int(total_gpus // gpus))
        else:
            workers = max(1, int(total_cpus // cpus)) if cpus else 1
        fits = int(total_cpus // cpus) if cpus else workers
        if workers > fits:
            self._notify(
                f"vlm: warning: the Ray cluster has CPUs for {fits} of the {workers} workers now; "
                "the others start when CPUs free up"
            )
        self.cpus, self.gpus = cpus, gpus
        self._worker_class = self.ray.remote(num_cpus=cpus, num_gpus=gpus, max_concurrency=IN_FLIGHT, max_restarts=0)(
            VlmBatchWorker
        )
        self.recipe = replace(self.recipe, spec=_absolute_paths(self.recipe.spec))
        self._budget = 2 * workers + 2
        for _ in range(workers):
            self._spawn()

    def _spawn(self) -> None:
        self._spawned += 1
        threads = max(1, int(self.cpus))  # llama.cpp / ggml threads = the CPUs Ray gives the actor
        handle = self._worker_class.remote(self.recipe, threads)
        actor = _Actor(handle, self._spawned)
        actor.setup_ref = handle.setup.remote()
        self.actors.append(actor)

    def _retire(self, actor: _Actor, why: str, replace: bool = True) -> bool:
        """Drop a dead actor and start another in its place; False if it was already gone."""
        if actor not in self.actors:
            return False
        self.actors.remove(actor)
        try:
            self.ray.kill(actor.handle, no_restart=True)
        except Exception:
            pass
        if not replace:
            return True
        if self._budget > 0:
            self._budget -= 1
            self._notify(
                f"vlm: warning: Ray worker {actor.number} died ({why}); its unfinished images go to the "
                "other workers, and a new worker starts"
            )
            self._spawn()
        elif not self.actors:
            raise VlmError(f"the Ray workers keep dying (the last: {why}); nothing more can run")
        else:
            self._notify(
                f"vlm: warning: Ray worker {actor.number} died ({why}); its unfinished images go to the other workers"
            )
        return True

    def _setup_done(self, actor: _Actor) -> None:
        """An actor's setup finished: ready, or its error raised (a model that does not load)."""
        ref, actor.setup_ref = actor.setup_ref, None
        try:
            info = self.ray.get(ref)
        except self._lost_errors() as e:
            self._retire(actor, _why(e))
            return
        if isinstance(info, VlmError):
            raise info
        actor.ready, actor.info = True, info

    def _wait_ready(self, n: int) -> None:
        """Block until n actors are ready (the first run needs one to learn the task's identity)."""
        told = False
        t0 = time.monotonic()
        while sum(a.ready for a in self.actors) < n:
            pending = {a.setup_ref: a for a in self.actors if a.setup_ref is not None}
            if not pending:
                raise VlmError("no Ray worker could start")
            done, _ = self.ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in done:
                self._setup_done(pending[ref])
            if not told and time.monotonic() - t0 > 20:
                told = True
                self._notify(
                    "vlm: waiting for a Ray worker to start (CPUs free on the cluster? the model on its nodes?)"
                )
        ready = [a for a in self.actors if a.ready]
        hosts = {a.info["host"] for a in ready if a.info}
        each = f"{self.cpus:g} CPU" + ("s" if self.cpus != 1 else "") + (f", {self.gpus:g} GPU" if self.gpus else "")
        self._notify(
            f"vlm: Ray: {len(ready)} of {len(self.actors)} workers ready ({each} each) on {len(hosts)} node(s)"
        )

    def _lost_errors(self) -> tuple[type[BaseException], ...]:
        ex = self.ray.exceptions
        names = (
            "RayActorError",
            "ActorDiedError",
            "ActorUnavailableError",
            "WorkerCrashedError",
            "ObjectLostError",
            "OwnerDiedError",
            "NodeDiedError",
        )
        return tuple(getattr(ex, n) for n in names if hasattr(ex, n))

    # -- one run

    def shape(self, variant: Variant | None) -> TaskShape:
        """The task's shape, from a ready actor (another one if that one died meanwhile)."""
        while True:
            ready = next((a for a in self.actors if a.ready), None)
            if ready is None:
                self._wait_ready(1)
                continue
            try:
                return self.ray.get(ready.handle.shape.remote(variant))
            except self._lost_errors() as e:
                self._retire(ready, _why(e))

    def run(
        self, variant: Variant | None, inputs: Sequence[str], sink: Sink, options: BatchOptions, observer: Observer
    ) -> BatchSummary:
        shape = self.shape(variant)
        task = shape.stand_in()
        ship = self.options.ship_files and shape.file_inputs
        with BatchSession(task, inputs, sink, options, observer) as session:
            with Interrupts(options.handle_sigint) as interrupts:
                _Drive(self, session, variant, inputs, shape, ship, interrupts).loop()
        return session.summary


class _Drive:
    """The dispatch loop of one run: chunks out to ready actors, results back to the session."""

    def __init__(
        self,
        pool: RayPool,
        session: BatchSession,
        variant: Variant | None,
        inputs: Sequence[str],
        shape: TaskShape,
        ship: bool,
        interrupts: Interrupts,
    ):
        self.pool, self.session, self.variant, self.inputs = pool, session, variant, inputs
        self.ray = pool.ray
        self.batch_size = max(1, shape.batch_size)
        self.file_inputs = shape.file_inputs
        self.ship = ship
        self.interrupts = interrupts
        self.queue: collections.deque[Item] = collections.deque()
        self.next_index = 0
        self.in_flight: dict[Any, tuple[_Actor, list[Item]]] = {}
        self.attempts: dict[int, int] = {}

    def loop(self) -> None:
        pool = self.pool
        lost = pool._lost_errors()
        while not self.interrupts.requested:
            self._refill()
            self._dispatch()
            if not self.in_flight and not self.queue and self.next_index >= len(self.inputs):
                break
            setups = {a.setup_ref: a for a in pool.actors if a.setup_ref is not None}
            waiting = [*self.in_flight, *setups]
            if not waiting:
                raise VlmError("no Ray worker is left to run the remaining images")
            done, _ = self.ray.wait(waiting, num_returns=1, timeout=0.5)
            for ref in done:
                if ref in setups:
                    pool._setup_done(setups[ref])
                else:
                    self._collect(ref, lost)
        if self.interrupts.requested:
            self.session.summary.interrupted = True
            self._drain(lost)

    def _drain(self, lost: tuple[type[BaseException], ...]) -> None:
        """After the first Ctrl-C: what is running finishes and is written; what has not started is
        cancelled (the next run does it). A second Ctrl-C raises KeyboardInterrupt out of here."""
        for ref in list(self.in_flight):
            try:
                self.ray.cancel(ref)
            except Exception:  # running, or already done
                pass
        while self.in_flight:
            done, _ = self.ray.wait(list(self.in_flight), num_returns=1, timeout=0.5)
            for ref in done:
                self._collect(ref, lost, requeue=False)

    def _refill(self) -> None:
        """Key and check inputs until the queue holds enough chunks for every actor."""
        want = self.batch_size * (IN_FLIGHT * max(1, len(self.pool.actors)) + 1)
        while self.next_index < len(self.inputs) and len(self.queue) < want:
            item = self.session.check(self.inputs[self.next_index], self.next_index)
            self.next_index += 1
            if item.skipped:
                self.session.skip()
            elif item.error is not None:
                self.session.finish([item], {})
            else:
                self.queue.append(item)

    def _payload(self, item: Item) -> tuple[int, str, bytes | None]:
        if not self.file_inputs:
            return (item.index, item.input, None)
        path = os.path.abspath(item.input)  # the actors' working directory is not ours
        data = None
        if self.ship:
            try:
                data = Path(item.input).read_bytes()
            except OSError:
                data = None  # the actor reports it as it would locally (no such file, unreadable)
        return (item.index, path, data)

    def _dispatch(self) -> None:
        for actor in list(self.pool.actors):
            while actor.ready and actor.in_flight < IN_FLIGHT and self.queue:
                chunk = [self.queue.popleft() for _ in range(min(self.batch_size, len(self.queue)))]
                ref = actor.handle.run.remote(self.variant, [self._payload(it) for it in chunk])
                actor.in_flight += 1
                self.in_flight[ref] = (actor, chunk)

    def _collect(self, ref: Any, lost: tuple[type[BaseException], ...], requeue: bool = True) -> None:
        actor, chunk = self.in_flight.pop(ref)
        actor.in_flight -= 1
        cancelled = getattr(self.ray.exceptions, "TaskCancelledError", None)
        try:
            out = self.ray.get(ref)
        except lost as e:
            self._lost(actor, chunk, e, requeue)
            return
        except Exception as e:
            if cancelled is not None and (isinstance(e, cancelled) or isinstance(getattr(e, "cause", None), cancelled)):
                return  # cancelled after Ctrl-C before it started: not written, the next run does it
            if isinstance(e, self.ray.exceptions.RayTaskError):  # a bug in the task: as locally, it ends the run
                cause = getattr(e, "cause", None)
                raise (cause if isinstance(cause, Exception) else e) from None
            raise
        by_index = {it.index: it for it in chunk}
        results: dict[int, Record | VlmError] = {}
        for index, error, prepare_ms, result in out:
            item = by_index[index]
            item.error, item.prepare_ms = error, prepare_ms
            if result is not None:
                results[index] = result
        self.session.finish(chunk, results)

    def _lost(self, actor: _Actor, chunk: list[Item], error: BaseException, requeue: bool) -> None:
        self.pool._retire(actor, _why(error), replace=requeue)
        if not requeue:
            return  # interrupted: not written, so the next run does them
        retry: list[Item] = []
        failed: list[Item] = []
        for it in chunk:
            n = self.attempts[it.index] = self.attempts.get(it.index, 0) + 1
            (retry if n < MAX_ATTEMPTS else failed).append(it)
        for it in failed:
            it.error = VlmError(f"the Ray worker running it died {MAX_ATTEMPTS} times ({_why(error)})")
        self.session.finish(failed, {})
        self.queue.extendleft(reversed(retry))


def _why(error: BaseException) -> str:
    text = " ".join(str(error).split())
    first = text.split(". ")[0]
    return f"{type(error).__name__}: {first[:160]}" if first else type(error).__name__


def _absolute_paths(spec: ModelSpec) -> ModelSpec:
    """Model paths the driver can see, made absolute (the actors' working directory is not ours);
    store names stay names, resolved in each node's own store."""

    def absolute(value: str | None) -> str | None:
        return str(Path(value).expanduser().resolve()) if value and Path(value).expanduser().exists() else value

    return replace(spec, model=absolute(spec.model), mmproj=absolute(spec.mmproj))
