"""Stream webdataset shards of face crops as ready-made uint8 batches, with exact DDP epoch arithmetic.

The shard format and the batch format are defined in the project conventions: each sample is a
``__key__``, a ``jpg`` (112x112 RGB face crop) and a ``json`` dict of labels; each batch is a dict
``{"image": uint8 (B, 3, H, W), <label>: float32 (B,), "__key__": list[str], "n_skipped": int64 ()}``.

URLs are expanded (braces, ``::``) and opened (local paths, ``pipe:`` commands, http(s) via curl) with
webdataset's own functions (``shardlists.expand_urls``, ``gopen.gopen``). Tar shards (plain, or
gzip/bzip2/xz compressed) are parsed by :func:`_iter_tar_members`, a small header parser that accepts
and rejects what Python's ``tarfile`` does (fuzzed against it in tests/test_tar_reader.py) and is
stricter where tarfile is lenient. It costs ~5 us per member against ~23 us for ``tarfile`` in stream
mode (which webdataset's ``tar_file_iterator`` uses; 60-70 us with its per-member overheads), beside
~200-280 us to decode a 112x112 JPEG.
"""

from __future__ import annotations

import bz2
import gzip
import io
import itertools
import json
import logging
import lzma
import math
import multiprocessing
import os
import random
import re
import signal
import zlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as tvf
from webdataset.filters import _shuffle
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls

from fahr.boundary import InputError

log = logging.getLogger(__name__)

#: the member name endings a shard sample's image may have, in the order they are looked for
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
"""Sample members tried, in order, as the image of a sample."""

#: the batch fields of decode="device" that stand for "image" until the training process decodes them
ENCODED_KEYS = ("encoded", "encoded_length", "encoded_member", "encoded_shard")
_RESERVED_KEYS = frozenset({"image", "__key__", "n_skipped", *ENCODED_KEYS})
DECODE_CHOICES = ("workers", "device")
"""Where a ShardStream's JPEGs are decoded: in the DataLoader workers, or batched in the training
process onto the training device (:mod:`fahr.data.device_decode`)."""
_MAX_SAMPLE_WARNINGS = 5  # per worker process; later bad samples are only counted and summarised
_READ_BUFFER = 1 << 20
_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_META_NAME = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: e.g. "__index__" members
_END_OF_PASS = object()
_RGB = ImageReadMode.RGB.value
try:
    # torchvision's decode kernel, called directly: decode_image() adds ~25 us per call (deprecation
    # warning, API-usage logging), a tenth of a 112x112 decode. Same kernel, same arguments.
    _decode_kernel = torch.ops.image.decode_image
except (AttributeError, RuntimeError):  # pragma: no cover - torchvision built without image ops
    _decode_kernel = None


def decode_rgb(data: torch.Tensor) -> torch.Tensor:
    """Decode encoded image bytes (uint8 (N,)) into uint8 RGB (3, H, W) (JPEG, PNG, WebP, GIF).

    Raises RuntimeError if the bytes are not a decodable image."""
    if _decode_kernel is not None:
        return _decode_kernel(data, _RGB, False)
    return decode_image(data, mode=ImageReadMode.RGB)


class ShardReadError(InputError):
    """A shard could not be opened or read completely (missing, truncated, corrupt tar, failed pipe):
    bad input, so ``fahr <command>`` reports it on one line naming the shard."""


# ---- shard lists ----------------------------------------------------------------------------------


def _is_local(url: str) -> bool:
    return not url.startswith("pipe:") and urlparse(url).scheme in ("", "file")


def _local_path(url: str) -> str:
    return url2pathname(urlparse(url).path) if url.startswith("file:") else url


def expand_shards(spec: str | list[str]) -> list[str]:
    """Expand a shard spec into the list of shard URLs.

    ``spec`` is a string or a list of strings. Each string may hold several URLs separated by ``::``
    and brace patterns (``data/x-{000000..000009}.tar``), both expanded by webdataset's
    ``expand_urls`` (which also substitutes ``${NAME}`` from the environment variable ``WDS_NAME``).
    A URL is a local path (optionally ``file:``), a ``pipe:`` shell command writing the tar to stdout,
    or an http(s) URL (read with curl).

    Raises:
        ValueError: nothing results ("empty shard list"), or an entry is not a string.
        FileNotFoundError: a local shard does not exist (names the first missing one and the count).
    """
    if isinstance(spec, str):
        parts = [spec]
    elif isinstance(spec, (list, tuple)):
        parts = list(spec)
    else:
        raise InputError(f"shard spec must be a string or a list of strings, got {type(spec).__name__}: {spec!r}")
    urls: list[str] = []
    for part in parts:
        if not isinstance(part, str):
            raise InputError(f"shard spec entries must be strings, got {type(part).__name__}: {part!r}")
        try:
            urls.extend(u.strip() for u in expand_urls(part))
        except AssertionError as exn:  # webdataset asserts on ${NAME} without a WDS_NAME variable
            raise InputError(f"cannot expand shard spec {part!r}: {exn}") from None
    urls = [u for u in urls if u]
    if not urls:
        raise InputError(f"empty shard list from spec {spec!r}")
    missing = [u for u in urls if _is_local(u) and not os.path.isfile(_local_path(u))]
    if missing:
        raise InputError(
            f"shard not found: {missing[0]} ({len(missing)} of {len(urls)} local shards missing, spec {spec!r})"
        )
    return urls


def batches_per_rank(samples_per_epoch: int, batch_size: int, world_size: int, num_workers: int) -> int:
    """Batches each rank yields per epoch: ceil(samples / (batch_size * world_size)), rounded up to a
    multiple of max(1, num_workers). See :class:`ShardStream` for a worked example."""
    workers = max(1, num_workers)
    n = math.ceil(samples_per_epoch / (batch_size * world_size))
    return math.ceil(n / workers) * workers


