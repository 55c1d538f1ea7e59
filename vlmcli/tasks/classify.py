"""`classify`: CLIP zero-shot classification, images against the user's own labels, no training.

Each label becomes one or more prompts ("a photo of a {}." by default); with several templates the
label's embedding is the mean of its L2-normalised prompt embeddings, renormalised (CLIP's prompt
ensembling). Scores are softmax(logit_scale * cosine) over the labels. The labels are encoded once
per run (`encode_labels`); records carry the top-k labels with their scores.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vlmcli.errors import InvalidOption, VlmError
from vlmcli.files import read_lines
from vlmcli.tasks.embed import DEFAULT_TEXT_BATCH, ClipImagesTask, embed_pixels, embed_texts, l2_normalize
from vlmcli.tasks.resume import Record

if TYPE_CHECKING:
    from vlmcli.engines.clip import ClipModel

DEFAULT_TEMPLATE = "a photo of a {}."
LABEL_PLACEHOLDER = "{}"


@dataclass
class LabelEmbeddings:
    """The text side of a classifier: one L2-normalised row per label."""

    labels: list[str]
    templates: list[str]
    vectors: np.ndarray  # (L, D) float32
    logit_scale: float  # exp()-ed (about 100 for trained CLIPs)
    truncated_prompts: list[str]  # prompts cut to the context length


def parse_labels(text: str) -> list[str]:
    """ "cat, dog,car" -> ["cat", "dog", "car"] (blank entries dropped)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def read_labels_file(path: str | os.PathLike[str]) -> list[str]:
    """One label per line; blank lines and lines starting with '#' are skipped."""
    return read_lines(path, "labels")


def unique_labels(labels: Iterable[str]) -> list[str]:
    """Labels in order with repeats dropped (a repeated label would split its probability)."""
    return list(dict.fromkeys(labels))


def check_templates(templates: Sequence[str] | None) -> list[str]:
    templates = list(templates) if templates else [DEFAULT_TEMPLATE]
    for t in templates:
        if LABEL_PLACEHOLDER not in t:
            raise InvalidOption("templates", f"template {t!r} has no {LABEL_PLACEHOLDER} where the label goes")
    return templates


def fill_template(template: str, label: str) -> str:
    # str.replace, not str.format: labels and templates may contain other braces.
    return template.replace(LABEL_PLACEHOLDER, label)


def encode_labels(
    model: ClipModel,
    labels: Sequence[str],
    templates: Sequence[str] | None = None,
    batch_size: int = DEFAULT_TEXT_BATCH,
) -> LabelEmbeddings:
    """Text embeddings of the labels (computed once per run), ensembled over the templates."""
    labels = list(labels)
    if not labels:
        raise InvalidOption("labels", "no labels given")
    templates = check_templates(templates)
    prompts = [fill_template(t, label) for label in labels for t in templates]
    vectors, truncated = embed_texts(model, prompts, batch_size)
    per_label = vectors.reshape(len(labels), len(templates), -1).mean(axis=1)
    return LabelEmbeddings(
        labels=labels,
        templates=templates,
        vectors=l2_normalize(per_label),
        logit_scale=float(model.config.logit_scale),
        truncated_prompts=[p for p, cut in zip(prompts, truncated) if cut],
    )


def label_probabilities(image_vectors: np.ndarray, labels: LabelEmbeddings) -> np.ndarray:
    """(N, D) L2-normalised image embeddings -> (N, L) softmax(logit_scale * cosine) probabilities."""
    logits = labels.logit_scale * (image_vectors.astype(np.float64) @ labels.vectors.T.astype(np.float64))
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def top_k(probabilities: np.ndarray, labels: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    """Per row, the k best (label, probability), best first (ties keep the label order)."""
    k = max(1, min(k, len(labels)))
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [[(labels[j], float(row[j])) for j in idx] for row, idx in zip(probabilities, order)]


class ClassifyTask(ClipImagesTask):
    """Records carry "label" and "score" (the best) and "labels": the top-k [{label, score}]."""

    name = "classify"

    def __init__(self, model: ClipModel, labels: LabelEmbeddings, top_k: int = 5, **kwargs: Any):
        super().__init__(model, **kwargs)
        self.labels = labels
        self.top_k = top_k
        self.identity["candidates"] = list(labels.labels)
        self.identity["options"] = {"templates": list(labels.templates), "top_k": top_k}

    def run(self, prepared: list[np.ndarray]) -> list[Record | VlmError]:
        t0 = time.perf_counter()
        probabilities = label_probabilities(embed_pixels(self.model, np.stack(prepared)), self.labels)
        tops = top_k(probabilities, self.labels.labels, self.top_k)
        per_image = round((time.perf_counter() - t0) * 1000 / len(prepared), 2)
        return [
            {
                "label": top[0][0],
                "score": top[0][1],
                "labels": [{"label": lab, "score": p} for lab, p in top],
                "timings": {"model_ms": per_image},
            }
            for top in tops
        ]


def classify_csv_row(record: Record) -> dict[str, Any]:
    top = record.get("labels") or []
    return {
        "label": record.get("label", ""),
        "score": record.get("score", ""),
        "top": "; ".join(f"{t['label']}={float(t['score']):.4f}" for t in top),
    }
