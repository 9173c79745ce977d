"""Preemption: a signal saves last.ckpt and stops (requeueing under SLURM); the same command resumes
at the same global step and batch, in the same W&B run. Real signals, real subprocesses, and one
test on the local SLURM cluster."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import REPO, compose_config
from slurm_jobs import ensure_cluster, job_info, start_when_requeued
from trackers import wandb_history
from fahr.pipeline.pretrain import pretrain
from fahr.utils.preemption import slurm_job_id
from fahr.utils.run import run_dir_for

TESTS = Path(__file__).resolve().parent
# 128 samples in 8 shards, batch 16: 8 batches per epoch; 14 steps cross into epoch 1.
SMALL = ["trainer.max_steps=14", "data.generate.num_samples=128", "data.generate.samples_per_shard=16",
         "callbacks.checkpoint.every_n_train_steps=5"]


class Record(L.Callback):
    """Appends ``<step> <epoch> <md5 of the batch's keys>`` per trained batch to ``path``, then
    sleeps ``delay`` s (so that a test can signal the run mid-way)."""

    def __init__(self, path: str | Path, delay: float = 0.0) -> None:
        self.path, self.delay = Path(path), delay

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        digest = hashlib.md5("|".join(batch["__key__"]).encode()).hexdigest()[:12]
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step - 1} {trainer.current_epoch} {digest}\n")
        time.sleep(self.delay)


class SignalAt(L.Callback):
    """Sends ``signum`` to this process at the end of the batch that makes ``global_step == step``."""

    def __init__(self, step: int, signum: int = signal.SIGUSR1) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


DRIVER = """
import json, sys
sys.path.insert(0, {tests!r})
from conftest import compose_config
from fahr.pipeline.pretrain import pretrain
from test_preemption import Record
record, delay, *overrides = sys.argv[1:]
result = pretrain(compose_config("pretrain", overrides), extra_callbacks=[Record(record, float(delay))])
print("RESULT " + json.dumps({{"global_step": result.global_step, "preempted": result.preempted}}), flush=True)
"""


def _records(path: Path) -> list[tuple[int, int, str]]:
    if not path.is_file():
        return []
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return [(int(s), int(e), d) for s, e, d in rows]


def _ckpt_step(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1", **extra)
    return env


def _assert_one_continuous_wandb_run(run_dir: Path, sessions_expected: int, max_steps: int,
                                     hard_stopped: tuple[int, ...] = ()) -> None:
    """One W&B run id over all sessions (attempts), whose steps increase, none twice, from 0 to
    max_steps - 1, all present, except that a session stopped hard (SIGTERM to every process: W&B's
    service dies with it before flushing) may miss steps between the sessions around it.
    ``hard_stopped``: indices of those sessions, oldest first."""
    sessions = wandb_history(run_dir)
    assert len(sessions) == sessions_expected
    assert len({run_id for run_id, _ in sessions}) == 1, "one W&B run id across all attempts"
    assert sessions[0][0] == json.loads((run_dir / "run.json").read_text())["wandb_id"]
    per_session = [[row["trainer/global_step"] for row in rows if "train/loss_step" in row] for _, rows in sessions]
    steps = [s for session in per_session for s in session]
    assert steps == sorted(steps) and len(set(steps)) == len(steps), f"steps not monotonic: {per_session}"
    assert steps[0] == 0 and steps[-1] == max_steps - 1, per_session
    allowed: set[int] = set()
    for k in hard_stopped:
        lo = max((s for session in per_session[:k] for s in session), default=-1) + 1
        hi = min((s for session in per_session[k + 1:] for s in session), default=max_steps)
        allowed |= set(range(lo, hi))
    missing = set(range(max_steps)) - set(steps)
    assert missing <= allowed, f"steps {sorted(missing - allowed)} missing outside a hard-stopped session: {per_session}"


# ---- in-process: real signals to this process ---------------------------------------------------


@pytest.fixture
def scontrol_stub(tmp_path, monkeypatch) -> Path:
    """A fake ``scontrol`` first on PATH that appends its arguments to the returned file."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol-calls.txt"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for name in list(os.environ):
        if name.startswith("SLURM_"):
            monkeypatch.delenv(name)
    return calls


