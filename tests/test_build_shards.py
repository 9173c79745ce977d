"""`fahr shards` core (data_pipelines.build) on real photos: counts balance, splits are
person-disjoint, labels survive, reruns resume, cohorts leave no identifier in any byte."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections import defaultdict
from pathlib import Path

import pytest
import webdataset as wds

from conftest import shared_data, utk_subset
from data_pipelines import build as build_mod
from data_pipelines.build import build_shards
from data_pipelines.options import AlignOptions, BuildOptions, DedupOptions, DeidOptions, SplitOptions
from data_pipelines.sources import get_source
from fahr.data.shard_index import resolve_shard_spec


def _samples(index_path: Path, split: str) -> list[dict]:
    out = []
    for shard in resolve_shard_spec(f"{index_path}#{split}"):
        for s in wds.WebDataset(shard, shardshuffle=False).decode("pil"):
            out.append(s)
    return out


def _utk_options(**kw) -> BuildOptions:
    return BuildOptions(align=AlignOptions(skip_detection=True), chunk_size=100, samples_per_shard=40, **kw)


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.real_data
def test_utkface_to_split_shards_and_back(tmp_path):
    root = utk_subset(tmp_path, 300)
    out = tmp_path / "shards"
    index = build_shards("utkface", lambda: get_source("utkface")(root), out, _utk_options())
    assert index["read"] == 300 == index["written"] + sum(index["rejected"].values())
    assert set(index["splits"]) == {"train", "val", "test"}
    assert abs(index["splits"]["test"]["count"] - 30) <= 5

    def key(file: str) -> str:
        return hashlib.sha256(f"utkface\x00{file}".encode()).hexdigest()[:24]

    ages = {key(r["file"]): float(r["age"]) for r in csv.DictReader(open(root / "manifest.csv"))}
    persons: dict[str, set] = defaultdict(set)
    seen_ages = []
    for split in index["splits"]:
        samples = _samples(out / "index.json", split)
        assert len(samples) == index["splits"][split]["count"]
        for s in samples:
            assert s["jpg"].size == (112, 112)
            persons[s["json"]["person"]].add(split)
            assert s["json"]["age"] == ages[s["__key__"]]  # labels intact
            seen_ages.append(s["json"]["age"])
    assert all(len(v) == 1 for v in persons.values()), "a person in two splits"
    assert len(seen_ages) == index["written"]
    # UTKFace person ids are image hashes, so a near-duplicate photo is always "two persons"
    assert set(index["rejected"]) <= {"duplicate:conflicting_persons", "duplicate:exact", "duplicate:near"}
    train = index["splits"]["train"]
    assert sum(train["labels"]["age"]["decades"].values()) == train["count"] == train["labels"]["present"]["age"]
    train_ages = [s["json"]["age"] for s in _samples(out / "index.json", "train")]
    assert train["labels"]["age"]["decades"].get("20-29", 0) == sum(20 <= a < 30 for a in train_ages)


@pytest.mark.real_data
def test_rerun_after_a_crash_resumes_and_matches_a_clean_build(tmp_path, monkeypatch):
    root = utk_subset(tmp_path, 250)
    clean = build_shards("utkface", lambda: get_source("utkface")(root), tmp_path / "clean", _utk_options())

    real = build_mod.write_chunk
    calls, crashed = [], []

    def crash_on_second_chunk(chunk, *args):
        calls.append(chunk)
        if chunk == 1 and not crashed:  # the first attempt at chunk 1 dies
            crashed.append(chunk)
            raise RuntimeError("simulated crash mid-run")
        return real(chunk, *args)

    out = tmp_path / "crashy"
    monkeypatch.setattr(build_mod, "write_chunk", crash_on_second_chunk)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_shards("utkface", lambda: get_source("utkface")(root), out, _utk_options())
    assert (out / "parts" / "c000000.json").is_file() and not (out / "index.json").exists()
    first_mark = (out / "parts" / "c000000.json").stat().st_mtime_ns
    calls.clear()
    index = build_shards("utkface", lambda: get_source("utkface")(root), out, _utk_options())
    assert calls == [1, 2]  # chunk 0 was kept from the first run
    assert (out / "parts" / "c000000.json").stat().st_mtime_ns == first_mark
    assert index == clean  # same counts, shard names, sha256s
    assert not list(out.rglob("*.tmp"))


def _tree(root: Path) -> dict[str, bytes]:
    """The build's result: every file outside parts/ (the chunk marks there record file identities)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] != "parts"}


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.real_data
def test_flat_shard_series_per_split_and_a_crash_mid_move_resumes(tmp_path, monkeypatch):
    """Shards end as <split>-000000.tar, ... (webdataset convention, brace patterns work); the move out
    of parts/ survives a crash, and a rerun repairs a finished shard that holds other bytes."""
    from fahr.data.shard_reader import expand_shards

    root = utk_subset(tmp_path, 120)
    options = BuildOptions(align=AlignOptions(skip_detection=True), chunk_size=40, samples_per_shard=10,
                           split=SplitOptions(fractions={"train": 0.7, "test": 0.3}))
    build = lambda out: build_shards("utkface", lambda: get_source("utkface")(root), out, options)  # noqa: E731
    clean_dir = tmp_path / "clean"
    clean = build(clean_dir)
    assert set(clean["splits"]) == {"train", "test"}
    # the chunk marks stay (reruns skip finished chunks), the chunk directories are gone
    assert sorted(p.name for p in (clean_dir / "parts").iterdir()) == ["c000000.json", "c000001.json", "c000002.json"]
    marks = [json.loads((clean_dir / "parts" / f"c{c:06d}.json").read_text()) for c in range(3)]
    expected, samples = [], []
    for split, entry in clean["splits"].items():
        n = len(entry["shards"])
        names = [f"{split}-{k:06d}.tar" for k in range(n)]
        assert [s["name"] for s in entry["shards"]] == names  # contiguous, from 000000
        assert n == sum(len(m["shards"].get(split, [])) for m in marks) > 3  # several chunks, several shards each
        # chunk order, then each chunk's shard order: same sizes and hashes as the marks recorded
        assert [(s["bytes"], s["sha256"]) for s in entry["shards"]] == [
            (s["bytes"], s["sha256"]) for m in marks for s in m["shards"].get(split, [])]
        for s in entry["shards"]:
            assert hashlib.sha256((clean_dir / s["name"]).read_bytes()).hexdigest() == s["sha256"]
        expected += names
        got = _samples(clean_dir / "index.json", split)
        assert len(got) == entry["count"] == sum(s["num_samples"] for s in entry["shards"])
        samples += got
        assert expand_shards(f"{clean_dir}/{split}-{{000000..{n - 1:06d}}}.tar") == [str(clean_dir / x) for x in names]
    assert sorted(p.relative_to(clean_dir).as_posix() for p in clean_dir.rglob("*.tar")) == sorted(expected)
    assert len({s["__key__"] for s in samples}) == len(samples) == clean["written"]

    # a crash after 5 of the moves; the rerun finishes them, byte for byte as the clean build
    out = tmp_path / "crashy"
    real_replace, moved, crash = os.replace, [], [True]

    def crashing_replace(src, dst):
        if Path(dst).parent == out and re.fullmatch(r"(train|test)-\d{6}\.tar", Path(dst).name):
            if crash[0] and len(moved) == 5:
                raise OSError("simulated crash mid-move")
            moved.append(dst)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(OSError, match="simulated crash mid-move"):
        build(out)
    assert not (out / "index.json").exists() and len(list(out.glob("*.tar"))) == 5
    assert list((out / "parts").rglob("*.tar"))  # the rest still in the chunk directories
    crash[0] = False
    assert build(out) == clean
    assert _tree(out) == _tree(clean_dir)
    assert build(out) == clean and _tree(out) == _tree(clean_dir)  # rerun of a finished build: unchanged

    # a chunk whose mark is lost is rewritten; its shards land on identical finished ones: fine
    (out / "parts" / "c000001.json").unlink()
    assert build(out) == clean and _tree(out) == _tree(clean_dir)
    # a finished shard holding other bytes (its chunk mark lost or not) is rebuilt and replaced
    first_of_chunk_1 = out / f"train-{len(marks[0]['shards']['train']):06d}.tar"
    first_of_chunk_1.write_bytes(b"another build")
    assert build(out) == clean and _tree(out) == _tree(clean_dir)
    (out / "parts" / "c000001.json").unlink()
    first_of_chunk_1.write_bytes(b"another build")
    assert build(out) == clean and _tree(out) == _tree(clean_dir)


