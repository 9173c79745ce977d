"""Semi-synthetic cohort: a Cox fit recovers the true betas; the written cohort parses without rejections."""

from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pytest
from conftest import shared_data

from data_pipelines.records import Record
from data_pipelines.sources import cohort as cohort_source
from fahr.data.cohort_simulator import (
    BETA_AGE, BETA_HEALTH, expected_event_rate, sample_synthetic_covariates, simulate_survival, write_cohort,
)


def fit_cox(age, health, time, event):
    """lifelines fit on (age - 60) / 10 and health: (params (2,), 95% CI (2, 2))."""
    from lifelines import CoxPHFitter

    df = pd.DataFrame({"age10": (age - 60.0) / 10.0, "health": health, "T": time, "E": event})
    cph = CoxPHFitter().fit(df, "T", "E")
    return cph.params_.to_numpy(), cph.confidence_intervals_.to_numpy()


@pytest.fixture(scope="module")
def covariates():
    return sample_synthetic_covariates(4000, seed=0)


def test_large_cohort_recovers_true_betas(covariates):
    age, health = covariates["age"], covariates["health"]
    time, event = simulate_survival(age, health, seed=123)
    params, ci = fit_cox(age, health, time, event)
    for truth, (lo, hi) in zip((BETA_AGE, BETA_HEALTH), ci, strict=True):
        assert lo < truth < hi
    assert np.abs(params - (BETA_AGE, BETA_HEALTH)).max() < 0.5
    assert event.mean() == pytest.approx(expected_event_rate(age, health), abs=0.02)


@pytest.mark.parametrize("censoring", ["uniform", "exponential"])
def test_confidence_intervals_cover_the_truth_over_seeds(covariates, censoring):
    age, health = covariates["age"][:1500], covariates["health"][:1500]
    covered = np.zeros(2)
    seeds = range(20)
    for seed in seeds:
        time, event = simulate_survival(age, health, seed=seed, censoring=censoring)
        _, ci = fit_cox(age, health, time, event)
        covered += (ci[:, 0] < (BETA_AGE, BETA_HEALTH)) & ((BETA_AGE, BETA_HEALTH) < ci[:, 1])
    assert (covered / len(seeds) >= 0.8).all(), covered


def test_simulation_units_and_inputs():
    age = np.full(20000, 60.0)
    # exp(eta) = 1, no censoring within reach: times are Weibull(shape, scale) in days
    time, event = simulate_survival(age, beta_age=0.0, weibull_shape=2.0, weibull_scale_days=1000.0,
                                    followup_days=(1e9, 1e9), seed=0)
    assert event.all() and time.dtype == np.float64
    assert np.median(time) == pytest.approx(1000.0 * np.log(2.0) ** 0.5, rel=0.02)
    again = simulate_survival(age, beta_age=0.0, seed=0)
    np.testing.assert_array_equal(again[0], simulate_survival(age, beta_age=0.0, seed=0)[0])
    with pytest.raises(ValueError, match="censoring"):
        simulate_survival(age, censoring="none")
    with pytest.raises(ValueError, match="health"):
        simulate_survival(age, health=np.ones(3))
    with pytest.raises(ValueError, match="finite"):
        simulate_survival([np.nan])
    with pytest.raises(ValueError, match="followup_days"):
        simulate_survival(age, followup_days=(10.0, 5.0))


def parse(root):
    records = list(cohort_source.iter_records(root))
    rejected = [r for r in records if not isinstance(r, Record)]
    assert not rejected, rejected[:5]
    return records


