"""`fahr shards` cut into tasks (data_pipelines/plan.py): the plan and the bytes do not depend on the
number of tasks, and equal the whole-input reference algorithms (Deduplicator, split_persons).

The same stages run as SLURM array jobs in tests/test_slurm_shards.py."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from data_pipelines import plan as plan_mod
from data_pipelines.build import build_shards, run_task
from data_pipelines.dedup import Deduplicator
from data_pipelines.options import AlignOptions, BuildOptions, LauncherOptions, check_launcher
from data_pipelines.sources import get_source
from data_pipelines.splits import split_persons
from fahr.boundary import InputError
from fahr.faces.rejection import Rejection


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _pattern(i: int, size: int = 64) -> Image.Image:
    """A distinct picture of coloured ellipses (clear shapes keep pHashes stable under re-encoding)."""
    rng = np.random.default_rng(500 + i)
    image = Image.new("RGB", (size, size), tuple(int(x) for x in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        (x, y), (w, h) = rng.integers(0, size, 2), rng.integers(size // 6, size // 2, 2)
        draw.ellipse([int(x), int(y), int(x + w), int(y + h)], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def _dataset(root: Path) -> Path:
    """A `folder` source of 54 rows: 40 distinct photos of 13 persons, exact copies (same person),
    near copies (re-encoded, resized; same person), copies under another person, two undecodable files."""
    root.mkdir(parents=True)
    rows, photos = [], {}

    def add(name: str, person: str, age: int, data: bytes) -> None:
        rows.append((name, person, str(age)))
        photos[name] = data

    for i in range(40):
        add(f"a{i:03d}.jpg", f"person{i % 13}", 5 + 2 * i, _jpeg(_pattern(i)))
    for i in range(0, 10, 2):  # exact copies, same person, placed before and after the original
        add(f"{'0' if i % 4 else 'z'}exact{i}.jpg", f"person{i % 13}", 5 + 2 * i, photos[f"a{i:03d}.jpg"])
    for i in range(10, 18, 2):  # near copies: re-encoded at another quality and size
        add(f"near{i}.jpg", f"person{i % 13}", 5 + 2 * i, _jpeg(_pattern(i).resize((60, 60)), quality=80))
    for i in (20, 21, 22):  # the same photo under another person: the whole group is dropped
        add(f"other{i}.jpg", "someone_else", 30, photos[f"a{i:03d}.jpg"])
    add("broken1.jpg", "person1", 30, b"not a photo")
    add("broken2.jpg", "person2", 30, b"\xff\xd8\xff truncated")
    for name, data in photos.items():
        (root / name).write_bytes(data)
    with open(root / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file", "person_id", "age"), *rows])
    return root


def _options(**kw) -> BuildOptions:
    return BuildOptions(**{"align": AlignOptions(skip_detection=True), "chunk_size": 7, "samples_per_shard": 3, **kw})


def _tree(out: Path) -> dict[str, bytes]:
    """The build's result: shards and index.json (parts/ holds chunk marks with file identities)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "parts"}


def _reference_plan(root: Path, options: BuildOptions) -> dict[int, tuple[str | None, str | None]]:
    """Position -> (split, rejection reason) by the whole-input algorithms, in one process."""
    options = options.resolved("folder")
    dedup, strata, persons, out = Deduplicator(options.dedup.near_threshold), {}, {}, {}
    for position, item in enumerate(get_source("folder")(root)):
        if isinstance(item, Rejection):
            out[position] = (None, item.reason)
            continue
        fp = plan_mod._fingerprint(item.image)
        if isinstance(fp, str):
            out[position] = (None, fp)
            continue
        dedup.add_fingerprint(str(position), item.person_id, fp)
        strata.setdefault(item.person_id, json.loads(plan_mod.stratum_key(item, options.split.stratify)))
        persons[position] = item.person_id
    split_of = split_persons(strata, options.split.fractions, options.split.seed)
    rejected = dedup.decide()
    for position, person in persons.items():
        out[position] = (split_of[person], rejected.get(str(position)))
    return out


def _partitioned_plan(root: Path, out: Path, options: BuildOptions, tasks: int) -> dict[int, tuple]:
    """The plan the stages hash, group and assign make with ``tasks`` tasks."""
    options = options.resolved("folder")
    out.mkdir()
    plan_mod.start_run(out, "folder", options, tasks, "r1")
    make_items = lambda: get_source("folder")(root)  # noqa: E731
    for t in range(tasks):
        plan_mod.hash_task(make_items, options, out, t, tasks, "r1")
    for t in range(tasks):
        plan_mod.group_task(options, out, t, tasks, "r1")
    for t in range(tasks):
        plan_mod.assign_task(options, out, t, tasks, "r1")
    result = {}
    for t in range(tasks):
        _, rejected = plan_mod.hash_result(out, t, "r1")
        result.update({p: (None, reason) for p, reason in rejected.items()})
        result.update({p: (split, reason) for p, (_, _, split, _, reason) in plan_mod.item_plans(out, t, tasks, "r1").items()})
    return result


