"""How photos become face crops: the options of :class:`fahr.faces.align.FaceAligner`, checked.

``fahr shards`` takes them as ``align.*`` and a fine-tuned model's card records them
(``preprocessing``), so ``fahr predict`` crops new photos the same way. No torch here: configs import
this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fahr.boundary import InputError

IMAGE_SIZE_RANGE = (16, 1024)  # align.image_size 100000 once allocated 22 GB per photo
MARGIN_RANGE = (0.0, 2.0)
MULTI_FACE = ("reject", "largest", "central")


@dataclass(unsafe_hash=True)
class AlignOptions:
    """``image_size``: side of the square crop (pixels); ``margin``: zoom-out around the face (0 = the
    5-point template); ``multi_face``: a photo with several faces is rejected, or its largest or most
    central face is taken; ``min_confidence``: the detector's least accepted score; ``skip_detection``:
    the inputs are already aligned crops (resized only)."""
    image_size: int = 112
    margin: float = 0.0
    multi_face: str = "reject"
    min_confidence: float = 0.95
    skip_detection: bool = False


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_align_options(align: AlignOptions, prefix: str = "align") -> None:
    """Raise :class:`InputError` naming ``<prefix>.<key>`` for an option out of its range."""
    size = align.image_size
    if not isinstance(size, int) or isinstance(size, bool) or not IMAGE_SIZE_RANGE[0] <= size <= IMAGE_SIZE_RANGE[1]:
        raise InputError(f"{prefix}.image_size must be an integer in [{IMAGE_SIZE_RANGE[0]}, {IMAGE_SIZE_RANGE[1]}] "
                         f"(pixels per side of the crop), got {size!r}")
    if not _is_number(align.margin) or not MARGIN_RANGE[0] <= align.margin <= MARGIN_RANGE[1]:
        raise InputError(f"{prefix}.margin must be a number in [{MARGIN_RANGE[0]:g}, {MARGIN_RANGE[1]:g}] "
                         f"(zoom-out around the face, e.g. 0.25), got {align.margin!r}")
    if align.multi_face not in MULTI_FACE:
        raise InputError(f"{prefix}.multi_face must be one of {', '.join(MULTI_FACE)}, got {align.multi_face!r}")
    if not _is_number(align.min_confidence) or not 0.0 <= align.min_confidence <= 1.0:
        raise InputError(f"{prefix}.min_confidence must be a number in [0, 1], got {align.min_confidence!r}")
    if not isinstance(align.skip_detection, bool):
        raise InputError(f"{prefix}.skip_detection must be true or false, got {align.skip_detection!r}")
