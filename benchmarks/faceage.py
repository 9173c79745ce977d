"""Benchmark `faceage` (issues 4, 15): FAHR-FaceAge on real data, on 2 CPU cores, judged on photos it never saw.

One command (``make bench-faceage``) runs the real commands as subprocesses and leaves the recipe's model
in ``runs/bench-faceage/export/`` (a model ``fahr predict`` / ``fahr far`` run on raw photos):

1. shards (reused when ``index.json`` exists), 112 px crops made **exactly as ``fahr predict`` makes
   them from raw photos** (fahr's detector + 5-point template; no ``skip_detection``):
   ``fahr shards source=utkface`` (person id = the photo's sha1, splits 0.8/0.1/0.1 by its hash) and
   ``fahr shards source=folder`` over CACD (unlabelled, for pretraining only);
2. the recipe, timed, both cores: ``fahr pretrain experiment=bench_faceage_pretrain`` on UTKFace-train
   + CACD (never UTKFace val/test), ``fahr export``, ``fahr finetune-age experiment=bench_faceage``;
3. a compute-matched baseline: a timm ResNet-18 from scratch on the same shards for the recipe's
   minutes (``benchmarks/_cnn_baseline.py``); optionally (``--vit-scratch``) the ViT from scratch;
4. the training median and ridge on 32x32 grey pixels;
5. held-out numbers for the recipe and the ResNet, through raw-photo preprocessing: UTKFace test photos
   from their original files (``fahr predict``), FG-NET (61 raw photos, 5 people: ``fahr far``): photo
   MAE and the rank correlation of change in FaceAge vs change in age over within-person pairs;
6. ``fahr predict`` photos/s on CPU with and without detection.

Targets (benchmark, not tests): UTKFace test MAE <= 5.5 years through raw-photo preprocessing; no worse
than the ResNet-18 (aim 10% better); FG-NET within-person rank correlation >= 0.7 and photo MAE <= 10;
recipe <= 60 min. Prints tables and writes benchmarks/results/faceage.json. ``--quick`` runs a few steps
of everything into runs/bench-faceage-quick (no result file).

Measuring one lever (docs/benchmarks.md, issue 15): ``--pretrain KEY=VALUE`` / ``--finetune KEY=VALUE``
override the two experiments, ``--tag NAME`` writes benchmarks/results/faceage_NAME.json,
``--reuse-pretrain`` fine-tunes anew from the MAE export in runs/bench-faceage/recipe.json (a lever of the
fine-tune alone), ``--reuse-recipe`` only reruns what follows the recipe, ``--reuse-cnn`` takes the
ResNet-18 left in runs/bench-faceage/resnet18 (it does not depend on the recipe's levers).
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
CROP_SIZE = 112  # the shards' crops: fahr's template at its native size (the model may read them smaller)
UTK, CACD = f"utkface{CROP_SIZE}", f"cacd{CROP_SIZE}"
# Both cores for one job at a time (the recipe, then each baseline). FAHR_BENCH_THREADS=1 for a shared
# machine: two OpenMP threads under load once ran >10x slower than one (spin-waiting).
THREADS = int(os.environ.get("FAHR_BENCH_THREADS", "2"))
THREADS_ENV = {"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
TARGET_MAE, TARGET_VS_CNN, TARGET_MINUTES = 5.5, 0.0, 60.0
TARGET_FGNET_RHO, TARGET_FGNET_MAE = 0.7, 10.0

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
    """UTKFace and CACD shards, detected and aligned as ``fahr predict`` does (reused when built)."""
    from fahr.data.shard_index import read_index

    out: dict[str, Any] = {}
    jobs = {
        UTK: ["shards", "source=utkface", f"input={SHARED / 'utkface'}", f"output={DATA / UTK}",
              f"align.image_size={CROP_SIZE}", "processes=2"],
        CACD: ["shards", "source=folder", f"input={DATA / 'cacd_src'}", f"output={DATA / CACD}",
               f"align.image_size={CROP_SIZE}", "processes=2"],
    }
    for name, args in jobs.items():
        index = DATA / name / "index.json"
        seconds = None
        if not index.is_file():
            if name == CACD:
                cacd_source()
            seconds = run(FAHR + args, logs / f"shards_{name}.log")
        idx = read_index(index)
        out[name] = {"index": str(index.relative_to(ROOT)), "seconds": seconds, "reused": seconds is None,
                     "read": idx["read"], "rejected": idx["rejected"],
                     "splits": {k: v["count"] for k, v in idx["splits"].items()}}
    return out


def pretrain_shard_list() -> list[str]:
    """UTKFace train shards + every CACD shard (CACD is unlabelled and unrelated to UTKFace val/test)."""
    from fahr.data.shard_index import shard_urls

    shards = shard_urls(DATA / UTK / "index.json", "train") + shard_urls(DATA / CACD / "index.json")  # all of CACD
    return [os.path.relpath(s, ROOT) for s in shards]


# ---- 2-3. the recipe and the scratch runs -----------------------------------------------------------


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
            "steps_per_s_wall": sum(v.get("steps") or 0 for v in metrics["stages"].values()) / seconds,
            "age_calibration_decision": card.get("age_calibration_decision"),
            "preprocessing": card.get("preprocessing")}


def run_recipe_finetune(mae_export: Path, overrides: list[str], args, runs_dir: Path, logs: Path) -> dict[str, Any]:
    """The recipe's fine-tune from ``mae_export`` with the lever ``overrides``; refuses to count a fine-tune
    that had already run with these settings (fahr resumes a finished run in no time)."""
    before = {p.name for p in (runs_dir / "bench_faceage").glob("*")}
    shutil.rmtree(runs_dir / "finetune_pretrained", ignore_errors=True)
    recipe = finish_finetune(*start_finetune("pretrained", [f"backbone={mae_export}", *overrides, *quick_finetune(args)],
                                             runs_dir, logs), runs_dir)
    if Path(recipe["run_dir"]).name in before:
        sys.exit(f"{recipe['run_dir']} had already run with these settings: move it away and run again")
    recipe["val_curve"] = val_curve(Path(recipe["run_dir"]))
    return recipe


def save_recipe(runs_dir: Path, shards, pre_info, recipe, recipe_s: float, pre_args: list[str],
                finetune_overrides: list[str]) -> None:
    """recipe.json: what ``--reuse-recipe`` / ``--reuse-pretrain`` take up."""
    (runs_dir / "recipe.json").write_text(json.dumps(finite(
        {"shards": shards, "pretrain": pre_info, "recipe": recipe, "recipe_seconds": recipe_s,
         "pretrain_args": [a for a in pre_args if not a.startswith("data.train_shards")],
         "finetune_overrides": finetune_overrides}), indent=1, default=str))


def val_curve(run_dir: Path) -> list[dict[str, float]]:
    """Stage-2 validation MAE by step, from the run's metrics.csv."""
    path = ROOT / run_dir / "metrics.csv"
    if not path.is_file():
        return []
    return [{"step": int(float(r["step"])), "val_mae": float(r["stage2/val/mae"])}
            for r in csv.DictReader(open(path)) if r.get("stage2/val/mae")]


