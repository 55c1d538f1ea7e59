"""`eval`: benchmark quality and speed on the user's machine, through the same tasks and runner.

    evaluate_vqa(items, specs, settings)        AskTask per image (questions of one image share one encoding)
    evaluate_captions(items, specs, settings)   CaptionTask; CIDEr-D, BLEU-1..4, ROUGE-L
    evaluate_zeroshot(folder, specs, settings)  ClassifyTask over encode_labels(class names x templates)
    evaluate_retrieval(items, specs, settings)  EmbedImagesTask + EmbedTextsTask; Recall@1/5/10 both ways
    score_vqa_predictions / score_caption_predictions: existing predictions, no model

Each model spec (several give a side-by-side table) is opened, run over every item with run_batch
(per-item records in `settings.out`, resumable: records of other models or settings stay in the
file), scored with vlmcli.metrics, and reported with its speed: items, wall time, time per item,
images/s, time to first token (VLMs), peak memory, and the machine. The report is a plain dict
(JSON-ready); front ends render it.

Where the model runs: `_model_task` opens it here with a module-level builder (`vqa_task`,
`caption_task`, `zeroshot_task`, `retrieval_task`: a ModelSpec and picklable settings in, the
task out), or, with `settings.ray`, starts a pool of Ray actors that call the same builder
(tasks/ray_batch.py); `_run` hands the task to run_batch or to the pool. Everything else (resume,
records, scores, the report) is the same code either way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import resource
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmcli.errors import VlmError
from vlmcli.tasks.ask import AskTask
from vlmcli.tasks.caption import CaptionTask
from vlmcli.tasks.classify import ClassifyTask
from vlmcli.tasks.eval_data import CaptionItem, ImageFolder, VqaItem, read_json, read_jsonl_records
from vlmcli.tasks.resume import Record, identity_matches, record_abspath
from vlmcli.tasks.runner import BatchOptions, BatchSummary, Observer, run_batch
from vlmcli.tasks.sinks import JsonlSink, Sink, read_jsonl

if TYPE_CHECKING:
    from PIL import Image

    from vlmcli.engines.clip import ClipModel
    from vlmcli.engines.llama import GenerationOptions
    from vlmcli.tasks.classify import LabelEmbeddings
    from vlmcli.tasks.embed import EmbedImagesTask
    from vlmcli.tasks.models import ModelSpec, OpenedModel
    from vlmcli.tasks.ray_batch import RayOptions

DEFAULT_VQA_SUFFIX = "Answer the question using a single word or phrase."
DEFAULT_VQA_MAX_TOKENS = 16
DEFAULT_EVAL_CAPTION_PROMPT = "Describe this image in one sentence."
DEFAULT_EVAL_CAPTION_MAX_TOKENS = 48


@dataclass
class EvalSettings:
    out: Path | None = None  # per-item records (JSONL; retrieval: .npy + .jsonl), resumable
    redo: bool = False
    max_pixels: int | None = None
    observer_factory: Callable[[], Observer] = Observer
    notify: Callable[[str], None] | None = None  # automatic pulls, notes
    # VLM evaluations
    generation: Any = None  # GenerationOptions; None: greedy with the evaluation's default length
    prompt: str | None = None  # VQA: the suffix after each question; captions: the instruction
    best_of: list[int] = field(default_factory=lambda: [1])  # a row per N; three or more N: the scaling law is fitted
    select: str = "logprob"  # how best-of picks (logprob | vote)
    # CLIP evaluations
    templates: list[str] | None = None
    batch_size: int = 32
    # Where the model runs: None here; RayOptions: on a pool of Ray actors (tasks/ray_batch.py)
    ray: RayOptions | None = None


# ----------------------------------------------------------------------------- machine and speed


def machine_info() -> dict[str, Any]:
    """What the speed numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if sys.platform == "darwin":
        import subprocess

        try:
            cpu = (
                subprocess.run(
                    ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
                ).stdout.strip()
                or cpu
            )
        except (OSError, subprocess.SubprocessError):
            pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (every model of the run so far counts)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


