"""Caption metrics as pycocoevalcap's scorers compute them: BLEU-1..4, ROUGE-L, CIDEr-D.

Reference: salaniz/pycocoevalcap (the Python 3 port of tylin/coco-caption that COCO caption papers
report with), bleu/bleu_scorer.py, rouge/rouge.py, cider/cider_scorer.py. An independent
implementation of their arithmetic, in the same order of operations so the floats agree to the
last few bits. Inputs are tokenized captions (``vlmcli.metrics.tokenize.ptb_tokenize``): one
candidate and one or more references per image.

BLEU (``option="closest"``, as pycocoevalcap's Bleu calls it): corpus-level. Clipped n-gram counts
(a candidate n-gram counts at most as often as in the reference where it is most frequent) and
candidate n-gram totals are summed over the corpus; BLEU-n = (prod_{k<=n} (correct_k + 1e-15) /
(guess_k + 1e-9))^(1/n), times exp(1 - r/c) when the candidate length c is below r, where r sums
each image's reference length closest to its candidate's (a tie goes to the shorter reference).
Words are ``str.split()`` ones.

ROUGE-L: per image, the longest common subsequence with each reference; P = max over references of
LCS / candidate length, R = max of LCS / reference length (the two maxima are taken separately),
F = (1 + beta^2) P R / (R + beta^2 P) with beta = 1.2; the corpus score is the mean over images.
Words are ``str.split(" ")`` ones (so an empty caption is one empty word, as in the reference).

CIDEr-D: n = 1..4; document frequencies counted over the references of the evaluated images (an
n-gram counts once per image), idf = log(N_images) - log(max(1, df)); tf-idf vectors use raw
counts; per n the clipped similarity sum(min(c, r) * r) / (|c| |r|) times the length penalty
exp(-d^2 / (2 sigma^2)), sigma 6, where d is the difference in *bigram* counts of candidate and
reference (the reference counts the length in bigrams, a quirk kept here); averaged over n and
over references, times 10; the corpus score is the mean over images. With a single image every
idf is 0 and so is CIDEr-D, as in the reference.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["bleu", "rouge_l", "cider_d", "CaptionScores", "score_captions"]

Ngram = tuple[str, ...]


def _ngrams(words: Sequence[str], n: int) -> dict[Ngram, int]:
    counts: dict[Ngram, int] = defaultdict(int)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def _check(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates for {len(references)} reference sets")
    if not candidates:
        raise ValueError("no captions to score")
    for i, refs in enumerate(references):
        if len(refs) == 0:
            raise ValueError(f"image {i} has no reference captions")


# ----------------------------------------------------------------------------- BLEU


def bleu(
    candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4
) -> tuple[list[float], list[list[float]]]:
    """(corpus BLEU-1..n, per-image BLEU-1..n lists [k][image]) as pycocoevalcap's Bleu(n)."""
    _check(candidates, references)
    small, tiny = 1e-9, 1e-15
    total_correct = [0] * n
    total_guess = [0] * n
    total_test = 0
    total_ref = 0
    per_image: list[list[float]] = [[] for _ in range(n)]
    for cand, refs in zip(candidates, references):
        ref_lens = []
        max_counts: dict[Ngram, int] = {}
        for ref in refs:
            words = ref.split()
            ref_lens.append(len(words))
            for g, c in _ngrams(words, n).items():
                max_counts[g] = max(max_counts.get(g, 0), c)
        words = cand.split()
        test_len = len(words)
        ref_len = min((abs(rl - test_len), rl) for rl in ref_lens)[1]
        guess = [max(0, test_len - k + 1) for k in range(1, n + 1)]
        correct = [0] * n
        for g, c in _ngrams(words, n).items():
            correct[len(g) - 1] += min(max_counts.get(g, 0), c)
        total_test += test_len
        total_ref += ref_len
        score = 1.0
        for k in range(n):
            total_correct[k] += correct[k]
            total_guess[k] += guess[k]
            score *= (float(correct[k]) + tiny) / (float(guess[k]) + small)
            per_image[k].append(score ** (1.0 / (k + 1)))
        ratio = (test_len + tiny) / (ref_len + small)
        if ratio < 1:
            for k in range(n):
                per_image[k][-1] *= math.exp(1 - 1 / ratio)
    corpus = []
    score = 1.0
    for k in range(n):
        score *= float(total_correct[k] + tiny) / (total_guess[k] + small)
        corpus.append(score ** (1.0 / (k + 1)))
    ratio = (total_test + tiny) / (total_ref + small)
    if ratio < 1:
        corpus = [b * math.exp(1 - 1 / ratio) for b in corpus]
    return corpus, per_image


