"""Benchmark `survival`: FAHR-FaceSurvival (the DeepSurv-style Cox head) against reference Cox models.

(a) DeepSurv mode on the DeepSurv training splits in ../shared/data/survival (METABRIC, SUPPORT,
    GBSG, WHAS): for each of several split seeds, a deterministic 20% test part (stratified by
    event, never splitting the identical copies of a record: WHAS is 1,310 rows of 640 records) is
    held out; `fahr finetune-survival data=table experiment=bench_deepsurv_<name>` trains on
    the rest (its own event-stratified 20% validation part, seed = split seed, picks the checkpoint),
    lifelines' CoxPHFitter fits all the non-test rows, and pycox's CoxPH (a DeepSurv MLP trained with
    torchtuples, pycox's tutorial recipe) uses the same train/validation rows as ours. All three are
    scored with the same function (fahr.metrics.survival.harrell_c) on the same test rows, with wall
    times. Target: mean test C-index >= the DeepSurv paper's (Katzman et al. 2018, BMC Med. Res.
    Methodol. 18:24): METABRIC 0.643, SUPPORT 0.618, GBSG 0.668, WHAS 0.863. The paper scored its own
    test sets; ours are held out from its training splits, so the numbers are comparable, not identical;
    for a table with copies (WHAS) they are not comparable and no pass/fail is given (docs/benchmarks.md).
(b) Semi-synthetic linear recovery: fahr.data.cohort_simulator.simulate_survival on the synthetic faces'
    covariates (age, health) for several seeds; lifelines Cox on (age - 60) / 10 and health:
    mean estimated HR vs the true HR and coverage of the 95% confidence intervals.
(c) FaceSurvival on images: the demo cohort (synthetic faces, Weibull-Cox survival from age and a
    hidden health factor), `fahr finetune-survival experiment=demo_facesurvival` trained from scratch
    (no FaceAge/MAE export is assumed), against lifelines Cox on true age alone and the oracle (true
    age + true health), fitted on the non-test patients and scored on the same test patients.
(d) FaceSurvival on real faces, as FAHR-FaceSurvival is meant to be trained: from a FaceAge export
    (`make bench-faceage`'s, skipped with the reason when absent). The cohort is every adult UTKFace
    face of that benchmark's val and test splits (never trained on), with survival simulated from age
    alone (HR 2 per 10 years; fahr.data.cohort_simulator.write_cohort(only_sha1=...)), over several seeds.
    FaceSurvival (photo only) is scored against true age and against the export's FaceAge used
    directly as risk scores, on the same test patients.
Prints tables and writes benchmarks/results/survival.json. ``--quick`` shrinks everything for a smoke run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SURVIVAL_DATA = REPO.parent / "shared" / "data" / "survival"
SHARED_UTKFACE = REPO.parent / "shared" / "data" / "utkface"
PAPER_C = {"metabric": 0.643, "support": 0.618, "gbsg": 0.668, "whas": 0.863}  # DeepSurv, Table of results
TEST_FRACTION = 0.2
VAL_FRACTION = 0.2  # of the non-test rows (conf/data/table.yaml's val_fraction)
TEST_SEED_OFFSET = 1000  # test split seed = 1000 + split seed; the validation split uses the split seed


def _quiet() -> None:
    import lightning  # noqa: F401  (it sets its loggers' levels on import: import first, then lower them)

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "fahr", "pycox", "torchtuples"):
        logging.getLogger(name).setLevel(logging.ERROR)


def compose(config_name: str, overrides: list[str]):
    """The real Hydra config, composed as `fahr` does (and as tests/conftest.py does)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fahr.cli._hydra import config_dir
    from fahr.config.finetune_schema import register_finetune_schemas
    from fahr.config.schema import register_schemas

    register_schemas()
    register_finetune_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


