"""The options of ``fahr shards``: one typed structure for the command's config (``conf/shards.yaml``,
checked by Hydra against :class:`ShardsConfig`) and for :func:`data_pipelines.build.build_shards`
(:class:`BuildOptions`, the same fields without the command's source, input and output), with every
range checked in one place (:func:`check_options`) before any work.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from omegaconf import MISSING

from fahr.boundary import InputError
from fahr.data.shard_index import SPLIT_NAME  # split names become file names and index.json#<split>
from fahr.faces.options import AlignOptions, check_align_options

MAX_CHUNK_SIZE = 100_000  # a chunk's photo bytes are held in memory, per process
MAX_SAMPLES_PER_SHARD = 1_000_000
MAX_NEAR_THRESHOLD = 7  # multi-index hashing finds every pair only below 8 bits
STRATIFY = ("auto", "age", "event", "none")


@dataclass
class SplitOptions:
    """Person-disjoint splits: ``fractions`` (>= 0, summing to 1) per split name; ``seed`` keys the
    assignment; ``stratify``: ``age`` (decade of the person's first photo), ``event`` (survival
    event), ``none``, or ``auto`` (event for cohorts, age otherwise)."""
    # A command-line {..} is merged into this default: give every split (0 for one you do not
    # want) or drop one with ~split.fractions.val
    fractions: dict[str, float] = field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    seed: str = "fahr"
    stratify: str = "auto"


@dataclass
class DedupOptions:
    """Exact and near duplicates (a pHash within ``near_threshold`` of 64 bits) are dropped."""
    enabled: bool = True
    near_threshold: int = 6


@dataclass
class DeidOptions:
    """De-identification: hashed ids, dates as days, only ``allowed_labels`` kept. ``enabled``: null
    (on for the cohort source, off otherwise), true or false. ``key_file``: the salt (else
    ``$FAHR_DEID_SALT``)."""
    enabled: Optional[bool] = None
    key_file: Optional[str] = None
    allowed_labels: list[str] = field(
        default_factory=lambda: ["age", "sex", "race", "followup_days", "event", "diagnosis"])


@dataclass
class BuildOptions:
    """How a source becomes shards (see :mod:`data_pipelines.build`)."""
    processes: int = 1  # 1 to 4 per usable CPU
    chunk_size: int = 2000  # source items per chunk (held in memory)
    samples_per_shard: int = 1000
    split: SplitOptions = field(default_factory=SplitOptions)
    dedup: DedupOptions = field(default_factory=DedupOptions)
    deid: DeidOptions = field(default_factory=DeidOptions)
    align: AlignOptions = field(default_factory=AlignOptions)

    def resolved(self, source: str) -> "BuildOptions":
        """The options with ``auto`` / null settled for ``source`` (cohorts: stratified by event and
        de-identified)."""
        cohort = source == "cohort"
        stratify = self.split.stratify if self.split.stratify != "auto" else ("event" if cohort else "age")
        enabled = cohort if self.deid.enabled is None else self.deid.enabled
        return replace(self, split=replace(self.split, stratify=stratify), deid=replace(self.deid, enabled=enabled))


STAGES = ("hash", "group", "assign", "write", "final")  # data_pipelines.plan, in order
LAUNCHERS = ("local", "slurm")
MAX_TASKS = 10_000


@dataclass
class LauncherOptions:
    """How ``fahr shards`` runs its stages (:mod:`data_pipelines.plan`): ``kind`` ``local`` (in this
    process, each stage as ``tasks`` tasks one after another) or ``slurm`` (submit each stage as an
    array job of ``tasks`` tasks, each depending on the stage before, and return; ``wait``: block
    until the graph ends, exit 1 if a job failed). ``stages`` and ``array`` resubmit part of a graph
    (e.g. ``stages=[write,final] array=1``: write task 1 again, then the final step). ``template``:
    the sbatch script (null: slurm/shards.sbatch of this checkout); ``sbatch_args``: extra sbatch
    options (account, partition, time). ``stage``/``task``/``run`` are set by the template: run one
    task of one stage of run ``run``."""
    kind: str = "local"
    tasks: int = 1
    wait: bool = False
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    array: Optional[str] = None
    template: Optional[str] = None
    sbatch_args: list[str] = field(default_factory=list)
    poll_seconds: float = 10.0
    stage: Optional[str] = None
    task: Optional[int] = None
    run: Optional[str] = None


def check_launcher(launcher: Any) -> None:
    """The ``launcher.*`` options; InputError naming the key."""
    if launcher.kind not in LAUNCHERS:
        raise InputError(f"launcher must be one of {', '.join(LAUNCHERS)} (launcher=slurm), got {launcher.kind!r}")
    if not _is_int(launcher.tasks) or not 1 <= launcher.tasks <= MAX_TASKS:
        raise InputError(f"launcher.tasks must be an integer in [1, {MAX_TASKS}], got {launcher.tasks!r}")
    stages = list(launcher.stages)
    if not stages or stages[0] not in STAGES or stages != list(STAGES[STAGES.index(stages[0]):]):
        raise InputError(f"launcher.stages must be the stages from one of them to the end, in order "
                         f"({', '.join(STAGES)}), got {stages}")
    if launcher.stage is not None:
        if launcher.stage not in STAGES:
            raise InputError(f"launcher.stage must be one of {', '.join(STAGES)}, got {launcher.stage!r}")
        if not _is_int(launcher.task) or not 0 <= launcher.task < launcher.tasks:
            raise InputError(f"launcher.task must be an integer in [0, {launcher.tasks}), got {launcher.task!r}")
        if not isinstance(launcher.run, str) or not launcher.run:
            raise InputError("launcher.run must name the run the task belongs to (set by slurm/shards.sbatch)")
    if not _is_number(launcher.poll_seconds) or launcher.poll_seconds <= 0:
        raise InputError(f"launcher.poll_seconds must be a number > 0, got {launcher.poll_seconds!r}")


@dataclass
class ShardsConfig(BuildOptions):
    """``fahr shards``: a source, its folder and options, and the output folder."""
    source: str = MISSING
    input: str = MISSING
    output: str = MISSING
    source_options: dict[str, Any] = field(default_factory=dict)  # +source_options.<key>=... (checked per source)
    launcher: LauncherOptions = field(default_factory=LauncherOptions)


def register_shards_schema() -> None:
    """Register :class:`ShardsConfig` as ``shards_schema`` with Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="shards_schema", node=ShardsConfig)


