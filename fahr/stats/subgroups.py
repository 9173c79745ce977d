"""Subgroup statistics with bootstrap 95% CIs: FaceAge accuracy and marker discrimination per group.

Per group (a level of sex, race, age decade or any cohort column) and for the whole cohort:

- FaceAge MAE and mean signed error (FaceAge - age), years; needs the true (chronological) age;
- per marker: Harrell's C-index of the marker alone (higher = shorter survival; lifelines
  ``concordance_index``) and the HR per 1 SD of the marker (univariate Cox, Efron ties; the SD is the
  whole cohort's, so every group is on one scale).

CIs are percentile intervals over ``n_boot`` resamples of the group's patients (each group, and the
cohort, resampled on its own: :mod:`fahr.stats.bootstrap`). A group row is flagged when its 95% CI
excludes the overall (whole-cohort) estimate. Groups with fewer than ``min_n`` patients (or, for the
survival statistics, fewer than ``min_events`` events) get a note and no estimate.

The HR per SD is fitted by :func:`cox_efron_1d` (a vectorised one-covariate Newton-Raphson on the
Efron partial likelihood, equal to lifelines' ``CoxPHFitter`` to 1e-6: tests/test_subgroups.py),
because a bootstrap refits it thousands of times and lifelines takes ~15 ms per fit.
This module works on arrays: ``fahr evaluate`` calls it, and so can any script on a test split.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from lifelines.utils import concordance_index

from fahr.metrics.age import decade_label
from fahr.stats.bootstrap import bootstrap, canonical_order, ci_note, percentile_ci
from fahr.stats.clinical import MAX_LOG_HR_PER_SD

ALL = "all"
AGE_DECADE = "age decade"
STATISTICS = {"mae": "FaceAge MAE (years)", "mean_error": "FaceAge mean signed error (years)",
              "c_index": "C-index (Harrell)", "hr_per_sd": "HR per SD"}


def cox_efron_1d(time: np.ndarray, event: np.ndarray, x: np.ndarray, max_iter: int = 50,
                 tol: float = 1e-10) -> tuple[float, float, bool]:
    """Cox model with one covariate, Efron ties: (coef, se, converged).

    ``time`` (N,) follow-up, ``event`` (N,) 0/1, ``x`` (N,) covariate. Newton-Raphson from 0 with step
    halving; not converged (NaN coef) when there is no event, ``x`` is constant, or the estimate runs
    off (|coef| * SD(x) > :data:`fahr.stats.clinical.MAX_LOG_HR_PER_SD`: separation).
    """
    time, event, x = (np.asarray(a, dtype=float) for a in (time, event, x))
    sd = float(np.std(x, ddof=1)) if len(x) > 1 else 0.0
    if event.sum() == 0 or not sd > 0:
        return math.nan, math.nan, False
    x = x - x.mean()
    order = np.argsort(time, kind="stable")
    t, e, x = time[order], event[order].astype(bool), x[order]
    unique, first, inverse = np.unique(t, return_index=True, return_inverse=True)
    deaths = np.bincount(inverse, weights=e.astype(float), minlength=len(unique)).astype(int)
    has = np.nonzero(deaths)[0]
    rep = np.repeat(has, deaths[has])  # one entry per death: its tie group ...
    frac = np.concatenate([np.arange(d) / d for d in deaths[has]])  # ... and Efron's l/d
    x_dead_sum = float(x[e].sum())

    def moments(beta: float) -> tuple[float, float, float]:
        eta = beta * x
        shift = float(eta.max())
        w = np.exp(eta - shift)
        sums = []
        for weight in (w, w * x, w * x * x):
            at_risk = np.cumsum(weight[::-1])[::-1][first]  # sum over times >= each distinct time
            tied = np.bincount(inverse, weights=weight * e, minlength=len(unique))
            sums.append(at_risk[rep] - frac * tied[rep])
        p0, p1, p2 = sums
        ll = beta * x_dead_sum - float(np.sum(np.log(p0) + shift))
        grad = x_dead_sum - float(np.sum(p1 / p0))
        info = float(np.sum(p2 / p0 - (p1 / p0) ** 2))
        return ll, grad, info

    beta = 0.0
    ll, grad, info = moments(beta)
    converged = False
    for _ in range(max_iter):
        if not info > 0:
            break
        step = grad / info
        while True:
            new = moments(beta + step)
            if new[0] >= ll - 1e-12 or abs(step) < 1e-12:
                break
            step /= 2
        beta += step
        improvement = new[0] - ll
        ll, grad, info = new
        if abs(step) < 1e-9 or abs(improvement) < tol:
            converged = True
            break
        if abs(beta) * sd > MAX_LOG_HR_PER_SD:
            break
    if not converged or abs(beta) * sd > MAX_LOG_HR_PER_SD or not info > 0:
        return math.nan, math.nan, False
    return float(beta), float(1.0 / math.sqrt(info)), True


@dataclass
class SubgroupData:
    """One row per patient (arrays of length N, aligned).

    ``markers``: key -> values (higher = higher risk); ``labels``: key -> name in the report;
    ``faceage``/``age``: FaceAge and true age in years (both or neither) for the accuracy rows (NaN age:
    the patient is left out of the accuracy, not of the survival statistics);
    ``groups``: group name -> (N,) object array of level labels (None = missing: left out of that
    group's breakdown).
    """

    time: np.ndarray
    event: np.ndarray
    markers: dict[str, np.ndarray]
    labels: dict[str, str]
    faceage: np.ndarray | None = None
    age: np.ndarray | None = None
    groups: dict[str, np.ndarray] = field(default_factory=dict)


def age_decades(age: np.ndarray) -> np.ndarray:
    """Decade labels ('60-69') of ages in years; None where the age is missing."""
    return np.array([decade_label(a) if np.isfinite(a) else None for a in np.asarray(age, dtype=float)], dtype=object)


def level_labels(values: pd.Series) -> np.ndarray:
    """Group levels as text (numbers as '%.15g', so 1.0 and 1 are one level and large codes stay
    distinct); None where missing."""
    def label(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None
        if isinstance(v, (bool, np.bool_)):
            return str(bool(v))
        if isinstance(v, (int, float, np.integer, np.floating)):
            return f"{float(v):.15g}"
        return str(v)
    return np.array([label(v) for v in values], dtype=object)


def _statistics(d: SubgroupData, sds: dict[str, float]):
    """Row positions -> {"mae": .., "mean_error": .., "c_index/<key>": .., "hr_per_sd/<key>": ..}."""
    def compute(idx: np.ndarray, survival: bool = True) -> dict[str, float]:
        out = {}
        if d.faceage is not None:
            err = d.faceage[idx] - d.age[idx]
            err = err[np.isfinite(err)]  # a patient without an age has no FaceAge error
            if len(err):
                out["mae"], out["mean_error"] = float(np.abs(err).mean()), float(err.mean())
        if survival:
            t, e = d.time[idx], d.event[idx]
            for key, values in d.markers.items():
                x = values[idx]
                try:
                    out[f"c_index/{key}"] = float(concordance_index(t, -x, e))
                except ZeroDivisionError:  # no comparable pair
                    out[f"c_index/{key}"] = math.nan
                coef, _, ok = cox_efron_1d(t, e, x / sds[key])
                out[f"hr_per_sd/{key}"] = math.exp(coef) if ok else math.nan
        return out
    return compute


def subgroup_table(d: SubgroupData, n_boot: int, seed: int, min_n: int, min_events: int) -> pd.DataFrame:
    """Long table: one row per (statistic, marker, group, level), the cohort first (group ``all``).

    Columns: statistic, marker, label, group, level, n, events, estimate, ci_low, ci_high, overall
    (the cohort's estimate), excludes_overall (the group's CI excludes it), resamples (with a value),
    note. ``n_boot`` resamples per group from bootstrap stream (1, crc32 of the group, crc32 of the level): a group's
    resamples do not change when other groups are added.
    """
    frame = pd.DataFrame({"time": d.time, "event": d.event, **{f"m/{k}": v for k, v in d.markers.items()}})
    if d.faceage is not None:
        frame["faceage"], frame["age"] = d.faceage, d.age
    for name, levels in d.groups.items():
        frame[f"g/{name}"] = np.array(["" if v is None else str(v) for v in levels], dtype=object)
    order = canonical_order(frame)
    d = SubgroupData(d.time[order], d.event[order], {k: v[order] for k, v in d.markers.items()}, d.labels,
                     None if d.faceage is None else d.faceage[order], None if d.age is None else d.age[order],
                     {k: v[order] for k, v in d.groups.items()})
    sds = {k: float(np.std(v, ddof=1)) for k, v in d.markers.items()}
    compute = _statistics(d, sds)
    units = [(ALL, ALL, np.arange(len(d.time)))]
    for name, levels in d.groups.items():
        present = sorted({v for v in levels if v is not None})
        units += [(name, level, np.nonzero(levels == level)[0]) for level in present]
    names = ([("mae", None), ("mean_error", None)] if d.faceage is not None else []) + [
        (stat, key) for stat in ("c_index", "hr_per_sd") for key in d.markers]
    rows, overall = [], {}
    for group, level, idx in units:
        n, events = len(idx), int(d.event[idx].sum())
        small_n = n < min_n
        small_e = events < min_events
        if small_n:
            point, reps = {}, {}
        else:
            point = compute(idx, survival=not small_e)
            reps = bootstrap(lambda r, idx=idx, s=not small_e: compute(idx[r], survival=s), n, n_boot, seed,
                             (1, zlib.crc32(group.encode()), zlib.crc32(level.encode())))
        for stat, key in names:
            name = stat if key is None else f"{stat}/{key}"
            survival = key is not None
            row = {"statistic": STATISTICS[stat], "marker": key or "", "label": d.labels.get(key, "FaceAge") if key else
                   "FaceAge", "group": group, "level": level, "n": n, "events": events, "estimate": math.nan,
                   "ci_low": math.nan, "ci_high": math.nan, "overall": math.nan, "excludes_overall": False,
                   "resamples": 0, "note": ""}
            if small_n:
                row["note"] = f"group too small: {n} patients (subgroups.min_n={min_n}): not estimated"
            elif survival and small_e:
                row["note"] = f"group too small: {events} events (subgroups.min_events={min_events}): not estimated"
            else:
                values = reps.get(name, np.full(n_boot, math.nan))
                row["estimate"] = point.get(name, math.nan)
                row["ci_low"], row["ci_high"] = percentile_ci(values)
                row["resamples"] = int(np.isfinite(values).sum())
                if not math.isfinite(row["estimate"]):
                    row["note"] = "not estimable (no comparable pair, or the Cox fit separates)"
                else:
                    row["note"] = ci_note(values)
            if group == ALL:
                overall[name] = row["estimate"]
            row["overall"] = overall.get(name, math.nan)
            lo, hi, ref = row["ci_low"], row["ci_high"], row["overall"]
            if group != ALL and all(math.isfinite(v) for v in (lo, hi, ref)) and not lo <= ref <= hi:
                row["excludes_overall"] = True
                extra = f"95% CI excludes the overall value {ref:.3g}"
                row["note"] = f"{row['note']}; {extra}" if row["note"] else extra
            rows.append(row)
    columns = ["statistic", "marker", "label", "group", "level", "n", "events", "estimate", "ci_low", "ci_high",
               "overall", "excludes_overall", "resamples", "note"]
    return pd.DataFrame(rows, columns=columns)
