"""Benchmark `finetune`: is the job layer free for FAHR-FaceAge fine-tuning, and does memory stay flat?

On the same synthetic labelled faces and the same model (vit_tiny/16 at 112 px, DLDL age head), measures
(a) `fahr finetune-age` stage-2 optimiser steps/s (the job layer: Lightning, streamed age-balanced
    training by per-sample acceptance, layer-wise LR decay, per-step reseeding, checkpoints, CSV
    logger, throughput logging) against a bare PyTorch loop doing the same normalise / flip /
    forward / DLDL loss / backward / clip / AdamW step / LR step on batches from the same stream:
    ``step_ratio`` = the median over repeats of fahr / bare, each repeat a pair run back to back in
    alternating order (target >= 0.97, as for pretraining);
(b) peak RSS of `fahr finetune-age` (process + its largest child) on 1x and 10x the training photos,
    same steps: ``rss_growth`` (target < 10%): the training split streams, it is never held in memory.
Prints a table and writes benchmarks/results/finetune.json.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    child_peak_rss_mb, median_rate, print_table, step_benchmark_parser, step_clock, write_result,
)

BATCH = 64
SHARD = 256
EVAL = 128  # validation and test photos (each)


def finetune_config(data_root: Path, runs_root: Path, train: int, steps: int, workers: int, extra: list[str] = ()):
    """The real `finetune-age` config: stage 2 only (stage 1 off), one validation at the end."""
    from hydra import compose, initialize_config_dir

    from fahr.cli._hydra import config_dir
    from fahr.config.finetune_schema import register_finetune_schemas
    from fahr.config.schema import register_schemas

    register_schemas()
    register_finetune_schemas()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("finetune_age", [
            "model=vit_tiny", "trainer=cpu", "trainer.enable_progress_bar=false", "backbone=null",
            f"paths.root_dir={runs_root}", f"paths.data_dir={data_root}", "data.image_size=112",
            f"data.generate.train={train}", f"data.generate.val={EVAL}", f"data.generate.test={EVAL}",
            f"data.generate.samples_per_shard={SHARD}", f"data.batch_size={BATCH}", f"data.num_workers={workers}",
            "task.stage1.max_steps=0", f"task.stage2.max_steps={steps}", f"task.stage2.val_every_n_steps={steps}",
            "task.stage2.warmup_steps=10", *extra])


def fahr_rate(data_root: Path, runs_root: Path, train: int, steps: int, warmup: int, workers: int) -> float:
    """Steps/s of `fahr finetune-age` stage 2, in this process, after ``warmup`` steps."""
    from fahr.pipeline.finetune_age import finetune_age

    clock = step_clock()
    finetune_age(finetune_config(data_root, runs_root, train, steps, workers), extra_callbacks=[clock])
    return median_rate(clock.stamps, warmup)


def bare_rate(data_root: Path, train: int, steps: int, warmup: int, workers: int) -> float:
    """Steps/s of a hand-written loop doing what AgeTask's stage 2 does, on the same stream."""
    from timm.optim import param_groups_layer_decay

    from fahr.data.labelled import read_label_columns
    from fahr.losses.age import label_distribution_loss
    from fahr.pipeline.finetune_age import age_balance, build_model, split_shards, training_data
    from fahr.tasks.schedules import warmup_cosine

    cfg = finetune_config(data_root, data_root.parent / "bare-runs", train, steps, workers)
    shards = {split: split_shards(cfg.data[split]) for split in ("train", "val")}
    ages = read_label_columns(shards["train"], ["age"], []).labels["age"]
    _, accept, _ = age_balance(ages, cfg.task.balance)
    stream = training_data(cfg, shards, len(ages), ("age",), accept)
    stream.setup("fit")
    torch.manual_seed(cfg.seed)
    model, _ = build_model(cfg)
    model.train()
    s = cfg.task.stage2
    lr = s.base_lr * BATCH / 256
    head = model.heads["age"]
    groups = [{"params": list(head.parameters()), "weight_decay": s.weight_decay, "lr_scale": 1.0}]
    groups += param_groups_layer_decay(model.backbone, weight_decay=s.weight_decay,
                                       no_weight_decay_list=list(model.backbone.no_weight_decay()),
                                       layer_decay=s.layer_decay)
    for g in groups:
        g["lr"] = lr * g.pop("lr_scale", 1.0)
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    floor = min(1.0, s.min_lr / lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: warmup_cosine(k, 1.0, s.warmup_steps, steps, min_lr=floor))
    done, stamps, epoch = 0, [], 0
    while done < steps:
        stream.set_epoch(epoch)
        for batch in stream.train_dataloader():
            images = batch["image"]
            flip = torch.rand(images.shape[0]) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            out = head(model.features(images))
            loss = label_distribution_loss(out["logits"], head.centres, batch["age"], sigma=cfg.task.label_sigma)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.gradient_clip_val)
            opt.step()
            sched.step()
            done += 1
            stamps.append(time.perf_counter())
            if done == steps:
                break
        epoch += 1
    return median_rate(stamps, warmup)


