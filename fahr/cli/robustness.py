"""`fahr robustness`: Hydra app over conf/robustness.yaml."""

import hydra
from omegaconf import DictConfig

from fahr.cli._hydra import run_command
from fahr.config.analysis_schema import register_robustness

register_robustness()  # composed from the ConfigStore (see fahr.config.inference_schema)


@hydra.main(config_path=None, config_name="robustness", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from fahr.pipeline.robustness import robustness

    run_command("robustness", robustness, cfg)
