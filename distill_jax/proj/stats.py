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
