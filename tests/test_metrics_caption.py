"""CIDEr-D, BLEU-1..4 and ROUGE-L against worked examples, against values the real pycocoevalcap
computed, and (where it is installed: tests/pycocoevalcap_reference.py) against pycocoevalcap
itself on random corpora."""

from __future__ import annotations

import math
import random

import pycocoevalcap_reference as reference
import pytest

from vlmcli.metrics.caption import bleu, cider_d, rouge_l, score_captions

# A fixed corpus (pre-tokenized). The expected values below were computed by running the real
# pycocoevalcap 1.2 (Bleu(4) with option "closest", Rouge, Cider) on exactly these inputs.
CANDS = [
    "a man riding a horse on a beach",
    "two dogs play with a ball",
    "a plate of food",
    "a red bus on a street",
    "a cat",
    "",
]
REFS = [
    ["a man rides a horse along the beach", "a person on a horse at the beach", "horse and rider by the sea"],
    ["two dogs playing with a ball in the grass", "dogs chase a ball"],
    ["a plate with food on it", "a plate of food on a table", "food on a white plate", "a meal on a plate"],
    ["a red double decker bus on a city street", "a bus driving down the street"],
    ["a cat sitting on a couch", "a cat"],
    ["an empty room"],
]
PYCOCOEVALCAP_BLEU = [0.8191194156590396, 0.6852231151668372, 0.47723495964304324, 0.30262308844159425]
PYCOCOEVALCAP_ROUGE_L = 0.6453974998278795
PYCOCOEVALCAP_ROUGE_L_EACH = [0.625, 0.782051282051282, 0.693181818181818, 0.7721518987341772, 1.0, 0.0]
PYCOCOEVALCAP_CIDER = 2.087558610017903
PYCOCOEVALCAP_CIDER_EACH = [
    1.5338064637519846,
    2.388875326732203,
    2.909053886703179,
    2.118363519632695,
    3.575252463287356,
    0.0,
]


def test_fixed_corpus_matches_recorded_pycocoevalcap_values() -> None:
    b, _ = bleu(CANDS, REFS)
    assert b == pytest.approx(PYCOCOEVALCAP_BLEU, rel=1e-12)
    r, r_each = rouge_l(CANDS, REFS)
    assert r == pytest.approx(PYCOCOEVALCAP_ROUGE_L, rel=1e-12) and r_each == pytest.approx(
        PYCOCOEVALCAP_ROUGE_L_EACH, rel=1e-12
    )
    c, c_each = cider_d(CANDS, REFS)
    assert c == pytest.approx(PYCOCOEVALCAP_CIDER, rel=1e-12) and c_each == pytest.approx(
        PYCOCOEVALCAP_CIDER_EACH, rel=1e-12
    )


def test_bleu_worked_example() -> None:
    (b1, b2, b3, b4), per = bleu(["a b c d"], [["a b c e"]])
    assert b1 == pytest.approx(3 / 4, rel=1e-8)
    assert b2 == pytest.approx(math.sqrt(3 / 4 * 2 / 3), rel=1e-8)
    assert b3 == pytest.approx((3 / 4 * 2 / 3 * 1 / 2) ** (1 / 3), rel=1e-8)
    assert b4 < 1e-3  # no 4-gram matches: only the reference's 1e-15 / 1e-9 smoothing is left
    assert per[0] == [pytest.approx(0.75, rel=1e-8)]


def test_bleu_clipping_brevity_penalty_and_closest_length_tie() -> None:
    # Clipped counts: "a" counts once, as often as in the reference.
    assert bleu(["a a a a"], [["a b"]])[0][0] == pytest.approx(1 / 4, rel=1e-8)
    # Brevity: candidate of 1 word, closest reference 2 words -> exp(1 - 2/1).
    assert bleu(["a"], [["a b", "a b c d"]])[0][0] == pytest.approx(math.exp(-1), rel=1e-8)
    # A tie between the closest lengths (2 and 4 for a 3-word candidate) goes to the shorter: no penalty.
    assert bleu(["a b c"], [["a b", "a b c d"]])[0][0] == pytest.approx(1.0, rel=1e-8)