@pytest.mark.slow  # ~40 s on 2 busy cores (two to three short runs in this process)
def test_sigusr1_without_slurm_saves_stops_and_resumes(tiny_overrides, scontrol_stub, tmp_path):
    cfg = compose_config("pretrain", tiny_overrides + SMALL + ["trainer.max_steps=6"])
    rec = tmp_path / "batches.txt"
    first = pretrain(cfg, extra_callbacks=[Record(rec), SignalAt(3)])
    assert first.preempted and first.global_step == 3
    assert _ckpt_step(first.run_dir) == 3
    assert not (first.run_dir / "metrics.json").exists(), "a preempted run is not finished"
    assert not scontrol_stub.exists(), "no requeue outside SLURM"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL, "handlers restored"
    second = pretrain(cfg, extra_callbacks=[Record(rec)])
    assert not second.preempted and second.resumed_from is not None and second.global_step == 6
    assert json.loads((second.run_dir / "metrics.json").read_text())["global_step"] == 6
    steps = [s for s, _, _ in _records(rec)]
    assert steps == list(range(6))


@pytest.mark.slow  # ~40 s on 2 busy cores (two to three short runs in this process)
def test_fake_slurm_sigusr1_requeues_once_and_sigterm_does_not(tiny_overrides, scontrol_stub, monkeypatch):
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_NODEID": "0", "SLURM_NNODES": "1", "SLURM_NODELIST": "localhost", "SLURM_JOB_NAME": "fahr-test",
             "SLURM_NTASKS_PER_NODE": "1"}
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    cfg = compose_config("pretrain", tiny_overrides + SMALL + ["trainer.max_steps=7"])
    first = pretrain(cfg, extra_callbacks=[SignalAt(2)])
    assert first.preempted and first.global_step == 2 and _ckpt_step(first.run_dir) == 2
    assert scontrol_stub.read_text().splitlines() == ["requeue 4242"]
    assert not list(first.run_dir.rglob("hpc_ckpt*")), "Lightning's own SLURM requeue is off"
    second = pretrain(cfg, extra_callbacks=[SignalAt(5, signal.SIGTERM)])  # scancel / SLURM preemption
    assert second.preempted and second.global_step == 5
    assert scontrol_stub.read_text().splitlines() == ["requeue 4242"], "SIGTERM saves but does not requeue"
    third = pretrain(cfg)
    assert not third.preempted and third.global_step == 7
    assert scontrol_stub.read_text().splitlines() == ["requeue 4242"]


def test_slurm_job_id_for_plain_and_array_jobs():
    assert slurm_job_id({}) is None
    assert slurm_job_id({"SLURM_JOB_ID": "77"}) == "77"
    assert slurm_job_id({"SLURM_JOB_ID": "80", "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3"}) == "77_3"
    with pytest.raises(ValueError):
        slurm_job_id({"SLURM_JOB_ID": "1; rm -rf /"})


# ---- subprocesses: the command interrupted twice, then re-run -----------------------------------


