"""NRI, IDI and time-dependent AUC at a horizon (fahr.stats.incremental), the bootstrap helpers, and
the age-adjusted FaceAge gap (fahr.stats.gap): hand-computed examples, the binary-outcome
reduction, and references (lifelines Kaplan-Meier and Cox, scikit-survival AUC, closed-form ANCOVA).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.datasets import load_rossi
from sksurv.metrics import cumulative_dynamic_auc
from sksurv.util import Surv

from fahr.stats import clinical as cl
from fahr.stats.bootstrap import canonical_order, percentile_ci, resample_indices
from fahr.stats.gap import faceage_gap
from fahr.stats.incremental import (
    idi_survival,
    incremental_table,
    ipcw_weights,
    km_at,
    nri_survival,
    risk_categories,
)

# Six patients, horizon 5. Patient 2 is censored before the horizon; patient 4 dies after it (a
# non-event at 5). The new model moves patients 0, 1, 4 up (0.2 -> 0.3) and 2, 3, 5 down (-> 0.1).
TIME = np.array([1.0, 2.0, 3.0, 6.0, 7.0, 8.0])
EVENT = np.array([1, 1, 0, 0, 1, 0])
P_OLD = np.full(6, 0.2)
P_NEW = np.array([0.3, 0.3, 0.1, 0.1, 0.3, 0.1])
H = 5.0


def test_nri_continuous_by_hand():
    # KM by 5: everyone 5/6 * 4/5 = 2/3 -> P(D) = 1/3; "up" {0,1,4}: 2/3 * 1/2 = 1/3 -> P(D|up) = 2/3;
    # "down" {2,3,5}: no event -> P(D|down) = 0; P(up) = P(down) = 1/2.
    # NRI_events = (2/3 * 1/2 - 0) / (1/3) = 1; NRI_nonevents = (1 * 1/2 - 1/3 * 1/2) / (2/3) = 1/2.
    r = nri_survival(TIME, EVENT, P_OLD, P_NEW, H)
    assert r["nri_events"] == pytest.approx(1.0, abs=1e-12)
    assert r["nri_nonevents"] == pytest.approx(0.5, abs=1e-12)
    assert r["nri"] == pytest.approx(1.5, abs=1e-12)
    assert r["p_up"] == r["p_down"] == 0.5


def test_nri_categorical_by_hand():
    # cut at 0.25: old risks all in category 0; 0.3 -> category 1 (up), 0.1 stays in 0 (no move).
    # NRI_events = (2/3 * 1/2) / (1/3) = 1; NRI_nonevents = (0 - 1/3 * 1/2) / (2/3) = -1/4.
    r = nri_survival(TIME, EVENT, P_OLD, P_NEW, H, cutoffs=[0.25])
    assert (r["nri_events"], r["nri_nonevents"], r["nri"]) == pytest.approx((1.0, -0.25, 0.75), abs=1e-12)
    assert list(risk_categories(np.array([0.05, 0.06, 0.1, 0.2, 0.5]), [0.06, 0.2])) == [0, 1, 1, 2, 2]


def test_idi_by_hand():
    # censoring KM G: 3/4 after t=3. Cases 0, 1 weigh 1/G(T-) = 1; controls (T > 5: 3, 4, 5) weigh
    # 1/G(5) = 4/3; patient 2 (censored at 3) weighs 0. Risk changes: cases +0.1, +0.1; controls
    # -0.1, +0.1, -0.1 (mean -1/30). IDI = 0.1 - (-1/30) = 2/15.
    w_case, w_control = ipcw_weights(TIME, EVENT, H)
    assert list(w_case) == pytest.approx([1, 1, 0, 0, 0, 0])
    assert list(w_control) == pytest.approx([0, 0, 0, 4 / 3, 4 / 3, 4 / 3])
    r = idi_survival(TIME, EVENT, P_OLD, P_NEW, H)
    assert r["idi"] == pytest.approx(2 / 15, abs=1e-12)
    assert r["idi_events"] == pytest.approx(0.1, abs=1e-12) and r["idi_nonevents"] == pytest.approx(1 / 30, abs=1e-12)
    assert r["slope_old"] == pytest.approx(0.0, abs=1e-12)


def test_no_censoring_before_horizon_is_the_binary_nri_and_idi():
    rng = np.random.default_rng(0)
    n = 300
    time = rng.uniform(0, 10, n)
    event = (rng.uniform(size=n) < 0.7).astype(int)
    event[time <= 4] = 1  # nobody censored before the horizon
    p_old, p_new = rng.uniform(0.05, 0.9, n), rng.uniform(0.05, 0.9, n)
    d = time <= 4
    up, down = p_new > p_old, p_new < p_old
    nri = nri_survival(time, event, p_old, p_new, 4.0)
    assert nri["nri_events"] == pytest.approx((up[d].sum() - down[d].sum()) / d.sum(), abs=1e-12)
    assert nri["nri_nonevents"] == pytest.approx((down[~d].sum() - up[~d].sum()) / (~d).sum(), abs=1e-12)
    cut_old, cut_new = np.digitize(p_old, [0.2, 0.5]), np.digitize(p_new, [0.2, 0.5])
    cat = nri_survival(time, event, p_old, p_new, 4.0, [0.2, 0.5])
    expected = ((cut_new > cut_old)[d].mean() - (cut_new < cut_old)[d].mean()
                + (cut_new < cut_old)[~d].mean() - (cut_new > cut_old)[~d].mean())
    assert cat["nri"] == pytest.approx(expected, abs=1e-12)
    delta = p_new - p_old
    idi = idi_survival(time, event, p_old, p_new, 4.0)
    assert idi["idi"] == pytest.approx(delta[d].mean() - delta[~d].mean(), abs=1e-12)


def test_kaplan_meier_and_ipcw_weights_match_lifelines():
    df = load_rossi()
    t, e = df["week"].to_numpy(float), df["arrest"].to_numpy()
    kmf = KaplanMeierFitter().fit(t, e)
    for at in (10.0, 26.0, 30.5, 52.0):
        assert km_at(t, e, at) == pytest.approx(float(kmf.survival_function_at_times(at).iloc[0]), abs=1e-12)
    # IPCW and KM agree on P(event by t) when event and censoring times do not tie
    rng = np.random.default_rng(1)
    time = rng.exponential(5, 200)
    event = rng.uniform(size=200) < 0.6
    w_case, w_control = ipcw_weights(time, event, 3.0)
    assert w_case.sum() / 200 == pytest.approx(1 - km_at(time, event, 3.0), abs=1e-12)
    assert w_control.sum() / 200 == pytest.approx(km_at(time, event, 3.0), abs=1e-12)


def test_nri_needs_events_and_nonevents():
    with pytest.raises(ValueError, match="events and non-events"):
        nri_survival(TIME, EVENT, P_OLD, P_NEW, 0.5)
    with pytest.raises(ValueError, match="event by the horizon"):
        idi_survival(TIME, EVENT, P_OLD, P_NEW, 0.5)


def _rossi() -> pd.DataFrame:
    """Rossi plus one arrest in week 53: scikit-survival refuses Rossi itself (everyone still followed
    is censored at week 52, so the censoring KM is 0 there), and so would be no reference."""
    df = load_rossi()
    return pd.concat([df, df.iloc[[0]].assign(week=53, arrest=1)], ignore_index=True)


def _rossi_frame() -> tuple[pd.DataFrame, list[str], list[cl.Marker]]:
    df = _rossi()
    frame = pd.DataFrame({cl.TIME: df["week"].astype(float), cl.EVENT: df["arrest"].astype(int),
                          "fin": df["fin"].astype(float), "prio": df["prio"].astype(float),
                          "age": df["age"].astype(float)})
    return frame, ["fin", "prio"], [cl.Marker("age", "Age", "age", 10.0, "per 10 years")]


def test_incremental_table_matches_lifelines_and_sksurv_and_is_order_free():
    frame, clinical, markers = _rossi_frame()
    table, risks = incremental_table(frame, clinical, markers, 26.0, [0.1, 0.2], n_boot=12, seed=3)
    est = table.set_index("key")["estimate"]
    cols = ["week", "arrest"]
    df = _rossi()
    old = CoxPHFitter().fit(df[[*cols, "fin", "prio"]], *cols)
    new = CoxPHFitter().fit(df[[*cols, "fin", "prio", "age"]], *cols)
    p_old = 1 - old.predict_survival_function(df, times=[26.0]).to_numpy()[0]
    p_new = 1 - new.predict_survival_function(df, times=[26.0]).to_numpy()[0]
    assert risks["clinical"] == pytest.approx(p_old, abs=1e-9) and risks["age"] == pytest.approx(p_new, abs=1e-9)
    y = Surv.from_arrays(event=df["arrest"].astype(bool), time=df["week"].astype(float))
    for key, p in (("auc_clinical", p_old), ("auc_marker", p_new)):
        auc, _ = cumulative_dynamic_auc(y, y, p, [26.0])
        assert est[key] == pytest.approx(float(auc[0]), abs=1e-9)
    assert est["delta_auc"] == pytest.approx(est["auc_marker"] - est["auc_clinical"], abs=1e-12)
    assert est["nri"] == pytest.approx(nri_survival(df["week"], df["arrest"], p_old, p_new, 26.0)["nri"], abs=1e-9)
    assert est["idi"] == pytest.approx(idi_survival(df["week"], df["arrest"], p_old, p_new, 26.0)["idi"], abs=1e-9)
    assert (table["resamples"] == 12).all()
    assert (table["ci_low"] <= table["ci_high"]).all()
    # the same seed on shuffled rows gives the same table; another seed another CI
    shuffled = frame.sample(frac=1.0, random_state=5)
    again, _ = incremental_table(shuffled, clinical, markers, 26.0, [0.1, 0.2], n_boot=12, seed=3)
    pd.testing.assert_frame_equal(table, again)
    # on Rossi itself (censoring KM 0 at week 52) the patients followed past 26 weeks are scored as
    # censored just after it: scikit-survival then runs, and agrees with the week-53 reference above
    rossi = frame.iloc[:-1]
    with pytest.raises(ValueError, match="censoring survival function is zero"):
        y = Surv.from_arrays(event=rossi[cl.EVENT].astype(bool), time=rossi[cl.TIME])
        cumulative_dynamic_auc(y, y, p_old[:-1], [26.0])
    plain, _ = incremental_table(rossi, clinical, markers, 26.0, [0.1, 0.2], n_boot=0, seed=3)
    assert np.isfinite(plain["estimate"]).all() and 0.5 < plain.set_index("key").loc["auc_marker", "estimate"] < 1
    other, _ = incremental_table(frame, clinical, markers, 26.0, [0.1, 0.2], n_boot=12, seed=4)
    assert not np.allclose(other["ci_low"], table["ci_low"])


def test_bootstrap_helpers():
    a = resample_indices(10, 5, seed=1, stream=(2,))
    assert a.shape == (5, 10) and (a == resample_indices(10, 5, seed=1, stream=(2,))).all()
    assert not (a == resample_indices(10, 5, seed=1, stream=(3,))).all()
    values = np.array([np.nan, *np.arange(100.0)])
    assert percentile_ci(values) == pytest.approx(tuple(np.quantile(np.arange(100.0), [0.025, 0.975])))
    assert all(math.isnan(v) for v in percentile_ci(np.array([1.0, np.nan])))
    frame = pd.DataFrame({"a": [2.0, 1.0, 1.0], "b": ["x", "z", "y"]})
    assert list(canonical_order(frame)) == [2, 1, 0]


# ---------------------------------------------------------------- the FaceAge gap


def test_gap_recovered_exactly_without_noise():
    rng = np.random.default_rng(0)
    ref_age, cohort_age = rng.uniform(20, 90, 300), rng.uniform(40, 90, 150)
    fit = faceage_gap(cohort_age, 3 + 0.9 * cohort_age + 4.8, ref_age, 3 + 0.9 * ref_age)
    assert fit["gap"] == pytest.approx(4.8, abs=1e-9) and fit["se"] == pytest.approx(0.0, abs=1e-9)
    assert fit["ci_low"] == pytest.approx(4.8, abs=1e-8) and fit["ci_high"] == pytest.approx(4.8, abs=1e-8)
    assert fit["slope"] == pytest.approx(0.9, abs=1e-12) and fit["intercept"] == pytest.approx(3.0, abs=1e-9)
    # the raw gap is confounded by age (the cohort is older and the slope is not 1); the adjusted one is not
    assert fit["raw_gap_cohort"] == pytest.approx(3 + 4.8 - 0.1 * cohort_age.mean(), abs=1e-9)


def test_gap_standard_error_is_the_ancova_formula():
    rng = np.random.default_rng(1)
    ref_age, cohort_age = rng.uniform(20, 90, 400), rng.uniform(40, 90, 120)
    ref_fa = ref_age + rng.normal(0, 6, 400)
    cohort_fa = cohort_age + 4.8 + rng.normal(0, 6, 120)
    fit = faceage_gap(cohort_age, cohort_fa, ref_age, ref_fa)
    # common-slope ANCOVA: slope from the pooled within-group regression; gap = difference of the
    # adjusted means; Var = s^2 (1/n1 + 1/n0 + (mean1 - mean0)^2 / Sxx_within)
    sxx = ((ref_age - ref_age.mean()) ** 2).sum() + ((cohort_age - cohort_age.mean()) ** 2).sum()
    sxy = (((ref_age - ref_age.mean()) * (ref_fa - ref_fa.mean())).sum()
           + ((cohort_age - cohort_age.mean()) * (cohort_fa - cohort_fa.mean())).sum())
    slope = sxy / sxx
    gap = (cohort_fa.mean() - ref_fa.mean()) - slope * (cohort_age.mean() - ref_age.mean())
    resid = np.concatenate([ref_fa - ref_fa.mean() - slope * (ref_age - ref_age.mean()),
                            cohort_fa - cohort_fa.mean() - slope * (cohort_age - cohort_age.mean())])
    s2 = (resid ** 2).sum() / (520 - 3)
    se = math.sqrt(s2 * (1 / 120 + 1 / 400 + (cohort_age.mean() - ref_age.mean()) ** 2 / sxx))
    assert fit["gap"] == pytest.approx(gap, abs=1e-9) and fit["se"] == pytest.approx(se, abs=1e-9)
    assert fit["slope"] == pytest.approx(slope, abs=1e-12)
    assert fit["ci_low"] < 4.8 < fit["ci_high"]
    assert fit["ci_high"] - fit["gap"] == pytest.approx(1.96 * se, rel=0.01)


def test_gap_refuses_constant_ages():
    with pytest.raises(ValueError, match="do not vary"):
        faceage_gap([50, 50], [55, 56], [50, 50, 50], [49, 50, 51])
