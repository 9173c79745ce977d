"""Lightning CheckpointIO that writes checkpoints atomically and loads them without code.

Lightning's default writes the file in place, so a job killed mid-write (preemption, OOM) leaves a
truncated ``last.ckpt`` that the next start would try to resume from. Here the checkpoint goes to a
temporary file in the same directory, is fsync'ed and renamed over the old one.
Loading uses ``torch.load(weights_only=True)``: tensors and plain containers only, no pickled code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from fahr.boundary import InputError
from fahr.utils.atomic import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        atomic_write(Path(path), lambda f: torch.save(checkpoint, f), mode="wb")

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None, weights_only: Optional[bool] = None) -> dict[str, Any]:
        if not Path(path).is_file():
            raise InputError(f"checkpoint not found: {path}")
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
