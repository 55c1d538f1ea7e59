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
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from vlmcli.errors import VlmError
from vlmcli.tasks.ask import AskTask
from vlmcli.tasks.caption import CaptionTask
from vlmcli.tasks.eval_data import CaptionItem, ImageFolder, VqaItem, read_json, read_jsonl_records
from vlmcli.tasks.resume import Record, identity_matches, record_abspath
from vlmcli.tasks.runner import BatchOptions, BatchSummary, Observer, run_batch
from vlmcli.tasks.sinks import JsonlSink, Sink, read_jsonl

if TYPE_CHECKING:
    from PIL import Image

    from vlmcli.engines.llama import Generation, GenerationOptions
    from vlmcli.tasks.models import ModelSpec, OpenedModel

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
            cpu = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5).stdout.strip() or cpu
        except (OSError, subprocess.SubprocessError):
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "system": f"{platform.system()} {platform.release()}",
            "python": platform.python_version()}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (every model of the run so far counts)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


def _speed(summary: BatchSummary, wall_s: float, load_s: float, items_run: int, records: list[Record]) -> dict[str, Any]:
    model_ms = [sum(v for k, v in (r.get("timings") or {}).items() if k.endswith("_ms") and k not in ("load_ms",)
                    and not k.endswith("per_s")) for r in records if not r.get("error")]
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
    return out


class MemorySink(Sink):
    """Records kept in memory (no --out)."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def write_batch(self, records: list[Record]) -> None:
        self.records += [dict(r) for r in records]


def _records_for(task: Any, inputs: Sequence[str], out: Path | None, memory: MemorySink | None) -> dict[str, Record]:
    """abspath -> this task's record for each input (the file's, which includes earlier runs')."""
    wanted = {os.path.abspath(p) for p in inputs}
    source = read_jsonl(out) if out is not None and out.exists() else (memory.records if memory else [])
    found: dict[str, Record] = {}
    for r in source:
        if identity_matches(r, task.identity):
            ap = record_abspath(r)
            if ap in wanted:
                found[ap] = r
    return found


def _sink(out: Path | None) -> tuple[Sink, MemorySink | None]:
    if out is None:
        mem = MemorySink()
        return mem, mem
    return JsonlSink(out), None


def _run_info(opened: OpenedModel, quant: Any, spec: ModelSpec) -> dict[str, Any]:
    info: dict[str, Any] = {"model": opened.name, "file": opened.path.name, "quant": quant, "n_gpu_layers": spec.n_gpu_layers}
    opts = getattr(opened.engine, "options", None)
    if opts is not None and hasattr(opts, "detail"):
        info["detail"] = opts.detail
        info["max_tiles"] = opts.max_tiles
    return info


def _open(spec: ModelSpec, kind: str, settings: EvalSettings) -> tuple[OpenedModel, float]:
    from vlmcli.tasks.models import open_model

    t0 = time.perf_counter()
    opened = open_model(spec, kind, notify=settings.notify)  # type: ignore[arg-type]
    return opened, time.perf_counter() - t0


def _report(name: str, dataset: str, runs: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"eval": name, "dataset": dataset, **extra, "machine": machine_info(), "runs": runs}


# ----------------------------------------------------------------------------- best-of N


def _vlm_runs(specs: Sequence[ModelSpec], settings: EvalSettings) -> Any:
    """(spec, N, opened model, load seconds) per row: each model opened once, for the largest N."""
    for spec in specs:
        opened, load_s = _open(replace(spec, n_sequences=max(settings.best_of)), "vlm", settings)
        try:
            for i, n_best in enumerate(settings.best_of):
                yield spec, n_best, opened, load_s if i == 0 else 0.0
        finally:
            opened.close()


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
            out.append({"model": model, "quant": quant, "detail": detail, "max_tiles": max_tiles, "metric": metric,
                        "points": points, "q_inf": round(fit.q_inf, 4), "a": round(fit.a, 4),
                        "gamma": round(fit.gamma, 4), "rmse": round(fit.rmse, 5)})
    return out


# ----------------------------------------------------------------------------- VQA


def vqa_prompt(question: str, suffix: str) -> str:
    return f"{question}\n{suffix}" if suffix else question


