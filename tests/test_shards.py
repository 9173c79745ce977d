"""Shard streaming (fahr.data.shard_reader) and its DataModule: epoch arithmetic, DDP splits, bad data."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

from conftest import REPO, write_shard_index
from fahr.boundary import InputError
from fahr.data.datamodule import ShardDataModule
from fahr.data.shard_reader import ShardReadError, ShardStream, expand_shards, make_loader, read_shard

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


def _jpeg(rng: np.random.Generator, size: int = 112) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(folder: Path, n_shards: int, per_shard: int, prefix: str = "shard", mutate=None,
                 compress: bool = False, size: int = 112) -> tuple[list[str], dict[str, bytes]]:
    """Shards of samples {key "%09d", jpg, json {"age": 20 + i, "sex": i % 2}}; returns paths, key -> jpg."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(prefix) + n_shards * 1000 + per_shard)
    paths, images = [], {}
    for s in range(n_shards):
        path = folder / f"{prefix}-{s:06d}.tar{'.gz' if compress else ''}"
        with wds.TarWriter(str(path), compress=compress) as writer:
            for i in range(s * per_shard, (s + 1) * per_shard):
                sample = {"__key__": f"{i:09d}", "jpg": _jpeg(rng, size),
                          "json": json.dumps({"age": 20.0 + i, "sex": i % 2}).encode()}
                if mutate is not None:
                    sample = mutate(i, sample)
                images[sample["__key__"]] = sample["jpg"]
                writer.write(sample)
        paths.append(str(path))
    return paths, images


@pytest.fixture(scope="module")
def data8(tmp_path_factory) -> tuple[list[str], dict[str, bytes]]:
    """8 shards x 10 samples = 80 samples."""
    return write_shards(tmp_path_factory.mktemp("data8"), 8, 10)


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b["__key__"]]


def _stream(shards, **kw) -> ShardStream:
    args = dict(samples_per_epoch=80, batch_size=5, seed=3, shuffle_buffer=7, world_size=2, num_workers=2)
    args.update(kw)
    return ShardStream(shards, **args)


# ---- shard lists ------------------------------------------------------------------------------------


def test_expand_shards_patterns_lists_and_urls(data8):
    paths, _ = data8
    folder = os.path.dirname(paths[0])
    assert expand_shards(f"{folder}/shard-{{000000..000007}}.tar") == paths
    assert expand_shards(f"{paths[0]}::{folder}/shard-{{000002,000005}}.tar") == [paths[0], paths[2], paths[5]]
    assert expand_shards(paths[1:3]) == paths[1:3]
    remote = ["pipe:cat /nowhere/x.tar", "https://example.org/s-{0..1}.tar"]
    assert expand_shards(remote) == ["pipe:cat /nowhere/x.tar", "https://example.org/s-0.tar",
                                     "https://example.org/s-1.tar"]


def test_expand_shards_missing_and_empty(data8, tmp_path):
    paths, _ = data8
    with pytest.raises(InputError, match=r"shard-000008\.tar \(2 of 10 local shards missing"):
        expand_shards(f"{os.path.dirname(paths[0])}/shard-{{000000..000009}}.tar")
    for spec in ([], "", " :: "):
        with pytest.raises(ValueError, match="empty shard list"):
            expand_shards(spec)


def test_pipe_and_gzip_shards(data8, tmp_path):
    paths, images = data8
    assert [s["__key__"] for s in read_shard(f"pipe:cat {paths[0]}")] == [f"{i:09d}" for i in range(10)]
    gz, _ = write_shards(tmp_path, 2, 3, prefix="gz", compress=True)  # read by webdataset's tarfile path
    stream = ShardStream([f"pipe:cat {paths[0]}", gz[0], gz[1]], samples_per_epoch=16, batch_size=4,
                         world_size=1, rank=0, num_workers=0)
    keys = _keys(stream)
    assert sorted(keys) == sorted([f"{i:09d}" for i in range(10)] + [f"{i:09d}" for i in range(6)])


# ---- epoch arithmetic and DDP splits ------------------------------------------------------------------