def resolve_world(world_size: int | None = None, rank: int | None = None) -> tuple[int, int]:
    """``(world_size, rank)``: the given values, else torch.distributed's if initialised, else the
    environment variables ``WORLD_SIZE`` / ``RANK``, else ``(1, 0)``."""
    if world_size is None or rank is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            found = torch.distributed.get_world_size(), torch.distributed.get_rank()
        else:
            found = tuple(_env_int(name, default) for name, default in (("WORLD_SIZE", 1), ("RANK", 0)))
        world_size = found[0] if world_size is None else world_size
        rank = found[1] if rank is None else rank
    world_size, rank = int(world_size), int(rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise InputError(f"invalid distributed setup: rank {rank} of world_size {world_size}")
    return world_size, rank


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise InputError(f"environment variable {name}={value!r} is not an integer") from None


def num_samples_from_index(shards: list[str]) -> int | None:
    """Total samples of local ``shards`` according to the ``index.json`` next to them, or None if
    any shard is not listed (see :func:`fahr.data.shard_index.sample_counts`)."""
    from fahr.data.shard_index import sample_counts

    counts = sample_counts(shards)
    return None if counts is None else sum(counts[url] for url in shards)


# ---- reading tar shards ---------------------------------------------------------------------------


class _RawReader(io.RawIOBase):
    """Adapts any ``read(n)`` stream (file, webdataset Pipe) so io.BufferedReader can buffer it."""

    def __init__(self, src: Any):
        self._src = src
        self._readinto = getattr(src, "readinto", None)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._readinto is not None:
            return self._readinto(b) or 0
        data = self._src.read(len(b))
        b[: len(data)] = data
        return len(data)


# Member types as tarfile names them. tarfile skips a member's data blocks only for regular files and
# types it does not know; links, directories and devices are taken to have none, whatever their size.
_REGULAR = frozenset(b"0\x007")  # REGTYPE, AREGTYPE, CONTTYPE
_NO_DATA = frozenset(b"123456")  # LNKTYPE, SYMTYPE, CHRTYPE, BLKTYPE, DIRTYPE, FIFOTYPE
_GNU_LONG = frozenset(b"LK")  # GNU long name / long link name of the next member
_PAX = frozenset(b"xX")  # POSIX extended header (and Solaris' X) for the next member
_PAX_GLOBAL = 103  # b"g"
_GNU_SPARSE = 83  # b"S"
_PAX_RECORD_LENGTH = re.compile(rb"([0-9]{1,20}) ")
_MAX_MEMBER = 1 << 30  # bytes; a face crop is ~5 kB, and a hostile header may claim 2**88


def _nti(field: bytes) -> int:
    """A numeric header field exactly as ``tarfile.nti`` reads it (octal up to a NUL, or GNU base-256).

    Raises ValueError where tarfile raises InvalidHeaderError.
    """
    if field[0] == 0o200 or field[0] == 0o377:
        n = int.from_bytes(field[1:], "big")
        return n - 256 ** (len(field) - 1) if field[0] == 0o377 else n
    text = field.split(b"\0", 1)[0].decode("ascii")  # UnicodeDecodeError is a ValueError
    return int(text.strip() or "0", 8)


def _checksum_ok(header: bytes) -> bool:
    """tarfile's rule: the stored sum equals the header's unsigned or signed byte sum, the checksum field
    counted as eight spaces. For an ASCII header both sums are equal and below 65521, so adler32's low
    half ((1 + byte sum) mod 65521, 0.3 us against ~5 us for sum()) gives the sum exactly."""
    stored = _nti(header[148:156])
    if header.isascii():
        return stored == (zlib.adler32(header) & 0xFFFF) - 1 - sum(header[148:156]) + 256
    unsigned = 256 + sum(header[:148]) + sum(header[156:])
    signed = unsigned - 256 * sum(1 for b in itertools.chain(header[:148], header[156:]) if b > 127)
    return stored == unsigned or stored == signed


def _nts(field: bytes) -> str:
    """A NUL-terminated name field, decoded as tarfile does (UTF-8, undecodable bytes kept as surrogates)."""
    end = field.find(0)
    return (field if end < 0 else field[:end]).decode("utf-8", "surrogateescape")


def _parse_pax(data: bytes, offset: int) -> dict[str, str]:
    """POSIX.1-2008 extended header records ``"%d %s=%s\\n"`` (length counts the whole record).

    Read as tarfile reads them, but strictly: a record whose length is zero, runs past the data or
    does not end in a newline is an error (tarfile 3.11 reads some such records into garbage values).
    """
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        match = _PAX_RECORD_LENGTH.match(data, pos)
        length = int(match.group(1)) if match else 0
        end = pos + length
        record = data[match.end() : end - 1] if match else b""
        if not match or length == 0 or end > len(data) or data[end - 1] != 10 or b"=" not in record[1:]:
            raise InputError(f"malformed pax record at byte {offset + pos}")
        key, _, value = record.partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return records


def _iter_tar_members(f: io.BufferedReader) -> Iterator[tuple[str, bytearray]]:
    """``(name, data)`` of the regular members of an uncompressed tar stream (POSIX, GNU or v7), in order.

    Accepts and rejects what ``tarfile`` does, names and bytes included (tests/test_tar_reader.py fuzzes
    the two against each other), and is stricter where tarfile is lenient:
    - a stream must end with the end-of-archive block (tarfile stops quietly at a truncated or invalid
      header after the first member, losing the rest of a shard);
    - sparse members, and global pax headers that set a path or a size, are refused (tarfile applies
      such a global header to every later member);
    - pax records must be well formed.
    Raises InputError describing the problem and the byte offset.
    """
    read, readinto = f.read, f.readinto
    offset = 0
    name_override: str | None = None  # from a GNU long name or pax path: the outermost extension wins
    size_override: int | None = None  # from a pax size
    extended = False  # an extension header (L, K, x, X, g) waits for the member it belongs to
    while True:
        header = read(_BLOCK)
        if len(header) != _BLOCK:
            if not header:
                raise InputError(f"stream ends at byte {offset} without the end-of-archive marker (truncated?)")
            raise InputError(f"truncated tar header at byte {offset}")
        if header == _ZERO_BLOCK:
            if extended:
                raise InputError(f"an extension header at the end of the archive names no member (byte {offset})")
            return
        kind = header[156]
        try:
            if not _checksum_ok(header):
                raise InputError(f"tar header checksum mismatch at byte {offset}")
            for start, stop in ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345)):
                _nti(header[start:stop])  # mode, uid, gid, mtime, devmajor, devminor: tarfile checks them
            size = _nti(header[124:136])
        except ValueError:
            raise InputError(f"invalid tar header at byte {offset}") from None
        offset += _BLOCK
        if kind in _NO_DATA or (kind == 0 and _nts(header[:100]).endswith("/")):
            name_override, size_override, extended = None, None, False  # a link, directory or device: no data
            continue
        if kind == _GNU_SPARSE:
            raise InputError(f"unsupported sparse member at byte {offset - _BLOCK}")
        final = not (kind in _GNU_LONG or kind in _PAX or kind == _PAX_GLOBAL)
        if final and size_override is not None:
            size = size_override
        if not 0 <= size <= _MAX_MEMBER:
            raise InputError(f"member size {size} at byte {offset - _BLOCK} is negative or over {_MAX_MEMBER} bytes")
        padded = size + (-size % _BLOCK)
        if kind in _REGULAR:
            name = name_override
            if name is None:
                name = _nts(header[:100])
                prefix = _nts(header[345:500])
                if prefix:
                    name = prefix + "/" + name
            name_override, size_override, extended = None, None, False
            data = bytearray(padded)
            if readinto(data) != padded:
                raise InputError(f"member {name} truncated (stream ends inside its {size} bytes at byte {offset})")
            del data[size:]
            offset += padded
            if name[:1] != "_" or not _META_NAME.match(name):
                yield name, data
            continue
        payload = read(padded)
        if len(payload) != padded:
            raise InputError(f"tar stream truncated inside a header extension at byte {offset}")
        extended = not final
        if kind in _GNU_LONG:
            if kind == 76:  # b"L": the next member's name (up to a NUL, padding included, as tarfile)
                name_override = _nts(payload) if name_override is None else name_override
        elif kind in _PAX:
            records = _parse_pax(payload[:size], offset)
            if "path" in records and name_override is None:
                name_override = records["path"].rstrip("/")
            if "size" in records and size_override is None:
                try:
                    size_override = int(records["size"])
                except ValueError:
                    size_override = 0  # as tarfile
            if any(k.startswith("GNU.sparse.") for k in records):
                raise InputError(f"unsupported sparse member (pax) at byte {offset - _BLOCK}")
        elif kind == _PAX_GLOBAL:
            records = _parse_pax(payload[:size], offset)
            if {"path", "size"} & records.keys() or any(k.startswith("GNU.sparse.") for k in records):
                raise InputError(f"a global pax header sets a member's path or size at byte {offset - _BLOCK}")
        else:
            name_override = size_override = None  # a type tarfile does not know: data skipped, as tarfile does
        offset += padded


