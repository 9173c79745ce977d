"""Random hyperparameter search for the DeepSurv-mode head (the settings in conf/experiment/bench_deepsurv_*.yaml).

DeepSurv (Katzman et al. 2018) chose its hyperparameters by random search on validation data; this
does the same for our head, on the validation parts only (never the test parts):
- the splits are exactly those of benchmarks/survival.py: for split seed s, the copy-disjoint
  event-stratified 20% test part (seed 1000 + s) is set aside unseen, and the 20% validation part
  of the rest (seed s) scores each setting;
- each setting is a draw from SPACE (hidden layers, dropout, peak LR, steps, weight decay), trained
  on every split seed, and ranked by its mean validation Harrell C;
- training is the table trainer's recipe in a plain loop (full batch, AdamW, cosine to min_lr, the
  checkpoint with the lowest validation partial likelihood, checked every 20 steps), because the
  Lightning run costs ~10 s of overhead per fit and a search is hundreds of fits. The chosen
  setting is then re-run through the real pipeline by `make bench-survival`.
The test C of each setting is printed for the record only; it plays no part in the choice.
Writes benchmarks/results/survival_search.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, print_table, write_result  # noqa: E402
from survival import PAPER_C, SURVIVAL_DATA, VAL_FRACTION, groups_of, split_table  # noqa: E402

SPACE: dict[str, list[Any]] = {
    "hidden": [[32], [64], [128], [256], [32, 32], [64, 64], [128, 128], [256, 256], [64, 64, 64]],
    "dropout": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
    "base_lr": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
    "max_steps": [100, 200, 400, 800],
    "weight_decay": [1e-4, 1e-3, 1e-2, 1e-1],
}
VAL_EVERY = 20
MIN_LR = 1e-6  # conf: task.min_lr


def tensors(df: pd.DataFrame, feats: list[str], mean: np.ndarray, std: np.ndarray) -> tuple[torch.Tensor, ...]:
    x = torch.tensor((df[feats].to_numpy(np.float64) - mean) / std, dtype=torch.float32)
    return x, torch.tensor(df["time"].to_numpy(), dtype=torch.float32), torch.tensor(df["event"].to_numpy(), dtype=torch.float32)


def fit(setting: dict[str, Any], train: tuple[torch.Tensor, ...], val: tuple[torch.Tensor, ...], seed: int) -> torch.nn.Module:
    """One head, trained as the table trainer trains it; returns the lowest-validation-loss weights."""
    from fahr.losses.cox import cox_ph_loss
    from fahr.models.heads import RiskHead
    from fahr.tasks.schedules import warmup_cosine

    torch.manual_seed(seed)
    model = RiskHead(train[0].shape[1], 0, setting["hidden"], setting["dropout"])
    lr, steps = setting["base_lr"], setting["max_steps"]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=setting["weight_decay"])
    best_loss, best_state = math.inf, None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, lr, 0, steps, min_lr=min(MIN_LR, lr))
        model.train()
        loss = cox_ph_loss(model(train[0])["risk"], train[1], train[2])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % VAL_EVERY == 0 or step + 1 == steps:
            model.eval()
            with torch.no_grad():
                val_loss = cox_ph_loss(model(val[0])["risk"].double(), val[1].double(), val[2].double()).item()
            if val_loss < best_loss:
                best_loss, best_state = val_loss, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model.eval()


def search(name: str, n_settings: int, seeds: list[int], root: Path) -> dict[str, Any]:
    from fahr.metrics.survival import harrell_c
    from fahr.pipeline.finetune_survival import holdout

    folds = []
    for seed in seeds:
        _, _, train_df, test_df = split_table(name, seed, root)
        val = holdout(len(train_df), train_df["event"].to_numpy(), VAL_FRACTION, seed, groups_of(train_df))
        feats = [c for c in train_df.columns if c not in ("time", "event")]
        fit_df, val_df = train_df[~val], train_df[val]
        mean = fit_df[feats].mean().to_numpy(np.float64)
        std = fit_df[feats].std(ddof=0).replace(0, 1.0).to_numpy(np.float64)
        folds.append((seed, *(tensors(d, feats, mean, std) for d in (fit_df, val_df, test_df))))
    rng = random.Random(0)  # the same draws for every data set
    settings = [{k: rng.choice(v) for k, v in SPACE.items()} for _ in range(n_settings)]
    rows = []
    for i, setting in enumerate(settings):
        t0 = time.perf_counter()
        val_c, test_c = [], []
        for seed, tr, va, te in folds:
            model = fit(setting, tr, va, seed)
            with torch.no_grad():
                val_c.append(harrell_c(va[1].numpy(), va[2].numpy(), model(va[0])["risk"].numpy()))
                test_c.append(harrell_c(te[1].numpy(), te[2].numpy(), model(te[0])["risk"].numpy()))
        rows.append({"setting": setting, "val_c_mean": float(np.mean(val_c)), "test_c_mean": float(np.mean(test_c)),
                     "wall_s": time.perf_counter() - t0})
        print(f"  {name} {i + 1}/{n_settings}: val C {rows[-1]['val_c_mean']:.4f} (test {rows[-1]['test_c_mean']:.4f}) "
              f"{setting}", flush=True)
    rows.sort(key=lambda r: -r["val_c_mean"])
    return {"paper_c_index": PAPER_C[name], "chosen": rows[0]["setting"], "ranked": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="*", default=list(PAPER_C), choices=list(PAPER_C))
    parser.add_argument("--settings", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=5, help="split seeds (as benchmarks/survival.py)")
    args = parser.parse_args()
    if not SURVIVAL_DATA.is_dir():
        sys.exit(f"skipped: {SURVIVAL_DATA} is absent (see ../shared/data/README.md)")
    torch.set_num_threads(1)
    result: dict[str, Any] = {"space": SPACE, "settings": args.settings, "seeds": list(range(args.seeds)),
                              "selection": "highest mean validation Harrell C", "data": {}}
    with tempfile.TemporaryDirectory(prefix="fahr-survival-search-") as tmp:
        for name in args.data:
            result["data"][name] = search(name, args.settings, list(range(args.seeds)), Path(tmp))
    previous = RESULTS / "survival_search.json"
    if previous.is_file():  # data sets searched in separate runs (e.g. in parallel) accumulate
        old = json.loads(previous.read_text())
        if all(old.get(k) == result[k] for k in ("space", "settings", "seeds")):
            result["data"] = {**old["data"], **result["data"]}
    rows = []
    for name, r in sorted(result["data"].items()):
        top = r["ranked"][0]
        s = top["setting"]
        rows.append((name.upper(), str(s["hidden"]), f"{s['dropout']:g}", f"{s['base_lr']:g}", str(s["max_steps"]),
                     f"{s['weight_decay']:g}", f"{top['val_c_mean']:.4f}", f"{top['test_c_mean']:.4f}", f"{r['paper_c_index']:.3f}"))
    print_table(f"Chosen by mean validation C ({args.settings} random settings x {args.seeds} split seeds)", rows,
                ("data", "hidden", "dropout", "LR", "steps", "weight decay", "val C", "test C (not used)", "paper"))
    print(f"\nwrote {write_result('survival_search', result)}")


if __name__ == "__main__":
    main()
