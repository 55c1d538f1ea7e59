"""The inference-time scaling law Q(K) = Q_inf - A / K**gamma, fitted to quality at K samples.

For a fixed gamma the law is linear in (Q_inf, A), so least squares is closed-form; gamma is found by
a fine grid search (then refined), which needs no optimiser and is exact for three points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class ScalingFit:
    q_inf: float  # the quality approached as K grows
    a: float  # how far K = 1 falls short of it
    gamma: float  # how fast the gap closes
    rmse: float  # of the fit at the given points

    def predict(self, k: float) -> float:
        return self.q_inf - self.a / k**self.gamma


def _linear_fit(ks: Sequence[float], qs: Sequence[float], gamma: float) -> tuple[float, float, float]:
    xs = [k**-gamma for k in ks]  # Q = q_inf - a * x
    n, mx, mq = len(xs), sum(xs) / len(xs), sum(qs) / len(qs)
    sxx = sum((x - mx) ** 2 for x in xs)
    a = -sum((x - mx) * (q - mq) for x, q in zip(xs, qs)) / sxx if sxx > 0 else 0.0
    q_inf = mq + a * mx
    sse = sum((q_inf - a * x - q) ** 2 for x, q in zip(xs, qs))
    return q_inf, a, math.sqrt(sse / n)


def fit_scaling_law(points: Sequence[tuple[float, float]]) -> ScalingFit | None:
    """(K, quality) pairs, K >= 1 with at least three distinct values -> the fit, else None."""
    pts = sorted((float(k), float(q)) for k, q in points)
    if len({k for k, _ in pts}) < 3 or pts[0][0] < 1:
        return None
    ks, qs = [k for k, _ in pts], [q for _, q in pts]
    best: tuple[float, float, float, float] | None = None
    lo, hi, steps = 0.01, 5.0, 500
    for _ in range(3):  # grid, then twice a finer grid around the best gamma
        for i in range(steps + 1):
            g = lo + (hi - lo) * i / steps
            q_inf, a, rmse = _linear_fit(ks, qs, g)
            if best is None or rmse < best[3] - 1e-15:
                best = (q_inf, a, g, rmse)
        assert best is not None  # the grid has at least one point
        span = (hi - lo) / steps
        lo, hi = max(0.001, best[2] - 2 * span), best[2] + 2 * span
    assert best is not None
    q_inf, a, gamma, rmse = best
    return ScalingFit(q_inf, a, gamma, rmse)
