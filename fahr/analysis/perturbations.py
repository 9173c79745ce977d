"""Graded perturbations of aligned face crops: the table :data:`PERTURBATIONS` and their functions.

Every perturbation is a pure function ``f(image, level, seed, points) -> image`` of one aligned crop
((S, S, 3) uint8 RGB), a level in the perturbation's own unit, a seed (only sensor noise draws
random numbers) and the crop's (5, 2) template landmarks (:func:`fahr.faces.align.template`;
coverings and make-up are placed with them). It never depends on other photos or on a batch, and the
first level of every entry is the identity (the crop is returned unchanged, bit for bit).

Pixels are rounded to the nearest integer and clipped to [0, 255] after each float operation.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from fahr.analysis.regions import region_boxes

#: ITU-R BT.601 luma weights (sum 1, so a grey pixel keeps its value)
LUMA = np.array([0.299, 0.587, 0.114])


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _affine(image: np.ndarray, inverse: tuple[float, ...]) -> np.ndarray:
    """Resample with PIL's output->input affine ``inverse`` (continuous coordinates), bilinear,
    pixels from outside the crop taken from its nearest edge (no black borders to react to)."""
    s = image.shape[0]
    pad = s // 2
    padded = Image.fromarray(np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge"))
    a, b, c, d, e, f = inverse
    # the same map in the padded image's coordinates
    shifted = (a, b, c + pad - a * pad - b * pad, d, e, f + pad - d * pad - e * pad)
    out = padded.transform(padded.size, Image.Transform.AFFINE, data=shifted, resample=Image.Resampling.BILINEAR)
    return np.asarray(out)[pad : pad + s, pad : pad + s].copy()


# ---------------------------------------------------------------- pose


def rotation(image: np.ndarray, degrees: float, seed: int, points: np.ndarray) -> np.ndarray:
    """In-plane rotation by ``degrees`` about the crop centre (edge pixels fill the corners)."""
    if degrees == 0:
        return image.copy()
    s = image.shape[0]
    t = np.deg2rad(degrees)
    c = s / 2.0
    cos, sin = np.cos(t), np.sin(t)
    # output (x, y) -> input: rotate back about the centre
    return _affine(image, (cos, -sin, c - cos * c + sin * c, sin, cos, c - sin * c - cos * c))


def yaw(image: np.ndarray, fraction: float, seed: int, points: np.ndarray) -> np.ndarray:
    """Yaw-like horizontal foreshortening: the right half of the face is compressed horizontally by
    ``fraction`` (0.2: to 80 % of its width) and the left half stretched to fill the crop, as when
    the head turns; heights are unchanged."""
    if fraction == 0:
        return image.copy()
    s = image.shape[0]
    c = s / 2.0
    xs = np.arange(s) + 0.5  # output pixel centres
    right = c * (1 - fraction)  # width the right half keeps; the left half gets the rest
    split = s - right  # where the face's midline lands
    src = np.where(xs < split, xs * c / split, c + (xs - split) * c / right)
    x0 = np.clip(np.floor(src - 0.5).astype(int), 0, s - 1)
    x1 = np.clip(x0 + 1, 0, s - 1)
    w = np.clip(src - 0.5 - np.floor(src - 0.5), 0, 1)[None, :, None]
    img = image.astype(np.float64)
    return _to_uint8(img[:, x0] * (1 - w) + img[:, x1] * w)


def off_centre(image: np.ndarray, fraction: float, seed: int, points: np.ndarray) -> np.ndarray:
    """An off-centre crop: the window moves right and down by ``fraction`` of the side (edge pixels
    fill what leaves the crop)."""
    shift = int(round(fraction * image.shape[0]))
    if shift == 0:
        return image.copy()
    padded = np.pad(image, ((0, shift), (0, shift), (0, 0)), mode="edge")
    return padded[shift:, shift:].copy()


# ---------------------------------------------------------------- lighting


def brightness(image: np.ndarray, factor: float, seed: int, points: np.ndarray) -> np.ndarray:
    """Every channel times ``factor`` (1: unchanged, 0.5: half the light)."""
    return image.copy() if factor == 1 else _to_uint8(image * float(factor))


def contrast(image: np.ndarray, factor: float, seed: int, points: np.ndarray) -> np.ndarray:
    """Deviations from the crop's mean luma times ``factor`` (1: unchanged)."""
    if factor == 1:
        return image.copy()
    mean = float((image.astype(np.float64) @ LUMA).mean())
    return _to_uint8(mean + (image - mean) * float(factor))


