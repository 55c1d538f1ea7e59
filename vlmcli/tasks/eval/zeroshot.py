"""CLIP zero-shot classification over an ImageFolder tree: ClassifyTask over the dataset's class
names x templates (ZeroShotTask), top-1 / top-5 accuracy."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from vlmcli.errors import VlmError
from vlmcli.tasks.classify import ClassifyTask
from vlmcli.tasks.eval.data import ImageFolder
from vlmcli.tasks.eval.records import open_sink, records_for
from vlmcli.tasks.eval.report import report, speed, summary_fields
from vlmcli.tasks.eval.runs import EvalSettings, model_info, model_runs, row_info
from vlmcli.tasks.resume import Record
from vlmcli.tasks.runner import BatchOptions

if TYPE_CHECKING:
    import numpy as np

    from vlmcli.engines.clip import ClipModel
    from vlmcli.tasks.classify import LabelEmbeddings
    from vlmcli.tasks.models import ModelSpec


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

    def run(self, prepared: list[np.ndarray]) -> list[Record | VlmError]:
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
    task.run_info = {**model_info(opened), "text_s": round(text_s, 3)}
    return task


def evaluate_zeroshot(
    folder: ImageFolder, specs: Sequence[ModelSpec], settings: EvalSettings, dataset: str = ""
) -> dict[str, Any]:
    import numpy as np

    from vlmcli.tasks.classify import check_templates

    templates = check_templates(settings.templates)
    label_of = {os.path.abspath(p): k for p, k in zip(folder.paths, folder.labels)}
    top_k = min(5, len(folder.names))

    runs = []
    build = (list(folder.names), templates, top_k, settings.batch_size, settings.max_pixels, settings.notify)
    for spec, executor, load_s in model_runs("eval-zeroshot", zeroshot_task, build, specs, settings):
        shape = executor.shape()
        sink, memory = open_sink(settings.out)
        t0 = time.perf_counter()
        summary = settings.run(executor, folder.paths, sink, BatchOptions(redo=settings.redo))
        wall = time.perf_counter() - t0
        records = records_for(shape.identity, folder.paths, settings.out, memory)
        run_speed = speed(summary, wall, load_s, summary.done, list(records.values()), executor.workers)
        ranks = []
        for p in folder.paths:
            r = records.get(os.path.abspath(p))
            if r and not r.get("error"):
                classes = list(r.get("classes") or [])
                k = label_of[os.path.abspath(p)]
                ranks.append(classes.index(k) if k in classes else top_k)
        metrics: dict[str, Any] = {"top1": None, "top5": None, "images": 0}
        if ranks:
            # top-k from the stored ranks (records keep the top 5): what metrics.retrieval.topk_accuracy
            # gives on the full scores (the tests compare both).
            arr = np.asarray(ranks)
            metrics = {
                "top1": float(100.0 * np.mean(arr < 1)),
                "top5": float(100.0 * np.mean(arr < 5)),
                "images": len(ranks),
            }
        text_s = (shape.run_info or {}).get("text_s") or 0.0
        run_speed["load_s"] = round(max(0.0, run_speed["load_s"] - text_s), 3)  # the builder encoded the classes too
        run_speed["text_s"] = text_s
        runs.append(
            {
                **row_info(shape, spec),
                "metrics": metrics,
                "items": len(ranks),
                "failed": len(folder.paths) - len(ranks),
                "speed": run_speed,
                "summary": summary_fields(summary),
            }
        )
    return report(
        "zeroshot", dataset, runs, images=len(folder.paths), classes=len(folder.names), templates=len(templates)
    )
