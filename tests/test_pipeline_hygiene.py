"""De-identification (and its private key files), person-disjoint stratified splits and duplicate detection."""

from __future__ import annotations

import datetime as dt
import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from conftest import shared_data
from data_pipelines.dedup import Deduplicator, hamming, phash, phash256
from data_pipelines.deid import deidentify, load_salt, patient_anchors, pseudonym
from data_pipelines.records import Record
from data_pipelines.splits import age_bin, assert_person_disjoint, split_persons

SALT = b"0123456789abcdef-test-salt"


# ---- de-identification --------------------------------------------------------------------------

def test_salt_from_env_or_key_file(monkeypatch, tmp_path):
    monkeypatch.delenv("FAHR_DEID_SALT", raising=False)
    with pytest.raises(ValueError, match="missing or shorter") as err:
        load_salt()
    monkeypatch.setenv("FAHR_DEID_SALT", "zq7-tiny")
    with pytest.raises(ValueError) as err:
        load_salt()
    assert "zq7" not in str(err.value)  # the salt is never echoed
    monkeypatch.setenv("FAHR_DEID_SALT", "x" * 32)
    assert load_salt() == b"x" * 32
    key = tmp_path / "salt.key"
    key.write_bytes(SALT + b"\n")
    assert load_salt(key) == SALT


def test_pseudonyms_are_keyed_stable_and_distinct():
    a = pseudonym("MRN-0042", SALT)
    assert a == pseudonym("MRN-0042", SALT) and a.startswith("p") and len(a) == 21
    assert a != pseudonym("MRN-0043", SALT)
    assert a != pseudonym("MRN-0042", SALT + b"other")
    assert "0042" not in a


def test_deidentify_dates_become_days_from_the_patient_anchor_and_text_is_dropped():
    photos = [
        Record("scans/Jane Doe/visit2.jpg", "MRN-7", b"img2", {"photo_date": dt.date(2020, 3, 1), "age": 61.0,
               "death_date": dt.date(2021, 3, 1), "event": 1, "notes": "Jane Doe, Main St", "diagnosis": "lung"}),
        Record("scans/Jane Doe/visit1.jpg", "MRN-7", b"img1", {"photo_date": dt.date(2019, 1, 1), "age": 59.8}),
    ]
    anchors = patient_anchors(photos)
    assert anchors == {"MRN-7": dt.date(2019, 1, 1)}
    out = [deidentify(r, SALT, anchors[r.person_id]) for r in photos]
    assert out[0].labels == {"photo_day": 425, "death_day": 790, "age": 61.0, "event": 1, "diagnosis": "lung"}
    assert out[1].labels == {"photo_day": 0, "age": 59.8}
    assert out[0].person_id == out[1].person_id == pseudonym("MRN-7", SALT)
    text = repr([(r.source_id, r.person_id, r.labels) for r in out])
    for secret in ("Jane", "Doe", "MRN", "Main St", "2019", "2020"):
        assert secret not in text


# ---- splits -------------------------------------------------------------------------------------

def test_age_bins():
    assert [age_bin(a) for a in (0, 9.99, 10, 45, 89.9, 90, 116)] == [0, 0, 1, 4, 8, 9, 9]


def test_splits_are_person_disjoint_stratified_deterministic_and_order_free():
    rng = np.random.default_rng(0)
    strata = {f"person{i}": int(rng.integers(0, 5)) for i in range(1000)}
    a = split_persons(strata, seed="s")
    b = split_persons(dict(reversed(list(strata.items()))), seed="s")
    assert a == b
    assert a != split_persons(strata, seed="other")
    for stratum in range(5):
        members = [p for p, s in strata.items() if s == stratum]
        counts = Counter(a[p] for p in members)
        assert abs(counts["train"] - 0.8 * len(members)) <= 1
        assert abs(counts["val"] - 0.1 * len(members)) <= 1
    with pytest.raises(ValueError, match="sum to 1"):
        split_persons(strata, {"train": 0.8, "test": 0.1})


def test_person_disjoint_check_catches_a_leak():
    persons = {"r1": "alice", "r2": "alice", "r3": "bob"}
    assert_person_disjoint({"r1": "train", "r2": "train", "r3": "test"}, persons)
    with pytest.raises(AssertionError, match="both"):
        assert_person_disjoint({"r1": "train", "r2": "test", "r3": "test"}, persons)


