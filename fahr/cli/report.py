"""`fahr report`: Hydra app over conf/report.yaml. A first argument without ``=`` is the input folder."""

import sys

import hydra
from omegaconf import DictConfig

from fahr.cli._hydra import config_dir, run_command
from fahr.config.report_schema import register_report_schema

register_report_schema()


@hydra.main(config_path=config_dir(), config_name="report", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    from fahr.pipeline.report import report

    print(run_command("report", report, cfg))


def main() -> None:
    # `fahr report RUN_DIR output=x.html`: the folder as a positional argument, as the issue and
    # users write it; Hydra itself takes key=value only
    args = sys.argv[1:]
    if args and "=" not in args[0] and not args[0].startswith("-"):
        sys.argv = [sys.argv[0], f"input=[{_quoted(args[0])}]", *args[1:]]
    _app()


def _quoted(path: str) -> str:
    """A path as a Hydra list element: quoted, so commas, brackets and spaces stay part of it."""
    return "'" + path.replace("\\", "\\\\").replace("'", "\\'") + "'"
