"""Atomic file writes: write a temporary file in the same directory, fsync, then rename."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "w", *,
                 permissions: int | None = None, overwrite: bool = True) -> Path:
    """Call ``write(fileobj)`` on a temp file next to ``path`` and rename it over ``path``.

    A crash leaves either the old file or the new one, never a partial file. ``permissions``
    (e.g. ``0o600`` for a secret) holds from the file's creation; default: the umask's. With
    ``overwrite=False`` an existing ``path`` is kept and :class:`FileExistsError` raised (a hard
    link, which is atomic and never replaces).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask() if permissions is None else permissions)  # mkstemp makes 0600 files
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str, **options: Any) -> Path:
    """``atomic_write`` of ``text``; ``options`` are its ``permissions`` and ``overwrite``."""
    return atomic_write(path, lambda f: f.write(text), **options)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str, allow_nan=False) + "\n")