def build_options(config: Any) -> BuildOptions:
    """The :class:`BuildOptions` of a ``fahr shards`` config (a DictConfig or a ShardsConfig)."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else dict(vars(config))
    return BuildOptions(processes=data["processes"], chunk_size=data["chunk_size"],
                        samples_per_shard=data["samples_per_shard"], split=SplitOptions(**data["split"]),
                        dedup=DedupOptions(**data["dedup"]), deid=DeidOptions(**data["deid"]),
                        align=AlignOptions(**data["align"]))


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def max_processes() -> int:
    """The largest ``processes`` accepted: 4 per usable CPU (at least 4); each process holds a
    chunk's photos and a face detector, and more processes than cores only add memory."""
    return max(4, 4 * _usable_cpus())


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_options(options: BuildOptions) -> None:
    """Every build option, before any work; raises :class:`InputError` naming the config key
    (``conf/shards.yaml``) and what is accepted."""

    def int_in(key: str, value: Any, low: int, high: int, why: str = "") -> None:
        if not _is_int(value) or not low <= value <= high:
            raise InputError(f"{key} must be an integer in [{low}, {high}]{why}, got {value!r}")

    fractions = options.split.fractions
    if not isinstance(fractions, dict) or not fractions:
        raise InputError(f"split.fractions must map split names to fractions, e.g. {{train: 0.8, test: 0.2}}, "
                         f"got {fractions!r}")
    for name, fraction in fractions.items():
        if not isinstance(name, str) or not SPLIT_NAME.fullmatch(name):
            raise InputError(f"split.fractions: split name {name!r} must be a letter then up to 31 letters, digits "
                             "or '_' (it becomes a file name, <split>-000000.tar)")
        if not _is_number(fraction) or fraction < 0:
            raise InputError(f"split.fractions.{name} must be a finite number >= 0, got {fraction!r}")
    if abs(sum(fractions.values()) - 1.0) > 1e-9:
        raise InputError(f"split.fractions must sum to 1, got {sum(fractions.values())!r} ({dict(fractions)})")
    if not isinstance(options.split.seed, str):
        raise InputError(f"split.seed must be a string, got {type(options.split.seed).__name__}")
    if options.split.stratify not in STRATIFY:
        raise InputError(f"split.stratify must be one of {', '.join(STRATIFY)}, got {options.split.stratify!r}")
    if not isinstance(options.dedup.enabled, bool):
        raise InputError(f"dedup.enabled must be true or false, got {options.dedup.enabled!r}")
    int_in("dedup.near_threshold", options.dedup.near_threshold, 0, MAX_NEAR_THRESHOLD,
           " (pHash bits; the duplicate search finds every pair only below 8)")
    if options.deid.enabled is not None and not isinstance(options.deid.enabled, bool):
        raise InputError(f"deid.enabled must be true, false or null (on for cohorts), got {options.deid.enabled!r}")
    labels = options.deid.allowed_labels
    if not isinstance(labels, (list, tuple)) or not all(isinstance(x, str) and x for x in labels):
        raise InputError(f"deid.allowed_labels must be a list of label names, got {labels!r}")
    int_in("samples_per_shard", options.samples_per_shard, 1, MAX_SAMPLES_PER_SHARD)
    int_in("chunk_size", options.chunk_size, 1, MAX_CHUNK_SIZE, " (photos per chunk, held in memory)")
    int_in("processes", options.processes, 1, max_processes(), f" (4 per usable CPU; {_usable_cpus()} here)")
    check_align_options(options.align)
