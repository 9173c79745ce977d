"""Semi-synthetic clinical cohorts (the demo's synthetic faces, or UTKFace photos) -> de-identified shards.

``write_cohort`` (fahr.data.cohort_simulator) writes ``cohort.csv`` + photos + ``true_hr.json`` in the format
of the ``cohort`` source; this turns them into shards exactly as ``fahr shards source=cohort`` would
(split by patient, stratified by event, ids hashed, dates relative), with a demo salt kept beside
the data (a real cohort's salt lives outside the project: ``$FAHR_DEID_SALT`` or a key file).
"""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def ensure_cohort_shards(out_dir: str, n_patients: int = 600, seed: int = 0, photos_per_patient: int = 1,
                         image_size: int = 112, samples_per_shard: int = 256) -> Path:
    """Write (or reuse) ``<out_dir>/cohort`` and ``<out_dir>/shards``; returns the shards' index.json."""
    from fahr.data.cohort_simulator import write_cohort

    out = Path(out_dir)
    params = {"n_patients": n_patients, "seed": seed, "photos_per_patient": photos_per_patient,
              "image_size": image_size, "samples_per_shard": samples_per_shard}
    done = out / "cohort_shards.json"
    index = out / "shards" / "index.json"
    if done.is_file() and json.loads(done.read_text()) == params and index.is_file():
        log.info("reusing the demo cohort shards in %s", out)
        return index
    cohort = out / "cohort"
    write_cohort(cohort, source="synthetic", n_patients=n_patients, seed=seed,
                 photos_per_patient=photos_per_patient, image_size=image_size)
    # dedup off: synthetic faces share one template, so perceptual hashes call ~20% of distinct
    # faces near-duplicates (measured: 56 of 300). Real cohorts keep it on (`fahr shards`).
    cohort_to_shards(cohort, out / "shards", out / "demo_deid.key", image_size, samples_per_shard, dedup=False)
    from fahr.utils.atomic import atomic_write_json

    atomic_write_json(done, params)
    return index


def cohort_to_shards(cohort_dir: Path, shards_dir: Path, key_file: Path, image_size: int,
                     samples_per_shard: int = 256, dedup: bool = True, detect: bool = False) -> dict[str, Any]:
    """``fahr shards source=cohort`` on a written cohort, keyed by ``key_file`` (made if absent).

    By default the photos are taken as already aligned (synthetic faces): no detection, a resize to
    ``image_size``; ``detect=True`` detects and aligns them as ``fahr predict`` does raw photos (for a
    backbone trained on such crops). Split by patient, stratified by event; returns the build summary.
    """
    from data_pipelines.build import build_shards
    from data_pipelines.options import AlignOptions, BuildOptions, DedupOptions, DeidOptions, SplitOptions
    from data_pipelines.sources import get_source
    from fahr.utils.atomic import atomic_write_text

    if not key_file.is_file():
        try:  # owner-only from creation; a key another process wrote first wins
            atomic_write_text(key_file, secrets.token_hex(32), permissions=0o600, overwrite=False)
        except FileExistsError:
            pass
    options = BuildOptions(split=SplitOptions(stratify="event"), deid=DeidOptions(enabled=True, key_file=str(key_file)),
                           dedup=DedupOptions(enabled=dedup), samples_per_shard=samples_per_shard,
                           align=AlignOptions(image_size=image_size, skip_detection=not detect))
    iter_records = get_source("cohort")
    result = build_shards("cohort", lambda: iter_records(str(cohort_dir)), shards_dir, options, inputs=(cohort_dir,))
    log.info("cohort %s: read %d photos, wrote %d, rejected %s", cohort_dir, result["read"], result["written"],
             result["rejected"])
    return result


def cohort_truth(out_dir: str) -> dict[str, Any]:
    """The true hazard ratios the demo cohort was simulated with."""
    return json.loads((Path(out_dir) / "cohort" / "true_hr.json").read_text())
