"""`fahr demo`: synthetic shards -> MAE pretraining of a small ViT -> export, on a CPU."""

from __future__ import annotations

import csv
import time
from pathlib import Path

from omegaconf import DictConfig

from fahr.pipeline.export import export
from fahr.pipeline.pretrain import pretrain


def _loss_curve(metrics_csv: Path) -> tuple[float | None, float | None]:
    """First and last logged step loss."""
    if not metrics_csv.is_file():
        return None, None
    with open(metrics_csv, newline="") as f:
        losses = [float(r["train/loss_step"]) for r in csv.DictReader(f) if r.get("train/loss_step")]
    return (losses[0], losses[-1]) if losses else (None, None)


def demo(cfg: DictConfig) -> dict:
    t0 = time.perf_counter()
    result = pretrain(cfg)
    export_dir = export(cfg)
    first, last = _loss_curve(result.run_dir / "metrics.csv")
    summary = {
        "run_dir": result.run_dir, "figures": result.run_dir / "figures", "export_dir": export_dir,
        "global_step": result.global_step, "first_loss": first, "last_loss": last,
        "minutes": (time.perf_counter() - t0) / 60,
    }
    lines = [
        "",
        "fahr demo finished (synthetic faces: NOT real people)",
        f"  run          {summary['run_dir']}  (config.yaml, metrics.csv, metrics.json, checkpoints/)",
        f"  figures      {summary['figures']}  (MAE reconstructions: input | masked | reconstruction)",
        f"  exported     {summary['export_dir']}  (model.safetensors, model_card.json)",
        f"  steps        {summary['global_step']}   MAE loss {first:.3f} -> {last:.3f}" if first is not None
        else f"  steps        {summary['global_step']}",
        f"  time         {summary['minutes']:.1f} min",
        "  load it      fahr.models.load_backbone(EXPORT_DIR)",
    ]
    print("\n".join(lines))
    return summary
