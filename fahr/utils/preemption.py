"""Preemption: on SIGUSR1/SIGTERM save ``checkpoints/last.ckpt``, requeue under SLURM, stop cleanly.

One mechanism, ours; Lightning's SLURM auto-requeue is switched off (:func:`cluster_plugins` gives
``SLURMEnvironment(auto_requeue=False)`` under SLURM). Lightning's handler writes
``hpc_ckpt_<N>.ckpt`` from inside the signal handler, in the middle of a step, on each rank without
agreeing with the others, and only the ``hpc_ckpt`` lookup would find it. Ours saves the very file
resume reads (``checkpoints/last.ckpt``, through the run's atomic checkpoint IO), at a batch
boundary that all ranks agree on, so names cannot drift and the saved loop state is the ordinary
batch-end state that mid-epoch resume understands.

What happens:

- The signal handler only records the signal (in the process that installed it; DataLoader workers,
  which SLURM signals too, ignore it).
- At the end of every training batch the ranks agree on the strongest request (an all-reduce MAX of
  one integer: 0 none, 1 stop, 2 requeue; skipped with one process).
- On a request: every rank takes part in saving ``checkpoints/last.ckpt`` and the trainer stops
  after this batch. ``pretrain`` sees :attr:`stopped` and neither writes ``metrics.json`` nor treats
  the run as finished. For SIGUSR1 under SLURM (``SLURM_JOB_ID`` set), rank 0 then runs ``scontrol
  requeue <job id>`` (``<array job>_<task>`` for array jobs) as the very last step, in
  :meth:`PreemptionCheckpoint.requeue_if_requested`, after the loggers are closed: a requeue makes
  SLURM SIGTERM every process of the job at once, W&B's service process included, so requeueing
  before W&B has flushed would cut the run's last steps.
- DataLoader workers ignore the stop signals from their first instruction
  (:class:`fahr.data.shard_reader.StopSignalSafeLoader`: blocked while they fork, ignored before
  unblocked): SLURM signals all processes, and a worker killed by SIGTERM, even one just starting for
  a validation, would crash the training process before it saves. So ``scontrol requeue``, ``scancel`` (without ``--signal``) and SLURM preemption, which
  SIGTERM every process and SIGKILL them ``KillWait`` seconds later, still get their save when a
  batch ends within ``KillWait``. W&B's service process cannot be kept alive through that SIGTERM,
  so with a hard stop W&B may miss what it had not flushed of that attempt.
- SIGTERM, and SIGUSR1 outside SLURM, save and stop without requeueing: SLURM's own preemption
  (``PreemptMode=REQUEUE``) requeues the job itself, and ``scancel`` must not be undone. A plain
  ``kill`` of a local run is resumable the same way.
- The same callback saves ``last.ckpt`` at the batch end that reaches ``trainer.max_steps``, so the
  final checkpoint also holds a batch-end loop state (continuing with a larger ``max_steps`` then
  resumes exactly) unless a ModelCheckpoint already wrote ``last`` at that step.

On SLURM, ask for the warning signal with ``#SBATCH --requeue --signal=USR1@120`` (seconds before the
time limit; choose more than a checkpoint save takes) and start the ranks with ``srun``: without
``B:``, SLURM signals the job steps' processes, not the batch shell. By hand:
``scancel --signal=USR1 <job id>``.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint

log = logging.getLogger(__name__)

_NONE, _STOP, _REQUEUE = 0, 1, 2


def slurm_job_id(environ: Mapping[str, str] | None = None) -> str | None:
    """The id ``scontrol requeue`` takes: ``<SLURM_ARRAY_JOB_ID>_<SLURM_ARRAY_TASK_ID>`` for an array
    task, else ``SLURM_JOB_ID``; None outside SLURM."""
    env = os.environ if environ is None else environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    else:
        job = env.get("SLURM_JOB_ID") or None
    if job is not None and not re.fullmatch(r"[0-9]+(_[0-9]+)?", job):
        raise ValueError(f"unexpected SLURM job id {job!r}")
    return job


def cluster_plugins() -> list[Any]:
    """Trainer plugins that turn Lightning's own SLURM requeue handler off (ours is used instead)."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def requeue(job_id: str) -> bool:
    """``scontrol requeue <job_id>``; True if it succeeded (failures are logged, not raised: the
    checkpoint is saved, re-submitting the same command resumes)."""
    try:
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exn:
        log.warning("could not requeue SLURM job %s: %s; re-submit the same command to resume", job_id, exn)
        return False
    if done.returncode != 0:
        log.warning("scontrol requeue %s failed (exit %d): %s; re-submit the same command to resume",
                    job_id, done.returncode, (done.stderr or done.stdout).strip())
        return False
    log.info("requeued SLURM job %s", job_id)
    return True


