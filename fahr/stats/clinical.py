"""Clinical survival statistics on a per-patient table, all from lifelines.

The analysis frame holds the follow-up time (column ``TIME``), the event indicator (``EVENT``), the
covariate design columns and one column per marker. Every model is a Cox proportional-hazards model
(lifelines ``CoxPHFitter``, Efron ties, Wald 95% CIs); hazard ratios of a marker are reported per a
fixed step of the marker (``scale`` units: e.g. 10 years of FaceAge, or 1 SD of a log-hazard), i.e.
``HR = exp(scale * coef)``. C-indices are Harrell's, in-sample (the models are fitted and scored on
the same rows). References: Cox (1972); Harrell et al. (1982); Bontempi et al., FAHR-Face (2025).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter
from lifelines.exceptions import ConvergenceError
from lifelines.statistics import multivariate_logrank_test
from scipy import stats

from fahr.boundary import InputError
from fahr.stats.design import marker_scale

TIME = "__time__"
EVENT = "__event__"
QUARTILES = ["Q1", "Q2", "Q3", "Q4"]


@dataclass
class Marker:
    """A prediction column as analysed: ``term`` is its column in the analysis frame."""

    key: str
    label: str
    term: str
    scale: float  # marker units per reported step
    per_text: str  # e.g. "per 10 years", "per 1 SD"


class CoxModels:
    """Fits Cox models on one analysis frame, each set of terms once (the fits are reused by the HR,
    likelihood-ratio and C-index tables, so they agree exactly)."""

    def __init__(self, data: pd.DataFrame):
        self.data = data
        self._fits: dict[tuple[str, ...], CoxPHFitter] = {}

    def fit(self, terms: list[str]) -> CoxPHFitter:
        key = tuple(terms)
        if key not in self._fits:
            self._fits[key] = fit_cox(self.data, terms)
        return self._fits[key]


def fit_cox(data: pd.DataFrame, terms: list[str]) -> CoxPHFitter:
    """Cox model of ``TIME``/``EVENT`` on ``terms`` (no terms: the null model, C-index 0.5).

    Raises:
        ValueError: lifelines did not converge (collinear or separating terms), naming the terms.
    """
    cph = CoxPHFitter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # lifelines' convergence hints: failures raise below
            cph.fit(data[[TIME, EVENT, *terms]], duration_col=TIME, event_col=EVENT)
    except (ConvergenceError, np.linalg.LinAlgError) as err:
        raise InputError(
            f"Cox model on {terms or 'no terms'} did not converge ({type(err).__name__}): terms may be "
            "collinear or perfectly separate events; drop or merge covariates"
        ) from None
    return cph


def hazard_ratio(cph: CoxPHFitter, term: str, scale: float = 1.0) -> dict[str, float]:
    """HR of ``term`` per ``scale`` units with its Wald 95% CI and p-value."""
    coef = float(cph.params_[term])
    low, high = (float(v) for v in cph.confidence_intervals_.loc[term])
    if abs(scale * coef) > 700:  # exp() overflows a float
        raise InputError(f"the HR of {term} per {scale:g} units is beyond floating point (log-HR {scale * coef:.3g}): "
                         "the column barely varies or separates events perfectly; report it per SD "
                         f"(markers.<name>.standardize=true) or check the predictions")
    return {
        "coef": coef,
        "se": float(cph.standard_errors_[term]),
        "hr": math.exp(scale * coef),
        # a group without events has an unbounded CI: bounds are clipped at exp(+-700) (~1e304)
        "ci_low": math.exp(max(-700.0, min(700.0, scale * low))),
        "ci_high": math.exp(max(-700.0, min(700.0, scale * high))),
        "p": float(cph.summary.loc[term, "p"]),
    }


def _counts(data: pd.DataFrame) -> dict[str, int]:
    return {"n": int(len(data)), "events": int(data[EVENT].sum())}


def marker_hazard_ratios(models: CoxModels, markers: list[Marker], clinical: list[str]) -> pd.DataFrame:
    """Per marker: unadjusted HR (marker alone) and HR adjusted for the clinical terms."""
    rows = []
    for m in markers:
        for model, terms in (("unadjusted", [m.term]), ("adjusted", [*clinical, m.term])):
            hr = hazard_ratio(models.fit(terms), m.term, m.scale)
            rows.append({"marker": m.key, "label": m.label, "per": m.per_text, "model": model, **hr,
                         **_counts(models.data)})
    return pd.DataFrame(rows)


def model_terms(models: CoxModels, names: dict[str, list[str]], labels: dict[str, str]) -> pd.DataFrame:
    """Every term of the named models, HR per 1 unit of the design column (a paper's full table)."""
    rows = []
    for name, terms in names.items():
        cph = models.fit(terms)
        for term in terms:
            rows.append({"model": name, "term": labels.get(term, term), **hazard_ratio(cph, term)})
    return pd.DataFrame(rows, columns=["model", "term", "coef", "se", "hr", "ci_low", "ci_high", "p"])


def quartile_groups(values: pd.Series, name: str) -> pd.Series:
    """Quartile labels Q1 (lowest) .. Q4 (highest) by the sample quartiles of ``values``.

    Raises:
        ValueError: too many ties for four distinct groups.
    """
    try:
        return pd.qcut(values, 4, labels=QUARTILES)
    except ValueError:
        raise InputError(f"marker {name!r} has too few distinct values to split into quartiles") from None


def quartile_table(models: CoxModels, marker: Marker, groups: pd.Series, clinical: list[str]) -> pd.DataFrame:
    """Per quartile: size, events, marker range, and HR vs Q1 adjusted for the clinical terms."""
    data = models.data
    dummies = {q: f"{marker.term}[{q}]" for q in QUARTILES[1:]}
    frame = data.assign(**{col: (groups == q).astype(float) for q, col in dummies.items()})
    cph = fit_cox(frame, [*clinical, *dummies.values()])
    rows = []
    for q in QUARTILES:
        inside = groups == q
        values = data.loc[inside, marker.term]
        row = {"marker": marker.key, "label": marker.label, "quartile": q, "n": int(inside.sum()),
               "events": int(data.loc[inside, EVENT].sum()), "min": float(values.min()), "max": float(values.max())}
        if q == "Q1":
            row.update(hr=1.0, ci_low=float("nan"), ci_high=float("nan"), p=float("nan"))
        else:
            hr = hazard_ratio(cph, dummies[q])
            row.update(hr=hr["hr"], ci_low=hr["ci_low"], ci_high=hr["ci_high"], p=hr["p"])
        rows.append(row)
    return pd.DataFrame(rows)


def logrank_by_group(data: pd.DataFrame, groups: pd.Series) -> dict[str, float]:
    """Multivariate log-rank test of equal survival across groups: chi2, df, p."""
    result = multivariate_logrank_test(data[TIME], groups.astype(str), data[EVENT])
    return {"chi2": float(result.test_statistic), "df": int(result.degrees_of_freedom), "p": float(result.p_value)}


def likelihood_ratio(reduced: CoxPHFitter, full: CoxPHFitter, df: int) -> dict[str, float]:
    """LRT of nested Cox models: chi2 = 2 (ll_full - ll_reduced) on ``df`` degrees of freedom."""
    ll_reduced, ll_full = float(reduced.log_likelihood_), float(full.log_likelihood_)
    chi2 = 2.0 * (ll_full - ll_reduced)
    return {"ll_reduced": ll_reduced, "ll_full": ll_full, "chi2": chi2, "df": df, "p": float(stats.chi2.sf(chi2, df))}


def nested_models(markers: list[Marker], clinical: list[str]) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (terms, added marker terms): clinical, clinical + each marker, clinical + all markers."""
    models = {"clinical": (list(clinical), [])}
    for m in markers:
        models[f"clinical + {m.label}"] = ([*clinical, m.term], [m.term])
    if len(markers) > 1:
        terms = [m.term for m in markers]
        models["clinical + " + " + ".join(m.label for m in markers)] = ([*clinical, *terms], terms)
    return models


def likelihood_ratio_table(models: CoxModels, markers: list[Marker], clinical: list[str]) -> pd.DataFrame:
    """LRT for adding each marker (and all of them) to the clinical model."""
    reduced = models.fit(clinical)
    rows = []
    for name, (terms, added) in nested_models(markers, clinical).items():
        if added:
            rows.append({"model": name, "added": ", ".join(added),
                         **likelihood_ratio(reduced, models.fit(terms), len(added))})
    return pd.DataFrame(rows)


def concordance_table(models: CoxModels, markers: list[Marker], clinical: list[str]) -> pd.DataFrame:
    """Harrell's C-index (in-sample) of the clinical model and of each model with markers added."""
    rows = []
    for name, (terms, _) in nested_models(markers, clinical).items():
        rows.append({"model": name, "c_index": float(models.fit(terms).concordance_index_),
                     "terms": len(terms), **_counts(models.data)})
    return pd.DataFrame(rows)


def far_table(data: pd.DataFrame, bins: pd.Series, far: Marker, clinical: list[str], bin_order: list[str],
              min_events: int, per: float, standardize: bool) -> pd.DataFrame:
    """Cox of FAR within each interval bin, adjusted for the clinical terms.

    A bin with fewer than ``min_events`` events, or whose model fails, is reported with a reason
    instead of numbers (the other bins still count).
    """
    rows = []
    for label in bin_order:
        part = data[bins == label]
        row = {"interval_bin": label, **_counts(part)}
        if row["events"] < min_events:
            rows.append({**row, "note": f"fewer than {min_events} events"})
            continue
        scale = marker_scale(part[far.term], per, standardize)
        try:
            rows.append({**row, "per": far.per_text, **hazard_ratio(fit_cox(part, [*clinical, far.term]), far.term, scale),
                         "note": ""})
        except ValueError as err:
            rows.append({**row, "note": str(err)})
    return pd.DataFrame(rows)
