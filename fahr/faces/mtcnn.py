"""Batched CPU MTCNN face detection with facenet-pytorch's P/R/O-Net weights.

MTCNN: Zhang, Zhang, Li, Qiao, "Joint Face Detection and Alignment Using Multitask Cascaded
Convolutional Networks", IEEE SPL 2016. :func:`detect` follows facenet-pytorch 2.6.0's
``models/utils/detect_face.py`` step for step (same pyramid, thresholds, NMS, box regression and
facenet's clip-then-stretch candidate crops); what differs is speed:

- the R-Net and O-Net candidate crops are cut and area-resampled by PIL (``BOX``, uint8) and sent
  through each network in one batch; facenet runs one ``interpolate(mode="area")`` per candidate
  on a float copy of the whole batch, which was ~30% of our detect+align time;
- the pyramid levels are PIL ``BOX`` resamples of the uint8 photo (no float copy of the batch);
- the networks run on channels-last tensors (2-4x faster on CPU, same outputs);
- optional stricter NMS between stages (``nms``) sends fewer duplicate boxes to R-Net and O-Net;
- the three networks run as plain functional calls on facenet's weights (read from the wheel's
  ``data/*.pt`` with ``weights_only``), and non-maximum suppression is :func:`nms` here: the detector
  imports neither facenet-pytorch's package nor torchvision, ~1 s of every detection worker's start,
  and skips the module-call overhead; outputs are bit-identical (tests/test_align.py);
- the NMS, the P-Net cells' boxes and the input scaling run in numpy on the same float32 values, op
  for op (torch's per-op overhead on a few boxes: 2-4% of a photo's detection); tests/test_align.py
  checks them bit for bit against torchvision's ``nms`` and facenet's ``generateBoundingBox``.

PIL's box filter averages exact pixel fractions where ``adaptive_avg_pool2d`` uses overlapping
integer bins, and rounds to uint8, so network inputs differ slightly from facenet's: with the same
settings, face/no-face decisions agree with ``MTCNN.detect`` on 121 of 123 FG-NET/UTKFace photos and
the top face's box and landmarks differ by a median 2-4% (at most ~11%) of the box width, i.e. a few
pixels: MTCNN's box regression is sensitive to its input crop (tests/test_align.py).

Coordinates are facenet's: boxes (x1, y1, x2, y2) and landmarks (x, y) in input pixels.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["MTCNNDetector", "nms", "batched_nms", "mtcnn_weights"]

_BOX = Image.Resampling.BOX


def _to_input(arrays: list[np.ndarray]) -> torch.Tensor:
    """Stack (h, w, 3) uint8 arrays into MTCNN input: (K, 3, h, w) float32 (v - 127.5) / 128,
    channels-last (2-4x faster convolutions and poolings on CPU)."""
    # exact in float32 (uint8 - 127.5, times 2^-7), so numpy gives facenet's values without torch's per-op cost
    x = (np.stack(arrays).astype(np.float32) - np.float32(127.5)) * np.float32(0.0078125)
    return torch.from_numpy(x).permute(0, 3, 1, 2)


def _crops(pils: list[Image.Image], inds, y0, x0, hgt, wid, out: int) -> torch.Tensor:
    """Area-resample K windows (photo ``inds[k]``, rows y0..y0+hgt-1, cols x0..x0+wid-1; (K,)
    int64, non-empty, inside the photo) to (K, 3, out, out) MTCNN input."""
    rows = zip(inds.tolist(), x0.tolist(), y0.tolist(), (x0 + wid).tolist(), (y0 + hgt).tolist())
    return _to_input([np.asarray(pils[n].resize((out, out), _BOX, box=(a, b, c, d))) for n, a, b, c, d in rows])


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """facenet's ``rerec``: grow (K, >=4) boxes to squares about their centres (in place)."""
    h = boxes[:, 3] - boxes[:, 1]
    w = boxes[:, 2] - boxes[:, 0]
    side = torch.maximum(w, h)
    boxes[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    boxes[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    boxes[:, 2:4] = boxes[:, :2] + side[:, None]
    return boxes


def _regress(boxes: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    """facenet's ``bbreg``: apply (K, 4) offsets (fractions of the +1 box size) to (K, >=4) boxes."""
    wh = (boxes[:, 2:4] - boxes[:, 0:2] + 1).repeat(1, 2)
    boxes[:, :4] = boxes[:, :4] + reg * wh
    return boxes


def _crop_windows(boxes: torch.Tensor, w: int, h: int):
    """facenet's ``pad`` + crop: truncate boxes to ints and clip them to the photo; returns a keep
    mask (non-empty windows) and (y0, x0, height, width) of the kept windows (facenet stretches
    the clipped window, it does not zero-pad)."""
    b = boxes[:, :4].trunc().long()
    x = b[:, 0].clamp(min=1) - 1
    y = b[:, 1].clamp(min=1) - 1
    ex = b[:, 2].clamp(max=w)
    ey = b[:, 3].clamp(max=h)
    keep = (ey > y) & (ex > x)
    return keep, y[keep], x[keep], (ey - y)[keep], (ex - x)[keep]


def _nms_min(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """facenet's ``nms_numpy(..., "Min")``: greedy NMS on intersection over the smaller area."""
    x1, y1, x2, y2 = boxes.T
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(scores, kind="stable")
    pick = []
    while order.size > 0:
        i, rest = order[-1], order[:-1]
        pick.append(i)
        iw = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        ih = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        order = rest[iw * ih / np.minimum(area[i], area[rest]) <= threshold]
    return np.array(pick, dtype=np.int64)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression, torchvision's ``ops.nms`` computed the same way (so the same
    indices, bit for bit): boxes (K, 4) x1 y1 x2 y2, visited in stable descending score order; a box
    is dropped when its IoU with a kept one, ``inter / (area_i + area_j - inter)`` with areas
    ``(x2 - x1) * (y2 - y1)`` in the boxes' dtype, exceeds ``iou_threshold`` (compared in float64,
    as torchvision's C++ does). Returns the kept indices (int64), highest score first."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    order = torch.sort(scores, stable=True, descending=True).indices
    # numpy on the same float32 values, op for op: the same roundings as torch's ops, without their
    # per-call overhead (a photo makes ~7 calls on ~10 boxes each)
    x1, y1, x2, y2 = boxes.numpy()[order.numpy()].T
    area = (x2 - x1) * (y2 - y1)
    w = np.maximum(np.minimum(x2[:, None], x2[None]) - np.maximum(x1[:, None], x1[None]), np.float32(0))
    h = np.maximum(np.minimum(y2[:, None], y2[None]) - np.maximum(y1[:, None], y1[None]), np.float32(0))
    inter = w * h
    # (K, K): box i (row) suppresses box j; only j after i in the order counts
    suppresses = (inter / (area[:, None] + area[None] - inter)).astype(np.float64) > iou_threshold
    alive = np.ones(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if alive[i]:
            keep.append(i)
            alive[i + 1:] &= ~suppresses[i, i + 1:]
    return order[torch.from_numpy(np.asarray(keep, dtype=np.int64))]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """:func:`nms` within each photo (``idxs``: (K,) photo index of each box), never across photos.
    Returns the kept indices, highest score first (stable). With one photo this is ``nms`` itself,
    and torchvision's ``batched_nms``; with several, each photo's result is the one it would get
    alone (torchvision shifts boxes by photo, which can round their coordinates)."""
    photos = np.unique(idxs.numpy()).tolist()
    if len(photos) <= 1:
        return nms(boxes, scores, iou_threshold)
    kept = torch.cat([torch.nonzero(idxs == j)[:, 0][nms(boxes[idxs == j], scores[idxs == j], iou_threshold)]
                      for j in photos])
    return kept[torch.sort(scores[kept], stable=True, descending=True).indices]


def mtcnn_weights(name: str) -> dict[str, torch.Tensor]:
    """facenet-pytorch's pretrained ``pnet`` / ``rnet`` / ``onet`` state dict, read from the installed
    wheel's ``data`` folder (weights only: no pickle) without importing the package."""
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("facenet-pytorch is not installed: the MTCNN weights ship in its wheel")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / f"{name}.pt"
    # contiguous, as facenet's modules hold them after load_state_dict: the R-/O-Net files store
    # transposed tensors, and a strided weight would take another kernel (other rounding)
    return {k: v.float().contiguous() for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}


def _conv(w: dict[str, torch.Tensor], x: torch.Tensor, n: int | str, pool: tuple[int, int] | None = None) -> torch.Tensor:
    """facenet's ``conv<n>`` -> ``prelu<n>`` (-> ``MaxPool2d(*pool, ceil_mode=True)``)."""
    x = F.prelu(F.conv2d(x, w[f"conv{n}.weight"], w[f"conv{n}.bias"]), w[f"prelu{n}.weight"])
    return F.max_pool2d(x, *pool, ceil_mode=True) if pool else x


def _dense(w: dict[str, torch.Tensor], x: torch.Tensor, name: str, prelu: str | None = None) -> torch.Tensor:
    """facenet's Linear ``name`` (-> PReLU ``prelu``)."""
    x = F.linear(x, w[f"{name}.weight"], w[f"{name}.bias"])
    return F.prelu(x, w[f"{prelu}.weight"]) if prelu else x


def _flatten(x: torch.Tensor) -> torch.Tensor:
    """facenet's flatten before the dense layers: (K, C, H, W) -> (K, W * H * C), W-major."""
    return x.permute(0, 3, 2, 1).contiguous().view(x.shape[0], -1)


def _pnet(w: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """facenet's ``PNet.forward``: (N, 3, H, W) -> box offsets (N, 4, h, w), face probabilities (N, 2, h, w)."""
    x = _conv(w, _conv(w, _conv(w, x, 1, (2, 2)), 2), 3)
    prob = F.softmax(F.conv2d(x, w["conv4_1.weight"], w["conv4_1.bias"]), dim=1)
    return F.conv2d(x, w["conv4_2.weight"], w["conv4_2.bias"]), prob


def _rnet(w: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """facenet's ``RNet.forward``: (K, 3, 24, 24) -> box offsets (K, 4), face probabilities (K, 2)."""
    x = _conv(w, _conv(w, _conv(w, x, 1, (3, 2)), 2, (3, 2)), 3)
    x = _dense(w, _flatten(x), "dense4", "prelu4")
    return _dense(w, x, "dense5_2"), F.softmax(_dense(w, x, "dense5_1"), dim=1)


def _onet(w: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """facenet's ``ONet.forward``: (K, 3, 48, 48) -> box offsets (K, 4), landmarks (K, 10), face
    probabilities (K, 2)."""
    x = _conv(w, _conv(w, _conv(w, _conv(w, x, 1, (3, 2)), 2, (3, 2)), 3, (2, 2)), 4)
    x = _dense(w, _flatten(x), "dense5", "prelu5")
    return _dense(w, x, "dense6_2"), _dense(w, x, "dense6_3"), F.softmax(_dense(w, x, "dense6_1"), dim=1)


class MTCNNDetector:
    """MTCNN with facenet-pytorch's pretrained weights (shipped in the wheel), CPU, batched.

    Args:
        thresholds: P-, R- and O-Net face-probability thresholds (facenet default 0.6, 0.7, 0.7).
        factor: image-pyramid scale step (facenet default 0.709).
        nms: IoU thresholds of the non-maximum suppression that merges P-Net boxes across pyramid
            levels and of the one after R-Net (facenet: 0.7, 0.7). Lower values send fewer
            overlapping boxes of the same face on to the next, costlier stage.
    """

    def __init__(self, thresholds=(0.6, 0.7, 0.7), factor: float = 0.709, nms=(0.7, 0.7)) -> None:
        self.thresholds = [float(t) for t in thresholds]
        self.factor = float(factor)
        self.nms = [float(t) for t in nms]
        weights = {name: mtcnn_weights(name) for name in ("pnet", "rnet", "onet")}
        self.pnet = lambda x: _pnet(weights["pnet"], x)
        self.rnet = lambda x: _rnet(weights["rnet"], x)
        self.onet = lambda x: _onet(weights["onet"], x)

    def scales(self, h: int, w: int, min_face: float) -> list[float]:
        """facenet's pyramid: scale 12 / min_face, times ``factor`` while the short side is >= 12 px."""
        m = 12.0 / min_face
        minl = min(h, w) * m
        out, s = [], m
        while minl >= 12:
            out.append(s)
            s *= self.factor
            minl *= self.factor
        return out

    @torch.inference_mode()
    def detect(self, images: np.ndarray, min_face: float = 20.0):
        """Detect faces in a batch of equal-size photos.

        Args:
            images: (N, H, W, 3) uint8 RGB.
            min_face: smallest face searched for, in pixels (facenet's ``min_face_size``).

        Returns:
            per photo a tuple (boxes (K, 4) float32 x1 y1 x2 y2, probs (K,) float32, landmarks
            (K, 5, 2) float32 x y: left eye, right eye, nose, left mouth, right mouth), highest
            probability first as facenet's ``MTCNN.detect``; K may be 0.
        """
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise ValueError(f"expected (N, H, W, 3) uint8 images, got {images.dtype} {images.shape}")
        n, h, w, _ = images.shape
        pils = [Image.fromarray(a) for a in images]
        empty = [(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))] * n

        # stage 1: P-Net over the pyramid (each level: the whole photo area-resampled)
        boxes, inds = [], []
        for s in self.scales(h, w, min_face):
            size = (int(w * s + 1), int(h * s + 1))
            reg, prob = self.pnet(_to_input([np.asarray(p.resize(size, _BOX)) for p in pils]))
            b, i = self._pnet_boxes(reg, prob[:, 1], s)
            keep = batched_nms(b[:, :4], b[:, 4], i, 0.5)
            boxes.append(b[keep])
            inds.append(i[keep])
        boxes, inds = torch.cat(boxes), torch.cat(inds)
        keep = batched_nms(boxes[:, :4], boxes[:, 4], inds, self.nms[0])
        boxes, inds = boxes[keep], inds[keep]
        if len(boxes) == 0:
            return empty
        # P-Net regression on the 12x12 window (facenet regresses with w, h = x2 - x1, no +1)
        wh = (boxes[:, 2:4] - boxes[:, 0:2]).repeat(1, 2)
        boxes = _square(torch.cat([boxes[:, :4] + boxes[:, 5:9] * wh, boxes[:, 4:5]], 1))

        # stage 2: R-Net on 24x24 crops
        keep, y0, x0, hh, ww = _crop_windows(boxes, w, h)
        boxes, inds = boxes[keep], inds[keep]
        if len(boxes) == 0:
            return empty
        reg, prob = self.rnet(_crops(pils, inds, y0, x0, hh, ww, 24))
        ok = prob[:, 1] > self.thresholds[1]
        boxes = torch.cat([boxes[ok, :4], prob[ok, 1:2]], 1)
        inds, reg = inds[ok], reg[ok]
        keep = batched_nms(boxes[:, :4], boxes[:, 4], inds, self.nms[1])
        boxes = _square(_regress(boxes[keep], reg[keep]))
        inds = inds[keep]

        # stage 3: O-Net on 48x48 crops: probability, box regression, landmarks
        keep, y0, x0, hh, ww = _crop_windows(boxes, w, h)
        boxes, inds = boxes[keep], inds[keep]
        if len(boxes) == 0:
            return empty
        reg, pts, prob = self.onet(_crops(pils, inds, y0, x0, hh, ww, 48))
        ok = prob[:, 1] > self.thresholds[2]
        boxes = torch.cat([boxes[ok, :4], prob[ok, 1:2]], 1)
        inds, reg, pts = inds[ok], reg[ok], pts[ok]
        size = boxes[:, 2:4] - boxes[:, 0:2] + 1  # (K, 2) w, h
        points = torch.stack([pts[:, :5], pts[:, 5:]], 2) * size[:, None, :] + boxes[:, None, 0:2] - 1
        boxes = _regress(boxes, reg)

        boxes, points, inds = boxes.numpy(), points.numpy(), inds.numpy()
        out = []
        for j in range(n):
            sel = np.flatnonzero(inds == j)
            sel = sel[_nms_min(boxes[sel, :4], boxes[sel, 4], 0.7)] if len(sel) else sel
            # facenet sorts by probability within the "Min" NMS, highest first
            out.append((boxes[sel, :4], boxes[sel, 4], points[sel]))
        return out

    def _pnet_boxes(self, reg: torch.Tensor, prob: torch.Tensor, scale: float):
        """facenet's ``generateBoundingBox``: P-Net cells above threshold -> (K, 9) boxes in photo
        pixels (x1, y1, x2, y2, score, 4 regression offsets) and (K,) photo indices."""
        # in numpy on the float32 values, op for op as facenet's torch code (tests/test_align.py checks
        # them bit for bit), without torch's per-op overhead on these few cells
        prob, reg = prob.numpy(), reg.numpy()
        mask = prob >= np.float32(self.thresholds[0])
        photo, y, x = np.nonzero(mask)
        cell = np.stack([x, y], 1).astype(reg.dtype)  # (x, y) cell index; stride 2, 12-px window
        q1 = np.floor((2 * cell + 1) / np.float32(scale))
        q2 = np.floor((2 * cell + 12) / np.float32(scale))
        offsets = reg.transpose(0, 2, 3, 1)[mask]
        boxes = np.concatenate([q1, q2, prob[mask][:, None], offsets], 1)
        return torch.from_numpy(boxes), torch.from_numpy(photo.astype(np.int64))
