"""ONNX: `fahr export format=onnx` and `fahr predict runtime=onnx` against PyTorch.

Tiny random FaceModels (vit_test, 64 px) are saved with save_face_model, exported to ONNX, and run
on real UTKFace photos (../shared/data, skipped with a reason when absent) through the shared predict
path, so decoding, detection and alignment run for real and only the model forward differs. The
reference is the PyTorch FaceModel itself: max |ONNX - PyTorch| <= 1e-4 (years, log-hazard), batch 1
and batch N equal to 1e-5. Hostile cases: stale, replaced, damaged, missing or foreign graphs and
missing packages each end as one line saying what to run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fahr.boundary import InputError
from fahr.inference.predict import make_aligner, output_columns, predict_photos, resolve_preprocessing
from fahr.models.backbone import create_backbone
from fahr.models.face_model import FaceModel, load_face_model, save_face_model
from fahr.models.heads import AgeHead, RiskHead
from fahr.models.onnx_export import (
    DEFAULT_OPSET,
    ONNX_FILE,
    OnnxFaceModel,
    export_onnx,
    graph_card_sha256,
    load_onnx_model,
)
from fahr.models.weights import CARD_FILE, WEIGHTS_FILE, model_card, save_backbone
from tests.conftest import shared_data

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install 'fahr[onnx]')")

PARITY = 1e-4  # years / log-hazard (the issue's bar)
BATCH_PARITY = 1e-5
N_PHOTOS = 12
CALIBRATION = {"slope": 0.8, "intercept": 5.0}


def make_model(heads: tuple[str, ...] = ("age",), flip: bool = True, img_size: int = 64, num_covariates: int = 0,
               seed: int = 0) -> FaceModel:
    """A vit_test FaceModel whose outputs vary from face to face (the age head's last layer re-drawn)."""
    torch.manual_seed(seed)
    bb = create_backbone("vit_test", img_size=img_size, patch_size=16)
    built: dict[str, torch.nn.Module] = {}
    if "age" in heads:
        built["age"] = AgeHead(bb.num_features, kind="distribution")
        torch.nn.init.normal_(built["age"].net[-1].weight, std=0.5)
    if "risk" in heads:
        built["risk"] = RiskHead(bb.num_features, num_covariates=num_covariates, hidden=[16])
    return FaceModel(bb, built, [0.5, 0.45, 0.4], [0.25, 0.24, 0.23], flip_average=flip)


def save(model: FaceModel, export_dir: Path) -> Path:
    card = {"task": "faceage", "age_calibration": CALIBRATION} if "age" in model.heads else {"task": "facesurvival"}
    return save_face_model(export_dir, model, card)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_card(export_dir: Path) -> dict:
    return json.loads((export_dir / CARD_FILE).read_text())


def write_card(export_dir: Path, card: dict) -> None:
    (export_dir / CARD_FILE).write_text(json.dumps(card))


def utkface_paths(n: int = N_PHOTOS) -> list[Path]:
    """``n`` UTKFace photos (200x200 crops with their background), the first by sha1: a fixed sample."""
    root = shared_data("utkface")
    with open(root / "manifest.csv", newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["sha1"])
    return [root / r["file"] for r in rows[:n]]


def compare_rows(torch_rows: list[dict], onnx_rows: list[dict], columns: list[str]) -> dict[str, float]:
    """Max |ONNX - PyTorch| per value column, after checking the rows agree on path and status."""
    assert [(r["path"], r["status"]) for r in onnx_rows] == [(r["path"], r["status"]) for r in torch_rows]
    ok = [i for i, r in enumerate(torch_rows) if r["status"] == "ok"]
    assert len(ok) >= N_PHOTOS - 2, "detection should find the face in (almost) every UTKFace photo"
    return {c: max(abs(onnx_rows[i][c] - torch_rows[i][c]) for i in ok) for c in columns}


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """Export directories, each with its model.onnx: age models with and without mirror averaging (the
    same weights), an image-only risk model, and an age + covariate-risk model."""
    root = tmp_path_factory.mktemp("onnx_exports")
    out = {
        "age_flip": save(make_model(flip=True), root / "age_flip"),
        "age_noflip": save(make_model(flip=False), root / "age_noflip"),
        "risk": save(make_model(("risk",), seed=1), root / "risk"),
        "covariates": save(make_model(("age", "risk"), num_covariates=3, seed=2), root / "covariates"),
    }
    for export_dir in out.values():
        export_onnx(export_dir)
    return out


@pytest.fixture
def fresh_export(exports, tmp_path) -> Path:
    """A copy of the age model's export (with its model.onnx) that a test may damage."""
    return Path(shutil.copytree(exports["age_flip"], tmp_path / "export"))


# ---------------------------------------------------------------- the export itself


def test_export_records_the_graph_in_the_card(tmp_path):
    """model.onnx sits beside the safetensors; the card records its file, opset, sha256, the weights'
    sha256 and the graph's signature, with a dynamic batch axis; the rest of the card is unchanged."""
    export_dir = save(make_model(), tmp_path / "export")
    before = read_card(export_dir)
    weights = sha256(export_dir / WEIGHTS_FILE)
    returned = export_onnx(export_dir)
    card = read_card(export_dir)
    record = card.pop("onnx")
    assert card == before and sha256(export_dir / WEIGHTS_FILE) == weights
    assert record == returned
    assert record["file"] == ONNX_FILE and record["opset"] == DEFAULT_OPSET == 18
    assert record["sha256"] == sha256(export_dir / ONNX_FILE)
    assert record["weights_sha256"] == weights
    assert record["card_sha256"] == graph_card_sha256(before)
    assert record["inputs"] == ["images"] and record["outputs"] == ["features", "age", "logits"]
    assert record["dynamic_axes"]["images"] == {"0": "batch"}
    assert set(record["check"]["max_abs_diff"]) == {"features", "age", "logits"}
    assert all(v <= PARITY for v in record["check"]["max_abs_diff"].values())
    model, _ = load_onnx_model(export_dir)
    (images,) = model.session.get_inputs()
    assert images.type == "tensor(uint8)" and isinstance(images.shape[0], str) and images.shape[1:] == [3, 64, 64]
    assert [o.name for o in model.session.get_outputs()] == ["features", "age", "logits"]
    assert sorted(p.name for p in export_dir.iterdir()) == sorted([CARD_FILE, ONNX_FILE, WEIGHTS_FILE, "README.md"])  # no temporary files


def test_graph_equals_facemodel_outputs_and_the_mirror_is_inside(exports):
    """Every output of the graph equals FaceModel.forward on the same uint8 crops (normalisation
    inside); the same weights with and without flip_average give different graphs, each equal to its
    PyTorch model (so the mirror averaging is in the graph, not left to the caller)."""
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    ages = {}
    for name in ("age_flip", "age_noflip"):
        torch_model, _ = load_face_model(exports[name])
        onnx_model, _ = load_onnx_model(exports[name])
        got = onnx_model(images.numpy())
        with torch.inference_mode():
            ref = torch_model(images)
        assert set(got) == {"features", "age", "logits"}
        for key, value in got.items():
            assert np.abs(value - ref[key].numpy()).max() <= PARITY, key
        ages[name] = got["age"]
    assert np.abs(ages["age_flip"] - ages["age_noflip"]).max() > 0.05


def test_covariate_risk_head_takes_a_covariates_input(exports):
    """A risk head with clinical covariates: the graph takes them as a second input (float32
    (batch, C)) and matches PyTorch; age needs none (zeros only fill the input); risk without them is
    refused; predict leaves risk out with either runtime, as it does for PyTorch."""
    export_dir = exports["covariates"]
    onnx_model, card = load_onnx_model(export_dir)
    torch_model, _ = load_face_model(export_dir)
    assert card["onnx"]["inputs"] == ["images", "covariates"]
    gen = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=gen)
    covariates = torch.randn(4, 3, generator=gen)
    got = onnx_model(images.numpy(), covariates.numpy())
    with torch.inference_mode():
        ref = torch_model(images, covariates)
    assert np.abs(got["risk"] - ref["risk"].numpy()).max() <= PARITY
    assert np.abs(got["age"] - ref["age"].numpy()).max() <= PARITY
    age_only = onnx_model(images.numpy(), outputs=["age"])
    assert np.abs(age_only["age"] - ref["age"].numpy()).max() <= PARITY
    with pytest.raises(InputError, match=r"^the risk head takes 3 clinical covariates per photo; none were given$"):
        onnx_model(images.numpy(), outputs=["risk"])
    columns = ["path", "status", "faceage", "faceage_corrected"]
    assert output_columns(onnx_model, card) == output_columns(torch_model, card) == columns


