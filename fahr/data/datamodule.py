"""Lightning DataModule streaming webdataset face shards through :class:`fahr.data.shard_reader.ShardStream`."""

from __future__ import annotations

import logging
from typing import Any

import lightning

from fahr.boundary import InputError
from fahr.data.device_decode import DeviceDecoder, is_encoded
from fahr.data.shard_reader import (
    EvalStream,
    LabelAcceptance,
    ShardStream,
    batches_per_rank,
    eval_loader,
    expand_shards,
    make_loader,
    num_samples_from_index,
    resolve_world,
)

log = logging.getLogger(__name__)


def resume_position(trainer: Any, batches_per_epoch: int) -> tuple[int, int]:
    """``(epoch, batch)`` at which ``trainer`` continues: ``(current_epoch, 0)`` on a fresh start.

    Read when the train loader is built, after Lightning restored the loops from a checkpoint and
    before its restart bookkeeping. Checkpoints are taken at a batch end (ModelCheckpoint, the
    preemption handler), so the epoch loop's ``batch_progress.current.processed`` is the number of
    this epoch's batches already trained, and Lightning continues at that batch index; when it equals
    the epoch length, Lightning moves on to the next epoch.
    """
    loop = trainer.fit_loop
    epoch = trainer.current_epoch
    if not loop.restarting:
        return epoch, 0
    done = loop.epoch_loop.batch_progress.current.processed
    if done >= batches_per_epoch:
        return epoch + 1, 0
    return epoch, done


