"""Benchmark `faceage` (issue 4): FAHR-FaceAge on real data, MAE-pretrained vs from scratch, on 2 CPU cores.

One command (``make bench-faceage``) runs the real commands as subprocesses and leaves the best model in
``runs/bench-faceage/export/`` (usable by ``fahr predict`` / ``fahr far``):

1. shards (reused when ``index.json`` exists), 64 px crops:
   ``fahr shards source=utkface ... align.skip_detection=true`` (UTKFace is already aligned; person id =
   the photo's sha1, splits 0.8/0.1/0.1 by its hash) and ``fahr shards source=folder`` over CACD with
   detection + alignment (CACD-VS frames are loose, ~40% face: aligned to the template they match
   UTKFace's tight crops and what ``fahr predict`` does to raw photos);
2. ``fahr pretrain experiment=bench_faceage_pretrain`` on UTKFace-train + CACD (never UTKFace
   val/test), then ``fahr export``;
3. ``fahr finetune-age experiment=bench_faceage`` twice, same step budget: ``backbone=<MAE export>``
   and ``backbone=null`` (scratch, ``task.stage2.layer_decay=1.0``);
4. baselines on the same split: the training median, and ridge regression on 32x32 grey pixels
   (alpha chosen on val);
5. FG-NET (61 raw photos, 5 people): ``fahr far`` with detection (FaceAge per photo, FAR per person,
   widest-gap pair) and the Spearman correlation of change in FaceAge vs change in true age over all
   within-person photo pairs;
6. ``fahr predict`` photos/s on CPU with and without detection (FG-NET photos).

Targets (2 CPU cores, <= 60 min for pretraining + fine-tunes + baselines): test MAE <= 5.5 years and
pretrained beating scratch by >= 10% MAE. Prints a table and writes benchmarks/results/faceage.json.
``--quick`` runs a few steps of everything into runs/bench-faceage-quick (no result file).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DATA = ROOT / "data" / "faceage_bench"
FAHR = [sys.executable, "-m", "fahr.cli.main"]
IMAGE_SIZE = 64
# One compute thread (+ one loader worker = the 2 cores): on the shared 2-core machine two OpenMP
# threads under load ran >10x slower than one (spin-waiting), see docs/benchmarks.md.
THREADS = int(os.environ.get("FAHR_BENCH_THREADS", "1"))
THREADS_ENV = {"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
TARGET_MAE, TARGET_GAIN, TARGET_MINUTES = 5.5, 0.10, 60.0

QUICK_PRETRAIN = ["trainer.max_steps=6", "task.warmup_steps=2", "callbacks.checkpoint.every_n_train_steps=6",
                  "data.samples_per_epoch=512", "trainer.log_every_n_steps=1"]
QUICK_FINETUNE = ["task.stage1.max_steps=3", "task.stage1.val_every_n_steps=3", "task.stage2.max_steps=4",
                  "task.stage2.warmup_steps=1", "task.stage2.val_every_n_steps=4", "trainer.log_every_n_steps=1"]


class Job:
    """A ``fahr`` subprocess in the project root, output to ``log_path``; :meth:`wait` returns wall seconds."""

    def __init__(self, cmd: list[str], log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        shown = ["fahr", *cmd[len(FAHR):]] if cmd[:len(FAHR)] == FAHR else cmd
        print("$ " + " ".join(a if len(a) < 300 else a[:120] + f"...] ({a.count(',') + 1} shards)" for a in shown), flush=True)
        self.cmd, self.log_path, self.t0 = cmd, log_path, time.perf_counter()
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **THREADS_ENV})

    def wait(self) -> float:
        code = self.proc.wait()
        seconds = time.perf_counter() - self.t0
        self.log.close()
        if code:
            tail = self.log_path.read_text()[-3000:]
            raise RuntimeError(f"{' '.join(self.cmd)} failed ({code}); log {self.log_path}:\n{tail}")
        print(f"  done in {seconds / 60:.1f} min: {' '.join(self.cmd[len(FAHR):len(FAHR) + 2])} "
              f"(log: {self.log_path.relative_to(ROOT)})", flush=True)
        return seconds


def run(cmd: list[str], log_path: Path) -> float:
    """Run ``cmd`` to the end; returns wall seconds; raises on failure."""
    return Job(cmd, log_path).wait()


# ---- 1. shards --------------------------------------------------------------------------------------


def cacd_source() -> Path:
    """A folder-source view of CACD: a manifest (each file its own person) + a symlink to the images."""
    src = DATA / "cacd_src"
    src.mkdir(parents=True, exist_ok=True)
    images = SHARED / "cacd_unlabelled" / "images"
    link = src / "images"
    if not link.exists():
        link.symlink_to(images.resolve(), target_is_directory=True)
    names = sorted(p.name for p in images.iterdir() if p.suffix.lower() == ".jpg")
    (src / "manifest.csv").write_text("file\n" + "".join(f"images/{n}\n" for n in names))
    return src


def build_shards(logs: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    jobs = {
        "utkface": ["shards", "source=utkface", f"input={SHARED / 'utkface'}", f"output={DATA / 'utkface64'}",
                    "align.skip_detection=true", f"align.image_size={IMAGE_SIZE}", "processes=2"],
        "cacd": ["shards", "source=folder", f"input={DATA / 'cacd_src'}", f"output={DATA / 'cacd64'}",
                 f"align.image_size={IMAGE_SIZE}", "processes=2"],
    }
    for name, args in jobs.items():
        index = DATA / f"{name}64" / "index.json"
        seconds = None
        if not index.is_file():
            if name == "cacd":
                cacd_source()
            seconds = run(FAHR + args, logs / f"shards_{name}.log")
        idx = json.loads(index.read_text())
        out[name] = {"index": str(index.relative_to(ROOT)), "seconds": seconds, "reused": seconds is None,
                     "read": idx["read"], "rejected": idx["rejected"],
                     "splits": {k: v["count"] for k, v in idx["splits"].items()}}
    return out


def pretrain_shard_list() -> list[str]:
    """UTKFace train shards + every CACD shard (CACD is unlabelled and unrelated to UTKFace val/test)."""
    from fahr.data.build import shard_list_from_split_index

    shards = shard_list_from_split_index(DATA / "utkface64" / "index.json", "train")
    cacd = json.loads((DATA / "cacd64" / "index.json").read_text())["splits"]
    for split in sorted(cacd):
        shards += shard_list_from_split_index(DATA / "cacd64" / "index.json", split)
    return [os.path.relpath(s, ROOT) for s in shards]


# ---- 2-3. pretraining and fine-tunes ----------------------------------------------------------------


def logged_images_per_s(metrics_csv: Path) -> float | None:
    """Median of the ``perf/images_per_sec`` rows `fahr pretrain` logs (training steps only)."""
    if not metrics_csv.is_file():
        return None
    values = [float(r["perf/images_per_sec"]) for r in csv.DictReader(open(metrics_csv)) if r.get("perf/images_per_sec")]
    return float(np.median(values[1:] or values)) if values else None


def start_finetune(name: str, overrides: list[str], runs_dir: Path, logs: Path) -> tuple[Job, Path]:
    export_dir = runs_dir / f"finetune_{name}"
    return Job(FAHR + ["finetune-age", "experiment=bench_faceage", f"paths.runs_dir={runs_dir}",
                       f"export_dir={export_dir}", *overrides], logs / f"finetune_{name}.log"), export_dir


def finish_finetune(job: Job, export_dir: Path, runs_dir: Path) -> dict[str, Any]:
    seconds = job.wait()
    card = json.loads((export_dir / "model_card.json").read_text())
    run_dir = runs_dir / "bench_faceage" / card["run_id"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"seconds": seconds, "export_dir": str(export_dir.relative_to(ROOT)),
            "run_dir": str(run_dir.relative_to(ROOT)), "metrics": metrics,
            "steps": {k: v.get("steps") for k, v in metrics["stages"].items()},
            "steps_per_s_wall": sum(v.get("steps") or 0 for v in metrics["stages"].values()) / seconds}


# ---- 4. baselines -----------------------------------------------------------------------------------


def grey_pixels(faces, size: int = 32) -> np.ndarray:
    """(N, size*size) float32 grey levels in [0, 1] of a LabelledFaces set."""
    import torch
    from torchvision.transforms.v2 import functional as tvf

    out = np.empty((len(faces), size * size), np.float32)
    for i in range(len(faces)):
        image = faces[i]["image"].float() / 255.0
        grey = (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2])[None]
        out[i] = tvf.resize(grey, [size, size], antialias=True).reshape(-1).numpy()
    return out


def baselines() -> dict[str, Any]:
    from sklearn.linear_model import Ridge

    from fahr.data.build import resolve_train_shards
    from fahr.data.labelled import load_labelled_faces
    from fahr.metrics.age import age_metrics

    t0 = time.perf_counter()
    index = DATA / "utkface64" / "index.json"
    sets = {s: load_labelled_faces(resolve_train_shards(f"{index}#{s}"), required=["age"], image_size=IMAGE_SIZE)
            for s in ("train", "val", "test")}
    ages = {s: d.labels["age"] for s, d in sets.items()}
    median = float(np.median(ages["train"]))
    out: dict[str, Any] = {"median": {"value": median, "metrics": age_metrics(np.full(len(ages["test"]), median), ages["test"])}}
    out["median"]["seconds"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    x = {s: grey_pixels(d) for s, d in sets.items()}
    mean, std = x["train"].mean(0), x["train"].std(0) + 1e-6
    x = {s: (v - mean) / std for s, v in x.items()}
    val_mae = {}
    for alpha in (1.0, 10.0, 100.0, 1e3, 1e4, 1e5):
        model = Ridge(alpha=alpha).fit(x["train"], ages["train"])
        val_mae[alpha] = float(np.mean(np.abs(model.predict(x["val"]) - ages["val"])))
    alpha = min(val_mae, key=val_mae.get)
    model = Ridge(alpha=alpha).fit(x["train"], ages["train"])
    pred = np.clip(model.predict(x["test"]), 0, 120)
    out["ridge"] = {"alpha": alpha, "val_mae_by_alpha": {f"{a:g}": v for a, v in val_mae.items()},
                    "metrics": age_metrics(pred, ages["test"]), "seconds": time.perf_counter() - t1}
    out["photos"] = {s: len(d) for s, d in sets.items()}
    return out


# ---- 5-6. FG-NET and predict speed ------------------------------------------------------------------


def fgnet(export_dir: Path, runs_dir: Path, logs: Path) -> dict[str, Any]:
    from scipy.stats import spearmanr

    root = SHARED / "fgnet"
    if not (root / "manifest.csv").is_file():
        return {"skipped": f"{root} not found"}
    rows = list(csv.DictReader(open(root / "manifest.csv")))
    far_in = runs_dir / "fgnet_far_input.csv"
    with open(far_in, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["person", "path", "age_at_photo"])
        for r in rows:
            w.writerow([r["subject"], str((root / r["file"]).resolve()), r["age"]])
    far_out, photos_out = runs_dir / "fgnet_far.csv", runs_dir / "fgnet_photos.csv"
    # The card says detect=false (UTKFace shards were already aligned); FG-NET photos are raw.
    seconds = run(FAHR + ["far", f"model={export_dir}", f"input={far_in}", f"output={far_out}",
                          f"photos_output={photos_out}", "preprocessing.detect=true"], logs / "far_fgnet.log")
    preds = {r["path"]: r for r in csv.DictReader(open(photos_out))}
    # FaceAge as predicted, as in the UTKFace table and `fahr far`'s default; the val-fitted
    # correction is a positive linear map, so it leaves the rank correlation unchanged
    key = "faceage"
    people: dict[str, list[tuple[float, float]]] = {}
    corrected_errors: list[float] = []
    failed = 0
    for r in rows:
        p = preds.get(str((root / r["file"]).resolve()))
        if p is None or p["status"] != "ok" or not p.get(key):
            failed += 1
            continue
        people.setdefault(r["subject"], []).append((float(r["age"]), float(p[key])))
        if p.get("faceage_corrected"):
            corrected_errors.append(abs(float(p["faceage_corrected"]) - float(r["age"])))
    d_true, d_face = [], []
    for photos in people.values():
        for (a0, f0), (a1, f1) in itertools.combinations(sorted(photos), 2):
            if a1 != a0:
                d_true.append(a1 - a0)
                d_face.append(f1 - f0)
    rho = spearmanr(d_true, d_face)
    all_true = np.array([a for ph in people.values() for a, _ in ph])
    all_face = np.array([f for ph in people.values() for _, f in ph])
    far_rows = list(csv.DictReader(open(far_out)))
    return {
        "photos": len(rows), "photos_with_face": len(rows) - failed, "faceage_column": key, "seconds": seconds,
        "spearman_delta_faceage_vs_delta_age": float(rho.statistic), "spearman_p": float(rho.pvalue),
        "within_person_pairs": len(d_true),
        "photo_mae": float(np.mean(np.abs(all_face - all_true))) if len(all_true) else None,
        "photo_mae_corrected": float(np.mean(corrected_errors)) if corrected_errors else None,
        "far": [{k: r[k] for k in ("person", "n_used", "interval_days", "faceage_first", "faceage_last", "far", "status")}
                for r in far_rows],
        "files": {"far": str(far_out.relative_to(ROOT)), "photos": str(photos_out.relative_to(ROOT))},
    }


def predict_speed(export_dir: Path) -> dict[str, Any]:
    import torch

    from fahr.inference.predict import time_photos_per_second
    from fahr.models.face_model import load_face_model

    torch.set_num_threads(THREADS)
    model, card = load_face_model(str(export_dir))
    paths = sorted(str(p) for p in (SHARED / "fgnet" / "images").iterdir())
    return {**time_photos_per_second(model, card, paths, batch_size=32, device="cpu"), "torch_threads": THREADS,
            "photos_source": "FG-NET raw photos (~450x550 JPEG)"}


# ---- report -----------------------------------------------------------------------------------------


def finite(obj: Any) -> Any:
    """``obj`` with NaN / inf floats replaced by None (the results file is strict JSON)."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    return obj