def test_backbone_export_is_refused(tmp_path):
    """A backbone without heads has no FaceAge or risk to export: one line saying what it is."""
    bb = create_backbone("vit_test", img_size=64, patch_size=16)
    save_backbone(tmp_path / "bb", bb.state_dict(), model_card(bb, normalization={"mean": [0.5] * 3, "std": [0.25] * 3}))
    with pytest.raises(InputError, match=r"holds a backbone \(fahr-backbone/1\) without task heads: ONNX export is for "
                                         r"fine-tuned FaceAge / FaceSurvival models"):
        export_onnx(tmp_path / "bb")
    assert not (tmp_path / "bb" / ONNX_FILE).exists()


def test_opset_out_of_range_is_refused(tmp_path):
    export_dir = save(make_model(), tmp_path / "m")
    with pytest.raises(InputError, match=r"^opset must be in \[18, 23\], got 11$"):
        export_onnx(export_dir, opset=11)


# ---------------------------------------------------------------- parity on real photos


@pytest.mark.real_data
@pytest.mark.parametrize("name", ["age_flip", "age_noflip"])
def test_age_parity_on_real_photos(exports, name):
    """FaceAge (and its calibrated value) from real UTKFace photos, detected and aligned by the shared
    path: the ONNX runtime equals PyTorch to 1e-4 years, with and without mirror averaging."""
    paths = utkface_paths()
    torch_model, card = load_face_model(exports[name])
    onnx_model, onnx_card = load_onnx_model(exports[name])
    kw = dict(batch_size=5, device="cpu")  # 12 photos: batches of 5, 5 and 2
    torch_rows = predict_photos(torch_model, card, paths, **kw)
    onnx_rows = predict_photos(onnx_model, onnx_card, paths, **kw)
    diffs = compare_rows(torch_rows, onnx_rows, ["faceage", "faceage_corrected"])
    assert diffs["faceage"] <= PARITY and diffs["faceage_corrected"] <= PARITY / CALIBRATION["slope"]
    ages = [r["faceage"] for r in torch_rows if r["status"] == "ok"]
    assert np.std(ages) > 0.1, "the faces get different ages (the comparison is not of constants)"


