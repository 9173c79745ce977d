"""Survival metrics against lifelines / scikit-survival on their bundled data, and on bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from fahr.metrics import (
    BreslowBaseline, ConcordanceIndex, check_survival_arrays, harrell_c, integrated_brier, time_dependent_auc,
    uno_c,
)


def gbsg2():
    """(X (686, 5) numeric covariates, time days, event) from scikit-survival."""
    from sksurv.datasets import load_gbsg2

    x, y = load_gbsg2()
    x = x[["age", "pnodes", "progrec", "estrec", "tsize"]].astype(float).to_numpy()
    return x, y["time"].astype(float), y["cens"].astype(int)


def whas500():
    from sksurv.datasets import load_whas500

    x, y = load_whas500()
    x = x[["age", "bmi", "hr", "sysbp", "diasbp"]].astype(float).to_numpy()
    return x, y["lenfol"].astype(float), y["fstat"].astype(int)


def rossi():
    from lifelines.datasets import load_rossi

    df = load_rossi()
    return df.drop(columns=["week", "arrest"]).to_numpy(float), df["week"].to_numpy(float), df["arrest"].to_numpy(int)


DATASETS = {"gbsg2": gbsg2, "whas500": whas500, "rossi": rossi}


def cox_risk(x, time, event):
    """Linear predictor of a lifelines Cox fit (uncentred X @ beta) and the fitter."""
    from lifelines import CoxPHFitter

    df = pd.DataFrame(x, columns=[f"x{i}" for i in range(x.shape[1])]).assign(T=time, E=event)
    cph = CoxPHFitter().fit(df, "T", "E")
    return x @ cph.params_.to_numpy(), cph, df


def split(n, seed=0):
    idx = np.random.default_rng(seed).permutation(n)
    return idx[: n // 2], idx[n // 2:]


# ---- independent oracles: the published definitions, written out pair by pair (O(n^2)), so that a
# wrapper is never checked only against the library call it makes.

def harrell_by_pairs(time, event, risk):
    """Harrell's C: pair (i, j) is comparable when i's event comes first, or at the same time as j's
    censoring; concordant when i has the higher risk; risk ties count 1/2."""
    num = den = 0.0
    for i in np.flatnonzero(event):
        j = (time > time[i]) | ((time == time[i]) & (event == 0))
        den += j.sum()
        num += (risk[i] > risk[j]).sum() + 0.5 * (risk[i] == risk[j]).sum()
    return num / den


def censoring_survival(time, event):
    """G(t) = P(censoring > t): Kaplan-Meier with the censorings as the events; no tied times assumed."""
    order = np.argsort(time)
    t, censored = time[order], event[order] == 0
    at_risk = t.size - np.arange(t.size)
    g = np.cumprod(np.where(censored, 1.0 - 1.0 / at_risk, 1.0))
    return lambda s: np.where(s < t[0], 1.0, g[np.searchsorted(t, s, side="right") - 1])


def uno_by_pairs(train_time, train_event, time, event, risk, tau):
    """Uno et al. (2011): comparable pairs as Harrell's with T_i < tau, weighted by G(T_i)^-2 (G from train)."""
    g = censoring_survival(train_time, train_event)
    num = den = 0.0
    for i in np.flatnonzero((event == 1) & (time < tau)):
        w = g(time[i]) ** -2.0
        j = time > time[i]
        den += w * j.sum()
        num += w * ((risk[i] > risk[j]).sum() + 0.5 * (risk[i] == risk[j]).sum())
    return num / den


def cumulative_dynamic_auc_by_pairs(train_time, train_event, time, event, risk, horizon):
    """Cases: an event by the horizon, weighted 1/G(T_i); controls: still event-free after it (Uno 2007)."""
    g = censoring_survival(train_time, train_event)
    cases = np.flatnonzero((time <= horizon) & (event == 1))
    controls = risk[time > horizon]
    w = 1.0 / g(time[cases])
    wins = np.array([(risk[i] > controls).sum() + 0.5 * (risk[i] == controls).sum() for i in cases])
    return float((w * wins).sum() / (w.sum() * controls.size))


def simulated_cohort(n, seed):
    """Continuous exponential event and censoring times (no ties), risk = a noisy copy of the true log-hazard."""
    rng = np.random.default_rng(seed)
    log_hazard = rng.normal(size=n)
    t_event = rng.exponential(1.0 / np.exp(log_hazard)) * 365.0
    t_censor = rng.exponential(2.0, size=n) * 365.0
    time = np.minimum(t_event, t_censor)
    return time, (t_event <= t_censor).astype(int), log_hazard + rng.normal(scale=0.7, size=n)


