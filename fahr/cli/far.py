"""`fahr far`: Hydra app over conf/far.yaml."""

import hydra
from omegaconf import DictConfig

from fahr.cli._hydra import run_command
from fahr.config.inference_schema import register_far

register_far()  # conf/far.yaml, composed from the ConfigStore (see fahr.config.inference_schema)


@hydra.main(config_path=None, config_name="far", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from fahr.pipeline.far import far

    run_command("far", far, cfg)