@pytest.mark.real_data
def test_risk_parity_on_real_photos(exports):
    """FaceSurvival log-hazard from real photos: ONNX equals PyTorch to 1e-4."""
    paths = utkface_paths()
    torch_model, card = load_face_model(exports["risk"])
    onnx_model, onnx_card = load_onnx_model(exports["risk"])
    torch_rows = predict_photos(torch_model, card, paths, batch_size=32, device="cpu")
    onnx_rows = predict_photos(onnx_model, onnx_card, paths, batch_size=32, device="cpu")
    assert output_columns(onnx_model, onnx_card) == ["path", "status", "risk"]
    assert compare_rows(torch_rows, onnx_rows, ["risk"])["risk"] <= PARITY
    assert np.std([r["risk"] for r in torch_rows if r["status"] == "ok"]) > 1e-3


@pytest.mark.real_data
def test_dynamic_batch_on_real_crops(exports):
    """One graph for every batch size: the aligned real crops one at a time and all at once (a batch
    size the export never saw) give the same per-photo outputs to 1e-5."""
    paths = utkface_paths()
    _, card = load_face_model(exports["age_flip"])
    aligner = make_aligner(resolve_preprocessing(card))
    from fahr.inference.photos import load_photo

    crops = [r.crop for r in aligner.align([load_photo(p) for p in paths]) if hasattr(r, "crop")]
    images = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
    images = torch.nn.functional.interpolate(images.float(), size=(64, 64), mode="area").round().to(torch.uint8)
    onnx_model, _ = load_onnx_model(exports["age_flip"])
    together = onnx_model(images.numpy())
    alone = [onnx_model(images[i : i + 1].numpy()) for i in range(len(images))]
    assert len(images) >= N_PHOTOS - 2
    for key in ("features", "age", "logits"):
        stacked = np.concatenate([a[key] for a in alone])
        assert stacked.shape == together[key].shape
        assert np.abs(stacked - together[key]).max() <= BATCH_PARITY, key


