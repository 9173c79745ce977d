"""`fahr evaluate`: Hydra app over conf/evaluate.yaml."""

import hydra
from omegaconf import DictConfig

from fahr.cli._hydra import config_dir, run_command
from fahr.config.evaluate_schema import register_evaluate_schema

register_evaluate_schema()


@hydra.main(config_path=config_dir(), config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from fahr.pipeline.evaluate import evaluate

    run_command("evaluate", evaluate, cfg)
