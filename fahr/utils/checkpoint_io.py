"""Checkpoints: written atomically, loaded without code, and DeepSpeed's folders consolidated.

Lightning's default writes the file in place, so a job killed mid-write (preemption, OOM) leaves a
truncated ``last.ckpt`` that the next start would try to resume from. Here the checkpoint goes to a
temporary file in the same directory, is fsync'ed and renamed over the old one.
Loading uses ``torch.load(weights_only=True)``: tensors and plain containers only, no pickled code.

DeepSpeed (``trainer=deepspeed_stage_*``) writes a checkpoint as a folder, ``<name>.ckpt/latest``
(the tag) + ``<name>.ckpt/<tag>/*_model_states.pt`` and one ``*_optim_states.pt`` per data-parallel
rank, where ZeRO keeps the fp32 master weights, partitioned. :func:`load_checkpoint_file` reads
such a folder as one Lightning checkpoint whose ``state_dict`` is the consolidated fp32 weights
(what ``deepspeed.utils.zero_to_fp32`` computes, which however unpickles): every file is loaded
weights-only with four of DeepSpeed's plain-data classes allowed (:func:`load_deepspeed_file`),
which is also how a DeepSpeed run resumes (:class:`fahr.utils.strategies.SafeDeepSpeedStrategy`).
"""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from fahr.boundary import InputError
from fahr.utils.atomic import atomic_write

#: largest checkpoint file loaded (bytes): ViT-B with AdamW state is ~1 GB
MAX_CHECKPOINT_BYTES = 64 * 1024**3
#: what DeepSpeed keeps beside the Lightning state in a model-states file (not part of the checkpoint)
_DEEPSPEED_KEYS = ("module", "optimizer", "lr_scheduler", "csr_tensor_module_names", "skipped_steps", "global_steps",
                   "global_samples", "dp_world_size", "mp_world_size", "buffer_names", "param_shapes",
                   "frozen_param_shapes", "frozen_param_fragments", "shared_params", "ds_config", "ds_version",
                   "data_sampler", "random_ltd", "sparse_tensor_module_names", "checkpoint_parallel_dimensions")


def _load_weights_only(path: str | Path, map_location: Any = "cpu", safe_globals: list | None = None) -> Any:
    """``torch.load(weights_only=True)`` of one file (checked to be a regular file of at most
    :data:`MAX_CHECKPOINT_BYTES`), with ``safe_globals`` allowed besides tensors and containers.

    Raises:
        InputError: missing, not a regular file, too large, truncated, or holding other objects.
    """
    from fahr.boundary import FileRefused, check_regular_file, printable_path

    where = printable_path(path)
    try:
        check_regular_file(path, MAX_CHECKPOINT_BYTES)
    except FileRefused as err:
        raise InputError(f"checkpoint {where}: {err.detail}") from None
    try:
        with torch.serialization.safe_globals(list(safe_globals or [])):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            raise InputError(f"checkpoint {where}: holds objects other than tensors and plain containers; "
                             "refused (fahr never unpickles code)") from None
        raise InputError(f"checkpoint {where}: not a readable PyTorch checkpoint (truncated?)") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, ImportError) as err:
        raise InputError(f"checkpoint {where}: not a readable PyTorch checkpoint ({type(err).__name__}; "
                         "truncated?)") from None


def load_checkpoint_file(path: str | Path, required: tuple[str, ...] = ("state_dict",)) -> dict[str, Any]:
    """A Lightning checkpoint, loaded with ``torch.load(weights_only=True)``: tensors and plain
    containers only; anything else in the pickle (code) is refused, not run. A DeepSpeed checkpoint
    folder is consolidated (:func:`consolidate_deepspeed_checkpoint`).

    Raises:
        InputError: missing, not a regular file or a DeepSpeed folder, truncated or not a checkpoint,
            holding non-tensor objects, or lacking ``required`` keys.
    """
    from fahr.boundary import printable_path

    where = printable_path(path)
    if Path(path).is_dir():
        ckpt = consolidate_deepspeed_checkpoint(path)
    else:
        ckpt = _load_weights_only(path)
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in required):
        raise InputError(f"checkpoint {where}: not a Lightning checkpoint (needs {', '.join(required)})")
    return ckpt


