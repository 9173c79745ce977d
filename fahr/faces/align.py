"""Face detection (MTCNN) and 5-point similarity alignment to the standard 112x112 ArcFace template.

Coordinates are (x, y) pixel *indices* (pixel centres at integers), as in insightface / OpenCV
``warpAffine``. ``AlignedFace.matrix`` maps source pixels to crop pixels.

Speed (CPU): one MTCNN (:mod:`fahr.faces.mtcnn`, facenet-pytorch's weights) per
:class:`FaceAligner`; photos are downscaled so that their longest side is at most
``detect_max_side`` before detection (landmarks are mapped back to source pixels), the detector's
minimum face size is a fraction of the detection image (fewer pyramid levels), candidate crops are
resampled in PIL and batched per stage, and slightly stricter NMS between stages cuts duplicate
candidates. The crop itself is warped from the full-resolution photo. See ``benchmarks/align.py``.

**A photo's result depends on that photo alone.** Each photo goes through the detector by itself
(its own pyramid, its own smallest searched face, its own candidates) and with one torch thread:
convolution results differ in their last bits with the batch size and with the thread count, and
those bits move landmarks, hence crops, hence predictions. So ``align([a, b])`` gives bit for bit
what ``align([a])`` and ``align([b])`` give, in any process, whatever ``torch.set_num_threads``
says elsewhere. The price is the speed of batching photos through the networks: measured
interleaved on 2 cores (FG-NET 61 raw photos / 200 UTKFace crops), 60 / 66 photos/s per photo on one
thread against 109 / 165 batched on two. Callers win it back by aligning photos in parallel
processes (``fahr shards processes=N``, ``fahr predict workers=N``).

A :class:`FaceAligner` is not thread-safe, and aligners in threads of one process would change
each other's torch thread count: use one per process.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image

from fahr.faces.mtcnn import MTCNNDetector
from fahr.faces.rejection import RejectedError

__all__ = [
    "ARCFACE_TEMPLATE_112",
    "AlignedFace",
    "FaceAligner",
    "apply",
    "eye_centres_68",
    "invert",
    "read_pts",
    "similarity_transform",
    "template",
    "warp",
]

# insightface arcface_dst: left eye, right eye, nose tip, left mouth corner, right mouth corner
# ("left" = on the image's left), for a 112x112 crop, pixel-index coordinates.
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


def template(image_size: int = 112, margin: float = 0.0) -> np.ndarray:
    """The 5-point template for an ``image_size`` square crop, (5, 2) float64.

    The 112 template is scaled in continuous coordinates (pixel edges); ``margin > 0`` zooms out by
    ``1 + margin`` about the crop centre (more context around a centred face), e.g. 0.25.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if margin <= -1:
        raise ValueError(f"margin must be > -1, got {margin}")
    t = (ARCFACE_TEMPLATE_112 + 0.5) * (image_size / 112.0) - 0.5
    c = (image_size - 1) / 2.0
    return c + (t - c) / (1.0 + margin)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) mapping ``src``
    points onto ``dst`` points (Umeyama 1991, closed form). Returns the (2, 3) matrix ``M`` with
    ``dst ~= M[:, :2] @ src + M[:, 2]``."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need two matching (N>=2, 2) point sets, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var_s = (s**2).sum() / len(src)
    if var_s <= 0:
        raise ValueError("source points are all identical")
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    e = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        e[1, 1] = -1.0
    r = u @ e @ vt
    scale = (sig * np.diag(e)).sum() / var_s
    a = scale * r
    t = mu_d - a @ mu_s
    return np.hstack([a, t[:, None]])


def invert(m: np.ndarray) -> np.ndarray:
    """Inverse of a (2, 3) affine matrix."""
    m = np.asarray(m, dtype=np.float64)
    a_inv = np.linalg.inv(m[:, :2])
    return np.hstack([a_inv, (-a_inv @ m[:, 2])[:, None]])