def resnet_baseline(minutes: float, runs_dir: Path, reuse: bool = False) -> dict[str, Any]:
    """ResNet-18 from scratch on the same shards, the recipe's minutes, both cores (``reuse``: the one
    an earlier run of this benchmark trained, as its ``resnet18.json`` records it)."""
    import torch

    from _cnn_baseline import CONFIG_FILE, evaluate_on_shards, load_resnet18, train_resnet18

    out_dir = runs_dir / "resnet18"
    index = DATA / UTK / "index.json"
    t0 = time.perf_counter()
    if reuse:
        info = json.loads((out_dir / CONFIG_FILE).read_text())
        info["seconds"] = info["minutes"] * 60
    else:
        info = train_resnet18(f"{index}#train", f"{index}#val", image_size=CROP_SIZE, minutes=minutes,
                              threads=THREADS, out_dir=out_dir)
    torch.set_num_threads(THREADS)
    predict_fn = load_resnet18(out_dir)
    info["test"] = evaluate_on_shards(predict_fn, f"{index}#test", CROP_SIZE)
    info["seconds_total"] = info["seconds"] if reuse else time.perf_counter() - t0
    return info


# ---- 4. baselines -----------------------------------------------------------------------------------


def grey_pixels(faces, size: int = 32) -> np.ndarray:
    """(N, size*size) float32 grey levels in [0, 1] of a LabelledFaces set."""
    from torchvision.transforms.v2 import functional as tvf

    out = np.empty((len(faces), size * size), np.float32)
    for i in range(len(faces)):
        image = faces[i]["image"].float() / 255.0
        grey = (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2])[None]
        out[i] = tvf.resize(grey, [size, size], antialias=True).reshape(-1).numpy()
    return out


