"""Training augmentation: alignment jitter (a small affine), lighting, greyscale, blur, sensor noise and JPEG.

FaceAge trains on colour photos (UTKFace) but is used on old greyscale scans (FG-NET) and on phone or
scanner photos, aligned by a detector whose landmarks move by a few pixels from photo to photo; these
transforms show the model such photos in training. They run on uint8 batches
(after the flip, before normalisation, which :class:`~fahr.models.face_model.FaceModel` does), only in
training. The keys are ``task.augment.*`` (:class:`fahr.config.finetune_schema.AugmentConfig`); every
probability defaults to 0, and then :func:`augment_batch` returns its input tensor untouched.

Randomness: every sample gets its own row of :data:`N_DRAWS` uniform numbers, drawn row by row (row
``i`` is the ``i``-th block of draws from the generator, whatever the batch size and whichever
transforms are on), and its output depends only on its own pixels and its own row, never on the other
samples in the batch. :func:`sample_draws` and :func:`apply_draws` are the two halves of
:func:`augment_batch`, so this can be checked.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF

from fahr.boundary import InputError


def random_hflip(images: torch.Tensor) -> torch.Tensor:
    """Each image of (B, C, H, W) mirrored left-right with probability 1/2 (the global torch RNG,
    which the job layer reseeds at every step)."""
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)

# Columns of a sample's row of draws (uniform in [0, 1)). Fixed order: turning one transform on or
# off never changes the draws of another.
(GREY, LIGHT, BRIGHTNESS, CONTRAST, GAMMA, TEMPERATURE, BLUR, SIGMA, JPEG, QUALITY, NOISE, NOISE_SEED,
 AFFINE, ANGLE, SCALE, SHIFT_X, SHIFT_Y) = range(17)
N_DRAWS = 17

# The keys of task.augment and their defaults (off); AugmentConfig in fahr/config/finetune_schema.py
# holds the same defaults and the allowed ranges.
DEFAULTS: dict[str, Any] = {
    "greyscale_p": 0.0,
    "lighting_p": 0.0,
    "brightness": 0.3,
    "contrast": 0.3,
    "gamma": 0.3,
    "colour_temperature": 0.1,
    "blur_p": 0.0,
    "blur_sigma": 1.5,
    "jpeg_p": 0.0,
    "jpeg_quality": [30, 90],
    "noise_p": 0.0,
    "noise_std": 5.0,
    "affine_p": 0.0,
    "rotation": 10.0,
    "scale": 0.1,
    "shift": 0.05,
}
PROBABILITIES = ("greyscale_p", "lighting_p", "blur_p", "jpeg_p", "noise_p", "affine_p")


def augment_settings(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """``cfg`` (``task.augment`` as a dict; missing keys and ``None`` mean the defaults) checked and
    completed.

    Raises:
        InputError: an unknown key, or a value outside the range the transform needs.
    """
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise InputError(f"task.augment: unknown key(s) {unknown}; known: {sorted(DEFAULTS)}")
    s = {**DEFAULTS, **cfg}
    for key in PROBABILITIES:
        if not 0.0 <= float(s[key]) <= 1.0:
            raise InputError(f"task.augment.{key} must be in [0, 1], got {s[key]!r}")
    for key in ("brightness", "contrast"):
        if not 0.0 <= float(s[key]) < 1.0:
            raise InputError(f"task.augment.{key} must be in [0, 1), got {s[key]!r}")
    if not 0.0 <= float(s["scale"]) < 1.0:
        raise InputError(f"task.augment.scale must be in [0, 1), got {s['scale']!r}")
    if not 0.0 <= float(s["shift"]) <= 0.5:
        raise InputError(f"task.augment.shift must be in [0, 0.5], got {s['shift']!r}")
    if not 0.0 <= float(s["rotation"]) <= 180.0:
        raise InputError(f"task.augment.rotation must be in [0, 180] degrees, got {s['rotation']!r}")
    for key in ("gamma", "colour_temperature", "noise_std"):
        if not float(s[key]) >= 0.0:
            raise InputError(f"task.augment.{key} must be at least 0, got {s[key]!r}")
    if not float(s["blur_sigma"]) >= 0.1:
        raise InputError(f"task.augment.blur_sigma must be at least 0.1, got {s['blur_sigma']!r}")
    q = list(s["jpeg_quality"])
    if len(q) != 2 or not all(1 <= int(v) <= 100 for v in q) or q[0] > q[1]:
        raise InputError(f"task.augment.jpeg_quality must be [lo, hi] with 1 <= lo <= hi <= 100, got {q!r}")
    s["jpeg_quality"] = [int(q[0]), int(q[1])]
    return s


def is_active(cfg: dict[str, Any] | None) -> bool:
    """Whether any transform of ``cfg`` has a probability above 0."""
    return any(float((cfg or {}).get(key, DEFAULTS[key])) > 0.0 for key in PROBABILITIES)


def sample_draws(batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform draws (batch_size, N_DRAWS) in [0, 1), float64 on the generator's device (CPU without
    one), drawn one sample's row at a time, so row ``i`` does not depend on the batch size."""
    device = generator.device if generator is not None else torch.device("cpu")
    rows = [torch.rand(N_DRAWS, generator=generator, dtype=torch.float64, device=device)
            for _ in range(batch_size)]
    return torch.stack(rows) if rows else torch.empty(0, N_DRAWS, dtype=torch.float64, device=device)