def gamma(image: np.ndarray, exponent: float, seed: int, points: np.ndarray) -> np.ndarray:
    """``255 * (x / 255) ** exponent`` (> 1 darkens the mid-tones, under-exposure-like)."""
    if exponent == 1:
        return image.copy()
    lut = _to_uint8(255.0 * (np.arange(256) / 255.0) ** float(exponent))
    return lut[image]


def colour_temperature(image: np.ndarray, shift: float, seed: int, points: np.ndarray) -> np.ndarray:
    """Warmer light: red times ``1 + shift``, blue times ``1 - shift``."""
    if shift == 0:
        return image.copy()
    return _to_uint8(image * np.array([1 + shift, 1.0, 1 - shift]))


def side_shadow(image: np.ndarray, depth: float, seed: int, points: np.ndarray) -> np.ndarray:
    """A shadow over the left side: light falls linearly from the centre to ``1 - depth`` at the
    left edge (the right half is unchanged)."""
    if depth == 0:
        return image.copy()
    s = image.shape[1]
    c = s / 2.0
    xs = np.arange(s) + 0.5
    light = 1 - depth * np.clip((c - xs) / c, 0, 1)
    return _to_uint8(image * light[None, :, None])


# ---------------------------------------------------------------- device and quality


def jpeg(image: np.ndarray, loss: float, seed: int, points: np.ndarray) -> np.ndarray:
    """JPEG round trip at quality ``100 - loss`` (PIL/libjpeg, 4:2:0); ``loss`` 0 is no re-encoding."""
    if loss == 0:
        return image.copy()
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=int(round(100 - loss)))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).copy()


def downscale(image: np.ndarray, factor: float, seed: int, points: np.ndarray) -> np.ndarray:
    """Down by ``factor`` (box-filtered) and back up (bilinear): a low-resolution camera."""
    if factor == 1:
        return image.copy()
    s = image.shape[0]
    small = max(1, int(round(s / float(factor))))
    im = Image.fromarray(image).resize((small, small), Image.Resampling.BOX)
    return np.asarray(im.resize((s, s), Image.Resampling.BILINEAR)).copy()


def blur(image: np.ndarray, sigma: float, seed: int, points: np.ndarray) -> np.ndarray:
    """Gaussian blur of standard deviation ``sigma`` pixels (defocus, motion-free)."""
    if sigma == 0:
        return image.copy()
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=float(sigma)))).copy()


def sensor_noise(image: np.ndarray, sd: float, seed: int, points: np.ndarray) -> np.ndarray:
    """Additive Gaussian noise of ``sd`` grey levels per pixel and channel, drawn from ``seed``
    (the same seed gives the same noise: a photo's result never depends on the others)."""
    if sd == 0:
        return image.copy()
    noise = np.random.default_rng(seed).normal(0.0, float(sd), image.shape)
    return _to_uint8(image + noise)


def greyscale(image: np.ndarray, strength: float, seed: int, points: np.ndarray) -> np.ndarray:
    """Blend towards the luma image (BT.601): 1 is a black-and-white photo. A grey image (R = G = B)
    is its own greyscale."""
    if strength == 0:
        return image.copy()
    grey = (image.astype(np.float64) @ LUMA)[..., None]
    return _to_uint8((1 - strength) * image + strength * grey)