class VqaTask(AskTask):
    """Every question about one image, from one encoding; answers carry question_id and accuracy."""

    name = "eval-vqa"

    def __init__(self, engine: Any, questions: dict[str, list[VqaItem]], suffix: str, generation: GenerationOptions,
                 max_pixels: int | None, n_best: int = 1, select: str = "logprob"):
        self.suffix = suffix
        self.questions = questions  # input path -> its questions
        self.answered = 0  # questions answered by the model in this process (for the speed report)
        super().__init__(engine, ["(the image's questions)"], generation, max_pixels, n_best, select)

    def _inputs(self) -> dict[str, Any]:
        return {"prompt_suffix": self.suffix}

    def prepare(self, path: str) -> tuple[str, Image.Image]:
        return path, super().prepare(path)

    def run(self, prepared: list[tuple[str, Image.Image]]) -> list[Record | VlmError]:  # type: ignore[override]
        from vlmcli.metrics.vqa import vqa_accuracy

        out: list[Record | VlmError] = []
        for path, image in prepared:
            qs = self.questions[path]
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


def _stale_vqa_inputs(task: VqaTask, inputs: list[str], out: Path) -> list[str]:
    """Images whose earlier record lacks some of this run's questions (the subset changed): redone."""
    if not out.exists():
        return []
    answered: dict[str, set[str]] = {}
    for r in read_jsonl(out):
        if identity_matches(r, task.identity) and not r.get("error"):
            ap = record_abspath(r)
            if ap is not None:
                answered[ap] = {str(a.get("question_id")) for a in r.get("answers") or []}
    stale = []
    for p in inputs:
        have = answered.get(os.path.abspath(p))
        if have is not None and not {q.question_id for q in task.questions[p]} <= have:
            stale.append(p)
    return stale


def _vqa_metrics(items: Sequence[VqaItem], answers: dict[str, str]) -> dict[str, Any]:
    from vlmcli.metrics.vqa import score_vqa

    scored = [(answers[q.question_id], q.answers, q.answer_type, q.question_type) for q in items if q.question_id in answers]
    if not scored:
        return {"accuracy": None, "questions": 0}
    return score_vqa(scored).to_dict()


def evaluate_vqa(items: Sequence[VqaItem], specs: Sequence[ModelSpec], settings: EvalSettings, dataset: str = "") -> dict[str, Any]:
    from vlmcli.engines.llama import GenerationOptions

    by_path: OrderedDict[str, list[VqaItem]] = OrderedDict()
    for q in items:
        by_path.setdefault(q.image, []).append(q)
    inputs = list(by_path)
    suffix = DEFAULT_VQA_SUFFIX if settings.prompt is None else settings.prompt
    gen = settings.generation or GenerationOptions(max_tokens=DEFAULT_VQA_MAX_TOKENS)
    runs = []
    for spec, n_best, opened, load_s in _vlm_runs(specs, settings):
        task = VqaTask(opened.engine, by_path, suffix, _sampling(gen, n_best), settings.max_pixels, n_best, settings.select)
        t0 = time.perf_counter()
        summary = BatchSummary()
        if settings.out is not None and not settings.redo:
            stale = _stale_vqa_inputs(task, inputs, settings.out)
            if stale:
                summary = run_batch(task, stale, JsonlSink(settings.out), BatchOptions(redo=True), settings.observer_factory())
        sink, memory = _sink(settings.out)
        summary = summary + run_batch(task, inputs, sink, BatchOptions(redo=settings.redo), settings.observer_factory())
        wall = time.perf_counter() - t0
        records = _records_for(task, inputs, settings.out, memory)
        quant = task.identity.get("quant")
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
        questions_run = task.answered
        speed = _speed(summary, wall, load_s, questions_run, list(records.values()))
        speed["ttft_s"] = round(sum(ttft) / len(ttft) / 1000, 4) if ttft else None
        runs.append({
            **_run_info(opened, quant, spec), "best_of": n_best,
            "metrics": _vqa_metrics(items, answers),
            "items": len(items) - len(failed), "failed": len(failed), "images": len(inputs), "failed_images": failed_images,
            "speed": speed,
            "summary": _summary(summary),
        })
    return _report("vqa", dataset, runs, questions=len(items), images=len(inputs), prompt_suffix=suffix,
                   scaling=_scaling(runs, "accuracy"))