@pytest.mark.parametrize("name", DATASETS)
def test_harrell_c_matches_lifelines_and_sksurv(name):
    from lifelines.utils import concordance_index
    from sksurv.metrics import concordance_index_censored

    x, time, event = DATASETS[name]()
    risk, _, _ = cox_risk(x, time, event)
    c = harrell_c(time, event, risk)
    assert c > 0.6  # sign: higher risk = shorter survival
    assert c == pytest.approx(concordance_index(time, -risk, event), abs=1e-12)
    assert c == pytest.approx(concordance_index_censored(event.astype(bool), time, risk)[0], abs=1e-12)
    assert c == pytest.approx(harrell_by_pairs(time, event, risk), abs=1e-12)
    # a discrete score with many ties (first covariate rounded)
    coarse = np.round(x[:, 0] / 10.0)
    assert harrell_c(time, event, coarse) == pytest.approx(harrell_by_pairs(time, event, coarse), abs=1e-12)
    # tensors work as well
    assert harrell_c(torch.tensor(time), torch.tensor(event), torch.tensor(risk)[:, None]) == pytest.approx(c)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_uno_c_matches_its_definition(seed):
    time, event, risk = simulated_cohort(600, seed)
    assert 0.2 < 1 - event.mean() < 0.5  # a real share of censoring, so the weights matter
    tr, te = split(len(time), seed)
    tau = float(np.quantile(time[tr], 0.8))
    got = uno_c(time[tr], event[tr], time[te], event[te], risk[te], tau=tau)
    assert got == pytest.approx(uno_by_pairs(time[tr], event[tr], time[te], event[te], risk[te], tau), abs=1e-12)
    assert got != pytest.approx(harrell_c(time[te], event[te], risk[te]), abs=1e-4)  # the weights act
    assert got > 0.65
    # without censoring the IPC weights are all 1 and Uno's C is Harrell's C
    full = np.ones_like(event)
    inside = time[te] < time[tr].max()
    assert uno_c(time[tr], full[tr], time[te][inside], full[te][inside], risk[te][inside]) == pytest.approx(
        harrell_c(time[te][inside], full[te][inside], risk[te][inside]), abs=1e-12)


def test_time_dependent_auc_without_censoring_is_roc_auc():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    n = 400
    risk = rng.normal(size=n)
    t = rng.exponential(np.exp(-risk)) * 365.0
    event = np.ones(n, dtype=int)
    horizons = np.quantile(t, [0.25, 0.5, 0.75])
    auc, mean_auc = time_dependent_auc(t, event, t, event, risk, horizons)
    for h, a in zip(horizons, auc, strict=True):
        alive = t > h
        assert a == pytest.approx(roc_auc_score(~alive, risk), abs=1e-12)
    assert auc.shape == (3,) and 0.5 < mean_auc < 1.0


@pytest.mark.parametrize("seed", [0, 3])
def test_time_dependent_auc_matches_its_definition_under_censoring(seed):
    from lifelines import KaplanMeierFitter

    time, event, risk = simulated_cohort(600, seed)
    tr, te = split(len(time), seed)
    # the largest time in train: the censoring weights are known over the whole test follow-up
    longest = np.argmax(time)
    tr, te = np.union1d(tr, [longest]), np.setdiff1d(te, [longest])
    horizons = np.quantile(time[te], [0.1, 0.3, 0.5])
    auc, mean_auc = time_dependent_auc(time[tr], event[tr], time[te], event[te], risk[te], horizons)
    expected = [cumulative_dynamic_auc_by_pairs(time[tr], event[tr], time[te], event[te], risk[te], h) for h in horizons]
    np.testing.assert_allclose(auc, expected, atol=1e-12)
    # the mean weights each horizon by the drop of the test set's Kaplan-Meier curve over it
    surv = KaplanMeierFitter().fit(time[te], event[te]).survival_function_at_times(horizons).to_numpy()
    drops = -np.diff(np.r_[1.0, surv])
    assert mean_auc == pytest.approx(float((drops * np.asarray(expected)).sum() / (1.0 - surv[-1])), abs=1e-12)


@pytest.mark.parametrize("name", ["rossi", "gbsg2"])
def test_breslow_baseline_matches_lifelines(name):
    x, time, event = DATASETS[name]()
    risk, cph, df = cox_risk(x, time, event)
    base = BreslowBaseline().fit(risk, time, event)
    # lifelines centres covariates: its baseline is at the mean risk, like ours
    ref = cph.baseline_cumulative_hazard_.iloc[:, 0]
    np.testing.assert_allclose(base.baseline(ref.index.to_numpy()), ref.to_numpy(), rtol=1e-9, atol=1e-12)
    # observed times only: between them lifelines interpolates linearly, we keep the step function
    times = np.quantile(time, [0.0, 0.1, 0.5, 0.9, 1.0], method="nearest")
    surv = base.survival(risk[:20], times)
    ref_surv = cph.predict_survival_function(df.iloc[:20], times=times).to_numpy().T
    assert surv.shape == (20, 5)
    np.testing.assert_allclose(surv, ref_surv, rtol=1e-9, atol=1e-12)
    # JSON round trip (plain lists)
    again = BreslowBaseline.from_dict(json.loads(json.dumps(base.to_dict())))
    np.testing.assert_array_equal(again.survival(risk, times), base.survival(risk, times))
    # before the first time H = 0; after the last it stays constant
    assert base.baseline([np.nextafter(time.min(), -np.inf)])[0] == 0.0
    assert base.baseline([time.max() * 10])[0] == base.cumulative_hazard[-1]


