"""Facial regions of the aligned crop, placed from the alignment template's five landmarks.

Every aligned crop puts the eyes, nose tip and mouth corners at the template's points
(:func:`fahr.faces.align.template`), so one label map serves every photo of a model. Regions are
axis-aligned boxes sized by the inter-ocular distance ``d`` (pixels); they are disjoint (an earlier
region in :data:`REGIONS` wins where boxes would overlap) and do not cover the whole crop (hair,
ears and background are unlabelled, ``-1``).

======== ==================================================================================
region   box (x: horizontal, y: vertical, pixel indices; ``eye_y`` the mean eye height)
======== ==================================================================================
eyes     each eye +- 0.30 d horizontally, +- 0.20 d vertically
mouth    mouth corners +- 0.15 d horizontally, mouth height +- 0.20 d
nose     nose tip +- 0.25 d horizontally; from eye_y + 0.20 d to the nose tip + 0.15 d
cheeks   from the left eye - 0.45 d to the right eye + 0.45 d, between the eye and mouth boxes
forehead over the eyes' span +- 0.30 d, from eye_y - 1.1 d to eye_y - 0.20 d
chin     mouth corners +- 0.10 d, from the mouth box to 0.40 d below it
======== ==================================================================================
"""

from __future__ import annotations

import numpy as np

#: the regions, in the order labels are assigned (label = index)
REGIONS: tuple[str, ...] = ("eyes", "mouth", "nose", "cheeks", "forehead", "chin")


def _box(shape: tuple[int, int], x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
    """Boolean (H, W) mask of pixels whose index lies in [x0, x1] x [y0, y1]."""
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)


def region_boxes(points: np.ndarray, image_size: int) -> dict[str, np.ndarray]:
    """Region name -> boolean (S, S) mask (possibly overlapping) from the (5, 2) template points
    (left eye, right eye, nose tip, left and right mouth corner; pixel indices)."""
    points = np.asarray(points, dtype=np.float64)
    if points.shape != (5, 2):
        raise ValueError(f"need the (5, 2) template points, got {points.shape}")
    le, re_, nose, lm, rm = points
    d = float(np.linalg.norm(re_ - le))
    eye_y, mouth_y = (le[1] + re_[1]) / 2, (lm[1] + rm[1]) / 2
    shape = (image_size, image_size)
    eyes = (_box(shape, le[0] - 0.30 * d, le[0] + 0.30 * d, le[1] - 0.20 * d, le[1] + 0.20 * d)
            | _box(shape, re_[0] - 0.30 * d, re_[0] + 0.30 * d, re_[1] - 0.20 * d, re_[1] + 0.20 * d))
    return {
        "eyes": eyes,
        "mouth": _box(shape, lm[0] - 0.15 * d, rm[0] + 0.15 * d, mouth_y - 0.20 * d, mouth_y + 0.20 * d),
        "nose": _box(shape, nose[0] - 0.25 * d, nose[0] + 0.25 * d, eye_y + 0.20 * d, nose[1] + 0.15 * d),
        "cheeks": _box(shape, le[0] - 0.45 * d, re_[0] + 0.45 * d, eye_y + 0.20 * d, mouth_y - 0.20 * d),
        "forehead": _box(shape, le[0] - 0.30 * d, re_[0] + 0.30 * d, eye_y - 1.10 * d, eye_y - 0.20 * d),
        "chin": _box(shape, lm[0] - 0.10 * d, rm[0] + 0.10 * d, mouth_y + 0.20 * d, mouth_y + 0.60 * d),
    }


def region_labels(image_size: int, margin: float = 0.0) -> np.ndarray:
    """(S, S) int array: index into :data:`REGIONS` per pixel, -1 outside every region, for crops
    made with :func:`fahr.faces.align.template` ``(image_size, margin)``."""
    from fahr.faces.align import template

    boxes = region_boxes(template(image_size, margin), image_size)
    labels = np.full((image_size, image_size), -1, dtype=np.int64)
    for index in reversed(range(len(REGIONS))):  # earlier regions are written last, so they win
        labels[boxes[REGIONS[index]]] = index
    missing = [name for i, name in enumerate(REGIONS) if not (labels == i).any()]
    if missing:
        raise ValueError(f"regions {missing} are empty at image_size {image_size}, margin {margin}")
    return labels


def region_importance(attribution: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Importance of each region: (..., S, S) maps -> (..., len(REGIONS)), the mean |attribution| per
    pixel of the region divided by the mean over the whole crop (1: as important as the average
    pixel; an all-zero map gives zeros).

    A per-pixel mean, not a sum, so a region does not rank high for being large; a ratio, so maps of
    different scales (years, log-hazard, rollout weights) and photos are comparable."""
    a = np.abs(np.asarray(attribution, dtype=np.float64))
    if a.shape[-2:] != labels.shape:
        raise ValueError(f"attribution maps {a.shape[-2:]} do not match the region labels {labels.shape}")
    per_region = np.stack([a[..., labels == i].mean(-1) for i in range(len(REGIONS))], axis=-1)
    whole = a.mean(axis=(-2, -1))[..., None]
    return np.divide(per_region, whole, out=np.zeros_like(per_region), where=whole > 0)


def outside_importance(attribution: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The same ratio as :func:`region_importance` for the pixels outside every region (hair, ears,
    background, crop borders): (..., S, S) -> (...). Above 1: the map favours what is not the face."""
    a = np.abs(np.asarray(attribution, dtype=np.float64))
    whole = a.mean(axis=(-2, -1))
    outside = a[..., labels == -1].mean(-1)
    return np.divide(outside, whole, out=np.zeros_like(outside), where=whole > 0)
