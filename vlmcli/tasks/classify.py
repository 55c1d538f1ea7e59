"""Zero-shot classification with CLIP: images against the user's own labels, no training.

Each label becomes one or more prompts ("a photo of a {}." by default); with several templates the
label's embedding is the mean of its L2-normalised prompt embeddings, renormalised (CLIP's prompt
ensembling). Scores are softmax(logit_scale * cosine) over the labels.

For streaming callers: `encode_labels` once per run, then `classify_pixels` per chunk of images that
`vlmcli.tasks.embed.prepare_image` has decoded (possibly in another thread); `classify_images` is the
convenience loop over paths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np

from vlmcli.engines.clip_tokenizer import ClipTokenizer
from vlmcli.errors import EXIT_USAGE, VlmError
from vlmcli.images import DEFAULT_MAX_PIXELS
from vlmcli.tasks.embed import (
    DEFAULT_IMAGE_BATCH,
    DEFAULT_TEXT_BATCH,
    ImageFailure,
    embed_pixels,
    embed_texts,
    iter_image_batches,
    l2_normalize,
)

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


@dataclass
class Classification:
    """One image's result: the top-k (label, probability), best first."""

    path: str
    labels: list[tuple[str, float]]


def parse_labels(text: str) -> list[str]:
    """"cat, dog,car" -> ["cat", "dog", "car"] (blank entries dropped)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def read_labels_file(path: str | os.PathLike[str]) -> list[str]:
    """One label per line; blank lines and lines starting with '#' are skipped."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise VlmError("no such labels file", p) from None
    except IsADirectoryError:
        raise VlmError("is a directory, not a labels file", p) from None
    except (OSError, UnicodeDecodeError) as e:
        raise VlmError(f"cannot read labels file ({e})", p) from None
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def unique_labels(labels: Iterable[str]) -> list[str]:
    """Labels in order with repeats dropped (a repeated label would split its probability)."""
    return list(dict.fromkeys(labels))


def check_templates(templates: Sequence[str] | None) -> list[str]:
    templates = list(templates) if templates else [DEFAULT_TEMPLATE]
    for t in templates:
        if LABEL_PLACEHOLDER not in t:
            raise VlmError(f"template {t!r} has no {LABEL_PLACEHOLDER} where the label goes", exit_code=EXIT_USAGE)
    return templates


def fill_template(template: str, label: str) -> str:
    # str.replace, not str.format: labels and templates may contain other braces.
    return template.replace(LABEL_PLACEHOLDER, label)


def encode_labels(
    model: "ClipModel",
    labels: Sequence[str],
    templates: Sequence[str] | None = None,
    batch_size: int = DEFAULT_TEXT_BATCH,
    tokenizer: ClipTokenizer | None = None,
) -> LabelEmbeddings:
    """Text embeddings of the labels (computed once per run), ensembled over the templates."""
    labels = list(labels)
    if not labels:
        raise VlmError("no labels given (use --labels \"cat,dog\" or --labels-file FILE)", exit_code=EXIT_USAGE)
    templates = check_templates(templates)
    prompts = [fill_template(t, label) for label in labels for t in templates]
    text = embed_texts(model, prompts, batch_size, tokenizer)
    per_label = text.vectors.reshape(len(labels), len(templates), -1).mean(axis=1)
    return LabelEmbeddings(
        labels=labels,
        templates=templates,
        vectors=l2_normalize(per_label),
        logit_scale=float(model.config.logit_scale),
        truncated_prompts=[p for p, cut in zip(prompts, text.truncated) if cut],
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


def classify_pixels(
    model: "ClipModel", pixels: np.ndarray, labels: LabelEmbeddings, k: int = 5
) -> list[list[tuple[str, float]]]:
    """A chunk of preprocessed images (N, 3, S, S) -> per image its top-k (label, probability)."""
    if len(pixels) == 0:
        return []
    return top_k(label_probabilities(embed_pixels(model, pixels), labels), labels.labels, k)


def classify_images(
    model: "ClipModel",
    paths: Iterable[str | os.PathLike[str]],
    labels: LabelEmbeddings,
    k: int = 5,
    batch_size: int = DEFAULT_IMAGE_BATCH,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Iterator[Classification | ImageFailure]:
    """Classify images in input order; a bad file yields an ImageFailure in its place."""
    for batch in iter_image_batches(paths, model.config, batch_size, max_pixels):
        results = classify_pixels(model, batch.pixels, labels, k)
        yield from batch.merge([Classification(p, r) for p, r in zip(batch.paths, results)])
