"""Structured (dataclass) schemas for the Hydra configs in ``conf/``.

Every YAML file and every command-line override is merged into these typed nodes, so a misspelt
key fails at start-up with a message naming it (e.g. ``Key 'max_stesp' not in 'TrainerConfig'``),
and a wrong type (``trainer.max_steps=ten``) fails the same way. Add a field here before using it
in a YAML file.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

def bounded(default: Any = MISSING, *, lo: float | None = None, hi: float | None = None,
            above: float | None = None, choices: tuple[Any, ...] | None = None,
            factory: Any = None) -> Any:
    """A schema field whose value (or each element, for a list) :func:`validate` checks: within
    ``[lo, hi]``, strictly above ``above``, or one of ``choices``. The bounds are the documentation:
    a value outside them is a one-line error naming the key before any work starts."""
    meta = {"bounds": {"lo": lo, "hi": hi, "above": above, "choices": choices}}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class PathsConfig:
    root_dir: str = "."
    data_dir: str = "${paths.root_dir}/data"
    runs_dir: str = "${paths.root_dir}/runs"


@dataclass
class SyntheticShardsConfig:
    """If set on a data config, the shards are generated (or reused) before training."""
    out_dir: str = MISSING
    num_samples: int = MISSING
    samples_per_shard: int = 256
    seed: int = 0


@dataclass
class StreamedPhotosConfig:
    """What every training command's data config holds: how photos stream from shards (per device)
    and how they are normalised."""
    image_size: int = bounded(112, lo=16, hi=1024)
    batch_size: int = bounded(64, lo=1, hi=65536)  # per device
    num_workers: int = bounded(2, lo=0, hi=256)  # per device: decoding workers of each stream
    shuffle_buffer: int = bounded(1000, lo=0, hi=10_000_000)  # training photos mixed per worker
    interleave: int = bounded(16, lo=1, hi=1024)  # training shards each worker reads at once (mixing)
    # training JPEGs: decoded in the loader workers, or batched on the training device (nvJPEG on a GPU)
    decode: str = bounded("workers", choices=("workers", "device"))
    clinical: bool = False  # clinical photos are never logged as images unless task.log_clinical_images
    synthetic: bool = False
    mean: list[float] = bounded(lo=-10, hi=10, factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = bounded(above=0, hi=10, factory=lambda: list(IMAGENET_STD))


@dataclass
class DataConfig(StreamedPhotosConfig):
    name: str = MISSING
    train_shards: Any = MISSING  # a brace pattern, `::`-separated string, or a list of shard URLs
    samples_per_epoch: int = bounded(lo=1)  # nominal, global over all ranks
    on_error: str = bounded("skip", choices=("skip", "raise"))  # bad samples: "skip" (counted, logged) or "raise"
    seed: int = 0
    label_keys: list[str] = field(default_factory=list)
    val_shards: Any = None
    val_samples: int = bounded(0, lo=0)
    persistent_workers: bool = False
    pin_memory: bool = False
    generate: Optional[SyntheticShardsConfig] = None


@dataclass
class ModelConfig:
    """The encoder (``fahr.models.create_backbone`` arguments). The size facts below are null for a
    named ``arch``; ``fahr pretrain task.init_from=EXPORT`` fills them (and arch, patch_size) from the
    export's card, so the run's config.yaml states the architecture it trains."""
    arch: str = bounded("vit_tiny", choices=("vit_test", "vit_tiny", "vit_small", "vit_base", "vit_custom"))
    img_size: int = bounded(112, lo=16, hi=1024)
    patch_size: int = bounded(16, choices=(8, 14, 16))
    drop_path_rate: float = bounded(0.0, lo=0.0, hi=0.9)
    global_pool: str = bounded("token", choices=("token", "avg"))
    grad_checkpointing: bool = False
    embed_dim: Optional[int] = bounded(None, lo=8, hi=8192)  # arch vit_custom: width
    depth: Optional[int] = bounded(None, lo=1, hi=128)  # arch vit_custom: blocks
    num_heads: Optional[int] = bounded(None, lo=1, hi=128)  # arch vit_custom: attention heads
    mlp_ratio: Optional[float] = bounded(None, lo=0.25, hi=16.0)  # arch vit_custom: MLP width / width (null: 4)
    norm_eps: Optional[float] = bounded(None, lo=1e-12, hi=1e-2)  # LayerNorm epsilon (null: timm's 1e-6)
    qkv_bias: Optional[bool] = None  # null: true


@dataclass
class PretrainTaskConfig:
    name: str = "mae"
    mask_ratio: float = bounded(0.75, above=0.0, hi=0.99)
    decoder_dim: int = bounded(128, lo=8, hi=4096)
    decoder_depth: int = bounded(2, lo=1, hi=48)
    decoder_heads: int = bounded(4, lo=1, hi=64)
    decoder_mlp_ratio: Optional[float] = bounded(None, lo=0.25, hi=16.0)  # null: 4
    decoder_norm_eps: Optional[float] = bounded(None, lo=1e-12, hi=1e-2)  # null: fahr's (1e-6 blocks, 1e-5 final norm)
    decoder_qkv_bias: Optional[bool] = None  # null: true
    decoder_pos_embed: Optional[str] = bounded(None, choices=("timm", "mae"))  # fixed sin-cos layout; null: timm
    # a backbone export (e.g. from `fahr import-weights`) to continue pretraining from: its encoder, and its
    # MAE decoder when it has one; its architecture and normalisation replace model.* / data.mean,std
    init_from: Optional[str] = None
    norm_pix_loss: bool = True
    base_lr: float = bounded(1.5e-4, above=0.0, hi=1.0)  # LR = base_lr * effective_batch / 256
    min_lr: float = bounded(0.0, lo=0.0, hi=1.0)
    weight_decay: float = bounded(0.05, lo=0.0, hi=10.0)
    betas: list[float] = bounded(lo=0.0, hi=0.99999, factory=lambda: [0.9, 0.95])
    warmup_steps: int = bounded(100, lo=0)
    hflip: bool = True  # device-side horizontal flip augmentation
    log_images_every_n_steps: int = bounded(0, lo=0)  # 0 = never; reconstructions of non-clinical data only
    log_clinical_images: bool = False
    num_log_images: int = bounded(8, lo=1, hi=64)


@dataclass
class StrategyConfig:
    """A distributed strategy with options: the mapping form of ``trainer.strategy``.

    ``fahr.utils.strategies.build_strategy`` checks a mapping against this schema (a misspelt option
    fails naming it) and builds the Lightning strategy object. ``None`` = Lightning's default; an
    option set for a strategy it does not apply to is an error.
    """
    name: str = MISSING  # "ddp", "fsdp" or "deepspeed"
    process_group_backend: Optional[str] = None  # "nccl" (GPU), "gloo" (CPU)
    timeout_minutes: Optional[float] = None  # collective timeout; raise for slow shared filesystems
    # ddp
    find_unused_parameters: Optional[bool] = None
    static_graph: Optional[bool] = None
    gradient_as_bucket_view: Optional[bool] = None
    comm_hook: Optional[str] = None  # "bf16" or "fp16": gradients all-reduced at half the bytes (DDP comm hook)
    # fsdp
    sharding_strategy: Optional[str] = None  # FULL_SHARD, SHARD_GRAD_OP, HYBRID_SHARD, NO_SHARD
    cpu_offload: Optional[bool] = None
    wrap_blocks: Optional[bool] = None  # FSDP unit (and activation checkpointing unit) = one ViT block
    activation_checkpointing: Optional[bool] = None
    state_dict_type: Optional[str] = None  # "full" only: one .ckpt file (sharded FSDP folders hold a pickle)
    # deepspeed (ZeRO)
    stage: Optional[int] = None  # 1, 2 or 3
    offload_optimizer: Optional[bool] = None  # optimizer state and step in CPU memory
    offload_parameters: Optional[bool] = None  # stage 3: parameters in CPU memory
    allgather_bucket_size: Optional[int] = None  # elements
    reduce_bucket_size: Optional[int] = None  # elements


@dataclass
class TrainerConfig:
    """A subset of ``lightning.Trainer`` arguments; add a field to expose another.

    ``num_nodes`` / ``devices`` may be "auto": filled from srun/torchrun by
    ``fahr.utils.distributed_env.trainer_topology``. ``strategy`` is a Lightning strategy name
    ("auto", "ddp", "ddp_spawn", ...) or a mapping checked against :class:`StrategyConfig` and
    turned into a strategy object by ``fahr.utils.strategies.build_strategy``.
    """
    accelerator: str = "auto"
    devices: Any = "auto"  # int, list of indices, "auto" or -1
    num_nodes: Any = 1  # int or "auto"
    strategy: Any = "auto"  # str or StrategyConfig mapping
    precision: Any = "32-true"
    max_steps: Optional[int] = bounded(None, lo=1)  # pretraining's length; the fine-tunes count task.* steps
    max_epochs: int = bounded(-1, lo=-1)
    gradient_clip_val: Optional[float] = bounded(1.0, lo=0.0)
    accumulate_grad_batches: int = bounded(1, lo=1, hi=4096)
    log_every_n_steps: int = bounded(10, lo=1)
    limit_val_batches: Any = None
    val_check_interval: Any = None
    num_sanity_val_steps: int = 0
    fast_dev_run: Any = False
    deterministic: bool = False
    enable_progress_bar: bool = True
    benchmark: Optional[bool] = None
    # not Lightning arguments: the job layer's own (fahr.job)
    compile: bool = False  # torch.compile each transformer block in place (regional; state dict keys unchanged)
    measure_flops: Optional[bool] = None  # FLOPs per sample from the first step, and MFU; None: on GPU runs


@dataclass
class WandbConfig:
    project: str = "fahr"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    mode: Optional[str] = None  # None: WANDB_MODE from the environment; "offline" runs with no network
    # No checkpoint upload option: Lightning's would send pickled checkpoints. The export (safetensors +
    # card) of every command that writes one is logged as a W&B model artifact (fahr.job).


@dataclass
class TensorBoardConfig:
    subdir: str = "tensorboard"


@dataclass
class LoggerConfig:
    """CSV (``metrics.csv`` in the run directory) is always on; W&B and TensorBoard are optional."""
    wandb: Optional[WandbConfig] = None
    tensorboard: Optional[TensorBoardConfig] = None


@dataclass
class CheckpointConfig:
    every_n_train_steps: int = bounded(500, lo=1)
    monitor: str = "train/loss_epoch"
    mode: str = bounded("min", choices=("min", "max"))
    save_top_k: int = bounded(1, lo=-1)


@dataclass
class CallbacksConfig:
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    throughput: bool = True
    lr_monitor: bool = True


@dataclass
class ExportConfig:
    checkpoint: str = "last"  # "last", "best" or a path to a .ckpt
    run_dir: Optional[str] = None  # default: the run directory this config resolves to
    output_dir: Optional[str] = None  # default: <run_dir>/export


@dataclass
class RunConfig:
    """What every training command's config holds: its run (identity, seed, resume, where files go)
    and how it runs (trainer, loggers)."""
    experiment_name: str = "default"
    run_id: Optional[str] = None  # None: derived from a hash of the config (same command = same run)
    seed: int = bounded(0, lo=0, hi=2**32 - 1)
    resume: bool = True  # a run directory holding a checkpoint resumes it
    paths: PathsConfig = field(default_factory=PathsConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class PretrainConfig(RunConfig):
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: PretrainTaskConfig = field(default_factory=PretrainTaskConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def register_schemas() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="pretrain_schema", node=PretrainConfig)


def validate(cfg: Any, schema: type = PretrainConfig) -> None:
    """Re-check a composed config against its schema.

    Hydra's ``+key=value`` may append keys the schema does not know; this rejects them (and wrong
    types) with the key named, before anything runs.

    Raises:
        InputError: an unknown key, a wrong type, or a required (``???``) value left unset.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from fahr.boundary import InputError

    try:
        # merge a plain container: merging the DictConfig itself would carry its appended keys along
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.to_container(cfg, resolve=False))
        missing = sorted(OmegaConf.missing_keys(merged))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        message = str(err).splitlines()[0]
        raise InputError(f"{key}: {message}" if key else message) from None
    if missing:
        raise InputError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required: add "
                         f"{missing[0]}=... to the command line")
    try:
        _check_bounds(schema, merged, "")
    except OmegaConfBaseException as err:  # an interpolation that does not resolve
        key = getattr(err, "full_key", None)
        raise InputError(f"{key}: {str(err).splitlines()[0]}" if key else str(err).splitlines()[0]) from None


