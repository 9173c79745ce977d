"""Backbone weights for reuse: safetensors + a JSON model card, loadable without unpickling.

An export directory holds ``model.safetensors`` (the encoder's state dict, plain key names) and
``model_card.json`` (architecture, image and patch size, normalisation, training data, step).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from fahr.boundary import InputError
from fahr.models.backbone import backbone_config, create_backbone
from fahr.utils.atomic import atomic_write_json

CARD_FORMAT = "fahr-backbone/1"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model_card.json"

# Wrappers that prefix parameter names: DDP/FSDP (`module.`), torch.compile (`_orig_mod.`).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keep the entries under ``prefix`` (e.g. ``"model.encoder."``), renamed without it and without
    wrapper prefixes anywhere in the name."""
    out = {}
    for key, value in state_dict.items():
        clean = key
        for wrapper in _WRAPPER_PREFIXES:
            clean = clean.replace(wrapper, "")
        if clean.startswith(prefix):
            out[clean[len(prefix):]] = value
    return out


def save_backbone(export_dir: str | Path, encoder_state: dict[str, torch.Tensor], card: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` and ``model_card.json`` atomically into ``export_dir``."""
    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in encoder_state.items()}
    tmp = export_dir / f".{WEIGHTS_FILE}.tmp"
    save_file(tensors, str(tmp), metadata={"format": CARD_FORMAT})
    os.replace(tmp, export_dir / WEIGHTS_FILE)
    atomic_write_json(export_dir / CARD_FILE, {"format": CARD_FORMAT, **card})
    return export_dir


MODEL_FORMAT = "fahr-model/1"  # a fine-tuned model (fahr.models.face_model): backbone.* + heads.*


def read_any_card(export_dir: str | Path) -> dict[str, Any]:
    """The model card of a backbone export (``fahr-backbone/1``) or a fine-tuned model (``fahr-model/1``)."""
    path = Path(export_dir) / CARD_FILE
    if not path.is_file():
        raise InputError(f"no {CARD_FILE} in {export_dir}: is this a `fahr export` directory?")
    card = json.loads(path.read_text())
    if card.get("format") not in (CARD_FORMAT, MODEL_FORMAT):
        raise InputError(f"{path}: unsupported model card format {card.get('format')!r}, "
                         f"expected {CARD_FORMAT} or {MODEL_FORMAT}")
    return card


def read_card(export_dir: str | Path) -> dict[str, Any]:
    """The backbone facts of an export: a backbone card as is, or a fine-tuned model's ``backbone``
    section merged over its card (so a FaceAge model can seed a FaceSurvival fine-tune)."""
    card = read_any_card(export_dir)
    if card["format"] == MODEL_FORMAT:
        return {**card, **card["backbone"]}
    return card


def load_backbone(
    export_dir: str | Path, img_size: int | None = None, **overrides: Any
) -> tuple[VisionTransformer, dict[str, Any]]:
    """Rebuild the exported backbone, optionally at another image size.

    Args:
        export_dir: directory written by :func:`save_backbone` / ``fahr export``.
        img_size: input side in pixels for the new model; position embeddings are resampled
            (bicubic, class token kept) when it differs from the card's.
        overrides: extra :func:`create_backbone` arguments (e.g. ``drop_path_rate``, ``global_pool``).

    Returns: (backbone, model card). Loading reads tensors only (safetensors): no pickle.
    """
    card = read_card(export_dir)
    state = load_file(str(Path(export_dir) / WEIGHTS_FILE))
    if card["format"] == MODEL_FORMAT:
        state = strip_prefix(state, "backbone.")
    size = img_size or card["img_size"]
    model = create_backbone(
        arch=card["arch"], img_size=size, patch_size=card["patch_size"],
        global_pool=overrides.pop("global_pool", card.get("global_pool", "token")), **overrides,
    )
    new_grid = list(model.patch_embed.grid_size)
    if state["pos_embed"].shape != model.pos_embed.shape:
        old = card["img_size"] // card["patch_size"]
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], new_size=new_grid, old_size=[old, old], num_prefix_tokens=1
        )
    state = _adapt_final_norm(state, model)
    model.load_state_dict(state, strict=True)
    return model, card


def _adapt_final_norm(state: dict[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """timm puts the final LayerNorm after pooling (``fc_norm``) for ``global_pool="avg"`` and before
    it (``norm``) for the class token. Moving between the two (MAE pretrains with the class token and
    fine-tunes with average pooling) reuses the pretrained LayerNorm for the new position."""
    has = {k.split(".")[0] for k in model.state_dict() if k.startswith(("norm.", "fc_norm."))}
    got = {k.split(".")[0] for k in state if k.startswith(("norm.", "fc_norm."))}
    if has == got or len(has) != 1 or len(got) != 1:
        return state
    (src,), (dst,) = got, has
    return {(dst + k[len(src):] if k.startswith(src + ".") else k): v for k, v in state.items()}


def model_card(encoder: VisionTransformer, **facts: Any) -> dict[str, Any]:
    """Architecture facts of ``encoder`` merged with caller facts (normalisation, data, step, ...)."""
    return {**backbone_config(encoder), **facts}
