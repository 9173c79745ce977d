"""Benchmark `align`: face detection + alignment throughput on CPU, against the FaceAge approach.

On the same decoded photos in the same run:
(a) ``FaceAligner`` (our batched MTCNN, ``fahr.faces.mtcnn``, built once; photos downscaled
    for detection; 5-point similarity alignment to the 112x112 template): photos/s and detection rate on all 61 FG-NET raw photos and
    on ~200 UTKFace crops (with detection; the default ``detect_pad`` matters: UTKFace faces fill the frame);
(b) the original FaceAge approach, timed on a subset (it is slow), two ways:
    (b1) FaceAge's own code path: ipazc's ``mtcnn`` on TensorFlow (what FaceAge's
         ``src/Face_Extract.py`` imports), a new ``MTCNN()`` per photo, ``detect_faces``, crop the
         raw box, resize (no alignment); run by ``_faceage_mtcnn.py`` in the separate environment
         ``make faceage-baseline`` builds (``.cache/faceage-baseline``; override with
         ``FAHR_FACEAGE_PYTHON``); skipped, and said so, when that environment is missing;
    (b2) the same recipe with facenet-pytorch's MTCNN (our stack's detector) rebuilt per photo:
         isolates the cost of the recipe from the cost of TensorFlow;
    ``speedup`` = (a) / (b1) per source (target >= 20x; (a) / (b2) reported beside it), and (a)
    photos/s target >= 20;
(c) shard writing: MB/s of writing the aligned crops with ``fahr.data.shard_writer.ShardWriter``.
Prints a table and writes benchmarks/results/align.json. Needs ../shared/data; no downloads.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from _common import print_table, write_result  # noqa: E402

from fahr.faces.align import AlignedFace, FaceAligner  # noqa: E402
from fahr.faces.decode import decode_photo  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
FACEAGE_PYTHON = Path(os.environ.get("FAHR_FACEAGE_PYTHON", ROOT / ".cache" / "faceage-baseline" / "bin" / "python"))


def load(source: str, n: int | None) -> tuple[list[np.ndarray], list[float], list[Path]]:
    """Decoded photos (H, W, 3) uint8, their ages (years) and paths, in manifest order."""
    folder = SHARED / source
    rows = list(csv.DictReader(open(folder / "manifest.csv", newline="")))
    if n is not None and n < len(rows):
        rows = rows[:: len(rows) // n][:n]  # spread over the (age-sorted) manifest, deterministic
    paths = [folder / r["file"] for r in rows]
    return [decode_photo(p.read_bytes()) for p in paths], [float(r["age"]) for r in rows], paths


def faceage_library(paths: list[Path]) -> dict | None:
    """(b1): FaceAge's extraction with its own library, in the baseline environment; None if absent."""
    if not FACEAGE_PYTHON.is_file():
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([str(p) for p in paths], f)
    try:
        done = subprocess.run([str(FACEAGE_PYTHON), str(Path(__file__).with_name("_faceage_mtcnn.py")), f.name],
                              capture_output=True, text=True, timeout=3600)
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        raise RuntimeError(f"the FaceAge baseline failed: {done.stderr[-2000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return {"photos": len(paths), "photos_per_s": len(paths) / sum(out["seconds"]),
            "detection_rate": sum(out["found"]) / len(paths), "versions": out["versions"]}


def faceage_approach(images: list[np.ndarray]) -> list[np.ndarray | None]:
    """(b2): FaceAge's recipe with facenet-pytorch's MTCNN: a fresh detector per photo, raw box crop, resize."""
    from facenet_pytorch import MTCNN

    out = []
    for img in images:
        mtcnn = MTCNN()
        pil = Image.fromarray(img)
        boxes, _ = mtcnn.detect(pil)
        if boxes is None or len(boxes) == 0:
            out.append(None)
            continue
        x1, y1, x2, y2 = (float(v) for v in np.asarray(boxes[0], dtype=np.float64))
        out.append(np.asarray(pil.crop((x1, y1, x2, y2)).resize((112, 112), Image.Resampling.BILINEAR)))
    return out


