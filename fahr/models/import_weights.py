"""Published ViT / MAE weights -> a fahr backbone export (``fahr-backbone/1``), without network.

Three source formats, each read without executing anything from the file:

- ``hf``: a transformers directory (``config.json`` + ``model.safetensors``) of ``ViTMAEModel``,
  ``ViTMAEForPreTraining`` (encoder and decoder), ``ViTModel`` or ``ViTForImageClassification``. Both
  key layouts are read: transformers 4.x (``encoder.layer.N.attention.attention.query``; also what
  ``save_pretrained`` of 5.x writes) and 5.x's module names (``layers.N.attention.q_proj``, ``mlp.fc1``).
  Normalisation comes from ``preprocessor_config.json`` (``image_mean``, ``image_std``).
- ``mae``: a checkpoint of facebookresearch/mae (``mae_pretrain_vit_base.pth``: ``{"model": state}``),
  loaded with ``torch.load(weights_only=True)``; timm-style encoder keys plus, where saved, the decoder
  (``decoder_embed``, ``mask_token``, ``decoder_pos_embed``, ``decoder_blocks.N``, ``decoder_norm``,
  ``decoder_pred``). The file holds no config: sizes come from tensor shapes, the head counts from
  MAE's published sizes (or ``num_heads`` / ``decoder_num_heads``), LayerNorm epsilon 1e-6 and
  ImageNet normalisation from MAE's code (``models_mae.py``, ``main_pretrain.py``).
- ``timm``: a timm ViT checkpoint (``model.safetensors``, with timm's hub ``config.json`` naming the
  ``architecture`` and its ``pretrained_cfg``; or a bare file and ``architecture``). timm itself rebuilds
  the named model to read its facts, and the import checks that fahr's backbone computes the same
  features as timm's model with the same tensors.

Every numeric detail the source states is carried (sizes, LayerNorm epsilon, qkv bias, patch and
image size, normalisation, pooling). What fahr cannot represent is an :class:`InputError` naming it:
an unknown model type, non-square patches, another activation, tensors without a place (listed; a
source's extra parts such as a classifier ``head`` or a ``pooler`` are left out only when named in
``drop``, and the card lists them).

The MAE decoder, where the source has one, is written into the export (``mae_decoder.safetensors``,
facts in the card's ``decoder`` section), so ``fahr pretrain task.init_from=EXPORT`` continues
pretraining from it; ``model.safetensors`` stays the backbone alone, loadable by plain timm.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from fahr.boundary import (
    FileRefused, InputError, check_regular_file, file_sha256, printable_path, read_json_file, read_text_file,
)
from fahr.models.backbone import CUSTOM_ARCH, backbone_args, create_backbone
from fahr.models.mae import MAEDecoder, mae_sincos_pos_embed
from fahr.models.weights import (
    CARD_FILE,
    CARD_FORMAT,
    MAX_WEIGHTS_BYTES,
    check_card,
    fit_pos_embed,
    load_state_dict_checked,
    model_card,
    read_safetensors,
    save_backbone,
)

SOURCES = ("hf", "mae", "timm")
#: ImageNet statistics of [0, 1] RGB, what MAE (and most timm ViTs) normalise with
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
#: facebookresearch/mae's published sizes (models_mae.py): (embed_dim, depth) -> heads; decoder (dim, depth) -> heads
MAE_ENCODER_HEADS = {(768, 12): 12, (1024, 24): 16, (1280, 32): 16}
MAE_DECODER_HEADS = {(512, 8): 16}
#: LayerNorm epsilon of every norm in models_mae.py (``partial(nn.LayerNorm, eps=1e-6)``)
MAE_NORM_EPS = 1e-6
#: the largest difference of features allowed between fahr's rebuild and timm's own model (fp32)
TIMM_PARITY_TOLERANCE = 1e-4


@dataclass
class Converted:
    """A source read into fahr's names.

    ``encoder``: timm ``VisionTransformer`` tensors; ``arch``: facts for
    :func:`fahr.models.backbone.backbone_args`; ``decoder`` / ``decoder_facts``: an
    :class:`~fahr.models.mae.MAEDecoder`'s tensors and card facts, or None; ``normalization``:
    ``{"mean", "std", "from"}`` or None when the source states none; ``source``: facts about the
    source for the card; ``conversion``: what was done (renamed, fused, dropped).
    """

    encoder: dict[str, torch.Tensor]
    arch: dict[str, Any]
    weights_file: Path
    decoder: dict[str, torch.Tensor] | None = None
    decoder_facts: dict[str, Any] | None = None
    normalization: dict[str, Any] | None = None
    source: dict[str, Any] = field(default_factory=dict)
    conversion: dict[str, Any] = field(default_factory=dict)


# ---- reading files ---------------------------------------------------------------------------------


def read_torch_weights(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` after checking ``path`` is a regular file of bounded
    size: tensors, numbers, strings, containers and ``argparse.Namespace`` only; a pickle that would
    import or call anything else (code) is refused by torch's restricted unpickler before it runs.

    Raises:
        InputError: missing, not a regular file, too large, or refused / unreadable by the restricted
            loader (naming the first disallowed global when torch reports one).
    """
    try:
        check_regular_file(path, MAX_WEIGHTS_BYTES)
    except FileRefused as err:
        raise InputError(f"{printable_path(path)}: {err.detail}") from None
    try:
        # MAE's training checkpoints also store their argparse arguments: a Namespace holds plain values
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle, zip and torch errors of a file we did not write
        # torch names the global it refused: "Unsupported global: GLOBAL x.y" or "unsupported GLOBAL x.y whose ..."
        found = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", str(err), re.I)
        what = f"it refers to {found.group(1)}" if found else f"{type(err).__name__}"
        raise InputError(f"{printable_path(path)}: not a plain weights file (torch.load with weights_only=True "
                         f"refused it: {what}); fahr reads tensors only, never code from a checkpoint") from None


