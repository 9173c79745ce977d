"""DeepSpeed checkpoint folders: consolidated to fp32 weights-only, resumed weights-only.

Real checkpoints are written by DeepSpeed itself on the CPU (ZeRO stages 2 and 3, fp32 and bf16,
1 and 2 data-parallel ranks started by torchrun), with a frozen parameter and a buffer, as Lightning
lays them out (tag ``checkpoint``, the Lightning state as DeepSpeed's client state). The reference is
DeepSpeed's own ``zero_to_fp32`` (which unpickles: run here only on files this test wrote).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, compose_config
from fahr.boundary import InputError
from fahr.utils.checkpoint_io import consolidate_deepspeed_checkpoint, load_checkpoint_file, load_deepspeed_file

pytest.importorskip("deepspeed")
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
CASES = [(stage, precision) for stage in (2, 3) for precision in ("fp32", "bf16")]

DRIVER = r'''
import json, os, sys
from pathlib import Path
import torch
import deepspeed
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from fahr.utils.strategies import load_checkpoints_weights_only

out = Path(sys.argv[1])
rank = int(os.environ["RANK"])
for stage in (2, 3):
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.LayerNorm(10), torch.nn.ReLU(),
                                    torch.nn.Linear(10, 7), torch.nn.Linear(7, 3))
        model.register_buffer("age_bins", torch.arange(5, dtype=torch.float32))
        model[0].requires_grad_(False)  # frozen, as FaceAge stage 1 freezes the backbone
        config = {"train_batch_size": 4 * int(os.environ["WORLD_SIZE"]), "zero_optimization": {"stage": stage},
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}, "zero_force_ds_cpu_optimizer": False}
        if precision == "bf16":
            config["bf16"] = {"enabled": True}
        engine, *_ = deepspeed.initialize(model=model, config=config,
                                          model_parameters=[p for p in model.parameters() if p.requires_grad])
        for step in range(3):
            x = torch.randn(4, 6, generator=torch.Generator().manual_seed(100 * rank + step))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):  # frozen layer: fp32
                loss = engine(x).float().pow(2).mean()
            engine.backward(loss)
            engine.step()
        folder = out / f"stage{stage}-{precision}.ckpt"
        engine.save_checkpoint(str(folder), tag="checkpoint", client_state={"global_step": 3, "epoch": 0})
        torch.distributed.barrier()
        if rank == 0:
            reference = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="checkpoint")
            torch.save({k: v.clone() for k, v in reference.items()}, out / f"stage{stage}-{precision}.reference.pt")
        # resume through the weights-only loader: the state after loading equals the state saved
        saved = {k: v.float().clone() for k, v in engine.module.state_dict().items()} if stage == 2 else None
        load_checkpoints_weights_only(engine)
        with torch.no_grad():
            for p in engine.module.parameters():
                p.add_(1.0) if p.numel() else None
        _, client = engine.load_checkpoint(str(folder), tag="checkpoint")
        ok = client["global_step"] == 3
        if saved is not None:
            ok = ok and all(torch.equal(v.float(), saved[k]) for k, v in engine.module.state_dict().items())
        (out / f"resumed-{stage}-{precision}-rank{rank}.json").write_text(json.dumps({"ok": bool(ok)}))
# Without an orderly shutdown, about one 2-rank run in six aborted at interpreter exit ("terminate called
# without an active exception", a communication thread still joinable) after all its work was written.
torch.distributed.barrier()
deepspeed.comm.destroy_process_group()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[1, 2], ids=["1-rank", "2-ranks"])
def checkpoints(request, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp(f"deepspeed-{request.param}")
    (out / "driver.py").write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env.update(OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    proc = subprocess.run([TORCHRUN, f"--nproc_per_node={request.param}", f"--master_port={_free_port()}",
                           str(out / "driver.py"), str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage,precision", CASES)
def test_consolidation_equals_deepspeeds_own_fp32_weights(checkpoints, stage, precision):
    ckpt = load_checkpoint_file(checkpoints / f"stage{stage}-{precision}.ckpt", required=("state_dict", "global_step"))
    reference = torch.load(checkpoints / f"stage{stage}-{precision}.reference.pt", weights_only=True)
    got = ckpt["state_dict"]
    assert got.keys() == reference.keys()
    assert {"0.weight", "age_bins", "1.weight", "4.bias"} <= got.keys()
    for name, tensor in reference.items():
        assert got[name].shape == tensor.shape and torch.equal(got[name].to(tensor.dtype), tensor), name
    assert ckpt["global_step"] == 3 and ckpt["epoch"] == 0 and "module" not in ckpt


@pytest.mark.slow
@pytest.mark.parametrize("stage,precision", CASES)
def test_resume_reads_deepspeeds_files_weights_only(checkpoints, stage, precision):
    reports = [json.loads(p.read_text()) for p in checkpoints.glob(f"resumed-{stage}-{precision}-rank*.json")]
    assert reports and all(r["ok"] for r in reports)


def test_a_tag_that_leaves_the_folder_is_refused(tmp_path):
    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    (folder / "latest").write_text("../../elsewhere")
    with pytest.raises(InputError, match="must name a folder inside it"):
        consolidate_deepspeed_checkpoint(folder)
    (folder / "latest").write_text("checkpoint")
    with pytest.raises(InputError, match="no model/optimizer states"):
        consolidate_deepspeed_checkpoint(folder)
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match="not a DeepSpeed checkpoint"):
        load_checkpoint_file(tmp_path / "plain")


class _Runs:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_deepspeed_file_holding_code_is_refused_unread(tmp_path):
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with open(path, "wb") as f:
        pickle.dump({"optimizer_state_dict": _Runs()}, f)
    with pytest.raises(InputError, match="never unpickles code"):
        load_deepspeed_file(path)


EXPORT_DRIVER = r'''
import sys
from pathlib import Path
import torch
import deepspeed
from fahr.tasks.pretrain import MAEPretrainTask
from fahr.utils.checkpoint_io import load_checkpoint_file

ckpt_file, folder = Path(sys.argv[1]), Path(sys.argv[2])
ckpt = load_checkpoint_file(ckpt_file)
task = MAEPretrainTask(**ckpt["hyper_parameters"])
task.load_state_dict(ckpt["state_dict"])
config = {"train_batch_size": 2, "zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW", "params": {"lr": 0.0}},
          "zero_force_ds_cpu_optimizer": False}
engine, *_ = deepspeed.initialize(model=task, config=config, model_parameters=list(task.parameters()))
client = {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer_states")}
engine.save_checkpoint(str(folder), tag="checkpoint", client_state=client)  # as Lightning's DeepSpeedStrategy does
'''


@pytest.mark.slow
def test_fahr_export_reads_a_zero3_checkpoint_folder(tiny_overrides, tmp_path):
    """A pretraining run whose last.ckpt is a ZeRO-3 folder (its weights written by DeepSpeed from the
    run's own checkpoint) exports the same encoder as the single-file checkpoint."""
    from safetensors.torch import load_file

    from fahr.pipeline.export import export
    from fahr.pipeline.pretrain import pretrain

    cfg = compose_config("pretrain", [*tiny_overrides, "trainer.max_steps=2"])
    run_dir = pretrain(cfg).run_dir
    from_file = load_file(str(export(cfg) / "model.safetensors"))
    last = run_dir / "checkpoints" / "last.ckpt"
    kept = tmp_path / "last-file.ckpt"
    last.rename(kept)
    (tmp_path / "driver.py").write_text(EXPORT_DRIVER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env.update(OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    proc = subprocess.run([TORCHRUN, "--nproc_per_node=1", f"--master_port={_free_port()}", str(tmp_path / "driver.py"),
                           str(kept), str(last)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert last.is_dir() and (last / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    shutil.rmtree(run_dir / "export")
    from_folder = load_file(str(export(cfg) / "model.safetensors"))
    assert from_file.keys() == from_folder.keys()
    assert all(torch.equal(from_file[k], from_folder[k]) for k in from_file)
