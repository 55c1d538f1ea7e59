"""Recall@K and top-k accuracy against a brute-force computation of the CLIP paper's definitions."""

from __future__ import annotations

import numpy as np
import pytest

from vlmcli.metrics.retrieval import ranks_of, recall_at_k, retrieval_scores, topk_accuracy


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_force(img: np.ndarray, txt: np.ndarray, owner: list[int], ks=(1, 5, 10)) -> dict:
    sims = img @ txt.T
    i2t, t2i = [], []
    for i in range(len(img)):
        order = sorted(range(len(txt)), key=lambda j: (-sims[i, j], j))  # best first, ties by index
        i2t.append(min(order.index(j) for j in range(len(txt)) if owner[j] == i))
    for j in range(len(txt)):
        order = sorted(range(len(img)), key=lambda i: (-sims[i, j], i))
        t2i.append(order.index(owner[j]))
    return {
        "image_to_text": {f"R@{k}": 100.0 * np.mean(np.array(i2t) < k) for k in ks},
        "text_to_image": {f"R@{k}": 100.0 * np.mean(np.array(t2i) < k) for k in ks},
    }


@pytest.mark.parametrize("seed", range(4))
def test_retrieval_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_img = 23
    owner = [i for i in range(n_img) for _ in range(int(rng.integers(1, 6)))]
    img = _unit(rng, n_img, 8)
    txt = _unit(rng, len(owner), 8) + 0.8 * img[owner]  # captions lean towards their images
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    got = retrieval_scores(img, txt, owner, chunk=5)  # small chunks: the blocking must not change anything
    want = _brute_force(img, txt, owner)
    for d in ("image_to_text", "text_to_image"):
        assert got[d] == pytest.approx(want[d])
    assert got["images"] == n_img and got["texts"] == len(owner)


def test_exact_ties_go_to_the_earlier_candidate() -> None:
    scores = np.array([[0.5, 0.5, 0.1], [0.5, 0.5, 0.1]])
    assert ranks_of(scores, np.array([0, 1])).tolist() == [0, 1]
    assert recall_at_k(np.array([0, 1, 5, 10]), (1, 5, 10)) == {"R@1": 25.0, "R@5": 50.0, "R@10": 75.0}


def test_image_to_text_counts_the_best_of_several_captions() -> None:
    img = np.eye(3)
    # Image 0's captions: one far (rank 2), one exact (rank 0): found at 1.
    txt = np.array([[0, 0.6, 0.8], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    got = retrieval_scores(img, txt, [0, 0, 1, 2])
    assert got["image_to_text"]["R@1"] == 100.0
    assert got["text_to_image"]["R@1"] == 75.0  # caption 0 points at image 2


def test_topk_accuracy_matches_brute_force() -> None:
    rng = np.random.default_rng(5)
    scores = rng.standard_normal((50, 12))
    labels = rng.integers(0, 12, 50)
    got = topk_accuracy(scores, labels, (1, 5))
    ranks = [sorted(range(12), key=lambda c: (-scores[i, c], c)).index(labels[i]) for i in range(50)]
    assert got["top1"] == pytest.approx(100 * np.mean(np.array(ranks) < 1))
    assert got["top5"] == pytest.approx(100 * np.mean(np.array(ranks) < 5))
    assert got["images"] == 50


def test_bad_inputs() -> None:
    with pytest.raises(ValueError):
        retrieval_scores(np.eye(2), np.eye(2)[:1], [0])  # image 1 has no caption
    with pytest.raises(ValueError):
        retrieval_scores(np.eye(2), np.eye(2), [0, 2])
    with pytest.raises(ValueError):
        topk_accuracy(np.zeros((0, 3)), [])
