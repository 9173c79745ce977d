"""Identity folders (CASIA-WebFace style): unlabelled photos grouped by person, for pretraining.

Expected layout::

    input_dir/
        <identity>/<image>.jpg        e.g. 0000045/001.jpg
        <identity>/<sub/folders>/<image>.jpg   (also read; the identity is the top-level folder)

``person_id`` is the top-level folder name; ``labels`` is empty. Image files are recognised by their
suffix (.jpg .jpeg .png .bmp .webp .tif .tiff, any case; hidden files skipped); other files are
ignored and not counted. An image directly in ``input_dir`` (no identity folder) is rejected as
``layout:no_identity``. ``source_id`` is the path relative to ``input_dir`` (``/``-separated); records
are yielded sorted by it. Other rejections: ``image:missing`` (a dangling symlink),
``image:not_regular`` (a FIFO or device named like a photo: never read), ``image:too_large`` (over
the photo byte cap: never read), ``image:unreadable``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_pipelines.records import Record
from fahr.faces.rejection import RejectedError, Rejection
from data_pipelines.sources.folder import is_image, read_image, reject, require_dir


def iter_records(input_dir: str | Path) -> Iterator[Record | Rejection]:
    """Yield one Record per image under ``input_dir/<identity>/`` (see the module docstring)."""
    root = require_dir(input_dir)
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if is_image(p))
    for source_id in paths:
        parts = source_id.split("/")
        if len(parts) < 2:
            yield Rejection(source_id, "layout:no_identity", "image not inside an identity folder")
            continue
        try:
            image = read_image(root, source_id)
        except RejectedError as error:
            yield reject(source_id, error)
            continue
        yield Record(source_id=source_id, person_id=parts[0], image=image, labels={})