def _speed(
    summary: BatchSummary, wall_s: float, load_s: float, items_run: int, records: list[Record], task: Any
) -> dict[str, Any]:
    """Wall time and rates of the run as this process saw it (over the whole cluster with --ray);
    per-item model times from the records, wherever they ran."""
    model_ms = [
        sum(
            v
            for k, v in (r.get("timings") or {}).items()
            if k.endswith("_ms") and k not in ("load_ms",) and not k.endswith("per_s")
        )
        for r in records
        if not r.get("error")
    ]
    out: dict[str, Any] = {
        "images_run": summary.done,
        "items_run": items_run,
        "images_resumed": summary.skipped,
        "wall_s": round(wall_s, 3),
        "load_s": round(load_s, 3),
        "s_per_item": round(wall_s / items_run, 4) if items_run else None,
        "images_per_s": round(summary.done / wall_s, 4) if wall_s > 0 and summary.done else None,
        "record_ms_per_image": round(sum(model_ms) / len(model_ms), 2) if model_ms else None,
        "peak_rss_mb": peak_rss_mb(),
    }
    workers = _ray_workers(task)
    if workers is not None:  # the models' memory is the actors', not this driver's
        out["peak_rss_mb"] = None
        out["ray_workers"] = workers
    return out


class MemorySink(Sink):
    """Records kept in memory (no --out)."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def write_batch(self, records: list[Record]) -> None:
        self.records += [dict(r) for r in records]


class CountingSink(Sink):
    """Another sink, counting the answers of the records this run writes (VQA: questions run)."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.answers = 0

    @property
    def resumable(self) -> bool:  # type: ignore[override]
        return self.sink.resumable

    def open(self, plan: Any, with_hash: bool) -> Any:
        return self.sink.open(plan, with_hash)

    def write_batch(self, records: list[Record]) -> None:
        self.answers += sum(len(r.get("answers") or []) for r in records if not r.get("error"))
        self.sink.write_batch(records)

    def close(self) -> None:
        self.sink.close()


def _records_for(
    identity: dict[str, Any], inputs: Sequence[str], out: Path | None, memory: MemorySink | None
) -> dict[str, Record]:
    """abspath -> this task's record for each input (the file's, which includes earlier runs')."""
    wanted = {os.path.abspath(p) for p in inputs}
    source = read_jsonl(out) if out is not None and out.exists() else (memory.records if memory else [])
    found: dict[str, Record] = {}
    for r in source:
        if identity_matches(r, identity):
            ap = record_abspath(r)
            if ap in wanted:
                found[ap] = r
    return found


def _sink(out: Path | None) -> tuple[Sink, MemorySink | None]:
    if out is None:
        mem = MemorySink()
        return mem, mem
    return JsonlSink(out), None


def _model_info(opened: OpenedModel) -> dict[str, Any]:
    """What a report row says of the model: set on the task as `run_info` by the builders (on a Ray
    actor it travels back with the task's shape)."""
    info: dict[str, Any] = {"model": opened.name, "file": opened.path.name}
    opts = getattr(opened.engine, "options", None)
    if opts is not None and hasattr(opts, "detail"):
        info["detail"] = opts.detail
        info["max_tiles"] = opts.max_tiles
    return info


def _run_info(task: Any, quant: Any, spec: ModelSpec) -> dict[str, Any]:
    info = dict(getattr(task, "run_info", None) or {})
    info.pop("text_s", None)
    out: dict[str, Any] = {
        "model": info.pop("model", None),
        "file": info.pop("file", None),
        "quant": quant,
        "n_gpu_layers": spec.n_gpu_layers,
        **info,
    }
    return out


def _opened(task: Any, opened: OpenedModel, **info: Any) -> Any:
    task.opened = opened  # closed by _model_task after the local run
    task.run_info = {**_model_info(opened), **info}
    return task


# ----------------------------------------------------------------------------- here or on Ray


@contextlib.contextmanager
def _model_task(
    name: str, build: Callable[..., Any], spec: ModelSpec, args: tuple[Any, ...], settings: EvalSettings
) -> Iterator[tuple[Any, float]]:
    """(the task, seconds to load it): `build(spec, *args)` here, or with `settings.ray` a pool of
    Ray actors that each call it (a RemoteTask; the load time is the pool's start)."""
    t0 = time.perf_counter()
    if settings.ray is not None:
        from vlmcli.tasks.ray_batch import RayPool, TaskRecipe

        with RayPool(TaskRecipe(name, build, spec, args), settings.ray) as pool:
            yield pool.task(), time.perf_counter() - t0
        return
    task = build(spec, *args)
    try:
        yield task, time.perf_counter() - t0
    finally:
        task.opened.close()


def _run(task: Any, inputs: Sequence[str], sink: Sink, options: BatchOptions, settings: EvalSettings) -> BatchSummary:
    """Every eval run goes through here: run_batch with the model here, or the Ray pool's driver."""
    from vlmcli.tasks.ray_batch import RemoteTask

    observer = settings.observer_factory()
    if isinstance(task, RemoteTask):
        return task.run_batch(inputs, sink, options, observer)
    return run_batch(task, inputs, sink, options, observer)


