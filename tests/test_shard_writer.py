"""The shard writer (one split of shards, label summaries as asked), index.json through the index
module, and the synthetic shard cache."""

from __future__ import annotations

import gc
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import webdataset
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_iterator

from data_pipelines.records import check_labels
from fahr.boundary import InputError
from fahr.data import synthetic, synthetic_shards
from fahr.data.shard_index import make_index, read_index, remove_index, verify_shards, write_index
from fahr.data.shard_writer import LabelSummary, ShardWriter
from fahr.data.synthetic import synthetic_face
from fahr.data.synthetic_shards import write_synthetic_shards


def _samples(n, seed=0):
    out = []
    for i in range(n):
        image, labels = synthetic_face(i, seed)
        out.append((f"s{i:04d}", image, labels))
    return out


def _jpeg_markers(data: bytes) -> list[int]:
    """Segment markers before the scan data."""
    markers, i = [], 2
    while data[i] == 0xFF and data[i + 1] != 0xDA:
        markers.append(data[i + 1])
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return markers


def _read_back(out_dir: Path, entry: dict | None = None) -> list[dict]:
    """All samples, in order, parsed by webdataset's tar iterator (with files we close ourselves), of
    a writer's ``entry`` or of every split of ``out_dir``'s index."""
    shards = entry["shards"] if entry else [s for e in read_index(out_dir)["splits"].values() for s in e["shards"]]
    samples = []
    for s in shards:
        with open(out_dir / s["name"], "rb") as f:
            files = (dict(item, __url__=s["name"]) for item in tar_file_iterator(f))
            samples += list(group_by_keys(files))
    return samples


def _written(folder: Path, samples, split: str = "t", **writer_args) -> dict:
    """``samples`` through a ShardWriter (prefix ``split``) and into an index; returns the index."""
    with ShardWriter(folder, prefix=split, **writer_args) as w:
        for key, image, labels in samples:
            w.write(key, image, labels)
    index = make_index("test", writer_args.get("image_size", 112), {split: w.entry})
    write_index(folder, index)
    return index


# webdataset 1.0.2 leaves its shard streams for the garbage collector to close
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning", "ignore::ResourceWarning")
def test_round_trip_keys_images_labels(tmp_path):
    samples = _samples(25)
    with ShardWriter(tmp_path, prefix="t", samples_per_shard=10) as w:
        for key, image, labels in samples:
            w.write(key, image, labels)
        assert w.num_written == 25
    urls = [str(tmp_path / s["name"]) for s in w.entry["shards"]]
    read = list(webdataset.WebDataset(urls, shardshuffle=False))
    gc.collect()
    assert [s["__key__"] for s in read] == [k for k, _, _ in samples]
    for got, (_, image, labels) in zip(read, samples):
        decoded = np.asarray(Image.open(io.BytesIO(got["jpg"])).convert("RGB"))
        assert decoded.shape == image.shape
        assert np.abs(decoded.astype(np.int16) - image).mean() < 3
        assert json.loads(got["json"]) == labels