def peak_rss_mb(data_root: Path, runs_root: Path, train: int, steps: int) -> float:
    """Peak RSS (MB) of `fahr finetune-age` in a child process (1 loader worker): the process plus its
    largest child, as resource.getrusage reports them."""
    return child_peak_rss_mb(f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from finetune import finetune_config
from fahr.pipeline.finetune_age import finetune_age
finetune_age(finetune_config({str(data_root)!r}, {str(runs_root)!r}, {train}, {steps}, 1))
""")


def main() -> None:
    parser = step_benchmark_parser(__doc__.splitlines()[0], "training photos of the 1x data set (10x is also built)")
    parser.add_argument("--rss-steps", type=int, default=60)
    parser.set_defaults(repeats=5)  # the pairs' ratios spread by +-5%: five pairs for a stable median
    parser.add_argument("--quick", action="store_true", help="a smoke run of everything; no result file")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.samples, args.rss_steps, args.repeats = 12, 2, 256, 4, 1
    torch.set_num_threads(os.cpu_count() or 1)
    from fahr.pipeline.finetune_age import ensure_synthetic_splits

    with tempfile.TemporaryDirectory(prefix="fahr-bench-") as tmp:
        root = Path(tmp)
        data = root / "data"
        for n in (args.samples, 10 * args.samples):
            ensure_synthetic_splits(finetune_config(data, root, n, args.steps, 0).data)
        bare, fahr = [], []
        for i in range(args.repeats):
            # paired and in alternating order (bare first, then fahr first, ...): a run's rate on 2 shared
            # cores drifts by +-5% between runs, and whichever runs second in a process was seen to differ
            pair = [lambda: bare.append(bare_rate(data, args.samples, args.steps, args.warmup, args.workers)),
                    lambda: fahr.append(fahr_rate(data, root / f"runs{i}", args.samples, args.steps, args.warmup,
                                                  args.workers))]
            for run in (pair if i % 2 == 0 else pair[::-1]):
                run()
        bare_r, fahr_r = statistics.median(bare), statistics.median(fahr)
        ratio = statistics.median(f / b for f, b in zip(fahr, bare))
        rss_1x = peak_rss_mb(data, root / "rss1", args.samples, args.rss_steps)
        rss_10x = peak_rss_mb(data, root / "rss10", 10 * args.samples, args.rss_steps)

    result = {
        "config": {"model": "vit_tiny/16@112, DLDL age head", "batch": BATCH, "samples_1x": args.samples,
                   "steps": args.steps, "warmup_steps": args.warmup, "loader_workers_in_step_test": args.workers,
                   "repeats": args.repeats, "rss_steps": args.rss_steps, "torch_threads": torch.get_num_threads(),
                   "balance": "sampler (per-photo acceptance in the stream)"},
        "bare_steps_per_s": bare_r, "fahr_steps_per_s": fahr_r, "step_ratio": ratio,
        "step_ratios_all": [f / b for f, b in zip(fahr, bare)],
        "bare_steps_per_s_all": bare, "fahr_steps_per_s_all": fahr,
        "peak_rss_mb_1x": rss_1x, "peak_rss_mb_10x": rss_10x, "rss_growth": rss_10x / rss_1x - 1,
        "targets": {"step_ratio": ">= 0.97", "rss_growth": "< 0.10"},
    }
    result["pass"] = {"step_ratio": result["step_ratio"] >= 0.97, "rss_growth": result["rss_growth"] < 0.10}
    ok = lambda k: "yes" if result["pass"][k] else "NO"  # noqa: E731
    print_table("finetune benchmark (FaceAge stage 2, vit_tiny/16 @ 112 px, batch 64, CPU)", [
        ("fahr finetune-age", f"{fahr_r:.3f} steps/s", f"bare loop {bare_r:.3f} steps/s", f"{result['step_ratio']:.3f}",
         ">= 0.97", ok("step_ratio")),
        ("peak RSS", f"10x: {rss_10x:.0f} MB", f"1x: {rss_1x:.0f} MB", f"{result['rss_growth']:+.1%}", "< 10%",
         ok("rss_growth")),
    ], header=("measure", "fahr", "reference", "ratio", "target", "met"))
    if not args.quick:
        print(f"\nwrote {write_result('finetune', result)}")


if __name__ == "__main__":
    main()