def _describe(task: Any) -> Any:
    """The task's identity and run_info: the task itself, or (on Ray) its stand-in."""
    from vlmcli.tasks.ray_batch import RemoteTask

    return task.describe() if isinstance(task, RemoteTask) else task


def _derive(task: Any, variant: Callable[[Any], Any]) -> Any:
    """`variant(task)`: another task over the same model (here, or built so on the actors)."""
    from vlmcli.tasks.ray_batch import RemoteTask

    return task.derive(variant) if isinstance(task, RemoteTask) else variant(task)


def _ray_workers(task: Any) -> int | None:
    from vlmcli.tasks.ray_batch import RemoteTask

    return task.workers if isinstance(task, RemoteTask) else None


@dataclass(frozen=True)
class BestOf:
    """A variant (`_derive`): the same model's task sampling `n` candidates per answer (a row per N)."""

    n: int

    def __call__(self, base: Any) -> Any:
        return base.with_best_of(self.n)


def _report(name: str, dataset: str, runs: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"eval": name, "dataset": dataset, **extra, "machine": machine_info(), "runs": runs}


# ----------------------------------------------------------------------------- best-of N


def _vlm_runs(
    name: str, build: Callable[..., Any], args: tuple[Any, ...], specs: Sequence[ModelSpec], settings: EvalSettings
) -> Iterator[tuple[ModelSpec, int, Any, float]]:
    """(spec, N, task, load seconds) per row: each model opened once (here or on the Ray actors) for
    the largest N, its first row's task built by `build(spec, *args, N)`, the others derived."""
    for spec in specs:
        first = settings.best_of[0]
        with _model_task(name, build, replace(spec, n_sequences=max(settings.best_of)), (*args, first), settings) as (
            base,
            load_s,
        ):
            for i, n_best in enumerate(settings.best_of):
                yield spec, n_best, base if i == 0 else _derive(base, BestOf(n_best)), load_s if i == 0 else 0.0


def _sampling(gen: GenerationOptions, n_best: int) -> GenerationOptions:
    from vlmcli.tasks.best_of import temperature_for

    return replace(gen, temperature=temperature_for(n_best, gen.temperature or None))


