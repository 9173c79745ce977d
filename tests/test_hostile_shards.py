"""Hostile input for `fahr shards`: every bad input gets a one-line error naming the culprit or a
counted rejection (``read = written + rejected``), never a traceback, a hang or a wrong number; and a
rerun into a finished output never reuses stale work: after any change of input or options (and
after a crash in the final renaming) the output equals, byte for byte, a fresh build.

Every input is generated here (no stored binaries); photos are small synthetic images and
``align.skip_detection=true`` except where face detection is the point.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import shared_data
from data_pipelines import build as build_mod
from data_pipelines import plan as plan_mod
from data_pipelines.build import build_shards
from data_pipelines.options import AlignOptions, BuildOptions, SplitOptions
from data_pipelines.sources import folder as folder_src
from data_pipelines.sources import get_source
from fahr.boundary import InputError

FAST = ("align.skip_detection=true", "chunk_size=3", "samples_per_shard=2", "split.stratify=none",
        "split.fractions={train:0.5,val:0,test:0.5}")


def _photo(i: int, size: int = 40) -> bytes:
    """A distinct small JPEG (its own random pattern: no two are near duplicates)."""
    rng = np.random.default_rng(1000 + i)
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _folder(root: Path, rows: list[tuple[str, str, str]], photos: dict[str, bytes] | None = None) -> Path:
    """A `folder` source: manifest.csv (file, person_id, age) and the photos named in ``photos``
    (default: a distinct photo for every row, by its row number)."""
    root.mkdir(parents=True, exist_ok=True)
    if photos is None:
        photos = {name: _photo(int(re.sub(r"\D", "", name) or 0)) for name, _, _ in rows}
    for name, data in photos.items():
        (root / name).write_bytes(data)
    with open(root / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file", "person_id", "age"), *rows])
    return root


def _rows(numbers) -> list[tuple[str, str, str]]:
    return [(f"p{i:03d}.jpg", f"person{i % 7}", str(20 + i)) for i in numbers]


def _index(out: Path) -> dict:
    return json.loads((out / "index.json").read_text())


def _result(out: Path) -> dict[str, bytes]:
    """Everything a build leaves outside parts/ (shards and index.json), by name."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "parts"}


def _assert_clean(out: Path) -> None:
    """Only what index.json lists, plus parts/ with one mark per chunk (no orphans, no leftovers)."""
    index = _index(out)
    listed = {s["name"] for e in index["splits"].values() for s in e["shards"]}
    assert {p.name for p in out.iterdir()} == listed | {"index.json", "parts"}
    chunks = sorted(p.name for p in (out / "parts").iterdir())
    assert chunks == [f"c{c:06d}.json" for c in range(len(chunks))]
    assert index["read"] == index["written"] + sum(index["rejected"].values())


# ---- bad photos: counted rejections, never a hang ------------------------------------------------

def test_bad_photos_are_counted_rejections(tmp_path, run_fahr, monkeypatch):
    root = _folder(tmp_path / "in", _rows(range(4)))
    os.mkfifo(root / "fifo.jpg")  # reading it would block forever
    (root / "zero.jpg").symlink_to("/dev/zero")  # reading it would never end
    (root / "folder.jpg").mkdir()
    (root / "big.jpg").write_bytes(_photo(50, size=400))  # over the (lowered) byte cap
    good = _photo(60)
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "text.jpg").write_bytes(b"this is not an image\n" * 20)
    (root / "empty.jpg").write_bytes(b"")
    (root / "dangling.jpg").symlink_to(root / "nowhere.jpg")
    bad = ["fifo.jpg", "zero.jpg", "folder.jpg", "big.jpg", "truncated.jpg", "text.jpg", "empty.jpg",
           "dangling.jpg", "absent.jpg", "../outside.jpg", "/etc/passwd"]
    with open(root / "manifest.csv", "a", newline="") as f:
        csv.writer(f).writerows([(name, f"b{i}", "30") for i, name in enumerate(bad)])
    monkeypatch.setattr(folder_src, "MAX_PHOTO_BYTES", 5000)
    assert len(_photo(50, size=400)) > 5000 > max(len(_photo(i)) for i in range(4))
    r = run_fahr("shards", "source=folder", f"input={root}", f"output={tmp_path / 'out'}", *FAST)
    assert r.status == 0, r
    index = _index(tmp_path / "out")
    assert index["read"] == 4 + len(bad) and index["written"] == 4
    assert index["rejected"] == {"image:not_regular": 3, "image:too_large": 1, "image:unreadable": 2,
                                 "image:empty": 1, "image:missing": 2, "image:path": 2}
    assert "Traceback" not in r.err


