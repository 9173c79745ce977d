"""The trainer layer (fahr/job.py) with real processes: rank-safe preparation, gathering, agreeing on
a stop, and the fine-tunes run by 1 and by 2 ranks (CPU DDP over gloo, started by torchrun) counting
every validation and test photo exactly once, with the same learning-rate schedule."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from fahr.job import step_seed

TORCHRUN = str(Path(sys.executable).parent / "torchrun")

DRIVER = r'''
import json, os, signal, sys, time
from pathlib import Path
from omegaconf import OmegaConf
import torch
from fahr.boundary import InputError
from fahr.job import TrainingJob

out_dir, mode = Path(sys.argv[1]), sys.argv[2]
cfg = OmegaConf.create({"trainer": {"accelerator": "cpu", "strategy": "auto"}, "seed": 0})
rank = int(os.environ["RANK"])
report = {"rank": rank}
with TrainingJob(cfg, out_dir / "run") as job:
    if mode == "prepare":
        def write():
            time.sleep(1.0)  # rank 1 must wait for this
            (out_dir / "prepared.txt").write_text("ready")
        job.prepare_once("writing the test file", write)
        report["saw"] = (out_dir / "prepared.txt").read_text()
        got = job.gather_rows({"x": torch.arange(rank + 2, dtype=torch.float32) + 10 * rank,
                               "name": [f"r{rank}-{i}" + "é" * rank for i in range(rank + 2)],
                               "pair": torch.full((rank + 2, 2), rank, dtype=torch.int64)})
        report["x"] = got["x"].tolist()
        report["name"] = got["name"]
        report["pair"] = got["pair"].tolist()
    elif mode == "fail":
        def fail():
            raise InputError("rank 0 found a bad file")
        try:
            job.prepare_once("checking the inputs", fail)
        except InputError as err:
            report["error"] = str(err)
    elif mode == "stop":
        if rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # only this rank is signalled
        report["before"] = True
        job.stop_if_requested("the next phase")
        report["after"] = True  # not reached: both ranks stop
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
(out_dir / f"rank{rank}.json").write_text(json.dumps({**report, "left": True, "stopped": job.stopped}))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1", **extra)
    return env


def _torchrun(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([TORCHRUN, "--nproc_per_node=2", f"--master_port={_free_port()}", *args], cwd=REPO,
                          env=_clean_env(), capture_output=True, text=True, timeout=timeout)


def _driver(tmp_path: Path, mode: str) -> dict[int, dict]:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    proc = _torchrun([str(script), str(tmp_path), mode], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)}


def test_prepare_once_rank_0_writes_while_rank_1_waits_and_rows_gather_in_rank_order(tmp_path):
    reports = _driver(tmp_path, "prepare")
    for r in (0, 1):
        assert reports[r]["saw"] == "ready"  # rank 1 read it only after rank 0 had written it
        assert reports[r]["x"] == [0.0, 1.0, 10.0, 11.0, 12.0]  # 2 rows from rank 0, 3 from rank 1
        assert reports[r]["name"] == ["r0-0", "r0-1", "r1-0é", "r1-1é", "r1-2é"]
        assert reports[r]["pair"] == [[0, 0]] * 2 + [[1, 1]] * 3


def test_a_failure_on_rank_0_fails_every_rank_with_one_line(tmp_path):
    reports = _driver(tmp_path, "fail")
    assert reports[0]["error"] == "rank 0 found a bad file"
    assert reports[1]["error"] == "checking the inputs: rank 0 failed (its log says why); nothing was trained"


def test_a_signal_to_one_rank_stops_every_rank_at_the_next_phase_boundary(tmp_path):
    reports = _driver(tmp_path, "stop")
    for r in (0, 1):
        assert reports[r]["before"] and "after" not in reports[r]
        assert reports[r]["left"] and reports[r]["stopped"]


def test_step_seeds_depend_only_on_seed_rank_and_step():
    seeds = {step_seed(s, r, k) for s in (0, 1) for r in (0, 1) for k in (0, 1, 2)}
    assert len(seeds) == 12 and all(0 <= x < 2**63 for x in seeds)
    assert step_seed(3, 1, 7) == step_seed(3, 1, 7)


# ---- the fine-tunes on 1 and on 2 ranks ------------------------------------------------------------

# 128 training photos in 8 shards of 16; 33 validation and 31 test photos (3 and 2 shards, the last
# short): the ranks read different numbers of photos and batches (eval batch 8).
AGE = ["experiment=demo_faceage", "backbone=null", "model=vit_test", "data.generate.train=128",
       "data.generate.val=33", "data.generate.test=31", "data.generate.samples_per_shard=16",
       "data.eval_batch_size=8", "data.num_workers=0", "task.stage1.max_steps=3", "task.stage2.max_steps=6",
       "task.stage1.val_every_n_steps=3", "task.stage2.val_every_n_steps=3", "trainer.log_every_n_steps=1",
       "trainer.enable_progress_bar=false"]
SURVIVAL = ["experiment=demo_facesurvival", "backbone=null", "model=vit_test", "data.generate.n_patients=240",
            "data.generate.samples_per_shard=32", "data.eval_batch_size=8", "data.num_workers=0",
            "task.max_steps=6", "task.val_every_n_steps=3", "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false"]


def _lr_by_step(run_dir: Path, key: str) -> dict[int, float]:
    rows = csv.DictReader(open(run_dir / "metrics.csv"))
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def _run(command: str, overrides: list[str], root: Path, ranks: int) -> Path:
    args = ["-m", "fahr.cli.main", command, *overrides, f"paths.root_dir={root}"]
    if ranks == 2:
        proc = _torchrun(args + ["trainer.strategy=ddp", "trainer.devices=auto"])
    else:
        proc = subprocess.run([sys.executable, *args], cwd=REPO, env=_clean_env(), capture_output=True, text=True,
                              timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = [p for p in (root / "runs").glob("*/*") if (p / "metrics.json").is_file()]
    return run_dir


@pytest.mark.slow
def test_faceage_on_two_ranks_counts_every_photo_once_with_the_one_rank_schedule(tmp_path):
    one = _run("finetune-age", AGE + ["data.batch_size=16", f"paths.data_dir={tmp_path / 'data'}"], tmp_path / "one", 1)
    two = _run("finetune-age", AGE + ["data.batch_size=8", f"paths.data_dir={tmp_path / 'data'}"], tmp_path / "two", 2)
    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (one, two))
    assert m1["val/n"] == m2["val/n"] == 33 and m1["test/n"] == m2["test/n"] == 31
    keys1, keys2 = ([row["key"] for row in csv.DictReader(open(r / "predictions_test.csv"))] for r in (one, two))
    assert keys1 == keys2 and len(set(keys2)) == 31  # every test photo once, in the shards' order
    # the same effective batch (16 x 1 = 8 x 2): the same peak LR and schedule, step by step
    for stage in ("stage1", "stage2"):
        lr1, lr2 = _lr_by_step(one, f"{stage}/lr"), _lr_by_step(two, f"{stage}/lr")
        assert lr1 and lr1.keys() == lr2.keys()
        assert all(lr1[k] == pytest.approx(lr2[k], rel=1e-6) for k in lr1)
    hparams = (two / "hparams.yaml").read_text()
    assert "stage2/batch/effective: 16" in hparams
    assert m2["stages"]["stage2"]["steps"] == 6


@pytest.mark.slow
def test_facesurvival_on_two_ranks_evaluates_every_patient_once(tmp_path):
    data = f"paths.data_dir={tmp_path / 'data'}"
    one = _run("finetune-survival", SURVIVAL + ["data.batch_size=16", data], tmp_path / "one", 1)
    two = _run("finetune-survival", SURVIVAL + ["data.batch_size=8", data], tmp_path / "two", 2)
    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (one, two))
    assert m1["rows"] == m2["rows"] and m1["test_n"] == m2["test_n"] == m2["rows"]["test"]
    persons1, persons2 = ([row["person"] for row in csv.DictReader(open(r / "predictions_test.csv"))] for r in (one, two))
    assert sorted(persons1) == sorted(persons2) and len(set(persons2)) == len(persons2) == m2["test_n"]
    lr1, lr2 = _lr_by_step(one, "lr"), _lr_by_step(two, "lr")
    assert lr1 and lr1.keys() == lr2.keys() and all(lr1[k] == pytest.approx(lr2[k], rel=1e-6) for k in lr1)


def test_gathering_without_a_process_group_returns_the_rows():
    from omegaconf import OmegaConf

    from fahr.job import TrainingJob

    job = TrainingJob(OmegaConf.create({"trainer": {"accelerator": "cpu"}, "seed": 0}), Path("unused"), environ={})
    rows = {"x": torch.arange(3), "name": ["a", "b", "c"]}
    assert job.gather_rows(rows) is rows and job.world_size == 1
