"""Clinical survival statistics on a per-patient table, all from lifelines.

The analysis frame holds the follow-up time (column ``TIME``), the event indicator (``EVENT``), the
covariate design columns and one column per marker. Every model is a Cox proportional-hazards model
(lifelines ``CoxPHFitter``, Efron ties, Wald 95% CIs); hazard ratios of a marker are reported per a
fixed step of the marker (``scale`` units: e.g. 10 years of FaceAge, or 1 SD of a log-hazard), i.e.
``HR = exp(scale * coef)``. C-indices are Harrell's, in-sample (the models are fitted and scored on
the same rows). References: Cox (1972); Harrell et al. (1982); Bontempi et al., FAHR-Face (2025).

Degenerate fits are never reported as ordinary numbers. A term whose estimate runs off to infinity
(separation: e.g. a group without events) or a model that did not converge gives a row with a
``note`` and blank HR, CI and p (:func:`term_note`); the caller decides whether that is an error (a
clinical covariate) or a flagged row (a marker, a quartile). Messages name covariates and markers as
the user configured them, never a design term: a term of a categorical covariate carries a level.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter
from lifelines.exceptions import ConvergenceError, ConvergenceWarning
from lifelines.statistics import multivariate_logrank_test
from scipy import stats

from fahr.boundary import InputError
from fahr.stats.design import marker_scale

TIME = "__time__"
EVENT = "__event__"
QUARTILES = ["Q1", "Q2", "Q3", "Q4"]

#: a log-HR per SD of the term beyond this (HR > 22,000 per SD) is not an effect but separation
MAX_LOG_HR_PER_SD = 10.0
#: a standard error of the log-HR per SD of the term beyond this means a flat likelihood (separation)
MAX_SE_PER_SD = 5.0
#: log-HRs beyond this overflow exp(); CI bounds are clipped here
EXP_LIMIT = 700.0
#: the usual rule of thumb: fewer events per model term than this gives unstable, optimistic estimates
MIN_EVENTS_PER_TERM = 10


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
    likelihood-ratio and C-index tables, so they agree exactly).

    ``owners`` maps a design term to what the user knows it as (``"covariate 'stage'"``), for messages.
    """

    def __init__(self, data: pd.DataFrame, owners: dict[str, str] | None = None):
        self.data = data
        self.owners = dict(owners or {})
        self._fits: dict[tuple[str, ...], CoxPHFitter | InputError] = {}

    def fit(self, terms: list[str]) -> CoxPHFitter:
        """The fit on ``terms``; raises :class:`InputError` when lifelines cannot fit it."""
        key = tuple(terms)
        if key not in self._fits:
            try:
                self._fits[key] = fit_cox(self.data, terms, self.owners)
            except InputError as err:
                self._fits[key] = err
        found = self._fits[key]
        if isinstance(found, InputError):
            raise InputError(str(found))
        return found

    def attempt(self, terms: list[str]) -> tuple[CoxPHFitter | None, str]:
        """(fit or None, note): the note says why the fit is missing or did not converge ("" if fine)."""
        try:
            cph = self.fit(terms)
        except InputError as err:
            return None, str(err)
        return cph, "" if cph.fahr_converged else ("model did not converge (separation or collinearity?): "
                                                   "estimates not reported")

    def owner(self, term: str) -> str:
        return self.owners.get(term, repr(term))


def describe_terms(terms: list[str], owners: dict[str, str]) -> str:
    """The covariates/markers behind ``terms``, once each, as the user named them."""
    names = list(dict.fromkeys(owners.get(t, repr(t)) for t in terms))
    return ", ".join(names) if names else "no terms"


def fit_cox(data: pd.DataFrame, terms: list[str], owners: dict[str, str] | None = None) -> CoxPHFitter:
    """Cox model of ``TIME``/``EVENT`` on ``terms`` (no terms: the null model, C-index 0.5).

    The fit gets ``fahr_converged``: False when lifelines warned that Newton-Raphson did not converge
    or that the likelihood suggests complete separation.

    Raises:
        InputError: lifelines could not fit (collinear terms, failed matrix inversion), naming the
            covariates and markers involved (never design terms, which carry category levels).
    """
    cph = CoxPHFitter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cph.fit(data[[TIME, EVENT, *terms]], duration_col=TIME, event_col=EVENT)
    except (ConvergenceError, np.linalg.LinAlgError, ZeroDivisionError) as err:
        raise InputError(
            f"the Cox model on {describe_terms(terms, owners or {})} did not converge ({type(err).__name__}): "
            "they may be collinear or perfectly separate events; drop or merge covariates"
        ) from None
    messages = [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]
    cph.fahr_converged = not any("failed to converge" in m or "complete separation in the dataset" in m
                                 for m in messages)
    return cph


