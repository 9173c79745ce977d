"""`fahr shards`: a ``ShardsConfig`` -> data_pipelines.build, with a progress bar and a summary.

Everything the command is given is checked before any work, each failure one line naming the key
(:func:`check_config`): the source and its ``source_options`` (an unknown key or a value of the
wrong kind), the input folder, every build option (``data_pipelines.options.check_options``: ranges
of ``split.fractions``, ``chunk_size``, ``samples_per_shard``, ``processes``, ``align.*``, ...),
``deid.key_file``; then the output (``data_pipelines.build.check_output``). The options are one
structure (:mod:`data_pipelines.options`) from the config to the build.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from data_pipelines.options import ShardsConfig, build_options, check_options
from fahr.boundary import InputError, printable_path, read_json_file
from fahr.config.schema import validate


def check_config(cfg: DictConfig):
    """Check a shards config before any work; returns ``(BuildOptions, source_options)``.

    Raises:
        InputError: naming the key: unknown source, unknown or ill-typed ``source_options``, an input
            that is not a folder, an option out of range, a ``deid.key_file`` that is not a regular
            file or is given while de-identification is off.
    """
    from data_pipelines.sources import check_source_options

    source_options = OmegaConf.to_container(cfg.source_options, resolve=True)
    check_source_options(cfg.source, source_options)
    if not str(cfg.input).strip():
        raise InputError("input: empty path; give the folder that holds the data set")
    if not Path(cfg.input).is_dir():
        what = "is not a directory" if Path(cfg.input).exists() else "does not exist"
        raise InputError(f"input={printable_path(cfg.input)} {what}; give the folder that holds the data set")
    options = build_options(cfg)
    try:
        check_options(options)
    except InputError as err:
        if str(err).startswith("split.fractions must sum to 1"):
            raise InputError(f"{err}; note that split.fractions={{...}} on the command line is merged into the "
                             "default {train: 0.8, val: 0.1, test: 0.1}: give every split, 0 for one you do not "
                             "want (split.fractions={train:0.8,val:0,test:0.2}) or drop it (~split.fractions.val)"
                             ) from None
        raise
    if options.deid.key_file is not None:
        if not options.resolved(cfg.source).deid.enabled:
            raise InputError(f"deid.key_file is set but de-identification is off (deid.enabled={cfg.deid.enabled}, "
                             f"source={cfg.source}); drop deid.key_file or set deid.enabled=true")
        key = Path(options.deid.key_file)
        if not key.is_file():
            what = "does not exist" if not key.exists() else "is not a regular file"
            raise InputError(f"deid.key_file={printable_path(key)} {what}; expected a file holding the secret salt")
        if key.stat().st_size == 0:
            raise InputError(f"deid.key_file={printable_path(key)} is empty; expected a file holding the secret salt")
    return options, source_options


def summary_table(index: dict[str, Any]) -> str:
    rows = [("read", index["read"])]
    rows += [(f"written: {split}", e["count"]) for split, e in index["splits"].items()]
    rows += [(f"rejected: {reason}", n) for reason, n in index["rejected"].items()]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {name:<{width}}  {n:>9,}" for name, n in rows)


def shards(cfg: DictConfig) -> dict[str, Any]:
    """``fahr shards``: the whole build here (``launcher=local``), one task of it (``launcher.stage``,
    what slurm/shards.sbatch runs), or the job graph submitted to SLURM (``launcher=slurm``)."""
    from tqdm import tqdm

    from data_pipelines.build import build_shards, run_task
    from data_pipelines.options import check_launcher
    from data_pipelines.sources import get_source

    validate(cfg, ShardsConfig)  # unknown keys, wrong types, unset required keys: InputError
    options, source_options = check_config(cfg)
    launcher = cfg.launcher
    check_launcher(launcher)
    iter_records = get_source(cfg.source)

    def make_items():
        return iter_records(cfg.input, **source_options)

    if launcher.stage is not None:
        result = run_task(launcher.stage, launcher.task, launcher.tasks, launcher.run, cfg.source, make_items,
                          cfg.output, options, inputs=(cfg.input,))
        print(f"fahr shards: {launcher.stage} task {launcher.task + 1}/{launcher.tasks} done")
        return result
    if launcher.kind == "slurm":
        return submit_graph(cfg, options)
    with tqdm(desc=f"{cfg.source} -> shards", unit="photo") as bar:
        index = build_shards(cfg.source, make_items, cfg.output, options, progress=bar.update, inputs=(cfg.input,),
                             tasks=launcher.tasks)
    print(f"\nfahr shards: {cfg.output}/index.json\n{summary_table(index)}")
    return index


# ---- SLURM: the job graph -------------------------------------------------------------------------

def _template(launcher: Any) -> Path:
    path = Path(launcher.template) if launcher.template else Path(__file__).resolve().parents[2] / "slurm" / "shards.sbatch"
    if not path.is_file():
        raise InputError(f"launcher.template={printable_path(path)} is not a file; give the sbatch script "
                         "(slurm/shards.sbatch of a fahr checkout)")
    return path


def _passed_overrides() -> list[str]:
    """The command line's overrides, for the jobs (without ``launcher``: the jobs get their own)."""
    from hydra.core.hydra_config import HydraConfig

    out = []
    for item in HydraConfig.get().overrides.task:
        key = item.lstrip("~+").split("=", 1)[0]
        if key != "launcher" and not key.startswith("launcher."):
            out.append(item)
    return out


