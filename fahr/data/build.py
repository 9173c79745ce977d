"""Build the shard DataModule from a ``data`` config node (generating synthetic shards if asked)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def shard_list_from_index(index_path: str | Path) -> list[str]:
    """The shard paths listed in an ``index.json`` (as written by ``ShardWriter``), in order."""
    from fahr.data.shard_writer import read_index

    index_dir = Path(index_path).parent
    index = read_index(index_dir)
    return [str(index_dir / s["name"]) for s in index["shards"]]


def _read_index_text(location: str) -> str:
    if location.startswith(("http://", "https://")):
        from urllib.request import urlopen

        try:
            with urlopen(location, timeout=60) as response:
                return response.read().decode("utf-8")
        except OSError as err:
            raise FileNotFoundError(f"shard index not readable: {location}: {err}") from err
    if not Path(location).is_file():
        raise FileNotFoundError(f"shard index not found: {location}")
    return Path(location).read_text()


def shard_list_from_split_index(location: str | Path, split: str) -> list[str]:
    """The shards of one split of an ``index.json`` written by ``fahr shards``: a local path or an
    http(s) URL (shards are then URLs relative to it, streamed like any other http shard)."""
    location = str(location)
    splits = json.loads(_read_index_text(location)).get("splits")
    if splits is None:
        raise ValueError(f"{location} has no splits; drop the '#{split}' suffix")
    if split not in splits:
        raise ValueError(f"{location} has no split {split!r}; it has {sorted(splits)}")
    base = location.rsplit("/", 1)[0]
    return [f"{base}/{s['name']}" for s in splits[split]["shards"]]


def resolve_train_shards(spec: str | list[str]) -> str | list[str]:
    """An ``.../index.json`` path stands for the shards it lists, ``.../index.json#train`` for one
    split of a ``fahr shards`` output; anything else is passed through."""
    if isinstance(spec, str) and "index.json#" in spec and not spec.startswith("pipe:"):
        path, split = spec.rsplit("#", 1)
        return shard_list_from_split_index(path, split)
    if isinstance(spec, str) and spec.endswith("index.json") and "://" not in spec and not spec.startswith("pipe:"):
        if not Path(spec).is_file():
            raise FileNotFoundError(f"shard index not found: {spec}")
        return shard_list_from_index(spec)
    return spec


def ensure_synthetic_shards(data: DictConfig, image_size: int) -> None:
    """Generate the synthetic shards described by ``data.generate`` unless identical ones exist."""
    if data.get("generate") is None:
        return
    from fahr.data.shard_writer import write_synthetic_shards

    g = data.generate
    index = write_synthetic_shards(g.out_dir, num_samples=g.num_samples, samples_per_shard=g.samples_per_shard,
                                   seed=g.seed, image_size=image_size)
    log.info("synthetic shards: %d samples in %d shards at %s", index["num_samples"], index["num_shards"], g.out_dir)


def wait_for_synthetic_shards(data: DictConfig, image_size: int, timeout_s: float = 1800.0,
                              poll_s: float = 1.0) -> None:
    """On every rank but 0: wait until rank 0 has written (or reused) the synthetic shards that
    ``data.generate`` describes, so no rank reads a half-written set. There is no process group yet
    (Lightning creates it inside ``fit``), so this watches the shards' directory, which every rank
    must see anyway (a shared file system across nodes). Raises TimeoutError after ``timeout_s``."""
    if data.get("generate") is None:
        return
    from fahr.data.shard_writer import synthetic_generator, synthetic_shards_ready

    g = data.generate
    generator = synthetic_generator(g.num_samples, g.samples_per_shard, g.seed, image_size)
    deadline = time.monotonic() + timeout_s
    while not synthetic_shards_ready(g.out_dir, generator):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 did not finish the synthetic shards in {g.out_dir} within {timeout_s:.0f} s "
                               "(is the directory on a file system all nodes share?)")
        time.sleep(poll_s)


def build_datamodule(data: DictConfig):
    """A :class:`fahr.data.datamodule.ShardDataModule` for ``data`` (shards must exist)."""
    from fahr.data.datamodule import ShardDataModule

    val = data.val_shards
    return ShardDataModule(
        train_shards=resolve_train_shards(OmegaConf.to_object(data.train_shards)
                                          if OmegaConf.is_config(data.train_shards) else data.train_shards),
        samples_per_epoch=data.samples_per_epoch,
        batch_size=data.batch_size,
        num_workers=data.num_workers,
        seed=data.seed,
        shuffle_buffer=data.shuffle_buffer,
        label_keys=tuple(data.label_keys),
        image_size=data.image_size,
        on_error=data.on_error,
        val_shards=resolve_train_shards(OmegaConf.to_object(val) if OmegaConf.is_config(val) else val) if val else None,
        val_samples=data.val_samples,
        persistent_workers=data.persistent_workers,
        pin_memory=data.pin_memory,
    )