def decades(m: dict[str, float], prefix: str = "") -> str:
    keys = sorted((k for k in m if k.startswith(f"{prefix}mae/decade/")), key=lambda k: int(k.rsplit("/", 1)[1].split("-")[0]))
    return " ".join(f"{k.rsplit('/', 1)[1].split('-')[0]}s:{m[k]:.1f}" for k in keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (development)")
    args = parser.parse_args()
    if not (SHARED / "utkface" / "manifest.csv").is_file():
        print(f"skipped: {SHARED} not found (the real data sets are needed)")
        return
    runs_dir = ROOT / "runs" / ("bench-faceage-quick" if args.quick else "bench-faceage")
    logs = runs_dir / "logs"
    previous = [name for name in ("bench_faceage_pretrain", "bench_faceage") if (runs_dir / name).exists()]
    if previous and args.quick:
        shutil.rmtree(runs_dir)
    elif previous:
        # fahr resumes a finished run in no time: the budget would count it as zero minutes
        sys.exit(f"{runs_dir} holds a previous benchmark run ({', '.join(previous)}): move it away first")
    runs_dir.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    shards = build_shards(logs)
    shard_list = pretrain_shard_list()
    pre_args = ["experiment=bench_faceage_pretrain", f"paths.runs_dir={runs_dir}",
                f"data.train_shards=[{','.join(shard_list)}]", *(QUICK_PRETRAIN if args.quick else [])]
    quick = QUICK_FINETUNE if args.quick else []
    t_budget = time.perf_counter()
    # The scratch fine-tune needs no pretraining: it runs beside it (one compute thread each = 2 cores).
    scratch = start_finetune("scratch", ["backbone=null", "task.stage2.layer_decay=1.0", *quick], runs_dir, logs)
    pre_s = run(FAHR + ["pretrain", *pre_args], logs / "pretrain.log")
    mae_export = runs_dir / "mae_export"
    exp_s = run(FAHR + ["export", *pre_args, f"export.output_dir={mae_export}"], logs / "export.log")
    mae_card = json.loads((mae_export / "model_card.json").read_text())
    pre_run = runs_dir / "bench_faceage_pretrain" / mae_card["run_id"]
    pre_info = {"seconds": pre_s, "export_seconds": exp_s, "steps": mae_card["global_step"],
                "steps_per_s_wall": mae_card["global_step"] / pre_s,
                "steps_per_s_logged": (logged_images_per_s(pre_run / "metrics.csv") or float("nan")) / 64,
                "run_dir": str(pre_run.relative_to(ROOT)), "shards": len(shard_list),
                "export_dir": str(mae_export.relative_to(ROOT))}
    pretrained = start_finetune("pretrained", [f"backbone={mae_export}", *quick], runs_dir, logs)
    fts = {"scratch": finish_finetune(*scratch, runs_dir), "pretrained": finish_finetune(*pretrained, runs_dir)}
    base = baselines()
    budget_s = time.perf_counter() - t_budget

    best = min(fts, key=lambda k: fts[k]["metrics"]["test/mae"])
    final = runs_dir / "export"
    tmp = runs_dir / ".export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ROOT / fts[best]["export_dir"], tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    print(f"best: {best} (test MAE {fts[best]['metrics']['test/mae']:.2f}) -> {final.relative_to(ROOT)}", flush=True)

    fg = fgnet(final, runs_dir, logs)
    speed = predict_speed(final)

    rows, methods = [], {}
    m_pre, m_scr = fts["pretrained"]["metrics"], fts["scratch"]["metrics"]
    entries = [
        ("FaceAge, MAE-pretrained (vit_tiny/16@64)", m_pre, pre_s + exp_s + fts["pretrained"]["seconds"],
         f"pretrain {pre_s / 60:.1f} + fine-tune {fts['pretrained']['seconds'] / 60:.1f} min"),
        ("FaceAge, from scratch (same steps)", m_scr, fts["scratch"]["seconds"], "fine-tune only"),
        ("ridge, 32x32 grey pixels", base["ridge"]["metrics"], base["ridge"]["seconds"], f"alpha {base['ridge']['alpha']:g} (val)"),
        ("training median", base["median"]["metrics"], base["median"]["seconds"], f"{base['median']['value']:g} years (incl. reading shards)"),
    ]
    for name, m, sec, note in entries:
        methods[name] = {"test_mae": m["test/mae"] if "test/mae" in m else m["mae"], "seconds": sec, "note": note}
        mm = {k[len("test/"):]: v for k, v in m.items() if k.startswith("test/")} or m
        methods[name].update(cs5=mm["cs5"], per_decade_mae={k.rsplit("/", 1)[1]: v for k, v in mm.items() if k.startswith("mae/decade/")},
                             n_per_decade={k.rsplit("/", 1)[1]: v for k, v in mm.items() if k.startswith("n/decade/")})
        rows.append((name, f"{mm['mae']:.2f}", f"{mm['cs5']:.1%}", decades(mm), f"{sec / 60:.1f} min", note))
    gain = 1 - m_pre["test/mae"] / m_scr["test/mae"]
    best_mae = fts[best]["metrics"]["test/mae"]
    total_min = budget_s / 60
    passed = {"mae_le_5.5": best_mae <= TARGET_MAE, "pretrained_gain_ge_10pct": gain >= TARGET_GAIN,
              "budget_le_60_min": total_min <= TARGET_MINUTES}
    table = print_table("faceage benchmark: UTKFace test (person-disjoint by sha1), 2 CPU cores", rows,
                        header=("method", "test MAE", "CS@5", "MAE per decade (years)", "wall", "note"))
    print(f"\npretrained vs scratch: {gain:+.1%} MAE (target >= {TARGET_GAIN:.0%}: {'yes' if passed['pretrained_gain_ge_10pct'] else 'NO'});"
          f" best test MAE {best_mae:.2f} (target <= {TARGET_MAE}: {'yes' if passed['mae_le_5.5'] else 'NO'});"
          f" budget {total_min:.1f} min (target <= {TARGET_MINUTES:.0f}: {'yes' if passed['budget_le_60_min'] else 'NO'})")
    if "skipped" not in fg:
        print(f"FG-NET: {fg['photos_with_face']}/{fg['photos']} photos with a face, photo MAE {fg['photo_mae']:.1f} years,"
              f" Spearman(delta FaceAge, delta age) = {fg['spearman_delta_faceage_vs_delta_age']:.3f}"
              f" over {fg['within_person_pairs']} within-person pairs")
        print_table("FG-NET FAR (widest-gap pair per person)", [
            (r["person"], r["n_used"], f"{float(r['interval_days']) / 365.25:.0f} y" if r["interval_days"] else "-",
             f"{float(r['faceage_first']):.1f}" if r["faceage_first"] else "-",
             f"{float(r['faceage_last']):.1f}" if r["faceage_last"] else "-",
             f"{float(r['far']):.3f}" if r["far"] else "-", r["status"]) for r in fg["far"]],
            header=("person", "photos", "interval", "FaceAge first", "FaceAge last", "FAR", "status"))
    print(f"fahr predict (CPU, {THREADS} thread(s), {int(speed['photos'])} FG-NET photos): with detection {speed['with_detection']:.1f}"
          f" photos/s, without {speed['without_detection']:.1f}, model only {speed['model_only']:.0f}")
    result = {
        "config": {"model": "vit_tiny/16@64", "quick": args.quick, "pretrain_overrides": [a for a in pre_args if not a.startswith("data.train_shards")],
                   "finetune_experiment": "bench_faceage", "scratch_overrides": ["backbone=null", "task.stage2.layer_decay=1.0"],
                   "torch_threads": THREADS, "loader_workers": 1},
        "shards": shards, "pretrain": pre_info,
        "finetune": {k: {kk: vv for kk, vv in v.items() if kk != "metrics"} | {
            "test": {kk: vv for kk, vv in v["metrics"].items() if kk.startswith(("test/", "test_corrected/"))},
            "val_mae": v["metrics"].get("val/mae")} for k, v in fts.items()},
        "baselines": base, "methods": methods, "best": best, "export_dir": str(final.relative_to(ROOT)),
        "pretrained_gain": gain, "budget_minutes": total_min, "total_minutes": (time.perf_counter() - t_all) / 60,
        "fgnet": fg, "predict_photos_per_s": speed, "table": table,
        "targets": {"test_mae": f"<= {TARGET_MAE}", "pretrained_gain": f">= {TARGET_GAIN}", "budget_minutes": f"<= {TARGET_MINUTES}"},
        "pass": passed,
    }
    if args.quick:
        path = runs_dir / "faceage_quick.json"
        path.write_text(json.dumps(finite(result), indent=1, default=str))
        print(f"\n(--quick: results in {path.relative_to(ROOT)}, benchmarks/results untouched)")
    else:
        print(f"\nwrote {write_result('faceage', finite(result))}")


if __name__ == "__main__":
    main()
