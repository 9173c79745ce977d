"""Benchmark `survival_speed` (issue 20): DeepSurv-mode fit time against pycox, and against an earlier commit.

For each DeepSurv table and split seed (benchmarks/survival.py's test parts), ``--repeats`` rounds of:

- ``now``: this checkout's ``fahr finetune-survival experiment=bench_deepsurv_<name>`` (its plain
  full-batch loop);
- ``before``: the same command in the code of ``--baseline`` (default 5aaa22f, the last commit that
  trained tables under Lightning; ``git archive`` into a temporary folder, run with this venv);
- pycox ``CoxPH`` with benchmarks/survival.py's recipe (the tutorial's [32, 32] MLP, batch 256, early
  stopping), on the same training, validation and test rows;
- ``recipe``: this checkout's command trained with pycox's recipe instead of the shipped one
  (``survival.pycox_recipe_overrides``): the same work as pycox, so the trainer's own speed.

fahr runs in-process in a warm worker process per code version and round (the first fit of a process,
an untimed warm-up, pays the lazy imports); the order of the four rotates every round. One torch
thread for all. Two times per fit:

- ``fit``: the training itself, validations and early stopping included: fahr's ``train`` of
  fahr/pipeline/finetune_survival.py, pycox's ``model.fit``;
- ``all``: fahr: the command (config composition, reading and checking the CSVs, training, the test
  metrics, the export); pycox: its split, standardisation, fit and test prediction.

Per (table, seed) the median over rounds, then the mean over seeds. ``now`` and ``before`` must give
the same test C-index, validation C-index, kept step and step count on every fit (checked).
Writes benchmarks/results/survival_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import baseline_tree, print_table, write_result  # noqa: E402

BASELINE = "5aaa22f"
TABLES = ("metabric", "support", "gbsg", "whas")


def fahr_fits(jobs: list[dict[str, Any]], root: Path) -> list[dict[str, Any]]:
    """Run each job's ``fahr finetune-survival`` in this process (the ``fahr`` package on the path: this
    checkout's or the baseline's; :func:`survival.run_fahr_table`), each in a new folder under ``root``,
    after an untimed warm-up fit; test and validation C, kept and last step, the two times."""
    import torch

    torch.set_num_threads(1)
    from survival import _quiet, run_fahr_table

    _quiet()
    out = []
    for i, job in enumerate([{**jobs[0], "warmup": True}, *jobs]):
        fit = run_fahr_table(job["name"], job["train_csv"], job["test_csv"], job["seed"], root / str(i), quick=False,
                             extra=[*job.get("extra", []), *(["task.max_steps=20"] if job.get("warmup") else [])])
        if not job.get("warmup"):
            out.append({"name": job["name"], "seed": job["seed"], **{k: fit[k] for k in ("c_index", "val_c_index", "best_step", "steps", "fit_s")},
                        "all_s": fit["wall_s"]})
    return out


def run_fahr(tree: Path, jobs_file: Path, out: Path) -> list[dict[str, Any]]:
    """:func:`fahr_fits` in a subprocess with ``tree``'s ``fahr`` first on the path (runs under ``out``'s
    name without its suffix)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(jobs_file), str(out), str(out.with_suffix(""))]
    proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: the fits failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = json.loads(out.read_text())
    # the code that ran is the code asked for: only the plain loop exists in this checkout
    has_loop = (tree / "fahr" / "tasks" / "table_training.py").is_file()
    assert has_loop == (tree.resolve() == ROOT), f"{tree}: not the expected code"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--data", nargs="*", default=list(TABLES), choices=TABLES)
    parser.add_argument("--worker", nargs=3, metavar=("JOBS", "OUT", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        jobs_file, out, root = map(Path, args.worker)
        out.write_text(json.dumps(fahr_fits(json.loads(jobs_file.read_text()), root)))
        return

    import torch

    from survival import (SURVIVAL_DATA, _quiet, pycox_epoch_steps, pycox_recipe_overrides, run_pycox, split_table,
                          validation_part)

    if not SURVIVAL_DATA.is_dir():
        sys.exit(f"skipped: {SURVIVAL_DATA} is absent (see ../shared/data/README.md)")
    os.environ.setdefault("WANDB_MODE", "offline")
    torch.set_num_threads(1)
    _quiet()
    t_start = time.perf_counter()
    runs: dict[str, list[list[dict[str, Any]]]] = {"now": [], "before": [], "pycox": [], "recipe": []}
    with tempfile.TemporaryDirectory(prefix="fahr-bench-survival-speed-") as tmp_name:
        tmp = Path(tmp_name)
        trees = {"now": ROOT, "before": baseline_tree(args.baseline, tmp / "before")}
        jobs, recipe_jobs, frames, epoch_steps = [], [], {}, {}
        for name in args.data:
            for seed in range(args.seeds):
                train_csv, test_csv, train_df, test_df = split_table(name, seed, tmp / "csv")
                frames[name, seed] = (train_df, test_df)
                jobs.append({"name": name, "seed": seed, "train_csv": str(train_csv), "test_csv": str(test_csv)})
                n_train = int((~validation_part(train_df, seed)).sum())
                epoch_steps[name, seed] = pycox_epoch_steps(n_train)
                recipe_jobs.append({**jobs[-1], "extra": pycox_recipe_overrides(n_train)})
        jobs_file, recipe_jobs_file = tmp / "jobs.json", tmp / "recipe_jobs.json"
        jobs_file.write_text(json.dumps(jobs))
        recipe_jobs_file.write_text(json.dumps(recipe_jobs))
        order = ["now", "before", "pycox", "recipe"]
        for r in range(args.repeats):
            for who in order[r % 4:] + order[: r % 4]:
                t0 = time.perf_counter()
                if who == "pycox":
                    rows = [{"name": j["name"], "seed": j["seed"],
                             **run_pycox(*frames[j["name"], j["seed"]], j["seed"], tmp, quick=False)} for j in jobs]
                    for row in rows:
                        row["all_s"] = row.pop("wall_s")
                elif who == "recipe":
                    rows = run_fahr(ROOT, recipe_jobs_file, tmp / f"{who}_{r}.json")
                else:
                    rows = run_fahr(trees[who], jobs_file, tmp / f"{who}_{r}.json")
                runs[who].append(rows)
                print(f"  round {r + 1}/{args.repeats} {who}: {time.perf_counter() - t0:.0f} s", flush=True)

    def per_fit(who: str, key: str) -> dict[tuple[str, int], float]:
        """Median over rounds of each (table, seed)'s ``key``."""
        values: dict[tuple[str, int], list[float]] = {}
        for rows in runs[who]:
            for row in rows:
                values.setdefault((row["name"], row["seed"]), []).append(row[key])
        return {k: statistics.median(v) for k, v in values.items()}

    same = [a == b for rows_now, rows_before in zip(runs["now"], runs["before"]) for a, b in
            zip(({k: x[k] for k in ("name", "seed", "c_index", "val_c_index", "best_step", "steps")} for x in rows_now),
                ({k: x[k] for k in ("name", "seed", "c_index", "val_c_index", "best_step", "steps")} for x in rows_before))]
    times = {(who, key): per_fit(who, key) for who in runs for key in ("fit_s", "all_s")}
    summary, table = {}, []
    for name in args.data:
        mean = lambda who, key: statistics.fmean(v for (n, _), v in times[who, key].items() if n == name)  # noqa: E731
        s = {f"{who}_{key}": mean(who, key) for who in runs for key in ("fit_s", "all_s")}
        s["fit_ratio_now_over_pycox"] = s["now_fit_s"] / s["pycox_fit_s"]
        s["all_ratio_now_over_pycox"] = s["now_all_s"] / s["pycox_all_s"]
        s["fit_speedup_now_over_before"] = s["before_fit_s"] / s["now_fit_s"]
        s["fit_ratio_recipe_over_pycox"] = s["recipe_fit_s"] / s["pycox_fit_s"]
        # per epoch (the training rows once, one validation): early stopping ends the two after other epochs
        s["fit_ratio_recipe_over_pycox_per_epoch"] = statistics.fmean(
            (times["recipe", "fit_s"][k] / (per_fit("recipe", "steps")[k] / epoch_steps[k]))
            / (times["pycox", "fit_s"][k] / per_fit("pycox", "epochs")[k])
            for k in times["recipe", "fit_s"] if k[0] == name)
        test_c = {who: statistics.fmean(x["c_index"] for x in runs[who][0] if x["name"] == name) for who in runs}
        s["c_index_mean"], s["pycox_c_index_mean"], s["recipe_c_index_mean"] = test_c["now"], test_c["pycox"], test_c["recipe"]
        summary[name] = s
        table.append((name.upper(), f"{s['now_fit_s']:.2f}", f"{s['before_fit_s']:.2f}", f"{s['pycox_fit_s']:.2f}",
                      f"**{s['fit_ratio_now_over_pycox']:.1f}**", f"{s['fit_speedup_now_over_before']:.1f}x",
                      f"{s['recipe_fit_s']:.2f}", f"**{s['fit_ratio_recipe_over_pycox']:.2f}** "
                      f"({s['fit_ratio_recipe_over_pycox_per_epoch']:.2f})",
                      f"{s['now_all_s']:.2f} / {s['before_all_s']:.2f} / {s['pycox_all_s']:.2f}",
                      f"{s['c_index_mean']:.3f} / {s['recipe_c_index_mean']:.3f} / {s['pycox_c_index_mean']:.3f}"))
    print_table(f"DeepSurv mode, seconds per fit (one thread; mean over {args.seeds} split seeds of the median of "
                f"{args.repeats} rounds); now = before on {sum(same)} of {len(same)} fits (test C, val C, kept step, steps)",
                table, ("data", "fit now", "fit before", "fit pycox", "now / pycox (goal <= 1)", "now vs before",
                        "fit now, pycox's recipe", "that / pycox (per epoch)",
                        "all: now / before / pycox", "test C: now / pycox's recipe / pycox"))
    result = {"baseline": args.baseline, "repeats": args.repeats, "seeds": args.seeds, "summary": summary,
              "identical_fits": sum(same), "fits_compared": len(same), "runs": runs,
              "wall_s_total": time.perf_counter() - t_start}
    print(f"\nwrote {write_result('survival_speed', result)}")
    if not all(same):
        sys.exit("now and before differ on some fits (see the JSON's runs)")


if __name__ == "__main__":
    main()
