"""The trainer layer: how every training command runs (``fahr pretrain``, both ``fahr finetune-age``
stages, ``fahr finetune-survival`` in image and table mode).

A command opens one :class:`TrainingJob` for its run directory and keeps only what is its own (data,
model, task, evaluation, export). The job owns everything about *how* it runs:

- **topology**: ``trainer.num_nodes`` / ``trainer.devices`` from srun or torchrun
  (:func:`fahr.utils.distributed_env.trainer_topology`);
- **the process group**, created here when the launcher started several processes, before any
  preparation, so ranks can agree before training (Lightning reuses an initialised group); plus a
  gloo group for the job's own coordination (CPU tensors, long timeout);
- **rank-safe preparation** (:meth:`TrainingJob.prepare_once`): rank 0 writes, the others wait, a
  failure on rank 0 fails every rank with one line;
- **strategy** (ddp, fsdp, deepspeed_*: :func:`fahr.utils.strategies.build_strategy`) and precision;
- **checkpoints**: atomic IO, ``last.ckpt`` every N steps, at ``max_steps`` and on preemption, and
  resume from it (a file, or the folder a sharded strategy writes);
- **preemption**: SIGUSR1/SIGTERM -> save at the next batch end and stop; SLURM requeue after the
  loggers are closed (:mod:`fahr.utils.preemption`); between phases (evaluation) a stop is honoured
  at :meth:`TrainingJob.stop_if_requested`;
- **epochs**: each epoch of a shard stream gets its own order (and a resumed one starts where it
  stopped);
- **randomness**: the global torch RNG is reseeded at every training step from (seed, rank, step),
  so dropout, drop-path, flips and augmentation of a resumed run equal an uninterrupted run's;
- **loggers**: CSV always, W&B / TensorBoard on request; final metrics, figures and the export (as a
  W&B artifact) reach every logger before it is closed;
- **learning rate**: tasks scale ``base_lr x effective batch / 256`` with :func:`effective_batch`
  (per-device batch x world size x accumulation, read from the running trainer);
- **throughput**: ``perf/images_per_sec`` (all ranks).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from fahr.boundary import InputError
from fahr.utils.checkpoint_io import AtomicCheckpointIO
from fahr.utils.distributed_env import DistEnv, distributed_env, trainer_topology
from fahr.utils.preemption import PreemptionCheckpoint, cluster_plugins
from fahr.utils.run import LAST_CHECKPOINT, prepare_run_dir, read_run_info

log = logging.getLogger(__name__)

#: how long the job's own coordination (a rank waiting for rank 0's preparation) may take
COORDINATION_TIMEOUT = timedelta(hours=6)
#: trainer config keys the job consumes itself (each command sets its step counts)
#: ``cfg.trainer`` keys the job layer acts on itself (not ``lightning.Trainer`` arguments)
JOB_TRAINER_KEYS = ("compile", "measure_flops")
_NOT_TRAINER_ARGS = ("max_steps", *JOB_TRAINER_KEYS)


class Preempted(Exception):
    """A stop was requested (SIGUSR1/SIGTERM) outside training: the command stops where it is;
    re-running the same command redoes the unfinished phase."""


@dataclass
class FitOutcome:
    """How one :meth:`TrainingJob.fit` ended. ``preempted``: stopped by a signal before
    ``max_steps`` (``last.ckpt`` saved). ``session_steps``: batches trained in this session (0 when
    the fit was already complete)."""
    trainer: L.Trainer
    preempted: bool
    session_steps: int
    resumed_from: Path | None

    @property
    def global_step(self) -> int:
        return int(self.trainer.global_step)


def effective_batch(trainer: L.Trainer, per_device_batch: int) -> int:
    """Samples per optimiser step over all processes: per-device batch x world size x accumulation."""
    return int(per_device_batch) * int(trainer.world_size) * int(trainer.accumulate_grad_batches)


def gather_validation(pl_module: L.LightningModule, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each rank's validation rows concatenated over all ranks in rank order, on the CPU.

    ``tensors`` are (N, ...) with the same N within a rank; N may differ between ranks (the
    evaluation streams give every sample to exactly one rank), so rows are padded to the largest N
    for Lightning's ``all_gather`` and the padding is cut off again."""
    if pl_module.trainer.world_size <= 1:
        return tuple(t.cpu() for t in tensors)
    device = pl_module.device
    sizes = [int(n) for n in pl_module.all_gather(torch.tensor([tensors[0].shape[0]], device=device)).flatten()]
    out = []
    for t in tensors:
        padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=device)
        padded[: t.shape[0]] = t.to(device)
        parts = pl_module.all_gather(padded)  # (world, max N, ...)
        out.append(torch.cat([parts[r, :n] for r, n in enumerate(sizes)]).cpu())
    return tuple(out)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of training step ``step`` on ``rank`` (63 bits, independent of history)."""
    digest = hashlib.blake2b(f"fahr-step:{seed}:{rank}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def find_resume_checkpoint(ckpt_dir: Path) -> Path | None:
    """``ckpt_dir/last.ckpt`` if it exists: a file, or the folder DeepSpeed and sharded FSDP write."""
    last = Path(ckpt_dir) / LAST_CHECKPOINT
    return last if last.is_file() or last.is_dir() else None


class StepSeeding(Callback):
    """Reseeds the global torch RNG at the start of every training batch (see :func:`step_seed`)."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(step_seed(self.seed, trainer.global_rank, trainer.global_step))


