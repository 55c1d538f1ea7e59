"""VQAv2 accuracy: every question of an image answered from one encoding (VqaTask), scored exactly
as the official evaluation does; or an existing predictions file scored without a model."""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmcli.errors import VlmError
from vlmcli.tasks.ask import VlmTask
from vlmcli.tasks.eval.data import VqaItem
from vlmcli.tasks.eval.records import CountingSink, open_sink, read_predictions, records_for
from vlmcli.tasks.eval.report import report, scaling, speed, summary_fields
from vlmcli.tasks.eval.runs import EvalSettings, best_of_runs, model_info, row_info, sampling
from vlmcli.tasks.resume import Record, identity_matches, record_abspath
from vlmcli.tasks.runner import BatchOptions, BatchSummary
from vlmcli.tasks.sinks import JsonlSink, read_jsonl

if TYPE_CHECKING:
    from PIL import Image

    from vlmcli.engines.llama import GenerationOptions, VlmEngine
    from vlmcli.tasks.models import ModelSpec

DEFAULT_VQA_SUFFIX = "Answer the question using a single word or phrase."
DEFAULT_VQA_MAX_TOKENS = 16


def vqa_prompt(question: str, suffix: str) -> str:
    return f"{question}\n{suffix}" if suffix else question


class VqaTask(VlmTask):
    """Every question about one image, from one encoding; answers carry question_id and accuracy."""

    name = "eval-vqa"

    def __init__(
        self,
        engine: VlmEngine,
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
        super().__init__(engine, ["(the image's questions)"], generation, max_pixels, n_best, select)

    def _inputs(self) -> dict[str, Any]:
        return {"prompt_suffix": self.suffix}

    def prepare(self, path: str) -> tuple[str, Image.Image]:
        return path, self.load(path)

    def prepare_from(self, path: str, source: str) -> tuple[str, Image.Image]:
        """Ray with --ray-ship-files: the image's bytes in a copy at `source`, its questions by `path`."""
        return path, self.load(source)

    def run(self, prepared: list[tuple[str, Image.Image]]) -> list[Record | VlmError]:
        from vlmcli.metrics.vqa import vqa_accuracy

        out: list[Record | VlmError] = []
        for path, image in prepared:
            qs = self.questions[os.path.abspath(path)]
            self.prompts = [vqa_prompt(q.question, self.suffix) for q in qs]
            try:
                answers = self.generate(image)
                rec = self.record(answers)
            except VlmError as e:
                out.append(e)
                continue
            for q, a, answer in zip(qs, rec["answers"], answers):
                t = answer.generation.timings
                a["question_id"] = q.question_id
                a["question"] = q.question
                a["ttft_ms"] = round(t.image_encode_ms + t.prefill_ms, 2)
                a["accuracy"] = round(vqa_accuracy(a["answer"], q.answers), 4)
            out.append(rec)
        return out


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
    """The model opened and the task built: here, or on each Ray actor (module-level: actors import it by name)."""
    from vlmcli.tasks.models import open_model

    opened = open_model(spec, "vlm", notify=notify)
    task = VqaTask(opened.engine, questions, suffix, sampling(generation, n_best), max_pixels, n_best, select)
    task.run_info = model_info(opened)
    return task


def _stale_inputs(identity: dict[str, Any], by_path: dict[str, list[VqaItem]], out: Path) -> list[str]:
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


def _metrics(items: Sequence[VqaItem], answers: dict[str, str]) -> dict[str, Any]:
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
    for spec, n_best, executor, load_s in best_of_runs("eval-vqa", vqa_task, build, specs, settings):
        shape = executor.shape()
        t0 = time.perf_counter()
        summary = BatchSummary()
        questions_run = 0
        if settings.out is not None and not settings.redo:
            stale = _stale_inputs(shape.identity, by_path, settings.out)
            if stale:
                counted = CountingSink(JsonlSink(settings.out))
                summary = settings.run(executor, stale, counted, BatchOptions(redo=True))
                questions_run += counted.answers
        sink, memory = open_sink(settings.out)
        counted = CountingSink(sink)
        summary = summary + settings.run(executor, inputs, counted, BatchOptions(redo=settings.redo))
        questions_run += counted.answers
        wall = time.perf_counter() - t0
        records = records_for(shape.identity, inputs, settings.out, memory)
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
        run_speed = speed(summary, wall, load_s, questions_run, list(records.values()), executor.workers)
        run_speed["ttft_s"] = round(sum(ttft) / len(ttft) / 1000, 4) if ttft else None
        runs.append(
            {
                **row_info(shape, spec),
                "best_of": n_best,
                "metrics": _metrics(items, answers),
                "items": len(items) - len(failed),
                "failed": len(failed),
                "images": len(inputs),
                "failed_images": failed_images,
                "speed": run_speed,
                "summary": summary_fields(summary),
            }
        )
    return report(
        "vqa",
        dataset,
        runs,
        questions=len(items),
        images=len(inputs),
        prompt_suffix=suffix,
        scaling=scaling(runs, "accuracy"),
    )


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
        "metrics": _metrics(items, answers),
        "items": len(items) - missing,
        "failed": missing,
    }
    return report("vqa", dataset, [run], questions=len(items))
