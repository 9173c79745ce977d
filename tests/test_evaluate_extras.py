"""`fahr evaluate` with subgroups, incremental value at a horizon and the FaceAge gap: the outputs
agree with the library functions on the same patients, and bad options or files give one line.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from lifelines.utils import concordance_index

from conftest import compose_config
from fahr.config.evaluate_schema import register_evaluate_schema
from fahr.pipeline.evaluate import evaluate
from fahr.stats.gap import faceage_gap
from test_hostile_evaluate import ID_NUMBER, ID_TEXT, cohort

EXTRA = ["columns.age=age", "subgroups.columns=[sex,age_decade]", "incremental.horizon=365", "bootstrap.n=20",
         "covariates=[age,sex]", "columns.patient=pid"]


def reference(n: int = 150, gap: float = 4.8, seed: int = 5) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    age = rng.uniform(30, 90, n).round(1)
    return pd.DataFrame({"age": age, "faceage": (age - gap + rng.normal(0, 3, n)).round(2)})


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extras")
    df = cohort()
    df.to_csv(tmp / "cohort.csv", index=False)
    reference().to_csv(tmp / "reference.csv", index=False)
    register_evaluate_schema()
    cfg = compose_config("evaluate", [f"input={tmp / 'cohort.csv'}", f"output={tmp / 'out'}", *EXTRA,
                                      f"gap.reference={tmp / 'reference.csv'}"])
    return evaluate(cfg), tmp / "out", df


def test_outputs_agree_with_the_statistics(full_run):
    summary, out, df = full_run
    for name in ("subgroups.csv", "incremental.csv", "faceage_gap.csv", "subgroups.png", "incremental.png",
                 "faceage_gap.png"):
        data = (out / name).read_bytes()
        assert len(data) > 200 and ID_TEXT.encode() not in data and ID_NUMBER.encode() not in data
    sub = pd.read_csv(out / "subgroups.csv", keep_default_na=False, na_values=[""]).fillna({"marker": ""})
    overall = sub[(sub["group"] == "all")].set_index(["statistic", "marker"])["estimate"]
    assert overall[("C-index (Harrell)", "risk")] == pytest.approx(concordance_index(df.time, -df.risk, df.event))
    assert overall[("FaceAge MAE (years)", "")] == pytest.approx((df.faceage - df.age).abs().mean())
    assert set(sub["group"]) == {"all", "sex", "age decade"}
    inc = pd.read_csv(out / "incremental.csv", keep_default_na=False, na_values=[""])
    assert set(inc["marker"]) == {"faceage", "risk"} and (inc["horizon"] == 365).all()
    assert inc["estimate"].notna().all() and (inc["resamples"] == 20).all()
    gap = pd.read_csv(out / "faceage_gap.csv").iloc[0]
    # the cohort's FaceAge is age + noise (mean -1.2 in this sample), the reference's age - 4.8
    ref = reference()
    fit = faceage_gap(df.age, df.faceage, ref.age, ref.faceage)
    assert gap["gap"] == pytest.approx(fit["gap"], abs=1e-9) and gap["ci_low"] == pytest.approx(fit["ci_low"], abs=1e-9)
    assert 2.5 < gap["gap"] < 5 and gap["n_cohort"] == 200 and gap["n_reference"] == 150
    report = (out / "report.md").read_text()
    for text in ("## 6. Subgroups", "## 7. Incremental value at t = 365 days", "## 8. FaceAge gap",
                 "subgroups.png", "incremental.png", "faceage_gap.png"):
        assert text in report
    stored = json.loads((out / "summary.json").read_text())
    assert stored["figures"] == {"subgroups": "subgroups.png", "incremental": "incremental.png",
                                 "faceage_gap": "faceage_gap.png"}
    assert len(stored["tables"]["incremental"]) == len(inc)
    assert summary["config"]["bootstrap"] == {"n": 20, "seed": 0}


def test_rerun_without_the_analyses_removes_their_files(full_run, tmp_path):
    _, out, df = full_run
    register_evaluate_schema()
    cfg = compose_config("evaluate", [f"input={out.parent / 'cohort.csv'}", f"output={out}", "covariates=[age,sex]",
                                      "markers.risk.column=absent"])
    evaluate(cfg)
    for name in ("subgroups.csv", "incremental.csv", "faceage_gap.csv", "subgroups.png", "incremental.png",
                 "faceage_gap.png"):
        assert not (out / name).exists()


BAD = {
    "missing group column": (["subgroups.columns=[site]"], "subgroups.columns[0]='site'"),
    "age decade without age": (["subgroups.columns=[age_decade]"], "set columns.age"),
    "group is the patient id": (["subgroups.columns=[pid]"], "subgroups.columns[0]='pid' is columns.patient"),
    "group is an identifier": (["subgroups.columns=[num_id]"], "an identifier or free text"),
    "age is text": (["columns.age=sex"], "columns.age='sex' is not numeric"),
    "horizon past follow-up": (["incremental.horizon=99999"], "incremental.horizon=99999 is not below"),
    "horizon before any event": (["incremental.horizon=0.5"], "no event at or before it"),
    "horizon not positive": (["incremental.horizon=0"], "incremental.horizon must be greater than 0"),
    "cutoffs not increasing": (["incremental.horizon=365", "incremental.cutoffs=[0.3,0.1]"],
                               "incremental.cutoffs=[0.3, 0.1]"),
    "cutoff above 1": (["incremental.horizon=365", "incremental.cutoffs=[0.2,1.5]"], "incremental.cutoffs"),
    "too few resamples": (["bootstrap.n=5"], "bootstrap.n must be"),
    "gap without age": (["gap.reference=REF"], "gap.reference needs the cohort's age"),
    "gap file missing": (["columns.age=age", "gap.reference=NOPE"], "gap.reference"),
    "gap column missing": (["columns.age=age", "gap.reference=REF", "gap.faceage=fa"], "gap.faceage='fa'"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_options_and_files_give_one_line(name, tmp_path, run_fahr):
    args, expected = BAD[name]
    cohort(n=80).to_csv(tmp_path / "cohort.csv", index=False)
    reference(n=30).to_csv(tmp_path / "ref.csv", index=False)
    args = [a.replace("=REF", f"={tmp_path / 'ref.csv'}").replace("=NOPE", f"={tmp_path / 'nope.csv'}") for a in args]
    r = run_fahr("evaluate", f"input={tmp_path / 'cohort.csv'}", f"output={tmp_path / 'out'}", "columns.patient=pid",
                 "covariates=[age,sex]", "markers.risk.column=absent", *args)
    lines = [line for line in r.err.splitlines() if line.strip()]
    assert r.status == 2 and len(lines) == 1 and lines[0].startswith("fahr evaluate: error: "), r.err
    assert expected in lines[0], lines[0]
    assert ID_TEXT not in r.err + r.out and ID_NUMBER not in r.err + r.out and "Traceback" not in r.err