def timed(fn, *args, repeats: int = 1):
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn(*args)
        times.append(time.perf_counter() - t)
    return result, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--utk", type=int, default=200, help="UTKFace photos")
    ap.add_argument("--baseline", type=int, default=20, help="photos per source for the slow FaceAge approach")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not (SHARED / "fgnet" / "manifest.csv").is_file():
        sys.exit(f"shared data not found at {SHARED}: skipping the align benchmark")
    torch.set_num_threads(args.threads)

    sources = {"fgnet": load("fgnet", None), "utkface": load("utkface", args.utk)}
    settings = {"fgnet": {}, "utkface": {}}  # FaceAligner defaults (detect_pad=0.2 suits both)
    rows, results, crops = [], {}, []
    for name, (images, ages, paths) in sources.items():
        aligner = FaceAligner(**settings[name])
        aligner.align(images[:4])  # warm-up
        res, dt = timed(aligner.align, images, repeats=args.repeats)
        ok = [(r, a) for r, a in zip(res, ages) if isinstance(r, AlignedFace)]
        crops += ok
        reasons: dict[str, int] = {}
        for r in res:
            if not isinstance(r, AlignedFace):
                reasons[r.reason] = reasons.get(r.reason, 0) + 1
        step = max(1, len(images) // args.baseline)
        base_imgs, base_paths = images[::step][: args.baseline], paths[::step][: args.baseline]
        base, bdt = timed(faceage_approach, base_imgs)
        library = faceage_library(base_paths)
        ours_ps, facenet_ps = len(images) / dt, len(base_imgs) / bdt
        results[name] = {
            "photos": len(images), "aligner_photos_per_s": ours_ps, "aligner_detection_rate": len(ok) / len(images),
            "rejections": reasons, "faceage_photos": len(base_imgs),
            "faceage_library": library,  # (b1), None when the baseline environment is missing
            "faceage_facenet_photos_per_s": facenet_ps,  # (b2)
            "faceage_facenet_detection_rate": sum(b is not None for b in base) / len(base_imgs),
            "speedup": ours_ps / library["photos_per_s"] if library else None,
            "speedup_vs_facenet_recipe": ours_ps / facenet_ps, "settings": settings[name],
        }
        r = results[name]
        lib = (f"{library['photos_per_s']:.2f}", f"{library['detection_rate']:.1%}", f"{r['speedup']:.0f}x") if library \
            else ("n/a", "n/a", "n/a")
        rows.append((name, str(len(images)), f"{ours_ps:.1f}", f"{r['aligner_detection_rate']:.1%}", str(len(base_imgs)),
                     *lib, f"{facenet_ps:.2f}", f"{r['speedup_vs_facenet_recipe']:.0f}x"))

    # (c) shard writing of the aligned crops
    with tempfile.TemporaryDirectory() as tmp:
        from fahr.data.shard_writer import ShardWriter

        t = time.perf_counter()
        with ShardWriter(Path(tmp) / "shards", samples_per_shard=64, image_size=112) as w:
            for i, (face, age) in enumerate(crops):
                w.write(f"s{i:06d}", face.crop, {"age": age})
        wdt = time.perf_counter() - t
        nbytes = sum(s["bytes"] for s in w.entry["shards"])
    shard = {"samples": len(crops), "bytes": nbytes, "seconds": wdt, "mb_per_s": nbytes / wdt / 1e6,
             "samples_per_s": len(crops) / wdt}

    table = print_table(
        "align: FaceAligner vs FaceAge approach (CPU, %d threads)" % args.threads,
        rows,
        ("source", "photos", "aligner photos/s", "aligner found", "baseline photos", "FaceAge (TF mtcnn) photos/s",
         "FaceAge found", "speedup", "recipe w/ facenet photos/s", "speedup vs it"),
    )
    print(f"\nshard write: {len(crops)} crops, {nbytes / 1e6:.2f} MB in {wdt:.2f} s = "
          f"{shard['mb_per_s']:.1f} MB/s ({shard['samples_per_s']:.0f} samples/s)")
    min_ps = min(r["aligner_photos_per_s"] for r in results.values())
    if any(r["speedup"] is None for r in results.values()):
        min_speedup = None
        print(f"FaceAge's own detector (TensorFlow mtcnn) is not installed at {FACEAGE_PYTHON}: run "
              "`make faceage-baseline` (or set FAHR_FACEAGE_PYTHON); the 20x target is not judged")
    else:
        min_speedup = min(r["speedup"] for r in results.values())
    print(f"targets: photos/s >= 20: {min_ps:.1f} ({'PASS' if min_ps >= 20 else 'FAIL'}); speedup >= 20x vs FaceAge: "
          + ("not judged" if min_speedup is None else f"{min_speedup:.0f}x ({'PASS' if min_speedup >= 20 else 'FAIL'})"))
    path = write_result("align", {"threads": args.threads, "sources": results, "shard_write": shard,
                                  "targets": {"photos_per_s": 20, "speedup": 20},
                                  "pass": bool(min_ps >= 20 and min_speedup is not None and min_speedup >= 20), "table": table})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
