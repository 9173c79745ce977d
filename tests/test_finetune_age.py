"""FAHR-FaceAge: balancing, losses, metrics, the two-stage fine-tune from the real config, export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fahr.data.labelled import balancing_weights, effective_histogram
from fahr.losses.age import gaussian_label_distribution, l1_age_loss, label_distribution_loss
from fahr.metrics.age import age_metrics, apply_bias_correction, fit_bias_correction
from fahr.models import AgeHead, load_face_model

from conftest import write_described_index, compose_config


def test_balanced_sampler_gives_near_uniform_histogram_on_skewed_ages():
    rng = np.random.default_rng(0)
    # public-data shape: mostly 20-40 year olds, few elderly
    ages = np.concatenate([rng.uniform(20, 40, 8000), rng.uniform(40, 60, 1500), rng.uniform(60, 80, 400),
                           rng.uniform(80, 90, 100)])
    w = balancing_weights(ages, bin_width=10, max_weight=1000)
    hist = effective_histogram(ages, w, 10)
    assert len(hist) == 7
    assert max(hist.values()) - min(hist.values()) < 1e-9  # exactly uniform without a cap
    sampler = torch.utils.data.WeightedRandomSampler(torch.as_tensor(w), 20000, generator=torch.Generator().manual_seed(0))
    drawn = np.floor(ages[list(sampler)] / 10)
    shares = np.unique(drawn, return_counts=True)[1] / len(drawn)
    assert np.all(np.abs(shares - 1 / 7) < 0.015)


def test_balancing_cap_limits_repeats_of_rare_bins():
    ages = np.array([25.0] * 990 + [95.0] * 10)
    w = balancing_weights(ages, bin_width=10, max_weight=5)
    assert w[-1] / w[0] == pytest.approx(5.0)
    assert w.mean() == pytest.approx(1.0)
    assert np.allclose(balancing_weights(ages, 10, max_weight=1), 1.0)


def test_label_distribution_expectation_equals_true_age_for_one_hot():
    head = AgeHead(16, kind="distribution", min_age=0, max_age=100, bin_width=1)
    ages = torch.tensor([0.0, 37.0, 64.0, 100.0])
    q = gaussian_label_distribution(ages, head.centres, sigma=0)
    assert torch.equal(q.argmax(1), ages.long())
    assert torch.allclose(q @ head.centres, ages)
    logits = torch.log(q.clamp_min(1e-30))  # a head that puts all mass on the true bin
    loss = label_distribution_loss(logits, head.centres, ages, sigma=0)
    assert loss.item() == pytest.approx(0.0, abs=1e-4)


def test_label_distribution_loss_gradients_are_finite_and_gaussian_is_centred():
    centres = torch.arange(0, 101, dtype=torch.float32)
    q = gaussian_label_distribution(torch.tensor([42.3]), centres, sigma=2.0)
    assert (q @ centres).item() == pytest.approx(42.3, abs=1e-3)
    logits = (torch.randn(8, 101) * 30).requires_grad_()
    loss = label_distribution_loss(logits, centres, torch.rand(8) * 100, sigma=2.0,
                                   weight=torch.rand(8))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_l1_loss_weighted():
    pred, true = torch.tensor([10.0, 20.0]), torch.tensor([12.0, 30.0])
    assert l1_age_loss(pred, true).item() == 6.0
    assert l1_age_loss(pred, true, torch.tensor([1.0, 0.0])).item() == 2.0


def test_age_metrics_exact_values_and_bias_correction():
    true = np.array([20.0, 25.0, 40.0, 70.0])
    pred = np.array([22.0, 31.0, 40.0, 60.0])
    m = age_metrics(pred, true, {"sex": np.array([0, 1, 0, np.nan])})
    assert m["mae"] == pytest.approx(4.5)
    assert m["cs5"] == pytest.approx(0.5)
    assert m["mae/decade/20-29"] == pytest.approx(4.0)
    assert m["mean_error/decade/70-79"] == pytest.approx(-10.0)
    assert m["mae/sex/0"] == pytest.approx(1.0) and m["mae/sex/1"] == pytest.approx(6.0)
    assert (m["n/sex/0"], m["n/sex/1"], m["mean_error/sex/0"], m["mean_error/sex/1"]) == (2.0, 1.0, 1.0, 6.0)
    assert m["pearson_r"] == pytest.approx(np.corrcoef(pred, true)[0, 1], abs=1e-6)
    shrunk = 45 + 0.5 * (true - 45)  # regression to the mean, exactly linear
    c = fit_bias_correction(shrunk, true)
    assert c["slope"] == pytest.approx(0.5) and c["intercept"] == pytest.approx(22.5)
    assert np.allclose(apply_bias_correction(shrunk, c), true)
    with pytest.raises(ValueError, match="ill-posed"):
        fit_bias_correction(np.full(4, 45.0) + 1e-3 * true, true)


TINY = [
    "experiment=demo_faceage", "backbone=null", "model=vit_test", "data.generate.train=128",
    "data.generate.val=32", "data.generate.test=32", "data.batch_size=16", "data.num_workers=0",
    "task.stage1.max_steps=4", "task.stage2.max_steps=3", "task.stage1.val_every_n_steps=2",
    "task.stage2.val_every_n_steps=3", "trainer.enable_progress_bar=false",
]


def test_flip_average_is_mirror_invariant_in_eval_only_and_travels_in_the_card(tmp_path):
    from fahr.models.backbone import create_backbone
    from fahr.models.face_model import CARD_FILE, FaceModel, save_face_model

    torch.manual_seed(0)
    backbone = create_backbone(arch="vit_test", img_size=32, patch_size=8, global_pool="avg")
    model = FaceModel(backbone, {"age": AgeHead(backbone.num_features, kind="distribution")},
                      [0.5] * 3, [0.25] * 3, flip_average=True).eval()
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        averaged, of_mirror = model.features(x), model.features(x.flip(-1))
        model.flip_average = False
        plain, mirror = model.features(x), model.features(x.flip(-1))
        model.flip_average = True
        assert not torch.allclose(plain, mirror, atol=1e-4)  # the backbone alone is not mirror-invariant
        torch.testing.assert_close(averaged, (plain + mirror) / 2)
        torch.testing.assert_close(averaged, of_mirror)
        model.train()
        model.backbone.eval()  # no drop-path noise; the model-level train flag alone decides
        torch.testing.assert_close(model.features(x), plain)
    model.eval()
    save_face_model(tmp_path / "on", model, {"task": "faceage"})
    loaded, card = load_face_model(tmp_path / "on")
    assert card["flip_average"] is True and loaded.flip_average
    old = json.loads((tmp_path / "on" / CARD_FILE).read_text())
    del old["flip_average"]  # cards written before the option existed
    (tmp_path / "on" / CARD_FILE).write_text(json.dumps(old))
    assert load_face_model(tmp_path / "on")[0].flip_average is False


@pytest.mark.slow
def test_two_stages_from_the_real_config_stage2_starts_from_stage1(tmp_path):
    from fahr.pipeline.finetune_age import finetune_age

    # stage 2 at LR 0 leaves the weights as stage 2 found them: they must be stage 1's best
    cfg = compose_config("finetune_age", TINY + [f"paths.root_dir={tmp_path}", "task.stage2.base_lr=0.0",
                                                 "task.stage2.min_lr=0.0", "task.stage2.weight_decay=0.0"])
    result = finetune_age(cfg)
    run = result.run_dir
    s1 = torch.load(run / "stage1/checkpoints/best.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    exported = load_file(str(result.export_dir / "model.safetensors"))
    for key, value in exported.items():
        assert torch.equal(value, s1[f"model.{key}"]), key
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["stages"]["stage1"]["steps"] == 4 and metrics["stages"]["stage2"]["steps"] == 3
    assert metrics["test/n"] == 32 and 0 < metrics["test/mae"] < 100
    assert (run / "figures/faceage_scatter.png").stat().st_size > 1000
    balance = json.loads((run / "age_balance.json").read_text())
    assert abs(sum(balance["effective_histogram"].values()) - 1) < 1e-9
    model, card = load_face_model(result.export_dir)
    assert card["task"] == "faceage" and card["preprocessing"]["detect"] is False and card["preprocessing"]["crops"] == "external"
    size = card["preprocessing"]["image_size"]
    assert size == cfg.data.image_size == 64  # the demo fine-tunes at 64 px
    out = model(torch.zeros(2, 3, size, size, dtype=torch.uint8))
    assert out["age"].shape == (2,)
    assert card["flip_average"] is True and model.flip_average  # the default, carried to every consumer
    # rerunning the same command skips both finished stages and gives the same model
    again = finetune_age(cfg)
    assert again.metrics["test/mae"] == pytest.approx(metrics["test/mae"])


@pytest.mark.slow
def test_finetune_from_an_mae_export_and_with_loss_balancing(tmp_path):
    from fahr.models import create_backbone, save_backbone
    from fahr.models.weights import model_card
    from fahr.pipeline.finetune_age import finetune_age

    enc = create_backbone(arch="vit_test", img_size=112, patch_size=16)
    save_backbone(tmp_path / "mae", enc.state_dict(), model_card(enc, task="mae_pretrain",
                  normalization={"mean": [0.5] * 3, "std": [0.25] * 3}))
    cfg = compose_config("finetune_age", TINY + [f"paths.root_dir={tmp_path}", f"backbone={tmp_path / 'mae'}",
                                                 "task.balance.mode=loss", "task.loss=l1", "task.stage1.max_steps=0"])
    result = finetune_age(cfg)
    model, card = load_face_model(result.export_dir)
    assert card["init"]["backbone_task"] == "mae_pretrain"
    assert card["normalization"]["mean"] == [0.5] * 3
    assert card["heads"]["age"]["kind"] == "regression"
    assert result.metrics["stages"]["stage1"] == {"steps": 0, "skipped": "max_steps=0"}


def test_typo_in_finetune_override_fails_clearly():
    with pytest.raises(Exception, match="stage1x"):
        compose_config("finetune_age", ["task.stage1x.max_steps=3"])


@pytest.mark.slow
def test_demo_runs_all_five_steps_shrunk(tmp_path, capsys):
    """The demo's chain (pretrain -> FaceAge -> predict -> FaceSurvival -> evaluate -> report) on tiny budgets."""
    from fahr.config.evaluate_schema import register_evaluate_schema
    from fahr.pipeline.demo import demo

    register_evaluate_schema()
    cfg = compose_config("demo", [f"paths.root_dir={tmp_path}", "model=vit_test", "trainer.max_steps=3",
                                  "data.generate.num_samples=64", "data.generate.samples_per_shard=16",
                                  "data.batch_size=16", "data.num_workers=0", "data.shuffle_buffer=16",
                                  "trainer.enable_progress_bar=false"])
    summary = demo(cfg, faceage_overrides=TINY[2:],
                   survival_overrides=["data.generate.n_patients=240", "task.max_steps=3", "task.val_every_n_steps=3",
                                       "data.batch_size=16", "data.num_workers=0", "trainer.enable_progress_bar=false"],
                   evaluate_overrides=["min_events=3", "markers.faceage.standardize=true"])  # an untrained FaceAge barely varies
    assert summary["heldout"]["ok"] == summary["heldout"]["n"] == 48
    assert 0 <= summary["test_c_index"] <= 1
    report = summary["report"].read_text()
    assert "FAHR-FaceAge" in report and "FAHR-FaceSurvival" in report
    page = summary["html_report"].read_text()
    for section in ("Run demo_pretrain", "Run demo_faceage", "Run demo_facesurvival",
                    "demo_facesurvival: clinical statistics (report)"):
        assert f">{section}" in page, section
    assert "<th>time</th>" not in page and "evaluate_input.csv</td><td>a run&#x27;s per-row file" in page
    out = capsys.readouterr().out
    assert "fahr demo finished" in out and f"6 report       {summary['html_report']}" in out


