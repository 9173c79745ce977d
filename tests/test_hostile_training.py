"""Hostile inputs for the training commands (`fahr pretrain`, `finetune-survival`, `finetune-age`,
`export`), through the shipped command line.

Every case is generated here and asserts its exact outcome: exit status 2 and the one error line
naming the culprit; and, for the security cases, that nothing was executed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import TINY_DATA

TINY = ["model=vit_test", "trainer=cpu", "trainer.enable_progress_bar=false", "trainer.max_steps=2",
        "task.warmup_steps=1", "callbacks.checkpoint.every_n_train_steps=2", "data.num_workers=0",
        "data.batch_size=8", "data.shuffle_buffer=0"]


class _Evil:
    """Unpickling this creates a marker file: proof that a loader executed data."""

    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------- shard indexes are data


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    from fahr.data.synthetic_shards import write_synthetic_shards

    out = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(out, num_samples=32, samples_per_shard=16, seed=0, image_size=112)
    return out


HOSTILE_NAMES = {
    "pipe": "pipe:touch {marker}",
    "pipe_after_a_real_name": "train-000000.tar::pipe:touch {marker}",
    "parent_folder": "../outside.tar",
    "absolute_path": "/etc/passwd",
    "url_elsewhere": "http://127.0.0.1:9/x.tar",
    "braces": "train-{{000000..000001}}.tar",
    "environment_variable": "${{HOME}}.tar",
    "file_scheme": "file:/etc/passwd",
    "empty": "",
}


@pytest.mark.parametrize("case", sorted(HOSTILE_NAMES))
@pytest.mark.parametrize("layout", ["index", "split_index"])
def test_shard_names_in_an_index_never_run_or_leave_the_folder(case, layout, tiny_shards, tmp_path, run_fahr,
                                                              monkeypatch):
    """`data.train_shards=index.json` given from the index's own folder: a `pipe:` name ran the command."""
    marker = tmp_path / "pwned"
    folder = tmp_path / "handed_over"
    shutil.copytree(tiny_shards, folder)
    name = HOSTILE_NAMES[case].format(marker=marker)
    index = json.loads((folder / "index.json").read_text())
    shards = index["splits"]["train"]["shards"]
    shards[0]["name"] = name
    if layout == "index":  # the flat format the synthetic generator wrote before fahr-shards/2
        index = {"format": "fahr-shards/1", "num_samples": 32, "num_shards": len(shards), "shards": shards}
    (folder / "index.json").write_text(json.dumps(index))
    monkeypatch.chdir(folder)
    spec = "index.json" if layout == "index" else "index.json#train"
    r = run_fahr("pretrain", *TINY, f"paths.root_dir={tmp_path}", "data.generate=null", "data.name=handed_over",
                 "data.samples_per_epoch=32", f"data.train_shards='{spec}'")
    assert r.status == 2, r
    assert "shard names in an index must be plain file names in the index's own folder" in r.error_line, r
    assert not marker.exists()


def test_a_typed_pipe_is_still_the_users_to_give(tiny_shards, tmp_path, run_fahr):
    """Commands stay accepted where the user types them: `pipe:cat <shard>` streams the shard."""
    from fahr.data.shard_index import resolve_shard_spec
    from fahr.data.shard_reader import expand_shards

    spec = f"pipe:cat {tiny_shards}/train-000000.tar"
    assert expand_shards(resolve_shard_spec(spec)) == [spec]


INDEX_FILE_CASES = {
    "not_json": (lambda p: p.write_text("{nope"), r"not valid JSON"),
    "no_shards": (lambda p: p.write_text(json.dumps({"format": "fahr-shards-splits/1", "splits": {
        "train": {"count": 0, "shards": []}}})), r"expected a non-empty list of shards"),
    "fifo": (lambda p: (p.unlink(), os.mkfifo(p)), r"is a FIFO"),
    "not_utf8": (lambda p: p.write_bytes(b'{"format": "\xff"}'), r"not UTF-8"),
}


