"""`fahr shards`: Hydra app over conf/shards.yaml."""

import sys

import hydra
from omegaconf import DictConfig

from data_pipelines.options import register_shards_schema
from fahr.cli import _hydra
from fahr.cli._hydra import config_dir, run_command

register_shards_schema()


@hydra.main(config_path=config_dir(), config_name="shards", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from fahr.pipeline.shards import shards

    result = run_command("shards", shards, cfg)
    if isinstance(result, dict) and result.get("failed"):  # launcher.wait: a SLURM job of the build failed
        _hydra.REPORTED.append("jobs")
        sys.exit(_hydra.EXIT_INTERNAL_ERROR)