class StreamEpochs(Callback):
    """Selects each training epoch of a shard stream (its shard order, shuffling and, after a resume,
    where the restored epoch starts): ``datamodule.set_epoch(current_epoch)`` at every epoch start."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(trainer.current_epoch)


class SessionSteps(Callback):
    """Counts the training batches run in this session."""

    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, *args: Any) -> None:
        self.steps += 1


class RunInfoInCheckpoint(Callback):
    """Stores the run identity (run id, W&B id) inside every checkpoint."""

    def __init__(self, run_info: dict[str, Any]) -> None:
        self.run_info = run_info

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["fahr_run"] = dict(self.run_info)


class RecoveryCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every N steps, never versioned, and never at train end: Lightning's train-end save
    holds the loop state after fit stopped (epoch already advanced), from which a resume continues in
    the wrong epoch. The batch-end saves at max_steps and on preemption (PreemptionCheckpoint) replace
    it. Kept apart from monitored savers because Lightning defers a monitored saver's ``last`` until
    its metric exists."""

    def __init__(self, ckpt_dir: Path, every_n_train_steps: int) -> None:
        super().__init__(dirpath=str(ckpt_dir), every_n_train_steps=every_n_train_steps, save_last=True,
                         save_top_k=0, monitor=None, enable_version_counter=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass


class ThroughputMonitor(Callback):
    """Logs ``perf/images_per_sec`` (all ranks together) averaged over each logging interval, measured
    between batch ends (data loading, forward, backward and step). Batches without ``image`` (table
    mode) are counted by their first tensor's rows.

    With ``measure_flops``, the first training batch runs under torch's ``FlopCounterMode`` (the same
    computation, counted): ``perf/flops_per_sample`` (forward + backward; matmuls, convolutions and
    attention, as FLOP counters count them) is logged once, and with ``peak_flops`` (one device's
    theoretical peak, Lightning's table: ``lightning.fabric.utilities.throughput.get_available_flops``)
    every interval logs ``perf/mfu`` = achieved FLOP/s / (peak x world size).
    """

    def __init__(self, measure_flops: bool = False, peak_flops: float | None = None) -> None:
        self._t0: float | None = None
        self._samples = 0
        self.measure_flops = measure_flops
        self.peak_flops = peak_flops
        self.flops_per_sample: float | None = None
        self._counter: Any = None

    @staticmethod
    def _rows(batch: Any) -> int:
        if isinstance(batch, dict):
            first = batch.get("image", next((v for v in batch.values() if torch.is_tensor(v)), None))
            return int(first.shape[0]) if first is not None else 0
        return 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.measure_flops and self.flops_per_sample is None and self._counter is None:
            from torch.utils.flop_counter import FlopCounterMode

            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        import time

        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            rows = self._rows(batch)
            if rows:
                self.flops_per_sample = self._counter.get_total_flops() / rows
                if trainer.is_global_zero:  # once, straight to the loggers (self.log would repeat it every step)
                    for lg in trainer.loggers:
                        lg.log_metrics({"perf/flops_per_sample": float(self.flops_per_sample)}, step=trainer.global_step)
            self._counter = None
        now = time.perf_counter()
        if self._t0 is None:  # the first batch includes worker start-up (and the FLOP count): time after it
            self._t0, self._samples = now, 0
            return
        self._samples += self._rows(batch) * trainer.world_size
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0 and now > self._t0:
            rate = self._samples / (now - self._t0)
            pl_module.log("perf/images_per_sec", rate, rank_zero_only=True)
            if self.flops_per_sample and self.peak_flops:
                pl_module.log("perf/mfu", rate * self.flops_per_sample / (self.peak_flops * trainer.world_size),
                              rank_zero_only=True)
            self._t0, self._samples = now, 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = None


def peak_flops(accelerator: str, local_rank: int, precision: Any) -> float | None:
    """One device's theoretical peak FLOP/s for ``precision`` (Lightning's table), or None: a CPU, or a
    GPU Lightning does not know."""
    if accelerator not in ("gpu", "cuda", "auto") or not torch.cuda.is_available():
        return None
    from lightning.fabric.utilities.throughput import get_available_flops

    text = str(precision)
    dtype = torch.bfloat16 if "bf16" in text else torch.float16 if text.startswith("16") else torch.float32
    flops = get_available_flops(torch.device("cuda", local_rank % torch.cuda.device_count()), dtype)
    return float(flops) if flops else None


def compile_blocks(module: torch.nn.Module) -> int:
    """``torch.compile`` every ViT block of ``module`` in place (regional compilation: one compiled
    graph reused by all blocks of a shape, compiled in seconds rather than the whole model's minutes);
    parameter names and checkpoints stay as they are. Returns the number of blocks."""
    from timm.models.vision_transformer import Block

    blocks = [m for m in module.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile()
    return len(blocks)


def _silence_known_warnings() -> None:
    """Lightning warnings that do not apply to fahr's loaders (each checked by a test instead)."""
    # The shard streams size every worker's share themselves (tests/test_shards.py checks coverage).
    warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__` defined.*")
    # Device-side normalisation lives in the tasks on purpose; the datamodule has no such hook.
    warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer` in `LightningModule`.*")
    # The shard stream resumes mid-epoch from the restored loop state (tests/test_preemption.py).
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
    # FaceAge stage 1 keeps the frozen backbone in eval mode on purpose.
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")
    # Validation metrics are computed from predictions gathered from every rank (gather_validation).
    warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting.*")


class TrainingJob:
    """One command's training in one run directory; use as a context manager around the command.

    Args:
        cfg: the command's composed config (``trainer``, ``logger``, ``seed``, ``experiment_name``).
        run_dir: the run directory (:func:`fahr.utils.run.run_dir_for`).
        environ: the environment the launcher set (default ``os.environ``).

    On entry: the preemption handler is installed (a signal during start-up is acted on at the first
    batch end or the next :meth:`stop_if_requested`), and under srun/torchrun with several
    processes the process group is created. On exit: the loggers are closed, then (rank 0) the SLURM
    job is requeued if a SIGUSR1 asked for it: a requeue makes SLURM stop every process of the job.
    """

    def __init__(self, cfg: DictConfig, run_dir: Path, environ: dict[str, str] | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.env: DistEnv = distributed_env(os.environ if environ is None else environ)
        self.preemption = PreemptionCheckpoint(self.run_dir / "checkpoints" / LAST_CHECKPOINT, environ)
        self.loggers: list = []
        self.run_info: dict[str, Any] | None = None
        self._group = None  # gloo group for the job's own coordination
        self._created_group = False
        self._final_step = 0

    # ---- identity ---------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_rank_zero(self) -> bool:
        return self.env.rank == 0

    @property
    def device(self) -> torch.device:
        """Where this rank evaluates: its GPU (``cuda:<local rank>``) when the trainer runs on GPUs,
        else the CPU."""
        accelerator = str(self.cfg.trainer.get("accelerator", "auto"))
        if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
            return torch.device("cuda", self.env.local_rank % max(1, torch.cuda.device_count()))
        return torch.device("cpu")

    @property
    def stopped(self) -> bool:
        """A requested stop was carried out (in training or at a phase boundary)."""
        return self.preemption.stopped

    # ---- context ------------------------------------------------------------------------------------
    def __enter__(self) -> "TrainingJob":
        self.preemption.install()
        try:
            if self.world_size > 1:
                self._init_process_group()
        except BaseException:
            self.preemption.uninstall()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            self.close_loggers()
        finally:
            self.preemption.uninstall()
            # last: a requeue makes SLURM stop every process of the job, W&B's service included
            self.preemption.requeue_if_requested()
            if self._created_group and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        if exc_type is Preempted:
            log.warning("%s; re-running the same command continues", exc)
            return True  # the command's result says preempted
        return False

    def _init_process_group(self) -> None:
        """The default process group (the backend Lightning would choose: NCCL on GPUs, gloo on CPU,
        or ``trainer.strategy.process_group_backend``) and the job's gloo group."""
        import torch.distributed as dist

        if not dist.is_initialized():
            from lightning.pytorch.plugins.environments import LightningEnvironment, SLURMEnvironment, \
                TorchElasticEnvironment

            cluster = (TorchElasticEnvironment() if self.env.launcher == "torchrun"
                       else SLURMEnvironment(auto_requeue=False) if self.env.launcher == "slurm" else LightningEnvironment())
            os.environ["MASTER_ADDR"] = cluster.main_address
            os.environ["MASTER_PORT"] = str(cluster.main_port)
            backend = self._backend()
            minutes = self._strategy_option("timeout_minutes")
            timeout = timedelta(minutes=minutes) if minutes else timedelta(minutes=30)
            dist.init_process_group(backend, rank=self.env.rank, world_size=self.env.world_size, timeout=timeout)
            self._created_group = True
            log.info("process group: %s, rank %d of %d", backend, self.env.rank, self.env.world_size)
        self._group = dist.new_group(backend="gloo", timeout=COORDINATION_TIMEOUT)

    def _strategy_option(self, key: str) -> Any:
        strategy = self.cfg.trainer.get("strategy")
        return strategy.get(key) if OmegaConf.is_dict(strategy) else None

    def _backend(self) -> str:
        backend = self._strategy_option("process_group_backend")
        if backend:
            return str(backend)
        accelerator = str(self.cfg.trainer.get("accelerator", "auto"))
        gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
        return "nccl" if gpu and torch.cuda.is_available() else "gloo"

    # ---- coordination -------------------------------------------------------------------------------
    def barrier(self) -> None:
        if self._group is not None:
            torch.distributed.barrier(group=self._group)

    def prepare_once(self, what: str, fn: Callable[[], Any]) -> None:
        """Run ``fn`` (which writes files every rank then reads) on rank 0 while the others wait; a
        failure on rank 0 is re-raised there and fails every other rank with one line naming ``what``."""
        if self._group is None:
            fn()
            return
        failure: BaseException | None = None
        if self.is_rank_zero:
            try:
                fn()
            except BaseException as err:  # noqa: BLE001 - re-raised below, after telling the others
                failure = err
        status = torch.tensor([0 if failure is None else 1], dtype=torch.int32)
        torch.distributed.broadcast(status, src=0, group=self._group)
        if failure is not None:
            raise failure
        if int(status.item()):
            raise InputError(f"{what}: rank 0 failed (its log says why); nothing was trained")

    def prepare_run_dir(self) -> dict[str, Any]:
        """Create the run directory on rank 0 (config, provenance, run.json: run id and W&B id); every
        rank returns the run info."""
        self.prepare_once("run directory", lambda: prepare_run_dir(self.cfg, self.run_dir))
        self.run_info = read_run_info(self.run_dir)
        return self.run_info

    def agree(self, local: int) -> int:
        """The largest of ``local`` over all ranks (a collective: every rank calls it)."""
        if self._group is None:
            return int(local)
        flag = torch.tensor([int(local)], dtype=torch.int64)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._group)
        return int(flag.item())

    def stop_if_requested(self, where: str) -> None:
        """Between phases (every rank calls it at the same point): if any rank received SIGUSR1 or
        SIGTERM, stop here (:class:`Preempted`, which leaves the ``with`` block quietly); the rerun
        redoes ``where``."""
        if self.agree(self.preemption.pending):
            self.preemption.mark_stopped(self.is_rank_zero)
            raise Preempted(f"stopped by a signal before {where}")

    def gather_rows(self, columns: dict[str, Any]) -> dict[str, Any]:
        """Concatenate each rank's rows of every column, in rank order (rank 0's first).

        Args:
            columns: name -> a CPU tensor (N, ...) or a list of N strings; N may differ between ranks,
                and must be the same for every column of one rank.
        """
        if self._group is None:
            return columns
        import torch.distributed as dist

        out: dict[str, Any] = {}
        for name, value in columns.items():
            strings = isinstance(value, list)
            tensor = _encode_strings(value) if strings else value.detach().cpu().contiguous()
            n = torch.tensor([tensor.shape[0]], dtype=torch.int64)
            sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
            dist.all_gather(sizes, n, group=self._group)
            shape = torch.tensor(list(tensor.shape[1:]) or [0], dtype=torch.int64)
            width = [torch.zeros_like(shape) for _ in range(self.world_size)]
            dist.all_gather(width, shape, group=self._group)
            tail = list(torch.stack(width).max(0).values.tolist()) if tensor.dim() > 1 else []
            rows = int(max(int(s) for s in sizes))
            padded = tensor.new_zeros((rows, *tail))
            padded[tuple(slice(0, d) for d in tensor.shape)] = tensor
            parts = [torch.zeros_like(padded) for _ in range(self.world_size)]
            dist.all_gather(parts, padded, group=self._group)
            joined = torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])
            out[name] = _decode_strings(joined) if strings else joined
        return out

    # ---- loggers ------------------------------------------------------------------------------------
    def build_loggers(self) -> list:
        from fahr.utils.loggers import build_loggers

        if self.run_info is None:
            raise RuntimeError("prepare_run_dir before build_loggers")
        self.loggers = build_loggers(self.cfg, self.run_dir, self.run_info)
        return self.loggers

    def log_final(self, metrics: dict[str, Any], figures: Sequence[Path] = (), export_dir: Path | None = None,
                  step: int | None = None) -> None:
        """Final validation/test metrics (numbers only), figures and the export to every logger, before
        they are closed. Rank 0 only writes; call it on every rank."""
        if not self.is_rank_zero:
            return
        step = self._final_step if step is None else int(step)
        numbers = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
        for lg in self.loggers:
            if numbers:
                lg.log_metrics(numbers, step=step)
            kind = type(lg).__name__
            pngs = [str(p) for p in figures if Path(p).is_file()]
            if kind == "WandbLogger":
                for png in pngs:  # one key per figure: W&B shows one panel per key, of one size
                    lg.log_image(key=f"figures/{Path(png).stem}", images=[png], step=step)
                if export_dir is not None:
                    _log_export_artifact(lg, Path(export_dir), self.run_info or {})
            elif kind == "TensorBoardLogger" and pngs:
                import numpy as np
                from PIL import Image

                for p in pngs:
                    image = np.asarray(Image.open(p).convert("RGB"))
                    lg.experiment.add_image(f"figures/{Path(p).stem}", image, global_step=step, dataformats="HWC")

    def close_loggers(self) -> None:
        """Flush every logger and close W&B (so a later run in the same process starts its own)."""
        from fahr.utils.loggers import finish_trackers

        for lg in self.loggers:
            try:
                lg.save()
                lg.finalize("success")
            except (OSError, ConnectionError) as exn:
                log.warning("%s could not be flushed: %s", type(lg).__name__, exn)
        finish_trackers(self.loggers)
        self.loggers = []

    # ---- training -------------------------------------------------------------------------------------
    def trainer_args(self, batch_size: int) -> dict[str, Any]:
        """``cfg.trainer`` as Lightning arguments: topology from the launcher, the strategy built."""
        from fahr.utils.strategies import build_strategy

        args = OmegaConf.to_container(self.cfg.trainer, resolve=True)
        for key in _NOT_TRAINER_ARGS:
            args.pop(key, None)
        args = trainer_topology(args, self.env)
        args["strategy"] = build_strategy(args.get("strategy"), batch_size=batch_size)
        return args

    def fit(self, task: L.LightningModule, *, ckpt_dir: Path, max_steps: int, batch_size: int,
            datamodule: Any = None, train_dataloaders: Any = None, val_dataloaders: Any = None,
            checkpoint_every: int, val_every: int | None = None, callbacks: Sequence[Callback] = (),
            trainer_overrides: dict[str, Any] | None = None, default_root_dir: Path | None = None,
            throughput: bool = True, lr_monitor: bool = True) -> FitOutcome:
        """Train ``task`` to ``max_steps`` (or resume from ``ckpt_dir/last.ckpt``), or stop on a signal.

        Args:
            ckpt_dir: where ``last.ckpt`` lives (recovery every ``checkpoint_every`` steps, at max_steps
                and on preemption) and where the command's own savers (``callbacks``) write.
            batch_size: samples per device per step (DeepSpeed's logging; the LR is the task's).
            val_every: validate every this many steps (None: the ``trainer_overrides`` decide, or
                at epoch ends).
            callbacks: the command's own callbacks (a best-checkpoint saver, early stopping, ...).
            trainer_overrides: further ``lightning.Trainer`` arguments (e.g. ``limit_val_batches``).
            throughput, lr_monitor: log ``perf/images_per_sec``; the learning rate (W&B, TensorBoard).

        The loaders must split data by rank themselves (fahr's shard streams do):
        ``use_distributed_sampler=False``.
        """
        ckpt_dir = Path(ckpt_dir)
        resume = find_resume_checkpoint(ckpt_dir) if self.cfg.get("resume", True) else None
        self.preemption.last_path = ckpt_dir / LAST_CHECKPOINT
        session = SessionSteps()
        run_callbacks: list[Callback] = [StreamEpochs(), RecoveryCheckpoint(ckpt_dir, checkpoint_every), *callbacks]
        if self.run_info is not None:
            run_callbacks.append(RunInfoInCheckpoint(self.run_info))
        # after every ModelCheckpoint: the preemption saver skips a save they just made at the same step
        run_callbacks += [self.preemption, session, StepSeeding(self.cfg.seed)]
        if throughput:
            trainer_cfg = self.cfg.trainer
            peak = peak_flops(str(trainer_cfg.get("accelerator", "auto")), self.env.local_rank,
                              trainer_cfg.get("precision"))
            measure = trainer_cfg.get("measure_flops")
            run_callbacks.append(ThroughputMonitor(measure_flops=peak is not None if measure is None else bool(measure),
                                                   peak_flops=peak))
        if self.cfg.trainer.get("compile", False):
            log.info("torch.compile: %d transformer blocks compiled in place", compile_blocks(task))
        if lr_monitor and any(type(lg).__name__ in ("WandbLogger", "TensorBoardLogger") for lg in self.loggers):
            run_callbacks.append(LearningRateMonitor(logging_interval="step"))
        args = self.trainer_args(batch_size)
        if val_every is not None:
            args.update(val_check_interval=val_every, check_val_every_n_epoch=None)
        args.update(trainer_overrides or {})
        _silence_known_warnings()
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        try:
            trainer = L.Trainer(**args, max_steps=max_steps, default_root_dir=str(default_root_dir or ckpt_dir.parent),
                                logger=self.loggers or False, callbacks=run_callbacks,
                                plugins=[AtomicCheckpointIO(), *cluster_plugins()], use_distributed_sampler=False)
        except (MisconfigurationException, ValueError, TypeError) as err:
            # Lightning's own refusals of a trainer setting (e.g. fsdp or deepspeed without a GPU)
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InputError(f"trainer: {first}") from None
        if resume is not None:
            log.info("resuming from %s", resume)
        kwargs = {"datamodule": datamodule} if datamodule is not None else {
            "train_dataloaders": train_dataloaders, "val_dataloaders": val_dataloaders}
        trainer.fit(task, ckpt_path=str(resume) if resume else None, weights_only=True, **kwargs)
        if trainer.interrupted and not self.preemption.stopped:
            raise RuntimeError(f"training was interrupted at step {trainer.global_step}")
        self._final_step = int(trainer.global_step)
        return FitOutcome(trainer=trainer, preempted=self.preemption.stopped, session_steps=session.steps,
                          resumed_from=resume)


