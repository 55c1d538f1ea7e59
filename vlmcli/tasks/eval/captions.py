"""COCO-style captioning: CaptionTask per image, CIDEr-D / BLEU-1..4 / ROUGE-L as pycocoevalcap
computes them; or an existing predictions file scored without a model."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmcli.errors import VlmError
from vlmcli.tasks.caption import CaptionTask
from vlmcli.tasks.eval.data import CaptionItem
from vlmcli.tasks.eval.records import open_sink, read_predictions, records_for
from vlmcli.tasks.eval.report import report, scaling, speed, summary_fields
from vlmcli.tasks.eval.runs import EvalSettings, best_of_runs, model_info, row_info, sampling
from vlmcli.tasks.runner import BatchOptions

if TYPE_CHECKING:
    from vlmcli.engines.llama import GenerationOptions
    from vlmcli.tasks.models import ModelSpec

DEFAULT_EVAL_CAPTION_PROMPT = "Describe this image in one sentence."
DEFAULT_EVAL_CAPTION_MAX_TOKENS = 48


def caption_metrics(
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


def unique_images(items: Sequence[CaptionItem], notify: Callable[[str], None] | None) -> list[CaptionItem]:
    """One item per image, the captions of repeats merged into it."""
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
    """The model opened and the task built: here, or on each Ray actor (module-level: actors import it by name)."""
    from vlmcli.tasks.models import open_model

    opened = open_model(spec, "vlm", notify=notify)
    task = CaptionTask(opened.engine, sampling(generation, n_best), prompt, max_pixels, n_best, select)
    task.run_info = model_info(opened)
    return task


def evaluate_captions(
    items: Sequence[CaptionItem], specs: Sequence[ModelSpec], settings: EvalSettings, dataset: str = ""
) -> dict[str, Any]:
    from vlmcli.engines.llama import GenerationOptions

    items = unique_images(items, settings.notify)
    inputs = [it.image for it in items]
    prompt = settings.prompt or DEFAULT_EVAL_CAPTION_PROMPT
    gen = settings.generation or GenerationOptions(max_tokens=DEFAULT_EVAL_CAPTION_MAX_TOKENS)
    runs = []
    build = (gen, prompt, settings.max_pixels, settings.select, settings.notify)
    for spec, n_best, executor, load_s in best_of_runs("eval-caption", caption_task, build, specs, settings):
        shape = executor.shape()
        sink, memory = open_sink(settings.out)
        t0 = time.perf_counter()
        summary = settings.run(executor, inputs, sink, BatchOptions(redo=settings.redo))
        wall = time.perf_counter() - t0
        records = records_for(shape.identity, inputs, settings.out, memory)
        captions: dict[str, str] = {}
        ttft = []
        for it in items:
            r = records.get(os.path.abspath(it.image))
            if r and not r.get("error"):
                captions[it.image_id] = str(r.get("caption", ""))
                t = r.get("timings") or {}
                ttft.append(float(t.get("image_encode_ms", 0.0)) + float(t.get("prefill_ms", 0.0)))
        metrics, _ = caption_metrics(items, captions)
        run_speed = speed(summary, wall, load_s, summary.done, list(records.values()), executor.workers)
        run_speed["ttft_s"] = round(sum(ttft) / len(ttft) / 1000, 4) if ttft else None
        runs.append(
            {
                **row_info(shape, spec),
                "best_of": n_best,
                "metrics": metrics,
                "items": len(captions),
                "failed": len(items) - len(captions),
                "speed": run_speed,
                "summary": summary_fields(summary),
            }
        )
    return report("caption", dataset, runs, images=len(items), prompt=prompt, scaling=scaling(runs, "CIDEr-D"))


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
    metrics, _ = caption_metrics(items, captions)
    run = {
        "model": None,
        "predictions": str(predictions),
        "metrics": metrics,
        "items": len([i for i in items if i.image_id in captions]),
        "failed": len([i for i in items if i.image_id not in captions]),
    }
    return report("caption", dataset, [run], images=len(items))