def test_plan_equals_the_whole_input_algorithms_for_1_3_and_5_tasks(tmp_path):
    root = _dataset(tmp_path / "in")
    options = _options()
    reference = _reference_plan(root, options)
    reasons = {reason for _, reason in reference.values()}
    # the data exercise every decision: exact, near, conflicting copies, undecodable files
    assert {"duplicate:exact", "duplicate:near", "duplicate:conflicting_persons"} <= reasons
    assert sum(r == "duplicate:conflicting_persons" for _, r in reference.values()) == 6
    assert sum(r == "image:unreadable" for _, r in reference.values()) == 2, reasons
    assert len(reference) == 54 and {s for s, _ in reference.values()} == {"train", "val", "test", None}
    for tasks in (1, 3, 5):
        assert _partitioned_plan(root, tmp_path / f"plan{tasks}", options, tasks) == reference, tasks


def test_builds_with_1_3_and_4_tasks_are_byte_identical(tmp_path):
    root = _dataset(tmp_path / "in")
    make_items = lambda: get_source("folder")(root)  # noqa: E731
    one = build_shards("folder", make_items, tmp_path / "one", _options(), inputs=(root,))
    assert one["read"] == 54 == one["written"] + sum(one["rejected"].values())
    assert one["rejected"]["duplicate:exact"] == 5 and one["rejected"]["duplicate:conflicting_persons"] == 6
    for tasks in (3, 4):
        out = tmp_path / f"t{tasks}"
        index = build_shards("folder", make_items, out, _options(processes=2) if tasks == 4 else _options(),
                             inputs=(root,), tasks=tasks)
        assert index == one and _tree(out) == _tree(tmp_path / "one")
        assert sorted(p.name for p in (out / "parts").iterdir()) == [f"c{c:06d}.json" for c in range(8)]
    # a rerun with another number of tasks reuses every chunk: same bytes, no chunk written
    marks = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "one" / "parts").iterdir()}
    again = build_shards("folder", make_items, tmp_path / "one", _options(), inputs=(root,), tasks=3)
    assert again == one and marks == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "one" / "parts").iterdir()}


def test_tasks_of_another_run_or_options_are_refused(tmp_path):
    root = _dataset(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    make_items = lambda: get_source("folder")(root)  # noqa: E731
    options = _options().resolved("folder")
    plan_mod.start_run(out, "folder", options, 2, "r1")
    with pytest.raises(InputError, match="belongs to another run"):
        run_task("hash", 0, 2, "r2", "folder", make_items, out, _options())
    with pytest.raises(InputError, match="belongs to another run"):
        run_task("hash", 0, 2, "r1", "folder", make_items, out, _options(chunk_size=8))
    run_task("hash", 0, 2, "r1", "folder", make_items, out, _options())
    with pytest.raises(InputError, match="pass 1 hash task 1 has not finished for this run"):
        run_task("group", 0, 2, "r1", "folder", make_items, out, _options())
    assert not (out / "index.json").exists()


def test_hashing_reports_counts_in_the_log(tmp_path, caplog, monkeypatch):
    root = _dataset(tmp_path / "in")
    monkeypatch.setattr(plan_mod, "PROGRESS_SECONDS", 0.0)
    monkeypatch.setattr(plan_mod, "PLAN_BATCH", 7)  # photos hashed per round: counts after each round
    with caplog.at_level(logging.INFO, logger="data_pipelines.plan"):
        build_shards("folder", lambda: get_source("folder")(root), tmp_path / "out", _options(), tasks=2)
    lines = [r.getMessage() for r in caplog.records if r.name == "data_pipelines.plan"]
    assert any(line.startswith("pass 1, hash task 1/2: 7 items") for line in lines), lines  # while hashing
    assert any(line.startswith("pass 1, hash task 1/2: done, 28 items") for line in lines), lines
    assert any(line.startswith("pass 2, write task 2/2: done, 26 items") for line in lines), lines
    assert not any("person" in line or ".jpg" in line for line in lines)  # counts only, no ids


@pytest.mark.parametrize("change, message", [
    ({"kind": "pbs"}, "launcher must be one of local, slurm"),
    ({"tasks": 0}, r"launcher.tasks must be an integer in \[1, 10000\]"),
    ({"stages": ["write", "hash"]}, "launcher.stages must be the stages from one of them to the end"),
    ({"stages": ["group", "final"]}, "launcher.stages must be the stages from one of them to the end"),
    ({"stage": "write", "task": 3, "tasks": 3, "run": "r"}, r"launcher.task must be an integer in \[0, 3\)"),
    ({"stage": "write", "task": 0, "tasks": 3}, "launcher.run must name the run"),
])
def test_launcher_options_are_checked(change, message):
    launcher = LauncherOptions(**change)
    with pytest.raises(InputError, match=message):
        check_launcher(launcher)
