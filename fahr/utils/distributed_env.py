"""The distributed environment of this process: who launched it, its rank, and the job's shape.

One function reads it (:func:`distributed_env`): torchrun's variables first, then SLURM's, as
facebookresearch/dinov2 does (``dinov2/distributed/__init__.py``), and a half-set environment
fails with the missing variables named instead of silently training as one process.
:func:`trainer_topology` then fills ``trainer.num_nodes`` / ``trainer.devices`` from it.

Imports nothing beyond the standard library, so the CLI can call it before torch loads.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from fahr.boundary import InputError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
SLURM_VARS = ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NNODES")
# Lightning's SLURMEnvironment uses the same names to recognise an allocation used interactively.
INTERACTIVE_JOB_NAMES = ("bash", "interactive")


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a (possibly) distributed run.

    Attributes:
        launcher: "torchrun", "slurm" (a task of an ``srun`` step) or "none" (a single process).
        world_size: processes in the run.
        rank: global rank of this process, in [0, world_size).
        local_rank: rank on this node, in [0, devices_per_node).
        num_nodes: nodes in the run.
        devices_per_node: processes per node (one per GPU).
        master_addr, master_port: rendezvous address, when the environment gives or implies one.
    """

    launcher: str = "none"
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    num_nodes: int = 1
    devices_per_node: int = 1
    master_addr: Optional[str] = None
    master_port: Optional[int] = None

    @property
    def is_distributed(self) -> bool:
        return self.launcher != "none"


def _ints(environ: Mapping[str, str], names: tuple[str, ...], who: str) -> dict[str, int]:
    missing = [n for n in names if not environ.get(n)]
    if missing:
        present = [n for n in names if environ.get(n)]
        raise InputError(
            f"half-set {who} environment: {', '.join(present)} set but {', '.join(missing)} missing; "
            f"set all of {', '.join(names)} (or none of them for a single-process run)"
        )
    try:
        return {n: int(environ[n]) for n in names}
    except ValueError as err:
        raise InputError(f"{who} environment: not an integer in {[(n, environ[n]) for n in names]}") from err


def _port(environ: Mapping[str, str]) -> Optional[int]:
    value = environ.get("MASTER_PORT")
    return int(value) if value else None


def tasks_per_node(value: str) -> list[int]:
    """Expand SLURM's compressed per-node task counts: ``"4(x2),3"`` -> ``[4, 4, 3]``."""
    counts: list[int] = []
    for part in value.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise InputError(f"cannot parse SLURM_TASKS_PER_NODE={value!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"gpu[03-05,9],cpu1"`` -> ``"gpu03"``."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise InputError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    return prefix + re.split(r"[-,]", ranges)[0] if ranges else prefix


def _torchrun(environ: Mapping[str, str]) -> DistEnv:
    v = _ints(environ, TORCHRUN_VARS, "torchrun")
    world, rank, local_rank, local_world = v["WORLD_SIZE"], v["RANK"], v["LOCAL_RANK"], v["LOCAL_WORLD_SIZE"]
    if world < 1 or local_world < 1 or world % local_world:
        raise InputError(f"inconsistent torchrun environment: WORLD_SIZE={world} is not a multiple of "
                         f"LOCAL_WORLD_SIZE={local_world}")
    if not (0 <= rank < world and 0 <= local_rank < local_world):
        raise InputError(f"inconsistent torchrun environment: RANK={rank}, LOCAL_RANK={local_rank} outside "
                         f"WORLD_SIZE={world}, LOCAL_WORLD_SIZE={local_world}")
    return DistEnv("torchrun", world, rank, local_rank, world // local_world, local_world,
                   environ.get("MASTER_ADDR") or None, _port(environ))


def _slurm(environ: Mapping[str, str]) -> DistEnv:
    v = _ints(environ, SLURM_VARS, "SLURM (srun step)")
    world, rank, local_rank, nodes = v["SLURM_NTASKS"], v["SLURM_PROCID"], v["SLURM_LOCALID"], v["SLURM_NNODES"]
    if environ.get("SLURM_NTASKS_PER_NODE"):
        per_node_all = tasks_per_node(environ["SLURM_NTASKS_PER_NODE"])
        source = "SLURM_NTASKS_PER_NODE"
    elif environ.get("SLURM_TASKS_PER_NODE"):
        per_node_all = tasks_per_node(environ["SLURM_TASKS_PER_NODE"])
        source = "SLURM_TASKS_PER_NODE"
    else:
        raise InputError("half-set SLURM (srun step) environment: neither SLURM_NTASKS_PER_NODE nor "
                         "SLURM_TASKS_PER_NODE is set")
    if len(set(per_node_all)) != 1:
        raise InputError(f"SLURM gave nodes different task counts ({source}={environ[source]}); one process per "
                         f"GPU needs the same on every node: submit with --ntasks-per-node")
    per_node = per_node_all[0]
    if len(per_node_all) > 1 and len(per_node_all) != nodes:
        raise InputError(f"inconsistent SLURM environment: {source}={environ[source]} lists "
                         f"{len(per_node_all)} nodes but SLURM_NNODES={nodes}")
    if world != nodes * per_node:
        raise InputError(f"inconsistent SLURM environment: SLURM_NTASKS={world} != SLURM_NNODES={nodes} x "
                         f"{source}={environ[source]} ({nodes * per_node})")
    if not (0 <= rank < world and 0 <= local_rank < per_node):
        raise InputError(f"inconsistent SLURM environment: SLURM_PROCID={rank}, SLURM_LOCALID={local_rank} outside "
                         f"SLURM_NTASKS={world}, {per_node} tasks per node")
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    addr = environ.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else None)
    return DistEnv("slurm", world, rank, local_rank, nodes, per_node, addr, _port(environ))


