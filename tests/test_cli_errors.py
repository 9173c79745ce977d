"""How `fahr <command>` ends: bad input on one line (exit 2), fahr's own bugs on one line without data
(exit 1), the traceback only with `--debug`; the real console script in a subprocess once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def test_an_internal_error_names_its_place_but_never_its_data(run_fahr, tmp_path, monkeypatch):
    """A bug whose exception message carries a cell value: the value never reaches the terminal."""
    import fahr.pipeline.evaluate as evaluate

    def buggy(cfg):
        raise KeyError("PATIENT-7731")

    monkeypatch.setattr(evaluate, "evaluate", buggy)
    r = run_fahr("evaluate", f"input={tmp_path}/x.csv", f"output={tmp_path}/out")
    assert r.status == 1, r
    assert r.error_line.startswith("fahr evaluate: internal error: KeyError at tests/test_cli_errors.py:")
    assert "This is a bug in fahr, not in your input: rerun with `fahr --debug evaluate ...`" in r.error_line
    assert "PATIENT-7731" not in r.err + r.out


def test_debug_shows_the_traceback(run_fahr, tmp_path, monkeypatch):
    import fahr.pipeline.evaluate as evaluate

    def buggy(cfg):
        raise KeyError("a bug")

    monkeypatch.setattr(evaluate, "evaluate", buggy)
    monkeypatch.setenv("FAHR_DEBUG", "0")  # so the switch's FAHR_DEBUG=1 is undone after this test
    r = run_fahr("--debug", "evaluate", f"input={tmp_path}/x.csv", f"output={tmp_path}/out")
    assert r.status == 1 and "KeyError: 'a bug'" in r.err and "buggy" in r.err, r
    assert os.environ.get("FAHR_DEBUG") == "1"


def test_input_errors_are_one_line_with_status_2(run_fahr, tmp_path):
    r = run_fahr("far", "model=x", f"input={tmp_path}/absent.csv", f"output={tmp_path}/o.csv", "method=median")
    assert r.status == 2 and r.err.count("\n") == 1, r
    assert r.err == "fahr far: error: method must be one of ('pair', 'slope'), got 'median'\n"


def test_hydra_config_errors_also_exit_2(run_fahr, tmp_path):
    r = run_fahr("evaluate", f"input={tmp_path}/x.csv", f"output={tmp_path}/o", "min_evnts=3")
    assert r.status == 2 and "min_evnts" in r.err and "Traceback" not in r.err, r


@pytest.mark.parametrize("override, line", [
    ("batchsize=3", "fahr predict: error: Could not override 'batchsize'. Key 'batchsize' not in 'PredictConfig'. "
                    "To append to your config use +batchsize=3"),
    ("batch_size=many", "fahr predict: error: Error merging override batch_size=many. Value 'many' of type 'str' "
                        "could not be converted to Integer"),
    ("+preprocessing.marign=0.2", "fahr predict: error: preprocessing.marign: Key 'marign' not in 'PreprocessingOverrides'"),
    ("model=[", "fahr predict: error: no viable alternative at input '['. See "
                "https://hydra.cc/docs/1.2/advanced/override_grammar/basic for details"),
])
def test_a_config_hydra_cannot_compose_is_one_line(override, line, run_fahr, tmp_path):
    """Hydra's own config errors (unknown key, wrong type, bad override syntax) are one line, like fahr's,
    without Hydra's locator lines or its HYDRA_FULL_ERROR hint; HYDRA_FULL_ERROR is left as it was."""
    before = os.environ.get("HYDRA_FULL_ERROR")
    r = run_fahr("predict", "model=x", f"input={tmp_path}", f"output={tmp_path}/o.csv", override)
    assert r.status == 2 and r.err == line + "\n", r
    assert os.environ.get("HYDRA_FULL_ERROR") == before


def test_an_unknown_config_group_option_lists_the_options_in_one_line():
    """The real console script: a misspelt experiment names the options there are, on one line."""
    r = subprocess.run([sys.executable, "-m", "fahr.cli.main", "finetune-age", "experiment=demo_faceag"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and r.stdout == "", r
    assert r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("fahr finetune-age: error: In 'finetune_age': Could not find 'experiment/demo_faceag'. "
                               "Available options in 'experiment': bench_deepsurv_gbsg, "), r.stderr
    assert "demo_faceage, demo_facesurvival" in r.stderr and "search path" not in r.stderr


def test_worker_tracebacks_collapse_to_their_message():
    from fahr.cli._hydra import _one_line

    wrapped = ("Caught ShardReadError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               "  File \"x.py\", line 3, in f\n    raise ShardReadError(m)\n"
               "fahr.data.shard_reader.ShardReadError: cannot read shard /d/x-000001.tar: invalid tar header at byte 0\n")
    assert _one_line(wrapped) == "cannot read shard /d/x-000001.tar: invalid tar header at byte 0"
    assert _one_line("two\nlines") == "two lines"


@pytest.mark.slow
def test_the_console_script_reports_bad_input_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("FAHR_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "fahr.cli.main", "predict", f"model={tmp_path}/none",
                           f"input={tmp_path}", f"output={tmp_path}/o.csv"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"fahr predict: error: model {tmp_path}/none: not a directory; give a `fahr export` directory "
        "(model_card.json + model.safetensors)"]
