"""DeepSurv mode's plain training loop (fahr.tasks.table_training) against Lightning, its reference.

The loop replaced Lightning for table mode to make fits fast; it must train exactly as the Lightning
recipe it replaced did (SurvivalTask under a Trainer with a best-checkpoint saver, early stopping and
per-step reseeding), so published C-indices stay what they were."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch

TASK = {"ties": "efron", "base_lr": 0.03, "min_lr": 1e-4, "warmup_steps": 5, "weight_decay": 1e-3,
        "max_steps": 150, "val_every_n_steps": 10, "early_stopping_patience": 3, "freeze_backbone": False,
        "hflip": False, "augment": None}


def _rows(n: int, seed: int):
    from fahr.pipeline.finetune_survival import _TableRows

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    time = torch.distributions.Exponential(torch.exp(x[:, 0] - 0.5 * x[:, 1])).sample() * 100
    event = (torch.rand(n, generator=g) < 0.7).float()
    return _TableRows(x, time.round(), event)  # rounded: tied times (Efron) included


def _lightning_reference(model, task, train_rows, val_rows, seed, tmp_path, clip, batch_size=None):
    """The recipe as it ran under Lightning until the plain loop replaced it."""
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from fahr.job import StepSeeding
    from fahr.pipeline.finetune_survival import table_loader
    from fahr.tasks.optim import adamw_warmup_cosine
    from fahr.tasks.survival import SurvivalTask

    class Reference(SurvivalTask):
        def configure_optimizers(self):  # DeepSurv mode: base_lr is the peak LR itself
            return adamw_warmup_cosine([{"params": list(self.model.parameters()), "weight_decay": task["weight_decay"]}],
                                       task["base_lr"], task["warmup_steps"], task["max_steps"], task["min_lr"])

    best = ModelCheckpoint(dirpath=str(tmp_path), filename="best", monitor="val/loss", mode="min", save_top_k=1)
    batch_size = batch_size or len(train_rows)
    stops = [EarlyStopping(monitor="val/loss", mode="min", patience=task["early_stopping_patience"],
                           check_on_train_epoch_end=False)] if task["early_stopping_patience"] else []
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=task["max_steps"], logger=False,
                        callbacks=[best, *stops, StepSeeding(seed)],
                        check_val_every_n_epoch=task["val_every_n_steps"] // (len(train_rows) // batch_size),
                        val_check_interval=None, gradient_clip_val=clip, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(Reference(model, task, batch_size),
                train_dataloaders=table_loader(train_rows, batch_size, torch.Generator().manual_seed(seed)),
                val_dataloaders=table_loader(val_rows, len(val_rows)))
    state = torch.load(best.best_model_path, weights_only=True)
    return ({k[len("model."):]: v for k, v in state["state_dict"].items() if k.startswith("model.")},
            state["global_step"], trainer.global_step, float(best.best_model_score))


@pytest.mark.parametrize("clip", [None, 0.05], ids=["no-clip", "clip"])
def test_plain_loop_trains_exactly_as_the_lightning_recipe(tmp_path, clip):
    """Same kept weights (bit for bit), same kept step, same stopping step, same best loss."""
    from fahr.models.table_model import TableRiskModel
    from fahr.pipeline.finetune_survival import table_loader
    from fahr.tasks.table_training import fit_table

    seed = 7
    train_rows, val_rows = _rows(300, 0), _rows(80, 1)
    torch.manual_seed(seed)
    model = TableRiskModel(6, [32], 0.3)
    ref_state, ref_best, ref_steps, ref_loss = _lightning_reference(
        copy.deepcopy(model), TASK, train_rows, val_rows, seed, tmp_path, clip)
    fit = fit_table(model, TASK, table_loader(train_rows, len(train_rows), torch.Generator().manual_seed(seed)),
                    {"x": val_rows.x, "time": val_rows.time, "event": val_rows.event}, seed=seed,
                    gradient_clip_val=clip)
    assert ref_steps < TASK["max_steps"]  # early stopping took part
    assert (fit.steps, fit.best_step, fit.stopped_early) == (ref_steps, ref_best, True)
    assert fit.best_val_loss == ref_loss
    assert fit.best_state.keys() == ref_state.keys()
    for k, v in ref_state.items():
        assert torch.equal(fit.best_state[k], v), k


def test_minibatch_epochs_match_lightning_too(tmp_path):
    """Several batches per epoch (data.batch_size=64: 4 per epoch, 44 rows dropped): every epoch's row
    order is Lightning's."""
    from fahr.models.table_model import TableRiskModel
    from fahr.pipeline.finetune_survival import table_loader
    from fahr.tasks.table_training import fit_table

    task = {**TASK, "max_steps": 40, "val_every_n_steps": 20, "early_stopping_patience": 0}
    train_rows, val_rows = _rows(300, 2), _rows(80, 3)
    torch.manual_seed(0)
    model = TableRiskModel(6, [16], 0.2)
    ref_state, ref_best, ref_steps, _ = _lightning_reference(copy.deepcopy(model), task, train_rows, val_rows, 0,
                                                             tmp_path, None, batch_size=64)
    fit = fit_table(model, task, table_loader(train_rows, 64, torch.Generator().manual_seed(0)),
                    {"x": val_rows.x, "time": val_rows.time, "event": val_rows.event}, seed=0)
    assert (fit.steps, fit.best_step) == (ref_steps, ref_best)
    for k, v in ref_state.items():
        assert torch.equal(fit.best_state[k], v), k