def _summary(summary: BatchSummary) -> dict[str, Any]:
    return {"done": summary.done, "skipped": summary.skipped, "failed": summary.failed, "interrupted": summary.interrupted,
            "errors": [{"path": p, "error": e.message} for p, e in summary.errors]}


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
    run = {"model": None, "predictions": str(predictions), "metrics": _vqa_metrics(items, answers),
           "items": len(items) - missing, "failed": missing}
    return _report("vqa", dataset, [run], questions=len(items))


# ----------------------------------------------------------------------------- captions


def _caption_metrics(items: Sequence[CaptionItem], captions: dict[str, str]) -> tuple[dict[str, Any], list[dict[str, float]]]:
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


def evaluate_captions(items: Sequence[CaptionItem], specs: Sequence[ModelSpec], settings: EvalSettings, dataset: str = "") -> dict[str, Any]:
    from vlmcli.engines.llama import GenerationOptions

    items = _unique_images(items, settings.notify)
    inputs = [it.image for it in items]
    prompt = settings.prompt or DEFAULT_EVAL_CAPTION_PROMPT
    gen = settings.generation or GenerationOptions(max_tokens=DEFAULT_EVAL_CAPTION_MAX_TOKENS)
    runs = []
    for spec, n_best, opened, load_s in _vlm_runs(specs, settings):
        task = CaptionTask(opened.engine, _sampling(gen, n_best), prompt, settings.max_pixels, n_best, settings.select)
        sink, memory = _sink(settings.out)
        t0 = time.perf_counter()
        summary = run_batch(task, inputs, sink, BatchOptions(redo=settings.redo), settings.observer_factory())
        wall = time.perf_counter() - t0
        records = _records_for(task, inputs, settings.out, memory)
        quant = task.identity.get("quant")
        captions: dict[str, str] = {}
        ttft = []
        for it in items:
            r = records.get(os.path.abspath(it.image))
            if r and not r.get("error"):
                captions[it.image_id] = str(r.get("caption", ""))
                t = r.get("timings") or {}
                ttft.append(float(t.get("image_encode_ms", 0.0)) + float(t.get("prefill_ms", 0.0)))
        metrics, _ = _caption_metrics(items, captions)
        speed = _speed(summary, wall, load_s, summary.done, list(records.values()))
        speed["ttft_s"] = round(sum(ttft) / len(ttft) / 1000, 4) if ttft else None
        runs.append({**_run_info(opened, quant, spec), "best_of": n_best, "metrics": metrics, "items": len(captions),
                     "failed": len(items) - len(captions), "speed": speed, "summary": _summary(summary)})
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
    run = {"model": None, "predictions": str(predictions), "metrics": metrics, "items": len([i for i in items if i.image_id in captions]),
           "failed": len([i for i in items if i.image_id not in captions])}
    return _report("caption", dataset, [run], images=len(items))


# ----------------------------------------------------------------------------- CLIP zero-shot


