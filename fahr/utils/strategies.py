"""``trainer.strategy`` config -> Lightning strategy.

A string ("auto", "ddp", "ddp_spawn", "deepspeed_stage_2", ...) goes to Lightning unchanged. A mapping
(``conf/trainer/{ddp,fsdp,deepspeed_stage_*}.yaml``) is checked against
:class:`fahr.config.schema.StrategyConfig` and becomes a ``DDPStrategy``, ``FSDPStrategy`` or
``DeepSpeedStrategy`` with those options, because Lightning's registry names cannot carry options
such as the FSDP wrapping unit or ZeRO offload.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Mapping

from fahr.boundary import InputError

# Options each strategy accepts (StrategyConfig field names); the rest must stay None.
_COMMON = {"process_group_backend", "timeout_minutes"}
OPTIONS = {
    "ddp": _COMMON | {"find_unused_parameters", "static_graph", "gradient_as_bucket_view", "comm_hook"},
    "fsdp": _COMMON | {"sharding_strategy", "cpu_offload", "wrap_blocks", "activation_checkpointing",
                       "state_dict_type"},
    "deepspeed": _COMMON | {"stage", "offload_optimizer", "offload_parameters", "allgather_bucket_size",
                            "reduce_bucket_size"},
}


def strategy_options(strategy: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Validate a strategy mapping: ``(name, options that are set)``.

    Raises:
        ValueError: unknown strategy name, a misspelt or mistyped option, or an option that does not
            apply to this strategy (e.g. ``stage`` for ddp).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from fahr.config.schema import StrategyConfig

    raw = OmegaConf.to_container(strategy, resolve=True) if OmegaConf.is_config(strategy) else dict(strategy)
    try:
        cfg = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(StrategyConfig), raw))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or ""
        msg = str(err).splitlines()[0]
        raise InputError(f"trainer.strategy.{key}: {msg} (see StrategyConfig in fahr/config/schema.py)") from err
    name = cfg.pop("name")
    if name not in OPTIONS:
        raise InputError(f"trainer.strategy.name={name!r}: a strategy with options is one of {sorted(OPTIONS)}; "
                         f"other Lightning strategies are given by name alone (trainer.strategy={name})")
    options = {k: v for k, v in cfg.items() if v is not None}
    wrong = sorted(set(options) - OPTIONS[name])
    if wrong:
        raise InputError(f"trainer.strategy: option(s) {', '.join(wrong)} do not apply to {name} "
                         f"(it takes {', '.join(sorted(OPTIONS[name]))})")
    return name, options


def build_strategy(strategy: Any, *, batch_size: int | None = None) -> Any:
    """The ``strategy`` argument for ``lightning.Trainer``.

    Args:
        strategy: ``cfg.trainer.strategy``: a Lightning strategy name, or a mapping (``name`` +
            :class:`~fahr.config.schema.StrategyConfig` options).
        batch_size: samples per device per step; DeepSpeed needs it for its own logging because the
            shard stream batches inside the dataset (no batch sampler to read it from).

    Returns:
        The string unchanged, or a ``DDPStrategy`` / ``FSDPStrategy`` / ``DeepSpeedStrategy``.
    """
    if strategy is None or isinstance(strategy, str):
        return strategy or "auto"
    name, opts = strategy_options(strategy)
    common: dict[str, Any] = {}
    if "process_group_backend" in opts:
        common["process_group_backend"] = opts.pop("process_group_backend")
    if "timeout_minutes" in opts:
        common["timeout"] = timedelta(minutes=opts.pop("timeout_minutes"))

    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        hook = opts.pop("comm_hook", None)
        if hook is None:
            return DDPStrategy(**common, **opts)  # the rest go to DistributedDataParallel
        return ddp_with_comm_hook()(ddp_comm_hook=comm_hook(hook), **common, **opts)

    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        if opts.get("state_dict_type", "full") != "full":
            # a sharded FSDP checkpoint is torch.distributed.checkpoint's folder, whose metadata is read
            # with pickle.load: resuming or exporting it would unpickle; "full" is one weights-only file
            raise InputError("trainer.strategy.state_dict_type must be 'full': sharded FSDP checkpoints keep "
                             "their metadata as a pickle, which fahr never loads (DeepSpeed's folders are read "
                             "safely: trainer=deepspeed_stage_3 shards the checkpoint too)")
        from timm.models.vision_transformer import Block  # the encoder's and the MAE decoder's block

        blocks = {Block}
        if opts.pop("wrap_blocks", False):
            common["auto_wrap_policy"] = blocks
        if opts.pop("activation_checkpointing", False):
            common["activation_checkpointing_policy"] = blocks
        return FSDPStrategy(**common, **opts)

    if batch_size is not None:
        common["logging_batch_size_per_gpu"] = int(batch_size)
    strategy = safe_deepspeed_strategy()(**common, **opts)
    if opts.get("offload_optimizer"):
        # The task's torch AdamW then steps on the CPU: correct, slower than DeepSpeedCPUAdam (which
        # needs DeepSpeed's compiled cpu_adam op); DeepSpeed refuses a client optimizer unless told.
        strategy.config["zero_force_ds_cpu_optimizer"] = False
    return strategy


def comm_hook(name: str) -> Any:
    """PyTorch's DDP gradient-compression hook: ``"bf16"`` or ``"fp16"`` (each bucket is cast, all-reduced
    and cast back: half the bytes on the wire; bf16 keeps fp32's range, fp16 its precision)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    hooks = {"bf16": default_hooks.bf16_compress_hook, "fp16": default_hooks.fp16_compress_hook}
    if name not in hooks:
        raise InputError(f"trainer.strategy.comm_hook={name!r}: one of {sorted(hooks)} (or null: full precision)")
    return hooks[name]


