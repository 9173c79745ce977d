"""Covariate design matrices for Cox models: numeric columns as they are, categories dummy-coded.

A categorical covariate with levels {a, b, c} becomes indicator columns ``name[b]``, ``name[c]``; the
reference level (no column) is the most frequent level, ties broken by sorted order, so hazard ratios
compare each level with the commonest group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fahr.boundary import InputError


@dataclass
class Coding:
    """How one covariate entered the model."""

    column: str
    kind: str  # "numeric" or "categorical"
    terms: list[str] = field(default_factory=list)  # design-matrix column names
    reference: str | None = None  # reference level (categorical only)
    levels: list[str] = field(default_factory=list)  # all levels, reference first (categorical only)


def is_categorical(series: pd.Series, forced: bool) -> bool:
    """Text, boolean and category columns are categorical; numbers only when forced."""
    if forced:
        return True
    return not pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series)


def reference_level(series: pd.Series) -> str:
    """The most frequent level (as text); ties go to the first in sorted order."""
    counts = series.astype(str).value_counts()
    top = counts[counts == counts.max()].index
    return sorted(top)[0]


#: most levels a categorical covariate may have by default (``max_levels`` in conf/evaluate.yaml)
MAX_LEVELS = 20


def check_levels(series: pd.Series, max_levels: int = MAX_LEVELS) -> None:
    """A categorical covariate must look like categories, not like an identifier or a free-text field.

    Refused (naming the column and counts, never a level: levels would be identifiers): more than
    ``max_levels`` levels, or more than one level per two rows. Such a covariate would add one
    model term per level, each estimated from a handful of patients (or one), and its levels would
    be written into every table.

    Raises:
        InputError: too many levels.
    """
    name, n, levels = str(series.name), int(series.notna().sum()), int(series.nunique())
    if levels > max_levels or (levels > 2 and levels * 2 > n):
        raise InputError(
            f"covariate {name!r} has {levels} distinct values in {n} rows: too many levels for a categorical "
            f"covariate (at most max_levels={max_levels}, and at most one per two rows); it looks like an "
            "identifier or free text. Drop it from `covariates`, merge its levels, or, if it is a measurement, "
            "make it numeric")


def code_covariate(series: pd.Series, forced_categorical: bool = False,
                   max_levels: int = MAX_LEVELS) -> tuple[pd.DataFrame, Coding]:
    """One covariate (no missing values) -> its design columns and how it was coded.

    Raises:
        InputError: the covariate takes a single value (its coefficient is not identifiable), or is a
            categorical with too many levels (:func:`check_levels`).
    """
    name = str(series.name)
    if series.nunique() < 2:
        raise InputError(f"covariate {name!r} is constant in the analysed rows: drop it from `covariates`")
    if not is_categorical(series, forced_categorical):
        return series.astype(float).to_frame(name), Coding(name, "numeric", [name])
    check_levels(series, max_levels)
    text = series.astype(str)
    ref = reference_level(text)
    others = sorted(set(text) - {ref})
    terms = [f"{name}[{level}]" for level in others]
    design = pd.DataFrame({t: (text == level).astype(float) for t, level in zip(terms, others)}, index=series.index)
    return design, Coding(name, "categorical", terms, ref, [ref, *others])


def covariate_design(df: pd.DataFrame, covariates: list[str], categorical: list[str],
                     max_levels: int = MAX_LEVELS) -> tuple[pd.DataFrame, list[Coding]]:
    """All covariates -> one float design matrix (rows of ``df``) and their codings, in order."""
    parts, codings = [], []
    for column in covariates:
        design, coding = code_covariate(df[column], column in categorical, max_levels)
        parts.append(design)
        codings.append(coding)
    if not parts:
        return pd.DataFrame(index=df.index), []
    return pd.concat(parts, axis=1), codings


def marker_scale(values: pd.Series, per: float, standardize: bool) -> float:
    """Units of the marker per reported step: ``per`` units, or ``per`` sample SDs (ddof=1)."""
    return float(per * np.std(values.to_numpy(dtype=float), ddof=1)) if standardize else float(per)


def collinear_column(frame: pd.DataFrame, columns: list[str], tol: float = 1e-6) -> tuple[str, list[str]] | None:
    """The first of ``columns`` that is (numerically exactly) an affine function of those before it,
    with the earlier columns it depends on; None when the design has full rank.

    Cox models have no intercept to fit, but a shift does not change a Cox model either, so a column
    equal to ``a + b * other`` (a marker that is a covariate in other units, two codings of one
    category) is as unidentifiable as an exact copy: lifelines would fail or return arbitrary numbers.
    """
    x = frame[columns].to_numpy(dtype=float)
    if len(x) < 2:
        return None
    sd = x.std(axis=0)
    z = (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    for j in range(1, len(columns)):
        target = z[:, j]
        if not np.any(target):
            continue
        basis = np.column_stack([np.ones(len(z)), z[:, :j]])
        coef, *_ = np.linalg.lstsq(basis, target, rcond=None)
        residual = target - basis @ coef
        if np.linalg.norm(residual) <= tol * np.linalg.norm(target):
            used = [columns[i] for i in range(j) if abs(coef[i + 1]) > 1e-8]
            return columns[j], used
    return None
