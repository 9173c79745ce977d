"""FAHR-FaceSurvival task (LightningModule): a Cox risk head trained with the partial likelihood.

The task trains a :class:`FaceModel` with a ``risk`` head (optionally fed clinical covariates too:
the "combined" model) on batches ``{"image": uint8 (B, 3, S, S), "time": (B,) days, "event": (B,),
"covariates": (B, C)?}``. DeepSurv mode (a :class:`TableRiskModel` on standardised feature rows
``{"x": (B, F), ...}``) trains without Lightning, in :mod:`fahr.tasks.table_training`;
:func:`batch_risk` and :func:`predict_risk` serve both.

The loss is computed on risks gathered from all ranks (``CoxPHLoss(sync_dist=True)``), so under DDP
the risk set is the global batch. Validation accumulates the whole validation set (every photo once,
gathered from every rank) and reports its partial likelihood (mean over events) and Harrell's C.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from timm.optim import param_groups_layer_decay
from torch import nn

from fahr.data.augment import augment_batch, augment_settings, is_active, random_hflip
from fahr.job import effective_batch, gather_validation
from fahr.losses.cox import CoxPHLoss, cox_ph_loss
from fahr.tasks.optim import adamw_warmup_cosine
from fahr.tasks.schedules import scaled_lr


def batch_risk(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Log-hazards (B,) of a batch, for either kind of model."""
    if "x" in batch:
        return model(batch["x"])["risk"].float()
    return model(batch["image"], batch.get("covariates"))["risk"].float()


class SurvivalTask(L.LightningModule):
    """Args:
        model: a FaceModel with a ``risk`` head.
        task: the ``task`` config dict (ties, LRs, freeze_backbone, hflip, augment, ...).
        batch_size: samples per device per step.
        columns: images mode, streamed shards: ``{"time": key, "event": key, "features": [covariate
            keys], "mean": [...], "std": [...]}``: which batch fields are the outcome and the
            covariates (standardised here); None when batches already hold ``image``, ``time``
            and ``event``.
    """

    def __init__(self, model: nn.Module, task: dict[str, Any], batch_size: int, columns: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model = model
        self.cfg = task
        self.batch_size = int(batch_size)
        self.columns = columns
        self.lr = float(task["base_lr"])
        self.loss = CoxPHLoss(ties=task["ties"], reduction="mean", sync_dist=True)
        self._val: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        augment_settings(task.get("augment"))  # a bad task.augment fails here, before training
        self.backbone = getattr(model, "backbone", None)
        if self.backbone is not None and task["freeze_backbone"]:
            self.backbone.requires_grad_(False)

    def _set_modes(self) -> None:
        self.model.train()
        if self.backbone is not None and self.cfg["freeze_backbone"]:
            self.backbone.eval()

    def on_train_epoch_start(self) -> None:
        self._set_modes()

    def on_validation_model_train(self) -> None:
        self._set_modes()

    def _canonical(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``{"image", "time", "event", "covariates"?}`` from a streamed batch (see ``columns``)."""
        c = self.columns
        if c is None:
            return batch
        out = {"image": batch["image"], "time": batch[c["time"]], "event": batch[c["event"]]}
        if c.get("features"):
            raw = torch.stack([batch[k] for k in c["features"]], 1)
            mean = torch.tensor(c["mean"], dtype=raw.dtype, device=raw.device)
            std = torch.tensor(c["std"], dtype=raw.dtype, device=raw.device)
            out["covariates"] = (raw - mean) / std
        return out

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        batch = self._canonical(batch)
        if "image" in batch and self.cfg.get("hflip", True):
            batch = {**batch, "image": random_hflip(batch["image"])}
        if "image" in batch and is_active(self.cfg.get("augment")):  # after the flip
            batch = {**batch, "image": augment_batch(batch["image"], self.cfg.get("augment"))}
        risk = batch_risk(self.model, batch)
        loss = self.loss(risk, batch["time"], batch["event"])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(risk))
        self.log("train/events", batch["event"].sum(), on_step=True, on_epoch=False, batch_size=len(risk))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        batch = self._canonical(batch)
        if len(batch["time"]) == 0:  # only skipped samples in this stretch of the stream
            return
        risk = batch_risk(self.model, batch)
        self._val.append((risk.detach(), batch["time"].float(), batch["event"].float()))

    def on_validation_epoch_end(self) -> None:
        empty = torch.zeros(0, device=self.device)
        rows = self._val or [(empty, empty, empty)]
        risk, time, event = gather_validation(self, *(torch.cat(x) for x in zip(*rows)))
        self._val.clear()
        if len(event) == 0 or event.sum() == 0:
            return
        from fahr.metrics.survival import harrell_c

        val_loss = cox_ph_loss(risk.double(), time.double(), event.double(), ties=self.cfg["ties"])
        self.log("val/loss", val_loss.float(), prog_bar=True, sync_dist=False)
        self.log("val/c_index", float(harrell_c(time.numpy(), event.numpy(), risk.numpy())), sync_dist=False)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)

    def configure_optimizers(self):
        c = self.cfg
        effective = effective_batch(self.trainer, self.batch_size)
        self.lr = scaled_lr(c["base_lr"], effective)
        for lg in self.loggers:
            lg.log_hyperparams({"lr/base": c["base_lr"], "lr/peak": self.lr, "batch/effective": effective})
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if self.backbone is not None and not c["freeze_backbone"]:
            groups = param_groups_layer_decay(self.backbone, weight_decay=c["weight_decay"],
                                              no_weight_decay_list=list(self.backbone.no_weight_decay()),
                                              layer_decay=c["layer_decay"])
            groups.append({"params": list(self.model.heads.parameters()), "weight_decay": c["weight_decay"]})
        else:
            groups = [{"params": trainable, "weight_decay": c["weight_decay"]}]
        return adamw_warmup_cosine(groups, self.lr, c["warmup_steps"], c["max_steps"], c["min_lr"])


@torch.inference_mode()
def predict_risk(model: nn.Module, loader) -> np.ndarray:
    """Log-hazards (N,) over a loader, in loader order."""
    model.eval()
    return torch.cat([batch_risk(model, b) for b in loader]).numpy().astype(np.float64)
