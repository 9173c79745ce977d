"""`fahr report`: one self-contained HTML page of real run and evaluation outputs, opened in a real
headless browser (Debian's chromium), with no patient or photo identifier in it."""

from __future__ import annotations

import re
import shutil
import subprocess

import pandas as pd
import pytest

from conftest import compose_config, require_mark


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """A FaceSurvival run (images; predictions_test.csv holds pseudonymous person ids) and a `fahr evaluate`
    output of a table with a patient column, both made by the real commands."""
    from lifelines.datasets import load_rossi

    from fahr.config.evaluate_schema import register_evaluate_schema
    from fahr.pipeline.evaluate import evaluate
    from fahr.pipeline.finetune_survival import finetune_survival

    tmp = tmp_path_factory.mktemp("report")
    run = finetune_survival(compose_config("finetune_survival", [
        "experiment=demo_facesurvival", "backbone=null", "model=vit_test", "data.generate.n_patients=120",
        "data.generate.samples_per_shard=32", "data.batch_size=16", "data.num_workers=0", "task.max_steps=4",
        "task.val_every_n_steps=2", "trainer.log_every_n_steps=1", f"paths.root_dir={tmp}"]))
    df = load_rossi()
    df.insert(0, "pid", [f"PSEUDO{i:05d}" for i in range(len(df))])
    df.to_csv(tmp / "cohort.csv", index=False)
    register_evaluate_schema()
    evaluate(compose_config("evaluate", [f"input={tmp / 'cohort.csv'}", f"output={tmp / 'eval'}", "columns.time=week",
                                         "columns.event=arrest", "columns.patient=pid", "markers.faceage.column=age",
                                         "covariates=[fin,prio]"]))
    analysis = tmp / "analysis"
    analysis.mkdir()
    pd.DataFrame({"perturbation": ["<script>alert(1)</script>", "blur"], "mean_change": [0.5, -1.25]}).to_csv(
        analysis / "summary.csv", index=False)
    pd.DataFrame({"photo": ["IMG_PERSON_A.jpg"], "change": [1.0]}).to_csv(analysis / "per_photo.csv", index=False)
    # per-patient rows without an identifier column: an outcome column, or numbers only
    pd.DataFrame({"time": [4321.0], "event": [1], "site": ["lung"]}).to_csv(analysis / "per_patient.csv", index=False)
    pd.DataFrame({"age": [91.25], "faceage": [88.5]}).to_csv(analysis / "numbers.csv", index=False)
    return run, tmp / "eval", analysis


def test_report_of_a_run_an_evaluation_and_an_analysis(outputs, run_fahr, tmp_path):
    run, eval_dir, analysis = outputs
    out = tmp_path / "report.html"
    result = run_fahr("report", f"input=[{run.run_dir},{eval_dir},{analysis}]", f"output={out}")
    assert result.status == 0, result.err
    text = out.read_text()
    for title in ("Run demo_facesurvival", "demo_facesurvival: training curves", "demo_facesurvival: metrics (metrics.json)",
                  "demo_facesurvival: model card", "Clinical statistics (eval)", "Results: analysis", "Left out of this page"):
        assert f">{title}" in text, title
    persons = pd.read_csv(run.run_dir / "predictions_test.csv")["person"].astype(str)
    assert len(persons) and not any(p in text for p in persons), "a person id reached the report"
    assert "PSEUDO" not in text and "IMG_PERSON_A" not in text
    assert "predictions_test.csv</td><td>a run&#x27;s per-row file (predictions or evaluation input)" in text
    assert "per_patient.csv</td><td>per-patient table (outcome or date column)" in text
    assert "numbers.csv</td><td>numbers only, no row labels (taken for per-row data)" in text
    assert "91.25" not in text and "4321" not in text
    assert "per_photo.csv</td><td>per-person or per-photo table (identifier column)" in text
    assert "<script" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", text), "everything is embedded"
    c_index = pd.read_csv(eval_dir / "cindex.csv").iloc[0]
    assert f"{float(c_index['c_index']):.4g}" in text  # the evaluation's own numbers, as written
    assert str(run.run_dir.parent) not in text, "file paths are left out"


def test_positional_folder_and_bad_inputs(outputs, run_fahr, tmp_path):
    run, _, _ = outputs
    ok = run_fahr("report", str(run.run_dir), f"output={tmp_path / 'one.html'}")
    assert ok.status == 0, ok.err and (tmp_path / "one.html").is_file()
    for args, message in [
        ((f"output={tmp_path / 'x.html'}",), "input is required"),
        ((str(tmp_path / "nope"), f"output={tmp_path / 'x.html'}"), "not a directory"),
        ((str(tmp_path), f"output={tmp_path / 'x.html'}"), "no fahr results found"),
        ((str(run.run_dir), f"output={tmp_path / 'x.pdf'}"), "give an .html file name"),
    ]:
        bad = run_fahr("report", *args)
        assert bad.status == 2 and message in bad.err and "Traceback" not in bad.err, (args, bad.err)


def test_a_figure_that_is_not_a_png_is_not_embedded(tmp_path):
    from fahr.report.sections import collect

    (tmp_path / "fig.png").write_bytes(b"<svg onload=alert(1)>")
    (tmp_path / "t.csv").write_text("metric,value\nmae,5.5\n")
    got = collect(tmp_path)
    html = "".join(b for s in got.sections for b in s.blocks)
    assert "fig.png: not a PNG file, left out" in html and "<svg" not in html and "5.5" in html


@pytest.mark.browser
@pytest.mark.slow
def test_report_renders_in_headless_chromium_with_every_image_loaded(outputs, tmp_path):
    """The shipped page, unmodified, inside a test-only frame whose script counts the loaded images."""
    require_mark("browser", "runs chromium")
    browser = shutil.which("chromium")
    if browser is None:
        pytest.fail("chromium not found: `apt-get install chromium` (Debian); .ci/run installs it", pytrace=False)
    from fahr.pipeline.report import write_report

    run, eval_dir, analysis = outputs
    page = tmp_path / "report.html"
    write_report([run.run_dir, eval_dir, analysis], page)
    expected = page.read_text().count("<img ")
    probe = tmp_path / "probe.html"
    probe.write_text(f"""<!DOCTYPE html><html><body><iframe id=f src="{page.name}" width=1200 height=900></iframe>
<pre id=out>pending</pre><script>
document.getElementById('f').onload = () => {{
  const imgs = [...document.getElementById('f').contentDocument.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.getElementById('out').textContent = 'images ' + ok + '/' + imgs.length;
}};</script></body></html>""")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
             "--virtual-time-budget=5000", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert f"images {expected}/{expected}" in dom.stdout, dom.stdout[-500:] + dom.stderr[-500:]
    assert expected >= 2  # the training curves and the Kaplan-Meier curve at least
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()],
                   capture_output=True, timeout=120)
    from PIL import Image

    pixels = Image.open(shot).convert("L")
    assert pixels.getextrema()[0] < 100, "the page rendered text (dark pixels), not a blank screen"


def test_a_run_file_that_is_not_an_object_is_one_line(tmp_path, run_fahr):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("[1, 2]")
    (tmp_path / "run" / "provenance.json").write_text('"text"')
    bad = run_fahr("report", str(tmp_path / "run"), f"output={tmp_path / 'x.html'}")
    assert bad.status == 2 and "not a fahr run file" in bad.err and "Traceback" not in bad.err
