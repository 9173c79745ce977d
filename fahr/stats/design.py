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


def code_covariate(series: pd.Series, forced_categorical: bool = False) -> tuple[pd.DataFrame, Coding]:
    """One covariate (no missing values) -> its design columns and how it was coded.

    Raises:
        ValueError: the covariate takes a single value (its coefficient is not identifiable).
    """
    name = str(series.name)
    if series.nunique() < 2:
        raise InputError(f"covariate {name!r} is constant in the analysed rows: drop it from `covariates`")
    if not is_categorical(series, forced_categorical):
        return series.astype(float).to_frame(name), Coding(name, "numeric", [name])
    text = series.astype(str)
    ref = reference_level(text)
    others = sorted(set(text) - {ref})
    terms = [f"{name}[{level}]" for level in others]
    design = pd.DataFrame({t: (text == level).astype(float) for t, level in zip(terms, others)}, index=series.index)
    return design, Coding(name, "categorical", terms, ref, [ref, *others])


def covariate_design(df: pd.DataFrame, covariates: list[str], categorical: list[str]) -> tuple[pd.DataFrame, list[Coding]]:
    """All covariates -> one float design matrix (rows of ``df``) and their codings, in order."""
    parts, codings = [], []
    for column in covariates:
        design, coding = code_covariate(df[column], column in categorical)
        parts.append(design)
        codings.append(coding)
    if not parts:
        return pd.DataFrame(index=df.index), []
    return pd.concat(parts, axis=1), codings


def marker_scale(values: pd.Series, per: float, standardize: bool) -> float:
    """Units of the marker per reported step: ``per`` units, or ``per`` sample SDs (ddof=1)."""
    return float(per * np.std(values.to_numpy(dtype=float), ddof=1)) if standardize else float(per)