def ddp_with_comm_hook() -> type:
    """Lightning's ``DDPStrategy`` that registers its comm hook on any device. Lightning registers hooks
    only for CUDA (a PyTorch 1.8 limit); PyTorch's compression hooks run over gloo too, so a CPU run
    compresses like the GPU run it stands in for (and the option can be tested on a CPU)."""
    from lightning.pytorch.overrides.distributed import _register_ddp_comm_hook
    from lightning.pytorch.strategies import DDPStrategy

    class CommHookDDPStrategy(DDPStrategy):
        def _register_ddp_hooks(self) -> None:
            if self.root_device.type == "cuda":
                return super()._register_ddp_hooks()
            _register_ddp_comm_hook(model=self.model, ddp_comm_state=self._ddp_comm_state,
                                    ddp_comm_hook=self._ddp_comm_hook, ddp_comm_wrapper=self._ddp_comm_wrapper)
            return None

    return CommHookDDPStrategy


def safe_deepspeed_strategy() -> type:
    """Lightning's ``DeepSpeedStrategy`` whose resume reads DeepSpeed's files weights-only
    (:func:`fahr.utils.checkpoint_io.load_deepspeed_file`): DeepSpeed's own checkpoint engine loads
    them with ``weights_only=False``, which would run whatever a checkpoint file holds."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    class SafeDeepSpeedStrategy(DeepSpeedStrategy):
        def load_checkpoint(self, checkpoint_path: Any, weights_only: Any = None) -> dict[str, Any]:
            load_checkpoints_weights_only(self.deepspeed_engine)
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    return SafeDeepSpeedStrategy


def load_checkpoints_weights_only(engine: Any) -> None:
    """Make a ``deepspeed.DeepSpeedEngine`` read checkpoint files weights-only (its checkpoint engine's
    ``load`` is the one place its resume reads files)."""
    from fahr.utils.checkpoint_io import load_deepspeed_file

    engine.checkpoint_engine.load = lambda path, map_location=None: load_deepspeed_file(path, map_location or "cpu")


__all__ = ["build_strategy", "strategy_options", "safe_deepspeed_strategy", "load_checkpoints_weights_only", "OPTIONS"]