def test_listing_sources_count_fifos_named_like_photos(tmp_path):
    """utkface (flat folder) and identity_folders list files: a FIFO or a link to a device named like
    a photo is a counted rejection, not a hang and not a silent skip."""
    flat = tmp_path / "utk"
    flat.mkdir()
    (flat / "26_0_2_20170104023102422.jpg").write_bytes(_photo(1, size=64))
    os.mkfifo(flat / "30_1_0_20170104023102423.jpg")
    (flat / "31_1_0_20170104023102424.jpg").symlink_to("/dev/zero")
    items = list(get_source("utkface")(flat))
    assert sorted(getattr(x, "reason", "ok") for x in items) == ["image:not_regular", "image:not_regular", "ok"]
    ident = tmp_path / "ids"
    (ident / "alice").mkdir(parents=True)
    os.mkfifo(ident / "alice" / "a.jpg")
    (ident / "alice" / "b.jpg").write_bytes(_photo(2))
    items = list(get_source("identity_folders")(ident))
    assert sorted(getattr(x, "reason", "ok") for x in items) == ["image:not_regular", "ok"]


def test_bad_fgnet_landmark_files_are_counted(tmp_path, run_fahr):
    root = tmp_path / "fg"
    (root / "images").mkdir(parents=True)
    (root / "points").mkdir()
    for i, stem in enumerate(["001A02", "001A05", "002A10", "002A12", "003A20"]):
        (root / "images" / f"{stem}.JPG").write_bytes(_photo(i, size=64))
    os.mkfifo(root / "points" / "001a02.pts")
    (root / "points" / "001a05.pts").write_bytes(b"\x00\xff garbage \x80")
    (root / "points" / "002a10.pts").mkdir()
    (root / "points" / "002a12.pts").write_text("version: 1\nn_points: 68\n{\n1 2 3\n}\n")
    (root / "points" / "003a20.pts").symlink_to("/dev/zero")
    r = run_fahr("shards", "source=fgnet", f"input={root}", f"output={tmp_path / 'out'}", *FAST)
    assert r.status == 0, r
    index = _index(tmp_path / "out")
    assert index["read"] == 5 and index["written"] == 0
    assert index["rejected"] == {"landmarks:not_regular": 3, "landmarks:malformed": 2}


# ---- bad tables: one-line errors naming the file -------------------------------------------------

@pytest.mark.parametrize("content, expected", [
    ("file,age\nphoto,é\n".encode("latin-1"), r"manifest .*manifest\.csv: not UTF-8"),
    (b"file,age\n\x00\x01\x02\x03", r"manifest .*manifest\.csv: holds NUL bytes"),
    (b"path,age\np000.jpg,3\n", r"manifest .*manifest\.csv: missing required column\(s\) \['file'\]"),
    (b"file;age\np000.jpg;3\n", r"manifest .*manifest\.csv: missing required column\(s\) \['file'\].*';'-separated"),
    (b"", r"manifest .*manifest\.csv: empty, or no header row"),
    (b"file,age\np000.jpg,3,x,y\n", r"manifest .*manifest\.csv: line 2 has 4 cells"),
    (b"file,age,file\np000.jpg,3,p000.jpg\n", r"manifest .*manifest\.csv: columns 1 and 3 of the header have the same name"),
    (b"file,age,patient_name\np000.jpg,3,Jane\n", r"manifest .*manifest\.csv: unexpected column\(s\) \['patient_name'\]"),
])
def test_bad_manifest_is_one_line_naming_the_file(tmp_path, run_fahr, content, expected):
    root = _folder(tmp_path / "in", _rows([0]))
    (root / "manifest.csv").write_bytes(content)
    r = run_fahr("shards", "source=folder", f"input={root}", f"output={tmp_path / 'out'}", *FAST)
    assert r.status == 2 and re.search(r"^fahr shards: error: " + expected, r.error_line), r
    assert "Traceback" not in r.err and not (tmp_path / "out" / "index.json").exists()


