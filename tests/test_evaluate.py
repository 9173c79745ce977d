"""`fahr evaluate` reproduces lifelines on the Rossi recidivism data and rejects bad input clearly.

Rossi (lifelines.datasets.load_rossi): 432 prisoners, time = week of arrest (52 = censored), event =
arrest; the `age` column stands in for FaceAge (HR per 10 years), the other columns are covariates.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter
from lifelines.datasets import load_rossi
from conftest import REPO, compose_config
from fahr.boundary import InputError
from fahr.config.evaluate_schema import register_evaluate_schema
from fahr.pipeline.evaluate import evaluate
from fahr.stats.validation import check_survival_arrays, validate_survival_table

COVARIATES = ["fin", "race", "wexp", "mar", "paro", "prio"]
ROSSI_ARGS = ["columns.time=week", "columns.event=arrest", "markers.faceage.column=age",
              f"covariates=[{','.join(COVARIATES)}]"]
TOL = 1e-6


def rossi() -> pd.DataFrame:
    return load_rossi()


def write(df: pd.DataFrame, tmp_path, name: str = "cohort.csv") -> str:
    path = tmp_path / name
    df.to_csv(path, index=False)
    return str(path)


def run(df: pd.DataFrame, tmp_path, *overrides: str) -> dict:
    register_evaluate_schema()
    cfg = compose_config("evaluate", [f"input={write(df, tmp_path)}", f"output={tmp_path / 'out'}", *ROSSI_ARGS,
                                      *overrides])
    return evaluate(cfg)


def cox(df: pd.DataFrame, columns: list[str]) -> CoxPHFitter:
    return CoxPHFitter().fit(df[["week", "arrest", *columns]], "week", "arrest")


@pytest.fixture(scope="module")
def rossi_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rossi")
    return run(rossi(), tmp), tmp / "out"


def test_hazard_ratios_match_lifelines(rossi_run):
    summary, out = rossi_run
    table = pd.read_csv(out / "hazard_ratios.csv").set_index("model")
    for model, columns in (("adjusted", [*COVARIATES, "age"]), ("unadjusted", ["age"])):
        ref = cox(rossi(), columns)
        ci = ref.confidence_intervals_.loc["age"].to_numpy()
        row = table.loc[model]
        assert row["hr"] == pytest.approx(math.exp(10 * ref.params_["age"]), abs=TOL)
        assert row["ci_low"] == pytest.approx(math.exp(10 * ci[0]), abs=TOL)
        assert row["ci_high"] == pytest.approx(math.exp(10 * ci[1]), abs=TOL)
        assert row["p"] == pytest.approx(ref.summary.loc["age", "p"], abs=TOL)
        assert row["per"] == "per 10 years" and row["n"] == 432 and row["events"] == 114
    assert summary["skipped_markers"] == ["risk"]


def test_cindex_and_lrt_match_lifelines(rossi_run):
    _, out = rossi_run
    clinical, full = cox(rossi(), COVARIATES), cox(rossi(), [*COVARIATES, "age"])
    cindex = pd.read_csv(out / "cindex.csv").set_index("model")["c_index"]
    assert cindex["clinical"] == pytest.approx(clinical.concordance_index_, abs=TOL)
    assert cindex["clinical + FAHR-FaceAge"] == pytest.approx(full.concordance_index_, abs=TOL)
    lrt = pd.read_csv(out / "lrt.csv").iloc[0]
    assert lrt["chi2"] == 2 * (lrt["ll_full"] - lrt["ll_reduced"])  # exactly: the same fits
    assert lrt["ll_full"] == pytest.approx(full.log_likelihood_, abs=TOL)
    assert lrt["ll_reduced"] == pytest.approx(clinical.log_likelihood_, abs=TOL)
    assert lrt["df"] == 1 and 0 < lrt["p"] < 1


def test_quartiles_km_and_report(rossi_run):
    summary, out = rossi_run
    q = pd.read_csv(out / "quartiles.csv")
    assert list(q["quartile"]) == ["Q1", "Q2", "Q3", "Q4"]
    assert q["n"].sum() == 432 and q["events"].sum() == 114
    assert (q["min"].diff().dropna() > 0).all()  # Q1 lowest
    assert q.loc[0, "hr"] == 1.0 and q.loc[1:, "ci_low"].lt(q.loc[1:, "hr"]).all()
    # adjusted quartile HRs = a direct fit with Q2..Q4 indicators
    df = rossi()
    groups = pd.qcut(df["age"], 4, labels=["Q1", "Q2", "Q3", "Q4"])
    for k in ("Q2", "Q3", "Q4"):
        df[k] = (groups == k).astype(float)
    ref = cox(df, [*COVARIATES, "Q2", "Q3", "Q4"])
    assert q["hr"].iloc[1:].to_numpy() == pytest.approx(np.exp(ref.params_[["Q2", "Q3", "Q4"]].to_numpy()), abs=TOL)
    logrank = pd.read_csv(out / "logrank.csv").iloc[0]
    assert logrank["df"] == 3 and 0 <= logrank["p"] < 0.05
    png = (out / "km_faceage.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    report = (out / "report.md").read_text()
    for heading in ("Hazard ratios", "Risk quartiles", "Likelihood-ratio", "C-index", "In-sample", "km_faceage.png"):
        assert heading in report
    assert json.loads((out / "summary.json").read_text())["events"] == 114 == summary["events"]
    assert summary["flags"] == [] and "## Flags (0)" in report  # real data: nothing degenerate to flag


def test_two_markers_per_sd_and_categorical_covariate(tmp_path):
    df = rossi()
    df["risk"] = np.random.default_rng(0).normal(size=len(df)) + 0.1 * df["prio"]
    df["race"] = df["race"].map({0: "other", 1: "black"})  # most frequent: black (379 of 432)
    summary = run(df, tmp_path)
    out = tmp_path / "out"
    assert summary["covariates"][1] == {"column": "race", "kind": "categorical", "terms": ["race[other]"],
                                        "reference": "black", "levels": ["black", "other"]}
    df["race[other]"] = (df["race"] == "other").astype(float)
    covs = ["fin", "race[other]", "wexp", "mar", "paro", "prio"]
    ref = cox(df, [*covs, "risk"])
    sd = df["risk"].std(ddof=1)
    hr = pd.read_csv(out / "hazard_ratios.csv").query("marker == 'risk' and model == 'adjusted'").iloc[0]
    assert hr["hr"] == pytest.approx(math.exp(sd * ref.params_["risk"]), abs=TOL) and hr["per"] == "per 1 SD"
    both = cox(df, [*covs, "age", "risk"])
    cindex = pd.read_csv(out / "cindex.csv").set_index("model")["c_index"]
    assert len(cindex) == 4
    assert cindex["clinical + FAHR-FaceAge + FAHR-FaceSurvival"] == pytest.approx(both.concordance_index_, abs=TOL)
    lrt = pd.read_csv(out / "lrt.csv").set_index("model")
    assert lrt.loc["clinical + FAHR-FaceAge + FAHR-FaceSurvival", "df"] == 2


@pytest.mark.parametrize("numeric_interval", [False, True])
def test_far_per_interval_bin(tmp_path, numeric_interval):
    df = rossi()
    rng = np.random.default_rng(1)
    df["far"] = rng.normal(1.0, 0.2, size=len(df))
    days = rng.choice([100, 500, 1000], size=len(df))
    df["interval_bin"] = days if numeric_interval else pd.Series(days).map({100: "10-365", 500: "366-730", 1000: "731-1460"})
    run(df, tmp_path, "far.column=far")
    far = pd.read_csv(tmp_path / "out" / "far.csv")
    assert list(far["interval_bin"]) == ["10-365", "366-730", "731-1460"]
    part = df[days == 500]
    ref = cox(part, [*COVARIATES, "far"])
    expected = math.exp(part["far"].std(ddof=1) * ref.params_["far"])
    assert far.loc[1, "hr"] == pytest.approx(expected, abs=TOL) and far.loc[1, "n"] == len(part)


def test_typo_override_fails_naming_the_key(tmp_path):
    with pytest.raises(InputError, match="covariats"):  # fahr.config.schema.validate reports it as bad input
        run(rossi(), tmp_path, "+covariats=[fin]")


def _bad_negative_time(df):
    df.loc[3, "week"] = -1
    return "negative"


def _bad_nan_time(df):
    df["week"] = df["week"].astype(float)
    df.loc[3, "week"] = np.nan
    return "NaN"


def _bad_event(df):
    df.loc[3, "arrest"] = 2
    return "not 0 or 1"


def _all_censored(df):
    df["arrest"] = 0
    return "censored"


def _conflicting_duplicate(df):
    df["pid"] = [f"P{i:04d}" for i in range(len(df))]
    df.loc[1, "pid"] = "P0000"
    df.loc[1, "week"] = df.loc[0, "week"] + 1
    return "conflicting outcomes"


def _photo_after_event(df):
    df["photo_date"] = "2020-01-01"
    df["event_date"] = "2021-01-01"
    df.loc[5, "photo_date"] = "2022-01-01"
    return "dated after"


def _missing_covariate(df):
    df.drop(columns="prio", inplace=True)
    return "prio"


def _few_events(df):
    df["arrest"] = 0
    df.loc[:4, "arrest"] = 1
    return "only 5 event"


def _constant_marker(df):
    df["age"] = 30
    return "constant"


BAD = [_bad_negative_time, _bad_nan_time, _bad_event, _all_censored, _conflicting_duplicate, _photo_after_event,
       _missing_covariate, _few_events, _constant_marker]
EXTRA = ["columns.patient=pid", "columns.photo_date=photo_date", "columns.event_date=event_date"]


@pytest.mark.parametrize("spoil", BAD, ids=[f.__name__.strip("_") for f in BAD])
def test_bad_input_fails_clearly(tmp_path, spoil):
    df = rossi()
    expected = spoil(df)
    extra = [o for o in EXTRA if o.split("=")[1] in df.columns]
    with pytest.raises(ValueError, match=expected) as err:
        run(df, tmp_path, *extra)
    assert "P00" not in str(err.value)  # never a patient id


def test_check_survival_arrays_length_mismatch():
    with pytest.raises(ValueError, match="length mismatch"):
        check_survival_arrays([1.0, 2.0], [1], name="x")
    t, e = check_survival_arrays([1, 2], [True, False])
    assert t.dtype == float and list(e) == [1, 0]


def test_agreeing_duplicates_pass_table_validation():
    df = pd.DataFrame({"pid": ["a", "a", "b"], "t": [5, 5, 3], "e": [1, 1, 0]})
    validate_survival_table(df, "t", "e", patient="pid")


def test_cli_runs_and_never_prints_patient_ids(tmp_path):
    df = rossi()
    df.insert(0, "pid", [f"PSEUDO{i:05d}" for i in range(len(df))])
    csv = write(df, tmp_path)
    env = {**os.environ, "MPLCONFIGDIR": str(REPO / ".cache" / "matplotlib")}
    cmd = [sys.executable, "-m", "fahr.cli.main", "evaluate", f"input={csv}", f"output={tmp_path / 'out'}",
           "columns.patient=pid", *ROSSI_ARGS]
    ok = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "PSEUDO" not in ok.stdout + ok.stderr
    for name in ("hazard_ratios.csv", "quartiles.csv", "logrank.csv", "lrt.csv", "cindex.csv", "report.md",
                 "summary.json", "km_faceage.png"):
        assert (tmp_path / "out" / name).is_file()
        assert b"PSEUDO" not in (tmp_path / "out" / name).read_bytes()
    hr = pd.read_csv(tmp_path / "out" / "hazard_ratios.csv").query("model == 'adjusted'").iloc[0]
    assert hr["hr"] == pytest.approx(math.exp(10 * cox(rossi(), [*COVARIATES, "age"]).params_["age"]), abs=TOL)
    bad = subprocess.run([*cmd, "covariates=[fin,nosuchcol]"], capture_output=True, text=True, cwd=REPO, env=env)
    assert bad.returncode == 2 and "fahr evaluate: error" in bad.stderr and "nosuchcol" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_cli_typo_fails_naming_the_key(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fahr.cli.main", "evaluate", "input=x.csv", f"output={tmp_path}",
                          "columns.tme=week"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode != 0 and "tme" in out.stderr


def test_markdown_interval_with_a_negative_bound_reads_as_an_interval():
    """A CI from -0.002 to 0.102 is '[-0.002, 0.102]' in report.md: not '-0.002-0.102' (a minus read
    as a range dash) and not quoted as a spreadsheet formula; other text keeps the formula guard."""
    from fahr.stats.report import markdown_table

    table = pd.DataFrame({"label": ["x", "=cmd()"], "hr": [1.05, 2.0], "ci_low": [-0.002, float("nan")],
                          "ci_high": [0.102, float("nan")]})
    lines = markdown_table(table, {"label": "marker", "hr": "HR", "ci": "95% CI"}).splitlines()
    assert lines[2] == "| x | 1.050 | [-0.002, 0.102] |"
    assert lines[3] == "| '=cmd() | 2.000 |  |"
