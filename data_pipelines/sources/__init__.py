"""Data sources: each yields Record or Rejection objects (see data_pipelines.records).

Every source is a module with ``iter_records(input_dir, **options) -> Iterator[Record | Rejection]``
whose docstring documents the directory layout it expects. ``SOURCES`` maps the names used in configs
to those functions; modules are imported on first use (``SOURCES["imdb_wiki"]`` only needs scipy when
called).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping

from data_pipelines.records import Record, Rejection

_MODULES = {
    "folder": "data_pipelines.sources.folder",
    "utkface": "data_pipelines.sources.utkface",
    "fgnet": "data_pipelines.sources.fgnet",
    "appa_real": "data_pipelines.sources.appa_real",
    "imdb_wiki": "data_pipelines.sources.imdb_wiki",
    "identity_folders": "data_pipelines.sources.identity_folders",
    "cohort": "data_pipelines.sources.cohort",
}

IterRecords = Callable[..., Iterator[Record | Rejection]]


class _LazySources(Mapping[str, IterRecords]):
    """name -> the source module's ``iter_records``, importing the module on first access."""

    def __getitem__(self, name: str) -> IterRecords:
        if name not in _MODULES:
            raise KeyError(f"unknown source {name!r}; known: {sorted(_MODULES)}")
        return importlib.import_module(_MODULES[name]).iter_records

    def __iter__(self):
        return iter(_MODULES)

    def __len__(self) -> int:
        return len(_MODULES)

    def __repr__(self) -> str:
        return f"SOURCES({sorted(_MODULES)})"


SOURCES: Mapping[str, IterRecords] = _LazySources()


def get_source(name: str) -> IterRecords:
    """``SOURCES[name]`` with a clear error for unknown names."""
    return SOURCES[name]


def layout_doc(name: str) -> str:
    """The module docstring (expected directory layout) of a source, e.g. for the README."""
    get_source(name)
    return importlib.import_module(_MODULES[name]).__doc__ or ""


__all__ = ["SOURCES", "get_source", "layout_doc", "Record", "Rejection"]