def efron_log_likelihood(time: np.ndarray, event: np.ndarray, eta: np.ndarray) -> float:
    """Cox partial log-likelihood with Efron's tie correction for linear predictors ``eta`` (the
    quantity lifelines maximises: equal to ``CoxPHFitter.log_likelihood_`` at its estimates)."""
    order = np.argsort(-time, kind="stable")
    t, e, eta = time[order], event[order].astype(bool), eta[order]
    eta = eta - eta.max()  # the likelihood is shift-invariant; this keeps exp() finite
    w = np.exp(eta)
    new_time = np.r_[True, t[1:] != t[:-1]]
    group = np.cumsum(new_time) - 1
    at_risk = np.cumsum(w)[np.r_[t[1:] != t[:-1], True]]  # sum of exp(eta) over times >= each distinct time
    deaths = np.bincount(group, weights=e.astype(float))
    tied = np.bincount(group, weights=w * e)
    ll = float(eta[e].sum())
    single = deaths == 1
    ll -= float(np.log(at_risk[single]).sum())
    for g in np.nonzero(deaths > 1)[0]:
        d = int(deaths[g])
        ll -= float(np.log(at_risk[g] - np.arange(d) / d * tied[g]).sum())
    return ll


#: moving a log-HR this many units per SD of its term further out must cost this much log-likelihood
PROFILE_STEP_PER_SD, PROFILE_MIN_DROP = 10.0, 1.0


def unbounded(cph: CoxPHFitter, data: pd.DataFrame, term: str) -> bool:
    """True when ``term``'s estimate is running off to infinity (separation, monotone likelihood).

    lifelines may stop early on a flat likelihood with an ordinary-looking estimate and no warning
    (a marker that leaks the outcome: HR ~100 per SD, "converged"). The test: move the term's log-HR
    :data:`PROFILE_STEP_PER_SD` units per SD of the term further from zero (the other estimates held);
    at a real maximum the partial log-likelihood falls steeply (by tens or thousands), under separation
    it does not fall (or rises). Also true when the estimate, its SE or the term's SD is not finite,
    or the log-HR or SE per SD exceed :data:`MAX_LOG_HR_PER_SD` / :data:`MAX_SE_PER_SD`.
    """
    coef, se = float(cph.params_[term]), float(cph.standard_errors_[term])
    sd = float(np.std(data[term].to_numpy(dtype=float), ddof=1)) if len(data) > 1 else float("nan")
    if not (math.isfinite(coef) and math.isfinite(se) and math.isfinite(sd)) or sd == 0:
        return True
    if abs(coef) * sd > MAX_LOG_HR_PER_SD or se * sd > MAX_SE_PER_SD:
        return True
    terms = list(cph.params_.index)
    x = data[terms].to_numpy(dtype=float)
    beta = cph.params_[terms].to_numpy(dtype=float)
    time, event = data[TIME].to_numpy(dtype=float), data[EVENT].to_numpy()
    moved = beta.copy()
    moved[terms.index(term)] += (1.0 if coef >= 0 else -1.0) * PROFILE_STEP_PER_SD / sd
    drop = efron_log_likelihood(time, event, x @ beta) - efron_log_likelihood(time, event, x @ moved)
    return not drop >= PROFILE_MIN_DROP


def term_note(models: CoxModels, terms: list[str], term: str, scale: float = 1.0) -> str:
    """Why the HR of ``term`` in the model on ``terms`` must not be reported ("" when it can be)."""
    cph, note = models.attempt(terms)
    if cph is None:
        return note
    if unbounded(cph, models.data, term):
        return (f"HR unbounded: {models.owner(term)} separates events (e.g. a group with no events, or only "
                "events); not estimable")
    if note:
        return note
    if abs(scale * float(cph.params_[term])) > EXP_LIMIT:
        return (f"HR per {scale:g} units is beyond floating point (the column barely varies on that scale): "
                "report it per SD (markers.<name>.standardize=true)")
    return ""


NO_ESTIMATE = {"hr": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "p": float("nan")}


def hazard_ratio(cph: CoxPHFitter, term: str, scale: float = 1.0) -> dict[str, float]:
    """HR of ``term`` per ``scale`` units with its Wald 95% CI and p-value (CI bounds clipped at
    exp(+-700); an HR beyond that is NaN: see :func:`term_note`)."""
    coef = float(cph.params_[term])
    low, high = (float(v) for v in cph.confidence_intervals_.loc[term])

    def bounded_exp(x: float) -> float:
        return math.exp(max(-EXP_LIMIT, min(EXP_LIMIT, x)))

    return {
        "coef": coef,
        "se": float(cph.standard_errors_[term]),
        "hr": math.exp(scale * coef) if abs(scale * coef) <= EXP_LIMIT else float("nan"),
        "ci_low": bounded_exp(scale * low),
        "ci_high": bounded_exp(scale * high),
        "p": float(cph.summary.loc[term, "p"]),
    }


