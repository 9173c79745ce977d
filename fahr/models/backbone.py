"""Backbone factory: timm VisionTransformer sized for 112x112 aligned face crops.

The returned module is a plain ``timm.models.vision_transformer.VisionTransformer`` with no head
(``num_classes=0``), so it keeps timm's backbone interface:

- ``forward_features(x)``: (B, 3, H, W) float -> (B, 1 + N, D) tokens (class token first),
- ``forward_head(tokens, pre_logits=True)`` / ``forward(x)``: (B, D) pooled pre-logits features,
- ``no_weight_decay()``: names of parameters excluded from weight decay,
- ``set_grad_checkpointing(True)``, ``reset_classifier(n)``.

N = (H / patch_size) * (W / patch_size): 49 tokens for patch 16 at 112 px, 196 for patch 8.

Architectures are named (:data:`VIT_SIZES`, what fahr pretrains) or ``arch: "vit_custom"`` with the
size stated (``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``): published models such as ViT-L/16
or ViT-H/14 imported with ``fahr import-weights``. Every backbone also has a LayerNorm ``norm_eps``
(timm's 1e-6 unless stated; transformers' ViTs use 1e-12) and ``qkv_bias``. :func:`backbone_args` is
the one place where such facts (from a model card or a config) become :func:`create_backbone` arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Mapping

import torch

from fahr.boundary import InputError

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer


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
#: ``arch`` of a ViT whose size is stated fact by fact (embed_dim, depth, num_heads, mlp_ratio)
CUSTOM_ARCH = "vit_custom"

#: 14 for published ViT-H/14 and ViT-L/14 weights
SUPPORTED_PATCH_SIZES = (8, 14, 16)
#: image sides a card may name (pixels); beyond, a typo would allocate gigabytes before anything fails
IMAGE_SIZE_RANGE = (16, 1024)
#: timm's ViT LayerNorm epsilon; transformers' ViT and ViTMAE default to 1e-12
DEFAULT_NORM_EPS = 1e-6
#: bounds of the size facts (ViT-H/14 is 1280 wide, 32 deep, 16 heads, mlp_ratio 4; ViT-g 1408 x 40)
SIZE_BOUNDS: dict[str, tuple[type, float, float]] = {
    "embed_dim": (int, 8, 8192),
    "depth": (int, 1, 128),
    "num_heads": (int, 1, 128),
    "mlp_ratio": (float, 0.25, 16.0),
}
NORM_EPS_RANGE = (1e-12, 1e-2)

# timm's names for the standard sizes: the factory named in a card's ``timm_architecture``
_TIMM_SIZE_NAMES = {(192, 12, 3): "tiny", (384, 12, 6): "small", (768, 12, 12): "base", (1024, 24, 16): "large",
                    (1280, 32, 16): "huge"}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def backbone_args(facts: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """Architecture facts (a model card's backbone section, or a model config) -> checked
    :func:`create_backbone` keyword arguments.

    Reads ``arch``, ``img_size``, ``patch_size``, ``global_pool`` and, when present, ``embed_dim``,
    ``depth``, ``num_heads``, ``mlp_ratio``, ``norm_eps``, ``qkv_bias``. A named ``arch`` fixes the
    size: stated size facts must agree with it (cards written before 2026-12 state embed_dim, depth and
    num_heads; none states mlp_ratio, norm_eps or qkv_bias, which then keep timm's defaults, as
    those cards were trained with). ``arch: "vit_custom"`` needs embed_dim, depth and num_heads
    (mlp_ratio defaults to 4). Other keys are ignored.

    Raises:
        InputError: a missing, mistyped, out-of-range or contradicting fact, as ``<where><key> must
            be <expected>`` (``where``: e.g. ``"model_card.json: backbone."``).
    """

    def error(key: str, expected: str) -> InputError:
        return InputError(f"{where}{key} must be {expected}")

    arch = facts.get("arch")
    if arch not in VIT_SIZES and arch != CUSTOM_ARCH:
        raise error("arch", f"one of {sorted(VIT_SIZES) + [CUSTOM_ARCH]}")
    patch = facts.get("patch_size")
    if patch not in SUPPORTED_PATCH_SIZES or isinstance(patch, bool):
        raise error("patch_size", f"one of {list(SUPPORTED_PATCH_SIZES)}")
    size = facts.get("img_size")
    lo, hi = IMAGE_SIZE_RANGE
    if not isinstance(size, int) or isinstance(size, bool) or not lo <= size <= hi or size % patch:
        raise error("img_size", f"an integer in [{lo}, {hi}] divisible by the patch size")
    pool = facts.get("global_pool", "token")
    if pool not in ("token", "avg"):
        raise error("global_pool", "'token' or 'avg'")
    args: dict[str, Any] = {"arch": arch, "img_size": size, "patch_size": patch, "global_pool": pool}
    named = VIT_SIZES.get(arch)
    for key, (kind, low, high) in SIZE_BOUNDS.items():
        value = facts.get(key)
        if value is None:
            if named is None and key != "mlp_ratio":
                raise error(key, f"stated for arch {CUSTOM_ARCH} (an integer in [{low}, {high}])")
            continue
        typed = isinstance(value, int) if kind is int else _number(value)
        if isinstance(value, bool) or not typed or not low <= value <= high:
            raise error(key, f"{'an integer' if kind is int else 'a number'} in [{low:g}, {high:g}]")
        if named is not None and value != getattr(named, key):
            raise error(key, f"{getattr(named, key)} for arch {arch} (or give arch {CUSTOM_ARCH} with the sizes)")
        if named is None:
            args[key] = kind(value)
    if named is None and args["embed_dim"] % args["num_heads"]:
        raise error("num_heads", f"a divisor of embed_dim {args['embed_dim']}")
    width = args["embed_dim"] * args.get("mlp_ratio", 4.0) if named is None else 0.0
    if int(width) != width:  # timm builds int(embed_dim * mlp_ratio) hidden units
        raise error("mlp_ratio", f"a ratio that gives a whole MLP width for embed_dim {args['embed_dim']}")
    eps = facts.get("norm_eps")
    if eps is not None:
        if not _number(eps) or not NORM_EPS_RANGE[0] <= eps <= NORM_EPS_RANGE[1]:
            raise error("norm_eps", f"a number in [{NORM_EPS_RANGE[0]:g}, {NORM_EPS_RANGE[1]:g}] (LayerNorm epsilon)")
        args["norm_eps"] = float(eps)
    qkv_bias = facts.get("qkv_bias")
    if qkv_bias is not None:
        if not isinstance(qkv_bias, bool):
            raise error("qkv_bias", "true or false")
        args["qkv_bias"] = qkv_bias
    return args


def resolved_facts(args: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`backbone_args` output with every size fact filled in (from the named ``arch`` or the
    defaults: mlp_ratio 4, norm_eps 1e-6, qkv_bias true): what the built network has."""
    size = VIT_SIZES.get(args["arch"]) or VitSize(args["embed_dim"], args["depth"], args["num_heads"],
                                                  args.get("mlp_ratio", 4.0))
    return {**args, "embed_dim": size.embed_dim, "depth": size.depth, "num_heads": size.num_heads,
            "mlp_ratio": float(size.mlp_ratio), "norm_eps": args.get("norm_eps", DEFAULT_NORM_EPS),
            "qkv_bias": args.get("qkv_bias", True)}


def create_backbone(
    arch: str = "vit_tiny",
    img_size: int = 112,
    patch_size: int = 16,
    drop_path_rate: float = 0.0,
    global_pool: str = "token",
    grad_checkpointing: bool = False,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    mlp_ratio: float | None = None,
    norm_eps: float | None = None,
    qkv_bias: bool | None = None,
    init_weights: bool = True,
) -> VisionTransformer:
    """Build a headless ViT.

    Args:
        arch: one of ``VIT_SIZES``, or ``"vit_custom"`` with ``embed_dim``, ``depth``, ``num_heads``
            (and optionally ``mlp_ratio``, default 4).
        img_size: square input side in pixels; must be a multiple of ``patch_size``.
        patch_size: 8, 14 or 16.
        drop_path_rate: stochastic depth rate (0 for MAE pretraining, ~0.1 for fine-tuning).
        global_pool: ``"token"`` (class token) or ``"avg"`` (mean of patch tokens) for pre-logits.
        grad_checkpointing: recompute block activations in backward to save memory.
        embed_dim, depth, num_heads, mlp_ratio: the size; for a named ``arch`` None or its own values.
        norm_eps: epsilon of every LayerNorm (None: timm's 1e-6).
        qkv_bias: biases on the query, key and value projections (None: True, as timm and MAE).
        init_weights: False skips timm's weight initialisation (truncated normals over every tensor,
            ~0.6 s for a ViT-B on one core) for a model whose every tensor is loaded right after.

    The position embedding is initialised with fixed 2D sin-cos values (as in MAE) and stays learnable.
    """
    if arch not in VIT_SIZES and arch != CUSTOM_ARCH:
        raise InputError(f"unknown backbone arch {arch!r}; choose one of {sorted(VIT_SIZES) + [CUSTOM_ARCH]}")
    if patch_size not in SUPPORTED_PATCH_SIZES:
        raise InputError(f"patch_size must be one of {SUPPORTED_PATCH_SIZES}, got {patch_size}")
    if img_size % patch_size:
        raise InputError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    facts = {"arch": arch, "img_size": img_size, "patch_size": patch_size, "global_pool": global_pool,
             "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, "mlp_ratio": mlp_ratio,
             "norm_eps": norm_eps, "qkv_bias": qkv_bias}
    full = resolved_facts(backbone_args(facts))
    # timm (and, through it, torchvision) is imported where a model is built, not with this module:
    # reading and checking cards stays light (predict's ONNX path never builds one)
    from timm.layers import LayerNorm
    from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        num_classes=0,
        global_pool=global_pool,
        embed_dim=full["embed_dim"],
        depth=full["depth"],
        num_heads=full["num_heads"],
        mlp_ratio=full["mlp_ratio"],
        qkv_bias=full["qkv_bias"],
        norm_layer=partial(LayerNorm, eps=full["norm_eps"]),
        drop_path_rate=drop_path_rate,
        weight_init="" if init_weights else "skip",
    )
    grid = model.patch_embed.grid_size
    with torch.no_grad():
        sincos = build_sincos2d_pos_embed(list(grid), dim=full["embed_dim"])  # (N, D)
        model.pos_embed[:, 1:].copy_(sincos.unsqueeze(0))
        model.pos_embed[:, :1].zero_()
    model.set_grad_checkpointing(grad_checkpointing)
    return model


