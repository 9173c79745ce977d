"""Subgroup statistics (fahr.stats.subgroups): the one-covariate Efron Cox fit against lifelines, the
per-group numbers against direct computations, bootstrap determinism, row-order independence, flags.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter
from lifelines.datasets import load_rossi
from lifelines.utils import concordance_index

from fahr.stats.subgroups import SubgroupData, age_decades, cox_efron_1d, level_labels, subgroup_table


@pytest.mark.parametrize("column", ["age", "prio", "fin"])
def test_cox_efron_1d_equals_lifelines(column):
    df = load_rossi()  # 114 arrests with many tied weeks: the Efron correction matters
    ref = CoxPHFitter().fit(df[["week", "arrest", column]], "week", "arrest")
    coef, se, ok = cox_efron_1d(df["week"], df["arrest"], df[column])
    assert ok
    assert coef == pytest.approx(float(ref.params_[column]), abs=1e-6)
    assert se == pytest.approx(float(ref.standard_errors_[column]), abs=1e-6)


def test_cox_efron_1d_refuses_separation_and_no_events():
    time = np.arange(1.0, 21.0)
    x = -time  # the earlier, the higher: perfect separation
    event = np.ones(20)
    assert cox_efron_1d(time, event, x)[2] is False
    assert cox_efron_1d(time, np.zeros(20), np.sin(time))[2] is False
    assert cox_efron_1d(time, event, np.ones(20))[2] is False


def cohort(n: int = 240, seed: int = 0) -> tuple[SubgroupData, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    age = rng.uniform(40, 85, n)
    sex = rng.choice(["F", "M"], n)
    faceage = age + rng.normal(0, 5, n) + np.where(sex == "M", 6.0, 0.0)  # men look 6 years older
    risk = rng.normal(0, 1, n)
    t = rng.exponential(500 / np.exp(0.7 * risk))
    c = rng.uniform(100, 1000, n)
    time, event = np.minimum(t, c).round(), (t <= c).astype(int)
    df = pd.DataFrame({"time": time, "event": event, "age": age, "faceage": faceage, "risk": risk, "sex": sex})
    data = SubgroupData(time, event, {"risk": risk, "faceage": faceage}, {"risk": "Risk", "faceage": "FaceAge"},
                        faceage, age, {"sex": level_labels(df["sex"]), "age decade": age_decades(age)})
    return data, df


def test_group_estimates_equal_direct_computations():
    data, df = cohort()
    table = subgroup_table(data, n_boot=20, seed=0, min_n=20, min_events=5)
    rows = table.set_index(["statistic", "marker", "group", "level"])
    sd = df["risk"].std(ddof=1)
    for level, part in [("all", df), ("F", df[df.sex == "F"]), ("M", df[df.sex == "M"])]:
        group = "all" if level == "all" else "sex"
        err = part["faceage"] - part["age"]
        assert rows.loc[("FaceAge MAE (years)", "", group, level), "estimate"] == pytest.approx(err.abs().mean(), abs=1e-12)
        assert rows.loc[("FaceAge mean signed error (years)", "", group, level), "estimate"] == pytest.approx(err.mean(),
                                                                                                         abs=1e-12)
        c = concordance_index(part["time"], -part["risk"], part["event"])
        assert rows.loc[("C-index (Harrell)", "risk", group, level), "estimate"] == pytest.approx(c, abs=1e-12)
        ref = CoxPHFitter().fit(part[["time", "event"]].assign(x=part["risk"] / sd), "time", "event")
        hr = rows.loc[("HR per SD", "risk", group, level), "estimate"]
        assert hr == pytest.approx(math.exp(ref.params_["x"]), rel=1e-5)
    # men look 6 years older, women 0: both mean-error CIs exclude the overall (about 3) and are flagged
    me = table[(table["statistic"] == "FaceAge mean signed error (years)") & (table["group"] == "sex")]
    assert me["excludes_overall"].all() and me["note"].str.contains("excludes the overall").all()
    assert (table["ci_low"] <= table["estimate"]).sum() > 0.9 * table["estimate"].notna().sum()
    assert set(table["level"][table["group"] == "age decade"]) == {"40-49", "50-59", "60-69", "70-79", "80-89"}


def test_bootstrap_is_seeded_and_free_of_row_order():
    data, df = cohort(n=150, seed=2)
    table = subgroup_table(data, n_boot=15, seed=7, min_n=20, min_events=5)
    order = np.random.default_rng(9).permutation(150)
    shuffled = SubgroupData(data.time[order], data.event[order], {k: v[order] for k, v in data.markers.items()},
                            data.labels, data.faceage[order], data.age[order],
                            {k: v[order] for k, v in data.groups.items()})
    pd.testing.assert_frame_equal(table, subgroup_table(shuffled, n_boot=15, seed=7, min_n=20, min_events=5))
    other = subgroup_table(data, n_boot=15, seed=8, min_n=20, min_events=5)
    assert not np.allclose(other["ci_low"].fillna(0), table["ci_low"].fillna(0))
    # a group's resamples do not depend on the other groups
    only_sex = SubgroupData(data.time, data.event, data.markers, data.labels, data.faceage, data.age,
                            {"sex": data.groups["sex"]})
    small = subgroup_table(only_sex, n_boot=15, seed=7, min_n=20, min_events=5)
    key = ["statistic", "marker", "group", "level"]
    merged = small.merge(table, on=key, suffixes=("", "_full"))
    assert len(merged) == len(small) and np.allclose(merged["ci_low"], merged["ci_low_full"])


def test_small_groups_and_missing_levels():
    data, df = cohort(n=120, seed=3)
    site = np.array(["lung"] * 100 + ["rare"] * 12 + [None] * 8, dtype=object)
    data.groups = {"site": site}
    table = subgroup_table(data, n_boot=10, seed=0, min_n=20, min_events=5)
    rare = table[table["level"] == "rare"]
    assert rare["estimate"].isna().all() and rare["note"].str.startswith("group too small: 12 patients").all()
    lung = table[table["level"] == "lung"]
    assert (lung["n"] == 100).all() and lung["estimate"].notna().all()  # the 8 without a site are left out
    assert level_labels(pd.Series([1.0, 2, None, True, "x", 918273601])).tolist() == ["1", "2", None, "True", "x",
                                                                                     "918273601"]
