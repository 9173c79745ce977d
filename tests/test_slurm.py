"""The sbatch templates on a real (local, one-node) SLURM cluster, and the submitit launcher config.

Tests marked ``slurm`` start ``slurm/local-cluster.sh`` once per session when it is not running
(installing slurm-wlm + munge as root if needed). The pretraining job is CPU DDP over gloo: two
ranks started by ``srun``, as on a GPU cluster with one task per GPU.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, compose_config
from slurm_jobs import ensure_cluster, job_info, start_when_requeued, wait_for_file, wait_until_ended

CLUSTER = REPO / "slurm" / "local-cluster.sh"
TEMPLATES = ("pretrain.sbatch", "finetune.sbatch")

# Records, per rank, every shard file the process opens for reading: an audit hook observes the
# data loader from outside fahr/data (Python imports sitecustomize from PYTHONPATH at start-up).
SHARD_TRACE = '''
import os, sys
_dir = os.environ.get("FAHR_TEST_SHARD_TRACE")
if _dir:
    _rank = os.environ.get("SLURM_PROCID", "x")
    def _hook(event, args):
        if event == "open" and args and isinstance(args[0], str) and args[0].endswith(".tar"):
            mode = args[1] if len(args) > 1 and isinstance(args[1], str) else "r"
            if "r" in mode and "+" not in mode:
                with open(os.path.join(_dir, f"rank{_rank}.txt"), "a") as f:
                    f.write(args[0] + "\\n")
    sys.addaudithook(_hook)
'''


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """A running SLURM cluster: the local one-node cluster, started here if needed."""
    ensure_cluster()


@pytest.mark.slurm
def test_local_cluster_start_is_idempotent(slurm_cluster):
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "already running" in proc.stdout, proc.stdout + proc.stderr
    assert time.monotonic() - t0 < 30
    status = subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "idle" in status.stdout


@pytest.mark.slurm
@pytest.mark.slow
def test_sbatch_pretrain_two_ranks_cpu_ddp(slurm_cluster, tmp_path, tiny_overrides):
    # the synthetic shards are generated inside the job: by rank 0 while rank 1 waits
    cfg = compose_config("pretrain", tiny_overrides)
    trace = tmp_path / "trace"
    trace.mkdir()
    (trace / "sitecustomize.py").write_text(SHARD_TRACE)
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}",
           "PYTHONPATH": str(trace), "FAHR_TEST_SHARD_TRACE": str(trace), "WANDB_MODE": "offline",
           "OMP_NUM_THREADS": "1", "MPLCONFIGDIR": str(REPO / ".cache" / "matplotlib")}
    # CPU DDP (Lightning picks gloo); devices=auto: the pipeline's trainer_topology takes 2 from SLURM
    overrides = [*tiny_overrides, "trainer.devices=auto", "trainer.strategy=ddp", "run_id=slurm_ddp"]
    submit = subprocess.run(
        ["sbatch", "--parsable", "--wait", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0",
         "--cpus-per-task=1", "--time=15", f"--chdir={REPO}", f"--output={tmp_path}/%x-%j.out",
         str(REPO / "slurm" / "pretrain.sbatch"), *overrides],
        env=env, capture_output=True, text=True, timeout=900)
    job_id = submit.stdout.strip().split(";")[0]
    run_dir = Path(tmp_path) / "runs" / "default" / "slurm_ddp"
    log = run_dir / "slurm" / f"{job_id}.out"
    log_text = log.read_text() if log.is_file() else "(no run log)"
    assert job_info(job_id).get("JobState") == "COMPLETED", f"sbatch: {submit.stderr}\n{log_text[-4000:]}"
    assert submit.returncode == 0

    # the job wrote its checkpoint and its log into the run directory
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert '"global_step": 4' in (run_dir / "metrics.json").read_text()
    assert re.search(r"^0: ", log_text, re.M) and re.search(r"^1: ", log_text, re.M), log_text[-2000:]

    # both ranks read shards, and never the same one
    reads = {r: set((trace / f"rank{r}.txt").read_text().split()) for r in (0, 1) if (trace / f"rank{r}.txt").is_file()}
    assert set(reads) == {0, 1}, f"shard reads recorded only for ranks {sorted(reads)}"
    assert reads[0] and reads[1] and not reads[0] & reads[1], reads
    shard_names = {p.name for p in Path(cfg.data.generate.out_dir).glob("*.tar")}
    assert {Path(p).name for p in reads[0] | reads[1]} <= shard_names


def test_submitit_launcher_config_composes(monkeypatch):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fahr.cli._hydra import config_dir

    monkeypatch.setenv("SBATCH_PARTITION", "gpu-test")
    monkeypatch.delenv("SBATCH_ACCOUNT", raising=False)
    compose_config("pretrain")  # registers the schemas
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("pretrain", overrides=["hydra/launcher=slurm", "experiment=fahr_face_pretrain", "trainer=ddp"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.gpus_per_node) == (8, 8)
    assert launcher.partition == "gpu-test" and launcher.account is None  # from the environment, never literal
    assert launcher.signal_delay_s == 120 and launcher.max_num_timeout > 0


def test_sbatch_templates_never_hard_code_account_or_partition():
    for name in TEMPLATES:
        text = (REPO / "slurm" / name).read_text()
        directives = [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]
        assert not [d for d in directives if re.search(r"--(account|partition)|\s-[Ap]\s", d)], name
        for required in ("--signal=USR1@120", "--requeue", "--open-mode=append", "--ntasks-per-node",
                         "--gpus-per-node", "--cpus-per-task"):
            assert any(required in d for d in directives), (name, required)
        assert 'common.sh"' in text and "srun " not in text  # one body for both templates
        subprocess.run(["bash", "-n", str(REPO / "slurm" / name)], check=True)
    common = (REPO / "slurm" / "common.sh").read_text()
    assert "srun --kill-on-bad-exit=1" in common and "NCCL_SOCKET_IFNAME" in common and "run-dir" in common
    assert 'preamble.sh"' in common  # the start every template shares
    subprocess.run(["bash", "-n", str(REPO / "slurm" / "common.sh")], check=True)
    # fahr shards: one task per array element, no GPUs; the same preamble, no account or partition either
    shards = (REPO / "slurm" / "shards.sbatch").read_text()
    directives = [ln for ln in shards.splitlines() if ln.startswith("#SBATCH")]
    assert not [d for d in directives if re.search(r"--(account|partition)|\s-[Ap]\s", d)]
    assert "--requeue" in " ".join(directives) and 'preamble.sh"' in shards and "common.sh" not in shards
    subprocess.run(["bash", "-n", str(REPO / "slurm" / "shards.sbatch")], check=True)


# ---- the fine-tunes through the shipped finetune.sbatch: 2 CPU ranks (gloo), preempted and requeued

FINETUNE_AGE = ["experiment=demo_faceage", "backbone=null", "model=vit_test", "data.generate.train=128",
                "data.generate.val=32", "data.generate.test=32", "data.generate.samples_per_shard=16",
                "data.batch_size=8", "data.eval_batch_size=16", "data.num_workers=1", "task.stage1.max_steps=4",
                "task.stage1.val_every_n_steps=2", "task.stage2.max_steps=60", "task.stage2.val_every_n_steps=4"]
FINETUNE_SURVIVAL = ["experiment=demo_facesurvival", "backbone=null", "model=vit_test",
                     "data.generate.n_patients=240", "data.generate.samples_per_shard=32", "data.batch_size=8",
                     "data.eval_batch_size=16", "data.num_workers=1", "task.max_steps=60", "task.val_every_n_steps=4",
                     "task.freeze_backbone=false"]
TWO_CPU_RANKS = ["trainer=cpu", "trainer.devices=auto", "trainer.strategy=ddp", "trainer.enable_progress_bar=false"]


def _sbatch_finetune(command: str, overrides: list[str], out_dir: Path, wait: bool) -> str:
    """Submit the shipped slurm/finetune.sbatch with 2 CPU tasks on the local cluster; the job id."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))},
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "WANDB_MODE": "offline",
           "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1", "MPLCONFIGDIR": str(REPO / ".cache" / "matplotlib")}
    submit = subprocess.run(
        ["sbatch", "--parsable", *(["--wait"] if wait else []), "--nodes=1", "--ntasks-per-node=2",
         "--gpus-per-node=0", "--cpus-per-task=1", "--time=30", f"--chdir={REPO}",
         f"--output={out_dir}/%x-%j.out", str(REPO / "slurm" / "finetune.sbatch"), command, *overrides],
        env=env, capture_output=True, text=True, timeout=1200)
    assert submit.stdout.strip(), f"sbatch refused the job: {submit.stderr}"
    return submit.stdout.strip().split(";")[0]