@pytest.mark.real_data
def test_cli_export_then_predict_with_both_runtimes(tmp_path, run_fahr):
    """`fahr export format=onnx model=DIR` then `fahr predict runtime=onnx` gives the CSV of
    `runtime=torch` (same rows and statuses, values to 1e-4 after the CSV's 4-decimal rounding).
    `runtime=auto` (the default) is PyTorch before the export and the ONNX graph after it."""
    export_dir = save(make_model(("age", "risk"), seed=5), tmp_path / "export")
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in utkface_paths():
        shutil.copy(p, photos / p.name)
    tables = {}

    def predict(name: str, *options: str) -> None:
        out = tmp_path / f"{name}.csv"
        r = run_fahr("predict", f"model={export_dir}", f"input={photos}", f"output={out}", "device=cpu",
                     "batch_size=5", *options)
        assert r.status == 0, r
        with open(out, newline="") as f:
            tables[name] = list(csv.DictReader(f))

    predict("auto_before_export")
    r = run_fahr("export", "format=onnx", f"model={export_dir}")
    assert r.status == 0, r
    assert r.out.strip().splitlines()[-1] == str(export_dir / ONNX_FILE)
    assert read_card(export_dir)["onnx"]["weights_sha256"] == sha256(export_dir / WEIGHTS_FILE)
    for runtime in ("torch", "onnx", "auto"):
        predict(runtime, f"runtime={runtime}")
    assert tables["auto_before_export"] == tables["torch"]
    assert tables["auto"] == tables["onnx"]
    assert list(tables["onnx"][0]) == list(tables["torch"][0]) == ["path", "status", "faceage", "faceage_corrected", "risk"]
    assert [(r["path"], r["status"]) for r in tables["onnx"]] == [(r["path"], r["status"]) for r in tables["torch"]]
    ok = [(t, o) for t, o in zip(tables["torch"], tables["onnx"]) if t["status"] == "ok"]
    assert len(ok) >= N_PHOTOS - 2
    for column in ("faceage", "faceage_corrected", "risk"):
        assert max(abs(float(t[column]) - float(o[column])) for t, o in ok) <= PARITY + 1e-9, column


# ---------------------------------------------------------------- hostile: what predict refuses


def one_line_error(run_fahr, export_dir: Path, tmp_path: Path, *extra: str) -> str:
    """Run `fahr predict runtime=onnx` on one synthetic crop; the single stderr line (exit status 2)."""
    crops = tmp_path / "crops"
    crops.mkdir(exist_ok=True)
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(crops / "a.png")
    r = run_fahr("predict", f"model={export_dir}", f"input={crops}", f"output={tmp_path / 'o.csv'}", "runtime=onnx",
                 "preprocessing.detect=true", *extra)
    assert r.status == 2, r
    assert [line for line in r.err.splitlines() if line.strip()] == [r.error_line], "exactly one line on stderr"
    assert not (tmp_path / "o.csv").exists()
    return r.error_line


def rerun(export_dir: Path) -> str:
    return f"run `fahr export format=onnx model={export_dir}` again"


def test_stale_weights_are_refused(fresh_export, tmp_path, run_fahr):
    """The safetensors changed after the export (same architecture, other weights): refused."""
    other = save(make_model(seed=9), tmp_path / "other")
    shutil.copy(other / WEIGHTS_FILE, fresh_export / WEIGHTS_FILE)
    line = one_line_error(run_fahr, fresh_export, tmp_path)
    assert line == (f"fahr predict: error: {fresh_export / ONNX_FILE} is stale: {WEIGHTS_FILE} changed since it was "
                    f"exported; {rerun(fresh_export)}")


def test_edited_card_is_refused(fresh_export, tmp_path):
    """A card fact baked into the graph (flip_average) edited after the export: refused."""
    card = read_card(fresh_export)
    write_card(fresh_export, {**card, "flip_average": False})
    with pytest.raises(InputError, match=r"is stale: the model card's backbone, heads, normalization or "
                                         r"flip_average changed since it was exported"):
        load_onnx_model(fresh_export)
    write_card(fresh_export, {**card, "age_calibration": {"slope": 1.0, "intercept": 0.0}})
    load_onnx_model(fresh_export)  # calibration is applied outside the graph: not stale


