"""`fahr export`: a run's checkpoint -> ``export/model.safetensors`` + ``export/model_card.json``."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import fahr
from fahr.boundary import InputError
from fahr.config.schema import validate
from fahr.models import create_backbone, save_backbone, strip_prefix
from fahr.models.weights import model_card
from fahr.utils.run import LAST_CHECKPOINT, read_run_info, run_dir_for

log = logging.getLogger(__name__)


def select_checkpoint(run_dir: Path, which: str) -> Path:
    """``"last"``, ``"best"`` (the top-k checkpoint recorded by ModelCheckpoint) or an explicit path."""
    ckpt_dir = run_dir / "checkpoints"
    if which == "last":
        path = ckpt_dir / LAST_CHECKPOINT
    elif which == "best":
        last = torch.load(ckpt_dir / LAST_CHECKPOINT, map_location="cpu", weights_only=True)
        best = [s["best_model_path"] for k, s in last.get("callbacks", {}).items()
                if "ModelCheckpoint" in k and s.get("best_model_score") is not None and s.get("best_model_path")]
        if not best:
            raise InputError(f"{run_dir}: no best checkpoint recorded (was a metric monitored?)")
        path = Path(best[0])
    else:
        path = Path(which)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path} (has the run in {run_dir} saved one?)")
    return path


def _training_data(run_cfg: dict[str, Any]) -> dict[str, Any]:
    data = run_cfg["data"]
    facts = {"name": data["name"], "synthetic": data.get("synthetic", False), "clinical": data.get("clinical", False),
             "samples_per_epoch": data["samples_per_epoch"]}
    gen = data.get("generate")
    index_path = Path(gen["out_dir"]) / "index.json" if gen else None
    if index_path is not None and index_path.is_file():
        index = json.loads(index_path.read_text())
        facts.update(num_samples=index.get("num_samples"), source=index.get("source"))
    return facts


def export(cfg: DictConfig) -> Path:
    """Export the encoder of the run ``cfg`` resolves to (or ``export.run_dir``); returns the export dir."""
    validate(cfg)
    run_dir = Path(cfg.export.run_dir) if cfg.export.run_dir else run_dir_for(cfg)
    run_cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    ckpt_path = select_checkpoint(run_dir, cfg.export.checkpoint)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    encoder_state = strip_prefix(ckpt["state_dict"], "model.encoder.")
    encoder = create_backbone(**run_cfg["model"])
    encoder.load_state_dict(encoder_state, strict=True)  # proves the weights match the architecture
    info = read_run_info(run_dir)
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
        git=json.loads((run_dir / "provenance.json").read_text()).get("git"),
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    out_dir = Path(cfg.export.output_dir) if cfg.export.output_dir else run_dir / "export"
    save_backbone(out_dir, encoder.state_dict(), card)
    log.info("exported %s (step %d) to %s", ckpt_path.name, card["global_step"], out_dir)
    return out_dir