def _tensor_dict(value: Any, path: Path, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(value, dict) or not value or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()):
        raise InputError(f"{printable_path(path)}: {where} is not a dict of named tensors")
    for name, tensor in value.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InputError(f"{printable_path(path)}: tensor {name[:100]!r} holds NaN or infinite values")
    return {k: v.float() if v.is_floating_point() else v for k, v in value.items()}


def _unplaced(keys: list[str], path: Path, what: str) -> InputError:
    shown = ", ".join(k[:60] for k in sorted(keys)[:4]) + (", ..." if len(keys) > 4 else "")
    modules = sorted({re.sub(r"\.(weight|bias)$", "", k) for k in keys})
    named = ",".join(m[:60] for m in modules[:4]) + (",..." if len(modules) > 4 else "")
    return InputError(f"{printable_path(path)}: unexpected {len(keys)} tensor(s) that fahr's {what} has no place "
                      f"for ({shown}); to import without them, name them: drop=[{named}]")


def _split_dropped(state: dict[str, torch.Tensor], drop: list[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` without the keys under the ``drop`` prefixes, and the dropped key names."""
    prefixes = tuple(p.rstrip(".") + "." for p in drop)
    dropped = sorted(k for k in state if k.startswith(prefixes) or k in drop)
    return {k: v for k, v in state.items() if k not in set(dropped)}, dropped


def _check_unused_drop(drop: list[str], dropped: list[str], path: Path) -> None:
    unused = [p for p in drop if not any(k == p or k.startswith(p.rstrip(".") + ".") for k in dropped)]
    if unused:
        raise InputError(f"{printable_path(path)}: drop={unused} matches no tensor of the source; "
                         "name prefixes that the source has (e.g. head, pooler)")


def _block_count(keys: list[str], prefix: str, path: Path) -> int:
    """Number of blocks ``<prefix>N.`` (indices must be 0 .. N-1)."""
    found = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if found != set(range(len(found))):
        raise InputError(f"{printable_path(path)}: blocks {prefix}N are not numbered 0..{len(found) - 1}")
    return len(found)


def _square(value: Any, key: str, path: Path) -> int:
    """An int, or a list/tuple of two equal ints (transformers allows [h, w])."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"{printable_path(path)}: {key} must be one positive integer (square), got "
                         f"{str(value)[:40]}; fahr's ViT takes square images and patches")
    return value


def _mlp_ratio(hidden: int, dim: int, path: Path, key: str) -> float:
    ratio = hidden / dim
    if int(dim * ratio) != hidden:
        raise InputError(f"{printable_path(path)}: {key} {hidden} is not a whole multiple timm can build from "
                         f"width {dim} (int(width * mlp_ratio) differs)")
    return ratio


def _decoder_pos_check(table: torch.Tensor, grid: int, path: Path, key: str) -> None:
    """A decoder position table must be MAE's fixed sin-cos one: fahr computes it, never stores it."""
    dim = table.shape[-1]
    expected = torch.cat([torch.zeros(1, dim), mae_sincos_pos_embed(grid, dim)]).unsqueeze(0)
    if table.shape != expected.shape:
        raise InputError(f"{printable_path(path)}: {key} has shape {tuple(table.shape)}, expected "
                         f"{tuple(expected.shape)} for a {grid}x{grid} patch grid")
    diff = float((table.float() - expected).abs().max())
    if diff > 1e-5:
        raise InputError(f"{printable_path(path)}: {key} is not MAE's fixed sin-cos table (max difference {diff:.2g}); "
                         "fahr's decoder computes its positions and cannot hold learned ones")


# ---- facebookresearch/mae --------------------------------------------------------------------------


def read_mae(path: Path, drop: list[str], num_heads: int | None = None,
             decoder_num_heads: int | None = None) -> Converted:
    """A facebookresearch/mae checkpoint (``.pth``: ``{"model": state}``); see the module docstring."""
    if path.is_dir():
        raise InputError(f"{printable_path(path)}: is a directory; source=mae takes the .pth file "
                         "(e.g. mae_pretrain_vit_base.pth)")
    loaded = read_torch_weights(path)
    state = _tensor_dict(loaded.get("model") if isinstance(loaded, dict) and "model" in loaded else loaded,
                         path, "its 'model' entry" if isinstance(loaded, dict) and "model" in loaded else "the file")
    state, dropped = _split_dropped(state, drop)
    _check_unused_drop(drop, dropped, path)
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if key not in state:
            raise InputError(f"{printable_path(path)}: no tensor {key!r}: not a ViT checkpoint of facebookresearch/mae")
    dim = state["cls_token"].shape[-1]
    proj = state["patch_embed.proj.weight"]
    if proj.ndim != 4 or proj.shape[1] != 3 or proj.shape[2] != proj.shape[3]:
        raise InputError(f"{printable_path(path)}: patch_embed.proj.weight has shape {tuple(proj.shape)}; fahr needs "
                         "square patches of 3 channels")
    patch = proj.shape[-1]
    tokens = state["pos_embed"].shape[1] - 1
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise InputError(f"{printable_path(path)}: pos_embed holds {tokens} patch positions, not a square grid")
    keys = list(state)
    depth = _block_count(keys, "blocks.", path)
    if depth == 0 or "blocks.0.mlp.fc1.weight" not in state:
        raise InputError(f"{printable_path(path)}: no encoder blocks (blocks.0.mlp.fc1.weight)")
    heads = num_heads or MAE_ENCODER_HEADS.get((dim, depth))
    if heads is None:
        raise InputError(f"{printable_path(path)}: a .pth does not store the number of attention heads and width "
                         f"{dim} x {depth} blocks is none of MAE's published sizes: give num_heads=...")
    arch = {"arch": CUSTOM_ARCH, "img_size": grid * patch, "patch_size": patch, "embed_dim": dim, "depth": depth,
            "num_heads": heads, "mlp_ratio": _mlp_ratio(state["blocks.0.mlp.fc1.weight"].shape[0], dim, path,
                                                        "blocks.0.mlp.fc1 width"),
            "norm_eps": MAE_NORM_EPS, "qkv_bias": "blocks.0.attn.qkv.bias" in state,
            "global_pool": "avg" if "fc_norm.weight" in state else "token"}
    decoder_keys = [k for k in keys if k.startswith(("decoder_", "mask_token"))]
    encoder = {k: v for k, v in state.items() if k not in set(decoder_keys)}
    decoder = decoder_facts = None
    if decoder_keys:
        decoder, decoder_facts = _mae_decoder(state, decoder_keys, grid, path, decoder_num_heads)
    return Converted(
        encoder=encoder, arch=arch, weights_file=path, decoder=decoder, decoder_facts=decoder_facts,
        normalization={"mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                       "from": "ImageNet statistics, as facebookresearch/mae trains (the .pth states none)"},
        source={"format": "facebookresearch/mae checkpoint (.pth)", "file": path.name},
        conversion={"keys": "timm names as saved (models_mae.py); decoder_* renamed to fahr's MAEDecoder",
                    "num_heads": "given (num_heads=)" if num_heads else "MAE's published size",
                    "norm_eps": "1e-6, models_mae.py's LayerNorm", "dropped": dropped},
    )


def _mae_decoder(state: dict[str, torch.Tensor], keys: list[str], grid: int, path: Path,
                 decoder_num_heads: int | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    renames = {"decoder_embed.": "embed.", "decoder_blocks.": "blocks.", "decoder_norm.": "norm.",
               "decoder_pred.": "pred."}
    out: dict[str, torch.Tensor] = {}
    unplaced = []
    for key in keys:
        if key == "mask_token":
            out["mask_token"] = state[key]
        elif key == "decoder_pos_embed":
            continue
        else:
            prefix = next((p for p in renames if key.startswith(p)), None)
            if prefix is None:
                unplaced.append(key)
            else:
                out[renames[prefix] + key[len(prefix):]] = state[key]
    if unplaced:
        raise _unplaced(unplaced, path, "MAE decoder")
    for key in ("decoder_embed.weight", "decoder_pos_embed", "decoder_blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise InputError(f"{printable_path(path)}: the decoder has no tensor {key!r}")
    _decoder_pos_check(state["decoder_pos_embed"], grid, path, "decoder_pos_embed")
    dim = state["decoder_embed.weight"].shape[0]
    depth = _block_count(keys, "decoder_blocks.", path)
    heads = decoder_num_heads or MAE_DECODER_HEADS.get((dim, depth))
    if heads is None:
        raise InputError(f"{printable_path(path)}: the decoder ({dim} wide, {depth} blocks) is not MAE's published "
                         "one and a .pth does not store its attention heads: give decoder_num_heads=...")
    facts = {"dim": dim, "depth": depth, "num_heads": heads,
             "mlp_ratio": _mlp_ratio(state["decoder_blocks.0.mlp.fc1.weight"].shape[0], dim, path,
                                     "decoder_blocks.0.mlp.fc1 width"),
             "norm_eps": MAE_NORM_EPS, "qkv_bias": "decoder_blocks.0.attn.qkv.bias" in state, "pos_embed": "mae",
             "norm_pix_loss": None, "mask_ratio": None}
    return out, facts


# ---- transformers ----------------------------------------------------------------------------------

#: transformers layer parts (4.x name, 5.x name) -> timm Block names; q/k/v are fused into attn.qkv
_HF_LAYER_PARTS = {
    "attention.attention.query.": "attn.q.", "attention.q_proj.": "attn.q.",
    "attention.attention.key.": "attn.k.", "attention.k_proj.": "attn.k.",
    "attention.attention.value.": "attn.v.", "attention.v_proj.": "attn.v.",
    "attention.output.dense.": "attn.proj.", "attention.o_proj.": "attn.proj.",
    "intermediate.dense.": "mlp.fc1.", "mlp.fc1.": "mlp.fc1.",
    "output.dense.": "mlp.fc2.", "mlp.fc2.": "mlp.fc2.",
    "layernorm_before.": "norm1.", "layernorm_after.": "norm2.",
}
# 4.x: encoder.layer.N / decoder.decoder_layers.N; 5.x in memory: layers.N / decoder.decoder_layers.N;
# 5.x save_pretrained: encoder.layer.N / decoder.decoder_encoder.layer.N (its renaming of layers. -> encoder.layer.)
_HF_ENCODER_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.*)$")
_HF_DECODER_LAYER = re.compile(r"^decoder\.(?:decoder_layers|decoder_encoder\.layer)\.(\d+)\.(.*)$")
_HF_ENCODER_TOP = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
                   "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
                   "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
                   "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
_HF_DECODER_TOP = {"decoder.decoder_embed.weight": "embed.weight", "decoder.decoder_embed.bias": "embed.bias",
                   "decoder.mask_token": "mask_token", "decoder.decoder_norm.weight": "norm.weight",
                   "decoder.decoder_norm.bias": "norm.bias", "decoder.decoder_pred.weight": "pred.weight",
                   "decoder.decoder_pred.bias": "pred.bias"}
HF_MODEL_TYPES = ("vit_mae", "vit")


def _hf_layer_key(rest: str) -> str | None:
    part = next((p for p in _HF_LAYER_PARTS if rest.startswith(p)), None)
    return None if part is None else _HF_LAYER_PARTS[part] + rest[len(part):]


def _fuse_qkv(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """``blocks.N.attn.{q,k,v}.{weight,bias}`` -> ``blocks.N.attn.qkv.{weight,bias}`` (rows q, k, v, as timm)."""
    out = {k: v for k, v in state.items() if not re.search(r"\.attn\.[qkv]\.", k)}
    prefixes = sorted({k.split(".attn.")[0] for k in state if re.search(r"\.attn\.[qkv]\.", k)})
    for prefix in prefixes:
        for kind in ("weight", "bias"):
            parts = [state.get(f"{prefix}.attn.{x}.{kind}") for x in "qkv"]
            if all(p is None for p in parts):
                continue
            if any(p is None for p in parts):
                raise InputError(f"{printable_path(path)}: {prefix}: query, key and value {kind}s are not all there")
            out[f"{prefix}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    return out


def read_hf(folder: Path, drop: list[str]) -> Converted:
    """A transformers ViTMAE / ViT directory; see the module docstring."""
    if not folder.is_dir():
        raise InputError(f"{printable_path(folder)}: not a directory; source=hf takes a transformers model directory "
                         "(config.json + model.safetensors), e.g. from `huggingface-cli download ... --local-dir`")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InputError(f"{printable_path(folder)}: no config.json: not a transformers model directory")
    config = read_json_file(config_path, "transformers config", 4 * 1024 * 1024)
    if not isinstance(config, dict):
        raise InputError(f"{printable_path(config_path)}: must be a JSON object")
    model_type = config.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise InputError(f"{printable_path(config_path)}: model_type {str(model_type)[:40]!r} is not supported; fahr "
                         f"imports {' and '.join(HF_MODEL_TYPES)} (a plain ViT encoder)")
    if (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").is_file():
        raise InputError(f"{printable_path(folder)}: sharded weights (model.safetensors.index.json) are not supported; "
                         "save the model as one file (save_pretrained(..., max_shard_size='100GB'))")
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise InputError(f"{printable_path(folder)}: no model.safetensors (fahr reads transformers weights in the "
                         "safetensors format only)")
    state = read_safetensors(weights, hint="fetch the model again")

    def fact(key: str, kind: type, default: Any = None) -> Any:
        """config[key] (or ``default``) checked to be a bool, a positive int or a finite number."""
        value = config.get(key, default)
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok:
            expected = {bool: "true or false", int: "a positive integer", float: "a finite number"}[kind]
            raise InputError(f"{printable_path(config_path)}: {key} must be {expected}, got {str(value)[:40]}")
        return value

    if fact("num_channels", int, 3) != 3:
        raise InputError(f"{printable_path(config_path)}: num_channels is {config['num_channels']}; fahr's ViT "
                         "takes RGB (3)")
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise InputError(f"{printable_path(config_path)}: hidden_act {str(act)[:30]!r} is not supported; fahr's ViT "
                         "(timm) uses the exact GELU, transformers' 'gelu'")
    patch = _square(config.get("patch_size", 16), "patch_size", config_path)
    size = _square(config.get("image_size", 224), "image_size", config_path)
    dim, depth = fact("hidden_size", int), fact("num_hidden_layers", int)
    arch = {"arch": CUSTOM_ARCH, "img_size": size, "patch_size": patch, "embed_dim": dim, "depth": depth,
            "num_heads": fact("num_attention_heads", int),
            "mlp_ratio": _mlp_ratio(fact("intermediate_size", int), dim, config_path, "intermediate_size"),
            "norm_eps": float(fact("layer_norm_eps", float, 1e-12)), "qkv_bias": fact("qkv_bias", bool, True),
            "global_pool": "token"}

    state, dropped = _split_dropped(state, drop)
    _check_unused_drop(drop, dropped, weights)
    encoder: dict[str, torch.Tensor] = {}
    decoder: dict[str, torch.Tensor] = {}
    unplaced, layouts = [], set()
    decoder_pos = None
    for source_key, value in state.items():
        # ViTMAEForPreTraining / ViTForImageClassification hold the encoder in .vit
        key = source_key[4:] if source_key.startswith("vit.") else source_key
        if key in _HF_ENCODER_TOP:
            encoder[_HF_ENCODER_TOP[key]] = value
        elif key in _HF_DECODER_TOP:
            decoder[_HF_DECODER_TOP[key]] = value
        elif key == "decoder.decoder_pos_embed":
            decoder_pos = value
        elif (m := _HF_ENCODER_LAYER.match(key)) and (name := _hf_layer_key(m.group(2))):
            encoder[f"blocks.{m.group(1)}.{name}"] = value
            layouts.add("4.x" if key.startswith("encoder.layer.") else "5.x")
        elif (m := _HF_DECODER_LAYER.match(key)) and (name := _hf_layer_key(m.group(2))):
            decoder[f"blocks.{m.group(1)}.{name}"] = value
        else:
            unplaced.append(source_key)
    if unplaced:
        raise _unplaced(unplaced, weights, "ViT encoder and MAE decoder")
    encoder = _fuse_qkv(encoder, weights)
    decoder_facts = None
    if decoder or decoder_pos is not None:
        if model_type != "vit_mae":
            raise InputError(f"{printable_path(weights)}: decoder tensors in a model_type {model_type!r} checkpoint")
        if decoder_pos is None:
            raise InputError(f"{printable_path(weights)}: the decoder has no decoder.decoder_pos_embed")
        _decoder_pos_check(decoder_pos, size // patch, weights, "decoder.decoder_pos_embed")
        decoder = _fuse_qkv(decoder, weights)
        ddim = fact("decoder_hidden_size", int)
        decoder_facts = {"dim": ddim, "depth": fact("decoder_num_hidden_layers", int),
                         "num_heads": fact("decoder_num_attention_heads", int),
                         "mlp_ratio": _mlp_ratio(fact("decoder_intermediate_size", int), ddim, config_path,
                                                 "decoder_intermediate_size"),
                         "norm_eps": arch["norm_eps"], "qkv_bias": arch["qkv_bias"], "pos_embed": "mae",
                         "norm_pix_loss": fact("norm_pix_loss", bool, False),
                         "mask_ratio": float(fact("mask_ratio", float, 0.75))}
    architectures = config.get("architectures")
    return Converted(
        encoder=encoder, arch=arch, weights_file=weights, decoder=decoder or None, decoder_facts=decoder_facts,
        normalization=_hf_normalization(folder),
        source={"format": "transformers", "model_type": model_type,
                "architectures": [str(a)[:60] for a in architectures][:4] if isinstance(architectures, list) else None,
                "transformers_version": str(config.get("transformers_version", ""))[:20] or None,
                "file": f"{folder.name}/model.safetensors"},
        conversion={"keys": f"transformers {' and '.join(sorted(layouts)) or '?'} layout -> timm names; query, key "
                            "and value fused into attn.qkv", "dropped": dropped},
    )


def _hf_normalization(folder: Path) -> dict[str, Any] | None:
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None
    prep = read_json_file(path, "transformers preprocessor config", 1024 * 1024)
    if not isinstance(prep, dict):
        raise InputError(f"{printable_path(path)}: must be a JSON object")
    if prep.get("do_normalize") is False:
        return {"mean": [0.0] * 3, "std": [1.0] * 3, "from": "preprocessor_config.json (do_normalize: false)"}
    mean, std = prep.get("image_mean"), prep.get("image_std")
    if mean is None and std is None:
        return None
    return {"mean": mean, "std": std, "from": "preprocessor_config.json (image_mean, image_std)"}


def _hf_license(folder: Path) -> str | None:
    """``license:`` of the model card's YAML front matter (README.md), as the hub shows it."""
    path = folder / "README.md"
    if not path.is_file():
        return None
    text = read_text_file(path, "model card", 4 * 1024 * 1024)
    if not text.startswith("---"):
        return None
    front = text[3:].split("\n---", 1)[0]
    found = re.search(r"^license:\s*(\S.*?)\s*$", front, re.M)
    return found.group(1).strip("'\"")[:100] if found else None


# ---- timm ------------------------------------------------------------------------------------------


def read_timm(path: Path, drop: list[str], architecture: str | None = None) -> tuple[Converted, torch.nn.Module]:
    """A timm ViT checkpoint; see the module docstring. Returns the conversion and timm's own model
    holding the same tensors (for :func:`import_weights`'s parity check)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    config: dict[str, Any] = {}
    config_path = (path if path.is_dir() else path.parent) / "config.json"
    weights = path / "model.safetensors" if path.is_dir() else path
    if architecture is None and config_path.is_file():  # timm's hub layout: config.json beside the weights
        config = read_json_file(config_path, "timm config", 4 * 1024 * 1024)
        if not isinstance(config, dict):
            raise InputError(f"{printable_path(config_path)}: must be a JSON object")
    name = architecture or config.get("architecture")
    if not isinstance(name, str) or not name:
        raise InputError(f"{printable_path(path)}: no timm config.json with an architecture: give architecture=<timm "
                         "model name> (e.g. vit_base_patch16_224)")
    base = name.split(".")[0]
    if not timm.is_model(base):
        raise InputError(f"timm has no model named {name[:80]!r} (timm {timm.__version__})")
    model_args = config.get("model_args", {})
    if not isinstance(model_args, dict):
        raise InputError(f"{printable_path(config_path)}: model_args must be an object")
    state = read_safetensors(weights, hint="fetch the model again")
    state, dropped = _split_dropped(state, drop)
    _check_unused_drop(drop, dropped, weights)
    try:
        reference = timm.create_model(base, pretrained=False, num_classes=0, **model_args)
    except Exception as err:  # noqa: BLE001 - timm's errors for arguments of a file we did not write
        raise InputError(f"timm cannot build {base!r} with the config's model_args ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:120] if str(err) else ''})") from None
    if type(reference) is not VisionTransformer:
        raise InputError(f"timm model {base!r} is a {type(reference).__name__}, not the plain VisionTransformer fahr "
                         "builds")
    arch = _timm_facts(reference, base)
    cfg = config.get("pretrained_cfg") if isinstance(config.get("pretrained_cfg"), dict) else {}
    normalization = None
    if cfg.get("mean") is not None or cfg.get("std") is not None:
        normalization = {"mean": cfg.get("mean"), "std": cfg.get("std"), "from": "config.json pretrained_cfg"}
    else:
        default = timm.models.get_pretrained_cfg(name) or timm.models.get_pretrained_cfg(base)
        if default is not None and default.mean is not None:
            normalization = {"mean": list(default.mean), "std": list(default.std),
                             "from": f"timm's pretrained_cfg of {default.architecture}.{default.tag} (no config.json)"}
    license_ = cfg.get("license")
    unplaced = sorted(set(state) - set(reference.state_dict()))
    if unplaced:
        raise _unplaced(unplaced, weights, f"backbone (timm's {base} without a classifier)")
    load_state_dict_checked(reference, state, weights, against=f"timm's {base}")
    converted = Converted(
        encoder=state, arch=arch, weights_file=weights, normalization=normalization,
        source={"format": "timm", "architecture": name[:80], "timm_version": timm.__version__,
                "file": weights.name, "license": str(license_)[:100] if license_ else None},
        conversion={"keys": "timm names (unchanged)", "dropped": dropped,
                    "check": f"features equal timm's own {base} with the same tensors"},
    )
    return converted, reference.eval()


def _timm_facts(model: torch.nn.Module, name: str) -> dict[str, Any]:
    """The facts of a timm VisionTransformer, or an InputError naming the first one fahr cannot hold."""
    from timm.layers import Mlp

    def refuse(what: str) -> InputError:
        return InputError(f"timm model {name!r}: {what}, which fahr's ViT cannot represent")

    pe = model.patch_embed
    if tuple(pe.patch_size)[0] != tuple(pe.patch_size)[1] or tuple(pe.img_size)[0] != tuple(pe.img_size)[1]:
        raise refuse(f"non-square patches or images ({tuple(pe.patch_size)}, {tuple(pe.img_size)})")
    if not getattr(model, "has_class_token", True) or getattr(model, "num_reg_tokens", 0) or model.no_embed_class:
        raise refuse("no class token, register tokens or position embeddings without the class token")
    if model.pos_embed is None or not isinstance(model.norm_pre, torch.nn.Identity):
        raise refuse("no absolute position embedding or a pre-norm (CLIP style)")
    if model.global_pool not in ("token", "avg") or getattr(model, "attn_pool", None) is not None:
        raise refuse(f"global_pool {model.global_pool!r}")
    if not isinstance(pe.norm, torch.nn.Identity) or pe.proj.bias is None:
        raise refuse("a normalised or bias-free patch embedding")
    block = model.blocks[0]
    if not all(isinstance(getattr(block, m), torch.nn.Identity) for m in ("ls1", "ls2")):
        raise refuse("layer scale (init_values)")
    if not isinstance(block.attn.q_norm, torch.nn.Identity) or not isinstance(block.mlp, Mlp) or not isinstance(
            block.mlp.act, torch.nn.GELU) or getattr(block.mlp.act, "approximate", "none") != "none":
        raise refuse("qk-norm or an MLP other than Linear-GELU-Linear")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    eps = {float(m.eps) for m in norms}
    if len(eps) != 1 or len(norms) != 2 * len(model.blocks) + 1:
        raise refuse("LayerNorms with differing epsilons or in other places")
    return {"arch": CUSTOM_ARCH, "img_size": int(pe.img_size[0]), "patch_size": int(pe.patch_size[0]),
            "embed_dim": int(model.embed_dim), "depth": len(model.blocks), "num_heads": int(block.attn.num_heads),
            "mlp_ratio": block.mlp.fc1.out_features / model.embed_dim, "norm_eps": eps.pop(),
            "qkv_bias": block.attn.qkv.bias is not None, "global_pool": model.global_pool}


# ---- the export ------------------------------------------------------------------------------------


def _checked_normalization(norm: dict[str, Any] | None, mean: list[float] | None, std: list[float] | None,
                           where: str) -> dict[str, Any]:
    """The card's ``normalization``: given ``mean`` / ``std`` win over the source's ``norm``."""
    if mean is not None or std is not None:
        if mean is None or std is None:
            raise InputError("give both mean=[...] and std=[...] (or neither, to use the source's)")
        norm, where = {"mean": list(mean), "std": list(std), "from": "given (mean=, std=)"}, "mean= / std="
    if norm is None:
        raise InputError(f"{where}: the source states no normalisation (no preprocessor_config.json image_mean / "
                         "image_std): give mean=[R,G,B] std=[R,G,B] of [0, 1] RGB, as the model was trained")
    for key in ("mean", "std"):
        values = norm[key]
        if not isinstance(values, (list, tuple)) or len(values) != 3 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise InputError(f"{where}: normalisation {key} ({norm['from']}) must be 3 finite numbers (R, G, B)")
    if not all(v > 0 for v in norm["std"]):
        raise InputError(f"{where}: normalisation std ({norm['from']}) must be positive")
    return {"input": "RGB uint8 / 255, then (x - mean) / std per channel", "mean": [float(v) for v in norm["mean"]],
            "std": [float(v) for v in norm["std"]], "from": norm["from"]}


def import_weights(source: str, input_path: str | Path, output_dir: str | Path, image_size: int | None = None,
                   drop: list[str] | tuple[str, ...] = (), num_heads: int | None = None,
                   decoder_num_heads: int | None = None, architecture: str | None = None,
                   mean: list[float] | None = None, std: list[float] | None = None, license_name: str | None = None,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Convert ``input_path`` (``source``: hf, mae or timm) into a backbone export in ``output_dir``.

    Args:
        image_size: side in pixels of the exported backbone; the position embeddings are resampled
            (bicubic, timm's ``resample_abs_pos_embed``, as :func:`fahr.models.load_backbone` does).
            None keeps the source's. The decoder's positions are computed for the new grid.
        drop: prefixes of source tensors to leave out (e.g. ``["head"]``, ``["pooler"]``); listed in the card.
        num_heads, decoder_num_heads: ``mae`` sources of other than MAE's published sizes.
        architecture: ``timm`` source without a config.json: the timm model name.
        mean, std: normalisation when the source states none (or to override it; recorded as given).
        license_name: the licence to record when the source states none (a source's own wins).

    Returns: the model card written (``format: fahr-backbone/1``).

    Raises:
        InputError: anything about the source that fahr cannot read or represent (one line).
    """
    if source not in SOURCES:
        raise InputError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    path = Path(input_path)
    if not path.exists():
        raise InputError(f"input {printable_path(path)}: no such file or directory")
    drop = list(drop)
    reference = None
    if source == "hf":
        converted = read_hf(path, drop)
        converted.source["license"] = _hf_license(path)
    elif source == "mae":
        converted = read_mae(path, drop, num_heads, decoder_num_heads)
    else:
        converted, reference = read_timm(path, drop, architecture)
    where = printable_path(converted.weights_file)
    normalization = _checked_normalization(converted.normalization, mean, std, where)
    args = backbone_args(converted.arch, f"{where}: ")
    native = create_backbone(**args)
    load_state_dict_checked(native, converted.encoder, converted.weights_file,
                            against="a ViT with the sizes its config and shapes state")
    if reference is not None:
        _check_timm_parity(native, reference, converted.source["architecture"])
    args["img_size"] = image_size or args["img_size"]
    encoder = native
    if args["img_size"] != converted.arch["img_size"]:
        encoder = create_backbone(**args)
        old_grid = converted.arch["img_size"] // args["patch_size"]
        load_state_dict_checked(encoder, fit_pos_embed(native.state_dict(), encoder, old_grid), converted.weights_file)
    decoder_state = None
    if converted.decoder is not None:
        facts = converted.decoder_facts
        grid = tuple(encoder.patch_embed.grid_size)
        decoder = MAEDecoder(grid[0] * grid[1], grid, encoder.embed_dim, args["patch_size"], dim=facts["dim"],
                             depth=facts["depth"], num_heads=facts["num_heads"], mlp_ratio=facts["mlp_ratio"],
                             norm_eps=facts["norm_eps"], qkv_bias=facts["qkv_bias"], pos_embed=facts["pos_embed"])
        load_state_dict_checked(decoder, converted.decoder, converted.weights_file,
                                against="an MAE decoder with the sizes its config and shapes state")
        decoder_state = decoder.state_dict()
    stated = converted.source.pop("license", None)
    import fahr

    card = model_card(
        encoder,
        task="imported",
        normalization=normalization,
        source={**converted.source, "sha256": file_sha256(converted.weights_file)},
        license=stated or license_name,
        license_from="the source" if stated else ("given (license=)" if license_name else None),
        conversion={**converted.conversion, "tool": "fahr import-weights",
                    "source_img_size": converted.arch["img_size"], "img_size": args["img_size"],
                    "pos_embed": "resampled bicubic (timm resample_abs_pos_embed)"
                    if args["img_size"] != converted.arch["img_size"] else "as the source"},
        **({"decoder": converted.decoder_facts} if converted.decoder is not None else {}),
        global_step=None,
        fahr_version=fahr.__version__,
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    out = Path(output_dir)
    check_card({"format": CARD_FORMAT, **card}, out / CARD_FILE)  # what a later load will check
    save_backbone(out, encoder.state_dict(), card, decoder_state)
    if log is not None:
        log(f"imported {converted.source.get('format')} weights ({card['arch']}, {card['embed_dim']} x "
            f"{card['depth']}, patch {card['patch_size']}, {card['img_size']} px"
            f"{', with its MAE decoder' if 'decoder' in card else ''}) into {printable_path(out)}")
    return {"format": CARD_FORMAT, **card}


def _check_timm_parity(native: torch.nn.Module, reference: torch.nn.Module, name: str) -> None:
    """fahr's rebuild must compute timm's features: a random image through both (fp32, eval mode)."""
    native.eval()
    side = int(native.patch_embed.img_size[0])
    images = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((native.forward_features(images) - reference.forward_features(images)).abs().max())
    if not diff <= TIMM_PARITY_TOLERANCE:
        raise InputError(f"timm model {name!r} computes other features than fahr's ViT with the same tensors (max "
                         f"difference {diff:.3g}): it uses a part fahr cannot represent")