@pytest.mark.real_data
def test_utkface_splits_by_sha1_are_stratified_by_age():
    import csv

    rows = list(csv.DictReader(open(shared_data("utkface") / "manifest.csv")))
    strata = {r["sha1"]: age_bin(float(r["age"])) for r in rows}
    split = split_persons(strata, seed="utkface")
    total = Counter(split.values())
    assert abs(total["test"] / len(rows) - 0.1) < 0.005
    for b in set(strata.values()):
        members = [p for p, s in strata.items() if s == b]
        assert abs(sum(split[p] == "test" for p in members) - 0.1 * len(members)) <= 1


# ---- duplicates ---------------------------------------------------------------------------------

def _jpeg(img: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _faces(n: int) -> list[np.ndarray]:
    from fahr.data.synthetic import synthetic_face

    return [synthetic_face(i, seed=0)[0] for i in range(n)]


def test_phash_is_robust_to_reencoding_and_resizing_but_not_to_other_faces():
    faces = _faces(6)
    a = faces[0]
    requoted = np.asarray(Image.open(io.BytesIO(_jpeg(a, quality=60))))
    resized = np.asarray(Image.fromarray(a).resize((90, 90)).resize((112, 112)))
    assert hamming(phash(a), phash(requoted)) <= 4
    assert hamming(phash(a), phash(resized)) <= 4
    assert min(hamming(phash(a), phash(f)) for f in faces[1:]) > 6


@pytest.mark.real_data
def test_aligned_faces_of_different_people_are_not_near_duplicates():
    """Two UTKFace crops of different children (ages 1 and 16) whose 64-bit pHashes are only 6 bits
    apart (aligned faces share one layout) are not grouped: the 255-bit pHash tells them apart, while
    a re-encoded, resized copy of either is still found."""
    folder = shared_data("utkface")
    a, b = (np.asarray(Image.open(folder / "images" / f).convert("RGB"))
            for f in ("16_1_3_20170104223040239.jpg", "1_1_2_20161219141431352.jpg"))
    assert hamming(phash(a), phash(b)) <= 6 and hamming(phash256(a), phash256(b)) > 40
    copy = np.asarray(Image.open(io.BytesIO(_jpeg(np.asarray(Image.fromarray(a).resize((150, 150))), 60))))
    assert hamming(phash256(a), phash256(copy)) <= 40
    d = Deduplicator()
    for rid, img in (("a", a), ("b", b), ("a-copy", copy)):
        d.add(rid, rid, _jpeg(img), img)  # one person per photo, as UTKFace (ids are image hashes)
    assert d.decide() == {"a": "duplicate:conflicting_persons", "a-copy": "duplicate:conflicting_persons"}


def test_dedup_policy_exact_near_and_conflicting_persons():
    faces = _faces(4)
    d = Deduplicator()
    items = [
        ("a", "alice", faces[0]), ("a-copy", "alice", faces[0]),                   # exact, same person
        ("b", "bob", faces[1]),
        ("b-requoted", "bob", np.asarray(Image.open(io.BytesIO(_jpeg(faces[1], 50))))),  # near, same person
        ("c", "carol", faces[2]), ("c-as-dan", "dan", faces[2]),                   # same photo, two people
        ("e", "erin", faces[3]),
    ]
    for rid, person, img in items:
        d.add(rid, person, _jpeg(img) if rid != "b-requoted" else _jpeg(img, 50), img)
    assert d.decide() == {
        "a-copy": "duplicate:exact",
        "b-requoted": "duplicate:near",
        "c": "duplicate:conflicting_persons",
        "c-as-dan": "duplicate:conflicting_persons",
    }


def test_atomic_write_private_and_no_overwrite(tmp_path):
    from fahr.utils.atomic import _umask, atomic_write_text

    key = tmp_path / "k"
    atomic_write_text(key, "first", permissions=0o600, overwrite=False)
    assert key.read_text() == "first" and key.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        atomic_write_text(key, "second", permissions=0o600, overwrite=False)
    assert key.read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["k"]  # no temp file left
    atomic_write_text(key, "third")  # the default replaces, with the umask's permissions
    assert key.read_text() == "third" and key.stat().st_mode & 0o777 == 0o666 & ~_umask()