def test_re_exported_safetensors_drops_the_record(fresh_export, tmp_path, run_fahr):
    """A fine-tune that writes its export again writes a card without the onnx record: the old
    model.onnx beside it is never used."""
    save(make_model(seed=7), fresh_export)
    assert (fresh_export / ONNX_FILE).exists()
    line = one_line_error(run_fahr, fresh_export, tmp_path)
    assert line == (f"fahr predict: error: {fresh_export / CARD_FILE} records no ONNX graph: run "
                    f"`fahr export format=onnx model={fresh_export}` first")


def test_replaced_graph_is_refused(fresh_export, exports, tmp_path, run_fahr):
    """Another model's (valid) model.onnx put in its place: not the graph the card records."""
    shutil.copy(exports["risk"] / ONNX_FILE, fresh_export / ONNX_FILE)
    line = one_line_error(run_fahr, fresh_export, tmp_path)
    assert line == (f"fahr predict: error: {fresh_export / ONNX_FILE} is not the graph the card records (sha256 "
                    f"differs: replaced or damaged since the export); {rerun(fresh_export)}")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_graph_is_one_line(fresh_export, tmp_path, run_fahr, damage):
    """A damaged model.onnx: the sha256 check names it; with the card's sha256 forged to match, onnxruntime
    cannot load it, and that is one line too (never onnxruntime's traceback or log)."""
    data = (fresh_export / ONNX_FILE).read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage]
    (fresh_export / ONNX_FILE).write_bytes(damaged)
    assert one_line_error(run_fahr, fresh_export, tmp_path).endswith(
        f"is not the graph the card records (sha256 differs: replaced or damaged since the export); {rerun(fresh_export)}")
    card = read_card(fresh_export)
    card["onnx"]["sha256"] = hashlib.sha256(damaged).hexdigest()
    write_card(fresh_export, card)
    line = one_line_error(run_fahr, fresh_export, tmp_path)
    assert line.startswith(f"fahr predict: error: {fresh_export / ONNX_FILE}: onnxruntime cannot load it as an ONNX "
                           "model (")
    assert line.endswith(f"re-create it with `fahr export format=onnx model={fresh_export}`")


