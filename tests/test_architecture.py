"""The code base's shape: dependencies run one way, no import cycles, one module owns index.json."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from conftest import REPO

PACKAGES = ("fahr", "data_pipelines")
#: the commands may use the shard builders; nothing else in the library may
MAY_IMPORT_PIPELINES = ("fahr.cli", "fahr.pipeline")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in the file (inside functions too)."""
    modules = _modules()

    def resolve(name: str) -> str | None:
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in modules:
                return ".".join(parts[:i])
        return None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                target = resolve(name)
                # a package's own __init__ seen from inside the package is not a dependency
                if target and target != module and not module.startswith(target + "."):
                    targets.add(target)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_any_two_files():
    assert cycles(import_graph()) == []


def test_the_library_never_imports_data_pipelines():
    offenders = sorted((module, target) for module, targets in import_graph().items() if module.startswith("fahr")
                       and not module.startswith(MAY_IMPORT_PIPELINES) for target in targets
                       if target.startswith("data_pipelines"))
    assert offenders == []


def test_the_synthetic_generator_does_not_import_the_writer_it_feeds():
    graph = import_graph()
    assert "fahr.data.shard_writer" not in graph["fahr.data.synthetic"]
    assert "fahr.data.synthetic" not in graph["fahr.data.shard_writer"]


def test_only_the_index_module_opens_index_json(tmp_path):
    """Every open, rename onto or removal of a file named index.json, in a run through the writers and
    readers of shards (synthetic shards, `fahr shards` on photos, streaming, counts, a model card's
    preprocessing), comes from fahr/data/shard_index.py (through the generic file helpers)."""
    import os

    from PIL import Image

    from data_pipelines.build import build_shards
    from data_pipelines.options import AlignOptions, BuildOptions, DedupOptions
    from data_pipelines.sources import get_source
    from fahr.data.shard_index import index_location, resolve_shard_spec, sample_counts
    from fahr.data.shard_reader import expand_shards
    from fahr.data.synthetic import synthetic_face
    from fahr.data.synthetic_shards import write_synthetic_shards
    from fahr.pipeline.finetune_age import preprocessing_of

    openers: list[str] = []
    owner = str(REPO / "fahr" / "data" / "shard_index.py")
    active = [True]  # audit hooks cannot be removed: this one retires at the end of the test

    helpers = (str(REPO / "fahr" / "boundary.py"), str(REPO / "fahr" / "utils" / "atomic.py"))
    touches = {"open": 0, "os.remove": 0, "os.rename": 1, "os.replace": 1}  # event -> argument holding the path

    def hook(event: str, args: tuple) -> None:
        position = touches.get(event)
        if not active[0] or position is None or len(args) <= position:
            return
        if not isinstance(args[position], (str, bytes, os.PathLike)) or Path(os.fsdecode(args[position])).name != "index.json":
            return
        frame = sys._getframe(1)  # the first frame of project code that is not a generic file helper
        while frame is not None and (not frame.f_code.co_filename.startswith(str(REPO))
                                     or frame.f_code.co_filename in helpers):
            frame = frame.f_back
        openers.append(frame.f_code.co_filename if frame else "?")

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        Image.fromarray(synthetic_face(i, 3)[0]).save(photos / f"{20 + i}_{i % 2}_0_2017010100000000{i}.jpg")
    sys.addaudithook(hook)
    try:
        write_synthetic_shards(tmp_path / "synthetic", num_samples=8, samples_per_shard=4, seed=0)
        synthetic = expand_shards(resolve_shard_spec(str(tmp_path / "synthetic" / "index.json")))
        assert sample_counts(synthetic) == {url: 4 for url in synthetic}
        options = BuildOptions(dedup=DedupOptions(enabled=False), samples_per_shard=4,
                               align=AlignOptions(skip_detection=True))
        build_shards("utkface", lambda: get_source("utkface")(str(photos)), tmp_path / "built", options)
        built = str(tmp_path / "built" / "index.json")
        assert expand_shards(resolve_shard_spec([f"{built}#train"]))
        assert index_location(f"{built}#train") == Path(built)
        assert preprocessing_of(f"{built}#train", 64)["crops"] == "external"
    finally:
        active[0] = False
    assert openers and set(openers) == {owner}, sorted(set(openers))