@pytest.mark.real_data
def test_fgnet_raw_photos_detected_and_aligned(tmp_path):
    root = shared_data("fgnet")
    index = build_shards("fgnet", lambda: get_source("fgnet")(root), tmp_path / "fg",
                         BuildOptions(chunk_size=32, samples_per_shard=16,
                                      split=SplitOptions(fractions={"train": 0.6, "test": 0.4}, stratify="none")))
    assert index["read"] == 61 == index["written"] + sum(index["rejected"].values())
    assert index["written"] >= 58  # >= 95% found
    # FG-NET: 5 people; each lands in exactly one split
    persons = defaultdict(set)
    for split in index["splits"]:
        for s in _samples(tmp_path / "fg" / "index.json", split):
            persons[s["json"]["person"]].add(split)
    assert len(persons) == 5 and all(len(v) == 1 for v in persons.values())


@pytest.mark.real_data
def test_cohort_leaves_no_identifier_in_any_byte(tmp_path, monkeypatch):
    utk = shared_data("utkface")
    photos = sorted((utk / "images").iterdir())[:12]
    root = tmp_path / "cohort"
    (root / "photos").mkdir(parents=True)
    rows = [["patient_id", "photo_path", "photo_date", "birth_date", "sex", "death_date", "notes"]]
    for i, p in enumerate(photos):
        dst = root / "photos" / f"Smith_John_MRN{1000 + i // 2}_{i}.jpg"
        dst.write_bytes(p.read_bytes())
        rows.append([f"MRN{1000 + i // 2}", f"photos/{dst.name}", f"2015-0{1 + i % 2}-15", "1950-06-01",
                     str(i % 2), "2018-03-01" if i % 3 == 0 else "", "John Smith, 12 Elm Road"])
    with open(root / "cohort.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    monkeypatch.setenv("FAHR_DEID_SALT", "a-test-salt-of-32-bytes-........")
    out = tmp_path / "out"
    index = build_shards("cohort", lambda: get_source("cohort")(root), out,
                         BuildOptions(deid=DeidOptions(enabled=True), dedup=DedupOptions(enabled=False), chunk_size=5,
                                      split=SplitOptions(fractions={"train": 0.5, "test": 0.5}, stratify="event"),
                                      align=AlignOptions(skip_detection=True)))
    assert index["read"] == 12 == index["written"] + sum(index["rejected"].values())
    # cut into 3 tasks (anchors found per person bucket, splits by event): the same bytes
    options3 = BuildOptions(deid=DeidOptions(enabled=True), dedup=DedupOptions(enabled=False), chunk_size=5,
                            split=SplitOptions(fractions={"train": 0.5, "test": 0.5}, stratify="event"),
                            align=AlignOptions(skip_detection=True))
    assert build_shards("cohort", lambda: get_source("cohort")(root), tmp_path / "out3", options3, tasks=3) == index
    assert _tree(tmp_path / "out3") == _tree(out)
    blob = b"".join(p.read_bytes() for d in (out, tmp_path / "out3") for p in d.rglob("*") if p.is_file())
    for secret in (b"MRN", b"Smith", b"John", b"Elm", b"1950", b"2015-", b"2018", b"a-test-salt"):
        assert secret not in blob, secret
    samples = [s for split in index["splits"] for s in _samples(out / "index.json", split)]
    labels = samples[0]["json"]
    assert labels["person"].startswith("p") and "photo_day" in labels and "notes" not in labels


@pytest.mark.real_data
def test_fahr_shards_command_config_and_summary(tmp_path, capsys):
    from conftest import compose_config
    from data_pipelines.options import ShardsConfig
    from fahr.config.schema import validate
    from fahr.pipeline.shards import shards

    root = utk_subset(tmp_path, 60)
    cfg = compose_config("shards", ["source=utkface", f"input={root}", f"output={tmp_path / 'out'}",
                                    "align.skip_detection=true", "chunk_size=25", "samples_per_shard=20"])
    index = shards(cfg)
    assert index["read"] == 60 and (tmp_path / "out" / "index.json").is_file()
    out = capsys.readouterr().out
    assert "written: train" in out and "read" in out
    with pytest.raises(Exception, match="skip_detectoin"):
        validate(compose_config("shards", ["source=utkface", "input=x", "output=y", "+align.skip_detectoin=true"]),
                 ShardsConfig)
    # the trainer reads a split of it
    from fahr.data.shard_reader import ShardStream, make_loader

    urls = resolve_shard_spec(f"{tmp_path / 'out'}/index.json#train")
    stream = ShardStream(urls, samples_per_epoch=index["splits"]["train"]["count"], batch_size=8, seed=0,
                         shuffle_buffer=0, world_size=1, rank=0, num_workers=0, label_keys=("age",))
    batches = list(make_loader(stream, num_workers=0))
    assert batches[0]["image"].shape[1:] == (3, 112, 112) and batches[0]["age"].dtype.is_floating_point
    with pytest.raises(ValueError, match="no split 'holdout'"):
        resolve_shard_spec(f"{tmp_path / 'out'}/index.json#holdout")


@pytest.mark.real_data
def test_parallel_build_equals_sequential(tmp_path, monkeypatch):
    """Both passes in 2 worker processes (pass 1 in rounds of 16 photos) give exactly the sequential
    build: same duplicate decisions, splits, counts, shard names and sha256s."""
    import data_pipelines.plan as plan_module

    root = utk_subset(tmp_path, 120)
    one = build_shards("utkface", lambda: get_source("utkface")(root), tmp_path / "one", _utk_options(processes=1))
    monkeypatch.setattr(plan_module, "PLAN_BATCH", 16)
    two = build_shards("utkface", lambda: get_source("utkface")(root), tmp_path / "two", _utk_options(processes=2))
    assert one == two


def _png_claiming_size(width: int, height: int) -> bytes:
    """A valid tiny PNG whose header claims ``width`` x ``height`` (a decompression-bomb header)."""
    import io
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4: ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr: ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17: ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


@pytest.mark.real_data
def test_bad_input_through_the_whole_command(tmp_path):
    """Every kind of bad input gives a counted rejection or a clear error, and nothing is lost."""
    import io

    import numpy as np
    from PIL import Image

    fg = shared_data("fgnet") / "images"
    # a different photo for every case that should survive: copies of one photo are duplicates
    face_a, face_b, face_c, face_d, face_e = (
        Image.open(fg / n).convert("RGB") for n in ("003A25.JPG", "017A22.JPG", "003A47.JPG", "003A35.JPG", "017A26.JPG"))
    root = tmp_path / "in"
    root.mkdir()

    def save(name: str, image: Image.Image, **kw) -> None:
        image.save(root / name, **kw)

    save("good.jpg", face_a, quality=95)
    save("alpha.png", face_b.convert("RGBA"))
    save("cmyk.jpg", face_c.convert("CMYK"))
    grey16 = np.asarray(face_d.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey16).save(root / "sixteen.png")
    assert Image.open(root / "sixteen.png").mode.startswith("I")
    (root / "empty.jpg").write_bytes(b"")
    good = (root / "good.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "notes.jpg").write_bytes(b"this is not an image")
    (root / "bomb.png").write_bytes(_png_claiming_size(100_000, 100_000))
    save("noface.jpg", Image.new("RGB", (300, 300), (120, 160, 200)))
    two = Image.new("RGB", (face_a.width + face_c.width, max(face_a.height, face_c.height)))
    two.paste(face_a, (0, 0))
    two.paste(face_c, (face_a.width, 0))
    save("twofaces.jpg", two, quality=95)
    buf = io.BytesIO()
    face_e.save(buf, format="JPEG", quality=90)
    (root / "shared_a.jpg").write_bytes(buf.getvalue())
    (root / "shared_b.jpg").write_bytes(buf.getvalue())  # the same photo under another person
    rows = [
        ("good.jpg", "p1", "2"), ("alpha.png", "p2", "3"), ("cmyk.jpg", "p3", "18"), ("sixteen.png", "p1", "2"),
        ("empty.jpg", "p4", "30"), ("truncated.jpg", "p4", "30"), ("notes.jpg", "p4", "30"),
        ("bomb.png", "p5", "30"), ("noface.jpg", "p6", "30"), ("twofaces.jpg", "p7", "30"),
        ("shared_a.jpg", "p8", "40"), ("shared_b.jpg", "p9", "40"),
        ("nan_age.jpg", "p10", "nan"), ("negative_age.jpg", "p11", "-3"), ("missing.jpg", "p12", "20"),
    ]
    for name in ("nan_age.jpg", "negative_age.jpg"):
        (root / name).write_bytes(good)
    with open(root / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file", "person_id", "age"), *rows])

    out = tmp_path / "out"
    options = BuildOptions(split=SplitOptions(fractions={"train": 0.5, "test": 0.5}, stratify="none"), chunk_size=4,
                           samples_per_shard=2)
    index = build_shards("folder", lambda: get_source("folder")(root), out, options)
    assert index["read"] == len(rows) == index["written"] + sum(index["rejected"].values())
    assert index["written"] == 4  # good, alpha (on white), CMYK, 16-bit: converted to 8-bit RGB
    assert index["rejected"] == {
        "image:empty": 1, "image:unreadable": 2, "image:too_large": 1, "face:none": 1, "face:multiple": 1,
        "duplicate:conflicting_persons": 2, "label:age": 2, "image:missing": 1,
    }

    # CSV with a missing required column or an unexpected extra column: a clear error naming it
    with open(root / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "age"), ("good.jpg", "2")])
    with pytest.raises(ValueError, match="file"):
        build_shards("folder", lambda: get_source("folder")(root), tmp_path / "o2", options)
    with open(root / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file", "age", "patient_name"), ("good.jpg", "2", "Jane")])
    with pytest.raises(ValueError, match="patient_name"):
        build_shards("folder", lambda: get_source("folder")(root), tmp_path / "o3", options)


@pytest.mark.real_data
def test_built_shards_stream_over_http_and_pipe(tmp_path):
    """As from object storage: index.json#split over a loopback HTTP server, and shards via pipe:."""
    import functools
    import http.server
    import threading

    from fahr.data.shard_reader import ShardStream, make_loader

    root = utk_subset(tmp_path, 80)
    out = tmp_path / "out"
    index = build_shards("utkface", lambda: get_source("utkface")(root), out, _utk_options())
    expected = index["splits"]["train"]["count"]

    def stream_keys(urls):
        stream = ShardStream(urls, samples_per_epoch=expected, batch_size=expected, seed=0, shuffle_buffer=0,
                             world_size=1, rank=0, num_workers=0, label_keys=("age",))
        return sorted(k for b in make_loader(stream, num_workers=0) for k in b["__key__"])

    local = stream_keys(resolve_shard_spec(f"{out}/index.json#train"))
    assert len(local) == expected
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(out))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        urls = resolve_shard_spec(f"http://127.0.0.1:{server.server_address[1]}/index.json#train")
        assert all(u.startswith("http://127.0.0.1") for u in urls)
        assert stream_keys(urls) == local
    finally:
        server.shutdown()
    assert stream_keys([f"pipe:cat {u}" for u in resolve_shard_spec(f"{out}/index.json#train")]) == local