def deepspeed_safe_globals() -> list:
    """The plain-data classes DeepSpeed's checkpoint files hold besides tensors (loss-scaler state, the
    ZeRO stage enum, the (numel, start) records of where each parameter lies in a partition); nothing
    else is allowed."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_deepspeed_file(path: str | Path, map_location: Any = "cpu") -> Any:
    """One file of a DeepSpeed checkpoint folder, weights-only with :func:`deepspeed_safe_globals`."""
    try:
        allowed = deepspeed_safe_globals()
    except ImportError:
        raise InputError(f"checkpoint {Path(path).parent.parent}: a DeepSpeed checkpoint; reading it needs "
                         "`pip install fahr[deepspeed]`") from None
    return _load_weights_only(path, map_location, allowed)


def _rank_of(path: Path) -> int:
    match = re.search(r"zero_pp_rank_(\d+)_", path.name)
    return int(match.group(1)) if match else 0


def consolidate_deepspeed_checkpoint(folder: str | Path) -> dict[str, Any]:
    """A DeepSpeed checkpoint folder (ZeRO stage 1-3, any data-parallel world size, fp32 or bf16
    training) as one Lightning checkpoint: its Lightning state (``global_step``, loops, callbacks,
    ...) and ``state_dict``: every parameter in fp32 from the optimizer's master partitions, every
    buffer and frozen parameter from the model states, keyed as the LightningModule names them.

    Raises:
        InputError: not a DeepSpeed checkpoint (no ``latest`` tag, or a tag that is not a folder name
            inside it), model-parallel or pipeline-parallel checkpoints, or files that do not add up.
    """
    from fahr.boundary import printable_path, read_text_file

    folder = Path(folder)
    where = printable_path(folder)
    if not (folder / "latest").is_file():
        raise InputError(f"checkpoint {where} is a folder but not a DeepSpeed checkpoint (no 'latest' file)")
    tag = read_text_file(folder / "latest", "DeepSpeed checkpoint tag", 4096).strip()
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", tag) or tag in (".", ".."):
        raise InputError(f"checkpoint {where}: its 'latest' file must name a folder inside it, not {tag[:40]!r}")
    tag_dir = folder / tag
    optim_files = sorted(tag_dir.glob("*_optim_states.pt"), key=_rank_of)
    model_files = sorted(tag_dir.glob("*_model_states.pt"), key=_rank_of)
    if not optim_files or not model_files:
        raise InputError(f"checkpoint {where}: no model/optimizer states under {tag}/ (an incomplete DeepSpeed save?)")
    if any("mp_rank_00" not in p.name for p in optim_files + model_files):
        raise InputError(f"checkpoint {where}: model- or pipeline-parallel DeepSpeed checkpoints are not supported")
    if [_rank_of(p) for p in optim_files] != list(range(len(optim_files))):
        raise InputError(f"checkpoint {where}: optimizer states of ranks {[_rank_of(p) for p in optim_files]}; "
                         f"expected 0..{len(optim_files) - 1}")
    optim = [load_deepspeed_file(p)["optimizer_state_dict"] for p in optim_files]
    stage = int(optim[0]["zero_stage"])
    world = len(optim)
    state = load_deepspeed_file(model_files[0])
    module = state["module"]
    weights: dict[str, torch.Tensor] = {name: module[name] for name in state.get("buffer_names", [])}
    frozen = state.get("frozen_param_fragments") or {}
    if stage <= 2:
        weights.update({name: tensor.float() for name, tensor in frozen.items()})
        for group, shapes in enumerate(state["param_shapes"]):
            flat = torch.cat([o["single_partition_of_fp32_groups"][group].float() for o in optim])
            offset = 0
            for name, shape in shapes.items():
                n = math.prod(shape)
                if offset + n > flat.numel():
                    raise InputError(f"checkpoint {where}: parameter {name} lies beyond the saved partitions")
                weights[name] = flat.narrow(0, offset, n).view(shape).clone()
                offset += n
    else:
        if len(model_files) != world:
            raise InputError(f"checkpoint {where}: {len(model_files)} model-state files for {world} optimizer ranks")
        shapes = {name: shape for group in state["param_shapes"] for name, shape in group.items()}
        flats = [torch.cat([g.float() for g in o["fp32_flat_groups"]]) for o in optim]
        frozen_parts = [load_deepspeed_file(p).get("frozen_param_fragments") or {} for p in model_files] if frozen else []
        for name, fragment in frozen.items():
            full = torch.cat([parts[name].flatten().float() for parts in frozen_parts])
            shape = state["frozen_param_shapes"][name]
            weights[name] = full.narrow(0, 0, math.prod(shape)).view(shape).clone()
        offset = 0
        for name, shape in shapes.items():
            n = math.prod(shape)
            part = -(-n // world)  # each rank holds ceil(n / world), the last one padded
            if offset + part > flats[0].numel():
                raise InputError(f"checkpoint {where}: parameter {name} lies beyond the saved partitions")
            weights[name] = torch.cat([f.narrow(0, offset, part) for f in flats]).narrow(0, 0, n).view(shape).clone()
            offset += part
    for alias, source in state.get("shared_params") or []:  # tied weights: one tensor, two names
        weights[alias] = weights[source]
    lightning_state = {k: v for k, v in state.items() if k not in _DEEPSPEED_KEYS}
    lightning_state["state_dict"] = {k[len("_forward_module."):] if k.startswith("_forward_module.") else k: v
                                     for k, v in weights.items()}
    return lightning_state


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        atomic_write(Path(path), lambda f: torch.save(checkpoint, f), mode="wb")

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        ckpt = load_checkpoint_file(path, required=())
        return ckpt if map_location in (None, "cpu") else torch.load(path, map_location=map_location, weights_only=True)
