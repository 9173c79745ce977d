"""What sources yield and pipeline stages pass along: a face photo record, or a counted rejection.

Label conventions (all sources): ``age`` in years (float, 0-120); ``sex`` 0 male / 1 female;
``race`` the UTKFace coding (0 White, 1 Black, 2 Asian, 3 Indian, 4 other). Cohort records add
``photo_date`` / ``birth_date`` / ``last_contact_date`` / ``death_date`` (``datetime.date``),
``followup_days`` (float, >= 0), ``event`` (0/1), ``diagnosis`` and whitelisted covariates; the
de-identification stage turns dates into days and patient ids into salted hashes before writing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fahr.boundary import InputError


@dataclass
class Record:
    """One photo of one person.

    Attributes:
        source_id: unique within the source and stable across runs (e.g. the path relative to the
            input directory); used for resumability and error messages, never written for cohorts.
        person_id: raw person or patient identifier (splits are by person; cohorts hash it).
        image: the image file's bytes, undecoded.
        labels: see the module docstring.
        landmarks: optional (K, 2) float pixel coordinates (x, y) in the raw image, e.g. FG-NET's 68 points.
    """

    source_id: str
    person_id: str
    image: bytes
    labels: dict[str, Any] = field(default_factory=dict)
    landmarks: np.ndarray | None = None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_labels(key: str, labels: dict[str, Any]) -> None:
    """The label conventions above, for the shard writer (``ShardWriter(check_labels=...)``); None
    means unknown. Raises :class:`InputError` naming the sample key and the label."""
    age, sex, health = labels.get("age"), labels.get("sex"), labels.get("health")
    if age is not None and not (_is_number(age) and age >= 0):
        raise InputError(f"labels for key {key!r}: age must be a non-negative number of years or null, got {age!r}")
    if sex is not None and (isinstance(sex, bool) or sex not in (0, 1)):
        raise InputError(f"labels for key {key!r}: sex must be 0 (male), 1 (female) or null, got {sex!r}")
    if health is not None and not (_is_number(health) and 0.0 <= health <= 1.0):
        raise InputError(f"labels for key {key!r}: health must be a number in [0, 1] or null, got {health!r}")
