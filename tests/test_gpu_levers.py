"""The GPU recipe's levers as options, tested on the CPU where they can be: regional torch.compile
(`trainer.compile`), FLOPs per sample and MFU (`trainer.measure_flops`), DDP gradient compression
(`trainer.strategy.comm_hook`)."""

from __future__ import annotations

import csv

import pytest
import torch

from conftest import compose_config


def _losses(run_dir) -> list[float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [float(r["train/loss_step"]) for r in csv.DictReader(f) if r.get("train/loss_step")]


def _logged(run_dir, key: str) -> list[float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key)]


@pytest.mark.slow
def test_compiled_blocks_train_the_same_and_checkpoints_keep_their_names(tiny_overrides, tmp_path):
    from fahr.pipeline.export import export
    from fahr.pipeline.pretrain import pretrain
    from fahr.utils.checkpoint_io import load_checkpoint_file

    plain = pretrain(compose_config("pretrain", [*tiny_overrides, "experiment_name=plain"]))
    compiled_cfg = compose_config("pretrain", [*tiny_overrides, "experiment_name=compiled", "trainer.compile=true"])
    compiled = pretrain(compiled_cfg)
    a, b = _losses(plain.run_dir), _losses(compiled.run_dir)
    assert len(a) == len(b) == 4 and a == pytest.approx(b, rel=1e-4, abs=1e-5)
    keys = lambda r: set(load_checkpoint_file(r.run_dir / "checkpoints" / "last.ckpt", required=("state_dict",))["state_dict"])  # noqa: E731
    assert keys(plain) == keys(compiled) and not any("_orig_mod" in k for k in keys(compiled))
    export(compiled_cfg)  # a compiled run exports as any other (same names)


def test_compile_blocks_compiles_every_vit_block_in_place():
    from fahr.job import compile_blocks
    from fahr.models import MaskedAutoencoder, create_backbone

    mae = MaskedAutoencoder(create_backbone("vit_test", img_size=32), decoder_depth=3)
    names = set(mae.state_dict())
    assert compile_blocks(mae) == 2 + 3  # encoder and decoder blocks
    assert set(mae.state_dict()) == names