def distributed_env(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """Read the launcher's variables: torchrun's, else those of an ``srun`` step, else a single process.

    A SLURM allocation alone is not a multi-task run: an ``salloc`` shell (job name ``bash`` or
    ``interactive``) and a batch script's own process (no ``SLURM_STEP_ID``; only ``srun`` starts a
    step) are both "none", so ``fahr pretrain`` typed there runs as one process instead of waiting
    for ranks that never start.

    Raises:
        ValueError: a half-set or inconsistent environment (the variables are named).
    """
    if any(environ.get(n) for n in TORCHRUN_VARS):
        return _torchrun(environ)
    in_step = bool(environ.get("SLURM_STEP_ID"))
    interactive = environ.get("SLURM_JOB_NAME") in INTERACTIVE_JOB_NAMES
    if in_step and not interactive:
        return _slurm(environ)
    return DistEnv()


def _count(devices: Any) -> Optional[int]:
    """Number of devices a ``trainer.devices`` value asks for; None for "auto" / -1 (all of them)."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", "-1"):
            return None
        if "," in text:
            return len([d for d in text.split(",") if d.strip()])
        return int(text)
    return None if devices == -1 else int(devices)


def trainer_topology(trainer_cfg: Mapping[str, Any], env: DistEnv) -> dict[str, Any]:
    """Trainer kwargs with ``num_nodes`` / ``devices`` filled from the launcher where they say "auto".

    Args:
        trainer_cfg: the ``trainer`` config as a plain dict (``devices``: int, list, "auto" or -1;
            ``num_nodes``: int or "auto").
        env: from :func:`distributed_env`.

    Returns:
        A copy of ``trainer_cfg``: under srun/torchrun, ``num_nodes = env.num_nodes`` and
        ``devices = env.devices_per_node`` (processes per node, one per GPU); without a launcher,
        ``num_nodes = 1`` and ``devices`` left to Lightning.

    Raises:
        ValueError: the config contradicts the launcher (e.g. ``num_nodes=4`` under a 2-node job),
            or asks for several nodes with no launcher to start them.
    """
    out = dict(trainer_cfg)
    nodes_cfg = out.get("num_nodes", 1)
    nodes = None if nodes_cfg in ("auto", None) else int(nodes_cfg)
    devices = _count(out.get("devices", "auto"))
    if not env.is_distributed:
        if nodes is not None and nodes > 1:
            raise InputError(
                f"trainer.num_nodes={nodes} but this process was not started by srun or torchrun (a single "
                f"process): launch one process per GPU with `srun` (see slurm/README.md) or torchrun, "
                f"or set trainer.num_nodes=auto"
            )
        out["num_nodes"] = 1
        return out
    asked = f"trainer.num_nodes={nodes_cfg}, trainer.devices={out.get('devices', 'auto')}"
    launched = (f"{env.launcher} started {env.num_nodes} node(s) x {env.devices_per_node} process(es) "
                f"= {env.world_size}")
    hint = (f"set trainer.num_nodes=auto trainer.devices=auto, or launch with --nodes={nodes or env.num_nodes} "
            f"--ntasks-per-node={devices or env.devices_per_node}")
    if nodes is not None and nodes != env.num_nodes:
        raise InputError(f"{asked} contradicts the environment: {launched}; {hint}")
    if devices is not None and devices != env.devices_per_node:
        raise InputError(f"{asked} contradicts the environment: {launched} (one process per device); {hint}")
    out["num_nodes"] = env.num_nodes
    if devices is None:
        out["devices"] = env.devices_per_node
    return out


__all__ = ["DistEnv", "distributed_env", "trainer_topology", "tasks_per_node", "first_host"]
