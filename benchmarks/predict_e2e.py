"""Benchmark `predict_e2e` (issue 20): `fahr predict` end to end, with and without detection, against an earlier commit.

The command a user runs, ``fahr predict model=EXPORT input=LIST.csv output=OUT.csv`` as a subprocess
(interpreter start, imports, model load, worker start, decoding, detection, alignment, the model and
the CSV), on ``--photos`` real UTKFace photos (200x200 JPEG, spread over the manifest), timed by the
wall clock, for:

- ``before``: the code of ``--baseline`` (default f13e0ba, the last commit before issue 20's predict
  work; ``git archive`` into a temporary folder, run with this venv), its defaults;
- ``now``: this checkout, its defaults (``runtime=auto``: the export's ONNX graph);
- ``before_onnx`` and ``now_torch`` (``runtime=onnx`` / ``runtime=torch``): what the runtime alone
  changes; ``now_workers0`` / ``now_workers2`` on request (``--configs``): what the workers change;

Each configuration runs with detection (the photos are raw photos) and without
(``preprocessing.detect=false``: the photos are taken as crops, decoded and resized only).
``--repeats`` rounds, the order of the configurations rotating every round (a load change on the
shared machine falls on all); medians with the range in brackets. Each configuration's rows are
compared with ``before``'s: same statuses, FaceAge within 1e-4 years.

Per stage (this checkout, in-process, same photos): decode (read + JPEG decode), decode + detect +
align (one process, one thread), and the model alone on ready crops (PyTorch and onnxruntime, 1 and
2 threads), as photos/s.

Models: random weights (speed does not depend on them), mirror averaging on as fine-tunes export
them, a distribution age head: ``vit_tiny`` at 64 px (the FaceAge benchmark's recipe) and at 112 px
(``--archs``). Needs ../shared/data and the ``onnx`` extra. Writes benchmarks/results/predict_e2e.json.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from _common import baseline_tree, print_table, write_result  # noqa: E402
from predict import utkface_photos  # noqa: E402

BASELINE = "f13e0ba"
#: name -> (code, extra overrides of `fahr predict`)
CONFIGS = {
    "before": ("before", []), "before_onnx": ("before", ["runtime=onnx"]),
    "now": ("now", []), "now_torch": ("now", ["runtime=torch"]),
    "now_workers0": ("now", ["workers=0"]), "now_workers2": ("now", ["workers=2"]),
}
TARGET = 2.0
RATE = re.compile(r"fahr predict: (\d+) photos in ([\d.]+) s \(([\d.]+) photos/s\)")


def save_model(arch: str, img_size: int, export_dir: Path) -> None:
    """A random ``arch`` reading ``img_size`` px (patch 16, mean-pooled, distribution age head, mirror
    averaging), exported as ``fahr finetune-age`` exports (the default preprocessing: fahr's 112 px crops)."""
    from fahr.models.backbone import create_backbone
    from fahr.models.face_model import FaceModel, save_face_model
    from fahr.models.heads import AgeHead

    torch.manual_seed(0)
    backbone = create_backbone(arch, img_size=img_size, patch_size=16, global_pool="avg")
    head = AgeHead(backbone.num_features, kind="distribution")
    torch.nn.init.normal_(head.net[-1].weight, std=0.05)  # faces get different ages
    model = FaceModel(backbone, {"age": head}, [0.5] * 3, [0.25] * 3, flip_average=True)
    save_face_model(export_dir, model, {"task": "faceage", "benchmark": "random weights, speed only"})


def run_predict(tree: Path, export_dir: Path, listing: Path, out: Path, extra: list[str]) -> dict:
    """``fahr predict`` of ``tree``'s code as a subprocess; wall seconds and its own logged photos/s."""
    cmd = [sys.executable, "-m", "fahr.cli.main", "predict", f"model={export_dir}", f"input={listing}",
           f"output={out}", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tree)})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    text = proc.stdout + proc.stderr
    # the code that ran is the code asked for: only this checkout logs its CPU sharing
    assert ("detection worker(s)" in text) == (tree.resolve() == ROOT), f"{tree}: not the expected code"
    m = RATE.search(text)
    return {"wall_s": wall, "logged_photos_per_s": float(m.group(3)) if m else None}


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def compare(rows: list[dict[str, str]], ref: list[dict[str, str]]) -> dict:
    """Same paths and statuses, and the largest |FaceAge - reference FaceAge| in years."""
    assert [r["path"] for r in rows] == [r["path"] for r in ref], "same photos, same order"
    statuses = sum(a["status"] != b["status"] for a, b in zip(rows, ref))
    diffs = [abs(float(a["faceage"]) - float(b["faceage"])) for a, b in zip(rows, ref)
             if a["status"] == b["status"] == "ok"]
    return {"status_differences": statuses, "faceage_max_abs_diff_years": max(diffs) if diffs else None,
            "ok": len(diffs)}


def stage_rates(export_dir: Path, paths: list[str]) -> dict:
    """Photos/s of each stage, in this process: decode; decode + detect + align (one thread); the model
    on ready crops with each runtime at 1 and 2 threads."""
    from fahr.inference.align_stream import make_aligner
    from fahr.inference.photos import load_photo
    from fahr.inference.predict import card_preprocessing, run_model
    from fahr.models.face_model import load_face_model
    from fahr.models.onnx_export import load_onnx_model

    model, card = load_face_model(export_dir)
    prep = card_preprocessing(card)
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    images = [load_photo(p) for p in paths]
    out["decode"] = len(paths) / (time.perf_counter() - t0)
    aligner = make_aligner(prep)
    aligner.align(images[:2])
    t0 = time.perf_counter()
    aligned = [aligner.align([load_photo(p)])[0] for p in paths]
    out["decode_detect_align"] = len(paths) / (time.perf_counter() - t0)
    crops = torch.from_numpy(__import__("numpy").stack([a.crop for a in aligned if hasattr(a, "crop")]))
    crops = crops.permute(0, 3, 1, 2).contiguous()
    before = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for runtime, m in (("torch", model), ("onnx", load_onnx_model(export_dir, threads=threads)[0])):
            run_model(m, crops[:32], 32, torch.device("cpu"))
            t0 = time.perf_counter()
            run_model(m, crops, 32, torch.device("cpu"))
            out[f"model_{runtime}_{threads}t"] = len(crops) / (time.perf_counter() - t0)
    torch.set_num_threads(before)
    return out


