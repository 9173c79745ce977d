"""Benchmark the stages of `fahr shards` (data_pipelines/plan.py, build.py) per core, for the cost model
in docs/data_at_scale.md.

On N UTKFace photos (default 1,000; ../shared/data/utkface), one process (``processes=1``), one task:
hash (decode + SHA-256 + pHashes: photos/s), group, assign, write with and without face detection
(photos/s), the final step; the near-duplicate comparison rate of the group stage on a synthetic
bucket (pHash pairs/s, the quadratic part); bytes written per photo (shards) and pass-1 work files per
photo; peak RSS. Prints a table and writes benchmarks/results/shards_stages.json. No downloads.
"""

from __future__ import annotations

import argparse
import csv
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from _common import print_table, write_result  # noqa: E402


def _subset(tmp: Path, n: int) -> Path:
    utk = ROOT.parent / "shared" / "data" / "utkface"
    root = tmp / "utk"
    root.mkdir()
    (root / "images").symlink_to(utk / "images")
    rows = list(csv.reader(open(utk / "manifest.csv")))
    with open(root / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows[: n + 1])
    return root


def _stages(root: Path, out: Path, skip_detection: bool) -> dict[str, float]:
    """Seconds per stage of a one-task build."""
    from data_pipelines import build, plan
    from data_pipelines.options import AlignOptions, BuildOptions
    from data_pipelines.sources import get_source

    options = BuildOptions(align=AlignOptions(skip_detection=skip_detection), chunk_size=500).resolved("utkface")
    make_items = lambda: get_source("utkface")(root)  # noqa: E731
    out.mkdir()
    (out / "parts").mkdir()
    plan.start_run(out, "utkface", options, 1, "bench")
    times, sizes = {}, {}
    for stage, run in [("hash", lambda: plan.hash_task(make_items, options, out, 0, 1, "bench")),
                       ("group", lambda: plan.group_task(options, out, 0, 1, "bench")),
                       ("assign", lambda: plan.assign_task(options, out, 0, 1, "bench")),
                       ("write", lambda: build.write_task("utkface", make_items, out, options, None, 0, 1, "bench")),
                       ("final", lambda: None)]:
        if stage == "final":
            sizes["plan_bytes"] = sum(p.stat().st_size for p in plan.plan_dir(out).rglob("*") if p.is_file())
            run = lambda: build.final_task("utkface", out, options, 1, "bench")  # noqa: E731
        t0 = time.perf_counter()
        result = run()
        times[stage] = time.perf_counter() - t0
    sizes["shard_bytes"] = sum(s["bytes"] for e in result["splits"].values() for s in e["shards"])
    sizes["written"] = result["written"]
    return {**times, **sizes}


def _near_rate(n: int) -> float:
    """pHash pairs compared per second in one bucket of ``n`` candidates (group stage, near duplicates)."""
    from data_pipelines.plan import CANDIDATE, near_edges

    rng = np.random.default_rng(0)
    rows = np.zeros(n, dtype=CANDIDATE)
    rows["pos"] = np.arange(n)
    rows["band"] = 0
    rows["coarse"] = rng.integers(0, 2**63, n, dtype=np.uint64) & ~np.uint64(0xFF)  # all share band 0's byte
    rows["fine"] = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    t0 = time.perf_counter()
    near_edges(rows, 6, 40)
    return n * (n - 1) / 2 / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--detect-photos", type=int, default=200, help="photos for the run with face detection")
    parser.add_argument("--bucket", type=int, default=20000, help="candidates in the synthetic near-duplicate bucket")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = _subset(tmp, args.photos)
        fast = _stages(root, tmp / "fast", skip_detection=True)
        root_d = tmp / "d"
        root_d.mkdir()
        detect = _stages(_subset(root_d, args.detect_photos), tmp / "detect", skip_detection=False)
    near = _near_rate(args.bucket)
    n, nd = args.photos, args.detect_photos
    result = {
        "photos": n, "hash_photos_per_s": n / fast["hash"], "group_photos_per_s": n / fast["group"],
        "assign_photos_per_s": n / fast["assign"], "write_photos_per_s_skip_detection": n / fast["write"],
        "write_photos_per_s_detection": nd / detect["write"], "final_s": fast["final"],
        "near_pairs_per_s": near, "shard_bytes_per_written_photo": fast["shard_bytes"] / fast["written"],
        "plan_bytes_per_photo": fast["plan_bytes"] / n,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    rows = [(k, f"{v:,.1f}" if isinstance(v, float) else f"{v:,}") for k, v in result.items()]
    print(print_table("fahr shards stages, one process (per core)", rows, ("measure", "value")))
    write_result("shards_stages", result)


if __name__ == "__main__":
    main()