def estimate(models: CoxModels, terms: list[str], term: str, scale: float = 1.0) -> dict[str, object]:
    """HR of ``term`` in the model on ``terms`` with a ``note``; HR, CI and p blank when noted."""
    note = term_note(models, terms, term, scale)
    cph, _ = models.attempt(terms)
    if cph is None:
        return {"coef": float("nan"), "se": float("nan"), **NO_ESTIMATE, "note": note}
    hr = hazard_ratio(cph, term, scale)
    return {**hr, **NO_ESTIMATE, "note": note} if note else {**hr, "note": ""}


def check_clinical_model(models: CoxModels, clinical: list[str]) -> None:
    """The clinical model must converge with every covariate estimable: a covariate that separates
    events would otherwise carry an infinite HR into every adjusted marker HR.

    Raises:
        InputError: the model cannot be fitted or did not converge, or a covariate's HR is unbounded
            (named by covariate, never by level).
    """
    if not clinical:
        return
    cph = models.fit(clinical)
    bad = [t for t in clinical if unbounded(cph, models.data, t)]
    if bad:
        raise InputError(f"{describe_terms(bad, models.owners)} separate(s) events in the clinical model: its HR is "
                         "unbounded (e.g. a level with no events, or only events); merge sparse levels or drop it "
                         "from `covariates`")
    if not cph.fahr_converged:
        raise InputError(f"the clinical model ({describe_terms(clinical, models.owners)}) did not converge: a "
                         "covariate may separate events or be nearly collinear with others; drop or merge covariates")


def _counts(data: pd.DataFrame) -> dict[str, int]:
    return {"n": int(len(data)), "events": int(data[EVENT].sum())}


def marker_hazard_ratios(models: CoxModels, markers: list[Marker], clinical: list[str]) -> pd.DataFrame:
    """Per marker: unadjusted HR (marker alone) and HR adjusted for the clinical terms."""
    rows = []
    for m in markers:
        for model, terms in (("unadjusted", [m.term]), ("adjusted", [*clinical, m.term])):
            rows.append({"marker": m.key, "label": m.label, "per": m.per_text, "model": model,
                         **estimate(models, terms, m.term, m.scale), **_counts(models.data)})
    columns = ["marker", "label", "per", "model", "coef", "se", "hr", "ci_low", "ci_high", "p", "n", "events", "note"]
    return pd.DataFrame(rows, columns=columns)


def model_terms(models: CoxModels, names: dict[str, list[str]], labels: dict[str, str]) -> pd.DataFrame:
    """Every term of the named models, HR per 1 unit of the design column (a paper's full table)."""
    rows = []
    for name, terms in names.items():
        for term in terms:
            rows.append({"model": name, "term": labels.get(term, term), **estimate(models, terms, term)})
    return pd.DataFrame(rows, columns=["model", "term", "coef", "se", "hr", "ci_low", "ci_high", "p", "note"])


def quartile_groups(values: pd.Series, name: str) -> pd.Series:
    """Quartile labels Q1 (lowest) .. Q4 (highest) by the sample quartiles of ``values``.

    Raises:
        InputError: too many ties for four distinct groups.
    """
    try:
        return pd.qcut(values, 4, labels=QUARTILES)
    except ValueError:
        raise InputError(f"marker {name!r} has too few distinct values to split into quartiles") from None


def quartile_table(models: CoxModels, marker: Marker, groups: pd.Series, clinical: list[str]) -> pd.DataFrame:
    """Per quartile: size, events, marker range, and HR vs Q1 adjusted for the clinical terms.

    A quartile without events (or Q1, the reference, without events) has no finite HR: its row is
    flagged in ``note`` with HR, CI and p blank.
    """
    data = models.data
    dummies = {q: f"{marker.term}[{q}]" for q in QUARTILES[1:]}
    frame = data.assign(**{col: (groups == q).astype(float) for q, col in dummies.items()})
    owners = {**models.owners, **{col: f"quartile {q} of marker {marker.key!r}" for q, col in dummies.items()}}
    qmodels = CoxModels(frame, owners)
    terms = [*clinical, *dummies.values()]
    events = {q: int(data.loc[groups == q, EVENT].sum()) for q in QUARTILES}
    rows = []
    for q in QUARTILES:
        inside = groups == q
        values = data.loc[inside, marker.term]
        row = {"marker": marker.key, "label": marker.label, "quartile": q, "n": int(inside.sum()),
               "events": events[q], "min": float(values.min()), "max": float(values.max())}
        if q == "Q1":
            row.update(hr=1.0, ci_low=float("nan"), ci_high=float("nan"), p=float("nan"),
                       note="no events in Q1 (the reference): HRs vs Q1 unbounded" if events[q] == 0 else "")
        elif events["Q1"] == 0:
            row.update(**NO_ESTIMATE, note="no events in Q1 (the reference): HR unbounded")
        elif events[q] == 0:
            row.update(**NO_ESTIMATE, note=f"no events in {q}: HR unbounded")
        else:
            hr = estimate(qmodels, terms, dummies[q])
            row.update(hr=hr["hr"], ci_low=hr["ci_low"], ci_high=hr["ci_high"], p=hr["p"], note=hr["note"])
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