def _scaling(runs: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Per model setting with three or more N: Q(N) = Q_inf - A / N**gamma fitted to `metric`."""
    from vlmcli.metrics.scaling import fit_scaling_law

    groups: OrderedDict[tuple, list[tuple[int, float]]] = OrderedDict()
    for r in runs:
        q = (r.get("metrics") or {}).get(metric)
        if q is not None:
            key = (r.get("model"), r.get("quant"), r.get("detail"), r.get("max_tiles"))
            groups.setdefault(key, []).append((int(r.get("best_of") or 1), float(q)))
    out = []
    for (model, quant, detail, max_tiles), points in groups.items():
        fit = fit_scaling_law(points)
        if fit is not None:
            out.append(
                {
                    "model": model,
                    "quant": quant,
                    "detail": detail,
                    "max_tiles": max_tiles,
                    "metric": metric,
                    "points": points,
                    "q_inf": round(fit.q_inf, 4),
                    "a": round(fit.a, 4),
                    "gamma": round(fit.gamma, 4),
                    "rmse": round(fit.rmse, 5),
                }
            )
    return out


# ----------------------------------------------------------------------------- VQA


def vqa_prompt(question: str, suffix: str) -> str:
    return f"{question}\n{suffix}" if suffix else question


class VqaTask(AskTask):
    """Every question about one image, from one encoding; answers carry question_id and accuracy."""

    name = "eval-vqa"

    def __init__(
        self,
        engine: Any,
        questions: dict[str, list[VqaItem]],
        suffix: str,
        generation: GenerationOptions,
        max_pixels: int | None,
        n_best: int = 1,
        select: str = "logprob",
    ):
        self.suffix = suffix
        # Absolute input path -> its questions (absolute: Ray actors get absolute paths, and have
        # their own working directory).
        self.questions = {os.path.abspath(p): qs for p, qs in questions.items()}
        self.answered = 0  # questions answered by the model in this process
        super().__init__(engine, ["(the image's questions)"], generation, max_pixels, n_best, select)

    def _inputs(self) -> dict[str, Any]:
        return {"prompt_suffix": self.suffix}

    def prepare(self, path: str) -> tuple[str, Image.Image]:
        return path, super().prepare(path)

    def prepare_from(self, path: str, source: str) -> tuple[str, Image.Image]:
        """Ray with --ray-ship-files: the image's bytes in a copy at `source`, its questions by `path`."""
        return path, super().prepare(source)

    def run(self, prepared: list[tuple[str, Image.Image]]) -> list[Record | VlmError]:  # type: ignore[override]
        from vlmcli.metrics.vqa import vqa_accuracy

        out: list[Record | VlmError] = []
        for path, image in prepared:
            qs = self.questions[os.path.abspath(path)]
            self.prompts = [vqa_prompt(q.question, self.suffix) for q in qs]
            try:
                gens = self.generate(image)
                rec = self.record(gens)
            except VlmError as e:
                out.append(e)
                continue
            for q, a, g in zip(qs, rec["answers"], gens):
                a["question_id"] = q.question_id
                a["question"] = q.question
                t = getattr(g, "generation", g).timings  # an Answer (best-of) or a Generation
                a["ttft_ms"] = round(t.image_encode_ms + t.prefill_ms, 2)
                a["accuracy"] = round(vqa_accuracy(a["answer"], q.answers), 4)
            self.answered += len(qs)
            out.append(rec)
        return out


# The model opened and the task built: here, or on each Ray actor (module-level: actors import them by name).
def vqa_task(
    spec: ModelSpec,
    questions: dict[str, list[VqaItem]],
    suffix: str,
    generation: GenerationOptions,
    max_pixels: int | None,
    select: str,
    notify: Callable[[str], None] | None,
    n_best: int = 1,
) -> VqaTask:
    from vlmcli.tasks.models import open_model

    opened = open_model(spec, "vlm", notify=notify)

    def build(n: int) -> VqaTask:
        task = VqaTask(opened.engine, questions, suffix, _sampling(generation, n), max_pixels, n, select)
        task.with_best_of = build  # type: ignore[attr-defined]  (BestOf)
        return _opened(task, opened)

    return build(n_best)


def _stale_vqa_inputs(identity: dict[str, Any], by_path: dict[str, list[VqaItem]], out: Path) -> list[str]:
    """Images whose earlier record lacks some of this run's questions (the subset changed): redone."""
    if not out.exists():
        return []
    answered: dict[str, set[str]] = {}
    for r in read_jsonl(out):
        if identity_matches(r, identity) and not r.get("error"):
            ap = record_abspath(r)
            if ap is not None:
                answered[ap] = {str(a.get("question_id")) for a in r.get("answers") or []}
    stale = []
    for p, qs in by_path.items():
        have = answered.get(os.path.abspath(p))
        if have is not None and not {q.question_id for q in qs} <= have:
            stale.append(p)
    return stale


def _vqa_metrics(items: Sequence[VqaItem], answers: dict[str, str]) -> dict[str, Any]:
    from vlmcli.metrics.vqa import score_vqa

    scored = [
        (answers[q.question_id], q.answers, q.answer_type, q.question_type) for q in items if q.question_id in answers
    ]
    if not scored:
        return {"accuracy": None, "questions": 0}
    return score_vqa(scored).to_dict()


def evaluate_vqa(
    items: Sequence[VqaItem], specs: Sequence[ModelSpec], settings: EvalSettings, dataset: str = ""
) -> dict[str, Any]:
    from vlmcli.engines.llama import GenerationOptions

    by_path: OrderedDict[str, list[VqaItem]] = OrderedDict()
    for q in items:
        by_path.setdefault(q.image, []).append(q)
    inputs = list(by_path)
    suffix = DEFAULT_VQA_SUFFIX if settings.prompt is None else settings.prompt
    gen = settings.generation or GenerationOptions(max_tokens=DEFAULT_VQA_MAX_TOKENS)
    runs = []
    # Absolute paths: the actors' working directory is not ours.
    build = (
        {os.path.abspath(p): qs for p, qs in by_path.items()},
        suffix,
        gen,
        settings.max_pixels,
        settings.select,
        settings.notify,
    )
    for spec, n_best, task, load_s in _vlm_runs("eval-vqa", vqa_task, build, specs, settings):
        shape = _describe(task)
        t0 = time.perf_counter()
        summary = BatchSummary()
        questions_run = 0
        if settings.out is not None and not settings.redo:
            stale = _stale_vqa_inputs(shape.identity, by_path, settings.out)
            if stale:
                counted = CountingSink(JsonlSink(settings.out))
                summary = _run(task, stale, counted, BatchOptions(redo=True), settings)
                questions_run += counted.answers
        sink, memory = _sink(settings.out)
        counted = CountingSink(sink)
        summary = summary + _run(task, inputs, counted, BatchOptions(redo=settings.redo), settings)
        questions_run += counted.answers
        wall = time.perf_counter() - t0
        records = _records_for(shape.identity, inputs, settings.out, memory)
        quant = shape.identity.get("quant")
        answers: dict[str, str] = {}
        ttft = []
        for r in records.values():
            if r.get("error"):
                continue
            for k, a in enumerate(r.get("answers") or []):
                answers[str(a.get("question_id"))] = str(a.get("answer", ""))
                if k == 0 and a.get("ttft_ms") is not None:
                    ttft.append(float(a["ttft_ms"]))
        failed = [q for q in items if q.question_id not in answers]
        failed_images = sum(1 for p in inputs if (records.get(os.path.abspath(p)) or {"error": "missing"}).get("error"))
        speed = _speed(summary, wall, load_s, questions_run, list(records.values()), task)
        speed["ttft_s"] = round(sum(ttft) / len(ttft) / 1000, 4) if ttft else None
        runs.append(
            {
                **_run_info(shape, quant, spec),
                "best_of": n_best,
                "metrics": _vqa_metrics(items, answers),
                "items": len(items) - len(failed),
                "failed": len(failed),
                "images": len(inputs),
                "failed_images": failed_images,
                "speed": speed,
                "summary": _summary(summary),
            }
        )
    return _report(
        "vqa",
        dataset,
        runs,
        questions=len(items),
        images=len(inputs),
        prompt_suffix=suffix,
        scaling=_scaling(runs, "accuracy"),
    )


def _summary(summary: BatchSummary) -> dict[str, Any]:
    return {
        "done": summary.done,
        "skipped": summary.skipped,
        "failed": summary.failed,
        "interrupted": summary.interrupted,
        "errors": [{"path": p, "error": e.message} for p, e in summary.errors],
    }


# ----------------------------------------------------------------------------- predictions without a model


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """An official results JSON (a list of objects) or JSON lines (vlm's own --out records included)."""
    if path.suffix.lower() == ".jsonl":
        return [obj for _, obj in read_jsonl_records(path)]
    doc = read_json(path)
    if not isinstance(doc, list):
        raise VlmError("expected a JSON list of predictions (or a .jsonl file)", path)
    for i, d in enumerate(doc):
        if not isinstance(d, dict):
            raise VlmError(f"[{i}]: expected an object, got {type(d).__name__}", path)
    return doc


def score_vqa_predictions(items: Sequence[VqaItem], predictions: Path, dataset: str = "") -> dict[str, Any]:
    """[{question_id, answer}] (the official results format), or vlm eval vqa --out records."""
    answers: dict[str, str] = {}
    for i, p in enumerate(read_predictions(predictions)):
        if p.get("error"):  # a failed item of vlm's own records
            continue
        if "answers" in p and isinstance(p["answers"], list):  # vlm's own records
            for a in p["answers"]:
                if isinstance(a, dict) and "question_id" in a:
                    answers[str(a["question_id"])] = str(a.get("answer", ""))
            continue
        if "question_id" not in p or not isinstance(p.get("answer"), str):
            raise VlmError(f"prediction {i}: needs question_id and answer (a string)", predictions)
        answers[str(p["question_id"])] = p["answer"]
    missing = sum(1 for q in items if q.question_id not in answers)
    run = {
        "model": None,
        "predictions": str(predictions),
        "metrics": _vqa_metrics(items, answers),
        "items": len(items) - missing,
        "failed": missing,
    }
    return _report("vqa", dataset, [run], questions=len(items))


# ----------------------------------------------------------------------------- captions


def _caption_metrics(
    items: Sequence[CaptionItem], captions: dict[str, str]
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    from vlmcli.metrics.caption import score_captions
    from vlmcli.metrics.tokenize import ptb_tokenize

    done = [it for it in items if it.image_id in captions]
    if not done:
        return {"CIDEr-D": None, "images": 0}, []
    cands = [ptb_tokenize(captions[it.image_id]) for it in done]
    refs = [[ptb_tokenize(c) for c in it.captions] for it in done]
    s = score_captions(cands, refs)
    return s.to_dict(), s.per_image


def _unique_images(items: Sequence[CaptionItem], notify: Callable[[str], None] | None) -> list[CaptionItem]:
    seen: dict[str, CaptionItem] = {}
    for it in items:
        if it.image in seen:
            seen[it.image].captions = seen[it.image].captions + it.captions
            if notify:
                notify(f"vlm: note: {it.image} appears more than once; its captions are merged")
        else:
            seen[it.image] = replace(it, captions=list(it.captions))
    return list(seen.values())


def caption_task(
    spec: ModelSpec,
    generation: GenerationOptions,
    prompt: str,
    max_pixels: int | None,
    select: str,
    notify: Callable[[str], None] | None,
    n_best: int = 1,
) -> CaptionTask:
    from vlmcli.tasks.models import open_model

    opened = open_model(spec, "vlm", notify=notify)

    def build(n: int) -> CaptionTask:
        task = CaptionTask(opened.engine, _sampling(generation, n), prompt, max_pixels, n, select)
        task.with_best_of = build  # type: ignore[attr-defined]  (BestOf)
        return _opened(task, opened)

    return build(n_best)


def evaluate_captions(
    items: Sequence[CaptionItem], specs: Sequence[ModelSpec], settings: EvalSettings, dataset: str = ""
) -> dict[str, Any]:
    from vlmcli.engines.llama import GenerationOptions

    items = _unique_images(items, settings.notify)
    inputs = [it.image for it in items]
    prompt = settings.prompt or DEFAULT_EVAL_CAPTION_PROMPT
    gen = settings.generation or GenerationOptions(max_tokens=DEFAULT_EVAL_CAPTION_MAX_TOKENS)
    runs = []
    build = (gen, prompt, settings.max_pixels, settings.select, settings.notify)
    for spec, n_best, task, load_s in _vlm_runs("eval-caption", caption_task, build, specs, settings):
        shape = _describe(task)
        sink, memory = _sink(settings.out)
        t0 = time.perf_counter()
        summary = _run(task, inputs, sink, BatchOptions(redo=settings.redo), settings)
        wall = time.perf_counter() - t0
        records = _records_for(shape.identity, inputs, settings.out, memory)
        quant = shape.identity.get("quant")
        captions: dict[str, str] = {}
        ttft = []
        for it in items:
            r = records.get(os.path.abspath(it.image))
            if r and not r.get("error"):
                captions[it.image_id] = str(r.get("caption", ""))
                t = r.get("timings") or {}
                ttft.append(float(t.get("image_encode_ms", 0.0)) + float(t.get("prefill_ms", 0.0)))
        metrics, _ = _caption_metrics(items, captions)
        speed = _speed(summary, wall, load_s, summary.done, list(records.values()), task)
        speed["ttft_s"] = round(sum(ttft) / len(ttft) / 1000, 4) if ttft else None
        runs.append(
            {
                **_run_info(shape, quant, spec),
                "best_of": n_best,
                "metrics": metrics,
                "items": len(captions),
                "failed": len(items) - len(captions),
                "speed": speed,
                "summary": _summary(summary),
            }
        )
    return _report("caption", dataset, runs, images=len(items), prompt=prompt, scaling=_scaling(runs, "CIDEr-D"))


def score_caption_predictions(items: Sequence[CaptionItem], predictions: Path, dataset: str = "") -> dict[str, Any]:
    """[{image_id, caption}] (COCO results format), or records with path/image and caption (vlm's --out)."""
    by_path = {os.path.abspath(it.image): it.image_id for it in items}
    captions: dict[str, str] = {}
    for i, p in enumerate(read_predictions(predictions)):
        if p.get("error"):
            continue
        if not isinstance(p.get("caption"), str):
            raise VlmError(f"prediction {i}: needs caption (a string)", predictions)
        if "image_id" in p:
            captions[str(p["image_id"])] = p["caption"]
        else:
            where = p.get("path") or p.get("image")
            if not isinstance(where, str):
                raise VlmError(f"prediction {i}: needs image_id, path or image", predictions)
            base = predictions.parent
            ap = os.path.abspath(where if os.path.isabs(where) or os.path.exists(where) else base / where)
            if ap in by_path:
                captions[by_path[ap]] = p["caption"]
    items = [it for it in items]
    metrics, _ = _caption_metrics(items, captions)
    run = {
        "model": None,
        "predictions": str(predictions),
        "metrics": metrics,
        "items": len([i for i in items if i.image_id in captions]),
        "failed": len([i for i in items if i.image_id not in captions]),
    }
    return _report("caption", dataset, [run], images=len(items))


# ----------------------------------------------------------------------------- CLIP zero-shot


def _digest(values: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(values), ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


class ZeroShotTask(ClassifyTask):
    """ClassifyTask over the dataset's classes; records keep the top-k class indices (and labels)."""

    name = "eval-zeroshot"

    def __init__(self, model: ClipModel, labels: LabelEmbeddings, top_k: int, **kwargs: Any):
        super().__init__(model, labels, top_k, **kwargs)
        # Digests, not the lists: ImageNet's 1000 names x 80 templates in every record would be 40 kB each.
        self.identity["candidates"] = {"count": len(labels.labels), "sha256": _digest(labels.labels)}
        self.identity["options"] = {
            "templates": {"count": len(labels.templates), "sha256": _digest(labels.templates)},
            "top_k": top_k,
        }

    def run(self, prepared: list[Any]) -> list[Record | VlmError]:
        import numpy as np

        from vlmcli.tasks.classify import label_probabilities
        from vlmcli.tasks.embed import embed_pixels

        t0 = time.perf_counter()
        probs = label_probabilities(embed_pixels(self.model, np.stack(prepared)), self.labels)
        order = np.argsort(-probs, axis=1, kind="stable")[:, : self.top_k]
        per_image = round((time.perf_counter() - t0) * 1000 / len(prepared), 2)
        return [
            {
                "classes": [int(j) for j in row],
                "labels": [{"label": self.labels.labels[j], "score": float(p[j])} for j in row],
                "timings": {"model_ms": per_image},
            }
            for p, row in zip(probs, order)
        ]


def zeroshot_task(
    spec: ModelSpec,
    names: list[str],
    templates: list[str],
    top_k: int,
    batch_size: int,
    max_pixels: int | None,
    notify: Callable[[str], None] | None,
) -> ZeroShotTask:
    """The classes' text embeddings (timed: run_info's text_s) and the task, here or on a Ray actor."""
    from vlmcli.tasks.classify import encode_labels
    from vlmcli.tasks.models import open_model

    opened = open_model(spec, "clip", notify=notify)
    try:
        t0 = time.perf_counter()
        label_set = encode_labels(opened.engine, names, templates)
        text_s = time.perf_counter() - t0
        task = ZeroShotTask(
            opened.engine, label_set, top_k, batch_size=batch_size, max_pixels=max_pixels, model_name=opened.name
        )
    except BaseException:
        opened.close()
        raise
    return _opened(task, opened, text_s=round(text_s, 3))


def evaluate_zeroshot(
    folder: ImageFolder, specs: Sequence[ModelSpec], settings: EvalSettings, dataset: str = ""
) -> dict[str, Any]:
    import numpy as np

    from vlmcli.metrics.retrieval import topk_accuracy
    from vlmcli.tasks.classify import check_templates

    templates = check_templates(settings.templates)
    label_of = {os.path.abspath(p): k for p, k in zip(folder.paths, folder.labels)}
    top_k = min(5, len(folder.names))

    runs = []
    build = (list(folder.names), templates, top_k, settings.batch_size, settings.max_pixels, settings.notify)
    for spec in specs:
        with _model_task("eval-zeroshot", zeroshot_task, spec, build, settings) as (task, load_s):
            shape = _describe(task)
            sink, memory = _sink(settings.out)
            t0 = time.perf_counter()
            summary = _run(task, folder.paths, sink, BatchOptions(redo=settings.redo), settings)
            wall = time.perf_counter() - t0
            records = _records_for(shape.identity, folder.paths, settings.out, memory)
            quant = shape.identity.get("quant")
            speed = _speed(summary, wall, load_s, summary.done, list(records.values()), task)
        ranks = []
        for p in folder.paths:
            r = records.get(os.path.abspath(p))
            if r and not r.get("error"):
                classes = list(r.get("classes") or [])
                k = label_of[os.path.abspath(p)]
                ranks.append(classes.index(k) if k in classes else top_k)
        metrics: dict[str, Any] = {"top1": None, "top5": None, "images": 0}
        if ranks:
            # top-k from the stored ranks (records keep the top 5): the same as topk_accuracy on full scores.
            arr = np.asarray(ranks)
            metrics = {
                "top1": float(100.0 * np.mean(arr < 1)),
                "top5": float(100.0 * np.mean(arr < 5)),
                "images": len(ranks),
            }
        text_s = (getattr(shape, "run_info", None) or {}).get("text_s") or 0.0
        speed["load_s"] = round(max(0.0, speed["load_s"] - text_s), 3)  # the builder encoded the classes too
        speed["text_s"] = text_s
        runs.append(
            {
                **_run_info(shape, quant, spec),
                "metrics": metrics,
                "items": len(ranks),
                "failed": len(folder.paths) - len(ranks),
                "speed": speed,
                "summary": _summary(summary),
            }
        )
    _ = topk_accuracy  # the brute-force definition the stored ranks follow (tests compare both)
    return _report(
        "zeroshot", dataset, runs, images=len(folder.paths), classes=len(folder.names), templates=len(templates)
    )


# ----------------------------------------------------------------------------- CLIP retrieval


def retrieval_task(
    spec: ModelSpec, batch_size: int, max_pixels: int | None, notify: Callable[[str], None] | None
) -> EmbedImagesTask:
    """The images' task (the texts' one is derived from it: EmbedTextsTask), here or on a Ray actor."""
    from vlmcli.tasks.embed import EmbedImagesTask
    from vlmcli.tasks.models import open_model

    opened = open_model(spec, "clip", notify=notify)
    return _opened(EmbedImagesTask(opened.engine, batch_size, max_pixels, model_name=opened.name), opened)


def evaluate_retrieval(
    items: Sequence[CaptionItem], specs: Sequence[ModelSpec], settings: EvalSettings, dataset: str = ""
) -> dict[str, Any]:
    import numpy as np

    from vlmcli.metrics.retrieval import retrieval_scores
    from vlmcli.tasks.embed import EmbedTextsTask
    from vlmcli.tasks.npy import NpySink

    items = _unique_images(items, settings.notify)
    inputs = [it.image for it in items]
    texts = list(dict.fromkeys(c for it in items for c in it.captions))
    runs = []
    build = (settings.batch_size, settings.max_pixels, settings.notify)
    for i_spec, spec in enumerate(specs):
        with _model_task("eval-retrieval", retrieval_task, spec, build, settings) as (image_task, load_s):
            shape = _describe(image_task)
            text_task = _derive(image_task, EmbedTextsTask)
            out = settings.out
            if out is not None and len(specs) > 1:  # one .npy holds one model's rows
                out = out.with_name(f"{out.stem}.{i_spec}{out.suffix}")
            t0 = time.perf_counter()
            if out is not None:
                s1 = _run(image_task, inputs, NpySink(out), BatchOptions(redo=settings.redo), settings)
                image_s = time.perf_counter() - t0
                s2 = _run(text_task, texts, NpySink(out), BatchOptions(), settings)
                vectors, meta = _read_npy_records(out, shape.identity)
            else:
                mem = MemorySink()
                s1 = _run(image_task, inputs, mem, BatchOptions(), settings)
                image_s = time.perf_counter() - t0
                s2 = _run(text_task, texts, mem, BatchOptions(), settings)
                vectors, meta = None, mem.records
            wall = time.perf_counter() - t0
            quant = shape.identity.get("quant")
            speed = _speed(s1, wall, load_s, s1.done, [], image_task)
        image_vec: dict[str, Any] = {}
        text_vec: dict[str, Any] = {}
        for r in meta:
            if r.get("error"):
                continue
            v = vectors[int(r["row"])] if vectors is not None else r.get("embedding")
            if v is None:
                continue
            if r.get("kind") == "image" and r.get("path") is not None:
                image_vec[os.path.abspath(r["path"])] = v
            elif r.get("kind") == "text":
                text_vec[r.get("input")] = v
        good = [it for it in items if os.path.abspath(it.image) in image_vec]
        metrics: dict[str, Any] = {"image_to_text": None, "text_to_image": None, "images": 0, "texts": 0}
        if good:
            img = np.stack([image_vec[os.path.abspath(it.image)] for it in good])
            caps = [(k, c) for k, it in enumerate(good) for c in it.captions if c in text_vec]
            txt = np.stack([text_vec[c] for _, c in caps])
            scored = retrieval_scores(img, txt, [k for k, _ in caps])
            scored.pop("ranks")
            metrics = scored
        speed["image_s"] = round(image_s, 3)
        speed["texts_run"] = s2.done
        speed["texts_per_s"] = round(s2.done / (wall - image_s), 2) if s2.done and wall > image_s else None
        runs.append(
            {
                **_run_info(shape, quant, spec),
                "metrics": metrics,
                "items": len(good),
                "failed": len(items) - len(good),
                "speed": speed,
                "summary": _summary(s1 + s2),
            }
        )
    return _report("retrieval", dataset, runs, images=len(items), captions=sum(len(it.captions) for it in items))


def _read_npy_records(out: Path, identity: dict[str, Any]) -> tuple[Any, list[Record]]:
    import numpy as np

    meta_path = out.with_suffix(".jsonl")
    records = [r for r in read_jsonl(meta_path) if identity_matches(r, identity)] if meta_path.exists() else []
    vectors = np.load(out, mmap_mode="r") if out.exists() else np.zeros((0, 0), np.float32)
    return vectors, records