# ---------------------------------------------------------------- coverings


#: colours of the coverings and make-up (RGB)
MASK_COLOUR = np.array([196.0, 214.0, 232.0])  # pale blue surgical mask
LENS_COLOUR = np.array([20.0, 20.0, 24.0])
LIP_COLOUR = np.array([170.0, 30.0, 60.0])
EYESHADOW_COLOUR = np.array([95.0, 60.0, 130.0])


def face_mask(image: np.ndarray, coverage: float, seed: int, points: np.ndarray) -> np.ndarray:
    """A lower-face mask: opaque from the bottom of the crop up to ``coverage`` of the way from the
    chin (0.6 d below the mouth) to the nose bridge (midway between the eyes and the nose tip),
    between the cheeks (the eyes' span +- 0.45 d). 1: mouth and nose covered."""
    if coverage == 0:
        return image.copy()
    le, re_, nose, lm, rm = np.asarray(points, dtype=np.float64)
    d = float(np.linalg.norm(re_ - le))
    chin = (lm[1] + rm[1]) / 2 + 0.6 * d
    bridge = ((le[1] + re_[1]) / 2 + nose[1]) / 2
    top = chin - coverage * (chin - bridge)
    s = image.shape[0]
    ys, xs = np.mgrid[0:s, 0:s]
    covered = (ys >= top) & (xs >= le[0] - 0.45 * d) & (xs <= re_[0] + 0.45 * d)
    out = image.copy()
    out[covered] = MASK_COLOUR.astype(np.uint8)
    return out


def sunglasses(image: np.ndarray, opacity: float, seed: int, points: np.ndarray) -> np.ndarray:
    """Dark elliptical lenses over both eyes (semi-axes 0.32 d and 0.22 d) with a bridge between
    them, blended with ``opacity`` (1: opaque)."""
    if opacity == 0:
        return image.copy()
    le, re_ = np.asarray(points, dtype=np.float64)[:2]
    d = float(np.linalg.norm(re_ - le))
    s = image.shape[0]
    ys, xs = np.mgrid[0:s, 0:s]
    lens = np.zeros((s, s), dtype=bool)
    for eye in (le, re_):
        lens |= ((xs - eye[0]) / (0.32 * d)) ** 2 + ((ys - eye[1]) / (0.22 * d)) ** 2 <= 1
    eye_y = (le[1] + re_[1]) / 2
    lens |= (xs >= le[0]) & (xs <= re_[0]) & (np.abs(ys - eye_y + 0.1 * d) <= 0.03 * d)
    return _blend(image, lens, LENS_COLOUR, opacity)


# ---------------------------------------------------------------- make-up


def _blend(image: np.ndarray, where: np.ndarray, colour: np.ndarray, strength: float) -> np.ndarray:
    out = image.astype(np.float64)
    out[where] = (1 - strength) * out[where] + strength * colour
    return _to_uint8(out)


def skin_smoothing(image: np.ndarray, strength: float, seed: int, points: np.ndarray) -> np.ndarray:
    """Foundation-like smoothing: forehead, cheeks, nose and chin blended with a Gaussian blur
    (sigma 2 px at 112 px, scaled with the crop) by ``strength``; eyes and mouth untouched."""
    if strength == 0:
        return image.copy()
    s = image.shape[0]
    boxes = region_boxes(points, s)
    skin = (boxes["forehead"] | boxes["cheeks"] | boxes["nose"] | boxes["chin"]) & ~boxes["eyes"] & ~boxes["mouth"]
    smooth = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=2.0 * s / 112))).astype(np.float64)
    out = image.astype(np.float64)
    out[skin] = (1 - strength) * out[skin] + strength * smooth[skin]
    return _to_uint8(out)


