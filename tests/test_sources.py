"""Data sources: labels, layouts, rejections, and that every row/file read is accounted for."""

from __future__ import annotations

import csv
import hashlib
import io
import math
import shutil
from datetime import date
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import shared_data
from data_pipelines.records import Record
from fahr.faces.rejection import Rejection
from data_pipelines.sources import SOURCES, layout_doc
from data_pipelines.sources import appa_real, cohort, fgnet, folder, identity_folders, imdb_wiki, utkface
from fahr.boundary import InputError

JPEG = b"\xff\xd8\xff\xe0 not decoded by sources \xff\xd9"


def split(items):
    records = [x for x in items if isinstance(x, Record)]
    rejections = [x for x in items if isinstance(x, Rejection)]
    assert len(records) + len(rejections) == len(items)
    return records, rejections


def reasons(rejections) -> dict[str, str]:
    return {r.source_id: r.reason for r in rejections}


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


# --------------------------------------------------------------------------- registry

def test_registry_lists_every_source_and_documents_its_layout():
    assert set(SOURCES) == {"folder", "utkface", "fgnet", "appa_real", "imdb_wiki", "identity_folders", "cohort"}
    for name in SOURCES:
        assert callable(SOURCES[name])
        assert "input_dir/" in layout_doc(name), name
    with pytest.raises(KeyError, match="unknown source"):
        SOURCES["nope"]


@pytest.mark.parametrize("name", ["folder", "utkface", "fgnet", "appa_real", "identity_folders", "cohort"])
def test_missing_input_directory_is_a_clear_error(tmp_path, name):
    with pytest.raises(InputError, match="not found"):
        list(SOURCES[name](tmp_path / "absent"))


# --------------------------------------------------------------------------- folder

