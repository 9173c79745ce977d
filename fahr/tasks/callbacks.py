"""Small training callbacks shared by the tasks."""

from __future__ import annotations

import time
from typing import Any

import lightning as L


class ThroughputMonitor(L.Callback):
    """Logs ``perf/images_per_sec`` (all ranks together) averaged over each logging interval.

    Measured between consecutive batch ends, so it includes data loading, forward, backward and step.
    """

    def __init__(self) -> None:
        self._t0: float | None = None
        self._images = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._t0 is None:  # the first batch includes worker start-up: start timing after it
            self._t0, self._images = now, 0
            return
        self._images += int(batch["image"].shape[0]) * trainer.world_size
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0 and now > self._t0:
            pl_module.log("perf/images_per_sec", self._images / (now - self._t0), rank_zero_only=True)
            self._t0, self._images = now, 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = None
