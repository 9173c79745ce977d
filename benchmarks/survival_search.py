"""Random hyperparameter search for the DeepSurv-mode head (the settings in conf/experiment/bench_deepsurv_*.yaml).

DeepSurv (Katzman et al. 2018) chose its hyperparameters by random search on validation data; this
does the same for our head, on the validation parts only (never the test parts):
- the splits are exactly those of benchmarks/survival.py: for split seed s, the copy-disjoint
  event-stratified 20% test part (seed 1000 + s) is set aside unseen, and the 20% validation part
  of the rest (seed s) scores each setting;
- each setting is a draw from SPACE (hidden layers, dropout, peak LR, steps, weight decay), trained
  on every split seed, and ranked by its mean validation Harrell C;
- each fit is the real command, ``fahr finetune-survival experiment=bench_deepsurv_<name>`` with the
  setting's overrides, in this process: the shipped trainer (:mod:`fahr.tasks.table_training`: full
  batch, AdamW, cosine to min_lr, per-step reseeding, the checkpoint with the lowest validation
  partial likelihood checked every 20 steps, early stopping 10 checks after it), so the search ranks
  exactly what `make bench-survival` then runs.
The test C of each setting is printed for the record only; it plays no part in the choice. Each
setting's ``wall_s`` is its commands' wall time summed over the split seeds (one torch thread), so
the ranking also shows what a faster recipe would cost in validation C.
Writes benchmarks/results/survival_search.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, print_table, write_result  # noqa: E402
from survival import PAPER_C, SURVIVAL_DATA, _quiet, run_fahr_table, split_table  # noqa: E402

SPACE: dict[str, list[Any]] = {
    "hidden": [[32], [64], [128], [256], [32, 32], [64, 64], [128, 128], [256, 256], [64, 64, 64]],
    "dropout": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
    "base_lr": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
    "max_steps": [100, 200, 400, 800],
    "weight_decay": [1e-4, 1e-3, 1e-2, 1e-1],
}


def setting_overrides(setting: dict[str, Any]) -> list[str]:
    """The ``fahr finetune-survival`` overrides of one setting (over the table's bench experiment)."""
    hidden = ",".join(str(h) for h in setting["hidden"])
    return [f"task.head.hidden=[{hidden}]", f"task.head.dropout={setting['dropout']}",
            f"task.base_lr={setting['base_lr']}", f"task.max_steps={setting['max_steps']}",
            f"task.weight_decay={setting['weight_decay']}"]


def search(name: str, n_settings: int, seeds: list[int], root: Path) -> dict[str, Any]:
    splits = [(seed, *split_table(name, seed, root / "splits")[:2]) for seed in seeds]
    rng = random.Random(0)  # the same draws for every data set
    settings = [{k: rng.choice(v) for k, v in SPACE.items()} for _ in range(n_settings)]
    rows = []
    for i, setting in enumerate(settings):
        t0 = time.perf_counter()
        fits = [run_fahr_table(name, train_csv, test_csv, seed, root / "runs" / f"{i}-{seed}", quick=False,
                               extra=setting_overrides(setting))
                for seed, train_csv, test_csv in splits]
        rows.append({"setting": setting, "val_c_mean": float(np.mean([f["val_c_index"] for f in fits])),
                     "test_c_mean": float(np.mean([f["c_index"] for f in fits])),
                     "steps_mean": float(np.mean([f["steps"] for f in fits])), "wall_s": time.perf_counter() - t0})
        print(f"  {name} {i + 1}/{n_settings}: val C {rows[-1]['val_c_mean']:.4f} (test {rows[-1]['test_c_mean']:.4f}) "
              f"{rows[-1]['wall_s']:.1f} s {setting}", flush=True)
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
    import torch

    torch.set_num_threads(1)
    _quiet()
    result: dict[str, Any] = {"space": SPACE, "settings": args.settings, "seeds": list(range(args.seeds)),
                              "selection": "highest mean validation Harrell C",
                              "trainer": "fahr finetune-survival experiment=bench_deepsurv_<name> (table_training)",
                              "data": {}}
    with tempfile.TemporaryDirectory(prefix="fahr-survival-search-") as tmp:
        for name in args.data:
            result["data"][name] = search(name, args.settings, list(range(args.seeds)), Path(tmp))
    previous = RESULTS / "survival_search.json"
    if previous.is_file():  # data sets searched in separate runs (e.g. in parallel) accumulate
        old = json.loads(previous.read_text())
        if all(old.get(k) == result[k] for k in ("space", "settings", "seeds", "trainer")):
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