def _decompressed(f: io.BufferedReader) -> Any:
    """``f`` itself, or a reader of its content when it starts like a gzip, bzip2 or xz stream."""
    head = f.peek(6)[:6]
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f, mode="rb")
    if head[:3] == b"BZh":
        return bz2.BZ2File(f, mode="rb")
    if head == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(f, mode="rb")
    return f


def read_shard(url: str) -> Iterator[dict[str, Any]]:
    """Samples of one shard in file order: dicts ``{"__key__", "__url__", <ext>: bytes-like, ...}``.

    Members are grouped as ``webdataset.tariterators.group_by_keys`` does with ``base_plus_ext``
    (key = path up to the first dot of the file name, extension lower-cased; names without such a
    dot are ignored); the split is done with string methods, 10x faster than that regex.

    Raises:
        ShardReadError: the shard is missing or unreadable, truncated, not a valid tar, holds
            duplicate members, or its ``pipe:`` command fails. Always raised, never skipped.
    """
    try:
        src = gopen(url, "rb")
    except Exception as exn:
        raise ShardReadError(f"cannot open shard {url}: {exn}") from exn
    complete = False
    try:
        f = io.BufferedReader(_RawReader(src), buffer_size=_READ_BUFFER)
        members = _iter_tar_members(_decompressed(f))
        sample: dict[str, Any] | None = None
        for name, data in members:
            start = name.rfind("/") + 1
            dot = name.find(".", start)
            if dot <= start:
                continue
            key, ext = name[:dot], name[dot + 1 :].lower()
            if sample is None or key != sample["__key__"]:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": url}
            elif ext in sample:
                raise InputError(f"duplicate member {name} for key {key}")
            sample[ext] = data
        if sample is not None:
            yield sample
        while f.read(_READ_BUFFER):  # drain, so a pipe: command's exit status is checked on close
            pass
        complete = True
    except ShardReadError:
        raise
    except Exception as exn:
        raise ShardReadError(f"cannot read shard {url}: {type(exn).__name__}: {exn}") from exn
    finally:
        try:
            src.close()
        except Exception as exn:
            if complete:
                raise ShardReadError(f"cannot read shard {url}: {type(exn).__name__}: {exn}") from exn


# ---- the stream -----------------------------------------------------------------------------------


class _BadSample(Exception):
    pass