def test_manifest_that_is_a_fifo_or_device(tmp_path, run_fahr):
    root = _folder(tmp_path / "in", _rows([0]))
    (root / "manifest.csv").unlink()
    os.mkfifo(root / "manifest.csv")
    r = run_fahr("shards", "source=folder", f"input={root}", f"output={tmp_path / 'out'}", *FAST)
    assert r.status == 2 and "manifest.csv: is a FIFO (named pipe), not a regular file" in r.error_line, r
    (root / "manifest.csv").unlink()
    (root / "manifest.csv").symlink_to("/dev/zero")
    r = run_fahr("shards", "source=folder", f"input={root}", f"output={tmp_path / 'out'}", *FAST)
    assert r.status == 2 and "manifest.csv: is a character device, not a regular file" in r.error_line, r


COHORT_HEADER = ("patient_id", "photo_path", "photo_date", "age_at_photo", "bmi")


def _cohort(root: Path, rows: list[tuple], header: tuple | None = COHORT_HEADER) -> Path:
    (root / "photos").mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(rows):
        (root / row[1]).write_bytes(_photo(200 + i))
    with open(root / "cohort.csv", "w", newline="") as f:
        csv.writer(f).writerows(([header] if header else []) + list(rows))
    return root


def test_cohort_table_errors_never_echo_cells(tmp_path, run_fahr, monkeypatch):
    monkeypatch.setenv("FAHR_DEID_SALT", "a-test-salt-of-32-bytes-........")
    rows = [("MRN4711", "photos/Doe_Jane_MRN4711.jpg", "2015-01-01", "50", "24.5"),
            ("MRN4712", "photos/Roe_Rick_MRN4712.jpg", "2015-02-01", "60", "nan")]
    root = _cohort(tmp_path / "headerless", rows, header=None)
    r = run_fahr("shards", "source=cohort", f"input={root}", f"output={tmp_path / 'o1'}", *FAST)
    assert r.status == 2 and "cohort CSV" in r.error_line and "missing required column(s)" in r.error_line, r
    for secret in ("MRN", "Doe", "Jane", "2015", "24.5"):
        assert secret not in r.err and secret not in r.out
    # a ';'-separated cohort table: the hint, no cell
    (root / "cohort.csv").write_text(";".join(COHORT_HEADER) + "\n" + ";".join(rows[0]) + "\n")
    r = run_fahr("shards", "source=cohort", f"input={root}", f"output={tmp_path / 'o1'}", *FAST)
    assert r.status == 2 and "';'-separated" in r.error_line and "MRN" not in r.err, r
    # with a header: a NaN covariate is a counted rejection, and nothing names a patient or a file
    root = _cohort(tmp_path / "ok", rows)
    r = run_fahr("shards", "source=cohort", f"input={root}", f"output={tmp_path / 'o2'}", *FAST,
                 "+source_options.covariates=[bmi]")
    assert r.status == 0, r
    index = _index(tmp_path / "o2")
    assert index["read"] == 2 and index["written"] == 1 and index["rejected"] == {"label:bmi": 1}
    for secret in ("MRN", "Doe", "Jane", "Roe", "Rick"):
        assert secret not in r.err and secret not in r.out
    blob = b"".join(p.read_bytes() for p in (tmp_path / "o2").rglob("*") if p.is_file())
    assert b"MRN" not in blob and b"Doe" not in blob and b"2015" not in blob


