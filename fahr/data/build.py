"""Build the shard DataModule from a ``data`` config node (generating synthetic shards if asked)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


#: a shard name inside an index.json: a plain file name (no folder, no scheme, no shell, no braces)
_SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_MAX_INDEX_BYTES = 256 * 1024 * 1024


def _checked_names(entries: Any, where: str) -> list[str]:
    """The ``name`` of each shard entry of an index, each a plain file name.

    An index is data: a name like ``pipe:curl ... | sh``, ``../../secret.tar``, ``/etc/x.tar``,
    ``x.tar::pipe:...`` or ``http://elsewhere/x.tar`` would make the reader run a command or read
    outside the index's folder, so anything but a plain file name is refused."""
    from fahr.boundary import InputError

    if not isinstance(entries, list) or not entries:
        raise InputError(f"{where}: expected a non-empty list of shards")
    names = []
    for i, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name) or name in (".", ".."):
            shown = repr(name)[:80] if isinstance(name, str) else type(name).__name__
            raise InputError(f"{where}: shard {i} has the name {shown}: shard names in an index must be plain file "
                             "names in the index's own folder (letters, digits, '.', '_', '-'); commands, "
                             "folders and URLs are only accepted where you type them (data.train_shards=...)")
        names.append(name)
    return names


def shard_list_from_index(index_path: str | Path) -> list[str]:
    """The shards an ``index.json`` written by ``ShardWriter`` lists, in order, as absolute paths in
    the index's folder (names are checked by :func:`_checked_names`)."""
    from fahr.boundary import InputError
    from fahr.data.shard_writer import read_index

    index_dir = Path(index_path).parent.absolute()
    try:
        index = read_index(index_dir)
    except (FileNotFoundError, ValueError) as err:
        raise InputError(str(err)) from None
    return [str(index_dir / name) for name in _checked_names(index["shards"], str(index_path))]


def _read_index_text(location: str) -> str:
    from fahr.boundary import InputError, read_text_file

    if location.startswith(("http://", "https://")):
        from urllib.request import urlopen

        try:
            with urlopen(location, timeout=60) as response:
                data = response.read(_MAX_INDEX_BYTES + 1)
        except (OSError, ValueError) as err:
            raise InputError(f"shard index not readable: {location}: {err}") from None
        if len(data) > _MAX_INDEX_BYTES:
            raise InputError(f"shard index {location}: larger than {_MAX_INDEX_BYTES:,} bytes")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"shard index {location}: not UTF-8 text") from None
    return read_text_file(location, "shard index", _MAX_INDEX_BYTES)


def shard_list_from_split_index(location: str | Path, split: str) -> list[str]:
    """The shards of one split of an ``index.json`` written by ``fahr shards``: a local path (shards
    as absolute paths in its folder) or an http(s) URL (shards are URLs in the same folder of the
    same server, streamed like any other http shard). Names are checked by :func:`_checked_names`."""
    from fahr.boundary import InputError

    location = str(location)
    text = _read_index_text(location)
    try:
        index = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"shard index {location}: not valid JSON ({err.msg} at line {err.lineno})") from None
    splits = index.get("splits") if isinstance(index, dict) else None
    if splits is None:
        raise InputError(f"{location} has no splits; drop the '#{split}' suffix")
    if not isinstance(splits, dict):
        raise InputError(f"{location}: 'splits' must be an object of split name -> shards")
    if split not in splits:
        raise InputError(f"{location} has no split {split!r}; it has {sorted(map(str, splits))}")
    entry = splits[split]
    names = _checked_names(entry.get("shards") if isinstance(entry, dict) else None, f"{location}#{split}")
    if location.startswith(("http://", "https://")):
        base = location.rsplit("/", 1)[0]
        return [f"{base}/{name}" for name in names]
    folder = Path(location).parent.absolute()
    return [str(folder / name) for name in names]


def resolve_train_shards(spec: str | list[str]) -> str | list[str]:
    """An ``.../index.json`` path stands for the shards it lists, ``.../index.json#train`` for one
    split of a ``fahr shards`` output; anything else is passed through (it is what the user typed:
    paths, brace patterns, URLs and ``pipe:`` commands are theirs to give)."""
    from fahr.boundary import InputError

    if isinstance(spec, str) and "index.json#" in spec and not spec.startswith("pipe:"):
        path, split = spec.rsplit("#", 1)
        return shard_list_from_split_index(path, split)
    if isinstance(spec, str) and spec.endswith("index.json") and "://" not in spec and not spec.startswith("pipe:"):
        if not Path(spec).exists():
            raise InputError(f"shard index not found: {spec}")
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