def _new_batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor; inside a DataLoader worker it is allocated in shared memory
    (as torch's default_collate does), so handing it to the main process copies nothing."""
    base = torch.empty(0, dtype=torch.uint8)
    if get_worker_info() is None:
        return base.new_empty(shape)
    storage = base._typed_storage()._new_shared(math.prod(shape), device=base.device)
    return base.new(storage).view(shape)


def _packed(encoded: list[bytearray], members: list[str], urls: list[str]) -> dict[str, Any]:
    """The encoded images of a batch end to end in one uint8 buffer (see ShardStream, decode="device")."""
    lengths = [len(data) for data in encoded]
    buffer = _new_batch_buffer((sum(lengths),))
    flat = buffer.numpy()
    at = 0
    for data, n in zip(encoded, lengths):
        flat[at : at + n] = memoryview(data)
        at += n
    return {"encoded": buffer, "encoded_length": torch.tensor(lengths, dtype=torch.int64),
            "encoded_member": members, "encoded_shard": urls}


def _interleave(urls: list[str], at_once: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """The samples of ``urls``, reading ``at_once`` shards at a time: each sample comes from one of
    the open shards chosen by ``rng``; a finished shard is replaced by the next one of ``urls``."""
    pending = iter(urls)
    open_shards = [read_shard(url) for url in itertools.islice(pending, at_once)]
    try:
        while open_shards:
            i = rng.randrange(len(open_shards))
            try:
                yield next(open_shards[i])
            except StopIteration:
                following = next(pending, None)
                if following is None:
                    open_shards.pop(i)
                else:
                    open_shards[i] = read_shard(following)
    finally:
        for shard in open_shards:
            shard.close()


class ShardStream(IterableDataset):
    """Batches of decoded face crops from webdataset shards, identical batch counts on every rank.

    Use with ``DataLoader(batch_size=None)`` (see :func:`make_loader`): decoding and batching happen
    in the workers. Each batch is ``{"image": uint8 (B, 3, image_size, image_size) RGB, 0-255,
    <label key>: float32 (B,) for each of label_keys, "__key__": list[str] (B,),
    "n_skipped": int64 () bad samples this worker skipped since its previous batch}``.
    ``image`` is in channels_last memory format (strides (H*W*3, 1, W*3, 3)): the decoder produces
    interleaved RGB, and un-interleaving uint8 on the CPU would cost ~25% of the decode time. Device
    code is unaffected (element-wise ops and convolutions take any layout); call ``.contiguous()``
    where a plain layout is needed (``.view`` on the pixel dims, say).

    Epoch arithmetic (``samples_per_epoch`` is nominal and global, ``batch_size`` is per rank)::

        global_batch     = batch_size * world_size
        batches_per_rank = ceil(samples_per_epoch / global_batch), rounded up to a multiple of max(1, num_workers)
        per worker       = batches_per_rank / max(1, num_workers) batches, exactly; len(stream) = batches_per_rank

    Worked example: samples_per_epoch=10_000, batch_size=64, world_size=4, num_workers=3 ->
    global_batch=256, ceil(10_000/256)=40 -> 42 batches per rank, 14 per worker; an epoch really is
    42 * 256 = 10_752 samples. It needs >= 4 * 3 = 12 shards.

    Shard assignment, each epoch: the shard list is shuffled by ``random.Random(seed + epoch)``
    (identical on all ranks), rank r takes ``order[r::world_size]``, and its worker w takes
    ``those[w::max(1, num_workers)]``. A worker streams its shards in that order; if its quota is not
    filled when they run out it makes another pass over them, reshuffled with a seed specific to
    (seed, epoch, rank, worker, pass), and it stops exactly at its quota. Samples thus repeat only if
    the epoch asks for more than the worker's shards hold. When samples_per_epoch equals the data
    size, shards are equal-sized and the shard count is a multiple of world_size * num_workers whose
    per-worker share is a whole number of batches, every sample is seen exactly once per epoch.

    Mixing: a worker reads ``interleave`` of its shards at once, taking each sample from one of the
    open shards at random (a finished shard is replaced by the next of its order), and then passes
    the samples through a shuffle buffer (``shuffle_buffer`` samples, 0 = off). Both are per worker and
    per pass, seeded by (seed, epoch, rank, worker, pass): deterministic, different across ranks and
    workers. Interleaving matters because shards hold their samples in the order they were written
    (a data set's file order: UTKFace's sorts by age, so one shard can hold nothing but 1-year-olds),
    and a buffer only mixes the few shards it has seen lately.

    Call :meth:`set_epoch` before iterating an epoch; the value lives in shared memory, so it also
    reaches persistent DataLoader workers. Iterated outside a DataLoader worker with
    ``num_workers > 1``, the stream yields the workers' batches round-robin, as a DataLoader would.

    Mid-epoch start (resuming a preempted run): ``set_epoch(epoch, start_batch=k)`` makes the next
    iteration yield batches k, k+1, ... of that epoch's rank-local order, exactly as the uninterrupted
    iteration would have yielded them. Batch i of a rank comes from worker i % W (W = max(1,
    num_workers)), so the DataLoader worker j plays worker (j + k) % W and each skips its own share.
    Skipping reads no pixels: with no sample shuffle buffer, no interleaving, no acceptance and
    per-shard counts in ``index.json``, whole shards are passed over unopened; otherwise undecoded
    samples are read and dropped (~10 us each). Every skipped sample is counted as good, so the resumed order is exact unless the skipped
    part held bad samples (each one shifts the rest of the epoch by one sample).

    Bad samples (undecodable image, no image, missing/invalid/non-finite label, unparsable json):
    ``on_error="skip"`` skips and counts them (WARNING with shard and key for the first few per
    worker, then a per-epoch summary); ``on_error="raise"`` raises ValueError naming shard and key.
    A missing, truncated or corrupt shard always raises :class:`ShardReadError`.

    ``decode="device"``: the workers read, check and batch samples as above but decode no pixels. A
    batch then holds, instead of ``"image"``, the kept samples' encoded images packed end to end:
    ``"encoded": uint8 (total bytes,)``, ``"encoded_length": int64 (B,)`` (bytes per sample, in
    order), ``"encoded_member": list[str]`` (jpg, png, ...) and ``"encoded_shard": list[str]`` (the
    sample's shard, for warnings); one buffer, so a batch crosses from a worker to the training
    process as one shared-memory block whatever B is. :func:`fahr.data.device_decode.decode_batch`
    turns it into ``"image"`` on the training device. Skipped and counted here are the samples that
    are bad without decoding (no or empty image member, bad json or label) and those ``accept``
    drops; an image that fails to decode is found only there, and dropped from its batch rather than
    replaced (see :mod:`fahr.data.device_decode`).

    Args:
        shards: shard URLs (see :func:`expand_shards`); a string is expanded with it.
        samples_per_epoch: nominal samples per epoch over all ranks.
        batch_size: samples per batch, per rank.
        seed: base seed of all shuffling.
        shuffle_buffer: sample shuffle buffer per worker (0 = no sample shuffling).
        interleave: shards each worker reads at once (1 = one after the other).
        label_keys: json label keys returned as float32 tensors.
        image_size: output side length in pixels; other sizes are resized (bilinear, antialiased).
        on_error: "skip" or "raise" for bad samples.
        decode: "workers" (decode in the DataLoader workers) or "device" (encoded bytes in the batch; see above).
        world_size, rank: None = from torch.distributed if initialised, else env WORLD_SIZE/RANK, else 1/0.
        num_workers: the DataLoader's num_workers (needed for the arithmetic; must match the loader).
        shuffle_shards: False keeps the given shard order every epoch and pass (validation).
        accept: keep each sample with a label-dependent probability (:class:`LabelAcceptance`:
            age balancing while streaming), decided from its json before its image is decoded, with a
            generator seeded by (seed, epoch, rank, worker, pass): one draw per sample read, so the
            same samples are kept on a resumed or repeated pass. ``samples_per_epoch`` then counts
            kept samples; a worker makes as many passes over its shards as that takes.
    """

    def __init__(
        self,
        shards: list[str] | str,
        samples_per_epoch: int,
        batch_size: int,
        seed: int = 0,
        shuffle_buffer: int = 0,
        label_keys: tuple[str, ...] = (),
        image_size: int = 112,
        on_error: str = "skip",
        world_size: int | None = None,
        rank: int | None = None,
        num_workers: int = 0,
        shuffle_shards: bool = True,
        accept: "LabelAcceptance | None" = None,
        interleave: int = 1,
        decode: str = "workers",
    ):
        super().__init__()
        self.accept = accept
        self.shards = expand_shards(shards) if isinstance(shards, str) else list(shards)
        if not self.shards or not all(isinstance(s, str) and s for s in self.shards):
            raise InputError(f"shards must be a non-empty list of URLs, got {shards!r}")
        if isinstance(label_keys, str):
            raise InputError(f"label_keys must be a tuple of keys, got the string {label_keys!r}")
        self.label_keys = tuple(label_keys)
        clash = _RESERVED_KEYS.intersection(self.label_keys)
        if clash:
            raise InputError(f"label keys {sorted(clash)} clash with batch fields {sorted(_RESERVED_KEYS)}")
        for name, value, low in (("samples_per_epoch", samples_per_epoch, 1), ("batch_size", batch_size, 1),
                                 ("image_size", image_size, 1), ("shuffle_buffer", shuffle_buffer, 0),
                                 ("num_workers", num_workers, 0), ("interleave", interleave, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
        if on_error not in ("skip", "raise"):
            raise InputError(f'on_error must be "skip" or "raise", got {on_error!r}')
        if decode not in DECODE_CHOICES:
            raise InputError(f"decode must be one of {', '.join(DECODE_CHOICES)}, got {decode!r}")
        self.decode = decode
        self.samples_per_epoch = samples_per_epoch
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shuffle_buffer = shuffle_buffer
        self.interleave = interleave
        self.image_size = image_size
        self.on_error = on_error
        self.num_workers = num_workers
        self.shuffle_shards = shuffle_shards
        self.world_size, self.rank = resolve_world(world_size, rank)
        self._check_shard_count()
        # lock-free shared ints: inherited by forked workers, passed to spawned ones at start
        self._epoch = multiprocessing.Value("q", 0, lock=False)
        self._start_batch = multiprocessing.Value("q", 0, lock=False)
        self._shard_counts: dict[str, int] | None | bool = False  # False: not looked up yet
        self._warned: dict[tuple[int, int], int] = {}

    # ---- arithmetic and assignment ----
    @property
    def workers(self) -> int:
        """Data-reading processes per rank: max(1, num_workers)."""
        return max(1, self.num_workers)

    @property
    def batches_per_worker(self) -> int:
        return len(self) // self.workers

    @property
    def samples_per_epoch_effective(self) -> int:
        """Samples actually yielded per epoch over all ranks (>= samples_per_epoch)."""
        return len(self) * self.batch_size * self.world_size

    def __len__(self) -> int:
        """Batches this rank yields per epoch."""
        return batches_per_rank(self.samples_per_epoch, self.batch_size, self.world_size, self.num_workers)

    def _check_shard_count(self) -> None:
        need = self.world_size * self.workers
        if len(self.shards) < need:
            raise InputError(
                f"{len(self.shards)} shards cannot feed {self.world_size} ranks x {self.workers} workers "
                f"(each needs at least one shard, so >= {need} shards are required). Write the data into "
                f"more, smaller shards, or lower num_workers (or the number of ranks)."
            )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Set the epoch used by the next iterations (shard order and shuffling depend on it) and the
        rank-local batch index they start at (0 = the whole epoch; ``len(self)`` = nothing left)."""
        if not 0 <= int(start_batch) <= len(self):
            raise InputError(f"start_batch must be in [0, {len(self)}] (batches per rank per epoch), got {start_batch}")
        self._epoch.value = int(epoch)
        self._start_batch.value = int(start_batch)

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    @property
    def start_batch(self) -> int:
        """The rank-local batch index the next iteration starts at."""
        return int(self._start_batch.value)

    def shard_order(self, epoch: int) -> list[str]:
        """All shards in their order for ``epoch``; identical on every rank."""
        order = list(self.shards)
        if self.shuffle_shards:
            random.Random(self.seed + epoch).shuffle(order)
        return order

    def worker_shards(self, epoch: int, rank: int | None = None, worker_id: int = 0) -> list[str]:
        """The shards read by worker ``worker_id`` of ``rank`` in ``epoch`` (first pass order)."""
        rank = self.rank if rank is None else rank
        return self.shard_order(epoch)[rank :: self.world_size][worker_id :: self.workers]

    # ---- iteration ----
    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._check_shard_count()
        epoch, start = self.epoch, self.start_batch
        workers = self.workers
        info = get_worker_info()
        if info is not None:
            if info.num_workers != workers:
                raise InputError(
                    f"ShardStream was built for num_workers={self.num_workers} but the DataLoader runs "
                    f"{info.num_workers} workers; use the same value for both (see make_loader)"
                )
            ignore_stop_signals()
            # the DataLoader asks its worker 0 first; batch `start` belongs to worker start % W
            yield from self._iter_worker(epoch, self.rank, (info.id + start) % workers, start)
        elif workers == 1:
            yield from self._iter_worker(epoch, self.rank, 0, start)
        else:
            parts = [self._iter_worker(epoch, self.rank, w, start) for w in range(workers)]
            for i in range(start, len(self)):
                yield next(parts[i % workers])

    def _skip_counts(self) -> dict[str, int] | None:
        """Per-shard sample counts from index.json (looked up once per process), or None."""
        if self._shard_counts is False:
            from fahr.data.shard_index import sample_counts

            self._shard_counts = sample_counts(self.shards)
        return self._shard_counts

    def _raw_samples(self, shards: list[str], epoch: int, rank: int, worker_id: int, skip: int = 0,
                     rejected: list[int] | None = None) -> Iterator[Any]:
        """Undecoded samples of ``shards``, pass after pass, each pass followed by _END_OF_PASS,
        without the first ``skip`` kept samples (whole shards passed over unopened where possible).
        Samples ``accept`` drops are counted in ``rejected[0]`` (per pass: reset at each pass end)."""
        counts = (self._skip_counts() if skip and self.shuffle_buffer <= 1 and self.accept is None
                  and self.interleave == 1 else None)
        for p in itertools.count():
            order = list(shards)
            if p > 0 and self.shuffle_shards:
                random.Random(f"fahr-pass:{self.seed}:{epoch}:{rank}:{worker_id}:{p}").shuffle(order)
            skipped_here = skip > 0
            while counts and order and 0 < counts[order[0]] <= skip:
                skip -= counts[order.pop(0)]
            if self.interleave > 1:
                reader = _interleave(order, self.interleave,
                                     random.Random(f"fahr-interleave:{self.seed}:{epoch}:{rank}:{worker_id}:{p}"))
            else:
                reader = (s for url in order for s in read_shard(url))
            samples = reader
            if self.shuffle_buffer > 1:
                rng = random.Random(f"fahr-buffer:{self.seed}:{epoch}:{rank}:{worker_id}:{p}")
                samples = _shuffle(reader, self.shuffle_buffer, self.shuffle_buffer, rng)
            accept_rng = (random.Random(f"fahr-accept:{self.seed}:{epoch}:{rank}:{worker_id}:{p}")
                          if self.accept is not None else None)
            try:
                for sample in samples:
                    if accept_rng is not None and accept_rng.random() >= self.accept.probability(sample):
                        if rejected is not None:
                            rejected[0] += 1
                        continue
                    if skip:
                        skip -= 1
                    else:
                        yield sample
            finally:
                samples.close()
                reader.close()
            if not skipped_here:  # a pass that was (partly) skipped is not judged on its remaining samples
                yield _END_OF_PASS

    def _iter_worker(self, epoch: int, rank: int | None = None, worker_id: int = 0,
                     start_batch: int = 0) -> Iterator[dict[str, Any]]:
        """The batches of one worker of ``rank`` for ``epoch``: ``batches_per_worker`` of them, minus
        the ones among the rank's first ``start_batch`` batches (those with index % W == worker_id)."""
        rank = self.rank if rank is None else rank
        shards = self.worker_shards(epoch, rank, worker_id)
        if not shards:
            raise InputError(f"rank {rank} worker {worker_id} has no shards (epoch {epoch})")
        bs, keys_wanted, size = self.batch_size, self.label_keys, self.image_size
        on_device = self.decode == "device"
        skip_batches = len(range(worker_id, start_batch, self.workers))
        rejected = [0]  # samples `accept` dropped in the current pass
        source = self._raw_samples(shards, epoch, rank, worker_id, skip=skip_batches * bs, rejected=rejected)
        skipped_total = skipped = good_in_pass = 0
        try:
            for _ in range(self.batches_per_worker - skip_batches):
                if on_device:
                    encoded: list[bytearray] = []
                    members: list[str] = []
                    urls: list[str] = []
                else:
                    out = _new_batch_buffer((bs, size, size, 3))
                    pixels = out.numpy()
                keys: list[str] = []
                labels: list[list[float]] = [[] for _ in keys_wanted]
                while len(keys) < bs:
                    sample = next(source)
                    if sample is _END_OF_PASS:
                        if good_in_pass == 0 and rejected[0] == 0:
                            raise InputError(
                                f"rank {rank} worker {worker_id}: a full pass over its {len(shards)} shards "
                                f"({shards[:3]}{' ...' if len(shards) > 3 else ''}) gave no usable sample "
                                f"({skipped_total} bad samples skipped)"
                            )
                        good_in_pass = rejected[0] = 0
                        continue
                    try:
                        if on_device:
                            member, values = self._check(sample)
                        else:
                            image, values = self._decode(sample)
                    except _BadSample as bad:
                        reason = f"bad sample {sample['__key__']!r} in shard {sample['__url__']}: {bad}"
                        if self.on_error == "raise":
                            raise InputError(reason) from bad.__cause__
                        skipped += 1
                        skipped_total += 1
                        self._warn_skip(rank, worker_id, reason)
                        continue
                    good_in_pass += 1
                    if on_device:
                        members.append(member[0])
                        encoded.append(member[1])
                        urls.append(sample["__url__"])
                    else:
                        # copied while the decoded pixels are still in cache; (3, H, W) -> (H, W, 3) is
                        # the decoder's own memory layout, so this is a plain memcpy
                        pixels[len(keys)] = image.numpy().transpose(1, 2, 0)
                    keys.append(sample["__key__"])
                    for column, value in zip(labels, values):
                        column.append(value)
                if on_device:
                    batch: dict[str, Any] = _packed(encoded, members, urls)
                else:
                    # returned as a (B, 3, H, W) view of (B, H, W, 3) memory: un-interleaving uint8 pixels
                    # on the CPU costs ~25% of the decode time, and ~nothing on the device
                    batch = {"image": out.permute(0, 3, 1, 2)}
                for name, column in zip(keys_wanted, labels):
                    batch[name] = torch.tensor(column, dtype=torch.float32)
                batch["__key__"] = keys
                batch["n_skipped"] = torch.tensor(skipped, dtype=torch.int64)
                skipped = 0
                yield batch
        finally:
            source.close()
            if skipped_total:
                log.warning("rank %d worker %d: skipped %d bad samples in epoch %d",
                            rank, worker_id, skipped_total, epoch)

    def _warn_skip(self, rank: int, worker_id: int, reason: str) -> None:
        n = self._warned.get((rank, worker_id), 0) + 1
        self._warned[(rank, worker_id)] = n
        if n <= _MAX_SAMPLE_WARNINGS:
            suffix = "" if n < _MAX_SAMPLE_WARNINGS else " (further bad samples of this worker are only counted)"
            log.warning("skipping %s%s", reason, suffix)

    def _check(self, sample: dict[str, Any]) -> tuple[tuple[str, bytearray], list[float]]:
        """``(member type, encoded image)`` and the float label values of ``sample``, checked as
        :meth:`_decode` checks them but for the pixels; raises _BadSample."""
        member = sample_image_member(sample)
        meta = sample_labels(sample) if self.label_keys else {}
        return member, [required_number(meta, key) for key in self.label_keys]

    def _decode(self, sample: dict[str, Any]) -> tuple[torch.Tensor, list[float]]:
        """uint8 (3, S, S) image and the float label values of ``sample``; raises _BadSample."""
        image = decode_sample_image(sample, self.image_size)
        meta = sample_labels(sample) if self.label_keys else {}
        return image, [required_number(meta, key) for key in self.label_keys]


def decode_sample_image(sample: dict[str, Any], size: int) -> torch.Tensor:
    """The sample's image as uint8 RGB (3, size, size) (resized, bilinear antialiased, if needed);
    raises _BadSample when there is none or it does not decode to one RGB image."""
    ext, data = sample_image_member(sample)
    try:
        image = decode_rgb(torch.frombuffer(data, dtype=torch.uint8))
    except RuntimeError as exn:
        raise _BadSample(f"cannot decode {ext}: {str(exn).splitlines()[0]}") from exn
    return rgb_at_size(image, ext, size)


def sample_image_member(sample: dict[str, Any]) -> tuple[str, bytearray]:
    """``(member type, encoded bytes)`` of the sample's image, the first of IMAGE_MEMBERS it has;
    raises _BadSample when there is none or it is empty. Reads no pixels."""
    for ext in IMAGE_MEMBERS:
        data = sample.get(ext)
        if data is not None:
            break
    else:
        raise _BadSample(f"no image member (looked for {', '.join(IMAGE_MEMBERS)})")
    if not isinstance(data, bytearray):
        data = bytearray(data)  # torch.frombuffer wants a writable buffer
    if not data:
        raise _BadSample(f"empty {ext} member")
    return ext, data


def rgb_at_size(image: torch.Tensor, ext: str, size: int) -> torch.Tensor:
    """A freshly decoded ``ext`` image as uint8 RGB (3, size, size), on its own device: 16-bit values
    scaled to 8 bits, other sizes resized (bilinear, antialiased); raises _BadSample when it is not
    one (3, H, W) image (an animated GIF decodes to (frames, 3, H, W))."""
    shape = image.shape
    if len(shape) != 3 or shape[0] != 3:
        raise _BadSample(f"{ext} decodes to shape {tuple(shape)}, not (3, H, W)")
    if image.dtype != torch.uint8:  # 16-bit PNG
        image = tvf.to_dtype(image, torch.uint8, scale=True)
    if shape[1] != size or shape[2] != size:
        image = tvf.resize(image, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return image


def sample_labels(sample: dict[str, Any]) -> dict[str, Any]:
    """The sample's json member as a dict; raises _BadSample when it is missing or not an object."""
    raw = sample.get("json")
    if raw is None:
        raise _BadSample("no json member (labels requested)")
    try:
        meta = json.loads(raw)
    except ValueError as exn:
        raise _BadSample(f"invalid json: {exn}") from exn
    if not isinstance(meta, dict):
        raise _BadSample(f"json is a {type(meta).__name__}, not a dict")
    return meta


def required_number(meta: dict[str, Any], key: str) -> float:
    """``meta[key]`` as a finite float; raises _BadSample naming what is wrong."""
    value = meta.get(key)
    if value is None:
        raise _BadSample(f"label {key!r} missing" if key not in meta else f"label {key!r} is null")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _BadSample(f"label {key!r} is not a number: {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise _BadSample(f"label {key!r} is not finite: {value!r}")
    return value


def optional_number(meta: dict[str, Any], key: str) -> float:
    """``meta[key]`` as a finite float, NaN when absent, null, not a number or not finite."""
    value = meta.get(key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else math.nan


class LabelAcceptance:
    """Keep probability per label bin, for :class:`ShardStream`'s ``accept``: a sample whose json
    ``key`` falls in bin ``floor(value / bin_width)`` is kept with ``probabilities[bin]`` (bins not
    listed, and samples without a usable value, with 1: the decoder then judges them)."""

    def __init__(self, key: str, bin_width: float, probabilities: dict[int, float]) -> None:
        if not bin_width > 0:
            raise InputError(f"bin_width must be > 0, got {bin_width!r}")
        bad = {b: p for b, p in probabilities.items() if not 0.0 < float(p) <= 1.0}
        if bad:
            raise InputError(f"keep probabilities must be in (0, 1], got {bad}")
        self.key, self.bin_width = key, float(bin_width)
        self.probabilities = {int(b): float(p) for b, p in probabilities.items()}

    def probability(self, sample: dict[str, Any]) -> float:
        try:
            value = optional_number(sample_labels(sample), self.key)
        except _BadSample:
            return 1.0
        if math.isnan(value):
            return 1.0
        return self.probabilities.get(math.floor(value / self.bin_width), 1.0)


class EvalStream(IterableDataset):
    """Every sample of ``shards`` exactly once over all ranks and workers: for evaluation.

    Shard ``j`` is read by rank ``j % world_size`` and, on that rank, by worker
    ``(j // world_size) % max(1, num_workers)``; each worker yields batches of up to ``batch_size``
    samples (the last one short), so ranks may yield different numbers of batches (no collective
    may run per batch). Batches::

        {"image": uint8 (b, 3, S, S), <required>: float32 (b,), <optional>: float32 (b,) NaN where
         missing, <text>: list[str] ("" where missing), "__key__": list[str],
         "position": int64 (b,) = shard index * 2**32 + sample index in the shard,
         "n_skipped": int64 () bad samples skipped since the previous batch}

    Bad samples (no or undecodable image, a required label missing or not finite) are skipped,
    counted in ``n_skipped`` and logged (first few); ``position`` orders gathered results as the
    shards list them. A broken shard raises :class:`ShardReadError`. A rank (or worker) with no
    shard, or only bad samples, yields one empty batch, so that every rank runs the evaluation loop
    and reaches the gather at its end.
    """

    def __init__(self, shards: list[str] | str, batch_size: int, image_size: int,
                 required: tuple[str, ...] = (), optional: tuple[str, ...] = (), text: tuple[str, ...] = (),
                 world_size: int | None = None, rank: int | None = None, num_workers: int = 0) -> None:
        super().__init__()
        self.shards = expand_shards(shards) if isinstance(shards, str) else list(shards)
        if not self.shards:
            raise InputError("no shards to evaluate")
        clash = _RESERVED_KEYS.union({"position"}).intersection((*required, *optional, *text))
        if clash:
            raise InputError(f"label keys {sorted(clash)} clash with batch fields")
        self.batch_size, self.image_size = int(batch_size), int(image_size)
        self.required, self.optional, self.text = tuple(required), tuple(optional), tuple(text)
        self.world_size, self.rank = resolve_world(world_size, rank)
        self.num_workers = int(num_workers)

    def rank_shards(self) -> list[int]:
        """Indices of the shards this rank reads."""
        return list(range(self.rank, len(self.shards), self.world_size))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        mine = self.rank_shards()
        info = get_worker_info()
        if info is not None:
            ignore_stop_signals()
            mine = mine[info.id :: info.num_workers]
        bs, size = self.batch_size, self.image_size
        rows: list[tuple[torch.Tensor, dict[str, Any], str, int]] = []
        skipped = warned = 0
        any_yielded = False
        for j in mine:
            for i, sample in enumerate(read_shard(self.shards[j])):
                try:
                    image = decode_sample_image(sample, size)
                    meta = sample_labels(sample) if (self.required or self.optional or self.text) else {}
                    values = {k: required_number(meta, k) for k in self.required}
                except _BadSample as bad:
                    skipped += 1
                    warned += 1
                    if warned <= _MAX_SAMPLE_WARNINGS:
                        log.warning("evaluation: skipping bad sample %d of shard %s: %s", i, self.shards[j], bad)
                    continue
                values.update({k: optional_number(meta, k) for k in self.optional})
                texts = {k: str(meta.get(k, "")) for k in self.text}
                rows.append((image, {**values, **texts}, sample["__key__"], (j << 32) + i))
                if len(rows) == bs:
                    yield self._batch(rows, skipped)
                    rows, skipped, any_yielded = [], 0, True
        if rows or skipped or not any_yielded:
            yield self._batch(rows, skipped)

    def _batch(self, rows: list, skipped: int) -> dict[str, Any]:
        size = self.image_size
        images = torch.stack([r[0] for r in rows]) if rows else torch.empty(0, 3, size, size, dtype=torch.uint8)
        batch: dict[str, Any] = {"image": images}
        for k in (*self.required, *self.optional):
            batch[k] = torch.tensor([r[1][k] for r in rows], dtype=torch.float32)
        for k in self.text:
            batch[k] = [r[1][k] for r in rows]
        batch["__key__"] = [r[2] for r in rows]
        batch["position"] = torch.tensor([r[3] for r in rows], dtype=torch.int64)
        batch["n_skipped"] = torch.tensor(skipped, dtype=torch.int64)
        return batch


def eval_loader(stream: EvalStream) -> DataLoader:
    """A DataLoader over an :class:`EvalStream` (batch_size=None: the stream batches), with as many
    workers as its ``num_workers`` but no more than the shards this rank reads."""
    workers = min(stream.num_workers, len(stream.rank_shards()))
    if workers > 0:
        kill_workers_at_exit()
    return StopSignalSafeLoader(stream, batch_size=None, shuffle=False, num_workers=workers)


#: the signals a job stop sends every process (SLURM, terminals); DataLoader workers ignore them
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _worker_init_ignoring_stop_signals(worker_id: int) -> None:
    """``worker_init_fn`` of :class:`StopSignalSafeLoader`: ignore the stop signals, then unblock them
    (one that arrived while the worker started was pending, and is now discarded)."""
    ignore_stop_signals()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class StopSignalSafeLoader(DataLoader):
    """A DataLoader whose workers no stop signal can kill, even while they start.

    PyTorch's worker loop installs its own SIGTERM handler (exit, or die of the signal) before the
    dataset runs, so a worker that a job-wide SIGTERM reaches in its first milliseconds dies, and the
    training process raises "DataLoader worker ... exited unexpectedly" instead of saving (seen when a
    stop lands as validation starts its workers). So the stop signals are blocked in the creating
    thread while the workers fork: a forked worker starts with them blocked, and its
    ``worker_init_fn`` sets them to ignored before unblocking them. The parent's handlers still see
    any such signal (other threads, or at the unblock)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("num_workers", 0) > 0:
            kwargs.setdefault("worker_init_fn", _worker_init_ignoring_stop_signals)
        super().__init__(*args, **kwargs)

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super()._get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_stop_signals() -> None:
    """In a DataLoader worker: ignore SIGTERM, SIGUSR1 and SIGINT.

    SLURM (``scancel``, ``scontrol requeue``, preemption) and terminals signal every process of a job
    at once. A worker that dies of it makes the training process raise "DataLoader worker ... is
    killed by signal" from its SIGCHLD handler at an arbitrary point, before the preemption handler
    (:mod:`fahr.utils.preemption`) can save at the next batch end. The training process decides
    instead; it shuts its workers down when it stops, and PyTorch's worker watchdog ends them if it
    dies (SIGKILL, which cannot be ignored, still ends everything)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


_EXIT_GUARD = []


def kill_workers_at_exit() -> None:
    """In the training process: at interpreter exit, kill (SIGKILL) the daemonic child processes still
    alive, i.e. DataLoader workers whose iterator was never shut down (a run stopped by a signal can
    leave one referenced until exit). multiprocessing's own exit handler would SIGTERM them, which they
    ignore (:func:`ignore_stop_signals`), and then wait for them forever. Registered once, after
    multiprocessing's handler, so it runs before it (atexit runs last-registered first)."""
    if _EXIT_GUARD:
        return
    import atexit
    import multiprocessing

    def kill_daemonic_children() -> None:
        for child in multiprocessing.active_children():
            if child.daemon:
                child.kill()
                child.join(timeout=10)

    atexit.register(kill_daemonic_children)
    _EXIT_GUARD.append(kill_daemonic_children)


def make_loader(
    stream: ShardStream,
    num_workers: int,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    prefetch_factor: int | None = None,
) -> DataLoader:
    """A DataLoader over ``stream`` (batch_size=None: the stream batches in its workers).

    ``num_workers`` must equal ``stream.num_workers``. With num_workers == 0, persistent_workers and
    prefetch_factor do not apply and are ignored.
    """
    if num_workers != stream.num_workers:
        raise InputError(
            f"make_loader(num_workers={num_workers}) does not match the stream's num_workers="
            f"{stream.num_workers}; the epoch arithmetic and shard split depend on it"
        )
    extra: dict[str, Any] = {}
    if num_workers > 0:
        kill_workers_at_exit()
        extra["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    return StopSignalSafeLoader(stream, batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
                                **extra)