def lip_colour(image: np.ndarray, strength: float, seed: int, points: np.ndarray) -> np.ndarray:
    """Lipstick: the mouth region (:mod:`fahr.analysis.regions`) tinted towards :data:`LIP_COLOUR`."""
    if strength == 0:
        return image.copy()
    return _blend(image, region_boxes(points, image.shape[0])["mouth"], LIP_COLOUR, strength)


def eye_colour(image: np.ndarray, strength: float, seed: int, points: np.ndarray) -> np.ndarray:
    """Eye shadow: the eye regions tinted towards :data:`EYESHADOW_COLOUR`."""
    if strength == 0:
        return image.copy()
    return _blend(image, region_boxes(points, image.shape[0])["eyes"], EYESHADOW_COLOUR, strength)


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Perturbation:
    """One graded perturbation: its ``family``, function, ``levels`` (the first is the identity)
    and the ``unit`` of a level."""

    family: str
    function: Callable[[np.ndarray, float, int, np.ndarray], np.ndarray]
    levels: tuple[float, ...]
    unit: str


#: name -> perturbation; each has the identity and three graded severities
PERTURBATIONS: dict[str, Perturbation] = {
    "rotation": Perturbation("pose", rotation, (0, 5, 15, 30), "degrees"),
    "yaw": Perturbation("pose", yaw, (0, 0.15, 0.3, 0.45), "right-half compression"),
    "off_centre": Perturbation("pose", off_centre, (0, 0.05, 0.1, 0.2), "shift / side"),
    "brightness": Perturbation("lighting", brightness, (1, 0.75, 0.5, 0.3), "light factor"),
    "contrast": Perturbation("lighting", contrast, (1, 0.7, 0.45, 0.25), "contrast factor"),
    "gamma": Perturbation("lighting", gamma, (1, 1.5, 2.0, 3.0), "gamma"),
    "colour_temperature": Perturbation("lighting", colour_temperature, (0, 0.1, 0.2, 0.35), "red+/blue- fraction"),
    "side_shadow": Perturbation("lighting", side_shadow, (0, 0.3, 0.6, 0.85), "shadow depth"),
    "jpeg": Perturbation("device", jpeg, (0, 50, 80, 95), "100 - JPEG quality"),
    "downscale": Perturbation("device", downscale, (1, 2, 4, 8), "factor"),
    "blur": Perturbation("device", blur, (0, 1, 2, 4), "Gaussian sigma (crop pixels)"),
    "sensor_noise": Perturbation("device", sensor_noise, (0, 5, 12, 25), "noise SD (grey levels)"),
    "greyscale": Perturbation("device", greyscale, (0, 0.5, 0.75, 1.0), "blend to luma"),
    "face_mask": Perturbation("coverings", face_mask, (0, 0.4, 0.7, 1.0), "chin-to-nose coverage"),
    "sunglasses": Perturbation("coverings", sunglasses, (0, 0.5, 0.8, 1.0), "opacity"),
    "skin_smoothing": Perturbation("makeup", skin_smoothing, (0, 0.35, 0.7, 1.0), "blend to blur"),
    "lip_colour": Perturbation("makeup", lip_colour, (0, 0.2, 0.4, 0.6), "tint"),
    "eye_colour": Perturbation("makeup", eye_colour, (0, 0.2, 0.4, 0.6), "tint"),
}

#: family -> its perturbations, in table order
FAMILIES: dict[str, list[str]] = {}
for _name, _p in PERTURBATIONS.items():
    FAMILIES.setdefault(_p.family, []).append(_name)


def perturb(image: np.ndarray, name: str, level: float, seed: int, points: np.ndarray) -> np.ndarray:
    """Apply perturbation ``name`` at ``level`` to one (S, S, 3) uint8 crop; returns a new array."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"expected a square (S, S, 3) uint8 crop, got {image.dtype} {image.shape}")
    out = PERTURBATIONS[name].function(image, level, seed, points)
    assert out.shape == image.shape and out.dtype == np.uint8, name
    return out