def _check_bounds(schema: type, node: Any, prefix: str) -> None:
    """Check every :func:`bounded` field of ``schema`` (recursively) on the merged config ``node``."""
    from fahr.boundary import InputError

    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        value = node[f.name]
        key = prefix + f.name
        kind = hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        inner = args[0] if typing.get_origin(kind) is typing.Union and len(args) == 1 else kind
        if dataclasses.is_dataclass(inner) and value is not None:
            _check_bounds(inner, value, key + ".")
        bounds = f.metadata.get("bounds")
        if bounds is None or value is None:
            continue
        is_list = typing.get_origin(inner) is list or inner is list
        values = list(value) if is_list else [value]
        for v in values:
            problem = _out_of_bounds(v, **bounds)
            if problem:
                raise InputError(f"{key} must be {problem}, got {v!r}")


def _out_of_bounds(value: Any, lo=None, hi=None, above=None, choices=None) -> str | None:
    """What ``value`` should be (the whole allowed range), or None when it is within its bounds."""
    if choices is not None:
        return None if value in choices else f"one of {', '.join(map(str, choices))}"

    def text(v: float) -> str:
        return str(int(v)) if float(v).is_integer() else f"{v:g}"

    if above is not None:
        allowed = f"greater than {text(above)}" + (f" and at most {text(hi)}" if hi is not None else "")
    elif lo is not None and hi is not None:
        allowed = f"in [{text(lo)}, {text(hi)}]"
    else:
        allowed = f"at least {text(lo)}" if lo is not None else f"at most {text(hi)}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"a finite number {allowed}"
    too_low = (above is not None and not value > above) or (lo is not None and value < lo)
    return allowed if too_low or (hi is not None and value > hi) else None