def run_configs(configs: dict, trees: dict, export_dir: Path, listing: Path, n_photos: int, spec: str,
                detection: bool, repeats: int, tmp: Path) -> dict:
    """Every configuration ``repeats`` times, the order rotating each round, with or without detection
    (``preprocessing.detect=false``: the photos are taken as crops and only resized); medians, ranges,
    ratios over ``before`` and each configuration's rows against ``before``'s."""
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    parity: dict[str, list] = {}
    names = list(configs)
    mode = "with" if detection else "without"
    for i in range(repeats):
        for name in names[i % len(names):] + names[: i % len(names)]:
            tree, extra = configs[name]
            out = tmp / f"out-{spec}-{mode}-{name}.csv"
            load = os.getloadavg()[0]
            run = run_predict(trees[tree], export_dir, listing, out,
                              [*extra, *([] if detection else ["preprocessing.detect=false"])])
            run["photos_per_s"] = n_photos / run["wall_s"]
            run["load_average_1min"] = load
            runs[name].append(run)
            print(f"  {spec} {mode} detection, round {i + 1}/{repeats} {name}: {run['photos_per_s']:.1f} photos/s "
                  f"end to end ({run['wall_s']:.1f} s; logged {run['logged_photos_per_s']}), load {load:.1f}", flush=True)
            if i == 0:
                parity[name] = read_rows(out)
    median = {n: statistics.median(r["photos_per_s"] for r in runs[n]) for n in configs}
    return {
        "runs": runs, "median_photos_per_s": median,
        "min_max": {n: [min(r["photos_per_s"] for r in runs[n]), max(r["photos_per_s"] for r in runs[n])]
                    for n in configs},
        "over_before": {n: median[n] / median["before"] for n in configs},
        "parity_vs_before": {n: compare(parity[n], parity["before"]) for n in configs if n != "before"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", default=BASELINE, help="the commit whose `fahr predict` is 'before'")
    parser.add_argument("--archs", default="vit_tiny@64,vit_tiny@112", help="ARCH@IMG_SIZE, comma-separated")
    parser.add_argument("--configs", default="before,before_onnx,now,now_torch",
                        help=f"comma-separated, from {', '.join(CONFIGS)} (before is required)")
    parser.add_argument("--tag", default="", help="write benchmarks/results/predict_e2e_TAG.json")
    args = parser.parse_args()
    import onnxruntime

    from fahr.models.onnx_export import export_onnx

    paths = utkface_photos(args.photos)
    configs = {name: CONFIGS[name] for name in args.configs.split(",")}
    if "before" not in configs:
        raise SystemExit("--configs must include before (the reference of every ratio and parity check)")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-predict-e2e-") as tmp:
        tmp = Path(tmp)
        trees = {"before": baseline_tree(args.baseline, tmp / "before"), "now": ROOT}
        listing = tmp / "photos.csv"
        listing.write_text("path\n" + "".join(f"{p}\n" for p in paths))
        for spec in args.archs.split(","):
            arch, size = spec.split("@")
            export_dir = tmp / f"export-{arch}-{size}"
            save_model(arch, int(size), export_dir)
            export_onnx(export_dir)
            stages = stage_rates(export_dir, paths[:200])
            print(f"{spec} stages (photos/s): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()), flush=True)
            for detection in (True, False):
                results.append({"model": spec, "detection": detection, "stages_photos_per_s": stages,
                                **run_configs(configs, trees, export_dir, listing, len(paths), spec, detection,
                                              args.repeats, tmp)})
    rows = []
    for res in results:
        for n in configs:
            lo, hi = res["min_max"][n]
            p = res["parity_vs_before"].get(n)
            rows.append((res["model"] + ", flip", "yes" if res["detection"] else "no", n,
                         f"{res['median_photos_per_s'][n]:.1f} ({lo:.1f}-{hi:.1f})",
                         f"{res['over_before'][n]:.2f}x",
                         "-" if p is None else f"{p['status_differences']} / {p['faceage_max_abs_diff_years']:.1e}"))
    table = print_table(f"fahr predict end to end, {len(paths)} UTKFace photos, "
                        f"{os.cpu_count()} CPUs, medians (min-max) of {args.repeats}", rows,
                        ("model", "detection", "code", "photos/s", "vs before", "status diffs / max |dFaceAge| (years)"))
    stage_rows = [(res["model"] + ", flip", *(f"{res['stages_photos_per_s'][k]:.1f}" for k in res["stages_photos_per_s"]))
                  for res in results if res["detection"]]
    stage_table = print_table("stages, photos/s (in-process, 200 photos)", stage_rows,
                              ("model", *results[0]["stages_photos_per_s"]))
    write_result("predict_e2e" + (f"_{args.tag}" if args.tag else ""), {
        "photos": len(paths), "photos_source": "UTKFace 200x200 JPEG, spread over manifest.csv",
        "baseline_commit": args.baseline, "repeats": args.repeats, "cpus": os.cpu_count(),
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "target_over_before": TARGET,
        "results": results, "table": table, "stage_table": stage_table,
    })


if __name__ == "__main__":
    main()