def test_entry_counts_bytes_hashes_and_the_summaries_asked_for(tmp_path):
    samples = _samples(25)
    spec = {"age": ("moments", "decades"), "sex": ("counts",), "health": ("moments",)}
    index = _written(tmp_path, samples, samples_per_shard=10, summaries=spec)
    assert index["format"] == "fahr-shards/2" and index["source"] == "test" and index["synthetic"] is False
    assert index["image_size"] == 112 and list(index["splits"]) == ["t"]
    entry = index["splits"]["t"]
    assert [s["name"] for s in entry["shards"]] == ["t-000000.tar", "t-000001.tar", "t-000002.tar"]
    assert [s["num_samples"] for s in entry["shards"]] == [10, 10, 5] and entry["count"] == 25
    for s in entry["shards"]:
        data = (tmp_path / s["name"]).read_bytes()
        assert s["bytes"] == len(data)
        assert s["sha256"] == hashlib.sha256(data).hexdigest()
    labels = entry["labels"]
    ages = np.array([lab["age"] for _, _, lab in samples])
    healths = np.array([lab["health"] for _, _, lab in samples])
    assert labels["present"] == {"age": 25, "health": 25, "sex": 25, "synthetic": 25}
    decades = {f"{10 * d}-{10 * d + 9}": int(np.sum(ages // 10 == d)) for d in np.unique(ages // 10).astype(int)}
    assert labels["age"]["decades"] == decades
    assert labels["age"]["mean"] == pytest.approx(ages.mean()) and labels["age"]["std"] == pytest.approx(ages.std())
    assert (labels["age"]["min"], labels["age"]["max"]) == (ages.min(), ages.max())
    sexes = [lab["sex"] for _, _, lab in samples]
    assert labels["sex"] == {"counts": {str(v): sexes.count(v) for v in sorted(set(sexes))}}
    assert labels["health"]["mean"] == pytest.approx(healths.mean())
    assert "synthetic" not in labels  # only what was asked for, besides "present"
    verify_shards(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["index.json", "t-000000.tar", "t-000001.tar", "t-000002.tar"]


def test_label_summaries_merge_exactly_over_writers():
    a, b = LabelSummary({"age": ("decades",), "sex": ("counts",)}), LabelSummary({"age": ("decades",), "sex": ("counts",)})
    both = LabelSummary({"age": ("decades",), "sex": ("counts",)})
    for i, labels in enumerate([{"age": 9.5, "sex": 0}, {"age": 10.0, "sex": None}, {"age": 35, "sex": 1},
                                {"sex": 1}, {"age": 101.2, "sex": 0}]):
        (a if i % 2 else b).add(labels)
        both.add(labels)
    assert LabelSummary.merge([a.summary(), b.summary()]) == both.summary()
    assert both.summary()["age"]["decades"] == {"0-9": 1, "10-19": 1, "30-39": 1, "100-109": 1}
    assert both.summary()["sex"]["counts"] == {"0": 2, "1": 2, "null": 1}
    with pytest.raises(InputError, match="only counts and decades"):
        LabelSummary.merge([LabelSummary({"age": ("moments",)}).summary() | {"age": {"count": 1}}])
    with pytest.raises(InputError, match="unknown kind"):
        LabelSummary({"age": ("median",)})


def test_exception_mid_write_leaves_no_shards_or_temp_files(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path, samples_per_shard=4) as w:
            for i, (key, image, labels) in enumerate(_samples(6)):
                w.write(key, image, labels)
            raise RuntimeError("boom")  # one finished shard, one open
    assert os.listdir(tmp_path) == []


def test_duplicate_key_raises_and_writer_stays_usable(tmp_path):
    (key, image, labels), (key2, image2, labels2) = _samples(2)
    with ShardWriter(tmp_path) as w:
        w.write(key, image, labels)
        with pytest.raises(ValueError, match=f"duplicate.*{key}"):
            w.write(key, image2, labels2)
        w.write(key2, image2, labels2)
    assert w.entry["count"] == 2


@pytest.mark.parametrize(
    "labels, match",
    [
        ({"age": float("nan")}, "age"),
        ({"health": float("inf")}, "health"),
        ({"extra": object()}, "extra"),
        ({"age": -3.0}, "age"),
        ({"sex": 2}, "sex"),
        ({"health": 1.5}, "health"),
        ([("age", 30)], "dict"),
    ],
)
def test_bad_labels_raise_naming_the_key(tmp_path, labels, match):
    image = synthetic_face(0, 0)[0]
    with ShardWriter(tmp_path, check_labels=check_labels) as w:
        with pytest.raises(ValueError, match=f"'bad01'.*{match}|{match}.*'bad01'"):
            w.write("bad01", image, labels)
        w.write("ok", image, {"age": np.float32(30.5), "sex": np.int64(1), "site": "a", "health": None})
    assert json.loads(_read_back(tmp_path, w.entry)[0]["json"]) == {"age": 30.5, "sex": 1, "site": "a", "health": None}


def test_the_writer_knows_no_label_names(tmp_path):
    """Without the caller's conventions any finite JSON labels are written (an age of -3 too)."""
    with ShardWriter(tmp_path) as w:
        w.write("k", synthetic_face(0, 0)[0], {"age": -3.0, "sex": 7, "anything": [1, "x"]})
    assert json.loads(_read_back(tmp_path, w.entry)[0]["json"]) == {"age": -3.0, "sex": 7, "anything": [1, "x"]}


@pytest.mark.parametrize(
    "image",
    [np.zeros((112, 112, 3), np.float32), np.zeros((64, 64, 3), np.uint8), np.zeros((112, 112), np.uint8), b"not a jpeg"],
)
def test_bad_images_raise_naming_the_key(tmp_path, image):
    with ShardWriter(tmp_path) as w:
        with pytest.raises(ValueError, match="'img7'"):
            w.write("img7", image, {"age": 30.0})


@pytest.mark.parametrize("key", ["a.b", "a/b", "", "a b"])
def test_bad_keys_rejected(tmp_path, key):
    with ShardWriter(tmp_path) as w:
        with pytest.raises(ValueError, match="key"):
            w.write(key, synthetic_face(0, 0)[0], {})


def test_jpeg_has_no_exif_and_encoded_bytes_are_stripped_losslessly(tmp_path):
    image, labels = synthetic_face(1, 0)
    exif = Image.Exif()
    exif[0x010F] = "SomeCamera"  # Make
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90, exif=exif, comment=b"patient 123")
    with_exif = buf.getvalue()
    assert 0xE1 in _jpeg_markers(with_exif) and 0xFE in _jpeg_markers(with_exif)
    with ShardWriter(tmp_path) as w:
        w.write("array", image, labels)
        w.write("bytes", with_exif, labels)
    stored = {s["__key__"]: s["jpg"] for s in _read_back(tmp_path, w.entry)}
    for data in stored.values():
        markers = _jpeg_markers(data)
        assert 0xE1 not in markers and 0xFE not in markers  # no EXIF/XMP, no comment
        assert not Image.open(io.BytesIO(data)).getexif()
    original = np.asarray(Image.open(io.BytesIO(with_exif)))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(stored["bytes"]))), original)