def _encode_strings(values: list[str]) -> torch.Tensor:
    """(N, L) uint8 UTF-8 bytes, zero-padded (no string may contain NUL)."""
    data = [v.encode("utf-8") for v in values]
    width = max((len(d) for d in data), default=0)
    out = torch.zeros((len(data), max(width, 1)), dtype=torch.uint8)
    for i, d in enumerate(data):
        out[i, : len(d)] = torch.frombuffer(bytearray(d), dtype=torch.uint8) if d else out[i, :0]
    return out


def _decode_strings(tensor: torch.Tensor) -> list[str]:
    return [bytes(row.tolist()).rstrip(b"\0").decode("utf-8") for row in tensor]


def _log_export_artifact(wandb_logger: Any, export_dir: Path, run_info: dict[str, Any]) -> None:
    """The export (``model.safetensors`` + ``model_card.json`` + its ``README.md``; never a pickled
    checkpoint) as a W&B model artifact of the run."""
    import wandb

    files = [export_dir / name for name in ("model.safetensors", "model_card.json")]
    if not all(f.is_file() for f in files):
        log.warning("export %s is incomplete: not logged as a W&B artifact", export_dir)
        return
    files += [f for f in [export_dir / "README.md"] if f.is_file()]
    name = f"{run_info.get('run_id', 'fahr')}-export".replace("/", "-")
    artifact = wandb.Artifact(name=name, type="model", metadata={"run_id": run_info.get("run_id")})
    for f in files:
        artifact.add_file(str(f), name=f.name)
    wandb_logger.experiment.log_artifact(artifact)


__all__ = ["TrainingJob", "FitOutcome", "Preempted", "effective_batch", "gather_validation", "step_seed", "find_resume_checkpoint",
           "ThroughputMonitor"]
