"""Driving jobs on the local SLURM cluster from tests (slurm/local-cluster.sh): job state, requeues,
and the cluster itself."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "slurm" / "local-cluster.sh"
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL")


def ensure_cluster() -> None:
    """The local one-node cluster running (started here if SLURM is installed), or the test skipped saying why.

    Tests never install packages: `.ci/run` (or the user, `slurm/local-cluster.sh start`) installs SLURM."""
    from conftest import require_mark

    require_mark("slurm", "submits jobs to SLURM")
    if shutil.which("sinfo") is not None:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and any(s in out.stdout for s in ("idle", "mixed", "allocated")):
            return
    if shutil.which("slurmctld") is None:
        pytest.skip("SLURM is not installed: run `sudo slurm/local-cluster.sh start` once (installs and starts it)")
    proc = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"slurm/local-cluster.sh start failed:\n{proc.stdout}\n{proc.stderr}"


def job_info(job_id: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (``JobState``, ``Restarts``, ...); empty once SLURM forgot it."""
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_until_ended(job_id: str, timeout: float = 900) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job_id)
        if info.get("JobState") in ENDED:
            return info
        time.sleep(1)
    subprocess.run(["scancel", job_id], timeout=30)
    raise AssertionError(f"job {job_id} did not end within {timeout} s: {job_info(job_id)}")


def start_when_requeued(job_id: str, restarts: int, timeout: float = 180) -> None:
    """A requeued job waits ~2 min (its BeginTime) before it may start again: start it now, once the
    node is idle and the clock has left the second of the requeue. slurmd refuses a launch credential
    created in the same second as the previous attempt's revocation ("Killing non-startable batch
    job: Job credential revoked" in slurmctld.log; the job then FAILS); SLURM's own 2-minute wait is
    what normally hides that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = job_info(job_id)
        node = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=30).stdout
        if job.get("Restarts") == str(restarts) and job.get("JobState") == "PENDING" and node.strip() == "idle":
            time.sleep(2.0)
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], timeout=30)
            return
        if job.get("JobState") in ENDED:
            raise AssertionError(f"job {job_id} ended instead of being requeued: {job}")
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} was not requeued (Restarts={restarts}) and idle within {timeout} s: "
                         f"{job_info(job_id)}")


def wait_for_file(pattern: str, job_id: str, timeout: float = 600) -> Path:
    """The first file matching the absolute glob ``pattern``, waiting while the job runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(Path("/").glob(pattern.lstrip("/")))
        if found:
            return found[0]
        state = job_info(job_id).get("JobState")
        if state in ENDED:
            raise AssertionError(f"job {job_id} ended ({state}) before {pattern} appeared")
        time.sleep(0.2)
    raise AssertionError(f"{pattern} did not appear within {timeout} s")