def _wait_for_step(proc: subprocess.Popen, rec: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = _records(rec)
        if rows and rows[-1][0] >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before step {step}:\n{proc.stdout.read()}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached within {timeout} s")


@pytest.mark.slow
def test_signalled_twice_then_rerun_equals_uninterrupted_run(tiny_overrides, tmp_path):
    """SIGUSR1 after step 3, SIGTERM to the whole process group after step 9 (epoch 1; as SLURM and
    terminals signal every process: DataLoader workers and W&B's service too), then the same command
    again: it ends at exactly max_steps, each attempt starts where the previous one saved, the
    batches equal an uninterrupted run's (2 DataLoader workers), and W&B has one run whose steps
    increase without repeats (the hard stop may cost W&B the step in flight)."""
    overrides = tiny_overrides + SMALL + ["data.num_workers=2"]
    ref_rec = tmp_path / "reference.txt"
    pretrain(compose_config("pretrain", [*overrides, f"paths.root_dir={tmp_path / 'reference'}"]),
             extra_callbacks=[Record(ref_rec)])
    reference = _records(ref_rec)
    assert [s for s, _, _ in reference] == list(range(14))

    root = tmp_path / "preempted"
    run_overrides = [*overrides, f"paths.root_dir={root}", "logger=wandb"]
    run_dir = run_dir_for(compose_config("pretrain", run_overrides))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(tests=str(TESTS)))
    rec = tmp_path / "batches.txt"
    starts = []
    for signum, after in ((signal.SIGUSR1, 3), (signal.SIGTERM, 9), (None, None)):
        starts.append(len(_records(rec)))
        proc = subprocess.Popen([sys.executable, str(driver), str(rec), "0.3", *run_overrides], cwd=REPO,
                                env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        if signum is not None:
            _wait_for_step(proc, rec, after)
            if signum == signal.SIGTERM:
                os.killpg(proc.pid, signum)
            else:
                proc.send_signal(signum)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        result = json.loads(re.search(r"^RESULT (.*)$", out, re.M).group(1))
        steps_so_far = len(_records(rec))
        assert result == {"global_step": steps_so_far, "preempted": signum is not None}, out
        assert _ckpt_step(run_dir) == steps_so_far
        if signum is not None:
            assert "preempted" in out and not (run_dir / "metrics.json").exists()
            assert steps_so_far > after
    got = _records(rec)
    assert got == reference, "the interrupted run saw other batches than the uninterrupted one"
    assert not list(run_dir.glob("checkpoints/last-v*")), "one last.ckpt, never a versioned copy"
    assert 3 < starts[1] < 8 < starts[2] < 14, f"attempts started at steps {starts}"  # the 2nd stop is in epoch 1
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 14
    _assert_one_continuous_wandb_run(run_dir, sessions_expected=3, max_steps=14, hard_stopped=(1,))


# ---- the local SLURM cluster ----------------------------------------------------------------------

SBATCH = """#!/bin/bash
#SBATCH --job-name=fahr-preempt-test
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --requeue
#SBATCH --signal=USR1@30
#SBATCH --open-mode=append
#SBATCH --output={out}
echo "=== start restart=${{SLURM_RESTART_COUNT:-0}}"
srun --kill-on-bad-exit=1 {python} {driver} {rec} 1.0 {overrides}
"""


@pytest.mark.slurm
@pytest.mark.slow
def test_real_slurm_requeues_and_resumes_to_completion(tiny_overrides, tmp_path):
    """sbatch --requeue --signal=USR1@..: `scancel --signal=USR1` twice (in epochs 0 and 1; the job
    saves, closes W&B and requeues itself), then a hard `scontrol requeue` from outside (SLURM SIGTERMs every process of
    the job, DataLoader workers and W&B's service included, and SIGKILLs them KillWait later: the
    training process still saves at the batch end); the job ends COMPLETED at exactly max_steps after
    three restarts, having trained the uninterrupted run's batches once each, in one W&B run."""
    ensure_cluster()
    overrides = tiny_overrides + SMALL + ["data.num_workers=2"]
    ref_rec = tmp_path / "reference.txt"
    pretrain(compose_config("pretrain", [*overrides, f"paths.root_dir={tmp_path / 'reference'}"]),
             extra_callbacks=[Record(ref_rec)])
    run_overrides = [*overrides, f"paths.root_dir={tmp_path / 'slurm'}", "logger=wandb"]
    run_dir = run_dir_for(compose_config("pretrain", run_overrides))
    driver, rec, out = tmp_path / "driver.py", tmp_path / "batches.txt", tmp_path / "job.out"
    driver.write_text(DRIVER.format(tests=str(TESTS)))
    script = tmp_path / "job.sbatch"
    script.write_text(SBATCH.format(out=out, python=sys.executable, driver=driver, rec=rec,
                                    overrides=" ".join(f"'{o}'" for o in run_overrides)))
    env = _clean_env()
    submitted = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True,
                               cwd=REPO, env=env, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]

    class _Proc:  # _wait_for_step's view of the job: ended when SLURM says it has
        returncode = None
        stdout = None
        checked = 0.0

        def poll(self):
            if time.monotonic() - self.checked < 1.0:  # _wait_for_step polls every 50 ms; scontrol once a second
                return None
            self.checked = time.monotonic()
            state = job_info(job_id).get("JobState")
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                self.returncode, self.stdout = state, io.StringIO(out.read_text() if out.is_file() else "")
                return state
            return None

    try:
        _wait_for_step(_Proc(), rec, 3)
        subprocess.run(["scancel", "--signal=USR1", job_id], check=True, timeout=30)
        start_when_requeued(job_id, 1)
        _wait_for_step(_Proc(), rec, 7, timeout=600)  # the last batch of epoch 0
        subprocess.run(["scancel", "--signal=USR1", job_id], check=True, timeout=30)
        start_when_requeued(job_id, 2)
        _wait_for_step(_Proc(), rec, 10, timeout=600)  # in epoch 1
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
        start_when_requeued(job_id, 3)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and job_info(job_id).get("JobState") != "COMPLETED":
            state = job_info(job_id).get("JobState")
            assert state not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"), out.read_text()
            time.sleep(1)
        job = job_info(job_id)
    finally:
        if job_info(job_id).get("JobState") not in ("COMPLETED", None):
            subprocess.run(["scancel", job_id], timeout=30)
    log = out.read_text()
    assert job.get("JobState") == "COMPLETED", log
    assert job.get("Restarts") == "3", log
    assert log.count("preempted (SIGUSR1)") == 2 and log.count("then requeueing SLURM job") == 2, log
    assert log.count("preempted (SIGTERM)") == 1, f"the hard requeue's SIGTERM did not save:\n{log}"
    assert _records(rec) == _records(ref_rec), "the requeued job saw other batches than an uninterrupted run"
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 14
    # the USR1 sessions are complete in W&B; the hard requeue stops W&B's service with the job, and
    # what it had not flushed (measured: from the last 2 steps to the whole 6-step session under
    # load) is missing from W&B. The checkpoint and the training are exact either way.
    _assert_one_continuous_wandb_run(run_dir, sessions_expected=4, max_steps=14, hard_stopped=(2,))