def _digest(values: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(values), ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def evaluate_zeroshot(folder: ImageFolder, specs: Sequence[ModelSpec], settings: EvalSettings, dataset: str = "") -> dict[str, Any]:
    import numpy as np

    from vlmcli.metrics.retrieval import topk_accuracy
    from vlmcli.tasks.classify import ClassifyTask, check_templates, encode_labels, label_probabilities

    templates = check_templates(settings.templates)
    label_of = {os.path.abspath(p): k for p, k in zip(folder.paths, folder.labels)}
    top_k = min(5, len(folder.names))

    class ZeroShotTask(ClassifyTask):
        name = "eval-zeroshot"

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            # Digests, not the lists: ImageNet's 1000 names x 80 templates in every record would be 40 kB each.
            self.identity["candidates"] = {"count": len(folder.names), "sha256": _digest(folder.names)}
            self.identity["options"] = {"templates": {"count": len(templates), "sha256": _digest(templates)}, "top_k": top_k}

        def run(self, prepared: list[Any]) -> list[Record | VlmError]:
            from vlmcli.tasks.embed import embed_pixels

            t0 = time.perf_counter()
            probs = label_probabilities(embed_pixels(self.model, np.stack(prepared)), self.labels)
            order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
            per_image = round((time.perf_counter() - t0) * 1000 / len(prepared), 2)
            return [{"classes": [int(j) for j in row], "labels": [{"label": self.labels.labels[j], "score": float(p[j])} for j in row],
                     "timings": {"model_ms": per_image}} for p, row in zip(probs, order)]

    runs = []
    for spec in specs:
        opened, load_s = _open(spec, "clip", settings)
        with opened:
            t0 = time.perf_counter()
            label_set = encode_labels(opened.engine, folder.names, templates)
            text_s = time.perf_counter() - t0
            task = ZeroShotTask(opened.engine, label_set, top_k, batch_size=settings.batch_size,
                                max_pixels=settings.max_pixels, model_name=opened.name)
            sink, memory = _sink(settings.out)
            t0 = time.perf_counter()
            summary = run_batch(task, folder.paths, sink, BatchOptions(redo=settings.redo), settings.observer_factory())
            wall = time.perf_counter() - t0
            records = _records_for(task, folder.paths, settings.out, memory)
            quant = task.identity.get("quant")
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
            metrics = {"top1": float(100.0 * np.mean(arr < 1)), "top5": float(100.0 * np.mean(arr < 5)), "images": len(ranks)}
        speed = _speed(summary, wall, load_s, summary.done, list(records.values()))
        speed["text_s"] = round(text_s, 3)
        runs.append({**_run_info(opened, quant, spec), "metrics": metrics, "items": len(ranks), "failed": len(folder.paths) - len(ranks),
                     "speed": speed, "summary": _summary(summary)})
    _ = topk_accuracy  # the brute-force definition the stored ranks follow (tests compare both)
    return _report("zeroshot", dataset, runs, images=len(folder.paths), classes=len(folder.names), templates=len(templates))


# ----------------------------------------------------------------------------- CLIP retrieval


def evaluate_retrieval(items: Sequence[CaptionItem], specs: Sequence[ModelSpec], settings: EvalSettings, dataset: str = "") -> dict[str, Any]:
    import numpy as np

    from vlmcli.metrics.retrieval import retrieval_scores
    from vlmcli.tasks.embed import EmbedImagesTask, EmbedTextsTask
    from vlmcli.tasks.npy import NpySink

    items = _unique_images(items, settings.notify)
    inputs = [it.image for it in items]
    texts = list(dict.fromkeys(c for it in items for c in it.captions))
    runs = []
    for i_spec, spec in enumerate(specs):
        opened, load_s = _open(spec, "clip", settings)
        with opened:
            image_task = EmbedImagesTask(opened.engine, settings.batch_size, settings.max_pixels, model_name=opened.name)
            text_task = EmbedTextsTask(image_task)
            out = settings.out
            if out is not None and len(specs) > 1:  # one .npy holds one model's rows
                out = out.with_name(f"{out.stem}.{i_spec}{out.suffix}")
            t0 = time.perf_counter()
            if out is not None:
                s1 = run_batch(image_task, inputs, NpySink(out), BatchOptions(redo=settings.redo), settings.observer_factory())
                image_s = time.perf_counter() - t0
                s2 = run_batch(text_task, texts, NpySink(out), BatchOptions(), settings.observer_factory())
                vectors, meta = _read_npy_records(out, image_task.identity)
            else:
                mem = MemorySink()
                s1 = run_batch(image_task, inputs, mem, BatchOptions(), settings.observer_factory())
                image_s = time.perf_counter() - t0
                s2 = run_batch(text_task, texts, mem, BatchOptions(), settings.observer_factory())
                vectors, meta = None, mem.records
            wall = time.perf_counter() - t0
            quant = image_task.identity.get("quant")
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
        speed = _speed(s1, wall, load_s, s1.done, [])
        speed["image_s"] = round(image_s, 3)
        speed["texts_run"] = s2.done
        speed["texts_per_s"] = round(s2.done / (wall - image_s), 2) if s2.done and wall > image_s else None
        runs.append({**_run_info(opened, quant, spec), "metrics": metrics, "items": len(good), "failed": len(items) - len(good),
                     "speed": speed, "summary": _summary(s1 + s2)})
    return _report("retrieval", dataset, runs, images=len(items), captions=sum(len(it.captions) for it in items))


def _read_npy_records(out: Path, identity: dict[str, Any]) -> tuple[Any, list[Record]]:
    import numpy as np

    meta_path = out.with_suffix(".jsonl")
    records = [r for r in read_jsonl(meta_path) if identity_matches(r, identity)] if meta_path.exists() else []
    vectors = np.load(out, mmap_mode="r") if out.exists() else np.zeros((0, 0), np.float32)
    return vectors, records