def submit_graph(cfg: DictConfig, options: Any) -> dict[str, Any]:
    """Submit ``launcher.stages`` as SLURM jobs (array jobs of ``launcher.tasks`` tasks; ``final``: one
    job), each ``--dependency=afterok`` on the one before, logging to ``<output>/parts/logs/``; print
    the job ids; with ``launcher.wait`` block until all ended. Returns ``{"run": ..., "jobs": {stage:
    job id}}``, plus ``"failed": {stage: [task states]}`` if a job did not complete (the command then
    exits 1)."""
    import os
    import secrets
    import shutil
    import subprocess
    import sys

    from data_pipelines import plan
    from data_pipelines.build import _Lock, _prepare

    launcher = cfg.launcher
    if shutil.which("sbatch") is None:
        raise InputError("launcher=slurm: sbatch is not on PATH; run on a SLURM login node (or launcher=local)")
    template = _template(launcher)
    resolved, _, output = _prepare(cfg.source, cfg.output, options, (cfg.input,))
    _Lock(output / "parts").release()  # refused while a local `fahr shards` writes there
    stages = list(launcher.stages)
    if stages[0] == "hash":
        run = secrets.token_hex(8)
        plan.start_run(output, cfg.source, resolved, launcher.tasks, run)
    else:  # a part of an earlier graph again: its run
        info = plan.read_run(output)
        run = info["run"]
        plan.check_run(output, cfg.source, resolved, launcher.tasks, run)
    logs = output / "parts" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("FAHR", f"{sys.executable} -m fahr.cli.main")  # the jobs run this very fahr
    overrides = _passed_overrides()
    jobs: dict[str, str] = {}
    previous = None
    for stage in stages:
        cores = options.processes if stage in ("hash", "write") else 1  # group, assign, final: one process
        cmd = ["sbatch", "--parsable", f"--job-name=fahr-shards-{stage}", f"--cpus-per-task={cores}",
               "--kill-on-invalid-dep=yes"]
        if stage == "final":
            cmd.append(f"--output={logs}/{stage}-%j.out")
        else:
            array = launcher.array if stage == stages[0] and launcher.array else f"0-{launcher.tasks - 1}"
            cmd += [f"--array={array}", f"--output={logs}/{stage}-%A_%a.out"]
        if previous is not None:
            cmd.append(f"--dependency=afterok:{previous}")
        cmd += [*launcher.sbatch_args, str(template), stage, *overrides,
                f"launcher.tasks={launcher.tasks}", f"launcher.run={run}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        if proc.returncode != 0:
            for job in jobs.values():  # no half graph left behind
                subprocess.run(["scancel", job], timeout=60)
            raise InputError(f"sbatch refused the {stage} jobs: {proc.stderr.strip() or proc.stdout.strip()}")
        previous = jobs[stage] = proc.stdout.strip().split(";")[0]
    print(f"fahr shards: submitted {', '.join(f'{s} {j}' for s, j in jobs.items())} "
          f"({launcher.tasks} tasks per stage); logs in {logs}")
    if launcher.wait:
        states = wait_for_jobs(jobs, launcher.poll_seconds)
        failed = {s: st for s, st in states.items() if set(st) != {"COMPLETED"}}
        if failed:  # fahr/cli/shards.py exits 1
            print(f"fahr shards: the job graph failed: {failed}; see {logs}", file=sys.stderr)
            return {"run": run, "jobs": jobs, "failed": failed}
        print(f"fahr shards: done: {cfg.output}/index.json\n"
              f"{summary_table(read_json_file(output / 'index.json', 'shard index'))}")
    return {"run": run, "jobs": jobs}


ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE"}


def job_states(job: str) -> list[str]:
    """The state of each task of a SLURM job (``scontrol show job``), [] once SLURM forgot it."""
    import re
    import subprocess

    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=60)
    return re.findall(r"\bJobState=(\S+)", out.stdout) if out.returncode == 0 else []


def wait_for_jobs(jobs: dict[str, str], poll_seconds: float) -> dict[str, list[str]]:
    """Block until every job ended; {stage: [state of each task]}, printing a line when a state changes."""
    import time

    last: dict[str, list[str]] = {}
    while True:
        states = {stage: job_states(job) or last.get(stage, ["UNKNOWN"]) for stage, job in jobs.items()}
        if states != last:
            print("fahr shards: " + ", ".join(f"{s} {_counts(st)}" for s, st in states.items()), flush=True)
            last = states
        if all(st and set(st) <= ENDED | {"UNKNOWN"} for st in states.values()):
            return states
        time.sleep(poll_seconds)


def _counts(states: list[str]) -> str:
    from collections import Counter

    return "/".join(f"{n} {s.lower()}" for s, n in sorted(Counter(states).items()))
