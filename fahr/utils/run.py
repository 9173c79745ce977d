"""Run identity, run directories, provenance and resume.

A run lives in ``<paths.runs_dir>/<experiment_name>/<run_id>``. ``run_id`` is given, or derived from a
hash of the config that determines the training trajectory, so the same command always lands in the
same directory: re-running it after a crash or preemption resumes from ``checkpoints/last.ckpt``.
Settings that do not change what is trained (where files go, how the run is watched) are left out of
the hash (:data:`IDENTITY_EXCLUDED`), so resubmitting with another display setting resumes the run.
"""

from __future__ import annotations

import hashlib
import json
import platform
import secrets
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fahr.boundary import InputError, check_output_dir, read_json_file
from fahr.utils.atomic import atomic_write_json, atomic_write_text

#: Dotted config keys left out of the run id: they do not change what is trained (where files go, how
#: the run is watched, how it is exported). One list for every training command (pretrain,
#: finetune_age, finetune_survival); a key a config does not have is skipped. Not listed, because
#: they do change the run: ``callbacks.checkpoint.*`` (Lightning keys a checkpoint callback's saved
#: state by its ``every_n_train_steps``/``monitor``/``mode``, so a resume with another value drops the
#: best-checkpoint bookkeeping) and ``task.*val_every_n_steps`` (which checkpoint is kept as best).
IDENTITY_EXCLUDED: tuple[str, ...] = (
    "run_id", "resume",                      # the id itself; whether to resume it
    "paths",                                 # where files go (data locations are hashed unresolved)
    "export", "export_dir",                  # pretrain: `fahr export` settings; fine-tunes: where the export goes
    "logger",                                # CSV / W&B / TensorBoard and their options
    "trainer.enable_progress_bar",
    "trainer.log_every_n_steps",             # metric logging frequency (also the throughput/LR log interval)
    "trainer.enable_model_summary",          # not in the schema today; listed so adding it keeps run ids
    "callbacks.lr_monitor",                  # pretrain: log the LR
    "callbacks.throughput",                  # pretrain: log images/s
    "task.log_images_every_n_steps",         # pretrain: reconstruction grids (rank 0, no RNG, no collective)
    "task.num_log_images",
    "task.log_clinical_images",
)
_PROVENANCE_PACKAGES = (
    "fahr", "torch", "torchvision", "lightning", "timm", "webdataset", "hydra-core", "omegaconf",
    "numpy", "pillow", "safetensors", "wandb", "deepspeed",
)
RUN_FILE = "run.json"
LAST_CHECKPOINT = "last.ckpt"


#: Dotted config keys added after runs existed, whose null default means "as before": left out of the
#: run id while null, so a run started before they existed keeps its id (and resumes).
IDENTITY_IF_SET: tuple[str, ...] = (
    "model.embed_dim", "model.depth", "model.num_heads", "model.mlp_ratio", "model.norm_eps", "model.qkv_bias",
    "task.decoder_mlp_ratio", "task.decoder_norm_eps", "task.decoder_qkv_bias", "task.decoder_pos_embed",
    "task.init_from",
)


def derive_run_id(cfg: DictConfig) -> str:
    """``<experiment_name>-<8 hex>`` from a hash of the trajectory-defining config.

    Hashed unresolved, so paths interpolated into data locations do not change the id; the keys of
    :data:`IDENTITY_EXCLUDED`, and those of :data:`IDENTITY_IF_SET` that are null, are removed first.
    """
    identity = OmegaConf.to_container(cfg, resolve=False)
    for key in IDENTITY_EXCLUDED:
        _drop(identity, key)
    for key in IDENTITY_IF_SET:
        _drop(identity, key, only_if_none=True)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    return f"{cfg.experiment_name}-{digest[:8]}"


def _drop(container: dict[str, Any], dotted: str, only_if_none: bool = False) -> None:
    """Remove ``a.b.c`` from nested dicts (``only_if_none``: when its value is None); absent (or a
    parent that is not a mapping) is fine."""
    *parents, last = dotted.split(".")
    node: Any = container
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict) and (not only_if_none or node.get(last, 0) is None):
        node.pop(last, None)


def run_dir_for(cfg: DictConfig) -> Path:
    run_id = cfg.run_id or derive_run_id(cfg)
    if "/" in run_id or run_id in {".", ".."}:
        raise InputError(f"run_id must be a plain name, got {run_id!r}")
    return Path(cfg.paths.runs_dir) / cfg.experiment_name / run_id


def find_resume_checkpoint(run_dir: Path) -> Path | None:
    """``checkpoints/last.ckpt`` if the run has one: the only name resume reads, and the one every
    saver writes (the periodic ModelCheckpoint, the preemption handler, the save at max_steps)."""
    last = run_dir / "checkpoints" / LAST_CHECKPOINT
    return last if last.is_file() else None


def git_sha(repo_dir: Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the checkout holding ``fahr`` (``None`` outside a git checkout)."""
    repo_dir = repo_dir or Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_dir,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return {"sha": sha, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _PROVENANCE_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def prepare_run_dir(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Create the run directory and write ``config.yaml`` and ``provenance.json``.

    ``run.json`` (run id, W&B id) is created once and kept across resumes; returns its content.
    Only rank 0 should call this.
    """
    check_output_dir(run_dir, "run directory (paths.runs_dir)")
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    atomic_write_json(run_dir / "provenance.json", {
        "git": git_sha(), "packages": package_versions(), "python": sys.version.split()[0],
        "platform": platform.platform(), "argv": sys.argv,
    })
    run_file = run_dir / RUN_FILE
    if run_file.is_file():
        return read_run_info(run_dir)
    info = {"run_id": run_dir.name, "experiment_name": cfg.experiment_name,
            "wandb_id": secrets.token_hex(6)}
    atomic_write_json(run_file, info)
    return info


def read_run_info(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise InputError(f"{run_dir} is not a fahr run directory (no {RUN_FILE})")
    info = read_json_file(path, "run file")
    if not isinstance(info, dict) or not all(isinstance(info.get(k), str) for k in ("run_id", "experiment_name")):
        raise InputError(f"{path}: not a fahr run file (needs run_id and experiment_name)")
    return info
