"""`fahr <subcommand> [hydra overrides...]`.

Start-up stays lazy: ``fahr --help`` imports neither torch nor Lightning; a subcommand imports only
its own module. Each subcommand is a Hydra app, so it takes overrides (``trainer.max_steps=10``),
``--cfg job`` (print the composed config), ``--help`` and ``-m`` (multirun).
"""

from __future__ import annotations

import importlib
import sys

# name -> (module with a Hydra `main`, one-line description)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "shards": ("fahr.cli.shards", "raw photos / cohorts -> aligned, split webdataset shards (conf/shards.yaml)"),
    "pretrain": ("fahr.cli.pretrain", "MAE pretraining of a ViT on webdataset shards (conf/pretrain.yaml)"),
    "export": ("fahr.cli.export", "a run's checkpoint -> export/model.safetensors + model_card.json; "
                                  "format=onnx model=EXPORT_DIR: + model.onnx"),
    "import-weights": ("fahr.cli.import_weights", "published ViT/MAE weights (transformers, MAE, timm) -> an export"),
    "finetune-age": ("fahr.cli.finetune_age", "FAHR-FaceAge: two-stage, age-balanced fine-tune of a backbone"),
    "finetune-survival": ("fahr.cli.finetune_survival", "FAHR-FaceSurvival: Cox fine-tune on images or a feature table"),
    "predict": ("fahr.cli.predict", "raw photos -> detect + align -> FaceAge (and risk) per photo, CSV"),
    "far": ("fahr.cli.far", "photos of the same people over time -> Face Aging Rate per person, CSV"),
    "evaluate": ("fahr.cli.evaluate", "per-patient predictions + clinical columns -> Cox HRs, KM, C-index report"),
    "report": ("fahr.cli.report", "run / export / evaluate / analysis folders -> one self-contained HTML report"),
    "robustness": ("fahr.cli.robustness", "photos -> graded perturbations of the aligned faces -> FaceAge change, tables + figures"),
    "saliency": ("fahr.cli.saliency", "photos -> attention rollout + integrated gradients, per facial region, two models"),
    "demo": ("fahr.cli.demo", "synthetic faces -> pretrain -> FaceAge -> FaceSurvival -> report, on a CPU"),
    "run-dir": ("fahr.cli.run_dir", "print the run directory of a training command with these overrides"),
}

USAGE = """usage: fahr <command> [hydra overrides...]

commands:
{commands}

examples:
  fahr demo
  fahr shards source=utkface input=../shared/data/utkface output=data/utkface align.skip_detection=true
  fahr pretrain experiment=demo_pretrain trainer.max_steps=50
  fahr pretrain experiment=fahr_face_pretrain --cfg job     # print the composed config
  fahr export experiment=demo_pretrain                     # same overrides as the run
  fahr report runs/demo_faceage/<run_id> output=report.html  # one HTML page of a run's results
  fahr export format=onnx model=runs/.../export            # a fine-tuned model's ONNX graph
  fahr <command> --help                                    # the command's config groups
  fahr --debug <command> ...                               # show the traceback of an internal error

Bad input ends with one line on stderr and exit status 2; an internal error (a bug) with exit status 1.
"""


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    return USAGE.format(commands="\n".join(f"  {n:<{width}}  {d}" for n, (_, d) in SUBCOMMANDS.items()))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--debug":  # tracebacks for fahr's own errors (see fahr.cli._hydra.run_command)
        import os

        os.environ["FAHR_DEBUG"] = "1"
        argv = argv[1:]
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0
    if argv[0] in {"-V", "--version"}:
        from fahr import __version__

        print(f"fahr {__version__}")
        return 0
    command = argv[0]
    if command not in SUBCOMMANDS:
        print(f"fahr: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[command][0])
    sys.argv = [f"fahr-{command}", *argv[1:]]
    from fahr.cli import _hydra

    import os

    _hydra.REPORTED.clear()
    debug = _hydra.debug_mode()
    previous = os.environ.get("HYDRA_FULL_ERROR")
    if not debug:
        # Hydra then raises a config it cannot compose (unknown key, wrong type, bad override) instead of
        # printing it over several lines with a hint about this variable; it is reported in one line below.
        # The commands' own errors never reach Hydra (fahr.cli._hydra.run_command reports them).
        os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        status = module.main()  # Hydra apps return None; run-dir its exit status
    except SystemExit as exit_:
        # Hydra exits 1 on what it reports itself (e.g. under a debugger); that is bad input too
        if exit_.code == 1 and not _hydra.REPORTED:
            raise SystemExit(_hydra.EXIT_INPUT_ERROR) from None
        raise
    except Exception as err:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        if debug or _hydra.REPORTED or not isinstance(err, (HydraException, OmegaConfBaseException)):
            raise
        print(f"fahr {command}: error: {_hydra.config_error_line(err)}", file=sys.stderr)
        return _hydra.EXIT_INPUT_ERROR
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