def test_card_records_how_the_training_crops_were_made(tmp_path):
    """The card's preprocessing comes from the training shards' index.json: detection crops are
    fahr's (predict redoes them), a dataset's own crops are external, no index is unknown."""
    from fahr.pipeline.finetune_age import preprocessing_of
    from fahr.inference.predict import training_crops

    def index(folder: str, **options):
        align = {"image_size": 112, "margin": 0.2, "multi_face": "largest", "min_confidence": 0.9}
        return write_described_index(tmp_path / folder, "utkface", options={**options, "align": align})

    detected = preprocessing_of(f"{index('detected', skip_detection=False)}#train", 64)
    assert {k: detected[k] for k in ("crops", "detect", "image_size", "margin", "multi_face", "min_confidence")} == {
        "crops": "fahr", "detect": True, "image_size": 112, "margin": 0.2, "multi_face": "largest",
        "min_confidence": 0.9}
    assert training_crops({"preprocessing": detected}) == "fahr"
    own = preprocessing_of(str(index("own", skip_detection=True).parent), 64)
    assert own["crops"] == "external" and own["detect"] is False and "skip_detection" in own["source"]
    tars = preprocessing_of([str(tmp_path / "own" / "train-000000.tar"), str(tmp_path / "own" / "val-000000.tar")], 64)
    assert tars["crops"] == "external"  # the index beside the tar files says how they were made
    loose = preprocessing_of([str(tmp_path / "a" / "x.tar"), str(tmp_path / "b" / "y.tar")], 64)
    assert loose["crops"] == "unknown" and loose["image_size"] == 64
    assert preprocessing_of("pipe:cat x.tar", 64)["crops"] == "unknown"