def backbone_config(model: VisionTransformer) -> dict[str, Any]:
    """The architecture facts needed to rebuild ``model`` (written to the model card), and how timm
    rebuilds it (:func:`timm_facts`).

    ``arch`` is the name of the size in :data:`VIT_SIZES` that ``model`` has, else ``"vit_custom"``.
    """
    block = model.blocks[0]
    facts: dict[str, Any] = {
        "img_size": int(model.patch_embed.img_size[0]),
        "patch_size": int(model.patch_embed.patch_size[0]),
        "embed_dim": int(model.embed_dim),
        "depth": len(model.blocks),
        "num_heads": int(block.attn.num_heads),
        "mlp_ratio": block.mlp.fc1.out_features / model.embed_dim,
        "norm_eps": float(block.norm1.eps),
        "qkv_bias": block.attn.qkv.bias is not None,
        "global_pool": model.global_pool,
    }
    size = VitSize(facts["embed_dim"], facts["depth"], facts["num_heads"], facts["mlp_ratio"])
    arch = next((name for name, s in VIT_SIZES.items() if s == size), CUSTOM_ARCH)
    return {"arch": arch, **facts, **timm_facts(facts)}


def timm_facts(facts: Mapping[str, Any]) -> dict[str, Any]:
    """How plain timm rebuilds a backbone with these facts (card keys ``timm_architecture`` and
    ``timm_kwargs``), or why it cannot (``timm_note``):

        timm.create_model(card["timm_architecture"], pretrained=True, num_classes=0,
                          pretrained_cfg_overlay=dict(file="<export>/model.safetensors"), **card["timm_kwargs"])

    JSON arguments cannot set timm's LayerNorm epsilon (it takes a ``norm_layer`` callable), so a
    backbone with another ``norm_eps`` than timm's 1e-6 gets a note instead of arguments that would
    build a slightly different network.
    """
    eps = facts.get("norm_eps", DEFAULT_NORM_EPS)
    if eps != DEFAULT_NORM_EPS:
        return {"timm_note": f"not loadable by timm.create_model from JSON arguments: the LayerNorm epsilon is "
                             f"{eps:g}, timm's ViT uses {DEFAULT_NORM_EPS:g} (pass norm_layer=functools.partial("
                             f"timm.layers.LayerNorm, eps={eps:g}) in Python, or use fahr.models.load_backbone)"}
    size = _TIMM_SIZE_NAMES.get((facts["embed_dim"], facts["depth"], facts["num_heads"]), "base")
    name = f"vit_{size}_patch{facts['patch_size']}_224"
    try:
        import timm

        if not timm.is_model(name):
            name = f"vit_{size}_patch16_224" if timm.is_model(f"vit_{size}_patch16_224") else "vit_base_patch16_224"
    except ImportError:  # pragma: no cover - timm is a dependency of fahr
        pass
    kwargs = {"img_size": facts["img_size"], "patch_size": facts["patch_size"], "embed_dim": facts["embed_dim"],
              "depth": facts["depth"], "num_heads": facts["num_heads"], "mlp_ratio": facts["mlp_ratio"],
              "qkv_bias": facts["qkv_bias"], "global_pool": facts["global_pool"]}
    return {"timm_architecture": name, "timm_kwargs": kwargs}
