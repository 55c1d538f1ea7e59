"""Retrieval Recall@K and zero-shot top-k accuracy, as the CLIP paper reports them.

Image-to-text: for each image, all texts are ranked by similarity; the image counts as found at K
if any of its own captions is among the first K. Text-to-image: for each caption, the images are
ranked; found at K if its image is among the first K. Recall@K is the fraction found (reported in
percent). The rank of an item is the number of candidates with a higher score, plus those with an
equal score that come earlier in the candidate order (a stable sort, best first): exact ties, which
real embeddings practically never have, go to the earlier candidate.

Top-k accuracy (zero-shot classification): an image is right at k if its class is among the k
classes with the highest scores, by the same ranking rule.

numpy is the only import; no model code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["ranks_of", "recall_at_k", "retrieval_scores", "topk_accuracy"]

DEFAULT_KS = (1, 5, 10)


def ranks_of(scores: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """0-based rank of candidate correct[i] in row i of scores (stable, best first)."""
    scores = np.asarray(scores, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.int64)
    rows = np.arange(scores.shape[0])
    target = scores[rows, correct][:, None]
    higher = (scores > target).sum(axis=1)
    cols = np.arange(scores.shape[1])[None, :]
    equal_before = ((scores == target) & (cols < correct[:, None])).sum(axis=1)
    return higher + equal_before


def recall_at_k(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("nothing to rank")
    return {f"R@{k}": float(100.0 * np.mean(ranks < k)) for k in ks}


def retrieval_scores(
    image_vectors: np.ndarray,
    text_vectors: np.ndarray,
    text_image: Sequence[int],
    ks: Sequence[int] = DEFAULT_KS,
    chunk: int = 1024,
) -> dict[str, Any]:
    """Recall@K both ways from L2-normalised embeddings; text_image[j] is the image of caption j.

    Every image needs at least one caption. Similarities are cosines (dot products), computed in
    float64 a block of rows at a time.
    """
    img = np.asarray(image_vectors, dtype=np.float64)
    txt = np.asarray(text_vectors, dtype=np.float64)
    owner = np.asarray(text_image, dtype=np.int64)
    n_img, n_txt = img.shape[0], txt.shape[0]
    if n_img == 0 or n_txt == 0:
        raise ValueError("retrieval needs images and captions")
    if owner.shape != (n_txt,) or owner.min() < 0 or owner.max() >= n_img:
        raise ValueError("every caption must belong to one of the images")
    captions_of: list[list[int]] = [[] for _ in range(n_img)]
    for j, i in enumerate(owner.tolist()):
        captions_of[i].append(j)
    if any(not c for c in captions_of):
        raise ValueError("every image needs at least one caption")

    t2i = np.empty(n_txt, dtype=np.int64)
    for s in range(0, n_txt, chunk):
        sims = txt[s : s + chunk] @ img.T
        t2i[s : s + chunk] = ranks_of(sims, owner[s : s + chunk])

    i2t = np.empty(n_img, dtype=np.int64)
    for s in range(0, n_img, chunk):
        sims = img[s : s + chunk] @ txt.T
        best = None
        # The best-ranked own caption: at most max(captions per image) passes.
        width = max(len(captions_of[i]) for i in range(s, min(n_img, s + chunk)))
        for m in range(width):
            idx = np.array([captions_of[i][min(m, len(captions_of[i]) - 1)] for i in range(s, min(n_img, s + chunk))])
            r = ranks_of(sims, idx)
            best = r if best is None else np.minimum(best, r)
        assert best is not None
        i2t[s : s + chunk] = best
    return {
        "image_to_text": recall_at_k(i2t, ks),
        "text_to_image": recall_at_k(t2i, ks),
        "images": n_img,
        "texts": n_txt,
        "ranks": {"image_to_text": i2t, "text_to_image": t2i},
    }


def topk_accuracy(scores: np.ndarray, labels: Sequence[int], ks: Sequence[int] = (1, 5)) -> dict[str, Any]:
    """Top-k accuracy in percent (k above the number of classes counts every image as right)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels_arr = np.asarray(labels, dtype=np.int64)
    if scores.shape[0] == 0:
        raise ValueError("no images to score")
    ranks = ranks_of(scores, labels_arr)
    out: dict[str, Any] = {f"top{k}": float(100.0 * np.mean(ranks < k)) for k in ks}
    out["images"] = int(scores.shape[0])
    out["ranks"] = ranks
    return out