def test_bias_correction_is_kept_only_where_it_lowers_the_held_out_error():
    from fahr.metrics.age import apply_bias_correction, decide_bias_correction

    rng = np.random.default_rng(0)
    true = rng.uniform(20, 60, 2000)
    # a model that compresses ages but ranks them well: the correction helps, held out as well
    squeezed = 0.5 * true + 20 + rng.normal(0, 1, true.size)
    correction, decision = decide_bias_correction(squeezed, true)
    assert decision["kept"] and correction == {"slope": decision["slope"], "intercept": decision["intercept"]}
    assert abs(correction["slope"] - 0.5) < 0.02 and decision["val_mae_corrected_heldout"] < 2.0 < decision["val_mae"]
    # a noisy model: dividing by the slope amplifies the noise more than it removes bias
    noisy = 0.7 * true + 10 + rng.normal(0, 8, true.size)
    correction, decision = decide_bias_correction(noisy, true)
    assert correction is None and not decision["kept"]
    assert decision["val_mae_corrected_heldout"] > decision["val_mae"]
    # too little to decide on: no correction, and the reason
    correction, decision = decide_bias_correction(true[:5], true[:5])
    assert correction is None and "fewer than 10" in decision["reason"]
    # never an age below 0
    assert apply_bias_correction(np.array([1.0, 30.0]), {"slope": 0.7, "intercept": 9.0}).tolist() == [
        0.0, pytest.approx(30.0)]


