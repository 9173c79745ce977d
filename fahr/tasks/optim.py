"""The optimiser every task uses: AdamW over parameter groups, warmup + cosine per optimiser step."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from fahr.tasks.schedules import warmup_cosine


def param_groups(model: nn.Module, weight_decay: float, no_decay_names: set[str] = frozenset()) -> list[dict]:
    """Two groups: decayed weights, and undecayed biases / norm scales (ndim <= 1) / named parameters
    (position embeddings, class and mask tokens). Frozen parameters are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in no_decay_names else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def adamw_warmup_cosine(groups: list[dict], peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float,
                        betas: Sequence[float] = (0.9, 0.999)) -> dict[str, Any]:
    """What a task's ``configure_optimizers`` returns: AdamW over ``groups`` (a group's optional
    ``lr_scale`` makes its LR ``peak_lr x lr_scale``: layer-wise decay) and an LR schedule stepped every
    optimiser step: linear warmup over ``warmup_steps``, half-cosine down to ``min_lr`` (capped at the
    peak) at ``total_steps``, as a multiplier of each group's own LR. A peak of 0 freezes the step."""
    for group in groups:
        group["lr"] = peak_lr * group.pop("lr_scale", 1.0)
    optimizer = torch.optim.AdamW(groups, lr=peak_lr, betas=tuple(betas))
    floor = min(1.0, min_lr / peak_lr) if peak_lr > 0 else 0.0
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, 1.0, warmup_steps, total_steps, min_lr=floor))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
