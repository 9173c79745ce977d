"""`fahr run-dir <command> [overrides...]`: print the run directory a training command would use.

The same config composition as the command itself (same config file, schema and overrides), so the
printed directory is the one the command trains in and resumes from: the SLURM templates send the
job's log there (``slurm/common.sh``), and a user finds a run's files without reading its log. Imports
neither torch nor Lightning (start-up is about a second).
"""

from __future__ import annotations

import sys

from fahr.cli._hydra import EXIT_INPUT_ERROR, config_dir

#: training command -> its config file
TRAINING_COMMANDS = {"pretrain": "pretrain", "finetune-age": "finetune_age", "finetune-survival": "finetune_survival"}
USAGE = f"usage: fahr run-dir <{'|'.join(TRAINING_COMMANDS)}> [hydra overrides...]"


def run_dir(command: str, overrides: list[str]) -> str:
    """The run directory of ``fahr <command> <overrides>`` (as given: relative stays relative).

    Raises:
        fahr.boundary.InputError: an unknown command, or overrides the config does not accept.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from fahr.boundary import InputError
    from fahr.config.finetune_schema import register_finetune_schemas
    from fahr.config.schema import register_schemas
    from fahr.utils.run import run_dir_for

    if command not in TRAINING_COMMANDS:
        raise InputError(f"{command!r} is not a training command ({', '.join(TRAINING_COMMANDS)})")
    register_schemas()
    register_finetune_schemas()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(config_name=TRAINING_COMMANDS[command], overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        first = " ".join(str(err).split("\n")[0].split())
        raise InputError(f"the overrides do not compose into a {command} config: {first}") from None
    finally:
        GlobalHydra.instance().clear()
    return str(run_dir_for(cfg))


def main(argv: list[str] | None = None) -> int:
    from fahr.boundary import InputError

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else EXIT_INPUT_ERROR
    try:
        print(run_dir(args[0], args[1:]))
    except InputError as err:
        print(f"fahr run-dir: error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    return 0
