"""MAE pretraining end to end on synthetic shards: the real config, shrunk to seconds."""

from __future__ import annotations

import csv
import json
import math
import time

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from conftest import compose_config
from fahr.pipeline.export import export
from fahr.pipeline.pretrain import pretrain
from fahr.utils.run import run_dir_for


def _losses(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return [float(r["train/loss_step"]) for r in csv.DictReader(f) if r.get("train/loss_step")]


def test_fast_dev_run_from_real_config(tiny_overrides):
    cfg = compose_config("pretrain", tiny_overrides + ["trainer.fast_dev_run=2"])
    result = pretrain(cfg)
    assert result.global_step == 2
    assert (result.run_dir / "config.yaml").is_file()
    prov = json.loads((result.run_dir / "provenance.json").read_text())
    assert prov["packages"]["torch"] and "sha" in prov["git"]


def test_run_directory_layout(tiny_cfg):
    result = pretrain(tiny_cfg)
    d = result.run_dir
    assert d.parent.name == "default" and d.name.startswith("default-")
    for name in ["config.yaml", "provenance.json", "run.json", "metrics.csv", "metrics.json", "checkpoints/last.ckpt"]:
        assert (d / name).is_file(), name
    metrics = json.loads((d / "metrics.json").read_text())
    assert metrics["global_step"] == 4 and "train/loss_step" in metrics
    assert not list(d.rglob("*.tmp")), "no temporary files left behind"
    # the same command again: nothing left to train, nothing lost
    before = (d / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    again = pretrain(tiny_cfg)
    assert again.global_step == 4 and again.metrics["train/loss_step"] == metrics["train/loss_step"]
    assert (d / "checkpoints" / "last.ckpt").stat().st_mtime_ns == before
    # hparams and the LR rule are logged
    hparams = (d / "hparams.yaml").read_text()
    assert "lr/peak" in hparams and "batch/effective: 16" in hparams


@pytest.mark.slow
def test_mae_loss_really_decreases(tiny_overrides):
    cfg = compose_config("pretrain", tiny_overrides + [
        "trainer.max_steps=60", "task.base_lr=2e-2", "task.warmup_steps=5", "callbacks.checkpoint.every_n_train_steps=100"])
    result = pretrain(cfg)
    losses = _losses(result.run_dir)
    assert len(losses) == 60
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, f"MAE loss did not drop enough: {first:.3f} -> {last:.3f}"


class _CrashAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


class _FirstStep(L.Callback):
    def __init__(self) -> None:
        self.first = None
        self.exp_avg = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first is None:
            self.first = trainer.global_step
            state = trainer.optimizers[0].state
            self.exp_avg = {id(p): s["exp_avg"].clone() for p, s in state.items()}


def test_resume_continues_global_step_and_optimizer(tiny_overrides):
    cfg = compose_config("pretrain", tiny_overrides + ["trainer.max_steps=6"])
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain(cfg, extra_callbacks=[_CrashAt(5)])
    saved = torch.load(run_dir_for(cfg) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 4  # checkpoints every 2 steps; crashed before step 5
    probe = _FirstStep()
    result = pretrain(cfg, extra_callbacks=[probe])  # the same command again: same run directory
    assert result.resumed_from is not None and result.resumed_from.name == "last.ckpt"
    assert probe.first == 4
    assert result.global_step == 6
    # AdamW moments restored from the checkpoint, not re-initialised
    saved_avgs = [s["exp_avg"] for s in saved["optimizer_states"][0]["state"].values()]
    assert len(probe.exp_avg) == len(saved_avgs) > 0
    assert all(torch.equal(a, b) for a, b in zip(probe.exp_avg.values(), saved_avgs))
    # one metrics.csv across both attempts, appended
    steps = [int(r["step"]) for r in csv.DictReader(open(result.run_dir / "metrics.csv")) if r.get("train/loss_step")]
    assert steps[0] == 0 and steps[-1] == 5
    # the W&B id lives in run.json and in every checkpoint, unchanged across the resume
    run = json.loads((result.run_dir / "run.json").read_text())
    final = torch.load(result.run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["fahr_run"]["wandb_id"] == saved["fahr_run"]["wandb_id"] == run["wandb_id"]


def test_export_roundtrip_and_resize(tiny_cfg):
    from fahr.models import load_backbone, read_card
    from safetensors.torch import load_file

    result = pretrain(tiny_cfg)
    out = export(tiny_cfg)
    assert out == result.run_dir / "export"
    card = read_card(out)
    assert card["arch"] == "vit_test" and card["img_size"] == 112 and card["patch_size"] == 16
    assert card["global_step"] == 4 and card["training_data"]["synthetic"] is True
    assert card["normalization"]["mean"] == [0.485, 0.456, 0.406]
    # the exported file is plain tensors (safetensors), no pickle
    assert (out / "model.safetensors").read_bytes()[:8] != b"\x80\x02\x8a\x0a"
    ckpt = torch.load(result.run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    trained = {k[len("model.encoder."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.encoder.")}
    model, _ = load_backbone(out)
    loaded = model.state_dict()
    assert trained.keys() == loaded.keys()
    assert all(torch.equal(trained[k], loaded[k]) for k in trained)
    # another image size: position embeddings resampled, everything else identical
    big, _ = load_backbone(out, img_size=160)
    assert big.pos_embed.shape == (1, 1 + 10 * 10, 64)
    assert torch.equal(big.pos_embed[:, :1], loaded["pos_embed"][:, :1])
    assert torch.equal(big.blocks[0].attn.qkv.weight, loaded["blocks.0.attn.qkv.weight"])
    assert big(torch.randn(1, 3, 160, 160)).shape == (1, 64)
    assert set(load_file(str(out / "model.safetensors"))) == set(trained)


def test_export_best_checkpoint(tiny_overrides):
    cfg = compose_config("pretrain", tiny_overrides + ["trainer.max_steps=40", "callbacks.checkpoint.every_n_train_steps=16"])
    pretrain(cfg)
    with open_dict(cfg):
        cfg.export.checkpoint = "best"
    from fahr.models import read_card

    assert read_card(export(cfg))["checkpoint"].startswith("step")


def test_wandb_offline_writes_files_and_reuses_id(tiny_overrides, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_config("pretrain", tiny_overrides + ["logger=wandb", "trainer.max_steps=2"])
    r1 = pretrain(cfg)
    wandb_id = json.loads((r1.run_dir / "run.json").read_text())["wandb_id"]
    runs = list((r1.run_dir / "wandb").glob(f"offline-run-*-{wandb_id}"))
    assert runs and list(runs[0].glob("*.wandb")), "offline W&B run files written"
    cfg2 = compose_config("pretrain", tiny_overrides + ["logger=wandb", "trainer.max_steps=2"])
    with open_dict(cfg2):
        cfg2.trainer.max_steps = 4
        cfg2.run_id = r1.run_dir.name  # continue the same run for more steps
    time.sleep(1.1)  # W&B names session folders by the second
    r2 = pretrain(cfg2)
    assert r2.resumed_from is not None and r2.global_step == 4
    assert len(list((r1.run_dir / "wandb").glob(f"offline-run-*-{wandb_id}"))) == 2  # same id, second session


def test_tensorboard_logger(tiny_overrides):
    pytest.importorskip("tensorboard")
    result = pretrain(compose_config("pretrain", tiny_overrides + ["logger=tensorboard", "trainer.max_steps=2"]))
    assert list((result.run_dir / "tensorboard").rglob("events.out.tfevents.*"))


def test_reconstructions_saved_for_synthetic_never_for_clinical(tiny_overrides):
    r = pretrain(compose_config("pretrain", tiny_overrides + ["task.log_images_every_n_steps=2"]))
    pngs = sorted((r.run_dir / "figures").glob("reconstructions_step*.png"))
    assert [p.name for p in pngs] == ["reconstructions_step0000000.png", "reconstructions_step0000002.png"]
    from PIL import Image

    img = Image.open(pngs[0])
    assert img.size == (8 * 112, 3 * 112) and not img.info.get("exif")
    clinical = pretrain(compose_config("pretrain", tiny_overrides + ["task.log_images_every_n_steps=2", "data.clinical=true"]))
    assert not (clinical.run_dir / "figures").exists() or not list((clinical.run_dir / "figures").iterdir())


class _FirstKeys(L.Callback):
    def __init__(self) -> None:
        self.keys = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.keys is None:
            self.keys = list(batch["__key__"])


def test_resume_in_a_later_epoch_streams_that_epochs_order(tiny_overrides):
    """With real workers, the first batch after resuming at batch 2 of epoch 1 is batch 2 of epoch 1's
    order (the epoch is continued, not restarted)."""
    from fahr.data.shard_reader import ShardStream, make_loader
    from fahr.data.shard_index import resolve_shard_spec

    overrides = tiny_overrides + ["trainer.max_steps=20", "data.num_workers=2", "callbacks.checkpoint.every_n_train_steps=18"]
    cfg = compose_config("pretrain", overrides)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain(cfg, extra_callbacks=[_CrashAt(19)])  # 16 steps per epoch: the crash is in epoch 1
    probe = _FirstKeys()
    result = pretrain(cfg, extra_callbacks=[probe])
    assert result.resumed_from is not None and result.global_step == 20
    shards = resolve_shard_spec(f"{cfg.data.generate.out_dir}/index.json")
    stream = ShardStream(shards, samples_per_epoch=256, batch_size=16, seed=0, shuffle_buffer=64,
                         world_size=1, rank=0, num_workers=2, interleave=cfg.data.interleave)
    expected = {}
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        expected[epoch] = [list(b["__key__"]) for b in make_loader(stream, num_workers=2)]
    assert expected[0][2] != expected[1][2]
    assert probe.keys == expected[1][2]


def test_bf16_mixed_precision_runs(tiny_overrides):
    """The GPU recipe's precision setting, exercised on the CPU (autocast to bfloat16)."""
    result = pretrain(compose_config("pretrain", tiny_overrides + ["trainer.precision=bf16-mixed", "trainer.max_steps=2"]))
    assert result.global_step == 2 and math.isfinite(result.metrics["train/loss_step"])


def test_corrupt_sample_in_a_real_run_is_skipped_and_reported(tiny_overrides, tmp_path):
    """One undecodable JPEG among 64 samples: training goes on and metrics report exactly one skip."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    shards = []
    for s in range(4):
        path = tmp_path / f"bad-{s:06d}.tar"
        with wds.TarWriter(str(path)) as w:
            for i in range(s * 16, (s + 1) * 16):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(buf, format="JPEG")
                jpg = buf.getvalue() if i != 21 else b"\xff\xd8 this is not a jpeg"
                w.write({"__key__": f"{i:09d}", "jpg": jpg, "json": b"{}"})
        shards.append(str(path))
    cfg = compose_config("pretrain", tiny_overrides + [
        "data.generate=null", f"data.train_shards='{tmp_path}/bad-{{000000..000003}}.tar'", "data.samples_per_epoch=64",
        "trainer.max_steps=4", "data.shuffle_buffer=0"])
    result = pretrain(cfg)
    assert result.global_step == 4  # 63 good samples, batch 16: the epoch still has its 4 batches
    assert result.metrics["data/skipped"] == 1.0
    with pytest.raises(Exception, match="000000021"):
        pretrain(compose_config("pretrain", tiny_overrides + [
            "data.generate=null", f"data.train_shards='{tmp_path}/bad-{{000000..000003}}.tar'", "data.samples_per_epoch=64",
            "trainer.max_steps=4", "data.on_error=raise", "run_id=raises"]))
