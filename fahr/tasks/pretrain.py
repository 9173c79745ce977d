"""MAE pretraining task (LightningModule).

Batches arrive as uint8 images (B, 3, H, W) from the shard stream; conversion, normalisation and
augmentation happen here on the device. The LR follows ``base_lr * effective_batch / 256`` with a
warmup + cosine schedule that is a pure function of the global step.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

from fahr.boundary import InputError
from fahr.data.augment import random_hflip
from fahr.job import effective_batch
from fahr.models import MaskedAutoencoder, create_backbone
from fahr.models.weights import init_from_export
from fahr.models.face_model import normalize_uint8
from fahr.tasks.optim import adamw_warmup_cosine, param_groups
from fahr.tasks.schedules import scaled_lr

log = logging.getLogger(__name__)


class MAEPretrainTask(L.LightningModule):
    """Args are plain dicts (the ``model`` and ``task`` config nodes) so checkpoints stay pickle-free.

    Args:
        model: backbone arguments (arch, img_size, patch_size, drop_path_rate, global_pool, grad_checkpointing,
            and the size facts of ``fahr.config.schema.ModelConfig``).
        task: MAE and optimiser settings (see ``fahr.config.schema.PretrainTaskConfig``). With
            ``init_from`` (a backbone export), the encoder, and the decoder if the export has one, start
            from its weights (:func:`fahr.models.weights.init_from_export`; the architecture must match it,
            which ``fahr pretrain`` ensures); a resumed run then loads its checkpoint over them.
        mean, std: per-channel normalisation of [0, 1] RGB.
        image_dir: where reconstruction grids are saved (None: not saved).
        allow_image_logging: False for clinical data unless explicitly asked for.
    """

    def __init__(self, model: dict, task: dict, mean: list[float], std: list[float],
                 image_dir: str | None = None, allow_image_logging: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        encoder = create_backbone(**model)
        self.model = MaskedAutoencoder(
            encoder, mask_ratio=task["mask_ratio"], decoder_dim=task["decoder_dim"],
            decoder_depth=task["decoder_depth"], decoder_heads=task["decoder_heads"],
            norm_pix_loss=task["norm_pix_loss"],
            decoder_mlp_ratio=task.get("decoder_mlp_ratio") or 4.0, decoder_norm_eps=task.get("decoder_norm_eps"),
            decoder_qkv_bias=task.get("decoder_qkv_bias") is not False,
            decoder_pos_embed=task.get("decoder_pos_embed") or "timm",
        )
        if task.get("init_from"):
            init_from_export(self.model, task["init_from"])
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)
        self.cfg = task
        self.image_dir = Path(image_dir) if image_dir else None
        self.allow_image_logging = allow_image_logging
        self.peak_lr: float | None = None

    @property
    def encoder(self) -> torch.nn.Module:
        return self.model.encoder

    # ---- data on the device -------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        images = normalize_uint8(batch["image"], self.mean, self.std)
        if self.training and self.cfg["hflip"]:
            images = random_hflip(images)
        return {**batch, "image": images}

    # ---- steps --------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.model(batch["image"])
        n = batch["image"].shape[0]
        self.log("train/loss", out["loss"], on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        if "n_skipped" in batch:
            self.log("data/skipped", batch["n_skipped"].float(), on_step=False, on_epoch=True,
                     reduce_fx="sum", sync_dist=True, batch_size=n)
        every = self.cfg["log_images_every_n_steps"]
        if every and self.allow_image_logging and self.global_step % every == 0 and self.trainer.is_global_zero:
            self._log_reconstructions(batch["image"], out)
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self.model(batch["image"])
        self.log("val/loss", out["loss"], on_epoch=True, sync_dist=True, prog_bar=True,
                 batch_size=batch["image"].shape[0])

    # ---- optimisation ---------------------------------------------------------------------------
    def effective_batch_size(self) -> int:
        return effective_batch(self.trainer, self.trainer.datamodule.batch_size)

    def configure_optimizers(self) -> dict[str, Any]:
        effective = self.effective_batch_size()
        self.peak_lr = scaled_lr(self.cfg["base_lr"], effective)
        log.info("effective batch %d -> peak LR %.3g (base_lr %.3g)", effective, self.peak_lr, self.cfg["base_lr"])
        groups = param_groups(self.model, self.cfg["weight_decay"], self.model.no_weight_decay())
        total = self.trainer.max_steps
        if total is None or total <= 0:
            raise InputError("trainer.max_steps must be set: the LR schedule is a function of the step")
        return adamw_warmup_cosine(groups, self.peak_lr, self.cfg["warmup_steps"], total, self.cfg["min_lr"],
                                   betas=self.cfg["betas"])

    def on_fit_start(self) -> None:
        for lg in self.loggers:
            lg.log_hyperparams({"lr/base": self.cfg["base_lr"], "lr/peak": self.peak_lr,
                                "batch/effective": self.effective_batch_size()})

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)

    # ---- figures --------------------------------------------------------------------------------
    @torch.no_grad()
    def _log_reconstructions(self, images: torch.Tensor, out: dict) -> None:
        from fahr.utils.figures import reconstruction_grid, save_png

        n = min(self.cfg["num_log_images"], images.shape[0])
        recon = self.model.reconstruct(images[:n].float(), {k: v[:n] for k, v in out.items() if k != "loss"})
        masked = images[:n] * (1 - self._mask_image(out["mask"][:n], images.shape[-1]))
        grid = reconstruction_grid([images[:n], masked, recon], self.mean, self.std)  # uint8 (H, W, 3)
        if self.image_dir is not None:
            save_png(grid, self.image_dir / f"reconstructions_step{self.global_step:07d}.png")
        for lg in self.loggers:
            if hasattr(lg, "log_image"):  # W&B
                lg.log_image("train/reconstructions", [grid], step=self.global_step)
            elif hasattr(getattr(lg, "experiment", None), "add_image"):  # TensorBoard
                lg.experiment.add_image("train/reconstructions", grid, self.global_step, dataformats="HWC")

    def _mask_image(self, mask: torch.Tensor, size: int) -> torch.Tensor:
        """(B, N) patch mask -> (B, 1, H, W) pixel mask."""
        p = self.model.patch_size
        g = size // p
        return mask.view(-1, 1, g, g).repeat_interleave(p, 2).repeat_interleave(p, 3)
