"""Nonparametric bootstrap over patients: seeded resamples and percentile 95% CIs.

Resampling is of patients (rows of a one-row-per-patient table), with replacement. Results are
deterministic for a seed and independent of the order of the input rows: the caller puts its rows
in :func:`canonical_order` first (sorted by every analysed value), so the same patients give the
same resamples whatever order the file lists them in. Each analysis draws from its own stream
``numpy.random.default_rng([seed, *stream])``, so adding an analysis does not shift the others.
Reference: Efron & Tibshirani, An Introduction to the Bootstrap (1993), ch. 13 (percentile interval).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pandas as pd

#: a CI from fewer than this share of the resamples (the others failed: no events, no fit) gets a note
MIN_VALID_SHARE = 0.9


def canonical_order(frame: pd.DataFrame) -> np.ndarray:
    """Positions that sort ``frame`` by all of its columns (left to right; text as text).

    Rows equal in every column are interchangeable, so any order among them gives the same statistics.
    """
    keys = [frame[c].astype(str).to_numpy() if frame[c].dtype == object else frame[c].to_numpy(dtype=float)
            for c in frame.columns]
    return np.lexsort(keys[::-1]) if keys else np.arange(len(frame))


def resample_indices(n: int, n_boot: int, seed: int, stream: tuple[int, ...]) -> np.ndarray:
    """(n_boot, n) int array: row positions of each resample of ``n`` patients."""
    rng = np.random.default_rng([int(seed), *(int(s) for s in stream)])
    return rng.integers(0, n, size=(n_boot, n))


def percentile_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """(low, high) percentile interval of the finite replicate values; NaN with fewer than 2."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if len(finite) < 2:
        return math.nan, math.nan
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(finite, [alpha, 1.0 - alpha])
    return float(low), float(high)


def bootstrap(statistic: Callable[[np.ndarray], dict[str, float]], n: int, n_boot: int, seed: int,
              stream: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Replicates of ``statistic`` (row positions -> named numbers) over ``n_boot`` resamples.

    A resample on which the statistic fails (raises ``ValueError``/``ZeroDivisionError``/
    ``ArithmeticError``/``np.linalg.LinAlgError``, or returns NaN) counts as missing (NaN) for it.
    Returns name -> (n_boot,) array.
    """
    out: dict[str, list[float]] = {}
    for i, idx in enumerate(resample_indices(n, n_boot, seed, stream)):
        try:
            values = statistic(idx)
        except (ValueError, ZeroDivisionError, ArithmeticError, np.linalg.LinAlgError):
            values = {}
        for name in set(out) | set(values):
            out.setdefault(name, [math.nan] * i).append(float(values.get(name, math.nan)))
    return {name: np.asarray(v, dtype=float) for name, v in out.items()}


def ci_note(replicates: np.ndarray) -> str:
    """'' or a note when fewer than :data:`MIN_VALID_SHARE` of the resamples gave a value."""
    valid = int(np.isfinite(replicates).sum())
    if valid < MIN_VALID_SHARE * len(replicates):
        return (f"CI from {valid} of {len(replicates)} resamples (the others had no estimate): "
                "the interval is unreliable")
    return ""
