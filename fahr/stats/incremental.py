"""Incremental value of a marker over the clinical model at a horizon t (e.g. 182 days = 6 months).

Two Cox models (lifelines, :func:`fahr.stats.clinical.fit_cox`): clinical, and clinical + marker.
Each gives every patient a risk of the event by t, ``p = 1 - S(t | x)`` (lifelines
``predict_survival_function``). From the two risks:

- **Time-dependent AUC** at t (cumulative/dynamic: cases = event by t, controls = event-free after
  t; IPCW, Uno et al. 2007 / Hung & Chiang 2010) of each model and its change, by scikit-survival's
  ``cumulative_dynamic_auc`` (:func:`fahr.metrics.survival.time_dependent_auc`).
- **Continuous NRI** (Pencina, D'Agostino & Steyerberg, Stat Med 2011;30:11-21): "up" = the new risk
  is higher, "down" = lower. With censoring, the event probabilities by t are Kaplan-Meier estimates
  (the estimator of that paper and of R's ``nricens`` for survival data)::

      NRI_events    = [P(D|up) P(up) - P(D|down) P(down)] / P(D)
      NRI_nonevents = [(1 - P(D|down)) P(down) - (1 - P(D|up)) P(up)] / (1 - P(D))
      NRI = NRI_events + NRI_nonevents          (-2 .. 2)

  where P(D) = 1 - KM(t) of everyone, P(D|up) = 1 - KM(t) of the "up" patients, P(up) their share.
- **Categorical NRI**: the same with "up"/"down" = moving to a higher/lower risk category; the
  categories are cut at ``cutoffs`` (e.g. [0.06, 0.2]: <6%, 6-20%, >=20%; Pencina et al., Stat Med
  2008;27:157-172). A risk equal to a cut-point belongs to the higher category.
- **IDI** (Pencina 2008): the rise of the mean risk among events minus that among non-events,
  ``IDI = [mean(p_new - p_old) | D] - [mean(p_new - p_old) | not D]``. With censoring the means are
  inverse-probability-of-censoring weighted (Uno et al., Stat Med 2013;32:2430-2442, R ``survIDINRI``):
  an event by t weighs 1/G(T-), a patient event-free after t weighs 1/G(t), a patient censored
  before t weighs 0; G = Kaplan-Meier of the censoring.

With no censoring before t all weights are 1 and the KM probabilities are proportions, so every
estimator reduces to Pencina's binary-outcome NRI/IDI (tests/test_incremental.py checks this, and a
small example worked by hand). The risks are in-sample (the models are fitted and scored on the same
patients, like the C-index of ``fahr evaluate``): optimistic for the absolute values; the bootstrap
refits both models on every resample, so the CIs include the fitting.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

from fahr.metrics.survival import time_dependent_auc
from fahr.stats import clinical as cl
from fahr.stats.bootstrap import bootstrap, canonical_order, ci_note, percentile_ci

#: statistic key -> row label in the table (per marker)
STATISTICS = {
    "auc_clinical": "AUC(t) clinical",
    "auc_marker": "AUC(t) clinical + marker",
    "delta_auc": "change in AUC(t)",
    "nri": "NRI continuous",
    "nri_events": "NRI continuous, events",
    "nri_nonevents": "NRI continuous, non-events",
    "nri_cat": "NRI categorical",
    "nri_cat_events": "NRI categorical, events",
    "nri_cat_nonevents": "NRI categorical, non-events",
    "idi": "IDI",
    "idi_events": "IDI, events (mean risk rise)",
    "idi_nonevents": "IDI, non-events (mean risk fall)",
}


def km_curve(time: np.ndarray, indicator: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kaplan-Meier step function of the ``indicator`` events: (distinct event times u (K,),
    survival just after each u (K,))."""
    time, indicator = np.asarray(time, dtype=float), np.asarray(indicator).astype(bool)
    times, counts = np.unique(time[indicator], return_counts=True)
    at_risk = len(time) - np.searchsorted(np.sort(time), times, side="left")
    return times, np.cumprod(1.0 - counts / at_risk)


def _step(curve: tuple[np.ndarray, np.ndarray], at: np.ndarray | float, strict: bool) -> np.ndarray:
    times, surv = curve
    k = np.searchsorted(times, at, side="left" if strict else "right")  # event times < at (strict) or <= at
    return np.where(k > 0, surv[np.maximum(k - 1, 0)] if len(surv) else 1.0, 1.0)


def km_at(time: np.ndarray, indicator: np.ndarray, at: float, strict: bool = False) -> float:
    """Kaplan-Meier survival of the ``indicator`` events at ``at`` (``strict``: the left limit, just
    before ``at``). 1.0 for an empty group; past the last time the last value is kept."""
    return float(_step(km_curve(time, indicator), at, strict))


def risk_categories(p: np.ndarray, cutoffs: Sequence[float]) -> np.ndarray:
    """Category index 0..len(cutoffs) of each risk (a risk equal to a cut-point goes up)."""
    return np.searchsorted(np.asarray(cutoffs, dtype=float), p, side="right")


