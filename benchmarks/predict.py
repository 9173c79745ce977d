"""Benchmark `predict` (issue 18): `fahr predict` photos/s with each runtime, PyTorch and ONNX (onnxruntime, CPU).

On the same real UTKFace photos (200x200 JPEG crops with background, ``--photos`` spread over the
manifest), in one run, for each model size (``--archs``, default vit_small/16 and vit_tiny/16 at
112 px, a distribution age head, mirror averaging on as fine-tunes export them; random weights: speed
does not depend on them):

1. ``fahr export format=onnx`` of the saved model (timed once);
2. ``--repeats`` rounds of :func:`fahr.inference.predict.time_photos_per_second`, the shared predict
   path, for each runtime: ``with_detection`` (decode + MTCNN + alignment + model),
   ``without_detection`` (decode + resize + model) and ``model_only`` (ready uint8 crops); the two
   runtimes take turns within each round and swap who goes first every round, so a load change on
   the shared machine falls on both; medians over the rounds (the 1-minute load average is recorded
   with each round);
3. parity on these photos: max |FaceAge ONNX - PyTorch| through ``predict_photos`` with detection.

Both runtimes get the same threads (``FAHR_BENCH_THREADS``, default 2: torch.set_num_threads, and
onnxruntime's intra-op threads follow it). Needs ../shared/data and the onnx extra; no downloads.
Prints a table and writes benchmarks/results/predict.json (``--tag T``: predict_T.json).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from _common import print_table, write_result  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
THREADS = int(os.environ.get("FAHR_BENCH_THREADS", "2"))
RUNTIMES = ("torch", "onnx")
MEASURES = ("with_detection", "without_detection", "model_only")


def utkface_photos(n: int) -> list[str]:
    """``n`` UTKFace photo paths spread over the (age-sorted) manifest, deterministic."""
    folder = SHARED / "utkface"
    if not (folder / "manifest.csv").is_file():
        raise SystemExit(f"real data not available: {folder} (needs ../shared/data)")
    rows = list(csv.DictReader(open(folder / "manifest.csv", newline="")))
    return [str(folder / r["file"]) for r in rows[:: max(1, len(rows) // n)][:n]]


def save_model(arch: str, export_dir: Path) -> None:
    from fahr.models.backbone import create_backbone
    from fahr.models.face_model import FaceModel, save_face_model
    from fahr.models.heads import AgeHead

    torch.manual_seed(0)
    backbone = create_backbone(arch, img_size=112, patch_size=16, global_pool="avg")
    head = AgeHead(backbone.num_features, kind="distribution")
    torch.nn.init.normal_(head.net[-1].weight, std=0.05)  # faces get different ages
    model = FaceModel(backbone, {"age": head}, [0.5] * 3, [0.25] * 3, flip_average=True)
    save_face_model(export_dir, model, {"task": "faceage", "benchmark": "random weights, speed only"})


def bench_arch(arch: str, paths: list[str], repeats: int, batch_size: int) -> dict:
    from fahr.inference.predict import predict_photos, time_photos_per_second
    from fahr.models.face_model import load_face_model
    from fahr.models.onnx_export import export_onnx, load_onnx_model

    with tempfile.TemporaryDirectory(prefix=f"bench-predict-{arch}-") as tmp:
        export_dir = Path(tmp) / "export"
        save_model(arch, export_dir)
        t0 = time.perf_counter()
        record = export_onnx(export_dir)
        export_seconds = time.perf_counter() - t0
        models = {"torch": load_face_model(export_dir), "onnx": load_onnx_model(export_dir)}
        onnx_bytes = (export_dir / "model.onnx").stat().st_size
        runs: dict[str, list[dict]] = {r: [] for r in RUNTIMES}
        for i in range(repeats):
            for runtime in (RUNTIMES if i % 2 == 0 else RUNTIMES[::-1]):
                model, card = models[runtime]
                load = os.getloadavg()[0]
                rates = time_photos_per_second(model, card, paths, batch_size=batch_size, device="cpu")
                rates["load_average_1min"] = load
                runs[runtime].append(rates)
                print(f"  {arch} round {i + 1}/{repeats} {runtime}: "
                      + ", ".join(f"{k} {rates[k]:.1f}" for k in MEASURES), flush=True)
        rows = {r: predict_photos(*models[r], paths, batch_size=batch_size, device="cpu") for r in RUNTIMES}
    ok = [(t["faceage"], o["faceage"]) for t, o in zip(rows["torch"], rows["onnx"])
          if t["status"] == "ok" and o["status"] == "ok"]
    assert [r["status"] for r in rows["torch"]] == [r["status"] for r in rows["onnx"]]
    median = {r: {m: statistics.median(run[m] for run in runs[r]) for m in MEASURES} for r in RUNTIMES}
    spread = {r: {m: [min(run[m] for run in runs[r]), max(run[m] for run in runs[r])] for m in MEASURES}
              for r in RUNTIMES}
    return {
        "arch": arch, "img_size": 112, "patch_size": 16, "flip_average": True, "onnx_opset": record["opset"],
        "onnx_mb": onnx_bytes / 1e6, "export_seconds": export_seconds,
        "runs": runs, "median": median, "min_max": spread,
        "onnx_over_torch": {m: median["onnx"][m] / median["torch"][m] for m in MEASURES},
        "parity": {"photos_ok": len(ok), "photos": len(paths),
                   "faceage_max_abs_diff_years": max(abs(t - o) for t, o in ok),
                   "export_check_max_abs_diff": record["check"]["max_abs_diff"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--archs", default="vit_small,vit_tiny")
    parser.add_argument("--tag", default="", help="write benchmarks/results/predict_TAG.json (e.g. a thread count)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    import onnxruntime

    paths = utkface_photos(args.photos)
    results = [bench_arch(arch, paths, args.repeats, args.batch_size) for arch in args.archs.split(",")]
    table = []
    for res in results:
        for runtime in RUNTIMES:
            m, r = res["median"][runtime], res["min_max"][runtime]
            table.append((f"{res['arch']}/16 @112, flip", runtime,
                          *(f"{m[k]:.1f} ({r[k][0]:.1f}-{r[k][1]:.1f})" for k in MEASURES)))
        table.append((f"{res['arch']}/16 @112, flip", "onnx / torch",
                      *(f"{res['onnx_over_torch'][k]:.2f}x" for k in MEASURES)))
    text = print_table(f"fahr predict photos/s, UTKFace ({len(paths)} photos), {THREADS} threads, "
                       f"medians (min-max) of {args.repeats}", table,
                       ("model", "runtime", "with detection", "without detection", "model only"))
    for res in results:
        p = res["parity"]
        print(f"{res['arch']}: export {res['export_seconds']:.1f} s, model.onnx {res['onnx_mb']:.1f} MB; max |FaceAge "
              f"ONNX - PyTorch| {p['faceage_max_abs_diff_years']:.2e} years over {p['photos_ok']}/{p['photos']} photos")
    write_result("predict" + (f"_{args.tag}" if args.tag else ""), {
        "photos": len(paths), "photos_source": "UTKFace 200x200 JPEG crops, spread over manifest.csv",
        "repeats": args.repeats, "batch_size": args.batch_size, "threads": THREADS, "cores": os.cpu_count(),
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "results": results, "table": text,
    })


if __name__ == "__main__":
    main()
