"""Lightning CheckpointIO that writes checkpoints atomically and loads them without code.

Lightning's default writes the file in place, so a job killed mid-write (preemption, OOM) leaves a
truncated ``last.ckpt`` that the next start would try to resume from. Here the checkpoint goes to a
temporary file in the same directory, is fsync'ed and renamed over the old one.
Loading uses ``torch.load(weights_only=True)``: tensors and plain containers only, no pickled code.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from fahr.boundary import InputError
from fahr.utils.atomic import atomic_write

#: largest checkpoint file loaded (bytes): ViT-B with AdamW state is ~1 GB
MAX_CHECKPOINT_BYTES = 64 * 1024**3


def load_checkpoint_file(path: str | Path, required: tuple[str, ...] = ("state_dict",)) -> dict[str, Any]:
    """A Lightning checkpoint, loaded with ``torch.load(weights_only=True)``: tensors and plain
    containers only; anything else in the pickle (code) is refused, not run.

    Raises:
        InputError: missing, not a regular file (a DeepSpeed or sharded checkpoint is a folder),
            truncated or not a checkpoint, holding non-tensor objects, or lacking ``required`` keys.
    """
    from fahr.boundary import FileRefused, check_regular_file, printable_path

    where = printable_path(path)
    if Path(path).is_dir():
        raise InputError(f"checkpoint {where} is a folder (a DeepSpeed or sharded checkpoint): give a single "
                         ".ckpt file")
    try:
        check_regular_file(path, MAX_CHECKPOINT_BYTES)
    except FileRefused as err:
        raise InputError(f"checkpoint {where}: {err.detail}") from None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            raise InputError(f"checkpoint {where}: holds objects other than tensors and plain containers; "
                             "refused (fahr never unpickles code)") from None
        raise InputError(f"checkpoint {where}: not a readable PyTorch checkpoint (truncated?)") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, ImportError) as err:
        raise InputError(f"checkpoint {where}: not a readable PyTorch checkpoint ({type(err).__name__}; "
                         "truncated?)") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in required):
        raise InputError(f"checkpoint {where}: not a Lightning checkpoint (needs {', '.join(required)})")
    return ckpt


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        atomic_write(Path(path), lambda f: torch.save(checkpoint, f), mode="wb")

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        ckpt = load_checkpoint_file(path, required=())
        return ckpt if map_location in (None, "cpu") else torch.load(path, map_location=map_location, weights_only=True)