# ---- bad options: one line naming the key, before any work ---------------------------------------

@pytest.mark.parametrize("overrides, expected", [
    (["split.fractions={train:0.5,val:0,test:0.6}"], r"split\.fractions must sum to 1, got 1\.1"),
    (["split.fractions={train:-0.5,val:0,test:1.5}"], r"split\.fractions\.train must be a finite number >= 0"),
    (["split.fractions={train:nan,val:0,test:1.0}"], r"split\.fractions\.train must be a finite number >= 0"),
    (["+split.fractions.x-y=0"], r"split\.fractions: split name 'x-y' must be a letter then up to 31 letters, digits or '_'"),
    (["split.stratify=sometimes"], r"split\.stratify must be one of auto, age, event, none"),
    (["chunk_size=0"], r"chunk_size must be an integer in \[1, 100000\]"),
    (["chunk_size=-5"], r"chunk_size must be an integer in \[1, 100000\]"),
    (["samples_per_shard=0"], r"samples_per_shard must be an integer in \[1, 1000000\]"),
    (["processes=0"], r"processes must be an integer in \[1, \d+\]"),
    (["processes=100000"], r"processes must be an integer in \[1, \d+\]"),
    (["dedup.near_threshold=9"], r"dedup\.near_threshold must be an integer in \[0, 7\]"),
    (["dedup.near_threshold=-1"], r"dedup\.near_threshold must be an integer in \[0, 7\]"),
    (["align.image_size=100000"], r"align\.image_size must be an integer in \[16, 1024\]"),
    (["align.image_size=8"], r"align\.image_size must be an integer in \[16, 1024\]"),
    (["align.margin=-3"], r"align\.margin must be a number in \[0, 2\]"),
    (["align.margin=inf"], r"align\.margin must be a number in \[0, 2\]"),
    (["align.min_confidence=1.5"], r"align\.min_confidence must be a number in \[0, 1\]"),
    (["align.multi_face=all"], r"align\.multi_face must be one of reject, largest, central"),
    (["deid.enabled=true", "deid.key_file=/nonexistent/salt.key"], r"deid\.key_file=/nonexistent/salt\.key does not exist"),
    (["deid.enabled=true", "deid.key_file=/dev/zero"], r"deid\.key_file=/dev/zero is not a regular file"),
    (["deid.key_file=/dev/null"], r"deid\.key_file is set but de-identification is off"),
    (["+source_options.keep_colums=[site]"], r"source_options\.keep_colums is not an option of source=folder "
                                             r"\(it accepts: keep_columns, manifest\)"),
    (["+source_options.keep_columns=site"], r"source_options\.keep_columns must be a list of non-empty strings"),
    (["+align.skip_detectoin=true"], r"skip_detectoin"),
])
def test_bad_option_is_one_line_naming_the_key(tmp_path, run_fahr, overrides, expected):
    root = _folder(tmp_path / "in", _rows(range(2)))
    out = tmp_path / "out"
    r = run_fahr("shards", "source=folder", f"input={root}", f"output={out}", *FAST, *overrides)
    assert r.status == 2 and re.search(r"^fahr shards: error: .*" + expected, r.error_line), r
    assert "Traceback" not in r.err
    assert not out.exists()  # refused before any work


def test_a_mistyped_option_is_refused_by_the_schema_naming_it(tmp_path, run_fahr):
    """deid.enabled is a bool or null (on for cohorts): Hydra refuses anything else, naming the key."""
    r = run_fahr("shards", "source=folder", f"input={tmp_path}", f"output={tmp_path / 'out'}", "deid.enabled=maybe")
    assert r.status == 2 and "deid.enabled=maybe" in r.err and "not a valid bool" in r.err and "Traceback" not in r.err


