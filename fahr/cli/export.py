"""`fahr export`: Hydra app over conf/export.yaml (a pretraining run's checkpoint -> its export), or
with ``format=onnx`` over conf/export_onnx.yaml (a fine-tuned export -> ``model.onnx`` beside it).

The two take different inputs (a run, found by the pretraining overrides; an export directory), so
``format=`` picks the config before Hydra composes one: in the pretraining composition ``model`` is the
backbone-size group, while ``fahr export format=onnx model=EXPORT_DIR`` takes a path.
"""

import sys

import hydra
from omegaconf import DictConfig

from fahr.cli._hydra import config_dir, run_command
from fahr.config.inference_schema import register_export_onnx
from fahr.config.schema import register_schemas

register_schemas()
register_export_onnx()  # conf/export_onnx.yaml, composed from the ConfigStore (see fahr.config.inference_schema)

#: format= value -> what it exports
FORMATS = ("safetensors", "onnx")


@hydra.main(config_path=config_dir(), config_name="export", version_base="1.3")
def export_checkpoint(cfg: DictConfig) -> None:
    from fahr.pipeline.export import export

    print(run_command("export", export, cfg))


@hydra.main(config_path=None, config_name="export_onnx", version_base="1.3")
def export_onnx(cfg: DictConfig) -> None:
    from fahr.pipeline.export import export_onnx_model

    print(run_command("export", export_onnx_model, cfg))


def requested_format(argv: list[str]) -> str:
    """The last ``format=`` override in ``argv`` (default ``safetensors``); :class:`InputError` for
    another value."""
    from fahr.boundary import InputError

    given = [a.split("=", 1)[1] for a in argv if a.startswith("format=")]
    fmt = given[-1] if given else "safetensors"
    if fmt not in FORMATS:
        raise InputError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return fmt


def main() -> None:
    fmt = run_command("export", requested_format, sys.argv[1:])
    if fmt == "onnx":
        export_onnx()
        return
    # the pretraining composition has no `format` key: safetensors is what it writes
    sys.argv = [a for a in sys.argv if not a.startswith("format=")]
    export_checkpoint()
