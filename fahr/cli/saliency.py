"""`fahr saliency`: Hydra app over conf/saliency.yaml."""

import hydra
from omegaconf import DictConfig

from fahr.cli._hydra import run_command
from fahr.config.analysis_schema import register_saliency

register_saliency()  # composed from the ConfigStore (see fahr.config.inference_schema)


@hydra.main(config_path=None, config_name="saliency", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from fahr.pipeline.saliency import saliency

    run_command("saliency", saliency, cfg)
