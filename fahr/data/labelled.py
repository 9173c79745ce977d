"""Labels of labelled shards, age balancing, and (for benchmarks and small tools) faces in memory.

The fine-tunes stream their photos (:class:`fahr.data.shard_reader.ShardStream` for training,
:class:`fahr.data.shard_reader.EvalStream` for evaluation), so memory per rank stays flat as the data
grows. What they need of a whole split before training is only its labels:
:func:`read_label_columns` reads the json members of every sample, never the images (~10 us per
sample), and :func:`save_label_columns` / :func:`load_label_columns` keep them in the run directory
(``.npz`` of float arrays, loaded without pickle) so one rank reads the shards and the others the file.

:class:`LabelledFaces` holds a split's encoded photos in memory (map-style); the benchmarks' baselines
use it, the training commands do not.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from fahr.boundary import InputError
from fahr.data.shard_reader import IMAGE_MEMBERS, decode_rgb, expand_shards, read_shard

log = logging.getLogger(__name__)



@dataclass
class LabelledFaces(Dataset):
    """Items ``{"image": uint8 (3, S, S), <label>: float32 () for each label key, "index": int}``.

    Missing optional labels are NaN (e.g. race for a few UTKFace photos); ``required`` labels must be
    present and finite or the sample is skipped and counted under ``skipped`` (reason -> count).
    """

    images: list[bytes]
    labels: dict[str, np.ndarray]  # key -> float64 (N,)
    keys: list[str]
    image_size: int
    skipped: dict[str, int]
    persons: list[str]  # the shard json's "person" (a pseudonym for cohorts; "" when absent)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        data = torch.frombuffer(bytearray(self.images[i]), dtype=torch.uint8)
        image = decode_rgb(data)
        if image.shape[-1] != self.image_size or image.shape[-2] != self.image_size:
            from torchvision.transforms.v2 import functional as tvf

            image = tvf.resize(image, [self.image_size, self.image_size], antialias=True)
        item: dict[str, Any] = {"image": image, "index": i}
        for key, values in self.labels.items():
            item[key] = torch.tensor(values[i], dtype=torch.float32)
        return item


def load_labelled_faces(shards: str | Sequence[str], required: Sequence[str], optional: Sequence[str] = (),
                        image_size: int = 112) -> LabelledFaces:
    """Read every sample of ``shards`` (URLs, brace patterns, or a list) into memory.

    Args:
        shards: what :func:`fahr.data.shard_reader.expand_shards` accepts, or a list of URLs.
        required: label keys every kept sample must have as finite numbers (e.g. ``["age"]``).
        optional: label keys kept when present and numeric, NaN otherwise (e.g. ``["sex", "race"]``).
        image_size: side of the returned crops in pixels (others are resized).

    A broken shard raises :class:`fahr.data.shard_reader.ShardReadError`; bad samples are skipped and
    counted by reason (logged once), so ``read = len(dataset) + sum(skipped)``.
    """
    urls = expand_shards(shards) if isinstance(shards, str) else list(shards)
    images: list[bytes] = []
    keys: list[str] = []
    persons: list[str] = []
    columns: dict[str, list[float]] = {k: [] for k in (*required, *optional)}
    skipped: Counter[str] = Counter()
    for sample, meta in _usable_samples(urls, required, skipped):
        _append_labels(columns, meta, required, optional)
        images.append(bytes(next(sample[e] for e in IMAGE_MEMBERS if e in sample)))
        keys.append(sample["__key__"])
        persons.append(str(meta.get("person", "")))
    if skipped:
        log.warning("skipped %d samples of %d shards: %s", sum(skipped.values()), len(urls), dict(skipped))
    if not images:
        raise InputError(f"no usable samples in {len(urls)} shards (skipped: {dict(skipped)})")
    labels = {k: np.asarray(v, dtype=np.float64) for k, v in columns.items()}
    return LabelledFaces(images=images, labels=labels, keys=keys, image_size=image_size, skipped=dict(skipped),
                          persons=persons)


def load_split_faces(spec: Any, required: Sequence[str], optional: Sequence[str] = (),
                     image_size: int = 112) -> LabelledFaces:
    """One split's photos and labels in memory (``spec``: an ``index.json[#split]``, brace pattern or
    list of shards); see :func:`load_labelled_faces`."""
    from omegaconf import OmegaConf

    from fahr.data.shard_index import resolve_shard_spec

    spec = OmegaConf.to_container(spec) if OmegaConf.is_config(spec) else spec
    return load_labelled_faces(resolve_shard_spec(spec), required=required, optional=optional, image_size=image_size)


def _usable_samples(urls: list[str], required: Sequence[str], skipped: Counter) -> Iterator[tuple[dict, dict]]:
    """``(sample, its labels)`` of every usable sample of ``urls``, in order; the others are counted in
    ``skipped`` by reason."""
    for url in urls:
        for sample in read_shard(url):
            reason = _check_sample(sample, required)
            if reason:
                skipped[reason] += 1
                continue
            yield sample, json.loads(sample["json"])


def _append_labels(columns: dict[str, list[float]], meta: dict, required: Sequence[str],
                   optional: Sequence[str]) -> None:
    """The required labels (checked finite) and the optional ones (NaN when absent or not a number)."""
    for key in required:
        columns[key].append(float(meta[key]))
    for key in optional:
        value = meta.get(key)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        columns[key].append(float(value) if ok else math.nan)


def _check_sample(sample: dict[str, Any], required: Sequence[str]) -> str | None:
    """The skip reason of a sample, or None when it is usable."""
    if not any(e in sample and len(sample[e]) for e in IMAGE_MEMBERS):
        return "no_image"
    if "json" not in sample:
        return "no_labels"
    try:
        meta = json.loads(sample["json"])
    except ValueError:
        return "bad_json"
    if not isinstance(meta, dict):
        return "bad_json"
    for key in required:
        value = meta.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return f"label:{key}"
    return None


# ---- labels only ---------------------------------------------------------------------------------


@dataclass
class LabelColumns:
    """A split's labels: ``labels[key]`` float64 (N,) (NaN for a missing optional label), ``persons``
    (N,) the json's ``person`` ("" when absent), ``skipped``: reason -> count of samples left out
    (the streams skip the same ones), ``read``: samples read (= N + sum(skipped))."""
    labels: dict[str, np.ndarray]
    persons: list[str]
    skipped: dict[str, int]
    read: int

    def __len__(self) -> int:
        return len(self.persons)


def read_label_columns(shards: str | Sequence[str], required: Sequence[str], optional: Sequence[str] = ()) -> LabelColumns:
    """The labels of every usable sample of ``shards`` (as :func:`load_labelled_faces` would keep
    them, without reading the images). A broken shard raises ShardReadError; no usable sample at all
    is an InputError."""
    urls = expand_shards(shards) if isinstance(shards, str) else list(shards)
    columns: dict[str, list[float]] = {k: [] for k in (*required, *optional)}
    persons: list[str] = []
    skipped: Counter[str] = Counter()
    for _, meta in _usable_samples(urls, required, skipped):
        _append_labels(columns, meta, required, optional)
        persons.append(str(meta.get("person", "")))
    read = len(persons) + sum(skipped.values())
    if skipped:
        log.warning("%d of %d samples of %d shards lack a usable image or label: %s", sum(skipped.values()),
                    read, len(urls), dict(skipped))
    if not persons:
        raise InputError(f"no usable samples in {len(urls)} shards (skipped: {dict(skipped)})")
    return LabelColumns({k: np.asarray(v, dtype=np.float64) for k, v in columns.items()}, persons, dict(skipped), read)


def save_label_columns(path, columns: LabelColumns) -> None:
    """Write ``columns`` atomically as ``.npz`` (float arrays, persons as a fixed-width unicode array,
    skip counts as JSON text): nothing in it needs pickle to load."""
    import io

    from fahr.utils.atomic import atomic_write

    arrays = {f"label:{k}": v for k, v in columns.labels.items()}
    arrays["persons"] = np.asarray(columns.persons, dtype=np.str_)
    arrays["meta"] = np.asarray(json.dumps({"skipped": columns.skipped, "read": columns.read}))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, lambda f: f.write(buf.getvalue()), mode="wb")


def load_label_columns(path) -> LabelColumns:
    """What :func:`save_label_columns` wrote (``allow_pickle=False``)."""
    with np.load(path, allow_pickle=False) as z:
        labels = {name[len("label:"):]: z[name].astype(np.float64) for name in z.files if name.startswith("label:")}
        meta = json.loads(str(z["meta"]))
        return LabelColumns(labels, [str(p) for p in z["persons"].tolist()], meta["skipped"], int(meta["read"]))


# ---- age balancing --------------------------------------------------------------------------------


def age_bins(ages: np.ndarray, bin_width: float) -> np.ndarray:
    """Bin index ``floor(age / bin_width)`` per sample (int64 (N,)); ages in years."""
    return np.floor(np.asarray(ages, dtype=np.float64) / bin_width).astype(np.int64)


def balancing_weights(ages: np.ndarray, bin_width: float = 10.0, max_weight: float = 10.0) -> np.ndarray:
    """Per-sample weights inverse to the frequency of the sample's age bin, mean 1 (float64 (N,)).

    With these as sampling weights every bin is drawn equally often, except that a weight is capped
    at ``max_weight`` times the smallest one, so a bin of a handful of photos (e.g. 100+ years) is not
    repeated hundreds of times per epoch. ``max_weight=1`` gives uniform weights (no balancing).
    """
    if max_weight < 1:
        raise InputError(f"max_weight must be >= 1, got {max_weight}")
    bins = age_bins(ages, bin_width)
    _, inverse, counts = np.unique(bins, return_inverse=True, return_counts=True)
    w = 1.0 / counts[inverse].astype(np.float64)
    w = np.minimum(w, w.min() * max_weight)
    return w / w.mean()


def bin_weights(ages: np.ndarray, bin_width: float, max_weight: float) -> dict[int, float]:
    """:func:`balancing_weights` as one weight per age bin (bin index -> weight, mean 1 per sample)."""
    bins = age_bins(ages, bin_width)
    weights = balancing_weights(ages, bin_width, max_weight)
    return {int(b): float(weights[bins == b][0]) for b in np.unique(bins)}


def keep_probabilities(weights: dict[int, float]) -> dict[int, float]:
    """Per-bin keep probabilities that turn a stream of the data into draws with these bin weights
    (weight / the largest weight): the kept samples' bins are distributed as weighted sampling's."""
    top = max(weights.values())
    return {b: w / top for b, w in weights.items()}


def effective_histogram(ages: np.ndarray, weights: np.ndarray, bin_width: float) -> dict[str, float]:
    """Share of draws per age bin under ``weights`` (bin label ``"lo-hi"`` in years -> fraction)."""
    bins = age_bins(ages, bin_width)
    total = float(np.sum(weights))
    out = {}
    for b in np.unique(bins):
        lo = b * bin_width
        out[f"{lo:g}-{lo + bin_width:g}"] = float(np.sum(weights[bins == b]) / total)
    return out
