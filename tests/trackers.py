"""Reading what the trackers wrote, for tests: W&B offline run files and TensorBoard event files."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def wandb_history(run_dir: Path) -> list[tuple[str, list[dict]]]:
    """``[(run id, [history rows])]`` of the offline W&B sessions in ``run_dir/wandb``, oldest first.

    The ``.wandb`` file is a LevelDB-style log (7-byte file header, 32 KiB blocks of records with a
    7-byte header: crc32, length, type) of ``wandb_internal_pb2.Record`` protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    sessions = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        run_id = folder.name.rsplit("-", 1)[1]
        payloads = _records(next(folder.glob("*.wandb")).read_bytes())
        rows = []
        for raw in payloads:
            record = pb.Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
        sessions.append((run_id, rows))
    return sessions


def wandb_artifacts(run_dir: Path) -> list[dict]:
    """The artifacts the offline W&B sessions of ``run_dir`` logged: ``{"name", "type", "files"}``."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        for raw in _records(next(folder.glob("*.wandb")).read_bytes()):
            record = pb.Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") == "artifact":
                a = record.artifact
                out.append({"name": a.name, "type": a.type, "files": sorted(e.path for e in a.manifest.contents)})
    return out


def _records(data: bytes) -> list[bytes]:
    """The record payloads of a ``.wandb`` file (see :func:`wandb_history`)."""
    pos, block, payloads, part = 7, 32768, [], b""
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += room
            continue
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            payloads.append(part)
            part = b""
    return payloads


def wandb_keys(run_dir: Path) -> set[str]:
    """Every metric key any offline W&B session of ``run_dir`` logged."""
    return {key for _, rows in wandb_history(run_dir) for row in rows for key in row}


def tensorboard_scalars(run_dir: Path, subdir: str = "tensorboard") -> set[str]:
    """Every scalar tag in the TensorBoard event files under ``run_dir/subdir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in (run_dir / subdir).rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags
