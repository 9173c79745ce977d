"""FAHR-FaceSurvival: DeepSurv (table) mode against lifelines, bad tables, person-level evaluation."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import compose_config


def _rossi_csvs(tmp_path):
    from lifelines.datasets import load_rossi

    df = load_rossi().rename(columns={"week": "time", "arrest": "event"})
    test = df.sample(frac=0.3, random_state=0)
    train = df.drop(test.index)
    train.to_csv(tmp_path / "train.csv", index=False)
    test.to_csv(tmp_path / "test.csv", index=False)
    return train, test


def _table_cfg(tmp_path, *extra):
    return compose_config("finetune_survival", [
        "data=table", f"data.train={tmp_path / 'train.csv'}", f"data.test={tmp_path / 'test.csv'}",
        "trainer=cpu", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=50",
        f"paths.root_dir={tmp_path}", *extra])


@pytest.mark.slow
def test_linear_table_head_reproduces_lifelines_cox_c_index(tmp_path):
    """A linear head without regularisation, trained to convergence on the full batch, is the Cox
    model: its test C-index equals lifelines' CoxPHFitter fitted on the same training rows."""
    from lifelines import CoxPHFitter
    from lifelines.utils import concordance_index

    from fahr.pipeline.finetune_survival import finetune_survival

    train, test = _rossi_csvs(tmp_path)
    cfg = _table_cfg(tmp_path, "task.head.hidden=[]", "task.head.dropout=0.0", "task.weight_decay=0.0",
                     "task.max_steps=400", "task.base_lr=0.05", "task.min_lr=0.05", "task.val_every_n_steps=400",
                     "data.val_fraction=0.2")
    result = finetune_survival(cfg)
    m = json.loads((result.run_dir / "metrics.json").read_text())
    fit_rows = train.drop(train.index[_val_mask(train, cfg)])
    cph = CoxPHFitter().fit(fit_rows, duration_col="time", event_col="event")
    expected = concordance_index(test["time"], -cph.predict_partial_hazard(test), test["event"])
    assert m["test_c_index"] == pytest.approx(expected, abs=2e-3)
    preds = pd.read_csv(result.run_dir / "predictions_test.csv")
    assert len(preds) == len(test)
    assert m["test_c_index"] == pytest.approx(concordance_index(preds["time"], -preds["risk"], preds["event"]), abs=1e-9)
    card = json.loads((result.export_dir / "model_card.json").read_text())
    assert card["format"] == "fahr-table-model/1" and card["covariates"]["features"] == list(train.columns.drop(["time", "event"]))
    assert card["baseline_hazard"] is not None


def _val_mask(train, cfg):
    from fahr.pipeline.finetune_survival import copy_groups, holdout

    groups = copy_groups(train.drop(columns=["time", "event"]), train["time"].to_numpy(), train["event"].to_numpy())
    return np.flatnonzero(holdout(len(train), train["event"].to_numpy(), cfg.data.val_fraction, cfg.seed, groups))


def _row_holdout(n, event, fraction, seed):
    """The ungrouped split, written out: shuffle each event stratum, take the first round(f * n)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(n, dtype=bool)
    for value in (0, 1):
        idx = np.flatnonzero(event == value)
        rng.shuffle(idx)
        mask[idx[: int(round(fraction * len(idx)))]] = True
    return mask


@pytest.mark.parametrize("seed", range(5))
def test_holdout_with_distinct_rows_is_the_plain_stratified_split(seed):
    from fahr.pipeline.finetune_survival import holdout

    rng = np.random.default_rng(seed)
    n = int(rng.integers(10, 400))
    event = (rng.random(n) < 0.6).astype(float)
    expected = _row_holdout(n, event, 0.2, seed)
    assert (holdout(n, event, 0.2, seed) == expected).all()
    assert (holdout(n, event, 0.2, seed, groups=np.arange(n) * 7 + 3) == expected).all()


def test_holdout_keeps_copies_of_a_record_on_one_side():
    from fahr.pipeline.finetune_survival import holdout

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(300), rng.integers(1, 6, 300))  # 300 records, 1-5 copies each
    rng.shuffle(groups)
    event = (groups % 3 == 0).astype(float)  # copies share their outcome
    mask = holdout(len(groups), event, 0.2, seed=4, groups=groups)
    assert not set(groups[mask]) & set(groups[~mask])
    for value in (0, 1):  # still stratified: about 20% of each stratum, overshooting by less than one record
        stratum = event == value
        assert 0.2 * stratum.sum() - 0.5 <= mask[stratum].sum() < 0.2 * stratum.sum() + 5.5


def test_table_copies_are_counted_and_kept_together(tmp_path, caplog):
    """A resampled table (WHAS in DeepSurv's data is 1,310 rows of 640 records): copies are counted,
    the validation split never separates them, and test rows identical to training rows are reported."""
    from fahr.pipeline.finetune_survival import table_splits

    train, test = _rossi_csvs(tmp_path)
    # rossi has rows that coincide (binary covariates, weeks); a continuous column makes them distinct
    train = train.assign(z=np.random.default_rng(0).normal(size=len(train)))
    test = test.assign(z=np.random.default_rng(1).normal(size=len(test)))
    copies = train.sample(60, random_state=1)
    pd.concat([train, copies]).to_csv(tmp_path / "train.csv", index=False)
    pd.concat([test, train.iloc[:7]]).to_csv(tmp_path / "test.csv", index=False)
    with caplog.at_level("WARNING", logger="fahr.pipeline.finetune_survival"):
        splits, _, notes = table_splits(_table_cfg(tmp_path))
    assert notes["train_copies"] == 60 and notes["test_rows_copied_from_train"] == 7
    assert notes["val_rows_copied_from_train"] == 0
    assert len(splits["train"].time) + len(splits["val"].time) == len(train) + 60
    assert f"60 of {len(train) + 60} rows are exact copies" in caplog.text and "7 of 137 test rows" in caplog.text


@pytest.mark.parametrize("change, message", [
    (lambda df: df.assign(time=df["time"] * -1), "negative"),
    (lambda df: df.assign(event=2), r"\{0, ?1\}|0 or 1|outside"),
    (lambda df: df.assign(event=0), "censored|no event"),
    (lambda df: df.assign(time=np.nan), "NaN|finite"),
    (lambda df: df.drop(columns=["event"]), "missing column"),
    (lambda df: df.assign(fin="yes"), "non-numeric"),
])
def test_bad_tables_fail_clearly(tmp_path, change, message):
    from fahr.pipeline.finetune_survival import read_table

    _rossi_csvs(tmp_path)
    bad = change(pd.read_csv(tmp_path / "train.csv"))
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match=message):
        read_table(str(tmp_path / "bad.csv"), "time", "event")


def test_person_level_uses_earliest_photo_and_mean_risk():
    from fahr.pipeline.finetune_survival import Split, person_level

    s = Split(dataset=None, time=np.array([100.0, 400.0, 50.0]), event=np.array([1, 1, 0]), persons=["a", "a", "b"])
    t, e, r, p = person_level(s, np.array([1.0, 3.0, 0.5]), "mean")
    assert p == ["a", "b"] and list(t) == [400.0, 50.0] and list(r) == [2.0, 0.5]
    _, _, r_first, _ = person_level(s, np.array([1.0, 3.0, 0.5]), "first")
    assert list(r_first) == [3.0, 0.5]
    conflict = Split(dataset=None, time=np.array([1.0, 2.0]), event=np.array([1, 0]), persons=["a", "a"])
    with pytest.raises(ValueError, match="conflicting"):
        person_level(conflict, np.zeros(2), "mean")


def test_survival_typo_fails_clearly():
    with pytest.raises(Exception, match="max_step"):
        compose_config("finetune_survival", ["data=table", "data.train=x.csv", "task.max_step=3"])


def test_table_loader_gives_the_plain_loaders_batches():
    """One tensor index per batch instead of per-row fetch + collate: same rows, same order."""
    import torch
    from torch.utils.data import DataLoader

    from fahr.pipeline.finetune_survival import _TableRows, table_loader

    rows = _TableRows(torch.randn(53, 4), torch.rand(53) * 100, (torch.rand(53) < 0.5).float())
    plain = DataLoader(rows, batch_size=16, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(3))
    fast = table_loader(rows, 16, torch.Generator().manual_seed(3))
    for epoch in range(2):
        pairs = list(zip(plain, fast, strict=True))
        assert len(pairs) == 3
        for a, b in pairs:
            assert all(torch.equal(a[k], b[k]) for k in ("x", "time", "event"))
    ordered = list(table_loader(rows, 20))
    assert [len(b["time"]) for b in ordered] == [20, 20, 13] and torch.equal(torch.cat([b["x"] for b in ordered]), rows.x)


def test_early_stopping_ends_patience_validations_after_the_best(tmp_path):
    """An over-fitting head (wide, no regularisation, high LR): with patience 2 training ends exactly
    two validations after the lowest validation loss, keeps that checkpoint, and follows the same
    trajectory as the run without early stopping up to where it stopped."""
    from fahr.pipeline.finetune_survival import finetune_survival

    _rossi_csvs(tmp_path)
    common = ["task.head.hidden=[128]", "task.head.dropout=0.0", "task.weight_decay=0.0", "task.base_lr=0.03",
              "task.min_lr=0.03", "task.max_steps=300", "task.val_every_n_steps=10"]

    def val_losses(result):
        log = pd.read_csv(next(result.run_dir.rglob("metrics.csv")))
        return log.dropna(subset=["val/loss"]).set_index("step")["val/loss"]

    full = finetune_survival(_table_cfg(tmp_path, *common, "experiment_name=full"))
    early = finetune_survival(_table_cfg(tmp_path, *common, "experiment_name=early", "task.early_stopping_patience=2"))
    stopped = json.loads((early.run_dir / "metrics.json").read_text())["training"]
    assert not full.metrics["training"]["stopped_early"] and full.metrics["training"]["steps"] == 300
    assert stopped["stopped_early"] and stopped["steps"] < 300
    v_early, v_full = val_losses(early), val_losses(full)
    best_step = int(v_early.idxmin())
    assert stopped["steps"] == best_step + 1 + 2 * 10  # logged steps count from 0
    assert stopped["best_val_loss"] == pytest.approx(v_early.min(), rel=1e-6)
    np.testing.assert_allclose(v_early.to_numpy(), v_full.loc[v_early.index].to_numpy(), rtol=1e-6)


def test_negative_patience_fails_clearly(tmp_path):
    from fahr.pipeline.finetune_survival import finetune_survival

    _rossi_csvs(tmp_path)
    with pytest.raises(ValueError, match="early_stopping_patience must be at least 0, got -1"):
        finetune_survival(_table_cfg(tmp_path, "task.early_stopping_patience=-1"))


@pytest.mark.slow
def test_table_model_export_reloads_and_reproduces_the_runs_test_predictions(tmp_path):
    """The one loader (fahr.models.load_export) rebuilds a fahr-table-model/1 export; scoring the raw
    test rows with the card's scaler gives the run's own predictions_test.csv."""
    from fahr.models import TableRiskModel, load_export, table_log_hazard
    from fahr.pipeline.finetune_survival import finetune_survival

    _, test = _rossi_csvs(tmp_path)
    result = finetune_survival(_table_cfg(tmp_path, "task.max_steps=20", "task.val_every_n_steps=10"))
    model, card = load_export(result.export_dir)
    assert isinstance(model, TableRiskModel) and not model.training
    risk = table_log_hazard(model, card, test[card["covariates"]["features"]].to_numpy())
    expected = pd.read_csv(result.run_dir / "predictions_test.csv")["risk"].to_numpy()
    np.testing.assert_allclose(risk, expected, atol=1e-6)  # the CSV holds 6 decimals


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(num_features=True), "num_features must be an integer"),
    (lambda c: c["covariates"].update(features=c["covariates"]["features"][:-1]), "covariates.features must be a list of 3"),
    (lambda c: c["covariates"].update(std=[1.0, 0.0, 2.0]), "covariates.std must be positive"),
    (lambda c: c["covariates"].update(mean=[1.0, "x", 2.0]), "covariates.mean must be a list of 3 finite numbers"),
    (lambda c: c["heads"]["risk"].update(num_covariates=2), "heads.risk.num_covariates must be 0"),
    (lambda c: c["heads"]["risk"].update(hidden=[10**9]), "heads.risk.hidden must be"),
    (lambda c: c.update(heads={"age": {}}), "heads must be an object with one head, risk"),
])
def test_tampered_table_model_card_is_one_line_naming_the_key(tmp_path, edit, message):
    import torch

    from fahr.boundary import InputError
    from fahr.models import TableRiskModel, load_export, save_table_model, table_log_hazard

    model = TableRiskModel(3, [4], 0.0)
    scaler = {"features": ["a", "b", "c"], "mean": [0.0, 1.0, 2.0], "std": [1.0, 2.0, 4.0]}
    save_table_model(tmp_path, model, {"covariates": scaler})
    loaded, card = load_export(tmp_path)
    x = np.array([[1.0, 3.0, 6.0]])
    with torch.no_grad():
        direct = model.eval()(torch.tensor([[1.0, 1.0, 1.0]]))["risk"].double().numpy()
    np.testing.assert_allclose(table_log_hazard(loaded, card, x), direct, rtol=0, atol=1e-7)
    with pytest.raises(InputError, match="rows of 3 features"):
        table_log_hazard(loaded, card, np.ones((1, 2)))
    with pytest.raises(InputError, match="feature row 1: missing"):
        table_log_hazard(loaded, card, np.array([[1.0, 2.0, 3.0], [1.0, np.nan, 3.0]]))
    card = json.loads((tmp_path / "model_card.json").read_text())
    edit(card)
    (tmp_path / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(InputError, match=message) as err:
        load_export(tmp_path)
    assert "\n" not in str(err.value)


def test_face_and_backbone_loaders_refuse_a_table_model_naming_what_it_is(tmp_path):
    from fahr.boundary import InputError
    from fahr.models import TableRiskModel, load_backbone, load_face_model, save_table_model

    save_table_model(tmp_path, TableRiskModel(2, [], 0.0), {"covariates": {"features": ["a", "b"], "mean": [0, 0], "std": [1, 1]}})
    with pytest.raises(InputError, match="feature table .* not photos"):
        load_face_model(tmp_path)
    with pytest.raises(InputError, match="no image backbone"):
        load_backbone(tmp_path)