@pytest.mark.parametrize("spec", ["index.json", "index.json#train"])
@pytest.mark.parametrize("case", sorted(INDEX_FILE_CASES))
def test_broken_index_files_are_one_line(case, spec, tiny_shards, tmp_path, run_fahr):
    folder = tmp_path / "shards"
    shutil.copytree(tiny_shards, folder)
    edit, message = INDEX_FILE_CASES[case]
    edit(folder / "index.json")
    r = run_fahr("pretrain", *TINY, f"paths.root_dir={tmp_path}", "data.generate=null", "data.name=x",
                 "data.samples_per_epoch=32", f"data.train_shards='{folder}/{spec}'")
    assert r.status == 2 and re.search(message, r.error_line), r


def test_a_corrupt_shard_stops_training_naming_it(tiny_shards, tmp_path, run_fahr):
    folder = tmp_path / "shards"
    shutil.copytree(tiny_shards, folder)
    for shard in folder.glob("*.tar"):  # whichever the seeded order reads first
        shard.write_bytes(b"this is not a tar file" * 100)
    r = run_fahr("pretrain", *TINY, f"paths.root_dir={tmp_path}", "data.generate=null", "data.name=x",
                 "data.samples_per_epoch=32", f"data.train_shards={folder}/index.json")
    assert r.status == 2, r
    assert re.search(r"cannot read shard .*train-00000[01]\.tar", r.error_line), r


PRETRAIN_OPTION_CASES = {
    "batch_size_zero": ("data.batch_size=0", r"data\.batch_size must be in \[1, 65536\], got 0"),
    "image_size_huge": ("data.image_size=100000", r"data\.image_size must be in \[16, 1024\], got 100000"),
    "mask_ratio_one": ("task.mask_ratio=1.0", r"task\.mask_ratio must be greater than 0 and at most 0\.99"),
    "negative_lr": ("task.base_lr=-1", r"task\.base_lr must be greater than 0"),
    "patch_size_7": ("model.patch_size=7", r"model\.patch_size must be one of 8, 14, 16, got 7"),
    "unknown_arch": ("model.arch=vit_huge", r"model\.arch must be one of"),
    "std_zero": ("data.std=[0.2,0,0.2]", r"data\.std must be greater than 0"),
    "on_error_typo": ("data.on_error=ignore", r"data\.on_error must be one of skip, raise"),
    "missing_shards": ("data.train_shards='/nonexistent/x-{000000..000003}.tar'", r"shard not found: /nonexistent"),
    "typo": ("trainer.max_stesp=3", r"max_stesp"),
}


@pytest.mark.parametrize("case", sorted(PRETRAIN_OPTION_CASES))
def test_bad_pretrain_options_are_refused_before_work(case, tmp_path, run_fahr):
    option, message = PRETRAIN_OPTION_CASES[case]
    extra = ["data.generate=null", "data.name=x", "data.samples_per_epoch=32"] if case == "missing_shards" else []
    r = run_fahr("pretrain", *TINY, *TINY_DATA, f"paths.root_dir={tmp_path}", f"paths.data_dir={tmp_path}/data",
                 *extra, option)
    assert r.status == 2, r
    assert re.search(message, r.err), r.err
    assert "internal error" not in r.err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.ckpt"))


# ---------------------------------------------------------------- finetune-survival, table mode


def _rossi() -> pd.DataFrame:
    from lifelines.datasets import load_rossi

    return load_rossi().rename(columns={"week": "time", "arrest": "event"})


def _survival(run_fahr, tmp_path, train, test=None, *extra):
    def write(table, name):
        if table is None:
            return None
        if isinstance(table, (str, bytes)):
            path = tmp_path / name
            path.write_bytes(table.encode() if isinstance(table, str) else table)
            return path
        if isinstance(table, Path):
            return table
        path = tmp_path / name
        table.to_csv(path, index=False)
        return path

    args = ["data=table", f"data.train={write(train, 'train.csv')}", "trainer=cpu",
            "trainer.enable_progress_bar=false", "task.max_steps=2", f"paths.root_dir={tmp_path}"]
    test_path = write(test, "test.csv")
    if test_path is not None:
        args.append(f"data.test={test_path}")
    return run_fahr("finetune-survival", *args, *extra)


def _fifo(tmp_path):
    os.mkfifo(tmp_path / "fifo.csv")
    return tmp_path / "fifo.csv"


