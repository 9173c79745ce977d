"""Backbone factory: timm VisionTransformer sized for 112x112 aligned face crops.

The returned module is a plain ``timm.models.vision_transformer.VisionTransformer`` with no head
(``num_classes=0``), so it keeps timm's backbone interface:

- ``forward_features(x)``: (B, 3, H, W) float -> (B, 1 + N, D) tokens (class token first),
- ``forward_head(tokens, pre_logits=True)`` / ``forward(x)``: (B, D) pooled pre-logits features,
- ``no_weight_decay()``: names of parameters excluded from weight decay,
- ``set_grad_checkpointing(True)``, ``reset_classifier(n)``.

N = (H / patch_size) * (W / patch_size): 49 tokens for patch 16 at 112 px, 196 for patch 8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import VisionTransformer

from fahr.boundary import InputError


@dataclass(frozen=True)
class VitSize:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0


#: Architectures by name. ``vit_test`` exists so tests and CI run in seconds on a CPU.
VIT_SIZES: dict[str, VitSize] = {
    "vit_test": VitSize(embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0),
    "vit_tiny": VitSize(embed_dim=192, depth=12, num_heads=3),
    "vit_small": VitSize(embed_dim=384, depth=12, num_heads=6),
    "vit_base": VitSize(embed_dim=768, depth=12, num_heads=12),
}

SUPPORTED_PATCH_SIZES = (8, 16)


def create_backbone(
    arch: str = "vit_tiny",
    img_size: int = 112,
    patch_size: int = 16,
    drop_path_rate: float = 0.0,
    global_pool: str = "token",
    grad_checkpointing: bool = False,
) -> VisionTransformer:
    """Build a headless ViT.

    Args:
        arch: one of ``VIT_SIZES``.
        img_size: square input side in pixels; must be a multiple of ``patch_size``.
        patch_size: 8 or 16.
        drop_path_rate: stochastic depth rate (0 for MAE pretraining, ~0.1 for fine-tuning).
        global_pool: ``"token"`` (class token) or ``"avg"`` (mean of patch tokens) for pre-logits.
        grad_checkpointing: recompute block activations in backward to save memory.

    The position embedding is initialised with fixed 2D sin-cos values (as in MAE) and stays learnable.
    """
    if arch not in VIT_SIZES:
        raise InputError(f"unknown backbone arch {arch!r}; choose one of {sorted(VIT_SIZES)}")
    if patch_size not in SUPPORTED_PATCH_SIZES:
        raise InputError(f"patch_size must be one of {SUPPORTED_PATCH_SIZES}, got {patch_size}")
    if img_size % patch_size:
        raise InputError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    size = VIT_SIZES[arch]
    model = VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        num_classes=0,
        global_pool=global_pool,
        embed_dim=size.embed_dim,
        depth=size.depth,
        num_heads=size.num_heads,
        mlp_ratio=size.mlp_ratio,
        drop_path_rate=drop_path_rate,
    )
    grid = model.patch_embed.grid_size
    with torch.no_grad():
        sincos = build_sincos2d_pos_embed(list(grid), dim=size.embed_dim)  # (N, D)
        model.pos_embed[:, 1:].copy_(sincos.unsqueeze(0))
        model.pos_embed[:, :1].zero_()
    model.set_grad_checkpointing(grad_checkpointing)
    return model


def backbone_config(model: VisionTransformer) -> dict:
    """The architecture facts needed to rebuild ``model`` (written to the model card)."""
    arch = next(
        (name for name, s in VIT_SIZES.items()
         if s.embed_dim == model.embed_dim and s.depth == len(model.blocks)
         and s.num_heads == model.blocks[0].attn.num_heads),
        None,
    )
    if arch is None:
        raise InputError("model does not match any fahr backbone size")
    return {
        "arch": arch,
        "img_size": int(model.patch_embed.img_size[0]),
        "patch_size": int(model.patch_embed.patch_size[0]),
        "embed_dim": int(model.embed_dim),
        "depth": len(model.blocks),
        "num_heads": int(model.blocks[0].attn.num_heads),
        "global_pool": model.global_pool,
    }
