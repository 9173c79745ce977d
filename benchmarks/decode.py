"""Benchmark `data.decode`: what decoding on the device takes off the loader workers.

On synthetic shards and on real face photos (UTKFace from ../shared, re-encoded as 112 px JPEG q95 crops
as ``fahr shards`` writes them), batches of 64, in one process on the CPU, microseconds per image:
(a) a loader worker with ``decode=workers``: read, check, decode, copy into the batch;
(b) a loader worker with ``decode=device``: read, check, pack the encoded bytes (what a worker still does);
(c) the training process with ``decode=device`` on the CPU: DeviceDecoder (one batched ``decode_jpeg``
    call per batch, then the batch stacked), i.e. the work a GPU would take over with nvJPEG;
(d) the bare kernels on bytes in memory: ``decode_rgb`` per image vs ``decode_jpeg(list)`` per batch.
(a) - (b) is what a worker saves; (c) says that on the CPU the batched call is the same libjpeg work, not
a saving. The GPU's gain is not measurable on this machine (no GPU). Medians of --repeats passes.
Prints a table and writes benchmarks/results/decode.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_result  # noqa: E402

BATCH = 64


def _loader_us(shards: list[str], samples: int, decode: str, decoder=None) -> float:
    """Microseconds per image of one pass of an in-process ShardStream (+ ``decoder`` on its batches)."""
    from fahr.data.shard_reader import ShardStream

    stream = ShardStream(shards, samples_per_epoch=samples, batch_size=BATCH, world_size=1, rank=0,
                         shuffle_buffer=0, shuffle_shards=False, decode=decode)
    if decoder is None:
        t0 = time.perf_counter()
        n = sum(len(b["__key__"]) for b in stream)
        return (time.perf_counter() - t0) / n * 1e6
    batches = list(stream)  # read first: only the decoding is timed
    t0 = time.perf_counter()
    n = sum(len(decoder(b, "cpu")["__key__"]) for b in batches)
    return (time.perf_counter() - t0) / n * 1e6


def _kernel_us(shards: list[str]) -> tuple[float, float]:
    """Microseconds per image: decode_rgb one by one, and decode_jpeg on lists of BATCH (bytes in memory)."""
    from fahr.data.device_decode import decode_jpegs
    from fahr.data.shard_reader import decode_rgb, read_shard

    blobs = [torch.frombuffer(s["jpg"], dtype=torch.uint8) for url in shards for s in read_shard(url)]
    t0 = time.perf_counter()
    for b in blobs:
        decode_rgb(b)
    single = (time.perf_counter() - t0) / len(blobs) * 1e6
    t0 = time.perf_counter()
    for i in range(0, len(blobs), BATCH):
        decode_jpegs(blobs[i : i + BATCH], torch.device("cpu"))
    batched = (time.perf_counter() - t0) / len(blobs) * 1e6
    return single, batched


def _photo_shards(folder: Path, photos: Path, samples: int) -> list[str]:
    """The first ``samples`` photos of ``photos`` (sorted names) as 112 px JPEG q95 crops in shards, as
    ``fahr shards`` writes them."""
    import numpy as np
    from PIL import Image

    from fahr.data.shard_writer import ShardWriter

    names = sorted(p for p in photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))[:samples]
    with ShardWriter(folder, prefix="photos", samples_per_shard=256) as writer:
        for i, path in enumerate(names):
            with Image.open(path) as im:
                writer.write(f"{i:09d}", np.asarray(im.convert("RGB").resize((112, 112), Image.BILINEAR)), {})
    return sorted(str(p) for p in folder.glob("photos-*.tar"))


def _measure(shards: list[str], samples: int, repeats: int) -> dict[str, float]:
    from fahr.data.device_decode import DeviceDecoder

    runs: dict[str, list[float]] = {k: [] for k in ("worker_decode", "worker_no_decode", "device_decode_cpu",
                                                      "kernel_single", "kernel_batched")}
    for _ in range(repeats):
        runs["worker_decode"].append(_loader_us(shards, samples, "workers"))
        runs["worker_no_decode"].append(_loader_us(shards, samples, "device"))
        runs["device_decode_cpu"].append(_loader_us(shards, samples, "device", DeviceDecoder(112)))
        single, batched = _kernel_us(shards)
        runs["kernel_single"].append(single)
        runs["kernel_batched"].append(batched)
    return {k: statistics.median(v) for k, v in runs.items()}


def _rows(us: dict[str, float]) -> list[tuple[str, str, str]]:
    labels = {
        "worker_decode": "(a) worker, decode=workers (read + decode + batch)",
        "worker_no_decode": "(b) worker, decode=device (read + check + pack)",
        "device_decode_cpu": "(c) training process, DeviceDecoder on the CPU",
        "kernel_single": "(d) decode_rgb, one image per call",
        "kernel_batched": f"(d) decode_jpeg, lists of {BATCH}, CPU",
    }
    return [(label, f"{us[k]:.1f}", f"{1e6 / us[k]:,.0f}") for k, label in labels.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--photos", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/utkface/images",
                        help="a folder of face photos (JPEG) measured too, re-encoded as 112 px crops (skipped if absent)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a loader worker's view: one core
    from fahr.data.synthetic_shards import write_synthetic_shards

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        index = write_synthetic_shards(Path(tmp) / "synthetic", num_samples=args.samples, samples_per_shard=256, seed=0)
        synthetic = [str(Path(tmp) / "synthetic" / s["name"]) for s in index["splits"]["train"]["shards"]]
        results["synthetic"] = _measure(synthetic, args.samples, args.repeats)
        if args.photos.is_dir():
            photos = _photo_shards(Path(tmp) / "photos", args.photos, args.samples)
            results["photos"] = _measure(photos, args.samples, args.repeats)
    for name, us in results.items():
        print_table(f"{name}: 112 px JPEG decoding, 1 thread, {args.samples} images, median of {args.repeats}",
                    _rows(us), ("what", "us / image", "images / s"))
        print()
    write_result("decode", {"samples": args.samples, "batch": BATCH, "repeats": args.repeats,
                            "photos": str(args.photos) if "photos" in results else None,
                            "us_per_image": results})


if __name__ == "__main__":
    main()
