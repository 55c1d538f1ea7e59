"""How an evaluation runs its models: the settings, one executor per model spec (the model here,
or with `settings.ray` on a pool of Ray actors that build the task with the same module-level
builder), a row per best-of N from one model load, and what a report row says of the model."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmcli.tasks.execution import open_executor
from vlmcli.tasks.runner import BatchOptions, BatchSummary, Executor, Observer
from vlmcli.tasks.task import TaskRecipe, TaskShape

if TYPE_CHECKING:
    from vlmcli.engines.llama import GenerationOptions
    from vlmcli.tasks.ask import VlmTask
    from vlmcli.tasks.models import ModelSpec, OpenedModel
    from vlmcli.tasks.ray_batch import RayOptions
    from vlmcli.tasks.sinks import Sink


@dataclass
class EvalSettings:
    out: Path | None = None  # per-item records (JSONL; retrieval: .npy + .jsonl), resumable
    redo: bool = False
    max_pixels: int | None = None
    observer_factory: Callable[[], Observer] = Observer
    notify: Callable[[str], None] | None = None  # automatic pulls, notes
    # VLM evaluations
    generation: GenerationOptions | None = None  # None: greedy with the evaluation's default length
    prompt: str | None = None  # VQA: the suffix after each question; captions: the instruction
    best_of: list[int] = field(default_factory=lambda: [1])  # a row per N; three or more N: the scaling law is fitted
    select: str = "logprob"  # how best-of picks (logprob | vote)
    # CLIP evaluations
    templates: list[str] | None = None
    batch_size: int = 32
    # Where the model runs: None here; RayOptions: on a pool of Ray actors (tasks/ray_batch.py)
    ray: RayOptions | None = None

    def run(self, executor: Executor, inputs: Sequence[str], sink: Sink, options: BatchOptions) -> BatchSummary:
        """Every eval run goes through here, with a fresh observer (progress) per run."""
        return executor.run(inputs, sink, options, self.observer_factory())


def model_info(opened: OpenedModel) -> dict[str, Any]:
    """What a report row says of the model (a task's run_info; from a Ray actor it travels back
    with the task's shape)."""
    info: dict[str, Any] = {"model": opened.name, "file": opened.path.name}
    opts = getattr(opened.engine, "options", None)  # SmolVLM2's EngineOptions; CLIP has none
    if opts is not None:
        info["detail"] = opts.detail
        info["max_tiles"] = opts.max_tiles
    return info


def row_info(shape: TaskShape, spec: ModelSpec) -> dict[str, Any]:
    """A report row's model fields: the task's run_info (less the builder's timings), its quant,
    the spec's GPU layers."""
    info = dict(shape.run_info or {})
    info.pop("text_s", None)
    return {
        "model": info.pop("model", None),
        "file": info.pop("file", None),
        "quant": shape.identity.get("quant"),
        "n_gpu_layers": spec.n_gpu_layers,
        **info,
    }


def model_runs(
    name: str, build: Callable[..., Any], args: tuple[Any, ...], specs: Sequence[ModelSpec], settings: EvalSettings
) -> Iterator[tuple[ModelSpec, Executor, float]]:
    """(spec, executor, seconds to load) per spec: `build(spec, *args)` here or on the Ray actors
    (the load time is then the pool's start); the model is released after the caller's step."""
    for spec in specs:
        t0 = time.perf_counter()
        with open_executor(TaskRecipe(name, build, spec, args), settings.ray) as executor:
            yield spec, executor, time.perf_counter() - t0


@dataclass(frozen=True)
class BestOf:
    """A variant: the same model's task sampling `n` candidates per answer (a row per N)."""

    n: int

    def __call__(self, base: VlmTask) -> VlmTask:
        return base.with_best_of(self.n)


def best_of_runs(
    name: str, build: Callable[..., Any], args: tuple[Any, ...], specs: Sequence[ModelSpec], settings: EvalSettings
) -> Iterator[tuple[ModelSpec, int, Executor, float]]:
    """(spec, N, executor, load seconds) per row: each model opened once (here or on the Ray actors)
    with room for the largest N, its first row's task built by `build(spec, *args, N)`, the others
    derived from it (BestOf)."""
    first = settings.best_of[0]
    wide = [replace(spec, n_sequences=max(settings.best_of)) for spec in specs]
    for (_, executor, load_s), spec in zip(model_runs(name, build, (*args, first), wide, settings), specs):
        for i, n_best in enumerate(settings.best_of):
            yield spec, n_best, executor if i == 0 else executor.derive(BestOf(n_best)), load_s if i == 0 else 0.0


def sampling(generation: GenerationOptions, n_best: int) -> GenerationOptions:
    """Greedy for one answer, sampled for several (unless a temperature is given)."""
    from vlmcli.tasks.best_of import temperature_for

    return replace(generation, temperature=temperature_for(n_best, generation.temperature or None))