def test_folder_manifest_labels_columns_and_rejections(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"]:
        (tmp_path / "img" / name).write_bytes(JPEG + name.encode())
    header = ["file", "person_id", "age", "sex", "race", "site"]
    rows = [["img/b.jpg", "", "30", "f", "", "x"], ["img/a.jpg", "p1", "12.5", "0", "2", ""],
            ["img/c.jpg", "p1", "nan", "1", "1", ""], ["img/d.jpg", "p2", "40", "2", "1", ""],
            ["img/e.jpg", "p3", "40", "1", "7", ""], ["img/missing.jpg", "p4", "1", "1", "1", ""],
            ["../outside.jpg", "p5", "1", "1", "1", ""], ["img/a.jpg", "p1", "12", "0", "2", ""]]
    write_csv(tmp_path / "manifest.csv", header, rows)
    with pytest.raises(ValueError, match="site"):
        list(folder.iter_records(tmp_path))
    out = list(folder.iter_records(tmp_path, keep_columns=["site"]))
    records, rejections = split(out)
    assert len(out) == len(rows)
    assert [r.source_id for r in records] == ["img/a.jpg", "img/b.jpg"]
    a, b = records
    assert a.person_id == "p1" and a.labels == {"age": 12.5, "sex": 0, "race": 2, "site": None}
    assert a.image == JPEG + b"a.jpg"
    assert b.person_id == "img/b.jpg" and b.labels == {"age": 30.0, "sex": 1, "race": None, "site": "x"}
    assert reasons(rejections) == {"img/c.jpg": "label:age", "img/d.jpg": "label:sex", "img/e.jpg": "label:race",
                                   "img/missing.jpg": "image:missing", "../outside.jpg": "image:path",
                                   "img/a.jpg": "duplicate"}


def test_folder_manifest_without_file_column_names_it(tmp_path):
    write_csv(tmp_path / "manifest.csv", ["path", "age"], [["x.jpg", "3"]])
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['file'\]"):
        list(folder.iter_records(tmp_path))
    (tmp_path / "manifest.csv").unlink()
    with pytest.raises(InputError, match="manifest.csv"):
        list(folder.iter_records(tmp_path))


# --------------------------------------------------------------------------- UTKFace

@pytest.mark.real_data
def test_utkface_manifest_layout_labels_equal_the_manifest(tmp_path):
    root = shared_data("utkface")
    with open(root / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    first = sorted(rows, key=lambda r: r["file"])[:50]
    out = utkface.iter_records(root)
    for row in first:
        record = next(out)
        assert isinstance(record, Record), record
        assert record.source_id == row["file"]
        assert record.labels == {"age": float(row["age"]), "sex": int(row["gender"]), "race": int(row["race"])}
        assert record.person_id == row["sha1"] == hashlib.sha1(record.image).hexdigest()
        assert record.image == (root / row["file"]).read_bytes()


@pytest.mark.real_data
def test_utkface_manifest_subset_accounts_for_every_row(tmp_path):
    """A sub-manifest (symlinked images) with the race-less rows, a wrong checksum and a missing file."""
    root = shared_data("utkface")
    with open(root / "manifest.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        header, rows = reader.fieldnames, list(reader)
    raceless = [r for r in rows if Path(r["file"]).name.count("_") == 2]
    assert raceless, "the shared manifest should contain race-less file names"
    subset = rows[::400] + raceless
    bad_sum = dict(subset[0], sha1="0" * 40)
    missing = dict(subset[1], file="images/1_0_0_00000000000000000.jpg")
    subset = subset[2:] + [bad_sum, missing]
    (tmp_path / "images").symlink_to(root / "images")
    write_csv(tmp_path / "manifest.csv", header, [[r[k] for k in header] for r in subset])
    out = list(utkface.iter_records(tmp_path))
    records, rejections = split(out)
    assert len(out) == len(subset)
    assert reasons(rejections) == {bad_sum["file"]: "image:checksum", missing["file"]: "image:missing"}
    by_id = {r.source_id: r for r in records}
    for row in raceless:  # the manifest stores the datetime in `race` for these: race unknown
        assert by_id[row["file"]].labels == {"age": float(row["age"]), "sex": int(row["gender"]), "race": None}


@pytest.mark.real_data
def test_utkface_original_flat_layout_parses_file_names(tmp_path):
    root = shared_data("utkface")
    names = ["26_0_2_20170104023102422.jpg", "39_1_20170116174525125.jpg", "100_1_0_20170110183726390.jpg"]
    source = sorted((root / "images").iterdir())[:3]
    flat = tmp_path / "UTKFace"
    flat.mkdir()
    for src, name in zip(source, names):
        shutil.copyfile(src, flat / name)
    shutil.copyfile(source[0], flat / "5_0_0_20170110183726390.jpg.chip.jpg")
    for bad in ["26_0_2.jpg", "abc_0_1_20170104023102422.jpg", "26_3_2_20170104023102422.jpg",
                "130_0_2_20170104023102422.jpg", "26_0_9_20170104023102422.jpg"]:
        shutil.copyfile(source[0], flat / bad)
    (flat / "notes.txt").write_text("ignored: not an image")
    out = list(utkface.iter_records(flat))
    records, rejections = split(out)
    assert len(out) == 9  # image files read (notes.txt is not one)
    labels = {r.source_id: r.labels for r in records}
    assert labels == {"26_0_2_20170104023102422.jpg": {"age": 26.0, "sex": 0, "race": 2},
                      "39_1_20170116174525125.jpg": {"age": 39.0, "sex": 1, "race": None},
                      "100_1_0_20170110183726390.jpg": {"age": 100.0, "sex": 1, "race": 0},
                      "5_0_0_20170110183726390.jpg.chip.jpg": {"age": 5.0, "sex": 0, "race": 0}}
    assert reasons(rejections) == {"26_0_2.jpg": "label:filename", "abc_0_1_20170104023102422.jpg": "label:filename",
                                   "26_3_2_20170104023102422.jpg": "label:sex",
                                   "130_0_2_20170104023102422.jpg": "label:age",
                                   "26_0_9_20170104023102422.jpg": "label:race"}
    first = next(r for r in records if r.source_id == names[0])
    assert first.person_id == hashlib.sha1(source[0].read_bytes()).hexdigest()
    assert [r.source_id for r in records] == sorted(r.source_id for r in records)


# --------------------------------------------------------------------------- FG-NET

@pytest.mark.real_data
def test_fgnet_shared_layout_person_age_and_landmarks():
    root = shared_data("fgnet")
    with open(root / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    out = list(fgnet.iter_records(root))
    records, rejections = split(out)
    assert len(out) == len(rows) == 61 and not rejections
    first = next(r for r in records if r.source_id == "images/003A18.JPG")
    assert first.person_id == "003" and first.labels == {"age": 18.0}
    assert {r.person_id for r in records} == {f"{int(r['subject']):03d}" for r in rows}
    for record in records:
        assert record.landmarks.shape == (68, 2) and record.landmarks.dtype == np.float64
        width, height = Image.open(io.BytesIO(record.image)).size
        assert (record.landmarks >= 0).all()
        assert (record.landmarks[:, 0] < width).all() and (record.landmarks[:, 1] < height).all()
    expected = fgnet.read_pts(root / "points" / "003a18.pts")
    np.testing.assert_array_equal(first.landmarks, expected)
    assert first.landmarks[0].tolist() == [79.4516, 266.535]


@pytest.mark.real_data
def test_fgnet_original_layout_without_manifest(tmp_path):
    root = shared_data("fgnet")
    (tmp_path / "images").mkdir()
    (tmp_path / "points").mkdir()
    shutil.copyfile(root / "images" / "003A18.JPG", tmp_path / "images" / "003A18.JPG")
    shutil.copyfile(root / "points" / "003a18.pts", tmp_path / "points" / "003a18.pts")
    shutil.copyfile(root / "images" / "003A20.JPG", tmp_path / "images" / "003a43a.jpg")  # variant, no .pts
    shutil.copyfile(root / "images" / "003A20.JPG", tmp_path / "images" / "003A20.JPG")
    (tmp_path / "points" / "003A20.PTS").write_text("version: 1\nn_points: 68\n{\n1 2\n}\n")
    shutil.copyfile(root / "images" / "003A20.JPG", tmp_path / "images" / "face_003.jpg")
    out = list(fgnet.iter_records(tmp_path))
    records, rejections = split(out)
    assert len(out) == 4
    by_id = {r.source_id: r for r in records}
    assert set(by_id) == {"images/003A18.JPG", "images/003a43a.jpg"}
    assert by_id["images/003A18.JPG"].person_id == "003" and by_id["images/003A18.JPG"].labels == {"age": 18.0}
    assert by_id["images/003A18.JPG"].landmarks.shape == (68, 2)
    assert by_id["images/003a43a.jpg"].labels == {"age": 43.0} and by_id["images/003a43a.jpg"].landmarks is None
    assert reasons(rejections) == {"images/003A20.JPG": "landmarks:malformed", "images/face_003.jpg": "label:filename"}


def test_fgnet_manifest_missing_landmarks_and_image(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "001A02.JPG").write_bytes(JPEG)
    write_csv(tmp_path / "manifest.csv", ["file", "subject", "age", "landmarks"],
              [["images/001A02.JPG", "1", "2", "points/001a02.pts"], ["images/001A05.JPG", "1", "5", ""],
               ["images/002A05.JPG", "x", "5", ""]])
    out = list(fgnet.iter_records(tmp_path))
    assert reasons(split(out)[1]) == {"images/001A02.JPG": "landmarks:missing", "images/001A05.JPG": "image:missing",
                                      "images/002A05.JPG": "label:subject"}
    write_csv(tmp_path / "manifest.csv", ["file", "age"], [["images/001A02.JPG", "2"]])
    with pytest.raises(ValueError, match="subject"):
        list(fgnet.iter_records(tmp_path))


# --------------------------------------------------------------------------- cohort

COHORT_HEADER = ["patient_id", "photo_path", "photo_date", "birth_date", "age_at_photo", "sex", "diagnosis",
                 "last_contact_date", "death_date", "followup_days", "event", "bmi", "notes"]


def cohort_rows():
    # photo_path, birth_date, age_at_photo, last_contact, death, followup_days, event -> expected
    return [
        ["P1", "p/01.jpg", "2015-06-01", "1950-06-01", "", "1", "C50", "", "2018-06-01", "", "", "24.5", "free text"],
        ["P1", "p/02.jpg", "2016-01-01", "1950-06-01", "", "1", "C50", "2017-01-01", "", "", "", "", "x"],
        ["P2", "p/03.jpg", "2015-01-01", "", "40", "m", "", "", "", "100", "1", "30", ""],
        ["P3", "p/04.jpg", "2015-01-01", "", "33.5", "", "", "", "", "", "", "", ""],
        ["P4", "p/05.jpg", "2015-01-01", "", "nan", "0", "", "", "", "", "", "", ""],  # NaN age
        ["P5", "p/06.jpg", "2015-01-01", "", "-3", "0", "", "", "", "", "", "", ""],  # negative age
        ["P6", "p/07.jpg", "2015-01-01", "", "", "0", "", "", "", "", "", "", ""],  # no age at all
        ["P7", "p/08.jpg", "2015-01-01", "1950-01-01", "", "0", "", "", "2014-12-31", "", "", "", ""],  # photo>death
        ["P8", "p/09.jpg", "2015-01-01", "", "50", "0", "", "", "", "-5", "0", "", ""],  # negative follow-up
        ["P9", "p/10.jpg", "2015-01-01", "", "50", "0", "", "2016-01-01", "", "", "2", "", ""],  # event 2
        ["P10", "p/11.jpg", "2015-01-01", "", "50", "0", "", "", "", "", "", "", ""],  # photo file missing
        ["P11", "p/12.jpg", "2015-01-01", "2016-01-01", "", "0", "", "", "", "", "", "", ""],  # birth after photo
        ["P12", "p/13.jpg", "2015-01-01", "", "50", "0", "", "2014-01-01", "", "", "", "", ""],  # photo>last contact
        ["P13", "p/14.jpg", "2015-13-01", "", "50", "0", "", "", "", "", "", "", ""],  # bad date
        ["P14", "p/15.jpg", "2015-01-01", "", "50", "0", "", "", "2016-01-01", "", "0", "", ""],  # death but event 0
        ["P15", "p/16.jpg", "2015-01-01", "", "121", "0", "", "", "", "", "", "", ""],  # age > 120
    ]


@pytest.fixture
def cohort_dir(tmp_path) -> Path:
    (tmp_path / "p").mkdir()
    for row in cohort_rows():
        if row[1] != "p/11.jpg":
            (tmp_path / row[1]).write_bytes(JPEG + row[1].encode())
    write_csv(tmp_path / "cohort.csv", COHORT_HEADER, cohort_rows())
    return tmp_path


def test_cohort_derives_age_followup_event_and_rejects_bad_rows(cohort_dir, caplog):
    out = list(cohort.iter_records(cohort_dir, covariates=["bmi"]))
    records, rejections = split(out)
    assert len(out) == len(cohort_rows())
    assert reasons(rejections) == {
        "p/05.jpg": "label:age", "p/06.jpg": "label:age", "p/07.jpg": "label:age", "p/08.jpg": "label:death_date",
        "p/09.jpg": "label:followup_days", "p/10.jpg": "label:event", "p/11.jpg": "image:missing",
        "p/12.jpg": "label:birth_date", "p/13.jpg": "label:last_contact_date", "p/14.jpg": "label:photo_date",
        "p/15.jpg": "label:event", "p/16.jpg": "label:age"}
    by_id = {r.source_id: r for r in records}
    assert list(by_id) == ["p/01.jpg", "p/02.jpg", "p/03.jpg", "p/04.jpg"]
    one = by_id["p/01.jpg"]
    assert one.person_id == "P1" and one.image == JPEG + b"p/01.jpg"
    assert one.labels == {
        "age": (date(2015, 6, 1) - date(1950, 6, 1)).days / 365.25, "sex": 1, "race": None, "diagnosis": "C50",
        "photo_date": date(2015, 6, 1), "birth_date": date(1950, 6, 1), "last_contact_date": None,
        "death_date": date(2018, 6, 1), "followup_days": 1096.0, "event": 1, "bmi": 24.5}
    assert math.isclose(one.labels["age"], 23741 / 365.25)  # 65 years incl. 16 leap days
    two = by_id["p/02.jpg"].labels
    assert two["followup_days"] == 366.0 and two["event"] == 0 and two["bmi"] is None
    three = by_id["p/03.jpg"].labels
    assert three["age"] == 40.0 and three["sex"] == 0 and three["followup_days"] == 100.0 and three["event"] == 1
    four = by_id["p/04.jpg"].labels
    assert four["age"] == 33.5 and four["followup_days"] is None and four["event"] is None
    for record in records:
        assert "notes" not in record.labels  # not whitelisted: dropped
    assert "notes" in caplog.text and "free text" not in caplog.text


def test_cohort_missing_columns_are_named(cohort_dir):
    write_csv(cohort_dir / "cohort.csv", ["patient_id", "photo_date", "age_at_photo"], [["P1", "2015-01-01", "3"]])
    with pytest.raises(ValueError, match=r"\['photo_path'\]"):
        list(cohort.iter_records(cohort_dir))
    write_csv(cohort_dir / "cohort.csv", ["patient_id", "photo_path", "photo_date"], [["P1", "p/01.jpg", "2015-01-01"]])
    with pytest.raises(ValueError, match="birth_date.*age_at_photo"):
        list(cohort.iter_records(cohort_dir))
    write_csv(cohort_dir / "cohort.csv", COHORT_HEADER, cohort_rows())
    with pytest.raises(ValueError, match=r"\['smoker'\]"):
        list(cohort.iter_records(cohort_dir, covariates=["bmi", "smoker"]))


# --------------------------------------------------------------------------- APPA-REAL

def test_appa_real_fabricated_release(tmp_path):
    header = ["file_name", "num_ratings", "apparent_age_avg", "apparent_age_std", "real_age"]
    splits = {"train": [["000001.jpg", "38", "25.5", "3.1", "27"], ["000000.jpg", "40", "5.1", "1.2", "4"],
                        ["000002.jpg", "30", "30", "2", "-1"]],
              "valid": [["004113.jpg", "35", "60", "4", "58"], ["004114.jpg", "35", "60", "4", "58"]],
              "test": [["005613.jpg", "33", "20", "2", "22"]]}
    for name, rows in splits.items():
        (tmp_path / name).mkdir()
        write_csv(tmp_path / f"gt_avg_{name}.csv", header, rows)
        for row in rows:
            if row[0] != "004114.jpg":
                (tmp_path / name / row[0]).write_bytes(JPEG + row[0].encode())
                (tmp_path / name / f"{row[0]}_face.jpg").write_bytes(b"crop")
    out = list(appa_real.iter_records(tmp_path))
    records, rejections = split(out)
    assert len(out) == sum(len(rows) for rows in splits.values())
    assert [r.source_id for r in records] == ["train/000000.jpg", "train/000001.jpg", "valid/004113.jpg",
                                              "test/005613.jpg"]
    first = records[0]
    assert first.person_id == "000000" and first.image == JPEG + b"000000.jpg"
    assert first.labels == {"age": 4.0, "apparent_age": 5.1, "apparent_age_std": 1.2, "num_ratings": 40.0,
                            "split": "train"}
    assert reasons(rejections) == {"train/000002.jpg": "label:age", "valid/004114.jpg": "image:missing"}
    assert [r.source_id for r in split(list(appa_real.iter_records(tmp_path, splits=["test"])))[0]] == [
        "test/005613.jpg"]
    write_csv(tmp_path / "gt_avg_test.csv", ["file_name", "real_age"], [["005613.jpg", "22"]])
    with pytest.raises(ValueError, match="num_ratings"):
        list(appa_real.iter_records(tmp_path, splits=["test"]))


# --------------------------------------------------------------------------- IMDB-WIKI

def matlab_datenum(day: date) -> float:
    return float(day.toordinal() + 366)


def imdb_meta(tmp_path: Path) -> dict[str, list]:
    paths = ["01/nm01_a.jpg", "00/nm00_b.jpg", "02/nm02_c.jpg", "03/nm03_d.jpg", "04/nm04_e.jpg"]
    for path in paths[:4]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(JPEG + path.encode())
    return {
        "full_path": paths,
        "dob": [matlab_datenum(date(1970, 6, 30)), matlab_datenum(date(1970, 7, 2)) + 0.5,
                matlab_datenum(date(1990, 1, 1)), 1.0, matlab_datenum(date(1970, 1, 1))],
        "photo_taken": [2000.0, 2000.0, 1980.0, 2000.0, 2000.0],
        "gender": [1.0, 0.0, float("nan"), 1.0, float("nan")],
        "name": ["Alice A", "Bob B", "Carol C", "Dan D", ""],
        "face_score": [4.5, float("-inf"), 2.0, 3.0, 1.0],
        "second_face_score": [float("nan"), 1.5, float("nan"), float("nan"), float("nan")],
    }


def test_imdb_wiki_metadata_ages_sex_and_rejections(tmp_path):
    assert imdb_wiki.age_at_photo(matlab_datenum(date(1970, 7, 1)), 2000) == 30
    assert imdb_wiki.age_at_photo(matlab_datenum(date(1970, 7, 2)), 2000) == 29
    meta = imdb_meta(tmp_path)
    out = list(imdb_wiki.iter_records_from_meta(tmp_path, meta))
    records, rejections = split(out)
    assert len(out) == len(meta["full_path"])
    assert [r.source_id for r in records] == ["00/nm00_b.jpg", "01/nm01_a.jpg"]
    bob, alice = records
    assert alice.person_id == "Alice A" and alice.labels == {"age": 30.0, "sex": 0, "face_score": 4.5,
                                                             "second_face_score": None}
    assert bob.labels["age"] == 29.0 and bob.labels["sex"] == 1 and bob.labels["face_score"] == float("-inf")
    assert reasons(rejections) == {"02/nm02_c.jpg": "label:age", "03/nm03_d.jpg": "label:dob",
                                   "04/nm04_e.jpg": "image:missing"}
    filtered = reasons(split(list(imdb_wiki.iter_records_from_meta(tmp_path, meta, min_face_score=1.0,
                                                                   max_second_face_score=1.0)))[1])
    assert filtered["00/nm00_b.jpg"] == "face:score"


def test_imdb_wiki_mat_file(tmp_path):
    scipy_io = pytest.importorskip("scipy.io", reason="scipy not installed: the .mat reader needs it")
    meta = imdb_meta(tmp_path)
    n = len(meta["full_path"])
    struct = np.empty((1, 1), dtype=[(f, "O") for f in imdb_wiki.FIELDS])
    for field in imdb_wiki.FIELDS:
        values = meta[field]
        if field in ("full_path", "name"):
            cell = np.empty((1, n), dtype=object)
            for i, value in enumerate(values):
                cell[0, i] = np.array([value]) if value else np.array([], dtype="<U1")
            struct[0, 0][field] = cell
        else:
            struct[0, 0][field] = np.array([values], dtype=np.float64)
    scipy_io.savemat(tmp_path / "imdb.mat", {"imdb": struct})
    from_mat = list(imdb_wiki.iter_records(tmp_path))
    from_meta = list(imdb_wiki.iter_records_from_meta(tmp_path, meta))
    assert [(x.source_id, getattr(x, "labels", None), getattr(x, "reason", None)) for x in from_mat] == [
        (x.source_id, getattr(x, "labels", None), getattr(x, "reason", None)) for x in from_meta]


def test_imdb_wiki_needs_exactly_one_mat_file(tmp_path):
    with pytest.raises(InputError, match="imdb.mat"):
        list(imdb_wiki.iter_records(tmp_path))


# --------------------------------------------------------------------------- identity folders

def test_identity_folders(tmp_path):
    for path in ["0000045/001.jpg", "0000045/002.JPG", "0000099/sub/003.png", "0000099/readme.txt", "stray.jpg"]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(JPEG)
    out = list(identity_folders.iter_records(tmp_path))
    records, rejections = split(out)
    assert len(out) == 4  # image files read; readme.txt is not one
    assert [(r.source_id, r.person_id, r.labels) for r in records] == [
        ("0000045/001.jpg", "0000045", {}), ("0000045/002.JPG", "0000045", {}), ("0000099/sub/003.png", "0000099", {})]
    assert reasons(rejections) == {"stray.jpg": "layout:no_identity"}


def test_imdb_wiki_without_scipy_says_how_to_install(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # as if scipy were absent
    (tmp_path / "wiki.mat").write_bytes(b"")
    with pytest.raises(InputError, match="pip install scipy"):
        list(imdb_wiki.iter_records(tmp_path))
