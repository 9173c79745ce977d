"""Shared fixtures: compose the real Hydra config and shrink it for CPU tests.

Tests start from `conf/` exactly as users do and only override size (vit_test, few steps, tiny
synthetic data set) and location (tmp dirs), as in lightning-hydra-template's tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from fahr.cli._hydra import config_dir
from data_pipelines.options import register_shards_schema
from fahr.config.finetune_schema import register_finetune_schemas
from fahr.config.schema import register_schemas

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Keep tracker and library caches out of the home directory.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLCONFIGDIR", str(REPO / ".cache" / "matplotlib"))


def compose_config(config_name: str = "pretrain", overrides: list[str] | None = None) -> DictConfig:
    register_schemas()
    register_finetune_schemas()
    register_shards_schema()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides or []))


# A tiny synthetic data set shared by the whole session: 8 shards x 32 faces.
TINY_DATA = ["data.generate.num_samples=256", "data.generate.samples_per_shard=32", "data.batch_size=16",
             "data.num_workers=0", "data.shuffle_buffer=64"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def tiny_overrides(tmp_path, data_dir) -> list[str]:
    """Overrides that shrink the real config to seconds on a CPU, writing under tmp_path."""
    return [
        "model=vit_test", "trainer=cpu", "trainer.enable_progress_bar=false", "trainer.max_steps=4",
        "trainer.log_every_n_steps=1", f"paths.root_dir={tmp_path}", f"paths.data_dir={data_dir}",
        "task.warmup_steps=2", "callbacks.checkpoint.every_n_train_steps=2", *TINY_DATA,
    ]


@pytest.fixture
def tiny_cfg(tiny_overrides) -> DictConfig:
    return compose_config("pretrain", tiny_overrides)


def write_shard_index(folder: Path, splits: dict[str, list[tuple[str, int]]], image_size: int = 112) -> dict:
    """An index.json (through fahr.data.shard_index, as every writer does) for tars already in
    ``folder``: split -> [(shard path, samples)]; sizes and sha256 read from the files."""
    import hashlib

    from fahr.data.shard_index import make_index, write_index

    entries = {}
    for split, shards in splits.items():
        listed = [{"name": Path(p).name, "num_samples": n, "bytes": Path(p).stat().st_size,
                   "sha256": hashlib.sha256(Path(p).read_bytes()).hexdigest()} for p, n in shards]
        entries[split] = {"count": sum(n for _, n in shards), "shards": listed, "labels": {}}
    index = make_index("test", image_size, entries)
    write_index(folder, index)
    return index


def write_described_index(folder: Path, source: str = "test", image_size: int = 112, **provenance) -> Path:
    """A valid index.json (one split of one listed shard, which need not exist) with ``provenance``
    (e.g. ``options=...``): for code that reads what an index says, not its shards."""
    from fahr.data.shard_index import make_index, write_index

    shard = {"name": "train-000000.tar", "num_samples": 1, "bytes": 0, "sha256": "0" * 64}
    folder.mkdir(parents=True, exist_ok=True)
    return write_index(folder, make_index(source, image_size, {"train": {"count": 1, "shards": [shard], "labels": {}}},
                                          **provenance))


_RUNNING: list[pytest.Item] = []


@pytest.fixture(autouse=True)
def _running_test(request):
    """The test being run, so that helpers can check its marks (see :func:`require_mark`)."""
    _RUNNING.append(request.node)
    yield
    _RUNNING.pop()


def require_mark(name: str, why: str) -> None:
    """Fail a test that uses a resource without the mark that lets users select or skip it (-m)."""
    if _RUNNING and _RUNNING[-1].get_closest_marker(name) is None:
        pytest.fail(f"{_RUNNING[-1].nodeid} {why}: mark it @pytest.mark.{name}", pytrace=False)


def shared_data(sub: str) -> Path:
    """Path under ../shared/data, skipping the test with a reason when it is absent."""
    require_mark("real_data", "reads ../shared/data")
    path = SHARED_DATA / sub
    if not path.exists():
        pytest.skip(f"real data not available: {path} (CI always has ../shared/data)")
    return path


def utk_subset(tmp_path: Path, n: int) -> Path:
    """The first ``n`` UTKFace photos of ../shared as a source folder (manifest rows + the images linked)."""
    import csv

    utk = shared_data("utkface")
    root = tmp_path / "utk"
    root.mkdir()
    (root / "images").symlink_to(utk / "images")
    with open(utk / "manifest.csv", newline="") as f:
        rows = list(csv.reader(f))
    with open(root / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows[: n + 1])
    return root


__all__ = ["compose_config", "open_dict", "shared_data", "write_shard_index", "write_described_index", "TINY_DATA", "REPO"]


class FahrRun:
    """What ``fahr <argv>`` did: exit status, stdout and stderr."""

    def __init__(self, status: int, out: str, err: str) -> None:
        self.status, self.out, self.err = status, out, err

    def __repr__(self) -> str:
        return f"FahrRun(status={self.status}, err={self.err[-2000:]!r})"

    @property
    def error_line(self) -> str:
        """The last non-empty stderr line (where ``fahr`` reports a failure)."""
        lines = [line for line in self.err.splitlines() if line.strip()]
        return lines[-1] if lines else ""


@pytest.fixture
def run_fahr(capfd, monkeypatch):
    """Run the shipped ``fahr`` command line in this process: ``run_fahr("predict", "model=...", ...)``
    returns a :class:`FahrRun`. The same entry point as the console script (``fahr.cli.main.main``),
    without a subprocess per call (Hydra and torch start once per test session)."""
    from hydra.core.global_hydra import GlobalHydra

    from fahr.cli.main import main

    def run(*argv: str) -> FahrRun:
        GlobalHydra.instance().clear()
        capfd.readouterr()
        monkeypatch.delenv("FAHR_DEBUG", raising=False)
        try:
            status = main(list(argv))
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        finally:
            GlobalHydra.instance().clear()
        out, err = capfd.readouterr()
        return FahrRun(int(status or 0), out, err)

    return run
