"""CLIP image-to-text and text-to-image retrieval: EmbedImagesTask, then EmbedTextsTask over the same
model, Recall@1/5/10 both ways as in the CLIP paper."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmcli.tasks.embed import EmbedImagesTask, EmbedTextsTask
from vlmcli.tasks.eval.captions import unique_images
from vlmcli.tasks.eval.data import CaptionItem
from vlmcli.tasks.eval.records import MemorySink
from vlmcli.tasks.eval.report import report, speed, summary_fields
from vlmcli.tasks.eval.runs import EvalSettings, model_info, model_runs, row_info
from vlmcli.tasks.resume import Record, identity_matches
from vlmcli.tasks.runner import BatchOptions
from vlmcli.tasks.sinks import read_jsonl

if TYPE_CHECKING:
    import numpy as np

    from vlmcli.tasks.models import ModelSpec


def retrieval_task(
    spec: ModelSpec, batch_size: int, max_pixels: int | None, notify: Callable[[str], None] | None
) -> EmbedImagesTask:
    """The images' task (the texts' one is derived from it: EmbedTextsTask), here or on a Ray actor."""
    from vlmcli.tasks.models import open_model

    opened = open_model(spec, "clip", notify=notify)
    task = EmbedImagesTask(opened.engine, batch_size, max_pixels, model_name=opened.name)
    task.run_info = model_info(opened)
    return task


def evaluate_retrieval(
    items: Sequence[CaptionItem], specs: Sequence[ModelSpec], settings: EvalSettings, dataset: str = ""
) -> dict[str, Any]:
    import numpy as np

    from vlmcli.metrics.retrieval import retrieval_scores
    from vlmcli.tasks.npy import NpySink

    items = unique_images(items, settings.notify)
    inputs = [it.image for it in items]
    texts = list(dict.fromkeys(c for it in items for c in it.captions))
    runs = []
    build = (settings.batch_size, settings.max_pixels, settings.notify)
    for i_spec, (spec, image_executor, load_s) in enumerate(
        model_runs("eval-retrieval", retrieval_task, build, specs, settings)
    ):
        shape = image_executor.shape()
        text_executor = image_executor.derive(EmbedTextsTask)
        out = settings.out
        if out is not None and len(specs) > 1:  # one .npy holds one model's rows
            out = out.with_name(f"{out.stem}.{i_spec}{out.suffix}")
        t0 = time.perf_counter()
        vectors: np.ndarray | None
        if out is not None:
            s1 = settings.run(image_executor, inputs, NpySink(out), BatchOptions(redo=settings.redo))
            image_s = time.perf_counter() - t0
            s2 = settings.run(text_executor, texts, NpySink(out), BatchOptions())
            vectors, meta = _read_npy_records(out, shape.identity)
        else:
            mem = MemorySink()
            s1 = settings.run(image_executor, inputs, mem, BatchOptions())
            image_s = time.perf_counter() - t0
            s2 = settings.run(text_executor, texts, mem, BatchOptions())
            vectors, meta = None, mem.records
        wall = time.perf_counter() - t0
        run_speed = speed(s1, wall, load_s, s1.done, [], image_executor.workers)
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
                text_vec[str(r.get("input"))] = v
        good = [it for it in items if os.path.abspath(it.image) in image_vec]
        metrics: dict[str, Any] = {"image_to_text": None, "text_to_image": None, "images": 0, "texts": 0}
        if good:
            img = np.stack([image_vec[os.path.abspath(it.image)] for it in good])
            caps = [(k, c) for k, it in enumerate(good) for c in it.captions if c in text_vec]
            txt = np.stack([text_vec[c] for _, c in caps])
            scored = retrieval_scores(img, txt, [k for k, _ in caps])
            scored.pop("ranks")
            metrics = scored
        run_speed["image_s"] = round(image_s, 3)
        run_speed["texts_run"] = s2.done
        run_speed["texts_per_s"] = round(s2.done / (wall - image_s), 2) if s2.done and wall > image_s else None
        runs.append(
            {
                **row_info(shape, spec),
                "metrics": metrics,
                "items": len(good),
                "failed": len(items) - len(good),
                "speed": run_speed,
                "summary": summary_fields(s1 + s2),
            }
        )
    return report("retrieval", dataset, runs, images=len(items), captions=sum(len(it.captions) for it in items))


def _read_npy_records(out: Path, identity: dict[str, Any]) -> tuple[np.ndarray, list[Record]]:
    import numpy as np

    meta_path = out.with_suffix(".jsonl")
    records = [r for r in read_jsonl(meta_path) if identity_matches(r, identity)] if meta_path.exists() else []
    vectors = np.load(out, mmap_mode="r") if out.exists() else np.zeros((0, 0), np.float32)
    return vectors, records