def test_bad_source_key_file_and_source_options(tmp_path, run_fahr):
    root = _folder(tmp_path / "in", _rows(range(2)))
    args = (f"input={root}", f"output={tmp_path / 'out'}", *FAST)
    r = run_fahr("shards", "source=folder", f"input={root}", f"output={tmp_path / 'out'}", *FAST[:-1],
                 "split.fractions={train:0.8,test:0.2}")  # merged into the default train/val/test by Hydra
    assert r.status == 2 and "split.fractions must sum to 1, got 1.1" in r.error_line, r
    assert "is merged into the default" in r.error_line and "split.fractions={train:0.8,val:0,test:0.2}" in r.error_line
    r = run_fahr("shards", "source=nope", *args)
    assert r.status == 2 and "source='nope' is not a known source; known: appa_real, cohort," in r.error_line, r
    r = run_fahr("shards", "source=fgnet", *args, "+source_options.covariates=[bmi]")
    assert r.status == 2 and "source_options.covariates is not an option of source=fgnet" in r.error_line, r
    r = run_fahr("shards", "source=appa_real", *args, "+source_options.splits=[train,../../etc]")
    assert r.status == 2 and "APPA-REAL splits ['../../etc']" in r.error_line, r
    (tmp_path / "empty.key").write_bytes(b"")
    r = run_fahr("shards", "source=cohort", *args, f"deid.key_file={tmp_path / 'empty.key'}")
    assert r.status == 2 and "deid.key_file=" in r.error_line and "is empty" in r.error_line, r
    (tmp_path / "short.key").write_bytes(b"short")
    r = run_fahr("shards", "source=cohort", *args, f"deid.key_file={tmp_path / 'short.key'}")
    assert r.status == 2 and "shorter than 16 bytes" in r.error_line and "short\n" not in r.err, r
    r = run_fahr("shards", "source=folder", f"input={tmp_path / 'absent'}", f"output={tmp_path / 'out'}", *FAST)
    assert r.status == 2 and "input=" in r.error_line and "does not exist" in r.error_line, r
    assert not (tmp_path / "out").exists()


# ---- bad outputs: refused before any work ---------------------------------------------------------

def test_bad_outputs_are_refused_before_any_work(tmp_path, run_fahr, monkeypatch):
    root = _folder(tmp_path / "in", _rows(range(3)))
    calls = []
    monkeypatch.setattr(plan_mod, "hash_task", lambda *a, **k: calls.append(1))  # no work may start

    def refused(output: str, expected: str) -> None:
        r = run_fahr("shards", "source=folder", f"input={root}", f"output={output}", *FAST)
        assert r.status == 2 and re.search(r"^fahr shards: error: .*" + expected, r.error_line), r
        assert "Traceback" not in r.err

    refused(str(root), r"is also the input of this command; refusing to write into it")
    refused(str(tmp_path), r"holds the input .*; refusing to write around the input")
    (tmp_path / "a_file").write_text("x")
    refused(str(tmp_path / "a_file"), r"output=.*a_file exists and is not a directory")
    refused(str(tmp_path / "a_file" / "sub"), r"cannot create folder .*\(Not a directory\)")
    refused("/proc/fahr-shards-test", r"cannot create folder /proc/fahr-shards-test")
    refused(str(root / "manifest.csv"), r"exists and is not a directory")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.pdf").write_text("years of work")
    refused(str(foreign), r"is a non-empty directory that is not a `fahr shards` output")
    (foreign / "index.json").write_text('{"format": "fahr-shards/1"}')  # another kind of index
    refused(str(foreign), r"is a non-empty directory that is not a `fahr shards` output")
    ours = tmp_path / "ours"
    (ours / "parts").mkdir(parents=True)
    (ours / "train-000000.tar").mkdir()
    refused(str(ours), r"train-000000\.tar is a directory, where `fahr shards` keeps its own files")
    (ours / "train-000000.tar").rmdir()
    (ours / "index.json").mkdir()
    refused(str(ours), r"index\.json is a directory; `fahr shards` writes its index there")
    (ours / "index.json").rmdir()
    (ours / "parts" / "c000000.json").symlink_to("/dev/zero")
    refused(str(ours), r"c000000\.json is a symbolic link, where `fahr shards` keeps its own files")
    assert calls == [] and (foreign / "thesis.pdf").read_text() == "years of work"