def apply(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a (2, 3) affine matrix to (N, 2) points."""
    points = np.asarray(points, dtype=np.float64)
    return points @ np.asarray(m)[:, :2].T + np.asarray(m)[:, 2]


def _as_pil(image: np.ndarray | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {a.dtype} {a.shape}")
    return Image.fromarray(np.ascontiguousarray(a))


def warp(image: np.ndarray | Image.Image, m: np.ndarray, size: int) -> np.ndarray:
    """Warp ``image`` with the source->crop matrix ``m`` (pixel-index coordinates) into a
    (size, size, 3) uint8 crop, bilinear; outside the image is black.

    When ``m`` shrinks by more than 2x the source is first box-reduced (anti-aliasing)."""
    im = _as_pil(image)
    m = np.asarray(m, dtype=np.float64)
    scale = math.sqrt(abs(np.linalg.det(m[:, :2])))
    k = int(1.0 / scale) if scale > 0 else 1
    if k >= 2:
        im = im.reduce(k)  # reduced pixel j averages source pixels jk .. jk+k-1: centre jk + (k-1)/2
        m = np.hstack([m[:, :2] * k, (m[:, 2] + m[:, :2] @ np.full(2, (k - 1) / 2.0))[:, None]])
    inv = invert(m)
    # PIL samples at continuous coordinates (pixel centres at +0.5): convert the index-space inverse
    a, t = inv[:, :2], inv[:, 2]
    t_c = t + 0.5 - a @ np.full(2, 0.5)
    data = (a[0, 0], a[0, 1], t_c[0], a[1, 0], a[1, 1], t_c[1])
    out = im.transform((size, size), Image.Transform.AFFINE, data=data, resample=Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.uint8)


@dataclass
class AlignedFace:
    """One aligned face: ``crop`` (size, size, 3) uint8 RGB; ``landmarks`` (5, 2) in source pixels
    (left eye, right eye, nose, left mouth, right mouth); ``matrix`` (2, 3) source -> crop;
    ``box`` (x1, y1, x2, y2) in source pixels; ``confidence`` the detector's probability
    (1.0 when detection was skipped)."""

    crop: np.ndarray
    landmarks: np.ndarray
    matrix: np.ndarray
    box: np.ndarray
    confidence: float


MultiFace = Literal["reject", "largest", "central"]

#: with ``skip_detection``, inputs must be aligned crops: at least this many pixels on each side ...
MIN_CROP_SIDE = 32
#: ... and at most this much longer on one side than on the other
MAX_CROP_ASPECT = 1.5


class FaceAligner:
    """Detect the face in each photo with MTCNN (built once) and align it to the 5-point template.

    Args:
        image_size: side of the output crops.
        margin: template zoom-out (see :func:`template`).
        multi_face: when several faces pass the confidence and size checks: ``"reject"``
            (``face:multiple``), ``"largest"`` (largest box) or ``"central"`` (box centre nearest
            the image centre).
        min_confidence: the chosen face's MTCNN probability must reach this (``face:low_confidence``).
        min_face_size: minimum face size (mean of box width and height) in source pixels, or a
            fraction of the photo's shorter side if < 1; smaller confident faces are rejected
            (``face:too_small``) and do not count as extra faces for ``multi_face``.
        detect_min_face: smallest face the detector searches for, as a fraction of the detection
            image's shorter side (at least 12 detection pixels). Larger = faster; faces much
            smaller than this are usually not found at all (``face:none``).
        detect_max_side: photos whose longest side is larger are downscaled to it for detection
            (landmarks are mapped back; the crop is warped from the full-resolution photo).
        detect_pad: pad each side of the detection image by this fraction of its longest side
            (black) before detection, so faces that fill or overflow the frame (tight crops such as
            UTKFace; close-up photos) are detected whole instead of getting frame-clipped
            landmarks. 0 is faster (~1.3x on FG-NET) for photos with room around the face.
        skip_detection: inputs are already aligned crops (e.g. UTKFace 200x200): resize only. A
            photo under :data:`MIN_CROP_SIDE` pixels (``face:too_small``) or more than
            :data:`MAX_CROP_ASPECT` times longer on one side (``face:not_aligned``) is rejected.
        scale_factor: MTCNN image-pyramid factor (facenet's 0.709; 0.5 is faster but loses faces
            whose size falls between two levels, e.g. one FG-NET photo).
        thresholds: MTCNN P/R/O-net thresholds.
        nms: IoU thresholds of the detector's cross-level and post-R-Net NMS (see
            :class:`~fahr.faces.mtcnn.MTCNNDetector`).
        num_threads: if given, ``torch.set_num_threads`` (process-wide) at construction.
        device: torch device for the detector (CPU only: the batched MTCNN crops with PIL).
    """

    def __init__(
        self,
        image_size: int = 112,
        margin: float = 0.0,
        multi_face: MultiFace = "reject",
        min_confidence: float = 0.95,
        min_face_size: float = 32,
        detect_min_face: float = 0.2,
        detect_max_side: int = 224,
        detect_pad: float = 0.2,
        skip_detection: bool = False,
        scale_factor: float = 0.709,
        thresholds: Sequence[float] = (0.6, 0.7, 0.7),
        nms: Sequence[float] = (0.6, 0.6),
        num_threads: int | None = None,
        device: str = "cpu",
    ) -> None:
        if multi_face not in ("reject", "largest", "central"):
            raise ValueError(f"multi_face must be 'reject', 'largest' or 'central', got {multi_face!r}")
        if not 0 < scale_factor < 1:
            raise ValueError(f"scale_factor must be in (0, 1), got {scale_factor}")
        if detect_max_side < 24 or min_face_size <= 0:
            raise ValueError("detect_max_side >= 24 and min_face_size > 0 required")
        self.image_size = int(image_size)
        self.margin = float(margin)
        self.multi_face = multi_face
        self.min_confidence = float(min_confidence)
        self.min_face_size = float(min_face_size)
        self.detect_min_face = float(detect_min_face)
        self.detect_max_side = int(detect_max_side)
        self.detect_pad = float(detect_pad)
        self.skip_detection = bool(skip_detection)
        self.scale_factor = float(scale_factor)
        self.thresholds = [float(t) for t in thresholds]
        self.device = torch.device(device)
        self.template = template(self.image_size, self.margin)
        if num_threads:
            torch.set_num_threads(int(num_threads))
        self._detector = None
        if not self.skip_detection:
            if self.device.type != "cpu":
                raise ValueError(f"the batched MTCNN runs on CPU only, got device {device!r}")
            self._detector = MTCNNDetector(thresholds=self.thresholds, factor=self.scale_factor, nms=nms)

    # -- public ---------------------------------------------------------------------------------
    def align(self, images: Sequence[np.ndarray]) -> list[AlignedFace | RejectedError]:
        """Align each (H, W, 3) uint8 RGB photo; one result per input, in order. Each result depends
        on its photo only (see the module docstring)."""
        if self.skip_detection:
            return [self._resize_only(im) for im in images]
        with _one_torch_thread():
            return [self._align_one_photo(im) for im in images]

    def align_one(self, image: np.ndarray) -> AlignedFace:
        """Align one photo; raises :class:`RejectedError`."""
        (res,) = self.align([image])
        if isinstance(res, RejectedError):
            raise res
        return res

    # -- internals ------------------------------------------------------------------------------
    def _min_face_px(self, h: int, w: int) -> float:
        return self.min_face_size * min(h, w) if self.min_face_size < 1 else self.min_face_size

    def _resize_only(self, image: np.ndarray) -> AlignedFace | RejectedError:
        im = _as_pil(image)
        w, h = im.size
        # an aligned crop is square-ish and big enough to hold a face: anything else resized to the
        # model's input would give a confident-looking prediction from a few pixels or a whole scene
        if min(w, h) < MIN_CROP_SIDE:
            return RejectedError("face:too_small", f"{w}x{h} is smaller than an aligned crop ({MIN_CROP_SIDE} px)")
        if max(w, h) > MAX_CROP_ASPECT * min(w, h):
            return RejectedError("face:not_aligned", f"{w}x{h} is not a square-ish aligned face crop")
        n = self.image_size
        crop = np.asarray(im.resize((n, n), Image.Resampling.BILINEAR), dtype=np.uint8)
        sx, sy = n / w, n / h  # continuous-coordinate scale; index coords: crop = s*(src+0.5)-0.5
        m = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5]])
        return AlignedFace(crop=crop, landmarks=apply(invert(m), self.template), matrix=m,
                           box=np.array([0.0, 0.0, w, h]), confidence=1.0)

    def _align_one_photo(self, image: np.ndarray) -> AlignedFace | RejectedError:
        im = _as_pil(image)
        if min(im.size) < 24:
            return RejectedError("face:too_small", f"image {im.size[0]}x{im.size[1]} is too small to search")
        small, scale = self._detection_image(im)
        # the smallest searched face, in detection pixels: a fraction of this photo's own short side
        min_face = max(12.0, self.detect_min_face * min(small.shape[:2]))
        ((boxes, probs, points),) = self._detector.detect(small[None], min_face)
        try:
            return self._choose_and_warp(im, boxes, probs, points, scale)
        except RejectedError as e:
            return e

    def _detection_image(self, im: Image.Image) -> tuple[np.ndarray, tuple[float, float, int]]:
        """The photo as the detector sees it, (h, w, 3) uint8: downscaled to ``detect_max_side`` and
        padded by ``detect_pad``; and (x scale, y scale, pad) to map detections back."""
        w, h = im.size
        s = min(1.0, self.detect_max_side / max(w, h))
        if s < 1.0:
            dw, dh = max(1, round(w * s)), max(1, round(h * s))
            im = im.resize((dw, dh), Image.Resampling.BOX, reducing_gap=1.0)  # area average, as MTCNN
        a = np.asarray(im, dtype=np.uint8)
        pad = int(round(self.detect_pad * max(a.shape[:2])))
        if pad > 0:
            a = np.pad(a, ((pad, pad), (pad, pad), (0, 0)))
        return a, (im.size[0] / w, im.size[1] / h, pad)

    def _choose_and_warp(self, im: Image.Image, boxes, probs, points, scale) -> AlignedFace:
        if len(boxes) == 0:
            raise RejectedError("face:none", "no face detected")
        boxes, probs, points = (np.asarray(v, dtype=np.float64) for v in (boxes, probs, points))
        # detection pixels -> source pixels (index coordinates; resize maps pixel edges linearly)
        sx, sy, pad = scale
        f = np.array([sx, sy])
        boxes = (boxes - pad) / np.tile(f, 2)
        points = (points - pad + 0.5) / f - 0.5
        w, h = im.size
        confident = probs >= self.min_confidence
        if not confident.any():
            raise RejectedError("face:low_confidence", f"best face probability {probs.max():.3f} < {self.min_confidence}")
        sizes = ((boxes[:, 2] - boxes[:, 0]) + (boxes[:, 3] - boxes[:, 1])) / 2.0
        min_px = self._min_face_px(h, w)
        ok = confident & (sizes >= min_px)
        if not ok.any():
            raise RejectedError("face:too_small", f"largest confident face {sizes[confident].max():.0f} px < {min_px:.0f} px")
        idx = np.flatnonzero(ok)
        if len(idx) > 1:
            if self.multi_face == "reject":
                raise RejectedError("face:multiple", f"{len(idx)} faces")
            if self.multi_face == "largest":
                idx = idx[[int(np.argmax(sizes[idx]))]]
            else:
                centres = (boxes[idx, :2] + boxes[idx, 2:]) / 2.0
                d = np.linalg.norm(centres - np.array([(w - 1) / 2.0, (h - 1) / 2.0]), axis=1)
                idx = idx[[int(np.argmin(d))]]
        k = int(idx[0])
        lm = points[k]
        m = similarity_transform(lm, self.template)
        crop = warp(im, m, self.image_size)
        return AlignedFace(crop=crop, landmarks=lm, matrix=m, box=boxes[k], confidence=float(probs[k]))


@contextmanager
def _one_torch_thread():
    """Run the detector on one torch thread (restored afterwards): its results then do not depend on
    how many threads the process uses, so every worker layout gives the same crops."""
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


# -- FG-NET 68-point landmarks ---------------------------------------------------------------------
def read_pts(path_or_text: str | os.PathLike) -> np.ndarray:
    """Parse an ibug/FG-NET ``.pts`` file (path or its text) into (n_points, 2) float64 (x, y)."""
    text = str(path_or_text)
    if isinstance(path_or_text, os.PathLike) or ("{" not in text and Path(text).is_file()):
        text = Path(path_or_text).read_text(encoding="utf-8", errors="replace")
    n = None
    for line in text.splitlines():
        if line.strip().lower().startswith("n_points"):
            n = int(line.split(":")[1])
    try:
        body = text[text.index("{") + 1 : text.index("}")]
    except ValueError as e:
        raise ValueError("not a .pts file: no { ... } block") from e
    pts = np.array([[float(v) for v in line.split()] for line in body.splitlines() if line.strip()], dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or (n is not None and len(pts) != n):
        raise ValueError(f"bad .pts data: shape {pts.shape}, n_points {n}")
    return pts


def eye_centres_68(points: np.ndarray, scheme: Literal["fgnet", "ibug"] = "fgnet") -> np.ndarray:
    """Eye centres (2, 2) from 68-point landmarks, ordered image-left eye first.

    ``scheme="fgnet"`` (FG-NET's own 68-point markup, as in its ``points/*.pts``): eye contours are
    points 27-30 and 32-35 (0-based; 31 and 36 are the pupils), the centre is the contour mean.
    ``scheme="ibug"`` (iBUG 300-W / dlib markup): means of points 36-41 and 42-47.
    The two markups differ: iBUG's 36-47 are not the eyes in FG-NET files.
    """
    points = np.asarray(points, dtype=np.float64)
    if points.shape != (68, 2):
        raise ValueError(f"expected (68, 2) landmarks, got {points.shape}")
    if scheme == "fgnet":
        eyes = np.stack([points[27:31].mean(0), points[32:36].mean(0)])
    elif scheme == "ibug":
        eyes = np.stack([points[36:42].mean(0), points[42:48].mean(0)])
    else:
        raise ValueError(f"scheme must be 'fgnet' or 'ibug', got {scheme!r}")
    return eyes[np.argsort(eyes[:, 0])]