def test_rouge_l_worked_examples() -> None:
    assert rouge_l(["a b c d"], [["a b c e"]])[0] == pytest.approx(0.75)
    # P and R maxima are taken over the references separately: P from the first, R from the second.
    p, r, beta = 2 / 2, 2 / 3, 1.2
    assert rouge_l(["a b"], [["a b c d e f", "a x b"]])[0] == pytest.approx((1 + beta**2) * p * r / (r + beta**2 * p))
    assert rouge_l(["x"], [["a b"]])[0] == 0.0


def test_cider_d_worked_examples() -> None:
    # Two images with exact two-word captions: idf = log 2 for every n-gram; cosine 1 for unigrams and
    # bigrams, no 3- or 4-grams: mean over n = 2/4, times 10 = 5.
    score, each = cider_d(["a b", "c d"], [["a b"], ["c d"]])
    assert each == pytest.approx([5.0, 5.0]) and score == pytest.approx(5.0)
    # With one image every n-gram is in all of its references: idf 0, CIDEr-D 0 (as pycocoevalcap).
    assert cider_d(["a b"], [["a b"]])[0] == 0.0
    # The length penalty uses bigram counts: "a b c" (2 bigrams) against "a b" (1) -> exp(-1/72).
    score, each = cider_d(["a b c", "x y"], [["a b"], ["x y"]])
    idf = math.log(2)
    uni = (idf * idf * 2) / (math.sqrt(3) * idf * math.sqrt(2) * idf)  # clipped dot / norms (c has an unseen "c")
    bi = (idf * idf) / (math.sqrt(2) * idf * idf)
    assert each[0] == pytest.approx(10 * (uni + bi) / 4 * math.exp(-1 / 72))


def test_score_captions_and_bad_inputs() -> None:
    s = score_captions(CANDS, REFS)
    d = s.to_dict()
    assert list(d) == ["CIDEr-D", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "images"] and d["images"] == 6
    assert len(s.per_image) == 6 and set(s.per_image[0]) == {
        "CIDEr-D",
        "BLEU-1",
        "BLEU-2",
        "BLEU-3",
        "BLEU-4",
        "ROUGE-L",
    }
    with pytest.raises(ValueError):
        score_captions(["a"], [[]])
    with pytest.raises(ValueError):
        score_captions([], [])


def _random_corpus(rng: random.Random) -> tuple[list[str], list[list[str]]]:
    vocab = "a the man woman dog cat on in with of sitting standing red blue table street two group people".split()

    def sent() -> str:
        return " ".join(rng.choice(vocab) for _ in range(rng.choice([1, 2, 3, 5, 8, 12])))

    n = rng.choice([2, 3, 5, 10, 40])
    return [sent() for _ in range(n)], [[sent() for _ in range(rng.choice([1, 2, 5]))] for _ in range(n)]


@pytest.mark.skipif(not reference.available(), reason="pycocoevalcap is not installed")
@pytest.mark.parametrize("seed", range(6))
def test_random_corpora_match_pycocoevalcap(seed: int) -> None:
    cands, refs = _random_corpus(random.Random(seed))
    ref = reference.run(score=(cands, refs))
    b, b_each = bleu(cands, refs)
    assert b == pytest.approx(ref["bleu"], rel=1e-12, abs=1e-300)
    for k in range(4):
        assert b_each[k] == pytest.approx(ref["bleu_each"][k], rel=1e-12, abs=1e-300)
    r, r_each = rouge_l(cands, refs)
    assert r == pytest.approx(ref["rouge"], rel=1e-12) and r_each == pytest.approx(ref["rouge_each"], rel=1e-12)
    c, c_each = cider_d(cands, refs)
    assert c == pytest.approx(ref["cider"], rel=1e-12, abs=1e-15) and c_each == pytest.approx(
        ref["cider_each"], rel=1e-12, abs=1e-15
    )
