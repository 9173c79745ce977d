"""`fahr shards`: Hydra app over conf/shards.yaml."""

import hydra
from omegaconf import DictConfig

from data_pipelines.options import register_shards_schema
from fahr.cli._hydra import config_dir, run_command

register_shards_schema()


@hydra.main(config_path=config_dir(), config_name="shards", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from fahr.pipeline.shards import shards

    run_command("shards", shards, cfg)