# ---- the fine-tunes: the `fahr` command, signalled, then run again -------------------------------

EVAL_TRIGGER = '''
import glob, os, signal, sys
_run_glob = os.environ.get("FAHR_TEST_SIGNAL_AFTER")
if _run_glob:
    _sent = []
    def _hook(event, args):
        # once training is over (the stage summary exists), the first validation shard opened for the
        # final evaluation gets the command a SIGUSR1: a stop in the middle of the evaluation. The shard
        # may be opened by a loader worker: the signal goes to the command, the session's leader.
        if (event == "open" and not _sent and args and isinstance(args[0], str) and args[0].endswith(".tar")
                and "/val/" in args[0] and glob.glob(_run_glob)):
            _sent.append(1)
            os.kill(os.getpgid(0), signal.SIGUSR1)
    sys.addaudithook(_hook)
'''

AGE_JOB = ["experiment=demo_faceage", "backbone=null", "model=vit_test", "data.generate.train=128",
           "data.generate.val=32", "data.generate.test=32", "data.generate.samples_per_shard=16",
           "data.batch_size=8", "data.num_workers=1", "task.stage1.max_steps=4", "task.stage2.max_steps=30",
           "task.stage1.val_every_n_steps=2", "task.stage2.val_every_n_steps=4", "trainer.log_every_n_steps=1",
           "trainer.enable_progress_bar=false"]
SURVIVAL_JOB = ["experiment=demo_facesurvival", "backbone=null", "model=vit_test", "data.generate.n_patients=240",
                "data.generate.samples_per_shard=32", "data.batch_size=16", "data.num_workers=1", "task.max_steps=30",
                "task.val_every_n_steps=4", "task.freeze_backbone=false", "trainer.log_every_n_steps=1",
                "trainer.enable_progress_bar=false"]


