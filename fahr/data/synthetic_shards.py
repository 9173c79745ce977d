"""Shard folders of SYNTHETIC faces (:mod:`fahr.data.synthetic`), written once and reused.

A folder holds one split of ``num_samples`` faces of one generator seed, keys ``"%09d" % index``,
labels ``{"age", "sex", "health", "synthetic": true}``; its ``index.json`` records the generator
parameters, so equal parameters reuse the folder and other ones regenerate it.

Command line::

    python -m fahr.data.synthetic_shards --out DIR --num-samples N --samples-per-shard K --seed S
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from fahr.boundary import InputError
from fahr.data.shard_index import make_index, read_index, remove_index, verify_shards, write_index
from fahr.data.shard_writer import ShardWriter
from fahr.data.synthetic import GENERATOR_VERSION, synthetic_face

logger = logging.getLogger(__name__)

SOURCE = "synthetic"
#: what the index summarises of the synthetic labels
SUMMARIES = {"age": ("moments", "decades"), "sex": ("counts",), "health": ("moments",)}


def synthetic_generator(num_samples: int, samples_per_shard: int, seed: int, image_size: int) -> dict[str, Any]:
    """The generator parameters recorded in a synthetic index.json (equal parameters = same shards)."""
    return {"name": "fahr.data.synthetic", "version": GENERATOR_VERSION, "num_samples": num_samples,
            "samples_per_shard": samples_per_shard, "seed": seed, "image_size": image_size}


def write_synthetic_shards(out_dir: str | os.PathLike, num_samples: int, samples_per_shard: int, seed: int = 0,
                           image_size: int = 112, split: str = "train") -> dict[str, Any]:
    """Write (or reuse) SYNTHETIC face shards ``{split}-{i:06d}.tar`` in ``out_dir``; returns its index.

    An existing index.json with the same generator parameters (num_samples, samples_per_shard, seed,
    image_size, generator version) whose shards exist with the recorded sizes is reused as is; other
    synthetic shards in ``out_dir`` are replaced, but a folder whose index.json describes a
    non-synthetic data set raises :class:`InputError`.
    """
    if num_samples < 1:
        raise InputError(f"num_samples must be >= 1, got {num_samples}")
    generator = synthetic_generator(num_samples, samples_per_shard, seed, image_size)
    try:
        index = read_index(out_dir)
    except InputError as e:  # none yet, or unreadable: (re)write
        index = None
        logger.info("writing synthetic shards: %s", e)
    if index is not None:
        if index.get("source") != SOURCE:
            raise InputError(f"{out_dir} holds a non-synthetic data set (source={index.get('source')!r}); "
                             "refusing to overwrite it")
        if index.get("generator") == generator and split in index["splits"]:
            try:
                verify_shards(out_dir, check_hashes=False)
                logger.info("reusing %d synthetic samples in %s", index["splits"][split]["count"], out_dir)
                return index
            except InputError as e:
                logger.warning("regenerating synthetic shards in %s: %s", out_dir, e)
        else:
            logger.info("synthetic shards in %s have other parameters: regenerating", out_dir)
    remove_index(out_dir)  # the old data set stops being valid before any of its shards is replaced
    with ShardWriter(out_dir, prefix=split, samples_per_shard=samples_per_shard, image_size=image_size,
                     summaries=SUMMARIES, overwrite=True) as writer:
        for i in range(num_samples):
            image, labels = synthetic_face(i, seed, image_size)
            writer.write(f"{i:09d}", image, labels)
    index = make_index(SOURCE, image_size, {split: writer.entry}, synthetic=True, generator=generator)
    write_index(out_dir, index)
    return index


def ensure_synthetic_shards(data: Any, image_size: int) -> None:
    """Generate the synthetic shards a pretraining ``data`` config's ``generate`` describes, unless
    identical ones exist."""
    if data.get("generate") is None:
        return
    g = data.generate
    index = write_synthetic_shards(g.out_dir, num_samples=g.num_samples, samples_per_shard=g.samples_per_shard,
                                   seed=g.seed, image_size=image_size)
    (entry,) = index["splits"].values()
    logger.info("synthetic shards: %d samples in %d shards at %s", entry["count"], len(entry["shards"]), g.out_dir)


def main(argv: list[str] | None = None) -> None:
    """``python -m fahr.data.synthetic_shards --out DIR --num-samples N --samples-per-shard K --seed S``."""
    p = argparse.ArgumentParser(prog="python -m fahr.data.synthetic_shards", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder for shards + index.json")
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=112)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    index = write_synthetic_shards(args.out, args.num_samples, args.samples_per_shard, seed=args.seed,
                                   image_size=args.image_size)
    (entry,) = index["splits"].values()
    logger.info("%d synthetic samples in %d shards under %s", entry["count"], len(entry["shards"]), args.out)


if __name__ == "__main__":
    main()