def test_flops_per_sample_of_the_mae_step_match_the_arithmetic(tiny_overrides):
    """`trainer.measure_flops=true` counts the first step with torch's FlopCounterMode. Exactly the
    arithmetic of docs/scaling.md for the matmuls: forward 2 x rows x in x out per linear layer, backward
    twice that, except the patch embedding, whose input (the images) needs no gradient. The attention
    scores (4 n^2 d per layer in the scaling model) are not counted on a CPU: torch's counter knows the
    GPU attention kernels (flash, memory-efficient, cuDNN), not the CPU one."""
    from fahr.pipeline.pretrain import pretrain

    cfg = compose_config("pretrain", [*tiny_overrides, "trainer.measure_flops=true"])
    run = pretrain(cfg)
    (measured,) = _logged(run.run_dir, "perf/flops_per_sample")
    size, patch, ratio = cfg.data.image_size, cfg.model.patch_size, cfg.task.mask_ratio
    n_patches = (size // patch) ** 2
    n_enc = round(n_patches * (1 - ratio)) + 1  # visible patches + the class token
    d, depth, dd, ddepth = 64, 2, cfg.task.decoder_dim, cfg.task.decoder_depth  # vit_test: width 64, 2 layers
    layer = lambda n, w, mlp: 2 * n * w * w * (4 + 2 * mlp)  # noqa: E731 (QKV + projection: 4 w^2; MLP: 2 mlp w^2)
    patch_embed = 2 * n_patches * 3 * patch * patch * d
    rest = (depth * layer(n_enc, d, 2) + 2 * n_enc * d * dd  # encoder (MLP ratio 2), decoder embedding
            + ddepth * layer(n_patches + 1, dd, 4) + 2 * n_patches * dd * 3 * patch * patch)  # decoder, pixel head
    assert measured == 2 * patch_embed + 3 * rest
    assert not _logged(run.run_dir, "perf/mfu"), "no MFU without a known peak (a CPU)"


def test_mfu_is_achieved_over_peak_flops():
    from fahr.job import ThroughputMonitor, peak_flops

    assert peak_flops("cpu", 0, "32-true") is None
    monitor = ThroughputMonitor(measure_flops=True, peak_flops=1e12)
    logged = {}

    class Module:
        def log(self, key, value, **_):
            logged[key] = value

    class Logger:
        def log_metrics(self, metrics, step):
            logged.update(metrics)

    class Trainer:
        world_size, log_every_n_steps, global_step, is_global_zero, loggers = 2, 1, 0, True, [Logger()]

    batch = {"image": torch.zeros(8, 3, 4, 4)}
    monitor.on_train_batch_start(Trainer, Module(), batch, 0)
    torch.ones(8, 16) @ torch.ones(16, 32)  # 2 x 8 x 16 x 32 = 8,192 FLOPs, 1,024 per sample
    monitor.on_train_batch_end(Trainer, Module(), None, batch, 0)
    assert logged["perf/flops_per_sample"] == 1024
    monitor._t0 -= 1.0  # one second later, two ranks of 8 samples
    Trainer.global_step = 1
    monitor.on_train_batch_end(Trainer, Module(), None, batch, 1)
    rate = logged["perf/images_per_sec"]
    assert logged["perf/mfu"] == pytest.approx(rate * 1024 / 2e12)


@pytest.mark.parametrize("hook, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_comm_hook_option_builds_ddp_with_pytorch_compression_hook(hook, dtype):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from fahr.utils.strategies import build_strategy

    strategy = build_strategy({"name": "ddp", "comm_hook": hook})
    assert strategy._ddp_comm_hook is getattr(default_hooks, f"{hook}_compress_hook")


def test_comm_hook_errors_name_the_option():
    from fahr.boundary import InputError
    from fahr.utils.strategies import build_strategy

    with pytest.raises(InputError, match="comm_hook='int8'"):
        build_strategy({"name": "ddp", "comm_hook": "int8"})
    with pytest.raises(InputError, match="comm_hook do not apply to fsdp"):
        build_strategy({"name": "fsdp", "comm_hook": "bf16"})


@pytest.mark.slow
def test_bf16_comm_hook_runs_on_two_ranks_and_compresses_the_gradients(tiny_overrides, tmp_path):
    """Two gloo ranks (torchrun, the shipped command), with and without trainer.strategy.comm_hook=bf16:
    the same run within bf16's rounding of the all-reduced gradients, and not bit-identical weights (the
    hook is on; the first AdamW steps follow the gradients' signs, so the losses agree closely)."""
    from test_job import _torchrun

    from fahr.utils.checkpoint_io import load_checkpoint_file

    losses, weights = {}, {}
    for hook in ("null", "bf16"):
        root = tmp_path / hook
        args = ["-m", "fahr.cli.main", "pretrain", *[o for o in tiny_overrides if not o.startswith("paths.root_dir")],
                f"paths.root_dir={root}", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=auto",
                "trainer.precision=32-true", f"trainer.strategy.comm_hook={hook}"]
        proc = _torchrun(args)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        (run_dir,) = [p for p in (root / "runs").glob("*/*") if (p / "metrics.csv").is_file()]
        losses[hook] = _losses(run_dir)
        weights[hook] = load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt", required=("state_dict",))["state_dict"]
    assert len(losses["bf16"]) == 4 and losses["bf16"] == pytest.approx(losses["null"], rel=1e-3)
    moved = [k for k in weights["null"] if not torch.equal(weights["null"][k], weights["bf16"][k])]
    assert moved, "bf16 compression left every weight bit-identical: the hook is not on"
    for k in moved:
        torch.testing.assert_close(weights["bf16"][k], weights["null"][k], rtol=1e-2, atol=1e-4)


def test_one_node_experiment_keeps_the_recipes_global_batch_and_schedule():
    """experiment=fahr_face_pretrain_1node: docs/scaling.md's compute-bound layout of the same recipe."""
    recipe = compose_config("pretrain", ["experiment=fahr_face_pretrain"])
    one = compose_config("pretrain", ["experiment=fahr_face_pretrain_1node"])
    global_batch = lambda c: c.trainer.num_nodes * c.trainer.devices * c.data.batch_size  # noqa: E731
    assert global_batch(one) == global_batch(recipe) == 4096 and one.trainer.num_nodes == 1
    assert (one.trainer.max_steps, one.task.base_lr, one.task.warmup_steps) == (
        recipe.trainer.max_steps, recipe.task.base_lr, recipe.task.warmup_steps)
    assert one.trainer.compile and one.trainer.precision == "bf16-mixed" and one.model.arch == "vit_base"
