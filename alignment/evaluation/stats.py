"""Interval statistics every verdict uses (each hand-checked in tests).

* :func:`bootstrap_ci` -- percentile bootstrap of a mean (rewards, paired reward differences).
* :func:`wilson_interval` -- a proportion (gold accuracy, a judge's win rate).
* :func:`paired_proportion_diff` -- the difference of two proportions measured on the same items
  (gold accuracy of the tuned vs the starting model on the same prompts), Agresti and Min's adjusted
  Wald interval for paired binary data.
* :func:`mcnemar_exact` -- the exact test of whether those paired outcomes changed at all (gained vs lost items).
* :func:`pass_at_k`, :func:`mean_pass_at_k` -- Chen et al.'s (2021) unbiased pass@k from n samples per item.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

Z95 = 1.959963984540054


def bootstrap_ci(values: Sequence[float], n_resamples: int = 2000, seed: int = 0, level: float = 0.95
                 ) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean: resample the n values with replacement ``n_resamples`` times."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_resamples, x.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return (float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion p = successes / n (successes may be fractional).

    center = (p + z^2/2n) / (1 + z^2/n),  half = z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n).
    """
    if n <= 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0)) / denom
    # At p = 0 (or 1) the bound is exactly 0 (or 1); float rounding would leave it a hair inside.
    return (0.0 if p <= 0 else max(0.0, center - half), 1.0 if p >= 1 else min(1.0, center + half))


def _discordant(after: Sequence[bool], before: Sequence[bool]) -> tuple[int, int, int]:
    """(n, b, c) of paired binary outcomes on the same n items: b = #(after right, before wrong), c = #(after
    wrong, before right) -- the only items that say anything about a change."""
    if len(after) != len(before):
        raise ValueError(f"paired proportions need the same items: {len(after)} != {len(before)}")
    b = sum(bool(a) and not bool(o) for a, o in zip(after, before, strict=True))
    c = sum(bool(o) and not bool(a) for a, o in zip(after, before, strict=True))
    return len(after), b, c


def paired_proportion_diff(after: Sequence[bool], before: Sequence[bool], z: float = Z95
                           ) -> tuple[float, tuple[float, float]]:
    """(d, CI) for d = p_after - p_before on the same n items.

    With b = #(after right, before wrong) and c = #(after wrong, before right): d = (b - c) / n. The
    interval is Agresti and Min's (2005) adjusted Wald interval: with b' = b + 1/2, c' = c + 1/2,
    n' = n + 2, d' = (b' - c') / n' and se = sqrt(b' + c' - (b' - c')^2 / n') / n', CI = d' -+ z se,
    clipped to [-1, 1] (the plain Wald interval has zero width when no item changed).
    """
    n, b, c = _discordant(after, before)
    if n == 0:
        return float("nan"), (float("nan"), float("nan"))
    b2, c2, n2 = b + 0.5, c + 0.5, n + 2
    d2 = (b2 - c2) / n2
    se = math.sqrt(max(b2 + c2 - (b2 - c2) ** 2 / n2, 0.0)) / n2
    return (b - c) / n, (max(-1.0, d2 - z * se), min(1.0, d2 + z * se))


def mcnemar_exact(after: Sequence[bool], before: Sequence[bool]) -> dict[str, Any]:
    """Exact two-sided McNemar test on paired binary outcomes (the same items scored before and after).

    With b = #gained (right after, wrong before) and c = #lost (wrong after, right before), under "no change"
    each of the b + c discordant items is gained or lost with probability 1/2, so
    p = min(1, 2 P(X <= min(b, c))) with X ~ Binomial(b + c, 1/2), and p = 1 when b + c = 0. Why exact: a
    few dozen held-out prompts give small b + c, where the chi-square approximation is off. The tail is summed
    in integers (math.comb) and divided once, so it stays exact (correctly rounded) for b + c in the thousands.
    Returns {"n", "gained": b, "lost": c, "p_value"}.
    """
    n, b, c = _discordant(after, before)
    m = b + c
    if m == 0:
        p = 1.0
    else:
        tail = sum(math.comb(m, i) for i in range(min(b, c) + 1))
        p = min(1.0, 2 * tail / 2**m)  # int / int: one correctly rounded division, no float overflow
    return {"n": n, "gained": b, "lost": c, "p_value": p}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one item from n samples of which c are correct (Chen et al. 2021, the Codex paper):
    1 - C(n - c, k) / C(n, k), the chance that k of the n samples drawn without replacement hold a correct one;
    exactly 1 when n - c < k. Why not 1 - (1 - c/n)^k: that plug-in estimate is biased low.
    Raises ValueError unless 0 <= c <= n and 1 <= k <= n."""
    if n < 0 or c < 0 or k < 1:
        raise ValueError(f"pass@k needs n >= 0, c >= 0 and k >= 1: n={n}, c={c}, k={k}")
    if k > n or c > n:
        raise ValueError(f"pass@k needs k <= n and c <= n: n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Mean of :func:`pass_at_k` over items, each given as (n samples, c correct); nan when there are none."""
    if not counts:
        return float("nan")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
