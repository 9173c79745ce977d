"""SYNTHETIC procedural faces: the project's embedded default data (no real person is depicted).

Every image is drawn from a few numbers in :class:`SyntheticFaceSpec`; nothing here is a photograph,
and every label dict carries ``"synthetic": True`` so synthetic samples can never be mistaken for
real data downstream.

Layout follows a 5-point-aligned 112x112 face crop: eyes at ~0.385 of the height, nose tip at ~0.56,
mouth at ~0.72, the face oval filling most of the frame.

What the pixels carry (so models trained on them have something to learn):

* age (years, 18-90): forehead, frown and crow's-feet lines whose number and contrast grow with age,
  nasolabial folds, hair greying (and receding hairlines in balding-prone men), age spots, uneven
  pigmentation and coarser skin grain, jowls, drooping eyelids and mouth corners, thinner lips.
* health (hidden factor in [0, 1], 1 = healthy), more subtly: pallor (less saturated, duller skin and
  lips), hollow cheeks, dark under-eye circles, and rosy cheeks when healthy.
* sex (0 male, 1 female): face width and jaw, brow thickness, hair length, lip fullness, stubble.

Nuisance factors (skin tone, geometry, hair style/colour, eye colour, lighting, exposure, colour
temperature, background, glasses, shift/scale/yaw jitter, sensor noise) vary independently. There is
no in-plane roll: 5-point alignment removes it from real crops too.

Rendering is a pure function of the spec (its ``texture_seed`` drives the random texture), and
``sample_spec(index, seed)`` depends only on ``(seed, index)``, so any sample can be regenerated alone.
Images are byte-identical for a given numpy build and CPU; float32 transcendental functions may
differ by an ulp elsewhere, so compare across machines with a tolerance, not by hash.

Shards of synthetic faces: :mod:`fahr.data.synthetic_shards` (which feeds the shard writer; this
module only draws faces).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

#: Bump whenever rendering or sampling changes, so cached shards are regenerated.
GENERATOR_VERSION = "1"

AGE_MIN, AGE_MAX = 18.0, 90.0

_SKIN_PALETTE = np.array(
    [[243, 211, 186], [226, 178, 146], [200, 140, 104], [150, 96, 68], [98, 64, 46]], dtype=np.float32
)
_HAIR_PALETTE = np.array(
    [[28, 24, 22], [62, 44, 32], [104, 72, 46], [196, 160, 104], [148, 72, 38]], dtype=np.float32
)
_EYE_PALETTE = np.array([[70, 45, 28], [40, 28, 20], [70, 110, 150], [90, 110, 70]], dtype=np.float32)
_GREY_HAIR = np.array([218, 218, 214], dtype=np.float32)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

HAIR_STYLES = ("short", "medium", "long", "balding")


@dataclass(frozen=True)
class SyntheticFaceSpec:
    """All parameters of one synthetic face. Geometry is in units of the image side (0-1).

    Target factors: ``age`` (years, 18-90), ``sex`` (0 male, 1 female), ``health`` ([0, 1], 1 = healthy).
    The remaining fields are nuisance factors with no relation to the targets except where noted
    (hair style and stubble depend on sex; balding acts with age).
    """

    age: float
    sex: int
    health: float
    skin_tone: float = 0.3  # 0 = lightest, 1 = darkest palette entry
    face_width: float = 1.0  # multiplier on the face half-width (~0.34)
    face_length: float = 1.0  # multiplier on the face half-height (~0.44)
    eye_spacing: float = 1.0  # multiplier on the eye centre offset (~0.155)
    mouth_width: float = 1.0
    nose_length: float = 1.0
    hair_style: int = 0  # index into HAIR_STYLES
    hair_colour: int = 1  # index into the hair palette (black, dark brown, brown, blond, red)
    grey_offset: float = 0.0  # years: individual earlier (+) / later (-) greying
    balding: float = 0.0  # [0, 1]: hairline recession with age (only style "balding")
    stubble: float = 0.0  # [0, 1]
    eye_colour: int = 0
    gaze: float = 0.0  # iris offset, image fraction
    glasses: bool = False
    light_azimuth: float = 0.0  # radians, direction the light comes from in the image plane
    light_strength: float = 0.4  # [0, 1]: 0 = flat lighting
    exposure: float = 1.0
    colour_temp: float = 0.0  # -1 cool ... +1 warm
    background: tuple[float, float, float] = (128.0, 128.0, 128.0)  # RGB 0-255
    shift_x: float = 0.0  # image fraction
    shift_y: float = 0.0
    scale: float = 1.0
    yaw: float = 0.0  # [-1, 1]: inner features shift sideways
    texture_seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.age) and AGE_MIN <= self.age <= AGE_MAX):
            raise ValueError(f"SyntheticFaceSpec.age must be in [{AGE_MIN}, {AGE_MAX}] years, got {self.age}")
        if self.sex not in (0, 1):
            raise ValueError(f"SyntheticFaceSpec.sex must be 0 (male) or 1 (female), got {self.sex!r}")
        if not (math.isfinite(self.health) and 0.0 <= self.health <= 1.0):
            raise ValueError(f"SyntheticFaceSpec.health must be in [0, 1], got {self.health}")
        if not 0 <= self.hair_style < len(HAIR_STYLES):
            raise ValueError(f"SyntheticFaceSpec.hair_style must be in [0, {len(HAIR_STYLES)}), got {self.hair_style}")


def _pick(probs: tuple[float, ...], u: float) -> int:
    """Index drawn from the categorical ``probs`` with the uniform number ``u``."""
    acc = 0.0
    for i, p in enumerate(probs):
        acc += p
        if u < acc:
            return i
    return len(probs) - 1


_STYLE_P = {0: (0.55, 0.2, 0.05, 0.2), 1: (0.15, 0.35, 0.5, 0.0)}  # by sex: short, medium, long, balding
_HAIR_COLOUR_P = (0.3, 0.3, 0.2, 0.12, 0.08)


def sample_spec(index: int, seed: int) -> SyntheticFaceSpec:
    """Draw the spec of sample ``index`` for dataset ``seed``; depends only on ``(seed, index)``.

    age ~ Uniform(18, 90) years; sex ~ Bernoulli(0.5); health ~ Beta(5 - 3 t, 2) with
    t = (age - 18) / 72, i.e. mean 0.71 at 18 falling to 0.5 at 90 (mild negative correlation).
    Nuisance factors are independent of these, except hair style and stubble (by sex).
    """
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be non-negative, got index={index}, seed={seed}")
    rng = np.random.default_rng([int(seed), int(index)])
    u = rng.random(24).tolist()  # one bulk draw: per-call overhead dominates here
    z = rng.standard_normal(3).tolist()
    age = AGE_MIN + (AGE_MAX - AGE_MIN) * u[0]
    sex = int(u[1] < 0.5)
    t = (age - AGE_MIN) / (AGE_MAX - AGE_MIN)
    health = float(rng.beta(5.0 - 3.0 * t, 2.0))
    hair_style = _pick(_STYLE_P[sex], u[2])
    return SyntheticFaceSpec(
        age=age,
        sex=sex,
        health=health,
        skin_tone=float(rng.beta(1.3, 1.6)),
        face_width=(0.93 + 0.13 * u[3]) * (0.94 if sex else 1.0),
        face_length=0.96 + 0.08 * u[4],
        eye_spacing=0.92 + 0.16 * u[5],
        mouth_width=0.85 + 0.3 * u[6],
        nose_length=0.85 + 0.3 * u[7],
        hair_style=hair_style,
        hair_colour=_pick(_HAIR_COLOUR_P, u[8]),
        grey_offset=7.0 * z[0],
        balding=0.3 + 0.7 * u[9] if HAIR_STYLES[hair_style] == "balding" else 0.0,
        stubble=0.2 + 0.8 * u[10] if (not sex and u[11] < 0.4) else 0.0,
        eye_colour=min(int(u[12] * len(_EYE_PALETTE)), len(_EYE_PALETTE) - 1),
        gaze=-0.008 + 0.016 * u[13],
        glasses=u[14] < 0.1,
        light_azimuth=math.pi * (2.0 * u[15] - 1.0),
        light_strength=0.1 + 0.5 * u[16],
        exposure=0.85 + 0.27 * u[17],
        colour_temp=2.0 * u[18] - 1.0,
        background=(30.0 + 200.0 * u[19], 30.0 + 200.0 * u[20], 30.0 + 200.0 * u[21]),
        shift_x=0.012 * z[1],
        shift_y=0.012 * z[2],
        scale=0.96 + 0.08 * u[22],
        yaw=2.0 * u[23] - 1.0,
        texture_seed=int(rng.integers(0, 2**31 - 1)),
    )


@functools.lru_cache(maxsize=8)
def _pixel_centres(size: int) -> np.ndarray:
    """(size,) float32 pixel-centre coordinates in image fractions."""
    return (np.arange(size, dtype=np.float32) + 0.5) / size


@functools.lru_cache(maxsize=8)
def _noise_bank(size: int) -> np.ndarray:
    """(2 size, 2 size) float32 standard-normal field; per-image noise is a random window of it.

    Drawing fresh normals per image would cost more than a third of the rendering, and a fixed bank
    keeps rendering a pure function of the spec.
    """
    return np.random.default_rng(20240611).standard_normal((2 * size, 2 * size), dtype=np.float32)


# Rendering works on tiny arrays, where numpy's per-call overhead dominates: the helpers below keep
# the number of calls low (np.clip's Python wrapper alone costs more than the arithmetic here).
def _clip01(x: np.ndarray) -> np.ndarray:
    return np.minimum(np.maximum(x, 0.0), 1.0)


def _bump2(d2: np.ndarray, r) -> np.ndarray:
    """Smooth bump ``(1 - d2 / r^2)^2`` of a squared distance, 0 beyond ``r`` (a cheap Gaussian stand-in)."""
    q = np.maximum(1.0 - d2 * (1.0 / (r * r)), 0.0)
    return q * q


def _bump(d: np.ndarray, r: float) -> np.ndarray:
    """:func:`_bump2` of a signed distance ``d``."""
    return _bump2(d * d, r)


def _soft_ellipse(du: np.ndarray, dv: np.ndarray, rx: float, ry: float, aa: float) -> np.ndarray:
    """Anti-aliased coverage of an axis-aligned ellipse; ``du``, ``dv`` are offsets from its centre.

    Uses the first-order distance ``(q - 1) * min(rx, ry) / 2`` with ``q`` the squared normalised
    radius: exact along the minor axis, slightly crisper towards the ends of elongated ellipses.
    """
    q = np.square(du * (1.0 / rx)) + np.square(dv * (1.0 / ry))
    k = 0.5 * min(rx, ry) / aa
    return _clip01((0.5 + k) - q * k)


def _lerp(a, b, t):
    return a + (b - a) * t


def _c3(rgb) -> np.ndarray:
    """A colour as a (3, 1, 1) float32 array, broadcastable over a planar (3, h, w) patch."""
    return np.asarray(rgb, dtype=np.float32).reshape(3, 1, 1)


_BLUSH = _c3([214, 92, 96])
_SCLERA = _c3([236, 232, 224])
_PUPIL = _c3([12, 10, 10])
_LID = _c3([40, 30, 28])
_FRAME = _c3([30, 30, 34])
_SPOT_TINT = _c3([0.62, 0.5, 0.4])
_CIRCLE_TINT = _c3([0.55, 0.45, 0.52])
_FULL = slice(None)


def _blend(img: np.ndarray, rs: slice, cs: slice, alpha: np.ndarray, colour: np.ndarray) -> None:
    """Alpha-composite ``colour`` (3, 1, 1) over ``img[:, rs, cs]`` with coverage ``alpha`` (h, w)."""
    patch = img[:, rs, cs]
    patch += (colour - patch) * alpha


def render_face(spec: SyntheticFaceSpec, size: int = 112) -> np.ndarray:
    """Render ``spec`` as a (size, size, 3) uint8 RGB SYNTHETIC face image.

    A pure function of ``spec`` (deterministic). Roughly aligned like a 5-point-aligned crop:
    eyes at ~0.385 of the height, nose tip ~0.56, mouth ~0.72. Features are evaluated in the "face
    frame" (upright, centred, image fractions); shift and scale map it to pixels. Opaque parts are
    alpha-composited onto a planar canvas; shading (wrinkles, hollows, blotches, hair strands)
    accumulates in a darkening map applied once with the lighting.
    """
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    rng = np.random.default_rng(spec.texture_seed)
    R = rng.random(64, dtype=np.float32)  # uniform texture draws, sliced below
    r = R.tolist()
    t = (spec.age - AGE_MIN) / (AGE_MAX - AGE_MIN)  # 0 at 18 years, 1 at 90
    h = spec.health
    female = spec.sex == 1

    # ---- colours (float32 RGB 0-255) ---------------------------------------------------------
    k = spec.skin_tone * (len(_SKIN_PALETTE) - 1)
    i0 = min(int(k), len(_SKIN_PALETTE) - 2)
    skin = _lerp(_SKIN_PALETTE[i0], _SKIN_PALETTE[i0 + 1], k - i0)
    luma = float(skin @ _LUMA)
    # pallor: desaturated and duller at low health; slightly sallower with age
    skin = (luma + (skin - luma) * (0.45 + 0.55 * h)) * ((0.92 + 0.08 * h) * (1.0 - 0.04 * t))
    grey = 1.0 / (1.0 + math.exp(-(spec.age + spec.grey_offset - 50.0) / 6.0))
    hair = _lerp(_HAIR_PALETTE[spec.hair_colour], _GREY_HAIR, grey)
    brow = _lerp(_HAIR_PALETTE[spec.hair_colour], _GREY_HAIR, 0.8 * grey) * 0.85
    lip_base = np.array([190, 84, 90] if female else [168, 96, 92], dtype=np.float32)
    lip = _lerp(skin, lip_base * (0.75 + 0.25 * skin / 255.0), 0.15 + 0.45 * h - 0.1 * t)
    skin3, hair3, lip3 = skin.reshape(3, 1, 1), hair.reshape(3, 1, 1), lip.reshape(3, 1, 1)

    # ---- canvas and coordinates --------------------------------------------------------------
    n = size
    xs = _pixel_centres(n)
    sc, sx, sy = spec.scale, spec.shift_x, spec.shift_y
    U = ((xs - (0.5 + sx)) * (1.0 / sc) + 0.5)[None, :]  # (1, n) face-frame u of each column
    V = ((xs - (0.5 + sy)) * (1.0 / sc) + 0.5)[:, None]  # (n, 1) face-frame v of each row
    aa = 1.3 / (n * sc)  # anti-aliasing edge width: 1.3 px in face-frame units
    thin = max(0.0085, aa * 0.8)  # support half-width of fine lines: about one pixel at 112 px

    def box(u0: float, u1: float, v0: float, v1: float) -> tuple[slice, slice]:
        """(row, col) pixel slices covering the face-frame rectangle [u0, u1] x [v0, v1], 1 px margin."""
        c0 = math.floor(((u0 - 0.5) * sc + 0.5 + sx) * n) - 1
        c1 = math.ceil(((u1 - 0.5) * sc + 0.5 + sx) * n) + 1
        r0 = math.floor(((v0 - 0.5) * sc + 0.5 + sy) * n) - 1
        r1 = math.ceil(((v1 - 0.5) * sc + 0.5 + sy) * n) + 1
        return slice(min(n, max(0, r0)), min(n, max(0, r1))), slice(min(n, max(0, c0)), min(n, max(0, c1)))

    # vertical background gradient, (3, n, 1); the canvas starts as background + hair behind the head
    bg = np.asarray(spec.background, dtype=np.float32).reshape(3, 1, 1) * (1.08 - 0.16 * xs)[None, :, None]
    dark = np.zeros((n, n), dtype=np.float32)  # multiplicative darkening, applied at the end

    # ---- geometry (face frame) ---------------------------------------------------------------
    cx, cy = 0.5, 0.505
    frx = 0.345 * spec.face_width
    fry = 0.445 * spec.face_length
    fx = cx + 0.018 * spec.yaw  # inner features shift with yaw
    es = 0.155 * spec.eye_spacing
    ey = 0.385
    mouth_v = 0.72 + 0.01 * t
    mw = 0.085 * spec.mouth_width * (0.95 if female else 1.0)
    nose_v = ey + 0.18 * spec.nose_length

    # ---- hair behind the head ----------------------------------------------------------------
    style = HAIR_STYLES[spec.hair_style]
    bald = spec.balding * min(1.0, max(0.0, (spec.age - 25.0) / 45.0)) if style == "balding" else 0.0
    du = U - cx
    hair_a = _soft_ellipse(du, V - (cy - 0.02), frx * 1.1, fry * 1.04, aa)
    if style in ("medium", "long"):
        half_w = frx * (1.16 if style == "long" else 1.12)
        v_end = 0.72 if style == "medium" else 1.2
        cols = _clip01(0.5 - (np.abs(du) - half_w) * (1.0 / aa))
        rows = _clip01(0.5 - np.maximum((cy - 0.1) - V, V - v_end) * (1.0 / aa))
        hair_a = np.maximum(hair_a, cols * rows)
    if bald > 0:  # the crown loses its hair, the sides stay
        hair_a *= _clip01((V - (0.12 + 0.25 * bald)) * (1.0 / 0.08))
    img = (hair3 - bg) * hair_a + bg  # (3, n, n) float32 canvas

    # ---- ears, neck --------------------------------------------------------------------------
    rs, cs = box(cx - frx - 0.07, cx + frx + 0.07, 0.36, 0.52)
    ear = _soft_ellipse(np.abs(U[:, cs] - cx) - frx * 0.97, V[rs] - 0.44, 0.036, 0.075, aa)
    _blend(img, rs, cs, ear, skin3 * 0.9)
    rs, cs = box(cx - 0.2, cx + 0.2, 0.7, 1.0)
    neck = _clip01(0.5 - (np.abs(U[:, cs] - cx) - 0.125 * spec.face_width) * (1.0 / aa))
    neck = neck * _clip01(0.5 - (0.75 - V[rs]) * (1.0 / aa))
    _blend(img, rs, cs, neck, skin3 * 0.72)

    # ---- face oval: egg-shaped; the jaw widens with age (jowls), squarer in men --------------
    dvf = V - cy
    low = _clip01(dvf * (1.0 / fry))
    jaw = (0.1 if not female else 0.04) + 0.09 * t
    rx_v = frx * (1.0 - 0.08 * low * low + jaw * low * _bump(low - 0.78, 0.4))  # (n, 1)
    radius = np.sqrt(np.square(du) * (1.0 / np.square(rx_v)) + np.square(dvf * (1.0 / fry)))
    face_a = _clip01((0.5 + frx / aa) - radius * (frx / aa))
    _blend(img, _FULL, _FULL, face_a, skin3)
    hair_vis = hair_a * (1.0 - face_a)
    # uneven pigmentation, stronger with age: a rank-3 sum of sinusoids (image frame), one matmul
    freq = 12.0 + 18.0 * R[0:6]
    phase = 6.283 * R[6:12]
    blotch = np.sin(xs[:, None] * freq[3:] + phase[3:]) @ np.sin(xs[:, None] * freq[:3] + phase[:3]).T
    dark += blotch * (face_a * (0.012 + 0.04 * t))

    # ---- cheeks: rosy when healthy, hollow when not ------------------------------------------
    rs, cs = box(cx - 0.34, cx + 0.34, 0.45, 0.8)
    ac = np.abs(U[:, cs] - fx)
    v = V[rs]
    fa = face_a[rs, cs]
    blush = _bump2(np.square(ac - 0.17) + np.square((v - 0.56) * 1.3), 0.09) * fa
    _blend(img, rs, cs, blush * (0.3 * h), _BLUSH)
    hollow = _bump2(np.square(ac - 0.2) + np.square((v - 0.65) * 0.8), 0.1) * fa
    dark[rs, cs] += hollow * (0.03 + 0.18 * (1.0 - h) ** 1.5 + 0.05 * t)

    # ---- age spots: separable bumps summed by one matmul -------------------------------------
    n_spots = min(12, int(rng.poisson(10.0 * t * t)))
    if n_spots:
        rs, cs = box(cx - 0.3, cx + 0.3, 0.14, 0.76)
        su = ((cx - 0.24 + 0.48 * R[12 : 12 + n_spots]) - 0.5) * sc + 0.5 + sx  # image frame
        sv = ((0.18 + 0.52 * R[24 : 24 + n_spots]) - 0.5) * sc + 0.5 + sy
        sr = (0.01 + 0.012 * R[36 : 36 + n_spots]) * sc
        gx = _bump2(np.square((xs[cs, None] - su) / sr), 1.0)  # (w, k)
        gy = _bump2(np.square((xs[rs, None] - sv) / sr), 1.0)  # (h, k)
        spots = np.minimum(gy @ gx.T, 1.0) * face_a[rs, cs]
        _blend(img, rs, cs, spots * 0.4, skin3 * _SPOT_TINT)

    # ---- front hair / hairline ---------------------------------------------------------------
    rs, cs = box(cx - frx - 0.02, cx + frx + 0.02, 0.0, 0.45)
    du = U[:, cs] - cx
    if style == "short":
        line, top = 0.2 + 0.9 * du * du, 0.2
    elif style == "medium":
        line, top = 0.225 + 0.004 * np.sin(90.0 * du) + 0.6 * du * du, 0.225
    elif style == "long":
        line, top = 0.21 + 0.03 * np.abs(np.sin(6.0 * du + 6.3 * r[13])) + 0.5 * du * du, 0.24
    else:  # balding: the hairline recedes at the temples first, then overall
        line = 0.19 - 0.15 * bald + 1.2 * du * du - 0.07 * bald * _bump(np.abs(du) - 0.12, 0.1)
        top = 0.19 - 0.1 * bald
    front = _clip01(0.5 - (V[rs] - line) * (1.0 / aa)) * face_a[rs, cs]
    _blend(img, rs, cs, front, hair3)
    hair_vis[rs, cs] += front
    # strands: a separable stripe field darkening visible hair only
    strands = (0.05 * np.sin(150.0 * xs + 6.3 * r[0]) + 0.03 * np.sin(61.0 * xs + 6.3 * r[1]))[None, :]
    strands = strands * (1.0 + 0.6 * np.sin(9.0 * xs + 6.3 * r[2]))[:, None]
    dark += hair_vis * strands

    # ---- forehead lines and frown lines (age) ------------------------------------------------
    top = max(top + 0.035, 0.12)
    if t > 0.03:  # invisible below
        n_lines = max(1, min(2 + int(4.0 * t), int((0.3 - top) / 0.013)))
        rs, cs = box(fx - 0.2, fx + 0.2, top - 0.02, 0.35)
        du = U[:, cs] - fx  # (1, w)
        v = V[rs]
        kk = slice(40, 40 + n_lines)
        offs = (np.linspace(top, 0.3, n_lines, dtype=np.float32) + 0.006 * (R[kk] - 0.5))[:, None, None]
        amp, freq, phase = (0.002 + 0.003 * R[kk])[:, None, None], (20 + 25 * R[kk])[:, None, None], 6.3 * R[kk, None, None]
        half = (0.08 + 0.08 * R[50 : 50 + n_lines])[:, None, None]
        curve = offs + 0.5 * du * du + amp * np.sin(freq * du + phase)  # (k, 1, w)
        window = _clip01((half - np.abs(du)) * (1.0 / 0.03))
        wr = (_bump(v - curve, thin) * window).max(axis=0)
        frown = _bump(np.abs(du) - 0.018, thin) * (_clip01((v - 0.28) * 50) * _clip01((0.335 - v) * 50))
        dark[rs, cs] += (wr * (0.45 * t**1.2) + frown * (0.25 * t**1.5)) * face_a[rs, cs]

    # ---- brows -------------------------------------------------------------------------------
    bv = ey - 0.062 - (0.006 if female else 0.0)
    rs, cs = box(fx - es - 0.09, fx + es + 0.09, bv - 0.04, bv + 0.03)
    u = U[:, cs]
    side = np.sign(u - fx)
    du = (u - fx) - side * es
    out = side * du  # > 0 towards the temple
    centre = bv - (0.02 if female else 0.012) * (1.0 - np.square(du * (1 / 0.065))) + 0.06 * out
    half = (0.004 if female else 0.007) * (0.5 + 0.5 * _clip01(1.0 - out * (1 / 0.07)))
    cols = _clip01(0.5 - (np.abs(du) - 0.065) * (1.0 / aa)) * 0.9
    _blend(img, rs, cs, _clip01(0.5 - (np.abs(V[rs] - centre) - half) * (1.0 / aa)) * cols, brow.reshape(3, 1, 1))

    # ---- eyes --------------------------------------------------------------------------------
    rs, cs = box(fx - es - 0.11, fx + es + 0.11, ey - 0.04, ey + 0.06)
    u = U[:, cs]
    side = np.sign(u - fx)
    du = (u - fx) - side * es  # (1, w) offset from the nearer eye centre
    out = side * du  # > 0 towards the temple
    dv = V[rs] - ey  # (h, 1)
    du2 = du * du
    ery = 0.021 * (1.0 - 0.3 * t)  # upper lid droops with age
    circ = _bump2(du2 + np.square((dv - 0.028) * 2.6), 0.07)  # dark circles (low health), bags (age)
    _blend(img, rs, cs, circ * (0.08 + 0.5 * (1.0 - h) ** 1.3 + 0.12 * t), skin3 * _CIRCLE_TINT)
    crease = _bump(dv + (ery + 0.011 + 0.004 * t), thin) * (_bump(du, 0.055) * (0.15 + 0.25 * t))
    dark[rs, cs] += crease
    if t > 0.1:  # crow's feet: short rays fanning out from the outer eye corner, more and deeper with age
        n_cf = 1 + int(4.0 * t)
        ang = np.linspace(-0.6, 0.6, n_cf, dtype=np.float32) + 0.16 * (R[56 : 56 + n_cf] - 0.5)
        ca, sa = np.cos(ang)[:, None, None], np.sin(ang)[:, None, None]
        ox = out - 0.06
        half_len = (0.014 + 0.008 * R[56 : 56 + n_cf])[:, None, None]
        ray = _bump(ca * dv - sa * ox, thin) * _bump2(np.square(ca * ox + sa * dv - half_len), half_len)
        dark[rs, cs] += ray.max(axis=0) * (0.6 * (t - 0.08))
    sclera = _soft_ellipse(du, dv, 0.052, ery, aa)
    _blend(img, rs, cs, sclera, _SCLERA * (0.88 + 0.12 * h))
    rr = np.square(du - spec.gaze) + dv * dv
    iris = _clip01((0.5 + 0.018 / (2 * aa)) - rr * (1 / (2 * 0.018 * aa))) * sclera
    _blend(img, rs, cs, iris, _EYE_PALETTE[spec.eye_colour].reshape(3, 1, 1))
    pupil = _clip01((0.5 + 0.0075 / (2 * aa)) - rr * (1 / (2 * 0.0075 * aa))) * sclera
    _blend(img, rs, cs, pupil, _PUPIL)
    lid_v = -ery * np.sqrt(_clip01(1.0 - du2 * (1 / 0.052**2)))  # (1, w) upper lid curve
    lid = np.maximum(np.abs(dv - lid_v) - (0.0042 if female else 0.003), np.abs(du) - 0.054)
    _blend(img, rs, cs, _clip01(0.5 - lid * (1.0 / aa)), _LID)

    # ---- nose --------------------------------------------------------------------------------
    rs, cs = box(fx - 0.08, fx + 0.08, ey, nose_v + 0.04)
    du = np.abs(U[:, cs] - fx)
    v = V[rs]
    q = _clip01((v - (ey + 0.02)) * (1.0 / (nose_v - ey - 0.02)))  # (h, 1)
    ridge = _bump(du - (0.022 + 0.012 * q**3), 0.016) * (q * q * _clip01((nose_v + 0.005 - v) * 100) * 0.08)
    dark[rs, cs] += ridge
    nostril = _soft_ellipse(du - 0.02, v - (nose_v + 0.018), 0.012, 0.006, aa)
    _blend(img, rs, cs, nostril * 0.8, skin3 * 0.35)

    # ---- nasolabial folds (age) and mouth ----------------------------------------------------
    rs, cs = box(fx - 0.17, fx + 0.17, nose_v, mouth_v + 0.07)
    du = U[:, cs] - fx
    v = V[rs]
    q = (v - nose_v - 0.015) * (1.0 / (mouth_v + 0.01 - nose_v))  # (h, 1): 0 at the nose wing
    fold_u = 0.05 + (mw - 0.025) * q  # from the nose wing down and out, fading beside the mouth
    fold = _bump(np.abs(du) - fold_u, 2.5 * thin) * (_clip01(q * 6.0) * _clip01((0.95 - q) * 3.0))
    dark[rs, cs] += fold * (0.02 + 0.22 * t)
    droop = 0.004 + 0.012 * t  # mouth corners turn down with age
    mv = (v - mouth_v) - np.square(du) * (droop / mw**2)
    lip_h = 0.022 * (1.0 - 0.5 * t) * (1.2 if female else 1.0)  # lips thin with age
    upper = _soft_ellipse(du, mv + 0.42 * lip_h, mw, 0.5 * lip_h, aa)
    lower = _soft_ellipse(du, mv - 0.5 * lip_h, mw * 0.88, 0.62 * lip_h, aa)
    _blend(img, rs, cs, np.maximum(upper, lower), lip3)
    mline = np.maximum(np.abs(mv) - 0.0025, np.abs(du) - mw)
    _blend(img, rs, cs, _clip01(0.5 - mline * (1.0 / aa)) * 0.85, lip3 * 0.38)

    bank = _noise_bank(n)
    # ---- stubble -----------------------------------------------------------------------------
    if spec.stubble > 0:
        rs, cs = box(cx - frx, cx + frx, nose_v, 1.0)
        du = U[:, cs] - fx
        v = V[rs]
        region = face_a[rs, cs] * _clip01((v - nose_v - 0.03) * 25)
        region *= 1.0 - _bump2(np.square(du * (1 / (mw * 1.15))) + np.square((v - mouth_v) * 30), 1.0)
        o = int(r[4] * n)
        grain = _clip01(bank[o : o + n, n - o : 2 * n - o][rs, cs] * 0.12 + 0.7)
        _blend(img, rs, cs, region * grain * (0.4 * spec.stubble), hair3 * 0.8)

    # ---- glasses -----------------------------------------------------------------------------
    if spec.glasses:
        rs, cs = box(fx - es - 0.1, fx + es + 0.1, ey - 0.06, ey + 0.06)
        u = U[:, cs]
        dv = V[rs] - ey
        du = (u - fx) - np.where(u >= fx, 1.0, -1.0) * es
        q = np.square(du * (1 / 0.075)) + np.square(dv * (1 / 0.048))
        ring = np.abs(q - 1.0) * (0.5 * 0.048) - 0.004  # first-order distance to the rim
        bridge = np.maximum(np.abs(dv + 0.01) - 0.004, np.abs(u - fx) - es + 0.07)
        _blend(img, rs, cs, _clip01(0.5 - np.minimum(ring, bridge) * (1.0 / aa)), _FRAME)

    # ---- lighting on the head ellipsoid, darkening map, exposure, colour temperature ---------
    # pseudo-normal with the separable approximation nz ~ sqrt(1 - nx^2) sqrt(1 - ny^2)
    nx = _clip01(np.abs(U - cx) * (1.0 / (frx * 1.1))) * np.sign(U - cx)
    ny = _clip01(np.abs(V - cy) * (1.0 / (fry * 1.1))) * np.sign(V - cy)
    nzx, nzy = np.sqrt(1.0 - nx * nx), np.sqrt(1.0 - ny * ny)
    az = spec.light_azimuth
    shade = ((0.6 * math.cos(az)) * nx + (0.6 * math.sin(az)) * ny) + (0.8 * nzy) * nzx  # (n, n)
    head = np.maximum(face_a, hair_a) * spec.light_strength
    factor = (1.0 + head * np.maximum(shade - 0.8, -1.0)) * (1.0 - dark)
    img *= factor
    temp = np.array([1.0 + 0.06 * spec.colour_temp, 1.0, 1.0 - 0.06 * spec.colour_temp], dtype=np.float32)
    img *= (temp * spec.exposure).reshape(3, 1, 1)

    # ---- skin grain (coarser with age) and sensor noise --------------------------------------
    oy, ox = int(r[5] * n), int(r[6] * n)
    img += bank[oy : oy + n, ox : ox + n] * (1.5 + face_a * (0.8 + 2.5 * t)) + 0.5  # +0.5: round
    np.clip(img, 0.0, 255.0, out=img)
    rgb = np.empty((n, n, 3), dtype=np.uint8)
    for c in range(3):  # planar float -> interleaved uint8 (truncation; +0.5 above rounds)
        np.copyto(rgb[..., c], img[c], casting="unsafe")
    return rgb


def synthetic_face(index: int, seed: int, size: int = 112) -> tuple[np.ndarray, dict]:
    """Sample ``index`` of synthetic dataset ``seed``.

    Returns a (size, size, 3) uint8 RGB image and labels
    ``{"age": years (float), "sex": 0|1, "health": [0, 1] (float), "synthetic": True}``.
    """
    spec = sample_spec(index, seed)
    labels = {"age": spec.age, "sex": spec.sex, "health": spec.health, "synthetic": True}
    return render_face(spec, size), labels
