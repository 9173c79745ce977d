"""`fahr shards`: a ``ShardsConfig`` -> data_pipelines.build, with a progress bar and a summary.

Everything the command is given is checked before any work, each failure one line naming the key
(:func:`check_config`): the source and its ``source_options`` (an unknown key or a value of the
wrong kind), the input folder, every build option (``data_pipelines.options.check_options``: ranges
of ``split.fractions``, ``chunk_size``, ``samples_per_shard``, ``processes``, ``align.*``, ...),
``deid.key_file``; then the output (``data_pipelines.build.check_output``). The options are one
structure (:mod:`data_pipelines.options`) from the config to the build.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from data_pipelines.options import ShardsConfig, build_options, check_options
from fahr.boundary import InputError, printable_path
from fahr.config.schema import validate


def check_config(cfg: DictConfig):
    """Check a shards config before any work; returns ``(BuildOptions, source_options)``.

    Raises:
        InputError: naming the key: unknown source, unknown or ill-typed ``source_options``, an input
            that is not a folder, an option out of range, a ``deid.key_file`` that is not a regular
            file or is given while de-identification is off.
    """
    from data_pipelines.sources import check_source_options

    source_options = OmegaConf.to_container(cfg.source_options, resolve=True)
    check_source_options(cfg.source, source_options)
    if not str(cfg.input).strip():
        raise InputError("input: empty path; give the folder that holds the data set")
    if not Path(cfg.input).is_dir():
        what = "is not a directory" if Path(cfg.input).exists() else "does not exist"
        raise InputError(f"input={printable_path(cfg.input)} {what}; give the folder that holds the data set")
    options = build_options(cfg)
    try:
        check_options(options)
    except InputError as err:
        if str(err).startswith("split.fractions must sum to 1"):
            raise InputError(f"{err}; note that split.fractions={{...}} on the command line is merged into the "
                             "default {train: 0.8, val: 0.1, test: 0.1}: give every split, 0 for one you do not "
                             "want (split.fractions={train:0.8,val:0,test:0.2}) or drop it (~split.fractions.val)"
                             ) from None
        raise
    if options.deid.key_file is not None:
        if not options.resolved(cfg.source).deid.enabled:
            raise InputError(f"deid.key_file is set but de-identification is off (deid.enabled={cfg.deid.enabled}, "
                             f"source={cfg.source}); drop deid.key_file or set deid.enabled=true")
        key = Path(options.deid.key_file)
        if not key.is_file():
            what = "does not exist" if not key.exists() else "is not a regular file"
            raise InputError(f"deid.key_file={printable_path(key)} {what}; expected a file holding the secret salt")
        if key.stat().st_size == 0:
            raise InputError(f"deid.key_file={printable_path(key)} is empty; expected a file holding the secret salt")
    return options, source_options


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

    validate(cfg, ShardsConfig)  # unknown keys, wrong types, unset required keys: InputError
    options, source_options = check_config(cfg)
    iter_records = get_source(cfg.source)
    with tqdm(desc=f"{cfg.source} -> shards", unit="photo") as bar:
        index = build_shards(cfg.source, lambda: iter_records(cfg.input, **source_options), cfg.output,
                             options, progress=bar.update, inputs=(cfg.input,))
    print(f"\nfahr shards: {cfg.output}/index.json\n{summary_table(index)}")
    return index