def test_graph_naming_external_data_is_not_read(fresh_export, tmp_path):
    """A model.onnx whose weights point at another file (external data) is refused, the file unread:
    the graph reaches onnxruntime as bytes, with no folder to resolve paths in."""
    from onnx import TensorProto, helper

    (fresh_export / "secret.bin").write_bytes(b"\x00" * 64)
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "secret.bin"), ("offset", "0"), ("length", "16")):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph([helper.make_node("Add", ["images", "w"], ["features"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, [4])], [weight])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()
    (fresh_export / ONNX_FILE).write_bytes(data)
    import onnxruntime

    # a well-formed graph: loaded by its path, onnxruntime would read secret.bin beside it
    onnxruntime.InferenceSession(str(fresh_export / ONNX_FILE), providers=["CPUExecutionProvider"])
    card = read_card(fresh_export)
    card["onnx"].update(sha256=hashlib.sha256(data).hexdigest(), outputs=["features"])
    write_card(fresh_export, card)
    with pytest.raises(InputError, match=r"onnxruntime cannot load it as an ONNX model \(Fail\)"):
        load_onnx_model(fresh_export)


def test_graph_of_another_shape_is_refused(fresh_export, tmp_path):
    """A valid graph whose input size differs from the card's (card sha256 forged to match): refused
    before any photo is run."""
    other = save(make_model(img_size=32), tmp_path / "small")
    export_onnx(other)
    shutil.copy(other / ONNX_FILE, fresh_export / ONNX_FILE)
    card = read_card(fresh_export)
    card["onnx"]["sha256"] = sha256(fresh_export / ONNX_FILE)
    write_card(fresh_export, card)
    with pytest.raises(InputError, match=r"its inputs/outputs do not match the card \(expected uint8 images "
                                         r"\(batch, 3, 64, 64\) -> \['features', 'age', 'logits'\]\)"):
        load_onnx_model(fresh_export)


def test_missing_or_irregular_graph(fresh_export, tmp_path, run_fahr):
    (fresh_export / ONNX_FILE).unlink()
    line = one_line_error(run_fahr, fresh_export, tmp_path)
    assert line == f"fahr predict: error: {fresh_export / ONNX_FILE}: no such file; {rerun(fresh_export)}"
    os.mkfifo(fresh_export / ONNX_FILE)  # a FIFO must not hang the read
    line = one_line_error(run_fahr, fresh_export, tmp_path)
    assert line.startswith(f"fahr predict: error: {fresh_export / ONNX_FILE}: ") and "not a regular file" in line


@pytest.mark.parametrize("record", [{"file": "../model.onnx"}, "model.onnx", {"file": "model.onnx", "sha256": "x"}])
def test_malformed_record_is_refused(fresh_export, record):
    card = read_card(fresh_export)
    write_card(fresh_export, {**card, "onnx": record})
    with pytest.raises(InputError, match=r"model_card\.json: onnx must be the record `fahr export format=onnx "
                                         r"model=.*` writes"):
        load_onnx_model(fresh_export)


def test_missing_packages_say_what_to_install(fresh_export, tmp_path, monkeypatch, run_fahr):
    """Without onnxruntime (predict) or onnxscript (export): one line naming the extra to install."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    line = one_line_error(run_fahr, fresh_export, tmp_path)
    assert line == ("fahr predict: error: runtime=onnx needs onnxruntime, which is not installed: "
                    "pip install 'fahr[onnx]' (or use runtime=torch)")
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(InputError, match=r"^ONNX export needs the onnx and onnxscript packages \(onnxscript is not "
                                         r"installed\): pip install 'fahr\[onnx\]'$"):
        export_onnx(fresh_export)


def test_auto_runtime_is_onnx_only_where_it_can_run(fresh_export, tmp_path, monkeypatch):
    """runtime=auto: ONNX for an export with a graph on the CPU; PyTorch on a GPU, for an export
    without a graph, and without onnxruntime; an explicit runtime is kept."""
    from fahr.pipeline.predict import resolve_runtime

    bare = save(make_model(("age",), seed=1), tmp_path / "bare")
    assert resolve_runtime(str(fresh_export), "auto", "cpu") == "onnx"
    assert resolve_runtime(str(fresh_export), "auto", "cuda") == "torch"
    assert resolve_runtime(str(bare), "auto", "cpu") == "torch"
    assert resolve_runtime(str(fresh_export), "torch", "cpu") == "torch"
    assert resolve_runtime(str(bare), "onnx", "cpu") == "onnx"  # and loading it says what to run
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert resolve_runtime(str(fresh_export), "auto", "cpu") == "torch"


def test_options_are_checked(fresh_export, tmp_path, run_fahr):
    """runtime=onnx runs on the CPU; runtime and format take their named values only."""
    line = one_line_error(run_fahr, fresh_export, tmp_path, "device=cuda")
    assert line == "fahr predict: error: runtime=onnx runs on the CPU (onnxruntime's CPU provider): use device=cpu or auto, not 'cuda'"
    r = run_fahr("predict", f"model={fresh_export}", f"input={tmp_path}", f"output={tmp_path / 'o.csv'}", "runtime=tensorrt")
    assert r.status == 2 and r.error_line == "fahr predict: error: runtime must be one of auto, torch, onnx, got 'tensorrt'"
    r = run_fahr("export", "format=pdf", f"model={fresh_export}")
    assert r.status == 2 and r.error_line == "fahr export: error: format must be one of safetensors, onnx, got 'pdf'"
    r = run_fahr("export", "format=onnx", f"model={fresh_export}", "opset=9")
    assert r.status == 2 and r.error_line == "fahr export: error: opset must be in [18, 23], got 9"
    r = run_fahr("export", "format=onnx")
    assert r.status == 2 and r.error_line == "fahr export: error: model is required: add model=... to the command line"


def test_format_safetensors_is_the_pretraining_export(tmp_path, run_fahr):
    """format=safetensors (the default) is the pretraining run's export, which reads a run directory."""
    r = run_fahr("export", "format=safetensors", f"export.run_dir={tmp_path / 'no_run'}")
    assert r.status == 2 and r.error_line.startswith(f"fahr export: error: run directory {tmp_path / 'no_run'} not found")


def test_loaded_graph_refuses_wrong_inputs(exports):
    model, _ = load_onnx_model(exports["age_flip"])
    assert isinstance(model, OnnxFaceModel) and model.img_size == 64
    with pytest.raises(TypeError, match=r"takes uint8 images \(B, 3, 64, 64\), got float32"):
        model(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(TypeError, match=r"got uint8 \(1, 3, 32, 32\)"):
        model(np.zeros((1, 3, 32, 32), np.uint8))
