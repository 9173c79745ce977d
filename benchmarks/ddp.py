"""Benchmark `ddp`: CPU DDP pretraining throughput, 1 vs 2 processes (gloo).

The same MAE step as `fahr pretrain` (vit_tiny/16 at 112 px, decoder 2x128, 75% masking, AdamW,
grad clipping) on in-memory uint8 batches (data loading is measured by benchmarks/pretrain.py),
in three layouts on a 2-core machine:

    1 process x 1 thread      the per-core baseline
    1 process x 2 threads     intra-op parallelism over both cores
    2 processes x 1 thread    DDP over gloo, started like torchrun (RANK/WORLD_SIZE/... env vars)

``scaling_efficiency`` = images/s of 2 DDP processes / (2 x images/s of 1 process x 1 thread).
Prints a table and writes benchmarks/results/ddp.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def worker(batch: int, steps: int, warmup: int, arch: str) -> None:
    """One rank: time ``steps`` MAE optimizer steps; rank 0 prints a JSON line (images/s over all ranks)."""
    import torch
    import torch.distributed as dist

    from fahr.models import MaskedAutoencoder, create_backbone
    from fahr.tasks.optim import param_groups
    from fahr.models.face_model import normalize_uint8

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)  # the same initial weights on every rank, as DDP expects
    model = MaskedAutoencoder(create_backbone(arch, 112, 16)).train()
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
    inner = model.module if world > 1 else model
    opt = torch.optim.AdamW(param_groups(inner, 0.05, inner.no_weight_decay()), lr=1e-4, betas=(0.9, 0.95))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    gen = torch.Generator().manual_seed(rank)
    images = torch.randint(0, 256, (batch, 3, 112, 112), dtype=torch.uint8, generator=gen)
    stamps = []
    for _ in range(warmup + steps):
        loss = model(normalize_uint8(images, mean, std))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        stamps.append(time.perf_counter())
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    gaps = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]
    if rank == 0:
        step_s = statistics.median(gaps)
        print("RESULT " + json.dumps({"step_s": step_s, "images_per_s": batch * world / step_s}), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(processes: int, threads: int, args: argparse.Namespace) -> dict:
    """Start ``processes`` ranks with ``threads`` intra-op threads each; rank 0's measurement."""
    port = _free_port()
    procs = []
    for rank in range(processes):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(processes), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, __file__, "--worker", f"--batch={args.batch}", f"--steps={args.steps}",
               f"--warmup={args.warmup}", f"--arch={args.arch}"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=1800) for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode:
            raise RuntimeError(f"rank failed (rc={p.returncode}):\n{err[-3000:]}")
    line = [ln for ln in outs[0][0].splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=32, help="images per process per step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after warmup)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per layout")
    parser.add_argument("--arch", default="vit_tiny")
    args = parser.parse_args()
    if args.worker:
        worker(args.batch, args.steps, args.warmup, args.arch)
        return

    layouts = [(1, 1), (1, 2), (2, 1)]
    load_before = os.getloadavg()
    results = {}
    for processes, threads in layouts:
        runs = [run(processes, threads, args)["images_per_s"] for _ in range(args.repeats)]
        results[f"{processes}p_x_{threads}t"] = {"processes": processes, "threads": threads,
                                                  "images_per_s": max(runs), "images_per_s_all": runs}
    base = results["1p_x_1t"]["images_per_s"]
    efficiency = results["2p_x_1t"]["images_per_s"] / (2 * base)
    threads_efficiency = results["1p_x_2t"]["images_per_s"] / (2 * base)
    rows = [(f"{r['processes']} x {r['threads']}", "DDP gloo" if r["processes"] > 1 else "single",
             f"{r['images_per_s']:.1f}", f"{r['images_per_s'] / (r['processes'] * r['threads'] * base):.2f}")
            for r in results.values()]
    print_table(f"CPU DDP pretraining, {args.arch}/16 @ 112 px, batch {args.batch} per process",
                rows, ("processes x threads", "mode", "images/s", "efficiency vs 1 core"))
    path = write_result("ddp", {
        "config": {"arch": f"{args.arch}/16@112", "mask_ratio": 0.75, "decoder": "2x128", "batch_per_process": args.batch,
                   "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "backend": "gloo"},
        "layouts": results,
        "scaling_efficiency": efficiency,
        "threads_efficiency": threads_efficiency,
        "load_average_1m": {"before": load_before[0], "after": os.getloadavg()[0]},
        "note": "efficiency = images/s / (cores used x images/s of 1 process x 1 thread); "
                "other work on the machine during the run lowers all numbers",
    })
    print(f"scaling efficiency (2 DDP processes vs 2 x 1 core): {efficiency:.2f}; written to {path}")


if __name__ == "__main__":
    main()
