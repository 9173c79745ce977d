"""Face Aging Rate: the pure maths (known FaceAge values -> exact rates, bins, statuses) and
`fahr far` end to end on FG-NET photos (person = subject, age_at_photo from the manifest)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from hydra import compose, initialize
from hydra.core.global_hydra import GlobalHydra

from fahr.config.inference_schema import register_far
from fahr.inference.far import DAYS_PER_YEAR, OUTPUT_COLUMNS, far_from_photos, far_table, interval_bin
from tests.conftest import shared_data
from tests.test_predict import make_export, read_rows


def photo(path: str, faceage: float | None, date: str | None = None, status: str = "ok", **kw) -> dict:
    return {"person": "p1", "path": path, "status": status, "faceage": faceage, "date": date, **kw}


# ---------------------------------------------------------------- bins


@pytest.mark.parametrize("days, label", [
    (0, "other"), (9, "other"), (9.49, "other"), (9.5, "10-365"), (10, "10-365"), (365, "10-365"),
    (365.49, "10-365"), (365.5, "366-730"), (366, "366-730"),
    (730, "366-730"), (731, "731-1460"), (1460, "731-1460"), (1461, "other"), (None, "other"),
])
def test_interval_bin(days, label):
    assert interval_bin(days) == label


# ---------------------------------------------------------------- pair method


def test_pair_exact_rate_and_bin():
    out = far_from_photos([photo("a.jpg", 60.0, "2018-01-01"), photo("b.jpg", 62.0, "2020-01-01")])
    assert out["interval_days"] == 730
    assert out["far"] == pytest.approx(2.0 / (730 / 365.25), rel=1e-12)  # 1.000684...
    assert out["interval_bin"] == "366-730" and out["status"] == "ok"
    assert (out["path_first"], out["path_last"], out["n_photos"], out["n_used"]) == ("a.jpg", "b.jpg", 2, 2)
    assert set(out) == set(OUTPUT_COLUMNS)


def test_pair_uses_widest_gap_whatever_the_input_order():
    rows = [photo("mid.jpg", 70.0, "2020-06-01"), photo("last.jpg", 61.5, "2021-01-01"),
            photo("first.jpg", 60.0, "2019-01-01")]
    out = far_from_photos(rows)
    assert (out["path_first"], out["path_last"]) == ("first.jpg", "last.jpg")
    days = 731  # 2019-01-01 -> 2021-01-01 (2020 is a leap year)
    assert out["interval_days"] == days and out["interval_bin"] == "731-1460"
    assert out["far"] == pytest.approx(1.5 * DAYS_PER_YEAR / days, rel=1e-12)
    assert out["far"] > 0  # never a negative interval from the input order


def test_age_at_photo_gives_years_directly():
    rows = [{"person": 7, "path": "x", "status": "ok", "faceage": 40.0, "age_at_photo": "30"},
            {"person": 7, "path": "y", "status": "ok", "faceage": 43.0, "age_at_photo": "32"}]
    out = far_from_photos(rows)
    assert out["interval_days"] == pytest.approx(2 * DAYS_PER_YEAR)
    assert out["far"] == pytest.approx(1.5, rel=1e-12) and out["interval_bin"] == "731-1460"
    assert out["person"] == 7


# ---------------------------------------------------------------- slope method


def aged(path: str, faceage: float, age_at_photo: float) -> dict:
    return {"person": "p", "path": path, "status": "ok", "faceage": faceage, "age_at_photo": age_at_photo}


def test_slope_on_collinear_points_is_exact():
    rows = [aged("a", 50.0, 10.0), aged("c", 53.0, 12.0), aged("b", 51.5, 11.0)]
    out = far_from_photos(rows, method="slope")
    assert out["far"] == pytest.approx(1.5, rel=1e-9) and out["status"] == "ok"
    assert out["n_used"] == 3 and (out["path_first"], out["path_last"]) == ("a", "c")


def test_slope_uses_every_photo_pair_only_the_ends():
    # a centred middle photo does not move the least-squares slope; an off-centre one does
    centred = [aged("a", 50.0, 10.0), aged("b", 70.0, 11.0), aged("c", 52.0, 12.0)]
    assert far_from_photos(centred, "slope")["far"] == pytest.approx(1.0, rel=1e-9)
    assert far_from_photos(centred, "pair")["far"] == pytest.approx(1.0, rel=1e-12)
    off = [aged("a", 50.0, 10.0), aged("b", 70.0, 10.5), aged("c", 52.0, 12.0)]
    # least squares by hand: t = 0, 0.5, 2 (mean 5/6), y = 50, 70, 52
    t, y = [0.0, 0.5, 2.0], [50.0, 70.0, 52.0]
    tm, ym = sum(t) / 3, sum(y) / 3
    expected = sum((a - tm) * (b - ym) for a, b in zip(t, y)) / sum((a - tm) ** 2 for a in t)
    assert far_from_photos(off, "slope")["far"] == pytest.approx(expected, rel=1e-9)
    assert far_from_photos(off, "pair")["far"] == pytest.approx(1.0, rel=1e-12)


# ---------------------------------------------------------------- statuses


def test_zero_interval():
    out = far_from_photos([photo("a", 60.0, "2020-01-01"), photo("b", 61.0, "2020-01-01")])
    assert out["status"] == "zero_interval" and out["far"] is None and out["interval_days"] == 0
    assert far_from_photos([photo("a", 60.0, "2020-01-01"), photo("b", 61.0, "2020-01-01")], "slope")["status"] == "zero_interval"


def test_one_photo_missing_dates_and_no_usable_photos():
    one = far_from_photos([photo("a", 60.0, "2020-01-01")])
    assert one["status"] == "one_photo" and one["far"] is None and one["n_photos"] == 1
    undated = far_from_photos([photo("a", 60.0, "2020-01-01"), photo("b", 61.0, None)])
    assert undated["status"] == "missing_dates" and undated["n_used"] == 1
    bad_date = far_from_photos([photo("a", 60.0, "2020-01-01"), photo("b", 61.0, "31/12/2021")])
    assert bad_date["status"] == "missing_dates"
    none = far_from_photos([photo("a", None, "2020-01-01", status="no_face"),
                            photo("b", None, "2021-01-01", status="unreadable")])
    assert none["status"] == "no_usable_photos" and none["n_photos"] == 2 and none["n_used"] == 0
    assert one["interval_bin"] == none["interval_bin"] == "other"


def test_multiple_faces_photo_is_excluded_from_the_pair():
    rows = [photo("group.jpg", 30.0, "2015-01-01", status="multiple_faces"),
            photo("a.jpg", 60.0, "2018-01-01"), photo("b.jpg", 61.0, "2019-01-01")]
    out = far_from_photos(rows)
    assert out["path_first"] == "a.jpg" and out["n_photos"] == 3 and out["n_used"] == 2
    assert out["far"] == pytest.approx(DAYS_PER_YEAR / 365)
    left_alone = far_from_photos(rows[:2])
    assert left_alone["status"] == "one_photo" and left_alone["far"] is None


def test_far_table_one_row_per_person_in_order():
    rows = [photo("a", 60.0, "2018-01-01") | {"person": "z"}, photo("b", 50.0, "2018-01-01") | {"person": "y"},
            photo("c", 61.0, "2019-01-01") | {"person": "z"}]
    table = far_table(rows)
    assert [t["person"] for t in table] == ["z", "y"]
    assert [t["status"] for t in table] == ["ok", "one_photo"]
    with pytest.raises(ValueError, match="method"):
        far_table(rows, method="median")


# ---------------------------------------------------------------- `fahr far` end to end


def compose_far(overrides: list[str]):
    register_far()
    GlobalHydra.instance().clear()
    with initialize(version_base="1.3", config_path=None):
        return compose(config_name="far", overrides=overrides)


@pytest.mark.real_data
def test_far_end_to_end_on_fgnet(tmp_path):
    from fahr.pipeline.far import far

    fgnet = shared_data("fgnet")
    with open(fgnet / "manifest.csv", newline="") as f:
        manifest = list(csv.DictReader(f))
    subjects = list(dict.fromkeys(r["subject"] for r in manifest))[:2]
    rows = [r for r in manifest if r["subject"] in subjects]
    rows = [r for s in subjects for r in [x for x in rows if x["subject"] == s][:3]]  # 3 photos each
    listing = tmp_path / "far_input.csv"
    with open(listing, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["person", "path", "age_at_photo"])
        for r in rows:
            w.writerow([r["subject"], str(fgnet / r["file"]), r["age"]])
        (tmp_path / "broken.jpg").write_text("not a photo")
        w.writerow(["solo", str(fgnet / rows[0]["file"]), "40"])
        w.writerow(["broken", "broken.jpg", "41"])  # relative to the CSV's folder
        w.writerow(["broken", "missing.jpg", "43"])
    export = make_export(tmp_path / "export")
    out, photos_out = tmp_path / "far.csv", tmp_path / "photos.csv"
    cfg = compose_far([f"model={export}", f"input={listing}", f"output={out}", f"photos_output={photos_out}",
                       "device=cpu", "batch_size=4"])
    summary = far(cfg)
    table = read_rows(out)
    assert [t["person"] for t in table] == [*subjects, "solo", "broken"]
    assert list(table[0])[:len(OUTPUT_COLUMNS)] == OUTPUT_COLUMNS
    by_person = {t["person"]: t for t in table}
    assert by_person["solo"]["status"] == "one_photo"
    assert by_person["broken"]["status"] == "no_usable_photos"
    assert summary["persons"] == 4
    preds = {r["path"]: r for r in read_rows(photos_out)}
    assert len(preds) == len(rows) + 2  # each distinct photo predicted once
    for s in subjects:
        t = by_person[s]
        assert t["status"] == "ok", t
        ages = [float(r["age"]) for r in rows if r["subject"] == s]
        assert float(t["interval_days"]) == pytest.approx((max(ages) - min(ages)) * DAYS_PER_YEAR, abs=1e-3)
        first = float(preds[t["path_first"]]["faceage"])  # the default: FaceAge as predicted, not calibrated
        last = float(preds[t["path_last"]]["faceage"])
        expected = (last - first) / (max(ages) - min(ages))
        assert float(t["far"]) == pytest.approx(expected, abs=1e-3)
        assert math.isfinite(float(t["far"])) and t["interval_bin"] == interval_bin(float(t["interval_days"]))
    assert Path(out).stat().st_size > 0
    # use_corrected=true: the card's calibration (faceage - b) / a, so every FAR is the default's / a
    calibration = json.loads((export / "model_card.json").read_text())["age_calibration"]
    out_corrected = tmp_path / "far_corrected.csv"
    far(compose_far([f"model={export}", f"input={listing}", f"output={out_corrected}", "device=cpu", "batch_size=4",
                     "use_corrected=true"]))
    corrected = {t["person"]: t for t in read_rows(out_corrected)}
    for s in subjects:
        assert float(corrected[s]["far"]) == pytest.approx(float(by_person[s]["far"]) / calibration["slope"], rel=1e-3)


def test_far_uses_the_faceage_the_card_found_better():
    from fahr.boundary import InputError
    from fahr.pipeline.far import corrected_faceage

    cal = {"slope": 0.8, "intercept": 5.0}
    kept = {"age_calibration": cal, "age_calibration_decision": {"kept": True}}
    assert corrected_faceage(kept, None) is True
    assert corrected_faceage(kept, False) is False
    # not kept: the fine-tune wrote no calibration; asking for it is an error, not a silent fallback
    rejected = {"age_calibration_decision": {"kept": False}}
    assert corrected_faceage(rejected, None) is False
    with pytest.raises(InputError, match="use_corrected=true but the model card has no age_calibration"):
        corrected_faceage(rejected, True)
    # a card from before the decision: as predicted unless asked
    assert corrected_faceage({"age_calibration": cal}, None) is False
    assert corrected_faceage({"age_calibration": cal}, True) is True
