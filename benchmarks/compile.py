"""Benchmark `compile`: what `trainer.compile=true` (regional torch.compile of every ViT block) does to
`fahr pretrain`'s step rate on this machine's CPU.

Same synthetic shards, same model (vit_tiny/16 at 112 px, MAE decoder 2 x 128), batch 64: pairs of runs
with and without compilation, back to back in alternating order; ``step_ratio`` = median over pairs of
compiled / eager steps/s after the warm-up steps (compilation happens lazily in the first steps; its
cost is reported separately as the compiled run's extra wall seconds). Prints a table and writes
benchmarks/results/compile.json. On a GPU the gain is expected to be larger (fused elementwise kernels
around small GEMMs: docs/scaling.md); this measures the option on the CPU, where it can be.
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
from _common import print_table, step_benchmark_parser, write_result  # noqa: E402
from pretrain import lightning_rate, make_shards  # noqa: E402


def main() -> None:
    parser = step_benchmark_parser(__doc__.splitlines()[0], "photos of the synthetic shards")
    parser.set_defaults(steps=60, warmup=10, samples=1024)
    parser.add_argument("--quick", action="store_true", help="a smoke run; no result file")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.samples, args.repeats = 8, 3, 256, 1
    torch.set_num_threads(os.cpu_count() or 1)
    eager, compiled, first_step_extra = [], [], []
    with tempfile.TemporaryDirectory(prefix="fahr-bench-") as tmp:
        root = Path(tmp)
        make_shards(root / "data", args.samples)
        for i in range(args.repeats):
            pair = [("eager", ()), ("compiled", ("trainer.compile=true",))]
            wall = {}
            for name, extra in (pair if i % 2 == 0 else pair[::-1]):
                t0 = time.perf_counter()
                rate = lightning_rate(root / "data", root / f"runs-{name}-{i}", args.samples, args.steps, args.warmup,
                                      args.workers, extra)
                wall[name] = time.perf_counter() - t0
                (compiled if name == "compiled" else eager).append(rate)
            # compilation happens lazily in the first steps: the extra wall time of the whole compiled run
            first_step_extra.append(wall["compiled"] - wall["eager"])
    ratios = [c / e for c, e in zip(compiled, eager)]
    result = {
        "config": {"model": "vit_tiny/16@112, MAE decoder 2 x 128", "batch": 64, "samples": args.samples,
                   "steps": args.steps, "warmup_steps": args.warmup, "repeats": args.repeats,
                   "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "eager_steps_per_s": statistics.median(eager), "compiled_steps_per_s": statistics.median(compiled),
        "step_ratio": statistics.median(ratios), "step_ratios_all": ratios,
        "eager_steps_per_s_all": eager, "compiled_steps_per_s_all": compiled,
        "compile_seconds": statistics.median(first_step_extra),
    }
    print_table("compile benchmark (fahr pretrain, vit_tiny/16 @ 112 px, batch 64, CPU)", [
        ("trainer.compile=true", f"{result['compiled_steps_per_s']:.3f} steps/s", f"{result['eager_steps_per_s']:.3f} steps/s",
         f"{result['step_ratio']:.3f}", f"{result['compile_seconds']:.0f} s"),
    ], header=("measure", "compiled", "eager", "ratio (median of pairs)", "compile time"))
    if not args.quick:
        print(f"\nwrote {write_result('compile', result)}")


if __name__ == "__main__":
    main()