@contextlib.contextmanager
def _silenced():
    """Lightning's per-fit banners and model summaries go to /dev/null (the tables are the output)."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        yield


# ---- (a) DeepSurv mode -----------------------------------------------------------------------------


def groups_of(df: pd.DataFrame) -> np.ndarray:
    """Copy groups of a DeepSurv table (identical rows share an id): held-out parts keep copies together."""
    from fahr.pipeline.finetune_survival import copy_groups

    return copy_groups(df.drop(columns=["time", "event"]), df["time"].to_numpy(), df["event"].to_numpy())


def split_table(name: str, seed: int, out: Path) -> tuple[Path, Path, pd.DataFrame, pd.DataFrame]:
    """A deterministic event-stratified test part of ``<name>_train.csv`` that never splits the copies
    of a record (see ``groups_of``); CSVs written under ``out``."""
    from fahr.pipeline.finetune_survival import holdout

    df = pd.read_csv(SURVIVAL_DATA / f"{name}_train.csv")
    test = holdout(len(df), df["event"].to_numpy(), TEST_FRACTION, TEST_SEED_OFFSET + seed, groups_of(df))
    train_df, test_df = df[~test].reset_index(drop=True), df[test].reset_index(drop=True)
    out.mkdir(parents=True, exist_ok=True)
    train_csv, test_csv = out / f"{name}_s{seed}_train.csv", out / f"{name}_s{seed}_test.csv"
    train_df.to_csv(train_csv, index=False)
    test_df.to_csv(test_csv, index=False)
    return train_csv, test_csv, train_df, test_df


def run_fahr_table(name: str, train_csv: Path, test_csv: Path, seed: int, root: Path, quick: bool,
                   extra: Sequence[str] = ()) -> dict[str, Any]:
    """``fahr finetune-survival experiment=bench_deepsurv_<name>`` (+ ``extra`` overrides) in this process
    (the ``fahr`` package first on the path: this checkout's, or an older tree's for survival_speed),
    in ``root``, which must be new (an earlier run's ``train_done.json`` would skip the training).
    Test and validation C, the kept and the last step, and two times: ``fit_s`` the training itself
    (the pipeline's ``train``: validations and early stopping included) and ``wall_s`` the command."""
    import fahr.pipeline.finetune_survival as command

    overrides = [f"experiment=bench_deepsurv_{name}", f"data.train={train_csv}",
                 f"data.test={test_csv}", f"seed={seed}", f"paths.root_dir={root}", "resume=false",
                 "trainer.enable_progress_bar=false", *extra]
    if quick:
        overrides += ["task.max_steps=40", "task.val_every_n_steps=20"]
    fit_s: list[float] = []
    train = command.train

    def timed_train(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return train(*args, **kwargs)
        finally:
            fit_s.append(time.perf_counter() - t0)

    command.train = timed_train
    try:
        t0 = time.perf_counter()
        cfg = compose("finetune_survival", overrides)
        with _silenced():
            result = command.finetune_survival(cfg)
        wall = time.perf_counter() - t0
    finally:
        command.train = train
    m = result.metrics
    return {"c_index": m["test_c_index"], "val_c_index": m["val_c_index"], "wall_s": wall, "fit_s": fit_s[-1],
            "best_step": _best_step(result.run_dir), "steps": m["training"]["steps"]}


def _best_step(run_dir: Path) -> int:
    """Global step of the kept checkpoint (the lowest validation loss), as ``train_done.json`` names it."""
    import torch

    best = json.loads((run_dir / "train_done.json").read_text())["best"]
    return int(torch.load(run_dir / best, map_location="cpu", weights_only=True)["global_step"])


def run_lifelines(train_df: pd.DataFrame, test_df: pd.DataFrame) -> dict[str, Any]:
    """Linear Cox (lifelines, Efron ties) on all non-test rows; no tuning, no penalty."""
    from lifelines import CoxPHFitter

    from fahr.metrics.survival import harrell_c

    t0 = time.perf_counter()
    cph = CoxPHFitter().fit(train_df, duration_col="time", event_col="event")
    risk = cph.predict_log_partial_hazard(test_df).to_numpy()
    wall = time.perf_counter() - t0
    return {"c_index": harrell_c(test_df["time"], test_df["event"], risk), "wall_s": wall}


def run_pycox(train_df: pd.DataFrame, test_df: pd.DataFrame, seed: int, tmp: Path, quick: bool) -> dict[str, Any]:
    """pycox CoxPH (DeepSurv) as in pycox's tutorial: MLP [32, 32] with batch norm, dropout 0.1, ReLU,
    Adam lr 0.01, batch 256, up to 512 epochs, early stopping on the validation partial likelihood
    (patience 10, best weights restored). Same train/validation rows and standardisation as ours.
    ``wall_s``: split, standardisation, fit and test prediction; ``fit_s``: ``model.fit`` alone."""
    import torch
    import torchtuples as tt
    from pycox.models import CoxPH

    from fahr.metrics.survival import harrell_c

    t0 = time.perf_counter()
    val = validation_part(train_df, seed)
    tr, va = train_df[~val], train_df[val]
    feats = [c for c in train_df.columns if c not in ("time", "event")]
    mean = tr[feats].mean().to_numpy()
    std = tr[feats].std(ddof=0).replace(0, 1.0).to_numpy()
    x = lambda d: ((d[feats].to_numpy(np.float64) - mean) / std).astype("float32")  # noqa: E731
    y = lambda d: (d["time"].to_numpy("float32"), d["event"].to_numpy("float32"))  # noqa: E731
    np.random.seed(seed)
    torch.manual_seed(seed)
    net = tt.practical.MLPVanilla(len(feats), [32, 32], 1, batch_norm=True, dropout=0.1, output_bias=False)
    model = CoxPH(net, tt.optim.Adam(lr=0.01))
    stop = tt.callbacks.EarlyStopping(file_path=str(tmp / f"pycox_{os.getpid()}_{seed}.pt"))
    t_fit = time.perf_counter()
    log = model.fit(x(tr), y(tr), batch_size=256, epochs=5 if quick else 512, callbacks=[stop], verbose=False,
                    val_data=(x(va), y(va)), val_batch_size=len(va))
    fit_s = time.perf_counter() - t_fit
    risk = model.predict(x(test_df)).reshape(-1)
    wall = time.perf_counter() - t0
    return {"c_index": harrell_c(test_df["time"], test_df["event"], risk), "wall_s": wall, "fit_s": fit_s,
            "epochs": len(log.to_pandas())}


def pycox_epoch_steps(n_train: int) -> int:
    """Optimiser steps of one epoch of :func:`run_pycox`'s batches of 256 in fahr, which drops the
    last partial batch."""
    return max(1, n_train // 256)


def pycox_recipe_overrides(n_train: int) -> list[str]:
    """``fahr finetune-survival`` overrides that train :func:`run_pycox`'s recipe (for survival_speed's
    same-work row): [32, 32] hidden, dropout 0.1, batch 256, Adam (AdamW without decay) at a constant
    0.01, no gradient clipping, Breslow ties, validation once an epoch (:func:`pycox_epoch_steps`),
    early stopping after 10 validations without a lower loss, at most 512 epochs. What stays fahr's:
    GELU for ReLU, no batch norm, exact tied-time handling, per-step reseeding and the validation
    C-index it logs."""
    epoch = pycox_epoch_steps(n_train)
    return ["task.head.hidden=[32,32]", "task.head.dropout=0.1", "data.batch_size=256", "task.base_lr=0.01",
            "task.min_lr=0.01", "task.warmup_steps=0", "task.weight_decay=0", "trainer.gradient_clip_val=null",
            "task.ties=breslow",
            f"task.max_steps={512 * epoch}", f"task.val_every_n_steps={epoch}", "task.early_stopping_patience=10"]


def validation_part(train_df: pd.DataFrame, seed: int) -> np.ndarray:
    """(N,) bool: the rows of the non-test part that fahr (data.val_fraction, the run's seed) and
    :func:`run_pycox` hold out for validation; the rest is trained on."""
    from fahr.pipeline.finetune_survival import holdout

    return holdout(len(train_df), train_df["event"].to_numpy(), VAL_FRACTION, seed, groups_of(train_df))


def deepsurv_benchmark(seeds: list[int], root: Path, quick: bool) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)  # tiny full-batch MLPs: one thread, the same for every method
    out: dict[str, Any] = {}
    for name in PAPER_C:
        runs = []
        for seed in seeds:
            train_csv, test_csv, train_df, test_df = split_table(name, seed, root / "tables")
            row = {"seed": seed, "n_train": len(train_df), "n_test": len(test_df), "test_events": int(test_df["event"].sum()),
                   "fahr": run_fahr_table(name, train_csv, test_csv, seed, root / name, quick),
                   "lifelines": run_lifelines(train_df, test_df),
                   "pycox": run_pycox(train_df, test_df, seed, root, quick)}
            runs.append(row)
            print(f"  {name} seed {seed}: fahr {row['fahr']['c_index']:.4f} ({row['fahr']['wall_s']:.1f} s), "
                  f"lifelines {row['lifelines']['c_index']:.4f}, pycox {row['pycox']['c_index']:.4f} "
                  f"({row['pycox']['wall_s']:.1f} s)", flush=True)
        # the corrected interval of the mean: split seeds share rows (see mean_ci95)
        ratio = statistics.fmean(r["n_test"] / r["n_train"] for r in runs)
        summary = {}
        for method in ("fahr", "lifelines", "pycox"):
            cs = [r[method]["c_index"] for r in runs]
            ws = [r[method]["wall_s"] for r in runs]
            summary[method] = {"c_index_mean": statistics.fmean(cs), "c_index_sd": statistics.stdev(cs) if len(cs) > 1 else 0.0,
                               "c_index_ci95": mean_ci95(cs, ratio), "wall_s_mean": statistics.fmean(ws)}
        # the same test rows for every method: paired differences cancel the split-to-split spread
        paired = {f"fahr_minus_{m}": mean_ci95([r["fahr"]["c_index"] - r[m]["c_index"] for r in runs], ratio)
                  for m in ("lifelines", "pycox")}
        df = pd.read_csv(SURVIVAL_DATA / f"{name}_train.csv")
        copies = int(len(df) - len(np.unique(groups_of(df))))
        # With many copies the paper's row-wise test set shares records with its training set (WHAS:
        # 670 of 1,310 rows are copies); our copy-disjoint test parts measure something else.
        comparable = copies <= 0.01 * len(df)
        out[name] = {"paper_c_index": PAPER_C[name], "runs": runs, "summary": summary, "paired": paired,
                     "copies_in_table": copies, "rows_in_table": len(df), "comparable_to_paper": comparable,
                     "pass": summary["fahr"]["c_index_mean"] >= PAPER_C[name] if comparable else None}
    return out


def mean_ci95(values: list[float], test_over_train: float = 0.0) -> list[float] | None:
    """95% interval of the mean of ``values`` (one per split seed); None for fewer than 2.

    Repeated random splits share rows, so their results are positively correlated and the plain
    Student-t interval (``test_over_train=0``) is too narrow. With ``test_over_train`` = test rows /
    training rows of one split, the variance of the mean is the corrected resampled t of Nadeau &
    Bengio (2003, Machine Learning 52:239) as used by Bouckaert & Frank (2004):
    ``(1 / J + test_over_train) * s**2`` for J splits and sample variance ``s**2``, still with J - 1
    degrees of freedom.
    """
    from scipy import stats

    if len(values) < 2:
        return None
    j = len(values)
    half = stats.t.ppf(0.975, j - 1) * (statistics.variance(values) * (1 / j + test_over_train)) ** 0.5
    return [statistics.fmean(values) - half, statistics.fmean(values) + half]


# ---- (b) linear recovery on the semi-synthetic cohort -----------------------------------------------


def linear_recovery(n_seeds: int, n: int) -> dict[str, Any]:
    from lifelines import CoxPHFitter

    from fahr.data.cohort_simulator import BETA_AGE, BETA_HEALTH, sample_synthetic_covariates, simulate_survival

    truth = {"age_per_10y": BETA_AGE, "health": BETA_HEALTH}
    est: dict[str, list[float]] = {k: [] for k in truth}
    covered: dict[str, list[bool]] = {k: [] for k in truth}
    events = []
    t0 = time.perf_counter()
    for seed in range(n_seeds):
        cov = sample_synthetic_covariates(n, seed=seed)
        t, e = simulate_survival(cov["age"], cov["health"], seed=seed)
        df = pd.DataFrame({"age_per_10y": (cov["age"] - 60.0) / 10.0, "health": cov["health"], "time": t, "event": e})
        s = CoxPHFitter().fit(df, duration_col="time", event_col="event").summary
        for k, beta in truth.items():
            est[k].append(float(s.loc[k, "coef"]))
            covered[k].append(bool(s.loc[k, "coef lower 95%"] <= beta <= s.loc[k, "coef upper 95%"]))
        events.append(float(e.mean()))
    out: dict[str, Any] = {"seeds": n_seeds, "patients": n, "event_rate_mean": statistics.fmean(events),
                           "wall_s": time.perf_counter() - t0}
    for k, beta in truth.items():
        b = np.array(est[k])
        out[k] = {"true_hr": float(np.exp(beta)), "mean_hr": float(np.exp(b).mean()), "hr_of_mean_beta": float(np.exp(b.mean())),
                  "sd_beta": float(b.std(ddof=1)), "bias_beta": float(b.mean() - beta),
                  "ci95_coverage": float(np.mean(covered[k])), "betas": b.tolist()}
    return out


# ---- (c) FaceSurvival on images vs age only ---------------------------------------------------------


def image_benchmark(data_dir: Path, runs_dir: Path, model: str, steps: int, n_patients: int, quick: bool) -> dict[str, Any]:
    import torch
    from lifelines import CoxPHFitter

    from data_pipelines.deid import load_salt, pseudonym
    from fahr.metrics.survival import harrell_c
    from fahr.pipeline.cohort_shards import cohort_truth, ensure_cohort_shards
    from fahr.data.labelled import load_split_faces
    from fahr.pipeline.finetune_survival import finetune_survival

    torch.set_num_threads(os.cpu_count() or 1)
    out_dir = data_dir / "demo_cohort" / f"n{n_patients}-s0"
    t0 = time.perf_counter()
    index = ensure_cohort_shards(str(out_dir), n_patients=n_patients, seed=0)
    cohort_s = time.perf_counter() - t0
    overrides = ["experiment=demo_facesurvival", "backbone=null", f"model={model}", "task.freeze_backbone=false",
                 f"paths.data_dir={data_dir}", f"paths.runs_dir={runs_dir}", f"data.generate.n_patients={n_patients}",
                 f"task.max_steps={steps}", f"task.val_every_n_steps={max(10, steps // 8)}", "task.warmup_steps=20",
                 "trainer.enable_progress_bar=false", "resume=false"]
    if quick:
        overrides[-4:-2] = [f"task.val_every_n_steps={steps}", "task.warmup_steps=2"]
    t0 = time.perf_counter()
    cfg = compose("finetune_survival", overrides)
    with _silenced():
        result = finetune_survival(cfg)
    train_s = time.perf_counter() - t0
    pred = pd.read_csv(result.run_dir / "predictions_test.csv")

    # per-person age (at the index photo) of every split, from the shards' labels
    def persons(split: str) -> pd.DataFrame:
        ds = load_split_faces(f"{index}#{split}", ["followup_days", "event", "age"], [], cfg.data.image_size)
        df = pd.DataFrame({"person": ds.persons, "time": ds.labels["followup_days"], "event": ds.labels["event"],
                           "age": ds.labels["age"]})
        return df.loc[df.groupby("person")["time"].idxmax()].set_index("person")

    # the hidden health of each person: truth.csv is keyed by the raw patient id, shards by its keyed hash
    salt = load_salt(out_dir / "demo_deid.key")
    truth = pd.read_csv(out_dir / "cohort" / "truth.csv")
    truth = truth[truth["index_photo"] == 1]
    health = pd.Series(truth["health"].to_numpy(), index=[pseudonym(p, salt) for p in truth["patient_id"]])
    fit = pd.concat([persons("train"), persons("val")])
    test = persons("test").loc[pred["person"].astype(str)]
    fit["age10"], test["age10"] = (fit["age"] - 60) / 10, (test["age"] - 60) / 10
    fit["health"], test["health"] = health.loc[fit.index].to_numpy(), health.loc[test.index].to_numpy()

    def cox(cols: list[str]) -> tuple[float, dict[str, float]]:
        cph = CoxPHFitter().fit(fit[cols + ["time", "event"]], duration_col="time", event_col="event")
        risk = cph.predict_log_partial_hazard(test[cols]).to_numpy()
        return harrell_c(test["time"], test["event"], risk), {k: float(v) for k, v in cph.hazard_ratios_.items()}

    age_c, age_hr = cox(["age10"])
    oracle_c, oracle_hr = cox(["age10", "health"])
    info = cohort_truth(str(out_dir))
    true_eta = info["beta_age"] * test["age10"] + info["beta_health"] * test["health"]
    return {
        "cohort": {"n_patients": n_patients, "true_hr_age_per_10y": info["hr_age_per_10_years"],
                   "true_hr_health": info["hr_health"], "observed_event_rate": info["observed_event_rate"],
                   "build_s": cohort_s},
        "model": model, "init": "random (no FaceAge/MAE export)", "steps": steps,
        "test_patients": len(test), "test_events": int(test["event"].sum()), "train_val_patients": len(fit),
        "facesurvival_c_index": float(result.metrics["test_c_index"]), "facesurvival_val_c_index": float(result.metrics["val_c_index"]),
        "facesurvival_wall_s": train_s, "facesurvival_training": result.metrics["training"],
        "age_only_c_index": age_c, "age_only_hr": age_hr,
        "oracle_age_health_c_index": oracle_c, "oracle_hr": oracle_hr,
        "true_log_hazard_c_index": harrell_c(test["time"], test["event"], true_eta.to_numpy()),
    }


# ---- (d) FaceSurvival on real faces, from a FaceAge export --------------------------------------------


FACEAGE_EXPORT = REPO / "runs" / "bench-faceage" / "export"  # written by `make bench-faceage`
FACEAGE_SHARDS = REPO / "data" / "faceage_bench" / "utkface112" / "index.json"


def heldout_sha1(index: Path, splits: tuple[str, ...] = ("val", "test")) -> set[str]:
    """UTKFace sha1s (the shards' person ids) of the FaceAge benchmark's ``splits``: faces it never trained on."""
    from fahr.data.shard_index import resolve_shard_spec
    from fahr.data.shard_reader import read_shard

    out: set[str] = set()
    for split in splits:
        for url in resolve_shard_spec(f"{index}#{split}"):
            out.update(json.loads(s["json"])["person"] for s in read_shard(url))
    return out


def faces_benchmark(export: Path, index: Path, root: Path, seeds: list[int], steps: int, freeze: bool,
                    quick: bool) -> dict[str, Any]:
    """Semi-synthetic survival (age only, HR 2 per 10 years) on real UTKFace faces the FaceAge export
    never trained on; FaceSurvival fine-tuned from that export against true age and FaceAge as risk
    scores, on the same test patients. Each seed draws new survival times (and so a new event-stratified
    split of the same faces) and trains with that seed."""
    import torch

    from fahr.data.cohort_simulator import write_cohort
    from fahr.metrics.survival import harrell_c
    from fahr.pipeline.cohort_shards import cohort_to_shards
    from fahr.pipeline.demo import evaluation_table
    from fahr.pipeline.finetune_survival import finetune_survival

    torch.set_num_threads(os.cpu_count() or 1)
    only = heldout_sha1(index)
    card = json.loads((export / "model_card.json").read_text())
    runs = []
    for seed in seeds:
        t0 = time.perf_counter()
        cohort = root / f"faces_cohort_s{seed}"
        info = write_cohort(cohort / "cohort", "utkface", n_patients=300 if quick else None, seed=seed,
                            utkface_dir=SHARED_UTKFACE, only_sha1=only)
        # the cohort's faces are cropped as the FaceAge export's training faces were (its card says how)
        fahr_crops = card.get("preprocessing", {}).get("crops") == "fahr"
        built = cohort_to_shards(cohort / "cohort", cohort / "shards", root / "faces_deid.key",
                                 image_size=card.get("preprocessing", {}).get("image_size", 64), detect=fahr_crops)
        build_s = time.perf_counter() - t0
        overrides = [f"backbone={export}", f"data.root={cohort / 'shards'}", "data.name=utkface_cohort", "trainer=cpu",
                     f"data.image_size={card['backbone']['img_size']}", "data.batch_size=64", "data.num_workers=1",
                     f"task.max_steps={steps}", f"task.val_every_n_steps={max(10, steps // 8)}", "task.warmup_steps=20",
                     f"task.freeze_backbone={str(freeze).lower()}", "task.base_lr=1e-3", f"seed={seed}",
                     f"paths.root_dir={root}", "trainer.enable_progress_bar=false", "resume=false"]
        t0 = time.perf_counter()
        cfg = compose("finetune_survival", overrides)
        with _silenced():
            result = finetune_survival(cfg)
        train_s = time.perf_counter() - t0
        table = pd.read_csv(evaluation_table(cfg, export, result.run_dir, root / f"faces_eval_s{seed}.csv"))
        c = lambda score: harrell_c(table["time"], table["event"], table[score].to_numpy())  # noqa: E731
        runs.append({"seed": seed, "n_patients": info["n_patients"], "observed_event_rate": info["observed_event_rate"],
                     "shards": {k: built[k] for k in ("read", "written", "rejected")}, "build_s": build_s,
                     "test_patients": len(table), "test_events": int(table["event"].sum()), "wall_s": train_s,
                     "facesurvival": float(result.metrics["test_c_index"]), "facesurvival_val": float(result.metrics["val_c_index"]),
                     "facesurvival_best_val_loss": result.metrics["training"]["best_val_loss"],
                     "faceage": c("faceage"), "age": c("age"),
                     "faceage_mae": float((table["faceage"] - table["age"]).abs().mean())})
        print(f"  faces seed {seed}: FaceSurvival {runs[-1]['facesurvival']:.4f} ({train_s:.0f} s), FaceAge "
              f"{runs[-1]['faceage']:.4f}, age {runs[-1]['age']:.4f}", flush=True)
    ratio = 0.1 / 0.9  # test patients / training patients per seed: the same faces recur (see mean_ci95)
    col = lambda k: [r[k] for r in runs]  # noqa: E731
    summary = {k: {"mean": statistics.fmean(col(k)), "sd": statistics.stdev(col(k)) if len(runs) > 1 else 0.0,
                   "ci95": mean_ci95(col(k), ratio)} for k in ("facesurvival", "faceage", "age", "faceage_mae")}
    paired = {f"facesurvival_minus_{k}": mean_ci95([r["facesurvival"] - r[k] for r in runs], ratio) for k in ("faceage", "age")}
    return {"cohort": {"faces": f"UTKFace val+test of the FaceAge benchmark ({len(only)} faces), ages 18-100",
                       "true_hr_age_per_10y": info["hr_age_per_10_years"], "log_hazard": info["log_hazard"]},
            "faceage_export": str(export.relative_to(REPO) if export.is_relative_to(REPO) else export),
            "faceage_test_mae_utkface": card["metrics"].get("test/mae"),
            "facesurvival": {"steps": steps, "freeze_backbone": freeze, "base_lr": 1e-3, "batch_size": 64},
            "runs": runs, "summary": summary, "paired": paired}


# ---- main -------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, a few steps, small cohorts")
    parser.add_argument("--seeds", type=int, default=5, help="split seeds for the DeepSurv tables")
    parser.add_argument("--recovery-seeds", type=int, default=100)
    parser.add_argument("--recovery-patients", type=int, default=1500)
    parser.add_argument("--image-model", default="vit_test")
    parser.add_argument("--image-steps", type=int, default=300)
    parser.add_argument("--image-patients", type=int, default=2000)
    parser.add_argument("--data-dir", default=str(REPO / "data"),
                        help="where the demo cohort is generated (git-ignored; reused between runs)")
    parser.add_argument("--faces-export", default=str(FACEAGE_EXPORT),
                        help="FaceAge export to start FaceSurvival from (made by `make bench-faceage`)")
    parser.add_argument("--faces-shards", default=str(FACEAGE_SHARDS),
                        help="the UTKFace shards that export was trained on (their val+test faces form the cohort)")
    parser.add_argument("--faces-steps", type=int, default=300)
    parser.add_argument("--faces-seeds", type=int, default=5, help="survival draws (and splits) of the real-face cohort")
    parser.add_argument("--faces-freeze", action=argparse.BooleanOptionalAction, default=True,
                        help="train the Cox head on frozen FaceAge features (default) or fine-tune all")
    parser.add_argument("--skip", nargs="*", default=[], choices=["tables", "recovery", "images", "faces"])
    args = parser.parse_args()
    if not SURVIVAL_DATA.is_dir():
        sys.exit(f"skipped: {SURVIVAL_DATA} is absent (see ../shared/data/README.md)")
    os.environ.setdefault("WANDB_MODE", "offline")
    _quiet()
    seeds = list(range(1 if args.quick else args.seeds))
    result: dict[str, Any] = {"config": {"quick": args.quick, "split_seeds": seeds, "test_fraction": TEST_FRACTION,
                                         "val_fraction": VAL_FRACTION, "test_split_seed": f"{TEST_SEED_OFFSET} + seed"}}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fahr-bench-survival-") as tmp:
        root = Path(tmp)
        if "tables" not in args.skip:
            tables = deepsurv_benchmark(seeds, root, args.quick)
            result["deepsurv"] = tables
            rows = []
            for name, r in tables.items():
                s = r["summary"]
                cell = lambda m: f"{s[m]['c_index_mean']:.3f} ± {s[m]['c_index_sd']:.3f}"  # noqa: E731
                verdict = {True: "yes", False: "NO", None: "n/a (copies)"}[r["pass"]]
                rows.append((name.upper(), f"{r['runs'][0]['n_train']}/{r['runs'][0]['n_test']}", cell("fahr"),
                             cell("lifelines"), cell("pycox"), f"{r['paper_c_index']:.3f}", verdict,
                             f"{s['fahr']['wall_s_mean']:.1f} / {s['lifelines']['wall_s_mean']:.2f} / {s['pycox']['wall_s_mean']:.1f}"))
            print_table(f"DeepSurv mode: test Harrell C, mean ± sd over {len(seeds)} split seed(s)", rows,
                        ("data", "train/test", "fahr head", "lifelines CoxPH", "pycox CoxPH", "paper", ">= paper",
                         "wall s (fahr / lifelines / pycox)"))
            if len(seeds) > 1:
                ci = lambda v: f"[{v[0]:.3f}, {v[1]:.3f}]"  # noqa: E731
                print_table("fahr head: 95% interval of the mean test C, and paired differences on the same splits", [
                    (name.upper(), ci(r["summary"]["fahr"]["c_index_ci95"]), f"{r['paper_c_index']:.3f}",
                     ci(r["paired"]["fahr_minus_lifelines"]), ci(r["paired"]["fahr_minus_pycox"])) for name, r in tables.items()],
                    ("data", "fahr mean C, 95% CI", "paper", "fahr - lifelines, 95% CI", "fahr - pycox, 95% CI"))
            result["pass"] = {name: r["pass"] for name, r in tables.items()}
        if "recovery" not in args.skip:
            n_seeds, n = (3, 500) if args.quick else (args.recovery_seeds, args.recovery_patients)
            rec = linear_recovery(n_seeds, n)
            result["linear_recovery"] = rec
            print_table(f"Semi-synthetic linear recovery: lifelines Cox, {n_seeds} seeds x {n} patients "
                        f"(event rate {rec['event_rate_mean']:.1%})", [
                (k, f"{rec[k]['true_hr']:.3f}", f"{rec[k]['mean_hr']:.3f}", f"{rec[k]['bias_beta']:+.3f}",
                 f"{rec[k]['sd_beta']:.3f}", f"{rec[k]['ci95_coverage']:.0%}") for k in ("age_per_10y", "health")],
                ("HR", "true", "mean estimate", "bias (log HR)", "sd (log HR)", "95% CI coverage"))
        if "images" not in args.skip:
            img = image_benchmark(Path(args.data_dir), root / "runs", "vit_test" if args.quick else args.image_model,
                                  10 if args.quick else args.image_steps, 200 if args.quick else args.image_patients,
                                  args.quick)
            result["images"] = img
            print_table(f"Demo cohort ({img['cohort']['n_patients']} synthetic patients): test Harrell C on "
                        f"{img['test_patients']} test patients ({img['test_events']} events)", [
                ("FaceSurvival (photo only)", f"{img['model']}, from scratch, {img['steps']} steps",
                 f"{img['facesurvival_c_index']:.3f}", f"{img['facesurvival_wall_s']:.0f}"),
                ("age only (lifelines Cox, true age)", "1 covariate", f"{img['age_only_c_index']:.3f}", "-"),
                ("oracle (true age + true health)", "2 covariates", f"{img['oracle_age_health_c_index']:.3f}", "-"),
                ("true log-hazard", "simulation truth", f"{img['true_log_hazard_c_index']:.3f}", "-"),
            ], ("model", "input", "test C", "wall s"))
        if "faces" not in args.skip:
            export, index = Path(args.faces_export), Path(args.faces_shards)
            missing = [str(p) for p in (export / "model_card.json", index) if not p.is_file()]
            if missing or not (SHARED_UTKFACE / "manifest.csv").is_file():
                why = f"needs {', '.join(missing) or SHARED_UTKFACE} (run `make bench-faceage` first)"
                result["faces"] = {"skipped": why}
                print(f"\nFaceSurvival on real faces: skipped: {why}")
            else:
                faces = faces_benchmark(export, index, root, list(range(1 if args.quick else args.faces_seeds)),
                                        20 if args.quick else args.faces_steps, args.faces_freeze, args.quick)
                result["faces"] = faces
                fs, sm, r0 = faces["facesurvival"], faces["summary"], faces["runs"][0]
                cell = lambda k: f"{sm[k]['mean']:.3f} ± {sm[k]['sd']:.3f}"  # noqa: E731
                ci = lambda v: "-" if v is None else f"[{v[0]:+.3f}, {v[1]:+.3f}]"  # noqa: E731
                print_table(f"Real faces: {r0['n_patients']} UTKFace faces unseen by the FaceAge export, survival "
                            f"simulated from age (HR 2 per 10 y); test Harrell C on ~{r0['test_patients']} patients "
                            f"(~{r0['test_events']} events), mean ± sd over {len(faces['runs'])} seed(s)", [
                    ("FaceSurvival (photo only)", f"FaceAge export, {'frozen, head only' if fs['freeze_backbone'] else 'all layers'}, "
                     f"{fs['steps']} steps", cell("facesurvival"), "-",
                     f"{statistics.fmean(r['wall_s'] for r in faces['runs']):.0f}"),
                    ("FaceAge as the risk score", f"MAE {sm['faceage_mae']['mean']:.2f} y on these patients",
                     cell("faceage"), ci(faces["paired"]["facesurvival_minus_faceage"]), "-"),
                    ("true age (= the simulation's log-hazard)", "1 covariate", cell("age"),
                     ci(faces["paired"]["facesurvival_minus_age"]), "-"),
                ], ("model", "input", "test C", "FaceSurvival - this, 95% CI", "wall s"))
    result["wall_s_total"] = time.perf_counter() - t_start
    carry_over(result, args.skip)
    print(f"\nwrote {write_result('survival', result)}")


#: the result's key of each ``--skip`` section
SECTION_KEYS = {"tables": "deepsurv", "recovery": "linear_recovery", "images": "images", "faces": "faces"}


def carry_over(result: dict[str, Any], skipped: list[str]) -> None:
    """A skipped section keeps its previous result (benchmarks/results/survival.json), marked with that
    run's date (``<key>_measured_utc``), so re-running one section does not erase the others."""
    from _common import RESULTS

    previous_file = RESULTS / "survival.json"
    if not skipped or not previous_file.is_file():
        return
    previous = json.loads(previous_file.read_text())
    for section in skipped:
        key = SECTION_KEYS[section]
        if key in previous:
            result[key] = previous[key]
            result[f"{key}_measured_utc"] = previous.get(f"{key}_measured_utc", previous.get("when_utc"))
            if key == "deepsurv" and "pass" in previous:
                result["pass"] = previous["pass"]


if __name__ == "__main__":
    main()