# ----------------------------------------------------------------------------- ROUGE-L


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[len(b)]


def rouge_l_one(candidate: str, refs: Sequence[str], beta: float = 1.2) -> float:
    cand = candidate.split(" ")
    precisions: list[float] = []
    recalls: list[float] = []
    for ref in refs:
        ref_words = ref.split(" ")
        lcs = _lcs(ref_words, cand)
        precisions.append(lcs / float(len(cand)))
        recalls.append(lcs / float(len(ref_words)))
    p, r = max(precisions), max(recalls)
    if p != 0 and r != 0:
        return ((1 + beta**2) * p * r) / float(r + beta**2 * p)
    return 0.0


def rouge_l(
    candidates: Sequence[str], references: Sequence[Sequence[str]], beta: float = 1.2
) -> tuple[float, list[float]]:
    """(mean ROUGE-L, per-image ROUGE-L) as pycocoevalcap's Rouge."""
    _check(candidates, references)
    scores = [rouge_l_one(c, refs, beta) for c, refs in zip(candidates, references)]
    return _mean(scores), scores


# ----------------------------------------------------------------------------- CIDEr-D


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def cider_d(
    candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0
) -> tuple[float, list[float]]:
    """(mean CIDEr-D, per-image CIDEr-D) as pycocoevalcap's Cider (which is CIDEr-D)."""
    _check(candidates, references)
    crefs = [[_ngrams(r.split(), n) for r in refs] for refs in references]
    ctest = [_ngrams(c.split(), n) for c in candidates]
    df: dict[Ngram, float] = defaultdict(float)
    for refs in crefs:
        for g in {g for ref in refs for g in ref}:
            df[g] += 1
    log_n = math.log(float(len(crefs)))

    def vec(counts: dict[Ngram, int]) -> tuple[list[dict[Ngram, float]], list[float], int]:
        v: list[dict[Ngram, float]] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            w = float(tf) * (log_n - math.log(max(1.0, df.get(g, 0.0))))
            v[k][g] = w
            norm[k] += pow(w, 2)
            if k == 1:  # the reference's "length" counts bigrams
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    def sim(
        vh: list[dict[Ngram, float]], vr: list[dict[Ngram, float]], nh: list[float], nr: list[float], lh: int, lr: int
    ) -> list[float]:
        delta = float(lh - lr)
        val = [0.0] * n
        for k in range(n):
            ref_k = vr[k]
            for g, w in vh[k].items():
                r = ref_k.get(g, 0.0)
                val[k] += min(w, r) * r
            if nh[k] != 0 and nr[k] != 0:
                val[k] /= nh[k] * nr[k]
            val[k] *= math.e ** (-(delta**2) / (2 * sigma**2))
        return val

    scores = []
    for test, refs in zip(ctest, crefs):
        vh, nh, lh = vec(test)
        acc = [0.0] * n
        for ref in refs:
            vr, nr, lr = vec(ref)
            s = sim(vh, vr, nh, nr, lh, lr)
            acc = [a + b for a, b in zip(acc, s)]
        score = sum(acc) / n
        score /= len(refs)
        score *= 10.0
        scores.append(score)
    return _mean(scores), scores


# ----------------------------------------------------------------------------- all of them


@dataclass
class CaptionScores:
    bleu: list[float]  # BLEU-1..4
    rouge_l: float
    cider_d: float
    count: int
    per_image: list[dict[str, float]]

    def to_dict(self) -> dict:
        return {
            "CIDEr-D": self.cider_d,
            **{f"BLEU-{k + 1}": b for k, b in enumerate(self.bleu)},
            "ROUGE-L": self.rouge_l,
            "images": self.count,
        }


def score_captions(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> CaptionScores:
    """Every metric over tokenized candidates (one per image) and their tokenized references."""
    b, b_each = bleu(candidates, references, 4)
    r, r_each = rouge_l(candidates, references)
    c, c_each = cider_d(candidates, references)
    per_image = [
        {"CIDEr-D": c_each[i], **{f"BLEU-{k + 1}": b_each[k][i] for k in range(4)}, "ROUGE-L": r_each[i]}
        for i in range(len(candidates))
    ]
    return CaptionScores(b, r, c, len(candidates), per_image)
