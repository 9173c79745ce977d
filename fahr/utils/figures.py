"""Image grids for logging (uint8 HWC arrays) and metadata-free PNG writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fahr.utils.atomic import atomic_write


def reconstruction_grid(rows: list[torch.Tensor], mean: torch.Tensor, std: torch.Tensor) -> np.ndarray:
    """Rows of normalised images (each (B, 3, H, W)) -> one uint8 (rows*H, B*W, 3) grid."""
    out = []
    for row in rows:
        x = row.float() * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu()  # (B, 3, H, W)
        out.append(torch.cat(list(x), dim=2))  # (3, H, B*W)
    return torch.cat(out, dim=1).permute(1, 2, 0).numpy()


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, 3) uint8 array as a PNG with no metadata chunks."""
    from PIL import Image

    img = Image.fromarray(image)
    return atomic_write(Path(path), lambda f: img.save(f, format="PNG"), mode="wb")
