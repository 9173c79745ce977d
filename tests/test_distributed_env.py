"""fahr.utils.distributed_env: reading torchrun/SLURM variables, and filling the trainer's topology."""

from __future__ import annotations

import pytest

from fahr.utils.distributed_env import DistEnv, distributed_env, first_host, tasks_per_node, trainer_topology

TORCHRUN = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}


def srun_env(ntasks=8, procid=5, localid=1, nnodes=2, per_node="4(x2)", **extra) -> dict[str, str]:
    """What one task of `srun` sees in a `sbatch --nodes=2 --ntasks-per-node=4` job (observed on slurm 22.05)."""
    env = {"SLURM_JOB_ID": "1234", "SLURM_JOB_NAME": "fahr-pretrain", "SLURM_STEP_ID": "0",
           "SLURM_NTASKS": str(ntasks), "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid),
           "SLURM_NNODES": str(nnodes), "SLURM_TASKS_PER_NODE": per_node, "SLURM_NODEID": "1",
           "SLURM_JOB_NODELIST": "gpu[03-04]", "SLURM_STEP_NODELIST": "gpu[03-04]"}
    env.update(extra)
    return env


def test_no_launcher_is_one_process():
    assert distributed_env({}) == DistEnv("none", 1, 0, 0, 1, 1)


def test_torchrun():
    env = distributed_env(TORCHRUN)
    assert env == DistEnv("torchrun", world_size=8, rank=5, local_rank=1, num_nodes=2, devices_per_node=4,
                          master_addr="10.0.0.1", master_port=29500)


def test_torchrun_wins_over_an_enclosing_slurm_allocation():
    assert distributed_env({**srun_env(), **TORCHRUN}).launcher == "torchrun"


def test_slurm_multi_node():
    env = distributed_env(srun_env())
    assert env == DistEnv("slurm", world_size=8, rank=5, local_rank=1, num_nodes=2, devices_per_node=4,
                          master_addr="gpu03", master_port=None)


def test_slurm_single_node_with_ntasks_per_node():
    env = distributed_env(srun_env(ntasks=2, procid=1, localid=1, nnodes=1, per_node="2",
                                   SLURM_NTASKS_PER_NODE="2", SLURM_STEP_NODELIST="vm", MASTER_PORT="15001"))
    assert (env.launcher, env.world_size, env.rank, env.num_nodes, env.devices_per_node) == ("slurm", 2, 1, 1, 2)
    assert (env.master_addr, env.master_port) == ("vm", 15001)


@pytest.mark.parametrize("environ, named", [
    ({"RANK": "0"}, ["WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"]),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, ["LOCAL_WORLD_SIZE"]),
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NNODES": "1",
      "SLURM_TASKS_PER_NODE": "2"}, ["SLURM_NTASKS"]),
    ({k: v for k, v in srun_env().items() if k != "SLURM_TASKS_PER_NODE"}, ["SLURM_TASKS_PER_NODE"]),
], ids=["rank-only", "no-local-world", "slurm-no-ntasks", "slurm-no-tasks-per-node"])
def test_half_set_environment_names_what_is_missing(environ, named):
    with pytest.raises(ValueError, match="half-set") as err:
        distributed_env(environ)
    for name in named:
        assert name in str(err.value)


@pytest.mark.parametrize("environ, named", [
    (srun_env(ntasks=6), ["SLURM_NTASKS=6", "SLURM_NNODES=2"]),
    (srun_env(per_node="4(x3)"), ["SLURM_TASKS_PER_NODE", "SLURM_NNODES=2"]),
    (srun_env(per_node="4,3", ntasks=7), ["different task counts"]),
    ({**TORCHRUN, "WORLD_SIZE": "6"}, ["WORLD_SIZE=6", "LOCAL_WORLD_SIZE=4"]),
    ({**TORCHRUN, "RANK": "8"}, ["RANK=8"]),
], ids=["slurm-world", "slurm-nodes", "slurm-uneven", "torchrun-world", "torchrun-rank"])
def test_inconsistent_environment(environ, named):
    with pytest.raises(ValueError) as err:
        distributed_env(environ)
    for name in named:
        assert name in str(err.value)


def test_interactive_salloc_shell_is_not_a_multi_task_run():
    # `salloc -N2 --ntasks-per-node=4` then a shell: SLURM's variables, but no srun step
    shell = {k: v for k, v in srun_env().items() if k != "SLURM_STEP_ID"}
    assert distributed_env({**shell, "SLURM_JOB_NAME": "bash"}).launcher == "none"
    # interactive step (LaunchParameters=use_interactive_step): a step, but the job name says interactive
    assert distributed_env(srun_env(SLURM_JOB_NAME="interactive")).launcher == "none"


def test_batch_script_process_is_not_a_multi_task_run():
    # the batch script itself (observed): SLURM_NTASKS/PROCID/LOCALID set, no SLURM_STEP_ID
    batch = {k: v for k, v in srun_env(procid=0, localid=0).items() if k != "SLURM_STEP_ID"}
    assert distributed_env(batch).launcher == "none"


def test_slurm_string_helpers():
    assert tasks_per_node("4(x2),3") == [4, 4, 3]
    assert tasks_per_node("8") == [8]
    assert first_host("gpu[03-05,9],cpu1") == "gpu03"
    assert first_host("node7") == "node7"
    assert first_host("a1,b2") == "a1"


TWO_BY_FOUR = DistEnv("slurm", 8, 5, 1, 2, 4)


def test_topology_fills_auto_from_the_launcher():
    out = trainer_topology({"devices": "auto", "num_nodes": "auto", "max_steps": 3}, TWO_BY_FOUR)
    assert out == {"devices": 4, "num_nodes": 2, "max_steps": 3}
    assert trainer_topology({"devices": -1, "num_nodes": 2}, TWO_BY_FOUR)["devices"] == 4


def test_topology_keeps_matching_numbers():
    assert trainer_topology({"devices": 4, "num_nodes": 2}, TWO_BY_FOUR) == {"devices": 4, "num_nodes": 2}
    assert trainer_topology({"devices": [0, 1, 2, 3], "num_nodes": "auto"}, TWO_BY_FOUR)["num_nodes"] == 2


@pytest.mark.parametrize("cfg, named", [
    ({"devices": 8, "num_nodes": 4}, "trainer.num_nodes=4"),
    ({"devices": 8, "num_nodes": "auto"}, "trainer.devices=8"),
])
def test_topology_contradicting_the_launcher_fails(cfg, named):
    with pytest.raises(ValueError, match="contradicts the environment") as err:
        trainer_topology(cfg, TWO_BY_FOUR)
    assert named in str(err.value) and "2 node(s) x 4" in str(err.value)


def test_topology_without_launcher():
    assert trainer_topology({"devices": "auto", "num_nodes": "auto"}, DistEnv()) == {"devices": "auto", "num_nodes": 1}
    assert trainer_topology({"devices": 2, "num_nodes": 1}, DistEnv()) == {"devices": 2, "num_nodes": 1}
    with pytest.raises(ValueError, match="srun or torchrun"):
        trainer_topology({"devices": 8, "num_nodes": 4}, DistEnv())