def test_an_index_with_bad_crop_options_is_refused_in_one_line(tmp_path):
    from fahr.boundary import InputError
    from fahr.pipeline.finetune_age import preprocessing_of

    write_described_index(tmp_path, "utkface", options={
        "skip_detection": False, "align": {"margin": "wide", "multi_face": "reject", "min_confidence": 0.9}})
    with pytest.raises(InputError, match=r"index\.json: options\.align\.margin must be a number in \[0, 2\]"):
        preprocessing_of(str(tmp_path / "index.json"), 64)
    write_described_index(tmp_path, "utkface", options={"align": "none"})
    assert preprocessing_of(str(tmp_path / "index.json"), 64)["crops"] == "external"


@pytest.mark.slow
def test_faceage_learns_age_from_synthetic_faces(tmp_path):
    """From scratch, a few hundred steps: the test MAE is clearly below that of always answering the
    training median (synthetic ages are uniform over 18-90 years, so the median alone errs ~18 years)."""
    import csv

    from fahr.data.shard_index import resolve_shard_spec
    from fahr.data.shard_reader import read_shard
    from fahr.pipeline.finetune_age import finetune_age

    cfg = compose_config("finetune_age", TINY + [
        f"paths.root_dir={tmp_path}", "data.generate.train=1024", "data.generate.val=64", "data.generate.test=256",
        "data.batch_size=32", "task.stage1.max_steps=20", "task.stage1.val_every_n_steps=20",
        "task.stage2.max_steps=300", "task.stage2.val_every_n_steps=300", "task.stage2.warmup_steps=20",
        "task.stage2.base_lr=4.0e-3", "task.stage2.layer_decay=1.0"])
    result = finetune_age(cfg)
    train_ages = [json.loads(bytes(s["json"]))["age"] for url in resolve_shard_spec(cfg.data.train)
                  for s in read_shard(url)]
    with open(result.run_dir / "predictions_test.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    truth = np.array([float(r["age"]) for r in rows])
    predicted = np.array([float(r["faceage"]) for r in rows])
    median_mae = float(np.abs(truth - np.median(train_ages)).mean())
    mae = float(np.abs(truth - predicted).mean())
    assert len(rows) == 256 and len(train_ages) == 1024 and median_mae > 15
    assert mae == pytest.approx(result.metrics["test/mae"], abs=1e-3)
    assert mae < 0.7 * median_mae, (mae, median_mae)
