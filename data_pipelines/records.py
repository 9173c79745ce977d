"""What sources yield and pipeline stages pass along: a face photo record, or a counted rejection.

Label conventions (all sources): ``age`` in years (float, 0-120); ``sex`` 0 male / 1 female;
``race`` the UTKFace coding (0 White, 1 Black, 2 Asian, 3 Indian, 4 other). Cohort records add
``photo_date`` / ``birth_date`` / ``last_contact_date`` / ``death_date`` (``datetime.date``),
``followup_days`` (float, >= 0), ``event`` (0/1), ``diagnosis`` and whitelisted covariates; the
de-identification stage turns dates into days and patient ids into salted hashes before writing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


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


@dataclass(frozen=True)
class Rejection:
    """A record that will not be written, and why. ``reason`` is a stable short id that the summary
    counts (e.g. ``"image:unreadable"``, ``"face:none"``, ``"label:age"``); ``detail`` is for humans."""

    source_id: str
    reason: str
    detail: str = ""


class RejectedError(Exception):
    """Raised inside a stage for one record; the caller turns it into a :class:`Rejection`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
