"""data.decode=device: the shard loader's workers leave JPEGs encoded, the training process decodes a
batch at once onto the device (fahr.data.device_decode). On a CPU it must equal worker decoding bit
for bit, except that an image which fails to decode is dropped from its batch instead of replaced."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_config
from fahr.boundary import InputError
from fahr.data.datamodule import ShardDataModule
from fahr.data.device_decode import DeviceDecoder
from fahr.data.shard_reader import ShardStream, make_loader
from test_shards import _jpeg, write_shards

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


def _epoch(stream: ShardStream, decoder: DeviceDecoder | None = None, start: int = 0) -> list[dict]:
    stream.set_epoch(0, start_batch=start)
    batches = list(make_loader(stream, stream.num_workers))
    return [decoder(b, "cpu") for b in batches] if decoder is not None else batches


def _pair(shards, **kw) -> tuple[ShardStream, ShardStream]:
    args = dict(samples_per_epoch=40, batch_size=8, seed=5, world_size=1, rank=0, label_keys=("age", "sex"))
    args.update(kw)
    return ShardStream(shards, **args), ShardStream(shards, decode="device", **args)


def _by_key(batches: list[dict]) -> dict[str, tuple[torch.Tensor, float]]:
    return {k: (b["image"][i], float(b["age"][i])) for b in batches for i, k in enumerate(b["__key__"])}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_device_decoding_on_the_cpu_equals_worker_decoding_bit_for_bit(tmp_path, num_workers):
    shards, _ = write_shards(tmp_path, 4, 12)
    workers, device = _pair(shards, num_workers=num_workers, shuffle_buffer=6, interleave=2)
    encoded = _epoch(device)
    assert set(encoded[0]) == {"encoded", "encoded_length", "encoded_member", "encoded_shard", "age", "sex",
                               "__key__", "n_skipped"}
    assert encoded[0]["encoded"].dtype == torch.uint8 and encoded[0]["encoded_length"].shape == (8,)
    assert encoded[0]["encoded_member"] == ["jpg"] * 8
    expected, got = _epoch(workers), [DeviceDecoder(112)(b, "cpu") for b in encoded]
    assert len(expected) == len(got) == {0: 5, 2: 6}[num_workers]  # 40 / 8, rounded up to the workers
    for a, b in zip(expected, got):
        assert set(a) == set(b)
        assert a["__key__"] == b["__key__"]
        assert torch.equal(a["image"], b["image"]) and a["image"].dtype == b["image"].dtype == torch.uint8
        assert a["image"].shape == b["image"].shape == (8, 3, 112, 112)
        assert a["image"].stride() == b["image"].stride()  # the same channels_last view
        assert torch.equal(a["age"], b["age"]) and torch.equal(a["sex"], b["sex"])
        assert int(a["n_skipped"]) == int(b["n_skipped"]) == 0


def test_device_decoding_resumes_mid_epoch_at_the_same_batches(tmp_path):
    shards, _ = write_shards(tmp_path, 4, 12)
    _, device = _pair(shards, num_workers=2, shuffle_buffer=6)
    full = _epoch(device, DeviceDecoder(112))
    resumed = _epoch(device, DeviceDecoder(112), start=3)
    assert [b["__key__"] for b in resumed] == [b["__key__"] for b in full[3:]]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(resumed, full[3:]))


def _corrupt(jpg: bytes) -> bytes:
    """The JPEG's headers up to the scan, then garbage: the header parses, the entropy data does not."""
    sos = jpg.index(b"\xff\xda")
    return jpg[: sos + 14] + bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8)) + b"\xff\xd9"


BAD_DECODE = {"000000002": "corrupt", "000000015": "truncated"}  # shard 0 sample 2, shard 1 sample 3
BAD_LABEL = "000000025"  # shard 2 sample 1: found by the workers in both modes


