"""Benchmark `pretrain`: is the framework free compared with doing the same thing by hand?

On the same synthetic shards and the same model (vit_tiny/16 at 112 px), measures
(a) images/s of the shard loader alone vs plain PIL decode of the same JPEG bytes, in one process
    ("per worker"): ``loader_ratio`` = loader / raw decode (target >= 0.9);
(b) `fahr pretrain` optimiser steps/s vs a bare PyTorch loop doing the same normalise / forward /
    backward / clip / AdamW step / LR step on batches from the same loader:
    ``step_ratio`` = Lightning / bare (target >= 0.97);
(c) peak RSS of streaming 1x and 10x the shards through the loader (2 workers): ``rss_growth``
    (target < 10%): streaming must not hold the data set in memory.
Prints a table and writes benchmarks/results/pretrain.json.
"""

from __future__ import annotations

import io
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    child_peak_rss_mb, median_rate, print_table, step_benchmark_parser, step_clock, write_result,
)

BATCH = 64
SHARD = 256


def make_shards(root: Path, num_samples: int) -> list[str]:
    from fahr.data.synthetic_shards import write_synthetic_shards

    out = root / f"n{num_samples}"
    index = write_synthetic_shards(out, num_samples=num_samples, samples_per_shard=SHARD, seed=0)
    return [str(out / s["name"]) for s in index["splits"]["train"]["shards"]]


def _jpeg_blobs(shards: list[str]) -> list[bytes]:
    blobs = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            blobs += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    return blobs


def raw_decode_rate(shards: list[str]) -> float:
    """Images/s of PIL decode -> uint8 CHW tensor of every JPEG in the shards (bytes already in memory)."""
    from PIL import Image

    blobs = _jpeg_blobs(shards)
    t0 = time.perf_counter()
    for b in blobs:
        torch.from_numpy(np.array(Image.open(io.BytesIO(b)).convert("RGB"))).permute(2, 0, 1).contiguous()
    return len(blobs) / (time.perf_counter() - t0)


def torchvision_decode_rate(shards: list[str]) -> float:
    """Images/s of torchvision.io.decode_jpeg alone (libjpeg-turbo), the fastest CPU decode here."""
    import warnings

    from torchvision.io import decode_jpeg

    blobs = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in _jpeg_blobs(shards)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        for b in blobs:
            decode_jpeg(b)
        return len(blobs) / (time.perf_counter() - t0)


def loader_rate(shards: list[str]) -> float:
    """Images/s of one epoch of the shard stream in the main process (one worker's work)."""
    from fahr.data.shard_reader import ShardStream, make_loader

    n = len(shards) * SHARD
    stream = ShardStream(shards, samples_per_epoch=n, batch_size=BATCH, seed=0, shuffle_buffer=1000,
                         world_size=1, rank=0, num_workers=0)
    loader = make_loader(stream, num_workers=0)
    t0 = time.perf_counter()
    count = sum(int(b["image"].shape[0]) for b in loader)
    return count / (time.perf_counter() - t0)


def bare_loop_rate(shards: list[str], steps: int, warmup: int, workers: int) -> float:
    """Steps/s of a hand-written loop doing what MAEPretrainTask does, after ``warmup`` steps."""
    from fahr.data.shard_reader import ShardStream, make_loader
    from fahr.models import MaskedAutoencoder, create_backbone
    from fahr.tasks.optim import param_groups
    from fahr.models.face_model import normalize_uint8
    from fahr.tasks.schedules import warmup_cosine

    torch.manual_seed(0)
    model = MaskedAutoencoder(create_backbone("vit_tiny", 112, 16)).train()
    opt = torch.optim.AdamW(param_groups(model, 0.05, model.no_weight_decay()), lr=1e-3, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, 1.0, 20, steps))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    stream = ShardStream(shards, samples_per_epoch=len(shards) * SHARD, batch_size=BATCH, seed=0,
                         shuffle_buffer=1000, world_size=1, rank=0, num_workers=workers)
    done, stamps = 0, []
    while done < steps:
        for batch in make_loader(stream, num_workers=workers):
            images = normalize_uint8(batch["image"], mean, std)
            flip = torch.rand(images.shape[0]) < 0.5
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
            loss = model(images)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            done += 1
            stamps.append(time.perf_counter())
            if done == steps:
                break
    return median_rate(stamps, warmup)