@pytest.mark.parametrize("interleave", [1, 2])
def test_simulated_two_ranks_two_workers_exactly_once(data8, interleave):
    paths, _ = data8
    everything = sorted(f"{i:09d}" for i in range(80))
    orders = []
    for epoch in (0, 1):
        streams = [_stream(paths, rank=r, interleave=interleave) for r in (0, 1)]
        assert streams[0].shard_order(epoch) == streams[1].shard_order(epoch)
        per_worker = {(r, w): list(streams[r]._iter_worker(epoch, r, w)) for r in (0, 1) for w in (0, 1)}
        for (r, w), batches in per_worker.items():
            assert len(batches) == 4 == streams[r].batches_per_worker
            assert all(b["image"].shape == (5, 3, 112, 112) and int(b["n_skipped"]) == 0 for b in batches)
            shard_keys = {s["__key__"] for url in streams[r].worker_shards(epoch, r, w) for s in read_shard(url)}
            assert set(_keys(batches)) == shard_keys  # a worker reads exactly its own two shards
        for r in (0, 1):
            assert len(per_worker[(r, 0)]) + len(per_worker[(r, 1)]) == len(streams[r]) == 8
        seen = [k for batches in per_worker.values() for k in _keys(batches)]
        assert sorted(seen) == everything  # each sample exactly once per epoch
        orders.append(seen)
    assert orders[0] != orders[1]
    assert _stream(paths, rank=0).shard_order(0) != _stream(paths, rank=0).shard_order(1)
    again = _stream(paths, rank=1, interleave=interleave)
    assert _keys(again._iter_worker(1, 1, 0)) == _keys(_stream(paths, rank=1, interleave=interleave)._iter_worker(1, 1, 0))


def test_real_dataloader_matches_simulation_and_follows_set_epoch(data8):
    paths, images = data8
    stream = _stream(paths, rank=0)
    loader = make_loader(stream, num_workers=2, persistent_workers=True)
    assert len(loader) == 8
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == 8
        simulated = [list(stream._iter_worker(epoch, 0, w)) for w in (0, 1)]
        expected = [b for pair in zip(*simulated) for b in pair]  # the DataLoader alternates workers
        assert _keys(batches) == _keys(expected)
    image = batches[0]["image"]
    assert image.dtype == torch.uint8 and image.shape == (5, 3, 112, 112)
    for i, key in enumerate(batches[0]["__key__"]):
        reference = decode_image(torch.frombuffer(bytearray(images[key]), dtype=torch.uint8), mode=ImageReadMode.RGB)
        assert torch.equal(image[i], reference)


def test_epoch_larger_than_data_repeats_only_then(tmp_path):
    paths, _ = write_shards(tmp_path, 4, 10)  # 40 samples
    big = ShardStream(paths, samples_per_epoch=100, batch_size=8, seed=0, shuffle_buffer=5,
                      world_size=1, rank=0, num_workers=2)
    assert len(big) == 14  # ceil(100 / 8) = 13 -> multiple of 2 workers
    for w in (0, 1):
        keys = _keys(big._iter_worker(0, 0, w))
        assert len(keys) == 7 * 8
        assert len(set(keys[:20])) == 20  # the first pass over the worker's 20 samples has no repeat
        counts = np.unique(keys, return_counts=True)[1]
        assert len(counts) == 20 and set(counts) <= {2, 3}
    small = ShardStream(paths, samples_per_epoch=32, batch_size=8, seed=0, shuffle_buffer=5,
                        world_size=1, rank=0, num_workers=2)
    keys = _keys(small)
    assert len(small) == 4 and len(keys) == 32 == len(set(keys))


def test_too_few_shards_is_a_clear_error(data8):
    paths, _ = data8
    with pytest.raises(ValueError, match=r"3 shards cannot feed 2 ranks x 2 workers .*>= 4 shards"):
        _stream(paths[:3], rank=0)
    stream = _stream(paths[:4], rank=0)
    stream.shards = paths[:2]
    with pytest.raises(ValueError, match="2 shards cannot feed"):
        next(iter(stream))
    with pytest.raises(ValueError, match="does not match"):
        make_loader(_stream(paths, rank=0), num_workers=1)


def test_rank_and_world_from_environment(data8, monkeypatch):
    paths, _ = data8
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    stream = ShardStream(paths, samples_per_epoch=80, batch_size=5, num_workers=0)
    assert (stream.world_size, stream.rank, len(stream)) == (4, 3, 4)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="rank 4 of world_size 4"):
        ShardStream(paths, samples_per_epoch=80, batch_size=5, num_workers=0)


# ---- bad data -----------------------------------------------------------------------------------------