def _run_dir(command: str, overrides: list[str]) -> Path:
    from fahr.cli.run_dir import run_dir

    return REPO / run_dir(command, overrides)  # relative paths resolve against the job's --chdir


def _exported(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "export" / "model.safetensors"))


def _preempted_once_equals_uninterrupted(command: str, overrides: list[str], checkpoint: str, tmp_path: Path) -> str:
    """The reference job (uninterrupted), then the same fine-tune interrupted by `scancel
    --signal=USR1` once ``checkpoint`` (relative to the run directory) exists: it must requeue itself,
    resume and end COMPLETED with the reference's exported weights, bit for bit. Returns the
    interrupted job's log (in its run directory)."""
    import torch

    data = f"paths.data_dir={tmp_path / 'data'}"
    ref_overrides = [*overrides, data, f"paths.root_dir={tmp_path / 'reference'}"]
    ref_job = _sbatch_finetune(command, ref_overrides, tmp_path, wait=True)
    ref_dir = _run_dir(command, ref_overrides)
    ref_log = ref_dir / "slurm" / f"{ref_job}.out"
    assert job_info(ref_job).get("JobState") == "COMPLETED", ref_log.read_text()[-4000:] if ref_log.is_file() else \
        next(tmp_path.glob(f"*-{ref_job}.out")).read_text()

    run_overrides = [*overrides, data, f"paths.root_dir={tmp_path / 'preempted'}", "logger=wandb"]
    run_dir = _run_dir(command, run_overrides)
    job_id = _sbatch_finetune(command, run_overrides, tmp_path, wait=False)
    try:
        wait_for_file(f"{run_dir}/{checkpoint}", job_id)
        subprocess.run(["scancel", "--signal=USR1", job_id], check=True, timeout=30)
        start_when_requeued(job_id, 1)
        info = wait_until_ended(job_id)
    finally:
        if job_info(job_id).get("JobState") not in ("COMPLETED", None):
            subprocess.run(["scancel", job_id], timeout=30)
    log = (run_dir / "slurm" / f"{job_id}.out").read_text()
    assert info.get("JobState") == "COMPLETED" and info.get("Restarts") == "1", log[-4000:]
    assert len(re.findall(r"^0: preempted \(SIGUSR1\) at global step", log, re.M)) == 1, log[-4000:]
    assert len(re.findall(r"^0: requeued SLURM job", log, re.M)) == 1, log[-4000:]
    assert re.search(r"^0: ", log, re.M) and re.search(r"^1: ", log, re.M)
    ref, got = _exported(ref_dir), _exported(run_dir)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref), \
        "the preempted job's weights differ from the uninterrupted job's"
    return log


