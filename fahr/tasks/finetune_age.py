"""FAHR-FaceAge fine-tuning task (LightningModule), one instance per stage.

Stage 1 trains the head on a frozen backbone (kept in eval mode: no drop-path, fixed features).
Stage 2 fine-tunes everything with layer-wise LR decay (timm's ``param_groups_layer_decay``; the
BEiT/MAE recipe) and drop-path. Batches are uint8 images (B, 3, S, S) with ``age`` (B,) in years;
normalisation happens inside :class:`FaceModel`. Validation batches come from an exactly-once
evaluation stream (ranks may see different numbers of them); their predictions are gathered from
every rank at the epoch end, so ``val/mae`` counts each validation photo once.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from timm.optim import param_groups_layer_decay

from fahr.boundary import InputError
from fahr.data.augment import augment_batch, augment_settings, random_hflip
from fahr.job import effective_batch, gather_validation
from fahr.losses.age import l1_age_loss, label_distribution_loss
from fahr.models.face_model import FaceModel
from fahr.tasks.optim import adamw_warmup_cosine
from fahr.tasks.schedules import scaled_lr


class AgeTask(L.LightningModule):
    """Args:
        model: the :class:`FaceModel` (backbone + ``heads["age"]``).
        task: the ``task`` config as a dict (loss, label_sigma, hflip, augment, ...).
        stage: 1 or 2; ``stage_cfg`` is that stage's config dict (max_steps, base_lr, ...).
        batch_size: samples per device per step; the LR is ``base_lr x effective batch / 256`` with
            the effective batch read from the running trainer (devices x nodes x accumulation).
        loss_weights: ``(bin_width, {age bin: weight})`` for ``balance.mode=loss``, else None.
        metric_prefix: prefix of logged names (``"stage1/"``), so both stages share one logger.
    """

    def __init__(self, model: FaceModel, task: dict[str, Any], stage: int, stage_cfg: dict[str, Any],
                 batch_size: int, loss_weights: tuple[float, dict[int, float]] | None = None,
                 metric_prefix: str = "") -> None:
        super().__init__()
        if stage not in (1, 2):
            raise InputError(f"stage must be 1 or 2, got {stage}")
        self.model = model
        self.cfg = task
        self.stage = stage
        self.stage_cfg = stage_cfg
        self.batch_size = int(batch_size)
        self.loss_weights = loss_weights
        self.prefix = metric_prefix
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []
        augment_settings(task.get("augment"))  # a bad task.augment fails here, before training
        self.model.backbone.requires_grad_(stage == 2)
        self._set_modes()

    def _set_modes(self) -> None:
        # Lightning keeps each module's train/eval mode as it finds it (evaluation left it in eval)
        self.model.train()
        if self.stage == 1:
            self.model.backbone.eval()  # frozen features: no drop-path / dropout noise

    def on_train_epoch_start(self) -> None:
        self._set_modes()

    def on_validation_model_train(self) -> None:
        self._set_modes()

    def _age_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.model.features(images)
        return self.model.heads["age"](feats)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        if self.cfg.get("hflip", True):
            images = random_hflip(images)
        images = augment_batch(images, self.cfg.get("augment"))  # all probabilities 0: images itself
        out = self._age_outputs(images)
        target = batch["age"]
        weight = self._weight(target)
        if self.cfg["loss"] == "distribution":
            loss = label_distribution_loss(out["logits"], self.model.heads["age"].centres, target,
                                           sigma=self.cfg["label_sigma"], weight=weight)
        elif self.cfg["loss"] == "l1":
            loss = l1_age_loss(out["age"], target, weight)
        else:
            raise InputError(f"unknown age loss {self.cfg['loss']!r} (distribution, l1)")
        mae = (out["age"].detach() - target).abs().mean()
        self.log(f"{self.prefix}train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log(f"{self.prefix}train/mae", mae, on_step=True, on_epoch=False)
        return loss

    def _weight(self, age: torch.Tensor) -> torch.Tensor | None:
        """Per-sample loss weights (B,) from the age bins (balance.mode=loss), else None."""
        if self.loss_weights is None:
            return None
        width, weights = self.loss_weights
        bins = torch.floor(age.double() / width).long().tolist()
        return torch.tensor([weights.get(b, 1.0) for b in bins], dtype=age.dtype, device=age.device)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if batch["image"].shape[0] == 0:  # only skipped samples in this stretch of the stream
            return
        pred = self._age_outputs(batch["image"])["age"].float()
        self._val.append((pred.detach(), batch["age"].detach().float()))

    def on_validation_epoch_end(self) -> None:
        rows = self._val or [(torch.zeros(0, device=self.device), torch.zeros(0, device=self.device))]
        pred, true = gather_validation(self, torch.cat([p for p, _ in rows]), torch.cat([t for _, t in rows]))
        self._val.clear()
        if pred.numel() == 0:
            return
        self.log(f"{self.prefix}val/mae", (pred - true).abs().mean(), prog_bar=True, sync_dist=False)
        self.log(f"{self.prefix}val/cs5", ((pred - true).abs() <= 5).float().mean(), sync_dist=False)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self.log(f"{self.prefix}lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)

    def configure_optimizers(self):
        s = self.stage_cfg
        effective = effective_batch(self.trainer, self.batch_size)
        lr = scaled_lr(s["base_lr"], effective)
        for lg in self.loggers:
            lg.log_hyperparams({f"{self.prefix}lr/base": s["base_lr"], f"{self.prefix}lr/peak": lr,
                                f"{self.prefix}batch/effective": effective})
        head = self.model.heads["age"]
        head_group = {"params": [p for p in head.parameters() if p.requires_grad],
                      "weight_decay": s["weight_decay"], "lr_scale": 1.0}
        groups = [head_group]
        if self.stage == 2:
            # block i gets layer_decay ** (depth + 1 - i); the head (not in the backbone) gets 1.
            groups += param_groups_layer_decay(self.model.backbone, weight_decay=s["weight_decay"],
                                               no_weight_decay_list=list(self.model.backbone.no_weight_decay()),
                                               layer_decay=s["layer_decay"])
        return adamw_warmup_cosine(groups, lr, s["warmup_steps"], s["max_steps"], s["min_lr"])