def _fahr(command: str, overrides: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fahr.cli.main", command, *overrides], cwd=REPO,
                            env=_clean_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _signal_when(proc: subprocess.Popen, pattern: str, signum: int, group: bool, timeout: float = 240) -> None:
    """Send ``signum`` once a file matching ``pattern`` exists (to the process group if ``group``)."""
    deadline = time.monotonic() + timeout
    while not list(Path("/").glob(pattern.lstrip("/"))):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {pattern} appeared:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{pattern} did not appear within {timeout} s")
        time.sleep(0.05)
    os.killpg(proc.pid, signum) if group else proc.send_signal(signum)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def _export(root: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (path,) = root.glob("runs/*/*/export/model.safetensors")
    return load_file(str(path))


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_faceage_stopped_hard_in_stage_2_and_during_evaluation_then_rerun_equals_an_uninterrupted_run(tmp_path):
    """SIGTERM to every process of the run in stage 2 (as SLURM stops a job), then the same command,
    signalled again (SIGUSR1) during the final evaluation, then once more: stage 1 is never redone,
    stage 2 resumes at its saved step, the evaluation is redone, and the export equals an
    uninterrupted run's bit for bit; one W&B run over the three attempts."""
    data = f"paths.data_dir={tmp_path / 'data'}"
    _finish(_fahr("finetune-age", [*AGE_JOB, data, f"paths.root_dir={tmp_path / 'ref'}"]))
    root = tmp_path / "stopped"
    overrides = [*AGE_JOB, data, f"paths.root_dir={root}", "logger=wandb"]
    first = _fahr("finetune-age", overrides)
    _signal_when(first, f"{root}/runs/*/*/stage2/checkpoints/last.ckpt", signal.SIGTERM, group=True)
    out = _finish(first)
    assert "preempted (SIGTERM)" in out and not list(root.glob("runs/*/*/stage2/done.json"))
    trace = tmp_path / "trace"
    trace.mkdir()
    (trace / "sitecustomize.py").write_text(EVAL_TRIGGER)
    out = _finish(_fahr("finetune-age", overrides, PYTHONPATH=str(trace),
                        FAHR_TEST_SIGNAL_AFTER=f"{root}/runs/*/*/stage2/done.json"))
    assert "stage 1 already finished" in out and "resuming from" in out
    assert "stopped by a signal before the test evaluation" in out
    assert not list(root.glob("runs/*/*/export"))
    out = _finish(_fahr("finetune-age", overrides))
    assert "stage 1 already finished" in out and "stage 2 already finished" in out
    assert _same_weights(_export(root), _export(tmp_path / "ref"))
    (run_dir,) = root.glob("runs/*/*")
    sessions = wandb_history(run_dir)
    assert len(sessions) == 3 and len({run_id for run_id, _ in sessions}) == 1
    assert any("test/mae" in row for row in sessions[-1][1])


@pytest.mark.slow
def test_facesurvival_sigusr1_then_rerun_equals_an_uninterrupted_run(tmp_path):
    data = f"paths.data_dir={tmp_path / 'data'}"
    _finish(_fahr("finetune-survival", [*SURVIVAL_JOB, data, f"paths.root_dir={tmp_path / 'ref'}"]))
    root = tmp_path / "stopped"
    overrides = [*SURVIVAL_JOB, data, f"paths.root_dir={root}"]
    first = _fahr("finetune-survival", overrides)
    _signal_when(first, f"{root}/runs/*/*/checkpoints/last.ckpt", signal.SIGUSR1, group=False)
    assert "preempted (SIGUSR1)" in _finish(first)
    assert "resuming from" in _finish(_fahr("finetune-survival", overrides))
    assert _same_weights(_export(root), _export(tmp_path / "ref"))
    ref, got = (json.loads(next(r.glob("runs/*/*/metrics.json")).read_text()) for r in (tmp_path / "ref", root))
    assert got["test_c_index"] == ref["test_c_index"] and got["training"]["steps"] == 30
