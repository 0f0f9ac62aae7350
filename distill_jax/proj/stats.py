"""Summary statistics shared by the studies: one mean and spread over seeds."""

from __future__ import annotations

from typing import Iterable

import numpy as np


def mean_std(values: Iterable[float | None], *, digits: int | None = None, with_values: bool = False) -> dict:
    """``{"mean", "std", "n"}`` over the finite values (None and NaN are skipped; ``std`` is the sample std, ddof=1).

    One value has ``std`` 0; none gives NaN for both. ``digits`` rounds mean
    and std; ``with_values`` adds the values themselves (all of them).

    >>> mean_std([3, 5, None, float("nan")])
    {'mean': 4.0, 'std': 1.4142135623730951, 'n': 2}
    >>> mean_std([146, 150, 149], digits=2, with_values=True)
    {'mean': 148.33, 'std': 2.08, 'n': 3, 'values': [146.0, 150.0, 149.0]}
    """
    values = [None if v is None else float(v) for v in values]
    kept = np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)
    if kept.size == 0:
        mean = std = float("nan")
    else:
        mean, std = float(kept.mean()), float(kept.std(ddof=1)) if kept.size > 1 else 0.0
    if digits is not None:
        mean, std = round(mean, digits), round(std, digits)
    out = {"mean": mean, "std": std, "n": int(kept.size)}
    if with_values:
        out["values"] = values
    return out


def bootstrap_ci(
    scores,
    *,
    num_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
    """Mean of a ``[seeds, problems]`` score matrix with a two-level percentile bootstrap interval.

    Each resample draws seeds and problems with replacement, independently,
    so the interval covers both training randomness (seeds) and the finite
    test set (problems). For a **paired difference** pass the difference of
    two rows' matrices (same seeds, same problems); a fixed reference (a
    teacher's per-problem scores) broadcasts as a ``[problems]`` row. One seed
    resamples problems only.

    Returns ``{"mean", "low", "high", "n_seeds", "n_problems"}``.

    >>> out = bootstrap_ci(np.ones((3, 50)))
    >>> out["mean"], out["low"], out["high"]
    (1.0, 1.0, 1.0)
    """
    m = np.asarray(scores, np.float64)
    if m.ndim == 1:
        m = m[None]
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"scores must be a non-empty [seeds, problems] matrix, got shape {np.shape(scores)}.")
    if not np.all(np.isfinite(m)):
        raise ValueError("scores hold NaN or inf: a missing score is not a zero; drop that seed or row instead.")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}.")
    rng = np.random.default_rng(seed)
    s, p = m.shape
    means = np.empty(num_resamples)
    for r in range(num_resamples):
        rows = rng.integers(0, s, s) if s > 1 else np.zeros(1, int)
        cols = rng.integers(0, p, p)
        means[r] = m[np.ix_(rows, cols)].mean()
    tail = (1 - level) / 2
    return {"mean": float(m.mean()), "low": float(np.quantile(means, tail)), "high": float(np.quantile(means, 1 - tail)),
            "n_seeds": int(s), "n_problems": int(p)}


def paired_t_interval(a, b, *, level: float = 0.95, digits: int | None = None) -> dict:
    """Mean of the per-seed differences ``a - b`` with a Student-t interval.

    ``a`` and ``b`` are one value per seed, the same seeds in the same order
    (a student and its twin trained from the same seed and teacher). Returns
    ``{"mean", "low", "high", "n"}``; with one seed the interval is NaN.

    >>> out = paired_t_interval([88, 84, 97], [148, 139, 127])
    >>> out["mean"], round(out["low"], 1), round(out["high"], 1)
    (-48.333333333333336, -88.3, -8.4)
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired values need two equal-length 1-D lists (one value per seed), got {a.shape} and {b.shape}.")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("paired values hold NaN or inf: drop that seed from both lists instead.")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}.")
    from scipy import stats as scipy_stats

    d = a - b
    n = d.size
    mean = float(d.mean())
    if n < 2:
        low = high = float("nan")
    else:
        half = float(scipy_stats.t.ppf(0.5 + level / 2, n - 1) * d.std(ddof=1) / np.sqrt(n))
        low, high = mean - half, mean + half
    if digits is not None:
        mean, low, high = round(mean, digits), round(low, digits), round(high, digits)
    return {"mean": mean, "low": low, "high": high, "n": int(n)}


def to_bits(correct) -> str:
    """Per-problem scores (true/false) as a compact string of ``0``/``1``, as the studies store them.

    >>> to_bits([True, False, True]), from_bits("101").tolist()
    ('101', [True, False, True])
    """
    return "".join("1" if c else "0" for c in correct)


def from_bits(bits: str) -> np.ndarray:
    """The boolean array of :func:`to_bits`' string."""
    return np.frombuffer(bits.encode(), np.uint8) == ord("1")