def model_note(models: CoxModels, terms: list[str], added: list[str]) -> str:
    """Notes of a nested model: did not converge, or an added marker's HR is unbounded."""
    cph, note = models.attempt(terms)
    if cph is None:
        return note
    bad = [t for t in added if unbounded(cph, models.data, t)]
    if bad:
        return f"HR of {describe_terms(bad, models.owners)} unbounded (separation): interpret with care"
    return note


def likelihood_ratio_table(models: CoxModels, markers: list[Marker], clinical: list[str]) -> pd.DataFrame:
    """LRT for adding each marker (and all of them) to the clinical model."""
    reduced = models.fit(clinical)
    rows = []
    for name, (terms, added) in nested_models(markers, clinical).items():
        if not added:
            continue
        cph, note = models.attempt(terms)
        if cph is None:
            rows.append({"model": name, "added": ", ".join(added), "df": len(added), "note": note})
            continue
        rows.append({"model": name, "added": ", ".join(added), **likelihood_ratio(reduced, cph, len(added)),
                     "note": model_note(models, terms, added)})
    return pd.DataFrame(rows, columns=["model", "added", "ll_reduced", "ll_full", "chi2", "df", "p", "note"])


def concordance_table(models: CoxModels, markers: list[Marker], clinical: list[str]) -> pd.DataFrame:
    """Harrell's C-index (in-sample) of the clinical model and of each model with markers added."""
    rows = []
    for name, (terms, added) in nested_models(markers, clinical).items():
        cph, note = models.attempt(terms)
        rows.append({"model": name, "c_index": float(cph.concordance_index_) if cph is not None else float("nan"),
                     "terms": len(terms), **_counts(models.data),
                     "note": note if cph is None else model_note(models, terms, added)})
    return pd.DataFrame(rows, columns=["model", "c_index", "terms", "n", "events", "note"])


def events_per_term_note(events: int, terms: int) -> str:
    """'' or a note when ``events / terms`` is below :data:`MIN_EVENTS_PER_TERM`."""
    if terms and events < MIN_EVENTS_PER_TERM * terms:
        return (f"{events} events for {terms} model terms ({events / terms:.1f} per term, fewer than "
                f"{MIN_EVENTS_PER_TERM}): estimates may be unstable and optimistic")
    return ""


def far_table(data: pd.DataFrame, bins: pd.Series, far: Marker, clinical: list[str], bin_order: list[str],
              min_events: int, per: float, standardize: bool, owners: dict[str, str] | None = None) -> pd.DataFrame:
    """Cox of FAR within each interval bin, adjusted for the clinical terms.

    A bin with fewer than ``min_events`` events, a covariate constant within the bin, or a model that
    fails or separates is reported with a note and no HR (the other bins still count); a bin with
    few events per model term keeps its numbers and gets a note.
    """
    owners = {**(owners or {}), far.term: "FAR"}
    rows = []
    for label in bin_order:
        part = data[bins == label]
        row = {"interval_bin": label, **_counts(part)}
        if row["events"] < min_events:
            rows.append({**row, "note": f"fewer than {min_events} events"})
            continue
        constant = [t for t in [*clinical, far.term] if part[t].nunique() < 2]
        if constant:
            rows.append({**row, "note": f"{describe_terms(constant, owners)} constant in this bin (e.g. a level "
                                        "with no patients here): not estimable"})
            continue
        scale = marker_scale(part[far.term], per, standardize)
        result = estimate(CoxModels(part, owners), [*clinical, far.term], far.term, scale)
        note = result.pop("note") or events_per_term_note(row["events"], len(clinical) + 1)
        rows.append({**row, "per": far.per_text, **result, "note": note})
    return pd.DataFrame(rows, columns=["interval_bin", "n", "events", "per", "coef", "se", "hr", "ci_low", "ci_high",
                                       "p", "note"])
