"""AdamW parameter groups with the usual weight-decay exclusions."""

from __future__ import annotations

from torch import nn


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