def nri_survival(time: np.ndarray, event: np.ndarray, p_old: np.ndarray, p_new: np.ndarray, horizon: float,
                 cutoffs: Sequence[float] | None = None) -> dict[str, float]:
    """Net reclassification improvement at ``horizon`` (Pencina 2011, Kaplan-Meier), continuous when
    ``cutoffs`` is None, else categorical. Returns nri, nri_events, nri_nonevents, p_up, p_down.

    Raises:
        ValueError: no event by the horizon, or nobody event-free after it (P(D) is 0 or 1).
    """
    time, event = np.asarray(time, dtype=float), np.asarray(event).astype(bool)
    p_old, p_new = np.asarray(p_old, dtype=float), np.asarray(p_new, dtype=float)
    if cutoffs is None:
        up, down = p_new > p_old, p_new < p_old
    else:
        old, new = risk_categories(p_old, cutoffs), risk_categories(p_new, cutoffs)
        up, down = new > old, new < old
    p_d = 1.0 - km_at(time, event, horizon)
    if not 0.0 < p_d < 1.0:
        raise ValueError(f"P(event by the horizon) = {p_d:g}: the NRI needs events and non-events")
    share_up, share_down = float(up.mean()), float(down.mean())
    d_up = 1.0 - km_at(time[up], event[up], horizon) if up.any() else 0.0
    d_down = 1.0 - km_at(time[down], event[down], horizon) if down.any() else 0.0
    nri_events = (d_up * share_up - d_down * share_down) / p_d
    nri_nonevents = ((1.0 - d_down) * share_down - (1.0 - d_up) * share_up) / (1.0 - p_d)
    return {"nri": nri_events + nri_nonevents, "nri_events": nri_events, "nri_nonevents": nri_nonevents,
            "p_up": share_up, "p_down": share_down}


def ipcw_weights(time: np.ndarray, event: np.ndarray, horizon: float) -> tuple[np.ndarray, np.ndarray]:
    """(case weights, control weights), each (N,): 1/G(T-) for an event by ``horizon``, 1/G(horizon)
    for a patient event-free after it, 0 otherwise; G = Kaplan-Meier of the censoring times."""
    time, event = np.asarray(time, dtype=float), np.asarray(event).astype(bool)
    censored = ~event
    case = event & (time <= horizon)
    control = time > horizon
    curve = km_curve(time, censored)
    w_case = np.zeros(len(time))
    w_case[case] = 1.0 / _step(curve, time[case], strict=True)
    g_t = float(_step(curve, horizon, strict=False))
    w_control = np.where(control, 1.0 / g_t if g_t > 0 else 0.0, 0.0)
    return w_case, w_control


def idi_survival(time: np.ndarray, event: np.ndarray, p_old: np.ndarray, p_new: np.ndarray,
                 horizon: float) -> dict[str, float]:
    """Integrated discrimination improvement at ``horizon`` (IPCW means). Returns idi, idi_events
    (mean rise of the risk among events), idi_nonevents (mean fall among non-events), and the
    discrimination slopes (mean risk of events minus non-events) slope_old, slope_new.

    Raises:
        ValueError: no event by the horizon, or nobody event-free after it.
    """
    w_case, w_control = ipcw_weights(time, event, horizon)
    if not (w_case.sum() > 0 and w_control.sum() > 0):
        raise ValueError("the IDI needs an event by the horizon and a patient event-free after it")
    p_old, p_new = np.asarray(p_old, dtype=float), np.asarray(p_new, dtype=float)

    def mean(w, p):
        return float(np.sum(w * p) / np.sum(w))

    slope_old = mean(w_case, p_old) - mean(w_control, p_old)
    slope_new = mean(w_case, p_new) - mean(w_control, p_new)
    return {"idi": slope_new - slope_old, "idi_events": mean(w_case, p_new - p_old),
            "idi_nonevents": mean(w_control, p_old - p_new), "slope_old": slope_old, "slope_new": slope_new}


def risk_at(cph, frame: pd.DataFrame, horizon: float) -> np.ndarray:
    """(N,) risk of the event by ``horizon`` from a lifelines Cox fit: 1 - S(horizon | x)."""
    surv = cph.predict_survival_function(frame, times=[horizon])
    return 1.0 - surv.to_numpy(dtype=float)[0]


def auc_at(time: np.ndarray, event: np.ndarray, risk: np.ndarray, horizon: float) -> float:
    """Cumulative/dynamic AUC at ``horizon`` (scikit-survival; censoring estimated on the same patients).

    scikit-survival weighs every scored patient by 1/G(T) and refuses G = 0, which happens at the last
    follow-up when it is a censoring (administrative end of study: every cohort). A patient followed
    beyond the horizon is a control whatever their time, and controls are not weighted, so they are
    scored as censored just after the horizon; the AUC is unchanged (tests/test_incremental.py).
    """
    time, event = np.asarray(time, dtype=float), np.asarray(event).astype(bool)
    beyond = time > horizon
    after = np.nextafter(horizon, np.inf)
    score_time, score_event = np.where(beyond, np.minimum(time, after), time), event & ~beyond
    auc, _ = time_dependent_auc(time, event, score_time, score_event, risk, [horizon])
    return float(auc[0])