class PreemptionCheckpoint(Checkpoint):
    """Saves ``last.ckpt`` and stops on SIGUSR1/SIGTERM (requeueing under SLURM), and saves it at
    ``max_steps``. A :class:`~lightning.pytorch.callbacks.Checkpoint`, so Lightning runs it after the
    ModelCheckpoints of the same hook and it can skip a save they just made.

    Call :meth:`install` as early as possible (a signal before it would kill the process) and
    :meth:`uninstall` when training is over; it re-installs itself at ``on_train_start`` because
    Lightning replaces the SIGTERM handler when fit starts.

    Args:
        last_path: the checkpoint resume reads (``<run_dir>/checkpoints/last.ckpt``).
        environ: environment to read the SLURM job id from (default ``os.environ``).
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, last_path: str | Path, environ: Mapping[str, str] | None = None) -> None:
        self.last_path = Path(last_path)
        self.job_id = slurm_job_id(environ)
        self.received: int | None = None  # the first signal number received
        self.stopped = False  # True once a requested stop was carried out
        self.requeue_requested = False  # the stop asked for a requeue (SIGUSR1 under SLURM)
        self.requeued = False
        self._request = _NONE
        self._pid = os.getpid()
        self._previous: dict[int, Any] = {}

    # ---- signals ----
    def install(self) -> None:
        for signum in self.SIGNALS:
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker: the main process decides
        if self.received is None:
            self.received = signum
        wants = _REQUEUE if signum == signal.SIGUSR1 and self.job_id is not None else _STOP
        self._request = max(self._request, wants)

    @property
    def pending(self) -> int:
        """This process's unanswered request: 0 none, 1 stop, 2 stop and requeue."""
        return self._request

    def mark_stopped(self, is_rank_zero: bool) -> None:
        """Record that a stop was carried out outside training (at a phase boundary): the requeue, if
        one was asked for, then happens in :meth:`requeue_if_requested` (rank 0)."""
        self.stopped = True
        self.requeue_requested = self._request == _REQUEUE and is_rank_zero

    def request(self, requeue: bool = False) -> None:
        """Ask for a save-and-stop (with a requeue under SLURM if ``requeue``), as a signal would."""
        self._request = max(self._request, _REQUEUE if requeue and self.job_id is not None else _STOP)

    # ---- Lightning hooks ----
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.install()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        request = self._agree(trainer, self._request)
        final = trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps
        if not (request or final) or trainer.fast_dev_run:
            return
        if not self._just_saved(trainer):
            trainer.save_checkpoint(str(self.last_path))  # every rank: the strategy decides who writes
        if final:
            return
        self.requeue_requested = request == _REQUEUE and trainer.is_global_zero
        why = "SIGUSR1" if self.received == signal.SIGUSR1 else "SIGTERM" if self.received else "a stop request"
        log.warning("preempted (%s) at global step %d: saved %s; stopping%s. Re-running the same command resumes.",
                    why, trainer.global_step, self.last_path,
                    f", then requeueing SLURM job {self.job_id}" if request == _REQUEUE else "")
        trainer.should_stop = True
        self.stopped = True

    def requeue_if_requested(self) -> bool:
        """Run ``scontrol requeue`` if the stop asked for it (rank 0 only); call it last, after the
        loggers are closed. True if the job was requeued."""
        if self.requeue_requested and not self.requeued:
            self.requeued = requeue(self.job_id)
        return self.requeued

    def _just_saved(self, trainer: L.Trainer) -> bool:
        """A ModelCheckpoint wrote ``last.ckpt`` at this very step (it runs before us in this hook)."""
        for cb in trainer.checkpoint_callbacks:
            if cb is self or not getattr(cb, "last_model_path", ""):
                continue
            same_file = Path(cb.last_model_path).resolve() == self.last_path.resolve()
            if same_file and getattr(cb, "_last_global_step_saved", -1) == trainer.global_step:
                return True
        return False

    @staticmethod
    def _agree(trainer: L.Trainer, request: int) -> int:
        """The largest request over all ranks (a collective: every rank calls it every batch)."""
        if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return request
        flag = torch.tensor([request], dtype=torch.int32, device=trainer.strategy.root_device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())