TABLE_CASES = {
    "missing_file": (lambda t: t / "absent.csv", r"survival table .*absent\.csv: no such file"),
    "fifo": (_fifo, r"is a FIFO \(named pipe\), not a regular file"),
    "device": (lambda t: Path("/dev/zero"), r"is a character device"),
    "folder": (lambda t: t, r"is a directory"),
    "not_utf8": (lambda t: "time,event,x\n1,1,caf\xe9\n".encode("latin-1"), r"not UTF-8"),
    "binary": (lambda t: b"\x89PNG\r\n\x1a\n\x00\x00", r"holds NUL bytes"),
    "empty": (lambda t: "", r"not a readable CSV"),
    "header_only": (lambda t: "time,event,x\n", r"survival table .*train\.csv: no rows under the header"),
    "no_time_column": (lambda t: _rossi().drop(columns=["time"]),
                       r"missing column\(s\) \['time'\] \(data\.time / data\.event\); it has 8 column\(s\)"),
    "text_feature": (lambda t: _rossi().assign(fin=["yes"] * 432), r"1 non-numeric feature column\(s\) \(first: column 3\)"),
    "missing_feature_values": (lambda t: _rossi().assign(age=[np.nan] * 5 + [30.0] * 427),
                               r"5 rows have missing feature values"),
    "infinite_feature": (lambda t: _rossi().assign(prio=[np.inf] * 2 + [1.0] * 430), r"2 rows have infinite feature values"),
    "negative_time": (lambda t: _rossi().assign(time=[-1] + [10] * 431), r"1 follow-up time\(s\) are negative"),
    "event_coded_1_2": (lambda t: _rossi().assign(event=_rossi()["event"] + 1), r"event indicator\(s\) are not 0 or 1"),
    "all_censored": (lambda t: _rossi().assign(event=0), r"all 432 subjects are censored"),
    "too_few_rows": (lambda t: _rossi().head(8), r"at least 10 rows and 2 events are needed"),
    "values_overflow": (lambda t: _rossi().assign(age=[1e308, -1e308] * 216), r"too large to standardise"),
    "duplicate_columns": (lambda t: "time,event,x,x\n1,1,2,3\n", r"1 duplicated column name\(s\) in the header"),
}


@pytest.mark.parametrize("case", sorted(TABLE_CASES))
def test_bad_survival_tables_are_one_line(case, tmp_path, run_fahr):
    make, message = TABLE_CASES[case]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = _survival(run_fahr, tmp_path, make(tmp_path))
    assert r.status == 2, r
    assert re.search(message, r.error_line), r.error_line
    # e.g. numpy's overflow warning before "too large to standardise": the one line is the whole message
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]


def test_a_headerless_clinical_table_never_echoes_its_first_row(tmp_path, run_fahr):
    rows = _rossi().head(50).assign(patient="PATIENT-7731")
    text = rows.to_csv(index=False, header=False)  # the first data row becomes the "header"
    r = _survival(run_fahr, tmp_path, text)
    assert r.status == 2, r
    assert ("missing column(s) ['time', 'event']" in r.error_line or "duplicated column name(s)" in r.error_line), r
    assert "PATIENT-7731" not in r.err + r.out


def test_train_and_test_tables_must_have_the_same_features(tmp_path, run_fahr):
    df = _rossi()
    r = _survival(run_fahr, tmp_path, df, df.assign(extra=1.0))
    assert r.status == 2 and re.search(r"survival table .*test\.csv: its feature columns differ from .*train\.csv's: "
                                       r"1 extra, 0 missing", r.error_line), r
    r = _survival(run_fahr, tmp_path, df, df[["time", "event", *reversed(df.columns[2:])]])
    assert r.status == 2 and "or in another order" in r.error_line, r


