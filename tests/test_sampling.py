"""engines/sampling.py: the next-token draws of every decoding step without a grammar, C and numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vlmcli.engines import sampling
from vlmcli.engines.sampling import RowSampler, SamplingError

WAYS = ["c", "numpy"] if sampling.native() else ["numpy"]


def sampler(way: str, n_vocab: int, temperature: float, top_p: float, seeds: list[int]) -> RowSampler:
    s = RowSampler(n_vocab, temperature, top_p, seeds)
    s.native = way == "c"
    return s


def log_softmax(row: np.ndarray) -> np.ndarray:
    x = row.astype(np.float64)
    return x - x.max() - math.log(np.exp(x - x.max()).sum())


@pytest.mark.parametrize("way", WAYS)
def test_temperature_zero_takes_the_first_largest_logit(way: str) -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 1001)).astype(np.float32)
    logits[3, 17] = logits[3, 900] = 50.0  # a tie: the first one
    tokens, logprobs = sampler(way, 1001, 0.0, 1.0, [0] * 5).sample(logits, [0, 1, 2, 3, 4], [0, 1, 2, 3, 4])
    assert tokens == [int(np.argmax(r)) for r in logits] and tokens[3] == 17
    for r, t, lp in zip(logits, tokens, logprobs):
        assert lp == pytest.approx(log_softmax(r)[t], abs=1e-5)


@pytest.mark.parametrize("way", WAYS)
def test_draws_stay_in_the_nucleus_with_its_probabilities(way: str) -> None:
    # probabilities 0.5, 0.3, 0.15, then 0.05 over 997 tokens: top_p 0.8 keeps exactly the first two
    probs = np.concatenate([[0.5, 0.3, 0.15], np.full(997, 0.05 / 997)])
    row = np.log(probs).astype(np.float32)[None, :]
    s = sampler(way, 1000, 1.0, 0.8, [7])
    draws = [s.sample(row, [0], [0])[0][0] for _ in range(4000)]
    assert set(draws) == {0, 1}
    share = draws.count(0) / len(draws)  # 0.5 / 0.8 of the nucleus; 4 standard deviations either side
    assert abs(share - 0.625) < 4 * math.sqrt(0.625 * 0.375 / len(draws))


@pytest.mark.parametrize("way", WAYS)
def test_temperature_sharpens_the_nucleus(way: str) -> None:
    row = np.log(np.array([0.6, 0.4] + [1e-9] * 98)).astype(np.float32)[None, :]
    cold = sampler(way, 100, 0.25, 1.0, [3])
    draws = [cold.sample(row, [0], [0])[0][0] for _ in range(2000)]
    # at temperature 1/4 the odds 0.6 : 0.4 become 0.6^4 : 0.4^4, so token 0 about 83.5% of the time
    share = draws.count(0) / len(draws)
    assert abs(share - 0.6**4 / (0.6**4 + 0.4**4)) < 4 * math.sqrt(0.835 * 0.165 / len(draws))


@pytest.mark.parametrize("way", WAYS)
def test_each_sequence_draws_from_its_own_seed(way: str) -> None:
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((3, 2000)) * 2).astype(np.float32)

    def run(seeds: list[int], seqs: list[int]) -> list[list[int]]:
        s = sampler(way, 2000, 0.8, 0.95, seeds)
        return [s.sample(logits, [0, 1, 2][: len(seqs)], seqs)[0] for _ in range(20)]

    both = run([5, 6, 7], [0, 1, 2])
    assert both == run([5, 6, 7], [0, 1, 2])
    assert both != run([8, 6, 7], [0, 1, 2])
    # a sequence's draws do not depend on which others are drawn beside it
    assert [d[0] for d in run([5, 6, 7], [0])] == [d[0] for d in both]


def test_c_and_numpy_draw_the_same_tokens() -> None:
    if not sampling.native():
        pytest.skip("vlm's sampling library was not built")
    rng = np.random.default_rng(2)
    n_vocab = 49_157  # not a multiple of the SIMD width
    logits = (rng.standard_normal((8, n_vocab)) * 4).astype(np.float32)
    logits[:, ::97] = np.nan  # skipped alike
    for temperature, top_p in [(0.7, 0.9), (1.0, 1.0), (1.3, 0.5), (0.7, 0.99999999)]:
        c = sampler("c", n_vocab, temperature, top_p, list(range(8)))
        py = sampler("numpy", n_vocab, temperature, top_p, list(range(8)))
        for _ in range(10):
            tc, lc = c.sample(logits, list(range(8)), list(range(8)))
            tp, lp = py.sample(logits, list(range(8)), list(range(8)))
            assert tc == tp
            assert lc == pytest.approx(lp, abs=1e-4)


@pytest.mark.parametrize("way", WAYS)
def test_nan_logits_are_never_drawn_and_a_row_without_a_finite_peak_is_an_error(way: str) -> None:
    rng = np.random.default_rng(3)
    row = rng.standard_normal((1, 200)).astype(np.float32)
    row[0, ::3] = np.nan
    s = sampler(way, 200, 1.0, 0.95, [1])
    assert all(t % 3 for t in (s.sample(row, [0], [0])[0][0] for _ in range(300)))
    for bad in (np.nan, np.inf):
        with pytest.raises(SamplingError):
            sampler(way, 64, 0.7, 0.9, [0]).sample(np.full((1, 64), bad, np.float32), [0], [0])


@pytest.mark.parametrize("way", WAYS)
def test_a_temperature_too_small_to_invert_is_greedy(way: str) -> None:
    row = np.random.default_rng(4).standard_normal((1, 500)).astype(np.float32)
    tokens, _ = sampler(way, 500, 1e-39, 0.9, [0]).sample(row, [0], [0])
    assert tokens == [int(np.argmax(row))]


def test_rows_outside_the_logits_are_refused_before_any_read() -> None:
    s = RowSampler(100, 0.7, 0.9, [0])
    logits = np.zeros((2, 100), np.float32)
    with pytest.raises(ValueError):
        s.sample(logits, [2], [0])
    with pytest.raises(ValueError):
        s.sample(np.zeros((2, 99), np.float32), [0], [0])