def test_synthetic_cohort_parses(tmp_path):
    info = write_cohort(tmp_path, "synthetic", n_patients=12, seed=3, photos_per_patient=2, image_size=64)
    records = parse(tmp_path)
    assert len(records) == info["n_photos"] >= 12
    assert {r.person_id for r in records} == {f"P{i:06d}" for i in range(12)}
    saved = json.loads((tmp_path / "true_hr.json").read_text())
    assert saved == json.loads(json.dumps(info))
    assert saved["hr_age_per_10_years"] == pytest.approx(np.exp(BETA_AGE))
    assert saved["hr_health"] == pytest.approx(np.exp(BETA_HEALTH))
    assert saved["time_unit"] == "days" and saved["seed"] == 3 and 0 < saved["expected_event_rate"] < 1
    # labels agree with the simulation; health stays out of the cohort table
    cov = sample_synthetic_covariates(12, seed=3)
    time, event = simulate_survival(cov["age"], cov["health"], seed=3)
    header = (tmp_path / "cohort.csv").read_text().splitlines()[0]
    assert "health" not in header
    truth = {row["photo_path"]: row for row in csv.DictReader(open(tmp_path / "truth.csv"))}
    for record in records:
        i = int(record.person_id[1:])
        labels = record.labels
        assert labels["event"] == event[i]
        index = truth[record.source_id]["index_photo"] == "1"
        if index:
            assert labels["age"] == pytest.approx(cov["age"][i], abs=1e-4)
            assert labels["followup_days"] == pytest.approx(time[i], abs=1e-3)
        else:
            assert labels["age"] < cov["age"][i] and labels["followup_days"] > time[i]
        assert record.image[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.real_data
def test_utkface_cohort_parses(tmp_path):
    utkface = shared_data("utkface")
    info = write_cohort(tmp_path / "c", "utkface", n_patients=25, seed=1, utkface_dir=utkface)
    assert (tmp_path / "c" / "utkface").is_symlink()  # photos referenced, not copied
    records = parse(tmp_path / "c")
    assert len(records) == 25 and info["beta_health"] is None and info["hr_health"] is None
    assert all(18 <= r.labels["age"] <= 100 for r in records)
    copied = write_cohort(tmp_path / "d", "utkface", n_patients=5, seed=1, utkface_dir=utkface, copy_photos=True)
    assert len(parse(tmp_path / "d")) == copied["n_photos"] == 5
    assert not (tmp_path / "d" / "utkface").exists()


@pytest.mark.real_data
def test_utkface_cohort_draws_only_listed_photos(tmp_path):
    import pandas as pd

    utkface = shared_data("utkface")
    manifest = pd.read_csv(utkface / "manifest.csv", dtype={"sha1": str})
    listed = manifest.iloc[::500]  # 40 photos of every age, children included
    adults = listed[(listed["age"] >= 18) & listed["gender"].isin([0, 1])]
    assert 0 < len(adults) < len(listed)
    info = write_cohort(tmp_path / "c", "utkface", n_patients=None, seed=2, utkface_dir=utkface,
                        only_sha1=set(listed["sha1"]))
    cohort = pd.read_csv(tmp_path / "c" / "cohort.csv")
    assert info["n_patients"] == len(adults)
    assert sorted(cohort["photo_path"]) == sorted("utkface/" + adults["file"])
    with pytest.raises(ValueError, match="listed sha1"):
        write_cohort(tmp_path / "e", "utkface", n_patients=None, utkface_dir=utkface, only_sha1=set())


@pytest.mark.real_data
def test_utkface_cohort_to_shards_keeps_every_photo_and_hides_ids(tmp_path):
    from fahr.pipeline.cohort_shards import cohort_to_shards
    from fahr.data.labelled import load_split_faces

    utkface = shared_data("utkface")
    info = write_cohort(tmp_path / "cohort", "utkface", n_patients=40, seed=4, utkface_dir=utkface)
    built = cohort_to_shards(tmp_path / "cohort", tmp_path / "shards", tmp_path / "deid.key", image_size=64)
    assert built["read"] == 40 == built["written"] + sum(built["rejected"].values())
    assert (tmp_path / "deid.key").stat().st_mode & 0o777 == 0o600 and len((tmp_path / "deid.key").read_text()) == 64
    assert not list(tmp_path.glob(".deid.key.*"))  # no temporary key left behind
    index = tmp_path / "shards" / "index.json"
    splits = {s: load_split_faces(f"{index}#{s}", ["followup_days", "event", "age"], [], 64)
              for s in ("train", "val", "test")}
    assert sum(len(d) for d in splits.values()) == built["written"]
    persons = [p for d in splits.values() for p in d.persons]
    assert len(set(persons)) == len(persons) and not any(p.startswith("P0") for p in persons)  # pseudonyms
    cohort = pd.read_csv(tmp_path / "cohort" / "cohort.csv")
    written = np.concatenate([d.labels["followup_days"] for d in splits.values()])
    assert info["n_patients"] == 40 and np.isin(written.round(3), cohort["followup_days"].round(3)).all()