SURVIVAL_OPTION_CASES = {
    "val_fraction_zero": ("data.val_fraction=0", r"data\.val_fraction must be greater than 0 and at most 0\.9, got 0"),
    "val_fraction_above_one": ("data.val_fraction=1.5", r"data\.val_fraction must be greater than 0 and at most 0\.9, got 1\.5"),
    "max_steps_zero": ("task.max_steps=0", r"task\.max_steps must be at least 1, got 0"),
    "hidden_zero": ("task.head.hidden=[64,0]", r"task\.head\.hidden must be in \[1, 65536\], got 0"),
    "dropout_one": ("task.head.dropout=1.0", r"task\.head\.dropout must be in \[0, 0\.95\], got 1\.0"),
    "ties_typo": ("task.ties=exact", r"task\.ties must be one of efron, breslow, got 'exact'"),
    "horizon_negative": ("task.horizons_days=[365,-1]", r"task\.horizons_days must be greater than 0, got -1"),
    "aggregation_typo": ("task.person_aggregation=median", r"task\.person_aggregation must be one of mean, first"),
    "mode_typo": ("data.mode=tabular", r"data\.mode must be one of images, table, got 'tabular'"),
    "seed_negative": ("seed=-3", r"seed must be in \[0, 4294967295\], got -3"),
    "jpeg_quality_reversed": ("task.augment.jpeg_quality=[90,30]",
                              r"task\.augment\.jpeg_quality must be \[lo, hi\] with 1 <= lo <= hi <= 100"),
}


@pytest.mark.parametrize("case", sorted(SURVIVAL_OPTION_CASES))
def test_bad_survival_options_are_refused_before_work(case, tmp_path, run_fahr):
    option, message = SURVIVAL_OPTION_CASES[case]
    r = _survival(run_fahr, tmp_path, _rossi(), None, option)
    assert r.status == 2, r
    assert re.search(message, r.error_line), r.error_line
    assert not (tmp_path / "runs").exists()


def test_validation_part_without_events_is_named(tmp_path, run_fahr):
    df = _rossi()
    val = df.head(20).assign(event=0)
    path = tmp_path / "val.csv"
    val.to_csv(path, index=False)
    r = _survival(run_fahr, tmp_path, df, None, f"data.val={path}")
    assert r.status == 2 and "val.csv: all 20 subjects are censored (no event)" in r.error_line, r


# ---------------------------------------------------------------- finetune-age


def test_finetune_age_bad_data_and_backbone(tmp_path, tiny_shards, run_fahr):
    base = ["trainer=cpu", "trainer.enable_progress_bar=false", "model=vit_test", f"paths.root_dir={tmp_path}",
            "data.num_workers=0", "task.stage1.max_steps=1", "task.stage2.max_steps=1"]
    r = run_fahr("finetune-age", *base, "data=faceage_shards", f"data.root={tmp_path / 'absent'}")
    assert r.status == 2 and re.search(r"shard index not found: .*absent/index\.json", r.error_line), r
    r = run_fahr("finetune-age", *base, "data=faceage_shards", f"data.root={tmp_path}", f"backbone={tmp_path / 'nope'}")
    assert r.status == 2, r
    # shards without age labels (synthetic pretraining shards carry none by that name)
    r = run_fahr("finetune-age", *base, "data=faceage_shards", "data.name=x", f"data.train={tiny_shards}/index.json",
                 f"data.val={tiny_shards}/index.json")
    assert r.status == 2 and "age" in r.error_line, r
    r = run_fahr("finetune-age", *base, "data=faceage_synthetic", "task.balance.mode=oversample")
    assert r.status == 2 and "task.balance.mode must be one of sampler, loss, none" in r.error_line, r
    r = run_fahr("finetune-age", *base, "data=faceage_synthetic", "task.head.bin_width=0")
    assert r.status == 2 and "task.head.bin_width must be in [0.05, 50]" in r.error_line, r


# ---------------------------------------------------------------- export


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory) -> Path:
    """One finished tiny pretraining run (its directory)."""
    from fahr.pipeline.pretrain import pretrain
    from tests.conftest import compose_config

    root = tmp_path_factory.mktemp("run")
    cfg = compose_config("pretrain", [*TINY, *TINY_DATA, f"paths.root_dir={root}", f"paths.data_dir={root}/data"])
    return pretrain(cfg).run_dir


def _export(run_fahr, run_dir: Path, *extra):
    return run_fahr("export", f"export.run_dir={run_dir}", *extra)


