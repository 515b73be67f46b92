"""Length-aware readings of pairwise results: judges and reward models both tend to like long answers.

* :func:`length_controlled_win_rate` -- AlpacaEval 2's length-controlled win rate (Dubois et al. 2024,
  "Length-Controlled AlpacaEval: A Simple Way to Debias Automatic Evaluators", arXiv:2404.04475), the GLM
  of ``tatsu-lab/alpaca_eval`` ``src/alpaca_eval/metrics/glm_winrate.py`` re-implemented offline.
* :func:`length_split` -- RewardBench's length view: a reward model's accuracy on the pairs where the
  chosen answer is the longer one, the shorter one, or the same length.
* :func:`longer_preferred` -- how often the preferred answer of a pair is the longer one (a labeller's
  or a judge's length bias).

Each is hand-checked in ``tests/test_length.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from alignment.evaluation.stats import wilson_interval

# L2 penalty on the length coefficient phi only (theta is unpenalised, so the fit reproduces the raw win
# rate when lengths carry no signal). It keeps phi finite when the length difference separates wins from
# losses perfectly, and changes a well-posed fit by far less than 1e-4.
PHI_L2 = 1e-4
_MAX_ITER = 200
_MAX_STEP = 2.0  # Newton steps are clipped to this (per coordinate): no overshoot on near-separable data
_THETA_BOUND = 40.0


def _as_array(values: Sequence[float], field: str) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    if x.ndim != 1:
        raise ValueError(f"{field} must be a flat sequence of numbers, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{field} holds a value that is not a finite number")
    return x


def _check_same_length(arrays: dict[str, np.ndarray]) -> int:
    sizes = {name: a.size for name, a in arrays.items()}
    n = next(iter(sizes.values()))
    if any(s != n for s in sizes.values()):
        detail = ", ".join(f"{name} has {s}" for name, s in sizes.items())
        raise ValueError(f"one value per pair is needed in each field: {detail}")
    if n == 0:
        raise ValueError(f"{next(iter(sizes))} is empty: there are no pairs to measure")
    return n


def _fit_glm(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(theta, phi) per row of ``weights`` (B, n): maximise, for each b,

        sum_i w_bi [y_i log s(theta + phi x_i) + (1 - y_i) log(1 - s(theta + phi x_i))] - PHI_L2 phi^2 / 2

    by Newton's method (batched 2x2 solves, steps clipped to ``_MAX_STEP``). Soft targets y in [0, 1] are
    AlpacaEval's duplicated rows (y = 1 with weight y, y = 0 with weight 1 - y) in one term.
    """
    b = weights.shape[0]
    beta = np.zeros((b, 2))
    design = np.stack([np.ones_like(x), x], axis=1)  # (n, 2)
    ridge = np.diag([0.0, PHI_L2])
    for _ in range(_MAX_ITER):
        z = beta @ design.T  # (B, n)
        p = 1.0 / (1.0 + np.exp(-z))
        grad = (weights * (y - p)) @ design - beta @ ridge  # (B, 2)
        curv = weights * p * (1 - p)
        hess = np.einsum("bn,ni,nj->bij", curv, design, design) + ridge + 1e-12 * np.eye(2)
        step = np.clip(np.linalg.solve(hess, grad[..., None])[..., 0], -_MAX_STEP, _MAX_STEP)
        beta = beta + step
        beta[:, 0] = np.clip(beta[:, 0], -_THETA_BOUND, _THETA_BOUND)
        if np.max(np.abs(step)) < 1e-12:
            break
    return beta[:, 0], beta[:, 1]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def length_controlled_win_rate(preference: Sequence[float], length_a: Sequence[float], length_b: Sequence[float],
                               *, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """AlpacaEval 2's length-controlled win rate of A over B: the win rate predicted at equal lengths.

    ``preference`` per pair: 1.0 (A wins), 0.5 (tie), 0.0 (B wins); ``length_a`` / ``length_b``: the two
    answers' lengths (AlpacaEval uses characters). The model (``glm_winrate.py``'s
    ``length_controlled_v1`` without its per-instruction difficulty term, which needs many models'
    answers to the same instructions) is

        logit P(A beats B) = theta + phi * tanh(delta / std(delta)),   delta = length_a - length_b,

    with std the sample standard deviation (ddof = 1, as pandas computes it there), fitted by maximum
    likelihood on the soft preferences (Newton's method; a tiny L2 penalty ``PHI_L2`` on phi only keeps it
    finite when length separates the outcomes). The length-controlled win rate is sigmoid(theta): the
    prediction at delta = 0. Guards: when every delta is equal (std = 0) or there is one pair, length
    explains nothing, phi = 0 and the rate is the raw win rate (theta's closed-form MLE); when every
    preference is the same (all wins, all losses) the likelihood has no finite maximum and the rate is
    again the raw one.

    ``lc_ci95``: percentile bootstrap over pairs (``n_bootstrap`` resamples, the feature's scale fixed
    from the full data). Returns ``{"n", "win_rate", "lc_win_rate", "lc_ci95", "length_coef" (phi),
    "mean_length_diff"}``. ValueError naming the field on mismatched or empty input, a preference
    outside [0, 1] or a length that is not a finite number.
    """
    y = _as_array(preference, "preference")
    la, lb = _as_array(length_a, "length_a"), _as_array(length_b, "length_b")
    n = _check_same_length({"preference": y, "length_a": la, "length_b": lb})
    if np.any((y < 0) | (y > 1)):
        raise ValueError("preference must be in [0, 1] per pair (1 = A wins, 0.5 = tie, 0 = B wins)")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    delta = la - lb
    std = float(np.std(delta, ddof=1)) if n > 1 else 0.0
    x = np.tanh(delta / std) if std > 0 else np.zeros(n)
    raw = float(y.mean())

    def fit(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lc, phi) per row of weights (pair counts of a resample)."""
        total = weights.sum(axis=1)
        mean_y = (weights @ y) / total
        # Degenerate resamples: no length signal in them, or every preference the same.
        has_x = (weights * (x != 0)).sum(axis=1) > 0
        saturated = (mean_y <= 0) | (mean_y >= 1)
        fitted = has_x & ~saturated
        lc, phi = mean_y.copy(), np.zeros(weights.shape[0])
        if fitted.any():
            theta, phi_fit = _fit_glm(x, y, weights[fitted])
            lc[fitted], phi[fitted] = _sigmoid(theta), phi_fit
        return lc, phi

    lc, phi = fit(np.ones((1, n)))
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        counts = np.stack([np.bincount(rng.integers(0, n, size=n), minlength=n) for _ in range(n_bootstrap)])
        boot, _ = fit(counts.astype(float))
        ci = (float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975)))
    else:
        ci = (float("nan"), float("nan"))
    return {"n": n, "win_rate": raw, "lc_win_rate": float(lc[0]), "lc_ci95": ci, "length_coef": float(phi[0]),
            "mean_length_diff": float(delta.mean())}


def _group(correct: np.ndarray, sel: np.ndarray) -> dict[str, Any]:
    k, n = float(correct[sel].sum()), int(sel.sum())
    if n == 0:
        return {"n": 0, "accuracy": None, "ci95": None}
    return {"n": n, "accuracy": k / n, "ci95": wilson_interval(k, n)}


def length_split(correct: Sequence[bool], chosen_length: Sequence[float], rejected_length: Sequence[float]
                 ) -> dict[str, dict[str, Any]]:
    """RewardBench's length view of a reward model's pairwise accuracy.

    ``correct`` per pair: whether the model ranked the chosen answer above the rejected one; lengths in
    any unit (the caller says which). Returns ``{"chosen_longer", "chosen_shorter", "equal_length"}``,
    each ``{"n", "accuracy", "ci95"}`` with a 95% Wilson interval (``accuracy`` and ``ci95`` None when
    the group is empty). A model that learnt "longer is better" is accurate on ``chosen_longer`` and
    poor on ``chosen_shorter``. ValueError naming the field on mismatched or empty input.
    """
    c = _as_array(np.asarray(correct, dtype=float) if len(correct) else [], "correct")
    lc, lr = _as_array(chosen_length, "chosen_length"), _as_array(rejected_length, "rejected_length")
    _check_same_length({"correct": c, "chosen_length": lc, "rejected_length": lr})
    if np.any((c != 0) & (c != 1)):
        raise ValueError("correct must be true/false (1/0) per pair")
    return {"chosen_longer": _group(c, lc > lr), "chosen_shorter": _group(c, lc < lr),
            "equal_length": _group(c, lc == lr)}


def longer_preferred(winner_length: Sequence[float], loser_length: Sequence[float]) -> dict[str, Any]:
    """Share of pairs whose preferred answer is the longer one, among pairs of unequal length.

    Returns ``{"n" (unequal pairs), "n_equal", "share_longer_preferred", "ci95"}`` with a 95% Wilson
    interval; 0.5 means no length bias. ``share_longer_preferred`` and ``ci95`` are None when every pair
    has equal lengths. ValueError naming the field on mismatched or empty input.
    """
    w, lo = _as_array(winner_length, "winner_length"), _as_array(loser_length, "loser_length")
    _check_same_length({"winner_length": w, "loser_length": lo})
    unequal = w != lo
    n, k = int(unequal.sum()), int((w > lo).sum())
    return {"n": n, "n_equal": int(w.size - n), "share_longer_preferred": k / n if n else None,
            "ci95": wilson_interval(k, n) if n else None}


__all__ = ["length_controlled_win_rate", "length_split", "longer_preferred"]
