"""Data sources: each yields Record or Rejection objects (see data_pipelines.records).

Every source is a module with ``iter_records(input_dir, **options) -> Iterator[Record | Rejection]``
whose docstring documents the directory layout it expects. ``SOURCES`` maps the names used in configs
to those functions; modules are imported on first use (``SOURCES["imdb_wiki"]`` only needs scipy when
called).
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from data_pipelines.records import Record
from fahr.faces.rejection import Rejection

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


def check_source_options(name: str, options: Mapping[str, Any]) -> None:
    """Check ``source_options`` against the source's ``iter_records`` keyword arguments, before any work.

    An unknown key, or a value of the wrong kind (a string where a list of column names is expected,
    ...), is an :class:`~fahr.boundary.InputError` naming ``source_options.<key>`` and what is
    accepted; kinds come from the parameters' annotations (``Iterable[str]``: a list of strings,
    ``bool``, ``float | None``, ``str | None``); then the source module's own ``check_options``, if
    it has one, checks the values.
    """
    from fahr.boundary import InputError

    if name not in _MODULES:
        raise InputError(f"source={name!r} is not a known source; known: {', '.join(sorted(_MODULES))}")
    params = list(inspect.signature(SOURCES[name]).parameters.values())[1:]  # after input_dir
    accepted = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for key, value in options.items():
        if key not in accepted:
            known = ", ".join(sorted(accepted)) or "none"
            raise InputError(f"source_options.{key} is not an option of source={name} (it accepts: {known})")
        annotation = str(accepted[key].annotation)
        optional = "None" in annotation
        if value is None:
            if optional:
                continue
            raise InputError(f"source_options.{key} may not be null for source={name}")
        if "Iterable[str]" in annotation:
            ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value)
            expected = "a list of non-empty strings, e.g. [a,b]"
        elif annotation.startswith("bool"):
            ok, expected = isinstance(value, bool), "true or false"
        elif "float" in annotation:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            expected = "a finite number"
        elif annotation.startswith("str"):
            ok, expected = isinstance(value, str) and bool(value), "a non-empty string"
        else:  # pragma: no cover - a source with an option of a kind not handled here
            ok, expected = True, ""
        if not ok:
            raise InputError(f"source_options.{key} must be {expected} for source={name}, "
                             f"got a {type(value).__name__}")
    check = getattr(importlib.import_module(_MODULES[name]), "check_options", None)
    if check is not None:  # the source's own checks of its option values
        check(**options)


def layout_doc(name: str) -> str:
    """The module docstring (expected directory layout) of a source, e.g. for the README."""
    get_source(name)
    return importlib.import_module(_MODULES[name]).__doc__ or ""


__all__ = ["SOURCES", "check_source_options", "get_source", "layout_doc", "Record", "Rejection"]