def test_existing_dataset_needs_overwrite_and_stale_shards_are_removed(tmp_path):
    samples = _samples(12)
    _written(tmp_path, samples, split="shard", samples_per_shard=4)
    with pytest.raises(InputError, match="overwrite"):
        ShardWriter(tmp_path, prefix="other")  # an index.json is there
    remove_index(tmp_path)
    with pytest.raises(InputError, match="overwrite"):
        ShardWriter(tmp_path, prefix="shard")  # shards of this prefix are there
    _written(tmp_path, samples[:5], split="shard", samples_per_shard=4, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["index.json", "shard-000000.tar", "shard-000001.tar"]
    verify_shards(tmp_path)


def test_verify_shards_names_corrupt_and_missing_shards(tmp_path):
    _written(tmp_path, _samples(6), split="shard", samples_per_shard=3)
    shard = tmp_path / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    verify_shards(tmp_path, check_hashes=False)  # same size
    with pytest.raises(ValueError, match="shard-000001.tar"):
        verify_shards(tmp_path)
    shard.unlink()
    with pytest.raises(InputError, match="shard-000001.tar"):
        verify_shards(tmp_path)
    with pytest.raises(InputError, match="index.json"):
        read_index(tmp_path / "nowhere")


def _mtimes(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in d.iterdir()}


def test_write_synthetic_shards_reuses_and_regenerates(tmp_path):
    index = write_synthetic_shards(tmp_path, num_samples=10, samples_per_shard=4, seed=1)
    entry = index["splits"]["train"]
    assert index["synthetic"] is True and index["source"] == "synthetic" and len(entry["shards"]) == 3
    assert index["generator"]["seed"] == 1 and index["generator"]["version"] == synthetic.GENERATOR_VERSION
    read = _read_back(tmp_path)
    assert [s["__key__"] for s in read] == [f"{i:09d}" for i in range(10)]
    assert json.loads(read[3]["json"]) == synthetic_face(3, 1)[1]
    before = _mtimes(tmp_path)

    assert write_synthetic_shards(tmp_path, num_samples=10, samples_per_shard=4, seed=1) == index
    assert _mtimes(tmp_path) == before  # nothing rewritten

    other_seed = write_synthetic_shards(tmp_path, num_samples=10, samples_per_shard=4, seed=2)
    assert other_seed["generator"]["seed"] == 2
    assert other_seed["splits"]["train"]["shards"][0]["sha256"] != entry["shards"][0]["sha256"]

    fewer = write_synthetic_shards(tmp_path, num_samples=10, samples_per_shard=5, seed=2)
    assert len(fewer["splits"]["train"]["shards"]) == 2
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]

    (tmp_path / "train-000001.tar").unlink()  # a damaged cache is regenerated, not reused
    again = write_synthetic_shards(tmp_path, num_samples=10, samples_per_shard=5, seed=2)
    assert again == fewer
    verify_shards(tmp_path)


def test_write_synthetic_shards_never_replaces_a_real_dataset(tmp_path):
    with ShardWriter(tmp_path, prefix="utk") as w:
        w.write("a", *synthetic_face(0, 0))
    write_index(tmp_path, make_index("utkface", 112, {"train": w.entry}))
    with pytest.raises(InputError, match="utkface"):
        write_synthetic_shards(tmp_path, num_samples=3, samples_per_shard=3)
    assert read_index(tmp_path)["source"] == "utkface"


def test_synthetic_shards_are_byte_reproducible(tmp_path):
    a = write_synthetic_shards(tmp_path / "a", num_samples=6, samples_per_shard=3, seed=4)
    b = write_synthetic_shards(tmp_path / "b", num_samples=6, samples_per_shard=3, seed=4)
    assert [s["sha256"] for s in a["splits"]["train"]["shards"]] == [s["sha256"] for s in b["splits"]["train"]["shards"]]


def test_command_line_entry(tmp_path):
    synthetic_shards.main(["--out", str(tmp_path), "--num-samples", "7", "--samples-per-shard", "3", "--seed", "5"])
    index = read_index(tmp_path)
    entry = index["splits"]["train"]
    assert entry["count"] == 7 and len(entry["shards"]) == 3 and index["generator"]["seed"] == 5