def sample_params(draws: torch.Tensor, cfg: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Per sample, the transforms to apply and their parameters (``None`` = not applied), from its
    row of ``draws`` and the settings ``cfg``."""
    s = augment_settings(cfg)
    lo, hi = s["jpeg_quality"]
    params = []
    for u in draws.tolist():
        def sym(col: int, half_width: float) -> float:  # uniform in [-half_width, half_width]
            return half_width * (2.0 * u[col] - 1.0)

        p: dict[str, Any] = {"greyscale": u[GREY] < s["greyscale_p"]}
        p["affine"] = None
        if u[AFFINE] < s["affine_p"]:
            p["affine"] = {"angle": sym(ANGLE, s["rotation"]), "scale": 1.0 + sym(SCALE, s["scale"]),
                           "shift": (sym(SHIFT_X, s["shift"]), sym(SHIFT_Y, s["shift"]))}
        p["lighting"] = None
        if u[LIGHT] < s["lighting_p"]:
            t = sym(TEMPERATURE, s["colour_temperature"])
            p["lighting"] = {"brightness": 1.0 + sym(BRIGHTNESS, s["brightness"]),
                             "contrast": 1.0 + sym(CONTRAST, s["contrast"]),
                             "gamma": math.exp(sym(GAMMA, s["gamma"])),
                             "gain_r": 1.0 + t, "gain_b": max(1.0 - t, 0.0)}
        p["blur_sigma"] = 0.1 + (s["blur_sigma"] - 0.1) * u[SIGMA] if u[BLUR] < s["blur_p"] else None
        p["noise"] = ({"std": s["noise_std"], "seed": int(u[NOISE_SEED] * 2**53)}
                      if u[NOISE] < s["noise_p"] else None)
        p["jpeg_quality"] = min(lo + int(u[QUALITY] * (hi - lo + 1)), hi) if u[JPEG] < s["jpeg_p"] else None
        params.append(p)
    return params


def _blur_kernel(sigma: float, size: int) -> int:
    """Odd kernel side covering +-3 sigma, at most the (odd part of the) image side."""
    k = 2 * math.ceil(3.0 * sigma) + 1
    return max(1, min(k, size if size % 2 else size - 1))


def _affine(x: torch.Tensor, affine: dict[str, Any]) -> torch.Tensor:
    """One float image (3, S, S): rotated by ``angle`` degrees (clockwise as displayed) and scaled by
    ``scale`` about its centre, then shifted by ``shift`` (x, y) times its side; bilinear, black
    outside the image (as the aligner pads a face at the photo's edge)."""
    side = x.shape[-1]
    dx, dy = affine["shift"]
    return TF.affine(x, angle=affine["angle"], translate=[dx * side, dy * side], scale=affine["scale"],
                     shear=[0.0, 0.0], interpolation=TF.InterpolationMode.BILINEAR, fill=0.0)


def _lighting(x: torch.Tensor, light: dict[str, float]) -> torch.Tensor:
    """One float image (3, S, S) in [0, 1]: brightness, contrast (around its own mean grey), gamma,
    then white balance (red and blue gains in opposite directions; torchvision has no such op)."""
    x = TF.adjust_brightness(x, light["brightness"])
    x = TF.adjust_contrast(x, light["contrast"])
    x = TF.adjust_gamma(x, light["gamma"])
    gains = torch.tensor([light["gain_r"], 1.0, light["gain_b"]], device=x.device)
    return (x * gains[:, None, None]).clamp_(0.0, 1.0)


def _noise(x: torch.Tensor, noise: dict[str, Any], grey: bool) -> torch.Tensor:
    """One float image (3, S, S) in [0, 1] plus Gaussian noise of ``noise["std"]`` / 255. Drawn from a
    generator seeded from the sample's own draws (TF.gaussian_noise uses the global RNG, which would
    tie a sample's noise to its batch position and to everything else drawn); grey noise for a grey
    image."""
    gen = torch.Generator(device=x.device).manual_seed(noise["seed"])
    shape = (1 if grey else 3, *x.shape[-2:])
    return (x + torch.randn(shape, generator=gen, device=x.device) * (noise["std"] / 255.0)).clamp_(0.0, 1.0)


def apply_draws(images: torch.Tensor, draws: torch.Tensor, cfg: dict[str, Any] | None) -> torch.Tensor:
    """:func:`augment_batch` with the per-sample draws given (row ``i`` for ``images[i]``).

    Per sample, in this order: affine, lighting, greyscale, blur, noise in float [0, 1]; one rounding to
    uint8; then JPEG (which encodes uint8). Stages run over the batch (float conversion, rounding and
    greyscale on all selected samples at once, so the step costs a few batch-wide ops plus one small
    op per transform actually applied); every op is per image, so sample ``i`` sees only its pixels.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (B, 3, S, S), got {images.dtype} {tuple(images.shape)}")
    if tuple(draws.shape) != (images.shape[0], N_DRAWS):
        raise ValueError(f"expected draws ({images.shape[0]}, {N_DRAWS}), got {tuple(draws.shape)}")
    params = sample_params(draws, cfg)
    float_stage = [i for i, p in enumerate(params)
                   if p["affine"] or p["lighting"] or p["greyscale"] or p["blur_sigma"] or p["noise"]]
    jpeg = [i for i, p in enumerate(params) if p["jpeg_quality"]]
    if not float_stage and not jpeg:
        return images
    out = images.clone()
    if float_stage:
        idx = torch.tensor(float_stage, device=images.device)
        x = images[idx].float().div_(255.0)
        for j, i in enumerate(float_stage):
            if params[i]["affine"]:
                x[j] = _affine(x[j], params[i]["affine"])
            if params[i]["lighting"]:
                x[j] = _lighting(x[j], params[i]["lighting"])
        grey = [j for j, i in enumerate(float_stage) if params[i]["greyscale"]]
        if grey:
            g = torch.tensor(grey, device=images.device)
            x[g] = TF.rgb_to_grayscale(x[g], num_output_channels=3)  # ITU-R 601 luma, per pixel
        for j, i in enumerate(float_stage):
            sigma = params[i]["blur_sigma"]
            k = _blur_kernel(sigma, min(x.shape[-2:])) if sigma else 1
            if k > 1:
                x[j] = TF.gaussian_blur(x[j], [k, k], [sigma, sigma])
            if params[i]["noise"]:
                x[j] = _noise(x[j], params[i]["noise"], params[i]["greyscale"])
        out[idx] = x.mul_(255.0).round_().clamp_(0.0, 255.0).to(torch.uint8)
    for i in jpeg:
        out[i] = TF.jpeg(out[i].cpu(), params[i]["jpeg_quality"]).to(images.device)
    return out


def augment_batch(images: torch.Tensor, cfg: dict[str, Any] | None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Randomly degrade a training batch the way real photos are degraded, each sample on its own.

    Args:
        images: uint8 RGB (B, 3, S, S), values 0-255, on any device (the JPEG step runs on the CPU).
        cfg: ``task.augment`` as a dict (keys as :data:`DEFAULTS`; missing keys are off/default).
            Each group below is applied to a sample with its own probability, independently:

            - ``affine_p``: alignment jitter: rotation uniform in ``+- rotation`` degrees, scale
              ``1 +- scale`` and a shift of ``+- shift`` times the side in x and y (independently),
              about the centre, bilinear, black outside;
            - ``greyscale_p``: ITU-R 601 luma (``rgb_to_grayscale``), kept 3-channel;
            - ``lighting_p``: all of brightness factor uniform in ``1 +- brightness``, contrast
              factor ``1 +- contrast``, gamma ``exp(u)`` with ``|u| <= gamma``, and white balance:
              red gain ``1 + t``, blue gain ``1 - t`` with ``|t| <= colour_temperature``;
            - ``blur_p``: Gaussian blur, sigma uniform in ``[0.1, blur_sigma]`` pixels;
            - ``noise_p``: additive Gaussian noise of std ``noise_std`` in 0-255 units (one shared
              channel for a sample made grey);
            - ``jpeg_p``: JPEG encode/decode at a quality uniform in ``jpeg_quality`` ``[lo, hi]``.

            Applied in the order affine, lighting, greyscale, blur, noise, JPEG.
        generator: source of the random draws (its device; the global CPU RNG when ``None``).

    Returns:
        uint8 (B, 3, S, S) on ``images``' device: ``images`` itself (no copy, no random draws) when
        every probability is 0, and when no sample drew any transform; otherwise a new tensor. Sample
        ``i``'s output depends only on ``images[i]`` and the ``i``-th row of draws
        (:func:`sample_draws`), not on the rest of the batch. Float steps are rounded to uint8 once
        (torchvision's uint8 kernels truncate instead, so a single step can differ from running that
        kernel on uint8 by 1 level).

    Assumes RGB channel order and a batch small enough to loop over: the per-sample steps are one
    small op per applied transform (about 40-60 ms for 64 x 112 px on one CPU thread).
    """
    if not is_active(cfg):
        return images
    return apply_draws(images, sample_draws(images.shape[0], generator), cfg)