def baselines() -> dict[str, Any]:
    from sklearn.linear_model import Ridge

    from fahr.data.shard_index import resolve_shard_spec
    from fahr.data.labelled import load_labelled_faces
    from fahr.metrics.age import age_metrics

    t0 = time.perf_counter()
    index = DATA / UTK / "index.json"
    sets = {s: load_labelled_faces(resolve_shard_spec(f"{index}#{s}"), required=["age"], image_size=64)
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


# ---- 5. held-out photos through raw-photo preprocessing --------------------------------------------


def utkface_test_photos() -> list[tuple[str, float]]:
    """(original file, age) of every UTKFace photo in the test split, from the split's sample keys
    (``sha256("utkface\\0" + file)[:24]``, as ``fahr shards`` names them)."""
    import hashlib

    from fahr.data.shard_index import resolve_shard_spec
    from fahr.data.labelled import load_labelled_faces

    test = load_labelled_faces(resolve_shard_spec(f"{DATA / UTK / 'index.json'}#test"), required=["age"],
                               image_size=CROP_SIZE)
    keys = set(test.keys)
    rows = csv.DictReader(open(SHARED / "utkface" / "manifest.csv"))
    by_key = {hashlib.sha256(f"utkface\x00{r['file']}".encode()).hexdigest()[:24]: r for r in rows}
    missing = keys - set(by_key)
    if missing:
        raise RuntimeError(f"{len(missing)} test keys match no manifest row: the key scheme changed")
    return sorted((str((SHARED / "utkface" / by_key[k]["file"]).resolve()), float(by_key[k]["age"])) for k in keys)


def fgnet_photos() -> list[tuple[str, str, float]]:
    """(file, person, age) of the FG-NET photos."""
    root = SHARED / "fgnet"
    return [(str((root / r["file"]).resolve()), r["subject"], float(r["age"]))
            for r in csv.DictReader(open(root / "manifest.csv"))]


def heldout_metrics(pred: dict[str, float | None], utk: list[tuple[str, float]],
                    fgnet: list[tuple[str, str, float]]) -> dict[str, Any]:
    """Raw-photo metrics from per-photo FaceAge (None where no face was found): UTKFace test MAE, FG-NET
    photo MAE, and two within-person rank correlations on FG-NET: Spearman of change in FaceAge vs
    change in age over all within-person photo pairs (the target), and the mean over people of
    Spearman(FaceAge, age) across their photos."""
    from scipy.stats import spearmanr

    from fahr.metrics.age import age_metrics

    found = [(pred[f], a) for f, a in utk if pred.get(f) is not None]
    utk_m = age_metrics(np.array([p for p, _ in found]), np.array([a for _, a in found])) if found else {}
    people: dict[str, list[tuple[float, float]]] = {}
    for f, person, age in fgnet:
        if pred.get(f) is not None:
            people.setdefault(person, []).append((age, pred[f]))
    d_true, d_face, per_person = [], [], []
    for photos in people.values():
        for (a0, f0), (a1, f1) in itertools.combinations(sorted(photos), 2):
            if a1 != a0:
                d_true.append(a1 - a0)
                d_face.append(f1 - f0)
        if len(photos) >= 3:
            per_person.append(float(spearmanr([a for a, _ in photos], [f for _, f in photos]).statistic))
    errors = [abs(f - a) for ph in people.values() for a, f in ph]
    return {
        "utkface_raw": {"photos": len(utk), "with_face": len(found), "mae": utk_m.get("mae"), "cs5": utk_m.get("cs5"),
                        "pearson_r": utk_m.get("pearson_r"),
                        "per_decade_mae": {k.rsplit("/", 1)[1]: v for k, v in utk_m.items() if k.startswith("mae/decade/")}},
        "fgnet": {"photos": len(fgnet), "with_face": sum(len(v) for v in people.values()),
                  "photo_mae": float(np.mean(errors)) if errors else None,
                  "pair_spearman": float(spearmanr(d_true, d_face).statistic) if len(d_true) > 2 else None,
                  "pairs": len(d_true),
                  "mean_person_spearman": float(np.mean(per_person)) if per_person else None,
                  "per_person": {p: {"photos": len(v), "ages": [a for a, _ in sorted(v)],
                                     "faceage": [round(f, 2) for _, f in sorted(v)]} for p, v in sorted(people.items())}},
    }


def recipe_heldout(export_dir: Path, runs_dir: Path, logs: Path, utk, fgnet) -> dict[str, Any]:
    """The recipe's export through the shipped commands, with the card's preprocessing (no overrides)."""
    listing = runs_dir / "utkface_test_raw.csv"
    with open(listing, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path"])
        w.writerows([p] for p, _ in utk)
    out = runs_dir / "utkface_test_raw_pred.csv"
    seconds = run(FAHR + ["predict", f"model={export_dir}", f"input={listing}", f"output={out}"], logs / "predict_utk.log")
    pred = {r["path"]: float(r["faceage"]) if r["status"] == "ok" else None for r in csv.DictReader(open(out))}
    far_in, far_out, photos_out = runs_dir / "fgnet_far_input.csv", runs_dir / "fgnet_far.csv", runs_dir / "fgnet_photos.csv"
    with open(far_in, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["person", "path", "age_at_photo"])
        w.writerows([person, path, age] for path, person, age in fgnet)
    seconds += run(FAHR + ["far", f"model={export_dir}", f"input={far_in}", f"output={far_out}",
                           f"photos_output={photos_out}", "use_corrected=false"], logs / "far_fgnet.log")
    pred.update({r["path"]: float(r["faceage"]) if r["status"] == "ok" else None for r in csv.DictReader(open(photos_out))})
    result = heldout_metrics(pred, utk, fgnet)
    result["fgnet"]["far"] = [{k: r[k] for k in ("person", "n_used", "interval_days", "faceage_first", "faceage_last",
                                                 "far", "status")} for r in csv.DictReader(open(far_out))]
    result["seconds"] = seconds
    return result


def resnet_heldout(runs_dir: Path, prep: dict[str, Any], utk, fgnet) -> dict[str, Any]:
    """The ResNet through the same aligner (the recipe card's preprocessing)."""
    from _cnn_baseline import load_resnet18, predict_raw_photos

    fn = load_resnet18(runs_dir / "resnet18")
    paths = [p for p, _ in utk] + [p for p, _, _ in fgnet]
    rows = predict_raw_photos(fn, paths, prep)
    pred = {r["path"]: r["faceage"] if r["status"] == "ok" else None for r in rows}
    return heldout_metrics(pred, utk, fgnet)


# ---- 6. predict speed -------------------------------------------------------------------------------


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


def quick_finetune(args: argparse.Namespace) -> list[str]:
    return QUICK_FINETUNE if args.quick else []


def fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (development)")
    parser.add_argument("--vit-scratch", action="store_true", help="also fine-tune the ViT from scratch (same steps)")
    parser.add_argument("--reuse-recipe", action="store_true",
                        help="take the finished recipe of an earlier run (its recipe.json) and run only what follows")
    parser.add_argument("--reuse-cnn", action="store_true",
                        help="take the ResNet-18 an earlier run left in runs/bench-faceage/resnet18 instead of training one")
    parser.add_argument("--cnn-minutes", type=float, default=None,
                        help="the ResNet-18's budget (default: the recipe's wall minutes); say why in the results")
    parser.add_argument("--reuse-pretrain", action="store_true",
                        help="take the MAE export of an earlier run (its recipe.json) and fine-tune anew: a lever of "
                             "the fine-tune alone costs the fine-tune alone (the recipe's minutes still count the pretraining)")
    parser.add_argument("--finetune", action="append", default=[], metavar="KEY=VALUE",
                        help="an override of the recipe's fine-tune (repeatable), e.g. task.augment.greyscale_p=0.2")
    parser.add_argument("--pretrain", action="append", default=[], metavar="KEY=VALUE",
                        help="an override of the recipe's MAE pretraining (repeatable), e.g. data.image_size=64")
    parser.add_argument("--tag", default=None,
                        help="write benchmarks/results/faceage_TAG.json (one lever's run) instead of faceage.json")
    args = parser.parse_args()
    if args.reuse_recipe and (args.reuse_pretrain or args.finetune):
        parser.error("--reuse-recipe takes a finished fine-tune: it cannot be combined with --reuse-pretrain or --finetune")
    if args.pretrain and (args.reuse_recipe or args.reuse_pretrain):
        parser.error("--pretrain changes the pretraining: it cannot be combined with --reuse-recipe or --reuse-pretrain")
    if args.tag is not None and not args.tag.replace("-", "").replace("_", "").isalnum():
        parser.error("--tag: letters, digits, '-' and '_' only")
    if not (SHARED / "utkface" / "manifest.csv").is_file() or not (SHARED / "fgnet" / "manifest.csv").is_file():
        print(f"skipped: {SHARED} not found (the real data sets are needed)")
        return
    runs_dir = ROOT / "runs" / ("bench-faceage-quick" if args.quick else "bench-faceage")
    if args.reuse_cnn and not (runs_dir / "resnet18" / "resnet18.json").is_file():
        parser.error(f"--reuse-cnn: no trained ResNet-18 in {runs_dir / 'resnet18'}")
    logs = runs_dir / "logs"
    t_all = time.perf_counter()
    if args.reuse_recipe or args.reuse_pretrain:
        saved = json.loads((runs_dir / "recipe.json").read_text())
        shards, pre_info, pre_args = saved["shards"], saved["pretrain"], saved["pretrain_args"]
        pre_s, exp_s = pre_info["seconds"], pre_info["export_seconds"]
        for stale in ("finetune_scratch",) if args.reuse_cnn else ("resnet18", "finetune_scratch"):
            shutil.rmtree(runs_dir / stale, ignore_errors=True)
    if args.reuse_recipe:
        recipe, recipe_s = saved["recipe"], saved["recipe_seconds"]
        finetune_overrides = saved.get("finetune_overrides", [])
    elif args.reuse_pretrain:
        finetune_overrides = args.finetune
        recipe = run_recipe_finetune(ROOT / pre_info["export_dir"], finetune_overrides, args, runs_dir, logs)
        recipe_s = pre_s + exp_s + recipe["seconds"]
        save_recipe(runs_dir, shards, pre_info, recipe, recipe_s, pre_args, finetune_overrides)
    else:
        previous = [name for name in ("bench_faceage_pretrain", "bench_faceage", *(() if args.reuse_cnn else ("resnet18",)))
                    if (runs_dir / name).exists()]
        if previous and args.quick:
            shutil.rmtree(runs_dir)
        elif previous:
            # fahr resumes a finished run in no time: the budget would count it as zero minutes
            sys.exit(f"{runs_dir} holds a previous benchmark run ({', '.join(previous)}): move it away first")
        runs_dir.mkdir(parents=True, exist_ok=True)
        shards = build_shards(logs)
        shard_list = pretrain_shard_list()
        pre_args = ["experiment=bench_faceage_pretrain", f"paths.runs_dir={runs_dir}",
                    f"data.train_shards=[{','.join(shard_list)}]", *args.pretrain, *(QUICK_PRETRAIN if args.quick else [])]

        # ---- the recipe, timed: pretraining + export + both fine-tune stages, both cores
        t_recipe = time.perf_counter()
        pre_s = run(FAHR + ["pretrain", *pre_args], logs / "pretrain.log")
        mae_export = runs_dir / "mae_export"
        exp_s = run(FAHR + ["export", *pre_args, f"export.output_dir={mae_export}"], logs / "export.log")
        mae_card = json.loads((mae_export / "model_card.json").read_text())
        pre_run = runs_dir / "bench_faceage_pretrain" / mae_card["run_id"]
        pre_info = {"seconds": pre_s, "export_seconds": exp_s, "steps": mae_card["global_step"],
                    "steps_per_s_wall": mae_card["global_step"] / pre_s,
                    "images_per_s_logged": logged_images_per_s(pre_run / "metrics.csv"),
                    "run_dir": str(pre_run.relative_to(ROOT)), "shards": len(shard_list),
                    "export_dir": str(mae_export.relative_to(ROOT))}
        finetune_overrides = args.finetune
        recipe = run_recipe_finetune(mae_export, finetune_overrides, args, runs_dir, logs)
        recipe_s = time.perf_counter() - t_recipe
        save_recipe(runs_dir, shards, pre_info, recipe, recipe_s, pre_args, finetune_overrides)
    quick = quick_finetune(args)
    final = runs_dir / "export"
    tmp = runs_dir / ".export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ROOT / recipe["export_dir"], tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    card = json.loads((final / "model_card.json").read_text())
    print(f"recipe: {recipe_s / 60:.1f} min, test MAE {recipe['metrics']['test/mae']:.2f} -> {final.relative_to(ROOT)}", flush=True)

    # ---- baselines, each with its own budget after the recipe
    cnn_minutes = 0.5 if args.quick else args.cnn_minutes or recipe_s / 60
    cnn = resnet_baseline(cnn_minutes, runs_dir, reuse=args.reuse_cnn)
    if args.reuse_cnn:
        cnn_minutes = cnn["budget_minutes"]  # the budget it was trained with, not this recipe's minutes
    scratch = None
    if args.vit_scratch:
        scratch = finish_finetune(*start_finetune("scratch", ["backbone=null", "task.stage2.layer_decay=1.0", *quick],
                                                  runs_dir, logs), runs_dir)
    base = baselines()

    # ---- held-out photos through raw-photo preprocessing
    utk = utkface_test_photos()[: 120 if args.quick else None]
    fg = fgnet_photos()
    held = {"recipe": recipe_heldout(final, runs_dir, logs, utk, fg),
            "resnet18": resnet_heldout(runs_dir, card["preprocessing"], utk, fg)}
    speed = predict_speed(final)

    m = recipe["metrics"]
    entries = [
        (f"FaceAge recipe ({card['backbone']['arch']}, MAE-pretrained)", m["test/mae"], m["test/cs5"], held["recipe"], recipe_s,
         f"pretrain {pre_s / 60:.1f} + export {exp_s / 60:.1f} + fine-tune {recipe['seconds'] / 60:.1f} min"),
        ("ResNet-18 from scratch (timm)", cnn["test"]["mae"], cnn["test"]["cs5"], held["resnet18"], cnn["seconds_total"],
         f"{cnn['steps']} steps, same shards, {cnn_minutes:.0f} min budget"
         + (" (an earlier run's, --reuse-cnn)" if args.reuse_cnn else "" if args.cnn_minutes is None else " (set by --cnn-minutes)")),
    ]
    if scratch:
        entries.append(("FaceAge ViT from scratch (same steps)", scratch["metrics"]["test/mae"], scratch["metrics"]["test/cs5"],
                        None, scratch["seconds"], "fine-tune only"))
    entries += [("ridge, 32x32 grey pixels", base["ridge"]["metrics"]["mae"], base["ridge"]["metrics"]["cs5"], None,
                 base["ridge"]["seconds"], f"alpha {base['ridge']['alpha']:g} (val)"),
                ("training median", base["median"]["metrics"]["mae"], base["median"]["metrics"]["cs5"], None,
                 base["median"]["seconds"], f"{base['median']['value']:g} years")]
    rows, methods = [], {}
    for name, mae, cs5, h, sec, note in entries:
        methods[name] = {"test_mae_shards": mae, "cs5": cs5, "seconds": sec, "note": note, "heldout": h}
        rows.append((name, f"{mae:.2f}", f"{cs5:.1%}",
                     fmt(h and h["utkface_raw"]["mae"]) + (f" ({h['utkface_raw']['with_face']}/{h['utkface_raw']['photos']})" if h else ""),
                     fmt(h and h["fgnet"]["photo_mae"]), fmt(h and h["fgnet"]["pair_spearman"], ".3f"),
                     fmt(h and h["fgnet"]["mean_person_spearman"], ".3f"), f"{sec / 60:.1f} min", note))
    table = print_table("faceage benchmark: UTKFace test (person-disjoint), FG-NET (5 people), 2 CPU cores", rows,
                        header=("method", "UTKFace test MAE (shards)", "CS@5", "UTKFace test MAE, raw photos (found)",
                                "FG-NET photo MAE", "FG-NET pair Spearman", "FG-NET per-person Spearman", "wall", "note"))
    r_raw, c_raw = held["recipe"]["utkface_raw"]["mae"], held["resnet18"]["utkface_raw"]["mae"]
    vs_cnn = 1 - r_raw / c_raw
    fg_r = held["recipe"]["fgnet"]
    passed = {"utkface_raw_mae_le_5.5": r_raw <= TARGET_MAE, "not_worse_than_resnet18": vs_cnn >= TARGET_VS_CNN,
              "fgnet_pair_spearman_ge_0.7": (fg_r["pair_spearman"] or -1) >= TARGET_FGNET_RHO,
              "fgnet_photo_mae_le_10": (fg_r["photo_mae"] or 1e9) <= TARGET_FGNET_MAE,
              "recipe_le_60_min": recipe_s / 60 <= TARGET_MINUTES}
    decision = card.get("age_calibration_decision") or {}
    print(f"\nrecipe vs ResNet-18 on raw UTKFace test photos: {vs_cnn:+.1%} MAE; targets: " +
          ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in passed.items()))
    print(f"bias correction: {'kept' if decision.get('kept') else 'not kept'} (val MAE {fmt(decision.get('val_mae'))} "
          f"as predicted, {fmt(decision.get('val_mae_corrected_heldout'))} corrected, held out); test MAE corrected "
          f"{fmt(m.get('test_corrected/mae'))}")
    print("recipe stage-2 validation MAE by step: " + ", ".join(f"{c['step']}: {c['val_mae']:.2f}" for c in recipe["val_curve"]))
    print("ResNet-18 validation MAE by minute: " + ", ".join(f"{c[1]:.0f}: {c[2]:.2f}" for c in cnn.get("val_curve", [])))
    print_table("FG-NET FAR with the recipe (widest-gap pair per person)", [
        (r["person"], r["n_used"], f"{float(r['interval_days']) / 365.25:.0f} y" if r["interval_days"] else "-",
         fmt(float(r["faceage_first"]) if r["faceage_first"] else None, ".1f"),
         fmt(float(r["faceage_last"]) if r["faceage_last"] else None, ".1f"),
         fmt(float(r["far"]) if r["far"] else None, ".3f"), r["status"]) for r in fg_r["far"]],
        header=("person", "photos", "interval", "FaceAge first", "FaceAge last", "FAR", "status"))
    print(f"fahr predict (CPU, {THREADS} thread(s), {int(speed['photos'])} FG-NET photos): with detection "
          f"{speed['with_detection']:.1f} photos/s, without {speed['without_detection']:.1f}, model only {speed['model_only']:.0f}")
    result = {
        "config": {"model": card["backbone"]["arch"], "image_size": card["backbone"]["img_size"], "crop_size": CROP_SIZE, "quick": args.quick,
                   "pretrain_overrides": [a for a in pre_args if not a.startswith("data.train_shards")],
                   "finetune_experiment": "bench_faceage", "finetune_overrides": finetune_overrides,
                   "torch_threads": THREADS, "loader_workers": 1, "reuse_recipe": args.reuse_recipe,
                   "reuse_pretrain": args.reuse_pretrain, "tag": args.tag, "cnn_minutes": cnn_minutes},
        "shards": shards, "pretrain": pre_info,
        "recipe": {k: v for k, v in recipe.items() if k != "metrics"} | {
            "test": {k: v for k, v in m.items() if k.startswith(("test/", "test_corrected/"))},
            "val_mae": m.get("val/mae"), "minutes": recipe_s / 60},
        "resnet18": cnn, "vit_scratch": scratch and {k: v for k, v in scratch.items() if k != "metrics"} | {
            "test_mae": scratch["metrics"]["test/mae"]},
        "baselines": base, "heldout": held, "methods": methods, "export_dir": str(final.relative_to(ROOT)),
        "recipe_vs_resnet18_raw": vs_cnn, "recipe_minutes": recipe_s / 60,
        "total_minutes": (time.perf_counter() - t_all) / 60, "predict_photos_per_s": speed, "table": table,
        "targets": {"utkface_raw_mae": f"<= {TARGET_MAE}", "vs_resnet18": ">= 0 (aim 0.10)",
                    "fgnet_pair_spearman": f">= {TARGET_FGNET_RHO}", "fgnet_photo_mae": f"<= {TARGET_FGNET_MAE}",
                    "recipe_minutes": f"<= {TARGET_MINUTES}"},
        "pass": passed,
    }
    if args.quick:
        path = runs_dir / "faceage_quick.json"
        path.write_text(json.dumps(finite(result), indent=1, default=str))
        print(f"\n(--quick: results in {path.relative_to(ROOT)}, benchmarks/results untouched)")
    else:
        print(f"\nwrote {write_result('faceage' if args.tag is None else f'faceage_{args.tag}', finite(result))}")


if __name__ == "__main__":
    main()