def _copy_run(pretrain_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(pretrain_run, run, ignore=shutil.ignore_patterns("export"))
    return run


def test_export_of_a_good_run_works(pretrain_run, tmp_path, run_fahr):
    run = _copy_run(pretrain_run, tmp_path)
    r = _export(run_fahr, run, f"export.output_dir={tmp_path / 'exp'}")
    assert r.status == 0, r
    assert json.loads((tmp_path / "exp" / "model_card.json").read_text())["global_step"] == 2


EXPORT_CASES = {
    "no_run_dir": (lambda run: shutil.rmtree(run), r"run directory .* not found"),
    "no_config": (lambda run: (run / "config.yaml").unlink(), r"run config .*config\.yaml: no such file"),
    "config_garbage": (lambda run: (run / "config.yaml").write_text("model: [unclosed\n"), r"not readable YAML"),
    "config_not_pretrain": (lambda run: (run / "config.yaml").write_text("seed: 1\n"),
                            r"not a pretraining run's config"),
    "no_checkpoint": (lambda run: (run / "checkpoints" / "last.ckpt").unlink(), r"checkpoint not found: .*last\.ckpt"),
    "truncated_checkpoint": (lambda run: (run / "checkpoints" / "last.ckpt").write_bytes(
        (run / "checkpoints" / "last.ckpt").read_bytes()[:5000]), r"not a readable PyTorch checkpoint"),
    "checkpoint_folder": (lambda run: ((run / "checkpoints" / "last.ckpt").unlink(),
                                       (run / "checkpoints" / "last.ckpt").mkdir()), r"is a folder but not a DeepSpeed checkpoint"),
    "checkpoint_not_lightning": (lambda run: torch.save({"weights": torch.zeros(2)}, run / "checkpoints" / "last.ckpt"),
                                 r"not a Lightning checkpoint \(needs state_dict, global_step\)"),
    "other_architecture": (lambda run: (run / "config.yaml").write_text(
        (run / "config.yaml").read_text().replace("arch: vit_test", "arch: vit_tiny")), r"wrong shape"),
    "run_json_garbage": (lambda run: (run / "run.json").write_text("[]"), r"not a fahr run file"),
}


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_export_of_a_broken_run_is_one_line(case, pretrain_run, tmp_path, run_fahr):
    run = _copy_run(pretrain_run, tmp_path)
    edit, message = EXPORT_CASES[case]
    edit(run)
    r = _export(run_fahr, run)
    assert r.status == 2, r
    assert re.search(message, r.error_line), r.error_line


def test_a_pickled_checkpoint_is_refused_unrun(pretrain_run, tmp_path, run_fahr):
    run = _copy_run(pretrain_run, tmp_path)
    marker = tmp_path / "pwned"
    _Evil.marker = str(marker)
    torch.save({"state_dict": {}, "global_step": 1, "x": _Evil()}, run / "checkpoints" / "last.ckpt")
    r = _export(run_fahr, run)
    assert r.status == 2 and "holds objects other than tensors" in r.error_line, r
    assert not marker.exists()


def test_export_output_that_is_a_file(pretrain_run, tmp_path, run_fahr):
    run = _copy_run(pretrain_run, tmp_path)
    (tmp_path / "taken").write_text("x")
    r = _export(run_fahr, run, f"export.output_dir={tmp_path / 'taken'}")
    assert r.status == 2 and "export.output_dir=" in r.error_line and "exists and is not a directory" in r.error_line, r


def test_run_and_export_folders_are_checked_before_training(tmp_path, run_fahr):
    (tmp_path / "file").write_text("x")
    r = run_fahr("finetune-survival", "data=table", f"data.train={tmp_path}/t.csv", f"paths.root_dir={tmp_path}/file")
    assert r.status == 2 and "run directory (paths.runs_dir)=" in r.error_line, r
    _rossi().to_csv(tmp_path / "t.csv", index=False)
    r = _survival(run_fahr, tmp_path, tmp_path / "t.csv", None, f"export_dir={tmp_path / 'file'}")
    assert r.status == 2 and "export_dir=" in r.error_line and "exists and is not a directory" in r.error_line, r
