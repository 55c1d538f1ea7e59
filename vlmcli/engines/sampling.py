"""Next tokens for every sequence of a decoding step at once: temperature, top-p and a seed per sequence.

The draw is the one llama.cpp's chain (top-p, then temperature, then a seeded draw) makes, with numpy's
PCG64 as the random source: the nucleus is the fewest most likely tokens whose probability under the
row's softmax reaches top_p (tokens tied with its last one join it), and the token is drawn from
softmax(row / temperature) over the nucleus; temperature 0 takes the first largest logit. Each draw
comes with its log-probability under the row's own softmax (what --best-of scores candidates by).

The rows are sampled by vlm's C library (engines/_sampling.c, built by setup.py), numpy where it was
not built: the same tokens, but where a draw falls within rounding of a boundary between two tokens.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

import numpy as np

LIBRARY = "libvlm_sampling" + (".dll" if sys.platform == "win32" else ".so")  # beside this file (setup.py)
_FLOATS = ctypes.POINTER(ctypes.c_float)
_INTS = ctypes.POINTER(ctypes.c_int32)
_DOUBLES = ctypes.POINTER(ctypes.c_double)


class SamplingError(ValueError):
    """A logits row whose largest value is not a finite number (the model's output is broken)."""


@cache
def _library() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(Path(__file__).with_name(LIBRARY)))
        fn = lib.vlm_sample_rows
    except (OSError, AttributeError):  # not built, or a stale file without the function: numpy draws
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [_FLOATS, ctypes.c_int64, _INTS, ctypes.c_int, ctypes.c_float, ctypes.c_float]
    fn.argtypes += [_DOUBLES, _INTS, _FLOATS, _FLOATS]
    return lib


def native() -> bool:
    """Whether the C library samples (else numpy)."""
    return _library() is not None


class RowSampler:
    """Draws for a fixed set of sequences, each with its own random stream (seeds[i] for sequence i)."""

    def __init__(self, n_vocab: int, temperature: float, top_p: float, seeds: Sequence[int]):
        # float32, as the C library takes them, so that both draw alike at every boundary
        self.n_vocab = n_vocab
        self.temperature, self.top_p = float(np.float32(temperature)), float(np.float32(top_p))
        self._rngs = [np.random.Generator(np.random.PCG64(seed & 0xFFFFFFFFFFFFFFFF)) for seed in seeds]
        self._scratch = np.empty(3 * n_vocab, np.float32)
        self.native = native()  # False: numpy draws (where the library was not built)

    def sample(self, logits: np.ndarray, rows: Sequence[int], seqs: Sequence[int]) -> tuple[list[int], list[float]]:
        """Tokens and log-probabilities for sequences seqs, whose logits are rows `rows` of logits
        ((n_outputs, n_vocab) float32, C order). A sequence's stream moves one draw per call."""
        n = len(seqs)
        if n == 0:
            return [], []
        if logits.ndim != 2 or logits.shape[1] != self.n_vocab or len(rows) != n:
            raise ValueError(f"logits {logits.shape} and {len(rows)} rows for {n} sequences of {self.n_vocab} tokens")
        if min(rows) < 0 or max(rows) >= logits.shape[0]:
            raise ValueError(f"rows {list(rows)} outside the {logits.shape[0]} logits rows")
        u = np.array([self._rngs[s].random() for s in seqs], np.float64)
        row_ids = np.ascontiguousarray(rows, np.int32)
        tokens, logprobs = np.empty(n, np.int32), np.empty(n, np.float32)
        lib = _library()
        if self.native and lib is not None and logits.dtype == np.float32 and logits.flags.c_contiguous:
            rc = lib.vlm_sample_rows(
                logits.ctypes.data_as(_FLOATS),
                self.n_vocab,
                row_ids.ctypes.data_as(_INTS),
                n,
                self.temperature,
                self.top_p,
                u.ctypes.data_as(_DOUBLES),
                tokens.ctypes.data_as(_INTS),
                logprobs.ctypes.data_as(_FLOATS),
                self._scratch.ctypes.data_as(_FLOATS),
            )
            if rc != 0:
                raise SamplingError(f"the model's logits are not finite numbers (sequence {seqs[-1 - rc]})")
        else:
            for i, r in enumerate(row_ids):
                tokens[i], logprobs[i] = _sample_row(logits[r], self.temperature, self.top_p, float(u[i]))
        return tokens.tolist(), logprobs.tolist()


def _sample_row(row: np.ndarray, temperature: float, top_p: float, u: float) -> tuple[int, float]:
    """One row the C library's way, in numpy (a full sort where it sorts one bin)."""
    row = np.asarray(row, np.float32)
    row = np.where(np.isnan(row), np.float32(-np.inf), row)  # the C library's comparisons skip NaN
    m = float(row.max())
    if not np.isfinite(m):
        raise SamplingError("the model's logits are not finite numbers")
    e = np.exp((row - m).astype(np.float64))
    z = float(e.sum())
    if temperature <= 0 or 1.0 / temperature > float(np.finfo(np.float32).max):  # where C's 1 / t overflows
        tok = int(np.argmax(row))
    else:
        cut = -np.inf
        if top_p < 1.0:
            order = np.lexsort((np.arange(len(row)), -row))
            reached = np.nonzero(np.cumsum(e[order]) >= top_p * z)[0]
            cut = float(row[order[reached[0]]]) if len(reached) else -np.inf
        w = np.where(row >= cut, np.exp((row.astype(np.float64) - m) / temperature), 0.0)
        cum = np.cumsum(w)
        tok = int(min(np.searchsorted(cum, u * cum[-1], side="right"), np.nonzero(w)[0][-1]))
    return tok, float(row[tok] - m) - float(np.log(z))


class SequenceSampler:
    """A RowSampler of one sequence as the decoding loops' Sampler (engines/constrained.Sampler):
    logits(row) gives the floats of a logits row of the last batch (-1: its last)."""

    closed = False  # only a grammar closes an answer

    def __init__(self, rows: RowSampler, logits: Callable[[int], np.ndarray]):
        self.rows, self.logits = rows, logits

    def sample(self, row: int) -> int | None:
        tokens, _ = self.rows.sample(self.logits(row).reshape(1, -1), [0], [0])
        return tokens[0]

    def free(self) -> None:
        pass