def test_validates_after_the_last_step_and_stops_on_request():
    """max_steps not a multiple of val_every_n_steps: the last step is validated too. A stop request
    ends the fit before the next step and keeps nothing."""
    from fahr.models.table_model import TableRiskModel
    from fahr.pipeline.finetune_survival import table_loader
    from fahr.tasks.table_training import fit_table

    rows, val = _rows(100, 4), _rows(40, 5)
    val_rows = {"x": val.x, "time": val.time, "event": val.event}
    logged = []
    task = {**TASK, "max_steps": 25, "early_stopping_patience": 0}
    fit = fit_table(TableRiskModel(6, [8], 0.0), task, table_loader(rows, 100, torch.Generator().manual_seed(0)),
                    val_rows, seed=0, log=lambda m, step: logged.append((step, sorted(m))))
    assert [s for s, keys in logged if "val/loss" in keys] == [9, 19, 24]
    assert [s for s, keys in logged if "train/loss" in keys] == [9, 19, 24]
    assert fit.steps == 25 and not fit.stopped_early and fit.best_step in (10, 20, 25)

    polls = []
    stopped = fit_table(TableRiskModel(6, [8], 0.0), task, table_loader(rows, 100, torch.Generator().manual_seed(0)),
                        val_rows, seed=0, should_stop=lambda: polls.append(1) or len(polls) > 12)
    assert stopped.interrupted and stopped.best_state is None and stopped.steps == 12


def _rossi_csvs(tmp_path):
    from lifelines.datasets import load_rossi

    df = load_rossi().rename(columns={"week": "time", "arrest": "event"})
    df.iloc[:300].to_csv(tmp_path / "train.csv", index=False)
    df.iloc[300:].to_csv(tmp_path / "test.csv", index=False)


def test_a_stopped_table_fit_reruns_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """SIGUSR1/SIGTERM during a table fit: the command ends ``preempted`` with no training summary;
    the same command then fits from the start and gives the uninterrupted run's numbers."""
    from conftest import compose_config

    from fahr.pipeline.finetune_survival import finetune_survival
    from fahr.utils.preemption import PreemptionCheckpoint

    _rossi_csvs(tmp_path)

    def cfg(root):
        return compose_config("finetune_survival", [
            "data=table", f"data.train={tmp_path / 'train.csv'}", f"data.test={tmp_path / 'test.csv'}", "trainer=cpu",
            "task.max_steps=60", "task.val_every_n_steps=20", f"paths.root_dir={tmp_path / root}"])

    reference = finetune_survival(cfg("ref"))
    with monkeypatch.context() as m:
        m.setattr(PreemptionCheckpoint, "pending", property(lambda self: 1))
        first = finetune_survival(cfg("run"))
    assert first.preempted and not (first.run_dir / "train_done.json").exists()
    again = finetune_survival(cfg("run"))
    assert not again.preempted
    assert again.metrics["test_c_index"] == reference.metrics["test_c_index"]
    assert again.metrics["training"] == reference.metrics["training"]
    pd.testing.assert_frame_equal(pd.read_csv(again.run_dir / "predictions_test.csv"),
                                  pd.read_csv(reference.run_dir / "predictions_test.csv"))
    done = json.loads((again.run_dir / "train_done.json").read_text())
    kept = torch.load(again.run_dir / done["best"], weights_only=True)
    assert kept["global_step"] in (20, 40, 60) and np.isfinite(done["best_val_loss"])
