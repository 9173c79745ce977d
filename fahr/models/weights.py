"""Backbone weights for reuse: safetensors + a JSON model card, loadable without unpickling.

An export directory holds ``model.safetensors`` (the encoder's state dict, plain key names),
``model_card.json`` (architecture, image and patch size, normalisation, training data, step) and
``README.md`` (the same card for people and model hubs).

A backbone export may also carry an MAE decoder (``fahr import-weights`` of a source that has one),
so that ``fahr pretrain task.init_from=EXPORT`` continues pretraining: its tensors are in a sibling
file, ``mae_decoder.safetensors`` (the names of :class:`fahr.models.mae.MAEDecoder`), and its facts in
the card's ``decoder`` section (:func:`fahr.models.mae.decoder_args`). A separate file keeps
``model.safetensors`` the backbone alone, which plain timm loads (the card's ``timm_architecture`` /
``timm_kwargs``) and :func:`load_backbone` reads as before.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from fahr.boundary import FileRefused, InputError, check_regular_file, printable_path, read_json_file
from fahr.models.backbone import IMAGE_SIZE_RANGE, backbone_args, backbone_config, create_backbone, resolved_facts
from fahr.models.mae import MaskedAutoencoder, decoder_args
from fahr.models.model_readme import README_FILE, model_readme
from fahr.utils.atomic import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

#: an export is a folder of these two files; the card's "format" says what the weights are
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model_card.json"
DECODER_FILE = "mae_decoder.safetensors"  # an MAE decoder beside a backbone (card section "decoder")
CARD_FORMAT = "fahr-backbone/1"  # an encoder (fahr export of a pretraining run)
MODEL_FORMAT = "fahr-model/1"  # a fine-tuned model (fahr.models.face_model): backbone.* + heads.*
TABLE_FORMAT = "fahr-table-model/1"  # a survival head on a feature table (fahr finetune-survival data=table)

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


def write_export(export_dir: str | Path, state: dict[str, torch.Tensor], card: dict[str, Any], card_format: str) -> Path:
    """Write ``model.safetensors`` (``state`` on the CPU, contiguous; the format in its metadata), then
    ``model_card.json`` (``{"format": card_format, **card}``) and the card as ``README.md``
    (:mod:`fahr.models.model_readme`), each atomically, into ``export_dir``."""
    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    tmp = export_dir / f".{WEIGHTS_FILE}.tmp"
    save_file(tensors, str(tmp), metadata={"format": card_format})
    os.replace(tmp, export_dir / WEIGHTS_FILE)
    full = {"format": card_format, **card}
    atomic_write_json(export_dir / CARD_FILE, full)
    atomic_write_text(export_dir / README_FILE, model_readme(full))
    return export_dir


def save_backbone(export_dir: str | Path, encoder_state: dict[str, torch.Tensor], card: dict[str, Any],
                  decoder_state: dict[str, torch.Tensor] | None = None) -> Path:
    """An encoder export (format ``fahr-backbone/1``): :func:`write_export`; with ``decoder_state`` (an
    MAE decoder, described by ``card["decoder"]``) also ``mae_decoder.safetensors``, written first (the
    card, written last, is what makes an export). A stale decoder file of an earlier export is removed."""
    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    if decoder_state is not None:
        tmp = export_dir / f".{DECODER_FILE}.tmp"
        save_file({k: v.detach().to("cpu").contiguous() for k, v in decoder_state.items()}, str(tmp),
                  metadata={"format": "fahr-mae-decoder/1"})
        os.replace(tmp, export_dir / DECODER_FILE)
    elif (export_dir / DECODER_FILE).exists():
        (export_dir / DECODER_FILE).unlink()
    return write_export(export_dir, encoder_state, card, CARD_FORMAT)


#: largest weights file loaded (bytes): ViT-B with heads is ~350 MB, ViT-H/14 with its MAE decoder ~2.6 GB
MAX_WEIGHTS_BYTES = 16 * 1024**3


def _card_error(path: Path, key: str, expected: str) -> InputError:
    return InputError(f"{printable_path(path)}: {key} must be {expected}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_card(card: Any, path: Path) -> dict[str, Any]:
    """Check the facts of a model card that loading and predicting rely on; returns the card.

    A card is data a user may have edited or received: every field read later is checked here for
    type and range, so a tampered card is a one-line :class:`InputError` naming the key, never a
    traceback or a silently wrong prediction (a zero normalisation std made every FaceAge NaN).
    """
    if not isinstance(card, dict):
        raise InputError(f"{printable_path(path)}: a model card must be a JSON object, got {type(card).__name__}")
    if card.get("format") not in (CARD_FORMAT, MODEL_FORMAT, TABLE_FORMAT):
        raise InputError(f"{printable_path(path)}: unsupported model card format {str(card.get('format'))[:40]!r}, "
                         f"expected {CARD_FORMAT}, {MODEL_FORMAT} or {TABLE_FORMAT}")
    if card["format"] == TABLE_FORMAT:
        _check_table_card(card, path)
        return card
    arch = card.get("backbone") if card["format"] == MODEL_FORMAT else card
    prefix = "backbone." if card["format"] == MODEL_FORMAT else ""
    if not isinstance(arch, dict):
        raise _card_error(path, "backbone", "an object (arch, img_size, patch_size)")
    backbone_args(arch, f"{printable_path(path)}: {prefix}")
    if card["format"] == CARD_FORMAT and "decoder" in card:
        decoder_args(card["decoder"], f"{printable_path(path)}: decoder.")
    norm = card.get("normalization")
    if norm is not None or card["format"] == MODEL_FORMAT:
        if not isinstance(norm, dict):
            raise _card_error(path, "normalization", "an object with mean and std")
        for key in ("mean", "std"):
            values = norm.get(key)
            if not isinstance(values, list) or len(values) != 3 or not all(_number(v) for v in values):
                raise _card_error(path, f"normalization.{key}", "a list of 3 finite numbers (R, G, B)")
        if not all(v > 0 for v in norm["std"]):
            raise _card_error(path, "normalization.std", "positive (a zero std divides by zero)")
    if card["format"] == MODEL_FORMAT:
        heads = card.get("heads")
        if not isinstance(heads, dict) or not heads or not all(isinstance(h, dict) for h in heads.values()):
            raise _card_error(path, "heads", "an object of head name -> config (age, risk)")
        unknown = sorted(set(heads) - {"age", "risk"})
        if unknown:
            raise _card_error(path, "heads", f"'age' and/or 'risk', not {unknown}")
        for name, head in heads.items():
            _check_head(head, path, f"heads.{name}")
        calibration = card.get("age_calibration")
        if calibration is not None:
            numbers = isinstance(calibration, dict) and all(_number(calibration.get(k)) for k in ("slope", "intercept"))
            if not numbers or calibration["slope"] == 0:
                raise _card_error(path, "age_calibration", "null or {slope: non-zero number, intercept: number}")
        decision = card.get("age_calibration_decision")
        if decision is not None and not (isinstance(decision, dict) and isinstance(decision.get("kept"), bool)):
            raise _card_error(path, "age_calibration_decision", "null or an object with kept: true or false")
        if not isinstance(card.get("flip_average", False), bool):
            raise _card_error(path, "flip_average", "true or false")
        prep = card.get("preprocessing", {})
        if not isinstance(prep, dict):
            raise _card_error(path, "preprocessing", "an object")
        check_preprocessing(prep, f"{printable_path(path)}: preprocessing")
    return card


def _check_table_card(card: dict[str, Any], path: Path) -> None:
    """What :func:`fahr.models.table_model.load_table_model` and ``table_log_hazard`` read: one risk head
    without covariate inputs, F = ``num_features``, and a scaler of F column names, F finite means and
    F positive SDs."""
    n = card.get("num_features")
    if not (isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 10000):
        raise _card_error(path, "num_features", "an integer in [1, 10000]")
    heads = card.get("heads")
    if not (isinstance(heads, dict) and set(heads) == {"risk"} and isinstance(heads["risk"], dict)):
        raise _card_error(path, "heads", "an object with one head, risk")
    _check_head(heads["risk"], path, "heads.risk")
    if heads["risk"].get("num_covariates", 0) != 0:
        raise _card_error(path, "heads.risk.num_covariates", "0 (a table model's inputs are its features)")
    cov = card.get("covariates")
    if not isinstance(cov, dict):
        raise _card_error(path, "covariates", "an object with features, mean and std")
    names = cov.get("features")
    if not (isinstance(names, list) and len(names) == n and all(isinstance(c, str) and len(c) <= 200 for c in names)):
        raise _card_error(path, "covariates.features", f"a list of {n} column names (num_features)")
    for key in ("mean", "std"):
        values = cov.get(key)
        if not (isinstance(values, list) and len(values) == n and all(_number(v) for v in values)):
            raise _card_error(path, f"covariates.{key}", f"a list of {n} finite numbers")
    if not all(v > 0 for v in cov["std"]):
        raise _card_error(path, "covariates.std", "positive (a zero SD divides by zero)")


def _check_head(head: dict[str, Any], path: Path, key: str) -> None:
    """Sizes in a head config are bounded before any layer is allocated from them."""
    hidden = head.get("hidden", [])
    if not isinstance(hidden, list) or not all(isinstance(h, int) and not isinstance(h, bool) and 1 <= h <= 65536
                                               for h in hidden) or len(hidden) > 16:
        raise _card_error(path, f"{key}.hidden", "a list of at most 16 layer widths in [1, 65536]")
    if "dropout" in head and not (_number(head["dropout"]) and 0.0 <= head["dropout"] < 1.0):
        raise _card_error(path, f"{key}.dropout", "a number in [0, 1)")
    covariates = head.get("num_covariates", 0)
    if not (isinstance(covariates, int) and not isinstance(covariates, bool) and 0 <= covariates <= 10000):
        raise _card_error(path, f"{key}.num_covariates", "an integer in [0, 10000]")
    ages = [head.get(k) for k in ("min_age", "max_age", "bin_width") if k in head]
    if ages and not all(_number(v) for v in ages):
        raise _card_error(path, f"{key}.min_age/max_age/bin_width", "finite numbers")
    if {"min_age", "max_age", "bin_width"} <= set(head):
        bins = (head["max_age"] - head["min_age"]) / head["bin_width"] if head["bin_width"] > 0 else -1
        if not 0 < bins <= 10000:
            raise _card_error(path, f"{key}.min_age/max_age/bin_width", "min_age < max_age with at most 10,000 bins")


def check_preprocessing(prep: dict[str, Any], where: str) -> None:
    """Check the preprocessing keys fahr applies (``detect``, ``image_size``, ``margin``,
    ``multi_face``, ``min_confidence``) and the training-crop record (``crops``, ``source``) that
    ``prep`` sets; ``where`` prefixes the message."""
    lo, hi = IMAGE_SIZE_RANGE
    checks = {
        "detect": (lambda v: isinstance(v, bool), "true or false"),
        "image_size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi,
                       f"an integer number of pixels in [{lo}, {hi}]"),
        "margin": (lambda v: _number(v) and 0.0 <= v <= 2.0, "a number in [0, 2] (0.25 = 25% more context)"),
        "multi_face": (lambda v: v in ("reject", "largest", "central"), "reject, largest or central"),
        "min_confidence": (lambda v: _number(v) and 0.0 <= v <= 1.0, "a probability in [0, 1]"),
        "crops": (lambda v: v in ("fahr", "external", "unknown"), "fahr, external or unknown (how the training crops were made)"),
        "source": (lambda v: isinstance(v, str) and len(v) <= 300 and v.isprintable(), "a line of at most 300 printable characters"),
    }
    for key, (ok, expected) in checks.items():
        if key in prep and prep[key] is not None and not ok(prep[key]):
            raise InputError(f"{where}.{key} must be {expected}")


def read_any_card(export_dir: str | Path) -> dict[str, Any]:
    """The checked model card of any export fahr writes: a backbone (``fahr-backbone/1``), a fine-tuned
    face model (``fahr-model/1``) or a table model (``fahr-table-model/1``); :class:`InputError` for a
    missing, unreadable or tampered card."""
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise InputError(f"model {printable_path(export_dir)}: not a directory; give a `fahr export` directory "
                         f"({CARD_FILE} + {WEIGHTS_FILE})")
    path = export_dir / CARD_FILE
    if not path.exists():
        raise InputError(f"no {CARD_FILE} in {printable_path(export_dir)}: is this a `fahr export` directory?")
    return check_card(read_json_file(path, "model card", 16 * 1024 * 1024), path)


def read_card(export_dir: str | Path) -> dict[str, Any]:
    """The backbone facts of an export: a backbone card as is, or a fine-tuned model's ``backbone``
    section merged over its card (so a FaceAge model can seed a FaceSurvival fine-tune)."""
    card = read_any_card(export_dir)
    if card["format"] == TABLE_FORMAT:
        raise InputError(f"{printable_path(Path(export_dir))} is a table model ({TABLE_FORMAT}): it has no image "
                         "backbone to start from; give a `fahr export` of a pretraining run or a face model")
    if card["format"] == MODEL_FORMAT:
        return {**card, **card["backbone"]}
    return card


def load_weights(export_dir: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of ``export_dir/model.safetensors``: :func:`read_safetensors`."""
    return read_safetensors(Path(export_dir) / WEIGHTS_FILE, device)