def incremental_statistics(frame: pd.DataFrame, clinical: list[str], marker: str, horizon: float,
                           cutoffs: Sequence[float], p_old: np.ndarray | None = None) -> dict[str, float]:
    """Every statistic of :data:`STATISTICS` for adding ``marker`` to the clinical terms, on ``frame``
    (the analysis frame: ``TIME``, ``EVENT``, design columns). ``p_old``: the clinical risks if known.

    Raises:
        ValueError (``InputError`` included): a model cannot be fitted or did not converge, or the
            horizon has no events or no event-free patients in ``frame``.
    """
    time, event = frame[cl.TIME].to_numpy(dtype=float), frame[cl.EVENT].to_numpy(dtype=int)
    if p_old is None:
        p_old = clinical_risk(frame, clinical, horizon)
    full = cl.fit_cox(frame, [*clinical, marker])
    if not full.fahr_converged:
        raise ValueError("the model with the marker did not converge")
    p_new = risk_at(full, frame, horizon)
    out = {"auc_clinical": auc_at(time, event, p_old, horizon), "auc_marker": auc_at(time, event, p_new, horizon)}
    out["delta_auc"] = out["auc_marker"] - out["auc_clinical"]
    out.update({k: v for k, v in nri_survival(time, event, p_old, p_new, horizon).items() if k.startswith("nri")})
    cat = nri_survival(time, event, p_old, p_new, horizon, cutoffs)
    out.update({"nri_cat": cat["nri"], "nri_cat_events": cat["nri_events"], "nri_cat_nonevents": cat["nri_nonevents"]})
    idi = idi_survival(time, event, p_old, p_new, horizon)
    out.update({k: idi[k] for k in ("idi", "idi_events", "idi_nonevents")})
    return out


def clinical_risk(frame: pd.DataFrame, clinical: list[str], horizon: float) -> np.ndarray:
    """Risks by ``horizon`` of the clinical model (no terms: the null model, one risk for everyone)."""
    cph = cl.fit_cox(frame, clinical)
    if not cph.fahr_converged:
        raise ValueError("the clinical model did not converge")
    return risk_at(cph, frame, horizon)


def incremental_table(data: pd.DataFrame, clinical: list[str], markers: list[cl.Marker], horizon: float,
                      cutoffs: Sequence[float], n_boot: int, seed: int) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Per marker, every statistic with its percentile 95% CI over ``n_boot`` patient resamples (both
    models refitted on each; bootstrap stream (2,)), and the risks of the full cohort (for the figure).

    Returns ``(table, risks)``: table columns marker, label, statistic, key, horizon, estimate,
    ci_low, ci_high, resamples, note; ``risks``: "clinical" and each marker key -> (N,) risks in
    ``data``'s row order.
    """
    order = canonical_order(data)
    frame = data.iloc[order].reset_index(drop=True)
    p_old = clinical_risk(frame, clinical, horizon)
    risks = {"clinical": np.empty(len(frame))}
    risks["clinical"][order] = p_old
    point: dict[str, dict[str, float]] = {}
    notes: dict[str, str] = {}
    for m in markers:
        try:
            point[m.key] = incremental_statistics(frame, clinical, m.term, horizon, cutoffs, p_old)
            full = cl.fit_cox(frame, [*clinical, m.term])
            risks[m.key] = np.empty(len(frame))
            risks[m.key][order] = risk_at(full, frame, horizon)
        except ValueError as err:
            point[m.key], notes[m.key] = {}, f"not estimable: {str(err).splitlines()[0]}"

    def replicate(idx: np.ndarray) -> dict[str, float]:
        sample = frame.iloc[idx].reset_index(drop=True)
        base = clinical_risk(sample, clinical, horizon)
        out = {}
        for m in markers:
            try:
                stats = incremental_statistics(sample, clinical, m.term, horizon, cutoffs, base)
            except ValueError:
                continue
            out.update({f"{k}/{m.key}": v for k, v in stats.items()})
        return out

    reps = bootstrap(replicate, len(frame), n_boot, seed, (2,)) if n_boot else {}
    rows = []
    for m in markers:
        for key, name in STATISTICS.items():
            values = reps.get(f"{key}/{m.key}", np.full(n_boot, math.nan))
            low, high = percentile_ci(values)
            estimate = point[m.key].get(key, math.nan)
            note = notes.get(m.key, "") or ci_note(values)
            rows.append({"marker": m.key, "label": m.label, "statistic": name, "key": key, "horizon": horizon,
                         "estimate": estimate, "ci_low": low, "ci_high": high,
                         "resamples": int(np.isfinite(values).sum()), "note": note})
    columns = ["marker", "label", "statistic", "key", "horizon", "estimate", "ci_low", "ci_high", "resamples", "note"]
    return pd.DataFrame(rows, columns=columns), risks
