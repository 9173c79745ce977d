"""Decode a ``decode="device"`` batch's images in the training process, batched, onto the training device.

With ``data.decode=device`` the DataLoader workers of :class:`fahr.data.shard_reader.ShardStream` read
and check samples but leave their images encoded (``"encoded"``, ``"encoded_length"``,
``"encoded_member"``, ``"encoded_shard"``). :func:`decode_batch` turns those into the ``"image"`` a
``decode="workers"`` batch has, on the device:

- JPEGs (recognised by their first bytes, as the workers' decoder does) are decoded in one call of
  ``torchvision.io.decode_jpeg(list, mode=RGB, device=device)``: nvJPEG on a CUDA device, libjpeg on
  the CPU. On the CPU this is the workers' kernel with the workers' arguments, so the pixels are
  identical; nvJPEG's IDCT may differ from libjpeg's by a few grey levels.
- Other images (PNG, WebP, GIF) are decoded on the CPU by the workers' function and then moved.
- Crops of another size are resized as the workers resize them (bilinear, antialiased), on the device.

The one difference from ``decode="workers"``: an image that fails to decode (corrupt entropy data,
truncated, not one RGB image) is found here, after its batch was formed, and cannot be replaced by
the next sample. It is **dropped from its batch** (the batch has B - k rows), counted in that batch's
``n_skipped`` and warned about as the workers warn (shard and key; the first few only). Over an epoch
the same bad samples are counted as with ``decode="workers"``, and the number of batches per rank
and the resume positions are unchanged. With ``on_error="raise"`` the first such image raises. A
batch none of whose images decode raises :class:`~fahr.boundary.InputError`: a training step needs
at least one row.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from fahr.boundary import InputError
from fahr.data.shard_reader import _MAX_SAMPLE_WARNINGS, ENCODED_KEYS, _BadSample, decode_rgb, rgb_at_size

log = logging.getLogger(__name__)

_JPEG_SIGNATURE = b"\xff\xd8\xff"  # what torchvision's decode_image looks for to call its JPEG decoder


def is_encoded(batch: Any) -> bool:
    """True for a ``decode="device"`` batch whose images are still encoded."""
    return isinstance(batch, dict) and "encoded" in batch


def decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """uint8 RGB (3, H, W) images on ``device`` from JPEG bytes (uint8 (N,) CPU tensors), in one call.

    Raises RuntimeError if any of them does not decode."""
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs in favour of TorchCodec, which has no nvJPEG batch
        # decoder yet; the warning would repeat every step
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*image decoding.*TorchVision")
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


class DeviceDecoder:
    """Decodes ``decode="device"`` batches (see the module docstring); one per training stream.

    Args:
        image_size: output side in pixels (the stream's ``image_size``).
        on_error: "skip" (drop, count, warn) or "raise" (:class:`InputError` naming shard and key).
    """

    def __init__(self, image_size: int, on_error: str = "skip") -> None:
        self.image_size = int(image_size)
        self.on_error = on_error
        self.warned = 0

    def __call__(self, batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
        """``batch`` with ``"image"``: uint8 (B - k, 3, S, S) on ``device`` (channels_last, as the
        workers' batches) in place of the encoded fields, the k samples that did not decode removed
        from every per-sample field (labels, ``__key__``) and added to ``n_skipped``. The other
        tensors stay where they are (the caller moves them)."""
        device = torch.device(device)
        lengths = batch["encoded_length"].tolist()
        pieces = list(torch.split(batch["encoded"], lengths))  # views, no copy
        members, shards, keys = batch["encoded_member"], batch["encoded_shard"], batch["__key__"]
        decoded, errors = self._decode_all(pieces, members, device)
        kept: list[int] = []
        for i, image in enumerate(decoded):
            if image is not None:
                try:
                    decoded[i] = rgb_at_size(image, members[i], self.image_size)
                    kept.append(i)
                    continue
                except _BadSample as bad:
                    errors[i] = str(bad)
            self._bad(f"bad sample {keys[i]!r} in shard {shards[i]}: {errors[i]}")
        if not kept:
            raise InputError(
                f"none of the {len(pieces)} images of a batch decodes (shard {shards[0]}, first error: "
                f"{errors[0]}); a training step needs at least one, so use data.decode=workers, which refills batches"
            )
        images = torch.stack([decoded[i].permute(1, 2, 0) for i in kept]).permute(0, 3, 1, 2)
        out = {k: v for k, v in batch.items() if k not in ENCODED_KEYS}
        out["image"] = images
        if len(kept) < len(pieces):
            rows = torch.tensor(kept, dtype=torch.int64)
            for name, value in out.items():
                if name == "__key__":
                    out[name] = [keys[i] for i in kept]
                elif isinstance(value, torch.Tensor) and value.dim() == 1 and len(value) == len(pieces):
                    out[name] = value.index_select(0, rows.to(value.device))
            out["n_skipped"] = batch["n_skipped"] + (len(pieces) - len(kept))
        return out

    def _decode_all(self, pieces: list[torch.Tensor], members: list[str], device: torch.device
                    ) -> tuple[list[torch.Tensor | None], dict[int, str]]:
        """Decoded images on ``device`` (None where decoding failed) and the errors by row."""
        decoded: list[torch.Tensor | None] = [None] * len(pieces)
        errors: dict[int, str] = {}
        jpeg = [i for i, p in enumerate(pieces) if bytes(p[:3].numpy()) == _JPEG_SIGNATURE]
        if jpeg:
            try:
                for i, image in zip(jpeg, decode_jpegs([pieces[i] for i in jpeg], device)):
                    decoded[i] = image
            except RuntimeError:
                # the batched call fails as a whole; one by one finds which images are bad
                for i in jpeg:
                    try:
                        decoded[i] = decode_jpegs([pieces[i]], device)[0]
                    except RuntimeError as exn:
                        errors[i] = f"cannot decode {members[i]}: {str(exn).splitlines()[0]}"
        for i in sorted(set(range(len(pieces))) - set(jpeg)):
            try:
                decoded[i] = decode_rgb(pieces[i]).to(device)
            except RuntimeError as exn:
                errors[i] = f"cannot decode {members[i]}: {str(exn).splitlines()[0]}"
        return decoded, errors

    def _bad(self, reason: str) -> None:
        if self.on_error == "raise":
            raise InputError(reason)
        self.warned += 1
        if self.warned <= _MAX_SAMPLE_WARNINGS:
            suffix = "" if self.warned < _MAX_SAMPLE_WARNINGS else " (further bad samples of this stream are only counted)"
            log.warning("skipping %s%s", reason, suffix)