def lightning_rate(data_root: Path, runs_root: Path, num_samples: int, steps: int, warmup: int, workers: int,
                   extra: tuple[str, ...] = (), stamps: list[float] | None = None) -> float:
    """Steps/s of `fahr pretrain` (the real config, vit_tiny, CSV logger) after ``warmup`` steps; ``extra``
    overrides; the step-end times go into ``stamps`` when given."""
    from hydra import compose, initialize_config_dir

    from fahr.cli._hydra import config_dir
    from fahr.config.schema import register_schemas
    from fahr.pipeline.pretrain import pretrain

    register_schemas()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("pretrain", [
            "model=vit_tiny", "trainer=cpu", f"trainer.max_steps={steps}", "trainer.enable_progress_bar=false",
            f"paths.root_dir={runs_root}", f"paths.data_dir={data_root}",
            f"data.generate.out_dir={data_root}/n{num_samples}", f"data.generate.num_samples={num_samples}",
            f"data.generate.samples_per_shard={SHARD}", f"data.batch_size={BATCH}", f"data.num_workers={workers}",
            "task.base_lr=1e-3", "task.warmup_steps=20", "callbacks.checkpoint.every_n_train_steps=100000",
            *extra,
        ])
    clock = step_clock()
    pretrain(cfg, extra_callbacks=[clock])
    if stamps is not None:
        stamps += clock.stamps
    return median_rate(clock.stamps, warmup)


def peak_rss_mb(shards: list[str], epochs: int = 1) -> float:
    """Peak RSS (MB) of a child process streaming ``shards`` through the loader with 2 workers."""
    return child_peak_rss_mb(f"""
from fahr.data.shard_reader import ShardStream, make_loader
shards = {shards!r}
stream = ShardStream(shards, samples_per_epoch={len(shards) * SHARD}, batch_size={BATCH}, seed=0,
                     shuffle_buffer=1000, world_size=1, rank=0, num_workers=2)
for epoch in range({epochs}):
    stream.set_epoch(epoch)
    for batch in make_loader(stream, num_workers=2):
        pass
""")


def main() -> None:
    parser = step_benchmark_parser(__doc__.splitlines()[0], "the 1x data set (10x is also built)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    with tempfile.TemporaryDirectory(prefix="fahr-bench-") as tmp:
        root = Path(tmp)
        shards_1x = make_shards(root, args.samples)
        shards_10x = make_shards(root, 10 * args.samples)

        raw = statistics.median(raw_decode_rate(shards_1x) for _ in range(args.repeats))
        tv = statistics.median(torchvision_decode_rate(shards_1x) for _ in range(args.repeats))
        loader = statistics.median(loader_rate(shards_1x) for _ in range(args.repeats))

        bare, light = [], []
        for i in range(args.repeats):  # interleaved so drift on a shared machine hits both alike
            bare.append(bare_loop_rate(shards_1x, args.steps, args.warmup, args.workers))
            light.append(lightning_rate(root, root / f"runs{i}", args.samples, args.steps, args.warmup, args.workers))
        bare_r, light_r = statistics.median(bare), statistics.median(light)

        rss_1x = peak_rss_mb(shards_1x)
        rss_10x = peak_rss_mb(shards_10x)

    result = {
        "config": {"model": "vit_tiny/16@112", "batch": BATCH, "samples_1x": args.samples, "steps": args.steps,
                   "warmup_steps": args.warmup, "loader_workers_in_step_test": args.workers, "repeats": args.repeats,
                   "torch_threads": torch.get_num_threads()},
        "raw_decode_images_per_s": raw, "loader_images_per_s": loader, "loader_ratio": loader / raw,
        "torchvision_decode_images_per_s": tv, "loader_ratio_vs_torchvision_decode": loader / tv,
        "bare_steps_per_s": bare_r, "lightning_steps_per_s": light_r, "step_ratio": light_r / bare_r,
        "bare_steps_per_s_all": bare, "lightning_steps_per_s_all": light,
        "peak_rss_mb_1x": rss_1x, "peak_rss_mb_10x": rss_10x, "rss_growth": rss_10x / rss_1x - 1,
        "targets": {"loader_ratio": ">= 0.9", "step_ratio": ">= 0.97", "rss_growth": "< 0.10"},
    }
    result["pass"] = {"loader_ratio": result["loader_ratio"] >= 0.9, "step_ratio": result["step_ratio"] >= 0.97,
                      "rss_growth": result["rss_growth"] < 0.10}

    def ok(k: str) -> str:
        return "yes" if result["pass"][k] else "NO"

    print_table("pretrain benchmark (vit_tiny/16 @ 112 px, batch 64, CPU)", [
        ("loader (1 process)", f"{loader:.0f} img/s", f"raw PIL decode {raw:.0f} img/s", f"{result['loader_ratio']:.3f}", ">= 0.9", ok("loader_ratio")),
        ("loader (1 process)", f"{loader:.0f} img/s", f"torchvision decode_jpeg {tv:.0f} img/s", f"{loader / tv:.3f}", "(info)", "-"),
        ("fahr pretrain", f"{light_r:.3f} steps/s", f"bare loop {bare_r:.3f} steps/s", f"{result['step_ratio']:.3f}", ">= 0.97", ok("step_ratio")),
        ("peak RSS", f"10x: {rss_10x:.0f} MB", f"1x: {rss_1x:.0f} MB", f"{result['rss_growth']:+.1%}", "< 10%", ok("rss_growth")),
    ], header=("measure", "fahr", "reference", "ratio", "target", "met"))
    print(f"\nwrote {write_result('pretrain', result)}")


if __name__ == "__main__":
    main()