def test_a_second_build_into_a_busy_output_is_refused(tmp_path):
    root = _folder(tmp_path / "in", _rows(range(3)))
    out = tmp_path / "out"
    (out / "parts").mkdir(parents=True)
    fd = os.open(out / "parts", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(InputError, match="another `fahr shards` is writing into"):
            build_shards("folder", lambda: get_source("folder")(root), out, _options())
    finally:
        os.close(fd)
    build_shards("folder", lambda: get_source("folder")(root), out, _options())


# ---- detection: a two-face photo is rejected whatever shares its chunk ----------------------------

@pytest.mark.real_data
def test_two_faces_rejected_whatever_else_is_in_the_chunk(tmp_path):
    fg = shared_data("fgnet") / "images"
    a, b = (Image.open(fg / n).convert("RGB") for n in ("003A25.JPG", "017A22.JPG"))
    two = Image.new("RGB", (a.width + b.width, max(a.height, b.height)))
    two.paste(a, (0, 0))
    two.paste(b, (a.width, 0))
    root = tmp_path / "in"
    root.mkdir()
    two.save(root / "two.jpg", quality=95)
    for name, face in (("big_a.jpg", a), ("big_b.jpg", b)):  # large photos around it (~4x the pixels)
        face.resize((face.width * 2, face.height * 2)).save(root / name, quality=95)
    rows = [("big_a.jpg", "pa", "25"), ("two.jpg", "pt", "30"), ("big_b.jpg", "pb", "22")]
    options = BuildOptions(split=SplitOptions(fractions={"train": 1.0}, stratify="none"), chunk_size=3,
                           samples_per_shard=8, align=AlignOptions(multi_face="reject"))
    with open(root / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file", "person_id", "age"), *rows])
    together = build_shards("folder", lambda: get_source("folder")(root), tmp_path / "together", options)
    assert together["read"] == 3 and together["written"] == 2 and together["rejected"] == {"face:multiple": 1}
    with open(root / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file", "person_id", "age"), rows[1]])
    alone = build_shards("folder", lambda: get_source("folder")(root), tmp_path / "alone", options)
    assert alone["rejected"] == {"face:multiple": 1} and alone["written"] == 0


# ---- reruns never reuse stale work ----------------------------------------------------------------

def _options(fractions: dict[str, float] | None = None, **kw) -> BuildOptions:
    base = dict(align=AlignOptions(skip_detection=True), chunk_size=3, samples_per_shard=2,
                split=SplitOptions(fractions=fractions or {"train": 0.5, "test": 0.5}, stratify="none"))
    return BuildOptions(**{**base, **kw})


def _build(root: Path, out: Path, options: BuildOptions) -> dict:
    return build_shards("folder", lambda: get_source("folder")(root), out, options, inputs=(root,))


def _fresh(tmp_path: Path, root: Path, options: BuildOptions) -> dict[str, bytes]:
    fresh = tmp_path / f"fresh{len(list(tmp_path.glob('fresh*')))}"
    _build(root, fresh, options)
    return _result(fresh)


def test_reruns_after_every_change_equal_a_fresh_build(tmp_path, monkeypatch):
    root = _folder(tmp_path / "in", _rows(range(12)))
    out = tmp_path / "out"
    options = _options()
    _build(root, out, options)
    assert _result(out) == _fresh(tmp_path, root, options)
    _assert_clean(out)

    written = []
    real = build_mod.write_chunk
    monkeypatch.setattr(build_mod, "write_chunk", lambda chunk, *a: written.append(chunk) or real(chunk, *a))

    def rerun_equals_fresh(options: BuildOptions) -> list[int]:
        written.clear()
        _build(root, out, options)
        rebuilt = list(written)
        assert _result(out) == _fresh(tmp_path, root, options)
        _assert_clean(out)
        return rebuilt

    assert rerun_equals_fresh(options) == []  # unchanged: every chunk reused
    # an edited label: only its chunk is rebuilt
    rows = _rows(range(12))
    rows[4] = (rows[4][0], rows[4][1], "77")
    _folder(root, rows, photos={})
    assert rerun_equals_fresh(options) == [1]
    assert 77.0 in _ages(out)
    # a changed photo (same name): its chunk
    (root / "p010.jpg").write_bytes(_photo(99))
    assert rerun_equals_fresh(options) == [3]
    # a removed row early on: every later chunk's range moves
    del rows[1]
    _folder(root, rows, photos={})
    assert rerun_equals_fresh(options) == [0, 1, 2, 3]
    assert _index(out)["read"] == 11
    # an added row (of a known person: a new one may move others to another split, rebuilding their chunks)
    rows.append(("p050.jpg", "person3", "50"))
    _folder(root, rows, photos={"p050.jpg": _photo(50)})
    assert rerun_equals_fresh(options) == [3]
    # options that shape the shards
    small = _options(align=AlignOptions(skip_detection=True, image_size=64))
    assert rerun_equals_fresh(small) == [0, 1, 2, 3]
    assert _index(out)["image_size"] == 64 and _crop_sizes(out) == {(64, 64)}
    assert rerun_equals_fresh(_options(align=small.align, samples_per_shard=3)) == [0, 1, 2, 3]
    # fewer chunks and another split: stale flat shards and marks go
    assert rerun_equals_fresh(_options(align=small.align, chunk_size=5, fractions={"train": 1.0})) == [0, 1, 2]
    assert not list(out.glob("test-*.tar"))


def _ages(out: Path) -> set[float]:
    import webdataset as wds

    return {s["json"]["age"] for p in sorted(out.glob("*.tar"))
            for s in wds.WebDataset(str(p), shardshuffle=False).decode()}


def _crop_sizes(out: Path) -> set[tuple[int, int]]:
    import webdataset as wds

    return {s["jpg"].size for p in sorted(out.glob("*.tar"))
            for s in wds.WebDataset(str(p), shardshuffle=False).decode("pil")}


def test_old_or_tampered_chunk_marks_are_rebuilt(tmp_path, monkeypatch):
    root = _folder(tmp_path / "in", _rows(range(7)))
    out = tmp_path / "out"
    _build(root, out, _options())
    expected = _result(out)
    written = []
    real = build_mod.write_chunk
    monkeypatch.setattr(build_mod, "write_chunk", lambda chunk, *a: written.append(chunk) or real(chunk, *a))
    mark = json.loads((out / "parts" / "c000000.json").read_text())
    old = {k: v for k, v in mark.items() if k not in ("format", "fingerprint")}  # the format before fingerprints
    (out / "parts" / "c000000.json").write_text(json.dumps(old))
    (out / "parts" / "c000001.json").write_text("{not json")
    evil = {**mark, "chunk": 2, "shards": {"train": [{**mark["shards"]["train"][0], "name": "../../x.tar"}]}}
    (out / "parts" / "c000002.json").write_text(json.dumps(evil))
    (out / "parts" / "c000009.json").write_text(json.dumps(mark))  # beyond the last chunk
    _build(root, out, _options())
    assert written == [0, 1, 2] and _result(out) == expected
    _assert_clean(out)


def test_a_copied_output_is_reused_by_content(tmp_path, monkeypatch):
    """Copied shards have new inodes: their chunk marks find them by size and sha256, not rebuild."""
    root = _folder(tmp_path / "in", _rows(range(9)))
    _build(root, tmp_path / "out", _options())
    shutil.copytree(tmp_path / "out", tmp_path / "copy")
    written = []
    real = build_mod.write_chunk
    monkeypatch.setattr(build_mod, "write_chunk", lambda chunk, *a: written.append(chunk) or real(chunk, *a))
    hashed = []
    real_sha = build_mod.file_sha256
    monkeypatch.setattr(build_mod, "file_sha256", lambda p: hashed.append(p) or real_sha(p))
    _build(root, tmp_path / "copy", _options())
    assert written == [] and hashed and _result(tmp_path / "copy") == _result(tmp_path / "out")
    hashed.clear()
    _build(root, tmp_path / "copy", _options())  # the marks now know the copies: no hashing
    assert written == [] and hashed == []


@pytest.mark.parametrize("crash_after", [0, 1, 4, 8, 12, 15, "unlink", None])  # 8 staging moves, then 8 placements
def test_crash_in_the_final_renaming_then_a_changed_input_converges(tmp_path, monkeypatch, crash_after):
    """The first chunk loses its shards (its rows become rejections): the later chunks are reused, but
    their flat names shift, so their shards go through parts/staging/. A crash after ``crash_after``
    renames (or while removing stale shards), then another change of the input, then a rerun: the
    output is the fresh build's."""
    root = _folder(tmp_path / "in", _rows(range(15)))
    out = tmp_path / "out"
    _build(root, out, _options())
    rows = _rows(range(15))
    for i in range(3):  # chunk 0's rows: ages out of range (each person has other photos: same splits)
        rows[i] = (rows[i][0], rows[i][1], "-1")
    _folder(root, rows, photos={})
    real_replace, real_unlink, moves = os.replace, os.unlink, []

    def crashing_replace(src, dst):
        dst = Path(dst)
        if dst.suffix == ".tar" and (dst.parent == out or dst.parent.name == "staging"):
            if len(moves) == crash_after:
                raise OSError("simulated crash mid-rename")
            moves.append(dst)
        return real_replace(src, dst)

    def crashing_unlink(path, *a, **k):
        if crash_after == "unlink" and Path(path).parent == out and Path(path).suffix == ".tar":
            raise OSError("simulated crash while removing stale shards")
        return real_unlink(path, *a, **k)

    monkeypatch.setattr(os, "replace", crashing_replace)
    monkeypatch.setattr(os, "unlink", crashing_unlink)
    written = []
    real_write = build_mod.write_chunk
    monkeypatch.setattr(build_mod, "write_chunk", lambda chunk, *a: written.append(chunk) or real_write(chunk, *a))
    if crash_after is None:
        _build(root, out, _options())
        assert written == [0]  # only the changed chunk was rebuilt; the others' shards moved
        assert any(m.parent.name == "staging" for m in moves)  # shifted shards went through staging
        assert _result(out) == _fresh(tmp_path, root, _options())
    else:
        with pytest.raises(OSError, match="simulated crash"):
            _build(root, out, _options())
        assert written == [0]
        assert not (out / "index.json").exists()  # a half-placed output has no index
    monkeypatch.setattr(os, "replace", real_replace)
    monkeypatch.setattr(os, "unlink", real_unlink)
    # ... the input changes again before the rerun: a label (chunk 1) and a new row (a new chunk 5)
    rows[5] = (rows[5][0], rows[5][1], "88")
    rows.append(("p060.jpg", "person6", "61"))
    _folder(root, rows, photos={"p060.jpg": _photo(60)})
    written.clear()
    _build(root, out, _options())
    assert written == [1, 5]
    assert _result(out) == _fresh(tmp_path, root, _options())
    _assert_clean(out)


def test_input_changing_between_the_two_passes_is_an_error(tmp_path):
    root = _folder(tmp_path / "in", _rows(range(5)))
    calls = []

    def make_items():
        calls.append(1)
        items = list(get_source("folder")(root))
        return items if len(calls) == 1 else items[:-1]  # one row fewer in pass 2

    with pytest.raises(InputError, match="the input changed while `fahr shards` was reading it"):
        build_shards("folder", make_items, tmp_path / "out", _options())
    assert not (tmp_path / "out" / "index.json").exists()
