"""`fahr demo`: the whole FAHR-Face path on synthetic faces, on a CPU in minutes.

1. synthetic shards -> MAE pretraining of a small ViT -> export        (conf/experiment/demo_pretrain.yaml)
2. FaceAge: two-stage fine-tune of that backbone -> export              (demo_faceage.yaml)
3. `fahr predict`-style inference on freshly generated held-back faces -> MAE against the truth
4. semi-synthetic cohort -> FaceSurvival fine-tune -> export           (demo_facesurvival.yaml)
5. `fahr evaluate` on the test patients: FaceAge and FaceSurvival, adjusted for age and sex
6. `fahr report`: the three runs and the evaluation on one self-contained HTML page

Overrides on the command line apply to step 1 (the pretraining config); the later steps compose
their experiment files with the same ``paths``.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from fahr.pipeline.export import export
from fahr.pipeline.pretrain import pretrain


def _loss_curve(metrics_csv: Path) -> tuple[float | None, float | None]:
    """First and last logged step loss."""
    if not metrics_csv.is_file():
        return None, None
    with open(metrics_csv, newline="") as f:
        losses = [float(r["train/loss_step"]) for r in csv.DictReader(f) if r.get("train/loss_step")]
    return (losses[0], losses[-1]) if losses else (None, None)


def _compose(name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside `fahr demo` (a Hydra app)
        return compose(config_name=name, overrides=overrides)
    from hydra import initialize_config_dir

    from fahr.cli._hydra import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def heldout_predictions(export_dir: Path, out_dir: Path, n: int = 48, seed: int = 99) -> dict[str, Any]:
    """Write ``n`` new synthetic faces as PNG files, run the predict path on them, compare with truth."""
    from PIL import Image

    from fahr.data.synthetic import synthetic_face
    from fahr.inference.predict import predict_photos
    from fahr.models import load_face_model
    from fahr.utils.atomic import atomic_write, atomic_write_text

    photos = out_dir / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    paths, ages = [], []
    for i in range(n):
        image, labels = synthetic_face(i, seed)
        path = photos / f"face_{i:03d}.png"
        atomic_write(path, lambda f, im=image: Image.fromarray(im).save(f, format="PNG"), mode="wb")
        paths.append(path)
        ages.append(float(labels["age"]))
    model, card = load_face_model(export_dir)
    # the demo model was trained on synthetic crops: the held-back faces are such crops, as predict is told
    rows = predict_photos(model, card, paths, preprocessing={"detect": False})
    pred = np.array([r["faceage"] for r in rows], dtype=np.float64)
    true = np.array(ages)
    lines = ["path,status,age,faceage"] + [f"{r['path']},{r['status']},{a:.2f},{r['faceage']:.2f}"
                                           for r, a in zip(rows, ages)]
    atomic_write_text(out_dir / "predictions.csv", "\n".join(lines) + "\n")
    return {"n": n, "ok": sum(r["status"] == "ok" for r in rows), "mae": float(np.mean(np.abs(pred - true))),
            "median_baseline_mae": float(np.mean(np.abs(np.median(true) - true))), "csv": out_dir / "predictions.csv"}


def evaluation_table(survival_cfg: DictConfig, faceage_export: Path, survival_run: Path, out_csv: Path) -> Path:
    """Per test patient: time, event, risk (FaceSurvival), faceage (FaceAge, mean over photos), age, sex."""
    import pandas as pd
    import torch

    from fahr.models import load_face_model
    from fahr.data.labelled import load_split_faces
    from fahr.utils.atomic import atomic_write_text

    d = survival_cfg.data
    test = load_split_faces(d.test, [d.time, d.event], ["age", "sex"], d.image_size)
    model, _ = load_face_model(faceage_export)
    with torch.inference_mode():
        faceage = np.concatenate([model(torch.stack([test[j]["image"] for j in range(i, min(i + 64, len(test)))]))["age"].numpy()
                                  for i in range(0, len(test), 64)])
    photos = pd.DataFrame({"person": test.persons, "faceage": faceage, "age": test.labels["age"],
                           "sex": test.labels["sex"], "followup": test.labels[d.time]})
    # the earliest photo (longest follow-up) is the baseline: its age; FaceAge averaged over photos
    first = photos.loc[photos.groupby("person")["followup"].idxmax()].set_index("person")[["age", "sex"]]
    first["faceage"] = photos.groupby("person")["faceage"].mean()
    risk = pd.read_csv(survival_run / "predictions_test.csv").set_index("person")
    table = risk.join(first, how="inner")
    atomic_write_text(out_csv, table.to_csv(index=False))
    return out_csv


def demo(cfg: DictConfig, faceage_overrides: list[str] = (), survival_overrides: list[str] = (),
         evaluate_overrides: list[str] = ()) -> dict:
    """Run the five steps; ``*_overrides`` shrink the later steps (tests)."""
    from fahr.pipeline.evaluate import evaluate
    from fahr.pipeline.finetune_age import finetune_age
    from fahr.pipeline.finetune_survival import finetune_survival

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    result = pretrain(cfg)
    if getattr(result, "preempted", False):
        raise SystemExit("pretraining was stopped by a signal; run `fahr demo` again to resume it")
    export_dir = export(cfg)
    first, last = _loss_curve(result.run_dir / "metrics.csv")
    timings["pretrain"] = time.perf_counter() - t0
    paths = [f"paths.root_dir={cfg.paths.root_dir}"]

    t = time.perf_counter()
    age = finetune_age(_compose("finetune_age", ["experiment=demo_faceage", f"backbone={export_dir}", *paths, *faceage_overrides]))
    held = heldout_predictions(age.export_dir, age.run_dir / "heldout")
    timings["faceage"] = time.perf_counter() - t

    t = time.perf_counter()
    surv_cfg = _compose("finetune_survival", ["experiment=demo_facesurvival", f"backbone={age.export_dir}", *paths,
                                               *survival_overrides])
    surv = finetune_survival(surv_cfg)
    table = evaluation_table(surv_cfg, age.export_dir, surv.run_dir, surv.run_dir / "evaluate_input.csv")
    report_dir = surv.run_dir / "report"
    evaluate(_compose("evaluate", [f"input={table}", f"output={report_dir}", "covariates=[age,sex]",
                                  *evaluate_overrides]))
    timings["facesurvival"] = time.perf_counter() - t

    from fahr.pipeline.report import write_report

    html_report = Path(cfg.paths.root_dir) / "demo_report.html"
    write_report([result.run_dir, age.run_dir, surv.run_dir], html_report, "fahr demo (synthetic faces)")
    am = age.metrics
    sm = surv.metrics
    summary = {
        "pretrain_run": result.run_dir, "pretrain_export": export_dir, "global_step": result.global_step,
        "first_loss": first, "last_loss": last, "faceage_run": age.run_dir, "faceage_export": age.export_dir,
        "faceage_test_mae": am.get("test/mae"), "heldout": held, "survival_run": surv.run_dir,
        "survival_export": surv.export_dir, "test_c_index": sm.get("test_c_index"), "report": report_dir / "report.md", "html_report": html_report,
        "minutes": (time.perf_counter() - t0) / 60, "timings_s": timings,
    }
    mae_line = f"MAE loss {first:.3f} -> {last:.3f}" if first is not None else ""
    lines = [
        "",
        "fahr demo finished (synthetic faces: NOT real people)",
        f"  1 pretrain     {result.run_dir}  ({result.global_step} steps, {mae_line}; figures/ has reconstructions)",
        f"    export       {export_dir}",
        f"  2 FaceAge      {age.run_dir}  (test MAE {am.get('test/mae', float('nan')):.2f} years, "
        f"CS@5 {am.get('test/cs5', float('nan')):.2f}; figures/faceage_*.png)",
        f"    export       {age.export_dir}",
        f"  3 predict      {held['csv']}  ({held['ok']}/{held['n']} held-back faces, MAE {held['mae']:.2f} years; "
        f"predicting the median: {held['median_baseline_mae']:.2f})",
        f"  4 FaceSurvival {surv.run_dir}  (test C-index {sm.get('test_c_index', float('nan')):.3f})",
        f"  5 evaluate     {report_dir / 'report.md'}  (Cox HRs adjusted for age and sex, KM by quartile)",
        f"  6 report       {html_report}  (all of the above on one page: open it in a browser)",
        f"  time           {summary['minutes']:.1f} min  " + ", ".join(f"{k} {v / 60:.1f}" for k, v in timings.items()),
        "  load           fahr.models.load_face_model(EXPORT_DIR)   or   fahr predict model=EXPORT_DIR input=DIR "
        "output=out.csv preprocessing.detect=false   (trained on synthetic crops: give crops, not raw photos)",
    ]
    print("\n".join(lines))
    return summary
