"""`fahr export`: a run's checkpoint -> ``export/model.safetensors`` + ``export/model_card.json``
(:func:`export`); with ``format=onnx``, a fine-tuned model's export directory -> ``model.onnx`` beside
its safetensors (:func:`export_onnx_model`)."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import fahr
from fahr.boundary import InputError, check_output_dir, read_json_file, read_text_file
from fahr.config.schema import validate
from fahr.models import create_backbone, save_backbone, strip_prefix
from fahr.models.weights import (
    CARD_FORMAT,
    check_card,
    load_state_dict_checked,
    model_card,
)
from fahr.utils.checkpoint_io import load_checkpoint_file
from fahr.utils.run import LAST_CHECKPOINT, read_run_info, run_dir_for

log = logging.getLogger(__name__)


def select_checkpoint(run_dir: Path, which: str) -> Path:
    """``"last"``, ``"best"`` (the top-k checkpoint recorded by ModelCheckpoint) or an explicit path."""
    ckpt_dir = run_dir / "checkpoints"
    if which == "last":
        path = ckpt_dir / LAST_CHECKPOINT
    elif which == "best":
        if not (ckpt_dir / LAST_CHECKPOINT).exists():
            raise InputError(f"checkpoint not found: {ckpt_dir / LAST_CHECKPOINT} (has the run in {run_dir} saved one?)")
        last = load_checkpoint_file(ckpt_dir / LAST_CHECKPOINT, required=())
        callbacks = last.get("callbacks", {})
        best = [s["best_model_path"] for k, s in (callbacks.items() if isinstance(callbacks, dict) else [])
                if "ModelCheckpoint" in str(k) and isinstance(s, dict) and s.get("best_model_score") is not None
                and s.get("best_model_path")]
        if not best:
            raise InputError(f"{run_dir}: no best checkpoint recorded (was a metric monitored?)")
        path = Path(best[0])
    else:
        path = Path(which)
    if not path.exists():
        raise InputError(f"checkpoint not found: {path} (has the run in {run_dir} saved one?)")
    return path


def _training_data(run_cfg: dict[str, Any]) -> dict[str, Any]:
    data = run_cfg["data"]
    facts = {"name": data["name"], "synthetic": data.get("synthetic", False), "clinical": data.get("clinical", False),
             "samples_per_epoch": data["samples_per_epoch"]}
    gen = data.get("generate")
    if gen and (Path(gen["out_dir"]) / "index.json").is_file():
        from fahr.data.shard_index import read_index

        try:
            index = read_index(gen["out_dir"])
        except InputError as err:
            log.warning("training data facts left out of the card: %s", err)
            return facts
        facts.update(num_samples=sum(e["count"] for e in index["splits"].values()), source=index.get("source"))
    return facts


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The resolved ``config.yaml`` of a pretraining run; :class:`InputError` if the directory is not
    one (missing, unreadable, or without the ``model`` and ``data`` sections an export needs)."""
    if not run_dir.is_dir():
        raise InputError(f"run directory {run_dir} not found: give export.run_dir=<run dir>, or the same overrides "
                         "as the pretraining run")
    path = run_dir / "config.yaml"
    text = read_text_file(path, "run config", 16 * 1024 * 1024)
    try:
        run_cfg = OmegaConf.to_container(OmegaConf.create(text), resolve=True)
    except Exception as err:  # noqa: BLE001 - YAML and interpolation errors of a file we did not write
        raise InputError(f"run config {path}: not readable YAML ({type(err).__name__})") from None
    model, data = (run_cfg.get(k) if isinstance(run_cfg, dict) else None for k in ("model", "data"))
    if not isinstance(model, dict) or not isinstance(data, dict) or not all(k in data for k in ("name", "mean", "std")):
        raise InputError(f"run config {path}: not a pretraining run's config (needs model and data sections)")
    return run_cfg


def export(cfg: DictConfig) -> Path:
    """Export the encoder of the run ``cfg`` resolves to (or ``export.run_dir``); returns the export dir."""
    validate(cfg)
    run_dir = Path(cfg.export.run_dir) if cfg.export.run_dir else run_dir_for(cfg)
    out_dir = Path(cfg.export.output_dir) if cfg.export.output_dir else run_dir / "export"
    run_cfg = read_run_config(run_dir)
    check_output_dir(out_dir, "export.output_dir", inputs=(run_dir,))
    ckpt_path = select_checkpoint(run_dir, cfg.export.checkpoint)
    ckpt = load_checkpoint_file(ckpt_path, required=("state_dict", "global_step"))
    encoder_state = strip_prefix(ckpt["state_dict"], "model.encoder.")
    try:
        encoder = create_backbone(**run_cfg["model"])
    except TypeError:
        raise InputError(f"run config {run_dir / 'config.yaml'}: its model section is not a fahr backbone") from None
    load_state_dict_checked(encoder, encoder_state, ckpt_path)  # proves the weights match the architecture
    info = read_run_info(run_dir)
    provenance = run_dir / "provenance.json"
    git = read_json_file(provenance, "provenance").get("git") if provenance.is_file() else None
    card = model_card(
        encoder,
        task="mae_pretrain",
        normalization={"input": "RGB uint8 / 255, then (x - mean) / std per channel",
                       "mean": run_cfg["data"]["mean"], "std": run_cfg["data"]["std"]},
        training_data=_training_data(run_cfg),
        global_step=int(ckpt["global_step"]),
        checkpoint=ckpt_path.name,
        experiment_name=info["experiment_name"],
        run_id=info["run_id"],
        fahr_version=fahr.__version__,
        git=git,
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    check_card({"format": CARD_FORMAT, **card}, out_dir / "model_card.json")  # what a later load will check
    save_backbone(out_dir, encoder.state_dict(), card)
    log.info("exported %s (step %d) to %s", ckpt_path.name, card["global_step"], out_dir)
    return out_dir


def export_onnx_model(cfg: DictConfig) -> Path:
    """``fahr export format=onnx model=EXPORT_DIR``: write ``EXPORT_DIR/model.onnx`` and its record in
    the card (:func:`fahr.models.onnx_export.export_onnx`); returns the path of ``model.onnx``."""
    from fahr.boundary import check_output_file
    from fahr.config.inference_schema import OnnxExportConfig
    from fahr.models.onnx_export import ONNX_FILE, export_onnx

    validate(cfg, OnnxExportConfig)
    path = Path(cfg.model) / ONNX_FILE
    if Path(cfg.model).is_dir():
        check_output_file(path, ONNX_FILE)  # writable, and not a folder, before the export's minutes
    record = export_onnx(cfg.model, opset=cfg.opset)
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in record["check"]["max_abs_diff"].items())
    log.info("exported %s (opset %d; max |ONNX - PyTorch| on a check batch: %s)", path, record["opset"], diffs)
    return path