def test_integrated_brier():
    from sksurv.metrics import integrated_brier_score
    from sksurv.util import Surv

    x, time, event = gbsg2()
    risk, _, _ = cox_risk(x, time, event)
    tr, te = split(len(time), seed=3)
    base = BreslowBaseline().fit(risk[tr], time[tr], event[tr])
    times = np.linspace(np.quantile(time[te], 0.1), np.quantile(time[te], 0.8), 20)
    surv = base.survival(risk[te], times)
    got = integrated_brier(time[tr], event[tr], time[te], event[te], surv, times)
    ref = integrated_brier_score(Surv.from_arrays(event[tr].astype(bool), time[tr]),
                                 Surv.from_arrays(event[te].astype(bool), time[te]), surv, times)
    assert got == pytest.approx(ref, abs=1e-12) and 0.0 < got < 0.25
    # without censoring: the trapezoid average of mean((1{T > t} - S(t))^2) over the time range
    rng = np.random.default_rng(4)
    t = rng.exponential(1000.0, size=300)
    full = np.ones(300, dtype=int)
    grid = np.linspace(100.0, 1500.0, 15)
    s = np.exp(-grid / 1000.0)[None, :].repeat(300, 0)
    brier = ((t[:, None] > grid[None, :]) - s) ** 2
    expected = np.trapezoid(brier.mean(0), grid) / (grid[-1] - grid[0])
    assert integrated_brier(t, full, t, full, s, grid) == pytest.approx(expected, abs=1e-12)


def test_concordance_metric_accumulates_batches():
    x, time, event = whas500()
    risk, _, _ = cox_risk(x, time, event)
    metric = ConcordanceIndex()
    for part in np.array_split(np.arange(len(time)), 7):
        metric.update(torch.tensor(risk[part])[:, None], torch.tensor(time[part]), torch.tensor(event[part]))
    assert metric.compute().item() == pytest.approx(harrell_c(time, event, risk), abs=1e-6)
    metric.reset()
    metric.update(torch.zeros(3), torch.ones(3), torch.zeros(3))
    assert torch.isnan(metric.compute())


@pytest.mark.parametrize("time,event,match", [
    ([1.0, -2.0, 3.0], [1, 0, 1], "negative"),
    ([1.0, float("nan"), 3.0], [1, 0, 1], "NaN"),
    ([1.0, 2.0, float("inf")], [1, 0, 1], "NaN or inf"),
    ([1.0, 2.0, 3.0], [1, 2, 1], "not 0 or 1"),
    ([1.0, 2.0, 3.0], [0, 0, 0], "censored"),
    ([1.0, 2.0, 3.0], [1, 0], "length mismatch"),
    ([], [], "empty|no rows"),
    ([[1.0, 2.0]], [[1, 0]], "1-D"),
])
def test_bad_inputs(time, event, match):
    with pytest.raises(ValueError, match=match):
        check_survival_arrays(time, event)
    if match not in ("length mismatch", "empty|no rows", "1-D"):
        with pytest.raises(ValueError, match=match):
            harrell_c(time, event, [0.1, 0.2, 0.3])


def test_bad_risk_and_no_pairs():
    with pytest.raises(ValueError, match="risk"):
        harrell_c([1.0, 2.0], [1, 0], [0.1, float("nan")])
    with pytest.raises(ValueError, match="rows"):
        harrell_c([1.0, 2.0], [1, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="comparable"):
        harrell_c([5.0, 2.0], [1, 0], [0.1, 0.2])  # the only event has the longest time
    assert check_survival_arrays([1, 2], [0, 0], require_event=False)[1].dtype == bool


def test_test_follow_up_beyond_train_is_censored_at_the_last_train_time():
    x, time, event = whas500()
    risk, _, _ = cox_risk(x, time, event)
    short = time < np.quantile(time, 0.7)
    tr, te = np.flatnonzero(short), np.flatnonzero(~short | (np.arange(len(time)) % 2 == 0))
    last = time[tr].max()
    horizons = np.quantile(time[tr], [0.2, 0.5, 0.8])
    auc, _ = time_dependent_auc(time[tr], event[tr], time[te], event[te], risk[te], horizons)
    # the same as administratively censoring the test follow-up at the last train time ourselves
    clip_t = np.minimum(time[te], last)
    clip_e = np.where(time[te] > last, 0, event[te])
    ref, _ = time_dependent_auc(time[tr], event[tr], clip_t, clip_e, risk[te], horizons)
    np.testing.assert_allclose(auc, ref, atol=1e-12)
    assert 0.5 < uno_c(time[tr], event[tr], time[te], event[te], risk[te]) < 1.0
    with pytest.raises(ValueError, match="largest train time"):
        time_dependent_auc(time[tr], event[tr], time[te], event[te], risk[te], [last])