class ShardDataModule(lightning.LightningDataModule):
    """Train (and optionally validation) batches streamed from webdataset shards.

    Batches are dicts ``{"image": uint8 (B, 3, image_size, image_size), <label>: float32 (B,),
    "__key__": list[str], "n_skipped": int64 ()}`` (see :class:`~fahr.data.shard_reader.ShardStream`).
    ``batch_size`` is per device; ``samples_per_epoch`` is the nominal, global epoch size.

    The stream splits the shards by rank itself, so the Trainer must be built with
    ``use_distributed_sampler=False`` (Lightning would otherwise try to wrap the loaders in a
    DistributedSampler; Lightning 2.6 happens to skip iterable datasets, but do not rely on it).
    Call :meth:`set_epoch` from ``on_train_epoch_start`` so each epoch gets its own shard order.

    Validation, ``val_exact=True`` (the fine-tunes): an :class:`~fahr.data.shard_reader.EvalStream` over
    ``val_shards``: every validation sample exactly once over all ranks, batches of
    ``val_batch_size``, ``val_required`` / ``val_optional`` labels (ranks may get different batch
    counts: gather the results at the epoch end).

    Validation, ``val_exact=False`` (pretraining; only if ``val_shards``): no shuffling, a fixed shard order, rank r reading the
    disjoint subset ``val_shards[r::world_size]``, every rank yielding the same number of batches,
    ``val_samples`` in total (0 = the count in the shards' ``index.json``), rounded up to whole
    global batches. It uses at most ``num_workers`` workers: fewer if there are too few validation
    shards, or if the batch count is not a multiple of them (which would repeat samples). Each sample
    is seen exactly once when the shards are equal-sized and split evenly over ranks and workers.

    ``decode="device"``: the training stream's workers leave the images encoded and
    :meth:`transfer_batch_to_device` decodes each batch's JPEGs in one call onto the training device
    (nvJPEG on a GPU, libjpeg on the CPU) before moving the rest; an image that fails to decode is
    then dropped from its batch instead of replaced (:mod:`fahr.data.device_decode`). Validation
    streams always decode in their workers.

    Args:
        train_shards: shard spec (brace pattern, ``::`` list, list of URLs; see ``expand_shards``).
        samples_per_epoch: nominal samples per training epoch, over all ranks.
        batch_size: samples per batch, per device.
        num_workers: DataLoader workers per device.
        seed: seed of all shuffling (shard order, sample buffer).
        shuffle_buffer: training sample shuffle buffer per worker (0 = off).
        interleave: training shards each worker reads at once (see :class:`ShardStream`).
        label_keys: json label keys returned as float32 tensors (e.g. ``("age",)``, years).
        image_size: image side in pixels (other sizes are resized).
        on_error: bad samples: "skip" (counted in ``n_skipped``, logged) or "raise".
        decode: where training images are decoded: "workers" or "device" (see above).
        val_shards: validation shard spec, or None for no validation.
        val_samples: validation samples per pass over all ranks (0 = from ``index.json``).
        persistent_workers: keep DataLoader workers alive between epochs.
        pin_memory: pin batches for faster host-to-GPU copies.
        accept: per-sample keep probabilities of the training stream (age balancing while streaming).
        val_exact, val_batch_size, val_required, val_optional: exactly-once validation (see above).
    """

    def __init__(
        self,
        train_shards: str | list[str],
        samples_per_epoch: int,
        batch_size: int,
        num_workers: int = 2,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        interleave: int = 16,
        label_keys: tuple = (),
        image_size: int = 112,
        on_error: str = "skip",
        val_shards: str | list | None = None,
        val_samples: int = 0,
        persistent_workers: bool = False,
        pin_memory: bool = False,
        accept: LabelAcceptance | None = None,
        val_exact: bool = False,
        val_batch_size: int | None = None,
        val_required: tuple = (),
        val_optional: tuple = (),
        decode: str = "workers",
    ):
        super().__init__()
        if isinstance(label_keys, str):
            raise InputError(f"label_keys must be a tuple of keys, got the string {label_keys!r}")
        self.train_shards = train_shards
        self.samples_per_epoch = samples_per_epoch
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.interleave = interleave
        self.label_keys = tuple(label_keys)
        self.image_size = image_size
        self.on_error = on_error
        self.decode = decode
        self._device_decoder = DeviceDecoder(image_size, on_error) if decode == "device" else None
        self.val_shards = val_shards
        self.val_samples = val_samples
        self.persistent_workers = persistent_workers
        self.pin_memory = pin_memory
        self.accept = accept
        self.val_exact = val_exact
        self.val_batch_size = val_batch_size or batch_size
        self.val_required, self.val_optional = tuple(val_required), tuple(val_optional)
        self.train_stream: ShardStream | None = None
        self.val_stream: ShardStream | EvalStream | None = None
        self._epoch = 0
        self._resume_at = (0, 0)  # (epoch, batch) the trainer continues at

    # ---- distributed context ----
    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return resolve_world(trainer.world_size, trainer.global_rank)
        return resolve_world()

    # ---- Lightning hooks ----
    def setup(self, stage: str | None = None) -> None:
        """Expand the shard specs (missing shards fail here) and build the streams for this rank."""
        world_size, rank = self._world()
        for name in ("train_stream", "val_stream"):  # built for another world (e.g. before the trainer)?
            stream = getattr(self, name)
            if stream is not None and (stream.world_size, stream.rank) != (world_size, rank):
                setattr(self, name, None)
        if stage in (None, "fit") and self.train_stream is None:
            self.train_stream = ShardStream(
                expand_shards(self.train_shards),
                samples_per_epoch=self.samples_per_epoch,
                batch_size=self.batch_size,
                seed=self.seed,
                shuffle_buffer=self.shuffle_buffer,
                interleave=self.interleave,
                label_keys=self.label_keys,
                image_size=self.image_size,
                on_error=self.on_error,
                world_size=world_size,
                rank=rank,
                num_workers=self.num_workers,
                accept=self.accept,
                decode=self.decode,
            )
            self.set_epoch(self._epoch)
            log.info(
                "train stream: %d shards, %d batches of %d per rank per epoch (%d samples over %d ranks)",
                len(self.train_stream.shards), len(self.train_stream), self.batch_size,
                self.train_stream.samples_per_epoch_effective, world_size,
            )
        if stage in (None, "fit", "validate") and self.val_shards and self.val_stream is None:
            self.val_stream = self._build_val_stream(world_size, rank)

    def _build_val_stream(self, world_size: int, rank: int) -> ShardStream | EvalStream:
        shards = expand_shards(self.val_shards)
        if self.val_exact:
            return EvalStream(shards, self.val_batch_size, self.image_size, required=self.val_required,
                              optional=self.val_optional, world_size=world_size, rank=rank,
                              num_workers=self.num_workers)
        if len(shards) < world_size:
            raise InputError(
                f"{len(shards)} validation shards cannot be split over {world_size} ranks (each needs at "
                f"least one); write the validation data into >= {world_size} shards"
            )
        samples = self.val_samples
        if samples <= 0:
            samples = num_samples_from_index(shards) or 0
            if samples <= 0:
                raise InputError(
                    f"val_samples is {self.val_samples} and the validation shards' size is not listed in an "
                    f"index.json next to them; set val_samples (validation samples per pass, all ranks)"
                )
        # as many workers as allowed whose count divides the batch count: rounding the batches up to a
        # multiple of the workers would repeat validation samples
        batches = batches_per_rank(samples, self.batch_size, world_size, 1)
        workers = min(self.num_workers, len(shards) // world_size)
        while workers > 1 and batches % workers:
            workers -= 1
        if workers < self.num_workers:
            log.info("validation: %d batches per rank from %d shards over %d ranks -> %d workers per rank",
                     batches, len(shards), world_size, workers)
        return ShardStream(
            shards,
            samples_per_epoch=samples,
            batch_size=self.batch_size,
            seed=self.seed,
            shuffle_buffer=0,
            label_keys=self.label_keys,
            image_size=self.image_size,
            on_error=self.on_error,
            world_size=world_size,
            rank=rank,
            num_workers=workers,
            shuffle_shards=False,
        )

    def train_dataloader(self) -> Any:
        if self.train_stream is None:
            self.setup("fit")
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            # Lightning builds the first epoch's iterator (and starts the workers) before
            # `on_train_epoch_start`; a resumed run must already stream its restored position.
            epoch, start = resume_position(trainer, len(self.train_stream))
            self._resume_at = (epoch, start)
            self.set_epoch(epoch)
            if start:
                log.info("resuming epoch %d at batch %d of %d (per rank)", epoch, start, len(self.train_stream))
        return make_loader(self.train_stream, self.num_workers, pin_memory=self.pin_memory,
                           persistent_workers=self.persistent_workers)

    def val_dataloader(self) -> Any:
        if not self.val_shards:
            return []
        if self.val_stream is None:
            self.setup("validate")
        if isinstance(self.val_stream, EvalStream):
            return eval_loader(self.val_stream)
        return make_loader(self.val_stream, self.val_stream.num_workers, pin_memory=self.pin_memory,
                           persistent_workers=self.persistent_workers)

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        """Decode a ``decode="device"`` batch's images onto ``device``, then move the rest.

        This hook, rather than ``on_before_batch_transfer``, because it is given the target device,
        and ``decode_jpeg(device="cuda")`` takes the encoded bytes from host memory, as they come
        from the loader."""
        if self._device_decoder is not None and is_encoded(batch):
            batch = self._device_decoder(batch, device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # ---- epochs ----
    def set_epoch(self, epoch: int) -> None:
        """Select the training epoch (shard order, shuffling); call from ``on_train_epoch_start``.

        The epoch a resumed run continues in starts at the batch Lightning continues at (depending
        on its restart state, Lightning creates that epoch's iterator before or after this hook)."""
        self._epoch = int(epoch)
        if self.train_stream is not None:
            resume_epoch, start = self._resume_at
            self.train_stream.set_epoch(self._epoch, start_batch=start if self._epoch == resume_epoch else 0)

    @property
    def batches_per_epoch(self) -> int:
        """Training batches per rank per epoch (the same on every rank)."""
        if self.train_stream is not None:
            return len(self.train_stream)
        world_size, _ = self._world()
        return batches_per_rank(self.samples_per_epoch, self.batch_size, world_size, self.num_workers)


def datamodule_from_config(data: Any) -> "ShardDataModule":
    """The :class:`ShardDataModule` of a pretraining ``data`` config node (its shards must exist;
    index references resolved by :func:`fahr.data.shard_index.resolve_shard_spec`)."""
    from omegaconf import OmegaConf

    from fahr.data.shard_index import resolve_shard_spec

    val = data.val_shards
    return ShardDataModule(
        train_shards=resolve_shard_spec(OmegaConf.to_object(data.train_shards)
                                          if OmegaConf.is_config(data.train_shards) else data.train_shards),
        samples_per_epoch=data.samples_per_epoch,
        batch_size=data.batch_size,
        num_workers=data.num_workers,
        seed=data.seed,
        shuffle_buffer=data.shuffle_buffer,
        interleave=data.interleave,
        label_keys=tuple(data.label_keys),
        image_size=data.image_size,
        on_error=data.on_error,
        val_shards=resolve_shard_spec(OmegaConf.to_object(val) if OmegaConf.is_config(val) else val) if val else None,
        val_samples=data.val_samples,
        persistent_workers=data.persistent_workers,
        pin_memory=data.pin_memory,
        decode=data.decode,
    )
