"""`fahr shards launcher=slurm` on the local SLURM cluster (slurm/local-cluster.sh): the shipped
template (slurm/shards.sbatch) runs the build's stages as array jobs of 3 tasks, and the result is
byte for byte the one-process build; a write task killed mid-run and resubmitted alone gives the same
bytes."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, shared_data, utk_subset
from data_pipelines.build import build_shards
from data_pipelines.options import AlignOptions, BuildOptions
from data_pipelines.sources import get_source
from slurm_jobs import ensure_cluster, job_info, wait_until_ended


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    ensure_cluster()


def _tree(out: Path) -> dict[str, bytes]:
    """Shards and index.json (parts/ holds chunk marks with file identities, and the jobs' logs)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "parts"}


CASES = {  # source -> (options as overrides, the same as BuildOptions)
    "fgnet": (["chunk_size=10", "samples_per_shard=8"], BuildOptions(chunk_size=10, samples_per_shard=8)),
    "utkface": (["align.skip_detection=true", "chunk_size=20", "samples_per_shard=15"],
                BuildOptions(align=AlignOptions(skip_detection=True), chunk_size=20, samples_per_shard=15)),
}


def _input(source: str, tmp_path: Path) -> Path:
    return shared_data("fgnet") if source == "fgnet" else utk_subset(tmp_path, 200)


@pytest.mark.slurm
@pytest.mark.real_data
@pytest.mark.slow
@pytest.mark.parametrize("source", sorted(CASES))
def test_three_array_tasks_through_the_template_equal_a_one_process_build(source, slurm_cluster, tmp_path,
                                                                         run_fahr, monkeypatch):
    overrides, options = CASES[source]
    root = _input(source, tmp_path)
    one = build_shards(source, lambda: get_source(source)(root), tmp_path / "one", options)
    monkeypatch.chdir(REPO)  # the jobs run the fahr of this checkout, from here
    out = tmp_path / "slurm"
    r = run_fahr("shards", f"source={source}", f"input={root}", f"output={out}", *overrides,
                 "launcher=slurm", "launcher.tasks=3", "launcher.wait=true", "launcher.poll_seconds=1")
    assert r.status == 0, r
    jobs = _jobs(r.out)
    assert list(jobs) == ["hash", "group", "assign", "write", "final"], r.out
    assert "final 1 completed" in r.out and f"{out}/index.json" in r.out
    assert _tree(out) == _tree(tmp_path / "one")  # every shard and index.json, byte for byte
    index = (out / "index.json").read_text()
    assert index == (tmp_path / "one" / "index.json").read_text()
    assert one["read"] == one["written"] + sum(one["rejected"].values())  # across tasks: the final step checks it
    assert not (out / "parts" / "plan").exists()
    logs = out / "parts" / "logs"
    for stage in ("hash", "group", "assign", "write"):  # counts per task in its log; no ids, no paths of photos
        for task in range(3):
            text = (logs / f"{stage}-{jobs[stage]}_{task}.out").read_text()
            assert re.search(rf"pass [12], {stage} task {task + 1}/3: done, \d+ items", text), text
            assert ".jpg" not in text.lower() and "person" not in text
    assert "fahr shards: final task 1/3 done" in (logs / f"final-{jobs['final']}.out").read_text()


def _jobs(out: str) -> dict[str, str]:
    """stage -> job id, from the line ``fahr shards: submitted hash 12, group 13, ...``."""
    line = next(line for line in out.splitlines() if line.startswith("fahr shards: submitted"))
    return dict(re.findall(r"(hash|group|assign|write|final) (\d+)", line))


def _submit_and_wait_in_background(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fahr.cli.main", "shards", *args], cwd=REPO,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


@pytest.mark.slurm
@pytest.mark.real_data
@pytest.mark.slow
def test_a_write_task_killed_mid_run_then_resubmitted_alone_gives_the_same_bytes(slurm_cluster, tmp_path, run_fahr,
                                                                                monkeypatch):
    # with face detection (slower: a chunk takes seconds, so the kill lands inside one)
    overrides, options = ["chunk_size=10", "samples_per_shard=6"], BuildOptions(chunk_size=10, samples_per_shard=6)
    root = utk_subset(tmp_path, 150)  # 15 chunks: write task 1 has chunks 1, 4, 7, 10, 13
    build_shards("utkface", lambda: get_source("utkface")(root), tmp_path / "one", options)
    out = tmp_path / "slurm"
    args = ["source=utkface", f"input={root}", f"output={out}", *overrides, "launcher=slurm", "launcher.tasks=3"]
    log = tmp_path / "submit.log"
    waiting = _submit_and_wait_in_background([*args, "launcher.wait=true", "launcher.poll_seconds=1"], log)
    deadline = time.monotonic() + 600
    while "fahr shards: submitted" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    jobs = _jobs(log.read_text())
    write = jobs["write"]
    # kill write task 1 once its first chunk is marked done: it is then inside chunk 4
    while not (out / "parts" / "c000001.json").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    subprocess.run(["scancel", f"{write}_1"], check=True, timeout=60)
    first_mark = (out / "parts" / "c000001.json").stat().st_mtime_ns
    assert waiting.wait(timeout=600) == 1, log.read_text()  # launcher.wait: the graph failed, exit status 1
    assert "the job graph failed" in log.read_text()
    assert job_info(f"{write}_1").get("JobState") == "CANCELLED"
    assert wait_until_ended(jobs["final"]).get("JobState") == "CANCELLED"  # afterok never satisfied
    assert not (out / "parts" / "c000004.json").exists() and not (out / "index.json").exists()  # killed mid-chunk

    # the killed task alone, then the final step: the same run, the same bytes
    monkeypatch.chdir(REPO)
    r = run_fahr("shards", *args, "launcher.stages=[write,final]", "launcher.array=1", "launcher.wait=true",
                 "launcher.poll_seconds=1")
    assert r.status == 0, r
    assert re.match(r"fahr shards: submitted write \d+, final \d+ ", r.out), r.out
    assert _tree(out) == _tree(tmp_path / "one")
    assert (out / "parts" / "c000001.json").stat().st_mtime_ns == first_mark  # chunk 1 was kept, not redone