def _with_bad_samples(i: int, sample: dict) -> dict:
    key = sample["__key__"]
    if BAD_DECODE.get(key) == "corrupt":
        sample["jpg"] = _corrupt(sample["jpg"])
    elif BAD_DECODE.get(key) == "truncated":
        sample["jpg"] = sample["jpg"][: len(sample["jpg"]) // 2]
    elif key == BAD_LABEL:
        sample["json"] = json.dumps({"sex": 1}).encode()
    return sample


def test_undecodable_samples_are_dropped_from_their_batch_and_counted(tmp_path, caplog):
    # 4 shards x 12 = 48 samples; an epoch of 40 reads 43 of them with worker decoding (3 bad ones
    # replaced), 41 with device decoding: every bad sample lies inside both, in the first pass
    shards, _ = write_shards(tmp_path, 4, 12, mutate=_with_bad_samples)
    workers, device = _pair(shards, num_workers=0, shuffle_buffer=0, shuffle_shards=False)
    expected = _epoch(workers)
    with caplog.at_level(logging.WARNING):
        got = _epoch(device, DeviceDecoder(112))
    assert len(expected) == len(got) == 5
    assert [len(b["__key__"]) for b in expected] == [8, 8, 8, 8, 8]
    # shards in order: the workers batch samples 0-7, 8-15, 16-23, 24-32 (25 skipped there), 33-40;
    # device decoding then drops 2 and 15 from the first two
    assert [len(b["__key__"]) for b in got] == [7, 7, 8, 8, 8]
    assert [int(b["n_skipped"]) for b in got] == [1, 1, 0, 1, 0]
    assert [int(b["n_skipped"]) for b in expected] == [1, 1, 1, 0, 0]  # refilled: 0-8, 9-17, 18-26, ...
    assert sum(int(b["n_skipped"]) for b in got) == sum(int(b["n_skipped"]) for b in expected) == 3
    for b in got:
        n = len(b["__key__"])
        assert b["image"].shape == (n, 3, 112, 112) and b["age"].shape == b["sex"].shape == (n,)
    want, have = _by_key(expected), _by_key(got)
    assert not set(BAD_DECODE) & set(have) and BAD_LABEL not in have
    assert set(have) == {f"{i:09d}" for i in range(41)} - set(BAD_DECODE) - {BAD_LABEL}
    assert set(want) == {f"{i:09d}" for i in range(43)} - set(BAD_DECODE) - {BAD_LABEL}
    common = set(want) & set(have)
    assert len(common) == 38  # worker decoding refills, so its epoch reaches two samples further (41, 42)
    for key in common:
        assert torch.equal(want[key][0], have[key][0]) and want[key][1] == have[key][1] == 20.0 + int(key)
    warned = [r.getMessage() for r in caplog.records if r.name == "fahr.data.device_decode"]
    assert len(warned) == 2
    assert warned[0].startswith(f"skipping bad sample '000000002' in shard {shards[0]}: cannot decode jpg: ")
    assert warned[1].startswith(f"skipping bad sample '000000015' in shard {shards[1]}: cannot decode jpg: ")


def test_undecodable_sample_raises_naming_it_when_asked(tmp_path):
    shards, _ = write_shards(tmp_path, 4, 12, mutate=_with_bad_samples)
    _, device = _pair(shards, num_workers=0, shuffle_buffer=0, shuffle_shards=False, on_error="raise")
    first = next(iter(make_loader(device, 0)))
    with pytest.raises(InputError, match=rf"^bad sample '000000002' in shard {shards[0]}: cannot decode jpg: "):
        DeviceDecoder(112, on_error="raise")(first, "cpu")


def test_a_batch_with_no_decodable_image_is_a_clear_error(tmp_path):
    def all_bad(i, sample):
        sample["jpg"] = sample["jpg"][:100]
        return sample

    shards, _ = write_shards(tmp_path, 2, 4, mutate=all_bad)
    _, device = _pair(shards, samples_per_epoch=4, batch_size=4, num_workers=0)
    with pytest.raises(InputError, match=r"^none of the 4 images of a batch decodes .*data\.decode=workers"):
        DeviceDecoder(112)(next(iter(make_loader(device, 0))), "cpu")


def _png(rng: np.random.Generator, size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_png_members_and_other_crop_sizes_decode_and_resize_as_in_the_workers(tmp_path):
    import webdataset as wds

    rng = np.random.default_rng(7)
    shards = []
    for s in range(4):
        shards.append(str(tmp_path / f"mixed-{s:06d}.tar"))
        with wds.TarWriter(shards[-1]) as writer:
            for i in range(s * 8, (s + 1) * 8):
                sample = {"__key__": f"{i:09d}", "json": json.dumps({"age": 20.0 + i, "sex": i % 2}).encode()}
                if i % 4 == 0:  # a 112 px JPEG
                    sample["jpg"] = _jpeg(rng, 112)
                elif i % 4 == 1:  # a PNG member
                    sample["png"] = _png(rng, 112)
                elif i % 4 == 2:  # a 96 px JPEG crop
                    sample["jpg"] = _jpeg(rng, 96)
                else:  # PNG bytes in a jpg member, 128 px: decoded by content, as the workers do
                    sample["jpg"] = _png(rng, 128)
                writer.write(sample)
    workers, device = _pair(shards, samples_per_epoch=32, num_workers=0, shuffle_buffer=0, shuffle_shards=False)
    encoded = _epoch(device)
    assert encoded[0]["encoded_member"] == ["jpg", "png", "jpg", "jpg"] * 2
    expected, got = _epoch(workers), [DeviceDecoder(112)(b, "cpu") for b in encoded]
    assert [b["__key__"] for b in got] == [b["__key__"] for b in expected] == [
        [f"{i:09d}" for i in range(j, j + 8)] for j in range(0, 32, 8)]
    for a, b in zip(expected, got):
        assert b["image"].shape == (8, 3, 112, 112) and torch.equal(a["image"], b["image"])
        assert int(b["n_skipped"]) == 0


def test_datamodule_decodes_in_its_transfer_hook_and_validation_stays_in_the_workers(tmp_path):
    shards, _ = write_shards(tmp_path, 4, 8)
    dm = ShardDataModule(shards, samples_per_epoch=32, batch_size=8, num_workers=0, shuffle_buffer=0,
                         label_keys=("age",), val_shards=shards, val_samples=32, decode="device")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert "encoded" in batch and "image" not in batch
    moved = dm.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    assert moved["image"].shape == (8, 3, 112, 112) and "encoded" not in moved
    val = next(iter(dm.val_dataloader()))
    assert "image" in val and "encoded" not in val
    assert dm.transfer_batch_to_device(val, torch.device("cpu"), 0)["image"] is val["image"]


def test_bad_decode_value_is_a_one_line_error(tmp_path, run_fahr):
    from tests.test_hostile_training import TINY, TINY_DATA

    r = run_fahr("pretrain", *TINY, *TINY_DATA, f"paths.root_dir={tmp_path}", f"paths.data_dir={tmp_path}/data",
                 "data.decode=gpu")
    assert r.status == 2, r
    assert r.error_line.endswith("data.decode must be one of workers, device, got 'gpu'"), r.err
    assert r.err.count("data.decode") == 1
    with pytest.raises(InputError, match=r"^decode must be one of workers, device, got 'cuda'$"):
        ShardStream(["x.tar"], samples_per_epoch=8, batch_size=8, world_size=1, rank=0, decode="cuda")


def test_pretrain_with_device_decoding_runs_and_logs_the_same_metrics(tiny_overrides):
    from fahr.pipeline.pretrain import pretrain

    plain = pretrain(compose_config("pretrain", tiny_overrides + ["trainer.max_steps=3", "experiment_name=w"]))
    on_device = pretrain(compose_config("pretrain", tiny_overrides + [
        "trainer.max_steps=3", "experiment_name=d", "data.decode=device"]))
    assert on_device.global_step == plain.global_step == 3
    assert set(on_device.metrics) == set(plain.metrics)
    assert "train/loss_step" in on_device.metrics and on_device.metrics["data/skipped"] == 0.0
    # the same pixels, the same seed: the same losses
    assert on_device.metrics["train/loss_step"] == plain.metrics["train/loss_step"]


@pytest.mark.parametrize("command", ["finetune_age", "finetune_survival"])
def test_finetunes_take_device_decoding_and_train_the_same_weights(tmp_path, command, monkeypatch):
    """``data.decode=device`` in both fine-tunes (images mode): the training batches are decoded in
    the transfer hook, and on the CPU to the same pixels, so the same kept weights as decoding in the
    workers."""
    from safetensors.torch import load_file

    decoded = []
    call = DeviceDecoder.__call__
    monkeypatch.setattr(DeviceDecoder, "__call__", lambda self, batch, device: decoded.append(1) or call(self, batch, device))

    from test_finetune_age import TINY

    if command == "finetune_age":
        from fahr.pipeline.finetune_age import finetune_age as run

        overrides = list(TINY)
    else:
        from fahr.pipeline.finetune_survival import finetune_survival as run

        overrides = ["experiment=demo_facesurvival", "backbone=null", "model=vit_test", "trainer=cpu",
                     "data.generate.n_patients=120", "data.generate.samples_per_shard=32", "data.batch_size=16",
                     "data.num_workers=0", "task.max_steps=3", "task.val_every_n_steps=3"]
    exports = []
    for decode in ("workers", "device"):
        result = run(compose_config(command, [*overrides, f"paths.root_dir={tmp_path / decode}",
                                              f"data.decode={decode}"]))
        exports.append(load_file(str(result.export_dir / "model.safetensors")))
        assert bool(decoded) == (decode == "device")
    assert exports[0].keys() == exports[1].keys()
    for key, value in exports[0].items():
        assert torch.equal(value, exports[1][key]), key
