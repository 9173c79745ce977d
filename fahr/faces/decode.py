"""Decode untrusted photo bytes into an upright 8-bit RGB array, or reject them with a reason.

:func:`decode_photo` is the single place where pipelines turn ``Record.image`` bytes into pixels:

- EXIF orientation is applied first (``PIL.ImageOps.exif_transpose``), so phone photos come out upright;
- every mode becomes 8-bit RGB: greyscale / palette / CMYK / YCbCr are converted, alpha (RGBA, LA,
  PA, palette transparency) is composited on white, 16-bit and 32-bit integer greyscale (``I;16*``,
  ``I``) and float (``F``) are rescaled to 0-255 (float data within [0, 1] is scaled by 255, as
  scientific TIFFs store it; NaN or infinite pixels are ``image:unreadable``);
- rejections (:class:`~fahr.faces.rejection.RejectedError`): ``image:empty`` (zero bytes),
  ``image:unreadable`` (not an image, truncated, undecodable), ``image:too_large`` (more than
  ``max_pixels`` pixels according to the header, checked *before* any pixel is decoded).

Truncated files are rejected, never half-decoded: this relies on Pillow's default
``ImageFile.LOAD_TRUNCATED_IMAGES = False`` (the module refuses to decode if someone set it globally).
PIL's global ``Image.MAX_IMAGE_PIXELS`` is neither relied on nor changed.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from fahr.faces.rejection import RejectedError

__all__ = ["decode_photo", "PHOTO_SUFFIXES", "is_photo_name"]

#: file name endings of the photos fahr reads from folders (what :func:`decode_photo` decodes)
PHOTO_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


def is_photo_name(name: str) -> bool:
    """True for a file name ending in one of :data:`PHOTO_SUFFIXES` (any case) that is not hidden."""
    lower = name.lower()
    return not name.startswith(".") and any(lower.endswith(s) for s in PHOTO_SUFFIXES)

_ALPHA_MODES = {"RGBA", "LA", "La", "RGBa", "PA"}


def _to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im).astype(np.float64)
        if not np.isfinite(a).all():
            raise ValueError("non-finite pixel values")
        if mode.startswith("I;16"):
            a = a / 257.0
        elif mode == "F" and a.size and a.min() >= 0.0 and a.max() <= 1.0:  # float data in [0, 1]
            a = a * 255.0
        elif a.size and a.max() > 255:  # 16/32-bit integer or float data in a wider range: 16-bit scale
            a = np.clip(a, 0, 65535) / 257.0
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def decode_photo(data: bytes, max_pixels: int = 40_000_000) -> np.ndarray:
    """Decode image bytes (any format Pillow reads) to an upright (H, W, 3) uint8 RGB array.

    Raises:
        RejectedError: ``image:empty``, ``image:unreadable`` or ``image:too_large`` (see module doc).
    """
    if data is None or len(data) == 0:
        raise RejectedError("image:empty", "zero-byte image")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated photos would be half-decoded")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own limit
            im = Image.open(io.BytesIO(bytes(data)))
    except Image.DecompressionBombError as e:  # PIL's own (larger) hard limit, raised at open
        raise RejectedError("image:too_large", str(e)) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise RejectedError("image:unreadable", f"{type(e).__name__}: {e}") from e
    with im:
        w, h = im.size
        if w <= 0 or h <= 0:
            raise RejectedError("image:unreadable", f"invalid size {w}x{h}")
        if w * h > max_pixels:
            raise RejectedError("image:too_large", f"{w}x{h} = {w * h} pixels > max_pixels={max_pixels}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im.load()
        except Image.DecompressionBombError as e:
            raise RejectedError("image:too_large", str(e)) from e
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
            raise RejectedError("image:unreadable", f"{type(e).__name__}: {e}") from e
        try:
            upright = ImageOps.exif_transpose(im)
        except Exception:  # noqa: BLE001 - corrupt EXIF: keep the pixels as stored
            upright = im
        try:
            rgb = _to_rgb(upright)
        except (OSError, ValueError) as e:
            raise RejectedError("image:unreadable", f"cannot convert mode {upright.mode}: {e}") from e
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise RejectedError("image:unreadable", f"unexpected decoded shape {rgb.shape}")
    return np.ascontiguousarray(rgb)
