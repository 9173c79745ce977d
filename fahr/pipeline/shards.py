"""`fahr shards`: a ``ShardsConfig`` -> data_pipelines.build, with a progress bar and a summary."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from fahr.boundary import InputError
from fahr.config.schema import ShardsConfig, validate


def build_options(cfg: DictConfig):
    from data_pipelines.build import AlignOptions, BuildOptions

    cohort = cfg.source == "cohort"
    stratify = cfg.split.stratify if cfg.split.stratify != "auto" else ("event" if cohort else "age")
    if cfg.deid.enabled not in ("auto", "true", "false"):
        raise InputError(f"deid.enabled must be auto, true or false, got {cfg.deid.enabled!r}")
    deid = cohort if cfg.deid.enabled == "auto" else cfg.deid.enabled == "true"
    return BuildOptions(
        fractions=dict(cfg.split.fractions), split_seed=cfg.split.seed, stratify=stratify,
        dedup=cfg.dedup.enabled, near_threshold=cfg.dedup.near_threshold,
        deidentify=deid, salt_key_file=cfg.deid.key_file, allowed_labels=tuple(cfg.deid.allowed_labels),
        samples_per_shard=cfg.samples_per_shard, chunk_size=cfg.chunk_size, processes=cfg.processes,
        align=AlignOptions(**OmegaConf.to_container(cfg.align)),
    )


def summary_table(index: dict[str, Any]) -> str:
    rows = [("read", index["read"])]
    rows += [(f"written: {split}", e["count"]) for split, e in index["splits"].items()]
    rows += [(f"rejected: {reason}", n) for reason, n in index["rejected"].items()]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {name:<{width}}  {n:>9,}" for name, n in rows)


def shards(cfg: DictConfig) -> dict[str, Any]:
    from tqdm import tqdm

    from data_pipelines.build import build_shards
    from data_pipelines.sources import get_source

    validate(cfg, ShardsConfig)
    iter_records = get_source(cfg.source)
    options = build_options(cfg)
    source_options = OmegaConf.to_container(cfg.source_options)
    with tqdm(desc=f"{cfg.source} -> shards", unit="photo") as bar:
        index = build_shards(cfg.source, lambda: iter_records(cfg.input, **source_options), cfg.output,
                             options, progress=bar.update)
    print(f"\nfahr shards: {cfg.output}/index.json\n{summary_table(index)}")
    return index