def _bad_data(tmp_path, prefix):
    def mutate(i, sample):
        if i == 13:
            sample["jpg"] = sample["jpg"][: len(sample["jpg"]) // 2]  # truncated JPEG
        if i == 4:
            sample["json"] = json.dumps({"sex": 1}).encode()  # no "age"
        if i == 25:
            sample["json"] = json.dumps({"age": float("nan"), "sex": 0}).encode()
        return sample
    return write_shards(tmp_path, 3, 10, prefix=prefix, mutate=mutate)  # 30 samples, 27 good


def test_bad_samples_are_skipped_counted_and_logged(tmp_path, caplog):
    paths, _ = _bad_data(tmp_path, "bad")
    caplog.set_level(logging.WARNING, logger="fahr.data.shard_reader")
    stream = ShardStream(paths, samples_per_epoch=27, batch_size=9, label_keys=("age",), world_size=1, rank=0,
                         num_workers=0)
    batches = list(stream)
    assert sum(int(b["n_skipped"]) for b in batches) == 3
    assert sorted(_keys(batches)) == [f"{i:09d}" for i in range(30) if i not in (4, 13, 25)]
    ages = torch.cat([b["age"] for b in batches])
    assert ages.dtype == torch.float32 and torch.equal(ages, torch.tensor([20.0 + int(k) for k in _keys(batches)]))
    log = caplog.text
    assert "'000000013'" in log and "bad-000001.tar" in log and "cannot decode jpg" in log
    assert "'000000004'" in log and "label 'age' missing" in log and "not finite" in log
    assert "skipped 3 bad samples" in log
    # only the corrupt image matters without labels
    no_labels = ShardStream(paths, samples_per_epoch=29, batch_size=29, world_size=1, rank=0, num_workers=0)
    assert [int(b["n_skipped"]) for b in no_labels] == [1]


@pytest.mark.parametrize("bad_key, message", [(13, "cannot decode jpg"), (4, "label 'age' missing")])
def test_bad_samples_raise_when_asked(tmp_path, bad_key, message):
    paths, _ = _bad_data(tmp_path, "raise")
    shard = paths[bad_key // 10]
    stream = ShardStream([shard], samples_per_epoch=10, batch_size=10, label_keys=("age",), on_error="raise",
                         world_size=1, rank=0, num_workers=0)
    with pytest.raises(ValueError, match=f"'{bad_key:09d}' in shard {shard}: {message}"):
        list(stream)


def test_broken_shards_raise_naming_the_shard(tmp_path):
    paths, _ = write_shards(tmp_path, 4, 10, prefix="broken")
    size = os.path.getsize(paths[1])
    with open(paths[1], "r+b") as f:  # cut in the middle of a member
        f.truncate(size // 2 + 100)
    with tarfile.open(paths[2]) as tar:  # cut exactly at a member boundary: tarfile would not notice
        boundary = tar.getmembers()[9].offset
    with open(paths[2], "r+b") as f:
        f.truncate(boundary)
    os.remove(paths[3])  # vanished after the shard list was made
    for path in paths[1:]:
        stream = ShardStream([paths[0], path], samples_per_epoch=20, batch_size=5, on_error="skip",
                             world_size=1, rank=0, num_workers=0)
        with pytest.raises(ShardReadError, match=f"shard {path}"):
            list(stream)
    with pytest.raises(ShardReadError, match=r"pipe:cat .*broken-000003\.tar"):
        list(read_shard(f"pipe:cat {paths[3]}"))


# ---- the DataModule -----------------------------------------------------------------------------------


def test_datamodule_train_and_val_batches(data8, tmp_path):
    paths, images = data8
    folder = os.path.dirname(paths[0])
    val_paths, _ = write_shards(tmp_path, 4, 6, prefix="val")
    dm = ShardDataModule(f"{folder}/shard-{{000000..000007}}.tar", samples_per_epoch=80, batch_size=8,
                         num_workers=0, label_keys=("age", "sex"), shuffle_buffer=16,
                         val_shards=f"{tmp_path}/val-{{000000..000003}}.tar", val_samples=24)
    dm.setup("fit")
    assert dm.batches_per_epoch == 10
    batches = list(dm.train_dataloader())
    assert len(batches) == 10
    batch = batches[0]
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (8, 3, 112, 112)
    assert batch["age"].dtype == batch["sex"].dtype == torch.float32 and batch["age"].shape == (8,)
    assert batch["sex"].tolist() == [float(int(k) % 2) for k in batch["__key__"]]
    assert sorted(_keys(batches)) == sorted(images)
    dm.set_epoch(1)
    assert _keys(dm.train_dataloader()) != _keys(batches)
    val = [_keys(dm.val_dataloader()) for _ in range(2)]
    assert val[0] == val[1] == [f"{i:09d}" for i in range(24)]  # fixed order, no shuffling

    per_rank = []
    for rank in (0, 1):  # as under a 2-device Trainer
        dm2 = ShardDataModule(paths, samples_per_epoch=80, batch_size=4, num_workers=2,
                              val_shards=val_paths, val_samples=24)
        dm2.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        dm2.setup("fit")
        assert dm2.batches_per_epoch == len(dm2.train_stream) == 10
        per_rank.append(list(dm2.val_stream))
        assert dm2.val_stream.num_workers == 1  # 3 batches per rank: 2 workers would need 4
    assert len(per_rank[0]) == len(per_rank[1]) == 3
    assert set(_keys(per_rank[0])).isdisjoint(_keys(per_rank[1]))
    assert sorted(_keys(per_rank[0]) + _keys(per_rank[1])) == [f"{i:09d}" for i in range(24)]


def test_datamodule_resizes_and_fails_early(data8, tmp_path):
    paths, _ = data8
    dm = ShardDataModule(paths, samples_per_epoch=8, batch_size=4, num_workers=0, image_size=64)
    assert next(iter(dm.train_dataloader()))["image"].shape == (4, 3, 64, 64)
    with pytest.raises(InputError, match="nothing-000000.tar"):
        ShardDataModule(f"{tmp_path}/nothing-{{000000..000001}}.tar", samples_per_epoch=8, batch_size=4).setup("fit")
    with pytest.raises(ValueError, match="set val_samples"):
        ShardDataModule(paths, samples_per_epoch=8, batch_size=4, num_workers=0, val_shards=paths[:2]).setup("fit")
    val_paths, _ = write_shards(tmp_path, 2, 6, prefix="indexed")  # val_samples=0: counted from index.json
    write_shard_index(tmp_path, {"val": [(p, 6) for p in val_paths]})
    dm = ShardDataModule(paths, samples_per_epoch=8, batch_size=4, num_workers=0, val_shards=val_paths)
    dm.setup("validate")
    assert dm.train_stream is None and dm.val_stream.samples_per_epoch == 12 and len(_keys(dm.val_dataloader())) == 12


def test_http_shards_stream_like_local_ones(data8):
    """http(s) URLs go through webdataset's gopen (curl); served here from loopback only."""
    import functools
    import http.server
    import threading

    shards, images = data8
    folder = Path(shards[0]).parent
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        urls = expand_shards(f"http://127.0.0.1:{port}/shard-{{000000..000007}}.tar")
        stream = ShardStream(urls, samples_per_epoch=80, batch_size=8, seed=0, shuffle_buffer=0,
                             world_size=1, rank=0, num_workers=0)
        keys = _keys(make_loader(stream, num_workers=0))
        assert sorted(keys) == sorted(images)
        missing = ShardStream([f"http://127.0.0.1:{port}/nope-000000.tar"], samples_per_epoch=8, batch_size=8,
                              seed=0, shuffle_buffer=0, world_size=1, rank=0, num_workers=0)
        with pytest.raises(ShardReadError, match="nope-000000.tar"):
            list(make_loader(missing, num_workers=0))
    finally:
        server.shutdown()


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("shuffle_buffer, interleave", [(0, 1), (16, 1), (0, 2), (16, 3)])
def test_mid_epoch_start_continues_the_uninterrupted_order(tmp_path, num_workers, shuffle_buffer, interleave):
    """set_epoch(e, start_batch=k) yields exactly batches k.. of the uninterrupted epoch e, for every
    k, through a real DataLoader; with an index.json and no buffer, skipped shards are never opened."""
    paths, _ = write_shards(tmp_path, 4, 12)  # 48 samples; 150 per epoch: the workers make extra passes
    write_shard_index(tmp_path, {"train": [(p, 12) for p in paths]})
    for rank in (0, 1):
        stream = ShardStream(paths, samples_per_epoch=150, batch_size=5, seed=3, shuffle_buffer=shuffle_buffer,
                             world_size=2, rank=rank, num_workers=num_workers, interleave=interleave)
        stream.set_epoch(1)
        full = [list(b["__key__"]) for b in make_loader(stream, num_workers)]
        assert len(full) == len(stream) == 15 + (num_workers == 2)
        for start in (1, 3, 8, len(stream) - 1, len(stream)):
            stream.set_epoch(1, start_batch=start)
            resumed = [list(b["__key__"]) for b in make_loader(stream, num_workers)]
            assert resumed == full[start:], (rank, start)
        stream.set_epoch(1, start_batch=0)
        assert [list(b["__key__"]) for b in make_loader(stream, num_workers)] == full
    with pytest.raises(ValueError, match="start_batch"):
        stream.set_epoch(0, start_batch=len(stream) + 1)


def test_mid_epoch_start_skips_whole_shards_unopened(tmp_path, monkeypatch):
    import fahr.data.shard_reader as shards_module

    paths, _ = write_shards(tmp_path, 4, 10)
    write_shard_index(tmp_path, {"train": [(p, 10) for p in paths]})
    stream = ShardStream(paths, samples_per_epoch=40, batch_size=5, seed=0, shuffle_buffer=0,
                         world_size=1, rank=0, num_workers=0)
    full = _keys(stream)
    opened = []
    real = shards_module.read_shard
    monkeypatch.setattr(shards_module, "read_shard", lambda url: opened.append(url) or real(url))
    stream.set_epoch(0, start_batch=5)  # 25 samples in: shards 1 and 2 of the order are skipped
    assert _keys(stream) == full[25:]
    assert opened == stream.shard_order(0)[2:]


def test_interleaving_mixes_shards_written_in_sorted_order(tmp_path):
    """Shards written in a data set's file order (here: each shard one age) stream as a mix: with one
    shard at a time and a small buffer a batch holds one or two ages, read 8 at once it holds many."""
    paths, _ = write_shards(tmp_path, 8, 40, mutate=lambda i, sample: {**sample, "json": json.dumps(
        {"age": float(i // 40), "sex": 0}).encode()})  # shard s: age s for all its samples

    def ages_per_batch(interleave: int) -> list[int]:
        stream = ShardStream(paths, samples_per_epoch=320, batch_size=16, seed=0, shuffle_buffer=20,
                             label_keys=("age",), world_size=1, rank=0, num_workers=0, interleave=interleave)
        return [len(set(b["age"].tolist())) for b in stream]

    one_at_a_time, mixed = ages_per_batch(1), ages_per_batch(8)
    assert sorted(one_at_a_time)[len(one_at_a_time) // 2] <= 2, one_at_a_time
    assert min(mixed[:10]) >= 5, mixed  # while all 8 shards are open, every batch spans most ages
    with pytest.raises(InputError, match="interleave must be an integer >= 1"):
        ShardStream(paths, samples_per_epoch=8, batch_size=4, interleave=0)


# ---- exit: a worker left running never holds the training process ------------------------------------


EXIT_SCRIPT = """
import glob, sys
from fahr.data.shard_reader import ShardStream, make_loader
from fahr.data.synthetic_shards import write_synthetic_shards

write_synthetic_shards(sys.argv[1], num_samples=32, samples_per_shard=8, image_size=32)
shards = sorted(glob.glob(sys.argv[1] + "/train-*.tar"))
stream = ShardStream(shards, samples_per_epoch=32, batch_size=4, seed=0, num_workers=1, image_size=32)
LEFT = iter(make_loader(stream, 1))  # never shut down: kept alive until the interpreter exits
next(LEFT)
print("one batch", flush=True)
"""


def test_a_dataloader_worker_left_running_does_not_hang_the_exit(tmp_path):
    """A training process that exits with a DataLoader iterator still referenced (a run stopped by a
    signal can) exits at once: its worker ignores SIGTERM (so a group-wide SIGTERM cannot kill it
    mid-batch), so multiprocessing's exit handler alone would SIGTERM it and then wait forever."""
    script = tmp_path / "leave_worker.py"
    script.write_text(EXIT_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "shards")], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout == "one batch\n", proc.stderr[-2000:]


class _SlowToStart(torch.utils.data.IterableDataset):
    """Yields 0..2 after ``delay`` seconds (a stream still opening its shards)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def __iter__(self):
        time.sleep(self.delay)
        yield from range(3)


@pytest.mark.parametrize("after", [0.0, 0.3])
def test_a_stop_signal_cannot_kill_a_starting_dataloader_worker(after):
    """A job-wide SIGTERM that reaches a DataLoader worker as it starts (before its stream ran) would
    kill it (PyTorch's worker SIGTERM handler), and the training process would raise instead of
    saving. StopSignalSafeLoader's workers are immune from their first instruction; the creating
    thread's signal mask is restored."""
    import signal as sig

    from torch.utils.data import DataLoader

    from fahr.data.shard_reader import StopSignalSafeLoader

    def run(loader_class) -> list:
        loader = loader_class(_SlowToStart(1.0), batch_size=None, num_workers=1)
        it = iter(loader)
        time.sleep(after)
        for pid in [w.pid for w in it._workers]:
            os.kill(pid, sig.SIGTERM)
        try:
            return list(it)
        finally:
            del it

    assert run(StopSignalSafeLoader) == [0, 1, 2]
    assert sig.SIGTERM not in sig.pthread_sigmask(sig.SIG_BLOCK, [])
    if after > 0:  # the plain loader's worker has PyTorch's handler by then: the reference failure
        with pytest.raises(RuntimeError, match="exited unexpectedly|killed by signal"):
            run(DataLoader)