@pytest.mark.slurm
@pytest.mark.slow
def test_finetune_sbatch_faceage_preempted_in_stage_2_ends_as_an_uninterrupted_job(slurm_cluster, tmp_path):
    log = _preempted_once_equals_uninterrupted("finetune-age", FINETUNE_AGE + TWO_CPU_RANKS,
                                               "stage2/checkpoints/last.ckpt", tmp_path)
    assert "stage 1 already finished" in log and "resuming from" in log  # stage 2 resumed, stage 1 not redone
    metrics = json.loads(next((tmp_path / "preempted").glob("runs/*/*/metrics.json")).read_text())
    assert metrics["photos"] == {"train": 128, "val": 32, "test": 32}  # every photo once over both ranks


@pytest.mark.slurm
@pytest.mark.slow
def test_finetune_sbatch_facesurvival_on_cohort_shards_preempted_ends_as_an_uninterrupted_job(slurm_cluster, tmp_path):
    log = _preempted_once_equals_uninterrupted("finetune-survival", FINETUNE_SURVIVAL + TWO_CPU_RANKS,
                                               "checkpoints/last.ckpt", tmp_path)
    assert "resuming from" in log
    metrics = json.loads(next((tmp_path / "preempted").glob("runs/*/*/metrics.json")).read_text())
    assert metrics["test_n"] == metrics["rows"]["test"]


@pytest.mark.slurm
def test_finetune_sbatch_refuses_bad_overrides_in_its_first_log(slurm_cluster, tmp_path):
    """Overrides that do not compose stop the job before srun, with fahr's one-line message."""
    job_id = _sbatch_finetune("finetune-age", ["experiment=demo_faceage", "task.stage2.max_stesp=3"], tmp_path, wait=True)
    assert job_info(job_id).get("JobState") == "FAILED"
    first_log = next(tmp_path.glob(f"*-{job_id}.out")).read_text()
    assert "fahr run-dir: error:" in first_log and "max_stesp" in first_log
    assert "nothing was started" in first_log and "Traceback" not in first_log


def test_run_dir_command_prints_the_directory_the_command_trains_in(tmp_path):
    from fahr.utils.run import run_dir_for

    for command, config, overrides in (("pretrain", "pretrain", []),
                                       ("finetune-age", "finetune_age", FINETUNE_AGE),
                                       ("finetune-survival", "finetune_survival", FINETUNE_SURVIVAL)):
        args = [*overrides, f"paths.root_dir={tmp_path}", "trainer.enable_progress_bar=false"]
        out = subprocess.run([sys.executable, "-m", "fahr.cli.main", "run-dir", command, *args],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == str(run_dir_for(compose_config(config, args)))
    bad = subprocess.run([sys.executable, "-m", "fahr.cli.main", "run-dir", "predict"], capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("fahr run-dir: error: 'predict' is not a training command")