def read_safetensors(path: str | Path, device: str = "cpu", hint: str = "re-export the model or fetch the file again",
                     ) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, each checked to be finite.

    safetensors holds raw tensors and a JSON header, nothing executable; a file that is not one (a
    pickle renamed ``.safetensors``, a truncated download) is refused unread.

    Raises:
        InputError: missing, not a regular file, too large, not a valid safetensors file, or a
            tensor with NaN or infinite values (naming the tensor); ``hint`` ends the invalid-file message.
    """
    path = Path(path)
    try:
        check_regular_file(path, MAX_WEIGHTS_BYTES)
    except FileRefused as err:
        raise InputError(f"{printable_path(path)}: {err.detail}") from None
    try:
        state = load_file(str(path), device=device)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for bad files
        problem = f"not a valid safetensors file ({type(err).__name__})"
        raise InputError(f"{printable_path(path)}: {problem}; {hint}") from None
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InputError(f"{printable_path(path)}: tensor {name[:100]!r} holds NaN or infinite values; "
                             "the weights are broken (a diverged run?)")
    return state


def load_state_dict_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path,
                            against: str = f"the architecture in {CARD_FILE}") -> None:
    """``module.load_state_dict(state, strict=True)`` with a one-line :class:`InputError` naming the
    missing, unexpected and mis-shaped tensors (at most a few of each); ``against`` names what the
    architecture came from."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if keys:
                shown = ", ".join(k[:60] for k in keys[:3]) + (", ..." if len(keys) > 3 else "")
                parts.append(f"{label} {len(keys)} ({shown})")
        raise InputError(f"{printable_path(path)}: the weights do not fit {against}: {'; '.join(parts)}")
    module.load_state_dict(state, strict=True)


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
    state = load_weights(export_dir)
    if card["format"] == MODEL_FORMAT:
        state = strip_prefix(state, "backbone.")
    args = backbone_args(card)
    args.update(img_size=img_size or card["img_size"], global_pool=overrides.pop("global_pool", args["global_pool"]))
    model = create_backbone(**args, **overrides, init_weights=False)  # every tensor is loaded below (strict)
    state = fit_pos_embed(state, model, card["img_size"] // card["patch_size"])
    state = _adapt_final_norm(state, model)
    load_state_dict_checked(model, state, Path(export_dir) / WEIGHTS_FILE)
    return model, card


def fit_pos_embed(state: dict[str, torch.Tensor], model: VisionTransformer, old_grid: int) -> dict[str, torch.Tensor]:
    """``state`` with its ``pos_embed`` (1, 1 + old_grid**2, D) resampled to ``model``'s patch grid
    (bicubic, class token kept: timm's ``resample_abs_pos_embed``) when the two differ."""
    if "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
        from timm.layers import resample_abs_pos_embed

        state = {**state, "pos_embed": resample_abs_pos_embed(
            state["pos_embed"], new_size=list(model.patch_embed.grid_size), old_size=[old_grid, old_grid],
            num_prefix_tokens=1)}
    return state


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


def init_from_export(mae: MaskedAutoencoder, export_dir: str) -> dict[str, Any]:
    """Load a backbone export's encoder (position embeddings resampled to ``mae``'s image size) and,
    when the export has one, its MAE decoder into ``mae``; returns the export's card.

    ``mae`` must have the export's architecture (``fahr pretrain`` builds it from the card): facts that
    tensor shapes do not show (LayerNorm epsilons, qkv bias, the decoder's positions) are compared too.

    Raises:
        InputError: not an export, or an architecture that differs from the export's (naming the fact).
    """
    card = read_card(export_dir)
    where = f"task.init_from={export_dir}"
    have = backbone_config(mae.encoder)
    for key, value in resolved_facts(backbone_args(card)).items():
        if key not in ("arch", "img_size", "global_pool") and have.get(key) != value:
            raise InputError(f"{where}: the export's backbone has {key} {value}, the model to train {have.get(key)}; "
                             f"build the encoder from {CARD_FILE} (fahr pretrain does)")
    encoder, _ = load_backbone(export_dir, img_size=have["img_size"], global_pool=have["global_pool"])
    load_state_dict_checked(mae.encoder, encoder.state_dict(), Path(export_dir) / WEIGHTS_FILE)
    if card["format"] == "fahr-backbone/1" and "decoder" in card:
        wanted = decoder_args(card["decoder"], f"{Path(export_dir) / CARD_FILE}: decoder.")
        built = {f"decoder_{k}" if k != "num_heads" else "decoder_heads": v for k, v in mae.decoder.config.items()}
        for key, value in wanted.items():
            if built.get(key) != value:
                raise InputError(f"{where}: the export's decoder has {key[len('decoder_'):]} {value}, the model to "
                                 f"train {built.get(key)}; build the decoder from {CARD_FILE} (fahr pretrain does)")
        path = Path(export_dir) / DECODER_FILE
        load_state_dict_checked(mae.decoder, read_safetensors(path), path)
    return card
