"""`fahr predict`: raw photos -> detect + align as the model card says -> FaceAge / risk CSV.

A tiny FaceModel (vit_test) is saved with save_face_model, so the real export and card path are
exercised. Real faces come from ../shared/data/fgnet (skipped with a reason when absent); unreadable
and face-less files are written next to them and must get a status, not a crash.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from fahr.boundary import InputError
from fahr.config.inference_schema import register_predict
from fahr.inference.photos import STATUSES, list_photos, status_of
from fahr.inference.predict import (
    predict_photos,
    resolve_preprocessing,
    run_model,
    time_photos_per_second,
)
from fahr.models.backbone import create_backbone
from fahr.models.face_model import FaceModel, load_face_model, save_face_model
from fahr.models.heads import AgeHead, RiskHead
from tests.conftest import REPO, shared_data

CALIBRATION = {"slope": 0.8, "intercept": 5.0}
N_FGNET = 6


def make_export(export_dir: Path, preprocessing: dict | None = None, calibration: bool = True) -> Path:
    """A vit_test FaceModel (64 px input, age + risk heads) saved as an export directory."""
    torch.manual_seed(0)
    bb = create_backbone("vit_test", img_size=64, patch_size=16)
    age = AgeHead(bb.num_features, kind="regression")
    torch.nn.init.normal_(age.net[-1].weight, std=1.0)  # so different faces get different ages
    model = FaceModel(bb, {"age": age, "risk": RiskHead(bb.num_features)}, [0.5] * 3, [0.25] * 3)
    card: dict = {"task": "faceage"}
    if calibration:
        card["age_calibration"] = CALIBRATION
    if preprocessing is not None:
        from fahr.models.face_model import DEFAULT_PREPROCESSING

        card["preprocessing"] = {**DEFAULT_PREPROCESSING, **preprocessing}
    return save_face_model(export_dir, model, card)


def compose_predict(overrides: list[str]):
    register_predict()
    GlobalHydra.instance().clear()
    with initialize(version_base="1.3", config_path=None):
        return compose(config_name="predict", overrides=overrides)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    """FG-NET raw photos, plus a zero-byte .jpg, a text file named .jpg, a grey and a noise image."""
    src = shared_data("fgnet/images")
    d = tmp_path_factory.mktemp("photos")
    for p in sorted(src.iterdir())[:N_FGNET]:
        shutil.copy(p, d / p.name)
    (d / "bad").mkdir()
    (d / "bad" / "empty.jpg").write_bytes(b"")
    (d / "bad" / "text.jpg").write_text("not an image\n")
    Image.new("RGB", (300, 240), (128, 128, 128)).save(d / "bad" / "grey.png")
    noise = np.random.default_rng(0).integers(0, 256, (240, 300, 3), dtype=np.uint8)
    Image.fromarray(noise).save(d / "bad" / "noise.png")
    (d / "notes.txt").write_text("ignored: not an image extension")
    return d


# ---------------------------------------------------------------- small pieces


def test_status_vocabulary():
    assert status_of("face:none") == "no_face"
    assert status_of("face:too_small") == "no_face"
    assert status_of("face:multiple") == "multiple_faces"
    assert status_of("face:low_confidence") == "low_confidence"
    for reason in ("image:empty", "image:unreadable", "image:too_large", "image:missing", "image:not_regular"):
        assert status_of(reason) == "unreadable"
    assert set(STATUSES) == {"ok", "no_face", "multiple_faces", "low_confidence", "unreadable"}


FAHR_CROPS = {"crops": "fahr", "detect": True, "image_size": 96, "margin": 0.1, "multi_face": "largest",
              "min_confidence": 0.9, "template": "descriptive only"}


def test_fahr_crops_model_redoes_its_training_crops():
    """Trained on fahr's crops: raw photos get exactly those crops; detect=false states the inputs
    are such crops; which faces to keep may change, how they are cropped may not."""
    card = {"preprocessing": FAHR_CROPS}
    assert resolve_preprocessing(card) == {"detect": True, "image_size": 96, "margin": 0.1,
                                           "multi_face": "largest", "min_confidence": 0.9}
    assert resolve_preprocessing(card, {"detect": False, "margin": None})["detect"] is False
    assert resolve_preprocessing(card, {"multi_face": "reject", "min_confidence": 0.5})["multi_face"] == "reject"
    assert resolve_preprocessing(card, {"margin": 0.1, "image_size": 96})["margin"] == 0.1  # the same values
    with pytest.raises(InputError, match=r"^preprocessing\.margin=0\.25 differs from the crops this model was "
                                         r"trained on \(margin 0\.1\)"):
        resolve_preprocessing(card, {"margin": 0.25})
    with pytest.raises(InputError, match=r"^preprocessing\.image_size=112 differs"):
        resolve_preprocessing(card, {"image_size": 112})
    with pytest.raises(InputError, match="unknown preprocessing"):
        resolve_preprocessing(card, {"marign": 0.2})


@pytest.mark.parametrize("prep", [
    {"crops": "external", "detect": False, "image_size": 64, "source": "utkface photos taken as crops"},
    {"detect": False, "image_size": 64},  # a card from before the `crops` key: detect=false meant the same
])
def test_external_crops_model_needs_crops_and_says_so(prep):
    card = {"preprocessing": prep}
    with pytest.raises(InputError, match=r"^this model was trained on .*not on crops made by fahr's face detector "
                                         r"and template.*say preprocessing\.detect=false"):
        resolve_preprocessing(card)
    with pytest.raises(InputError, match=r"^preprocessing\.detect=true: fahr's detector and template make crops "
                                         r"this model never saw"):
        resolve_preprocessing(card, {"detect": True})
    assert resolve_preprocessing(card, {"detect": False}) == {
        "detect": False, "image_size": 64, "margin": 0.0, "multi_face": "reject", "min_confidence": 0.95}
    if "source" in prep:
        with pytest.raises(InputError, match="trained on utkface photos taken as crops"):
            resolve_preprocessing(card)


def test_unknown_crops_take_the_callers_word_either_way():
    card = {"preprocessing": {"crops": "unknown", "detect": False, "image_size": 64}}
    with pytest.raises(InputError, match="crops of unrecorded origin"):
        resolve_preprocessing(card)
    assert resolve_preprocessing(card, {"detect": True})["detect"] is True
    assert resolve_preprocessing(card, {"detect": False})["detect"] is False


@pytest.mark.real_data
def test_list_photos_directory_is_recursive_and_sorted(photo_dir):
    labels = [Path(p.label).relative_to(photo_dir).as_posix() for p in list_photos(photo_dir)]
    assert labels == sorted(labels) and "notes.txt" not in labels
    assert "bad/empty.jpg" in labels and len(labels) == N_FGNET + 4


# ---------------------------------------------------------------- end to end


@pytest.mark.real_data
def test_predict_folder_end_to_end(export, photo_dir, tmp_path):
    from fahr.pipeline.predict import predict

    out = tmp_path / "pred.csv"
    cfg = compose_predict([f"model={export}", f"input={photo_dir}", f"output={out}", "device=cpu", "batch_size=4"])
    summary = predict(cfg)
    rows = read_rows(out)
    inputs = list_photos(photo_dir)
    assert [r["path"] for r in rows] == [p.label for p in inputs]  # one row per input, in order
    assert list(rows[0]) == ["path", "status", "faceage", "faceage_corrected", "risk"]
    status = {Path(r["path"]).name: r["status"] for r in rows}
    assert status["empty.jpg"] == status["text.jpg"] == "unreadable"
    assert status["grey.png"] == "no_face"
    assert status["noise.png"] in ("no_face", "low_confidence")
    faces = [r for r in rows if r["path"].upper().endswith(".JPG") and "bad" not in r["path"]]
    assert sum(r["status"] == "ok" for r in faces) >= N_FGNET - 1  # MTCNN finds FG-NET faces
    for r in rows:
        if r["status"] == "ok":
            age, corrected = float(r["faceage"]), float(r["faceage_corrected"])
            assert corrected == pytest.approx((age - 5.0) / 0.8, abs=1e-3)
            assert np.isfinite(float(r["risk"]))
        else:
            assert r["faceage"] == r["faceage_corrected"] == r["risk"] == ""
    assert len({r["faceage"] for r in rows if r["status"] == "ok"}) > 1
    assert summary["photos"] == len(inputs) and sum(summary["counts"].values()) == len(inputs)


@pytest.mark.real_data
def test_predict_photos_api_with_csv_input(export, photo_dir, tmp_path):
    """A CSV's relative paths are taken from its folder; duplicates and missing files keep their row."""
    model, card = load_face_model(export)
    names = sorted(p.name for p in photo_dir.glob("*.JPG"))[:2]
    rel = [str(Path("..") / photo_dir.name / n) for n in names]
    tmp_sub = tmp_path / "sub"
    tmp_sub.mkdir()
    listing = tmp_sub / "list.csv"
    shutil.copytree(photo_dir, tmp_path / photo_dir.name)
    listing.write_text("path\n" + "\n".join([rel[0], "missing.jpg", rel[1], rel[0]]) + "\n")
    photos = list_photos(listing)
    assert [p.label for p in photos] == [rel[0], "missing.jpg", rel[1], rel[0]]
    rows = predict_photos(model, card, photos, batch_size=2, device="cpu")
    assert [r["path"] for r in rows] == [p.label for p in photos]
    assert [r["status"] for r in rows] == ["ok", "unreadable", "ok", "ok"]
    # the same photo gets the same crop whatever else is in its batch; the model's batched arithmetic
    # leaves differences far below the CSV's 1e-4 years
    assert rows[0]["faceage"] == pytest.approx(rows[3]["faceage"], abs=1e-4)
    assert rows[1]["faceage"] is None
    # plain paths work too, labelled by themselves
    plain = predict_photos(model, card, [photos[0].path], device="cpu")
    assert plain[0]["path"] == str(photos[0].path) and plain[0]["faceage"] == pytest.approx(rows[0]["faceage"], abs=1e-4)


def test_crops_are_only_resized(tmp_path):
    """A model trained on crops made elsewhere, told the inputs are such crops: a 112 px crop (here: noise, which has no face) is only
    resized to the model's 64 px input, and the prediction equals the model on that crop."""
    export = make_export(tmp_path / "export", preprocessing={"detect": False, "image_size": 112}, calibration=False)
    model, card = load_face_model(export)
    crop = np.random.default_rng(1).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    Image.fromarray(crop).save(tmp_path / "aligned.png")
    rows = predict_photos(model, card, [tmp_path / "aligned.png"], device="cpu", preprocessing={"detect": False})
    assert rows[0]["status"] == "ok" and "faceage_corrected" not in rows[0]
    expected = run_model(model, torch.from_numpy(crop).permute(2, 0, 1)[None].contiguous(), 1, torch.device("cpu"))
    assert rows[0]["faceage"] == pytest.approx(float(expected["age"][0]), abs=1e-5)
    assert rows[0]["risk"] == pytest.approx(float(expected["risk"][0]), abs=1e-5)
    # without the statement, or with detection asked for, a model of external crops refuses raw photos
    for prep in (None, {"detect": True}):
        with pytest.raises(InputError, match="preprocessing.detect"):
            predict_photos(model, card, [tmp_path / "aligned.png"], device="cpu", preprocessing=prep)


@pytest.mark.real_data
def test_throughput_timer_reports_both(export, photo_dir):
    model, card = load_face_model(export)
    paths = sorted(photo_dir.glob("*.JPG"))[:2]
    rates = time_photos_per_second(model, card, paths, device="cpu", warmup=1)
    assert rates["photos"] == 2
    for key in ("with_detection", "without_detection", "model_only"):
        assert rates[key] > 0


# ---------------------------------------------------------------- the real command


def _fahr(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fahr.cli.main", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.real_data
@pytest.mark.slow
def test_cli_predict_and_typo(export, photo_dir, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    shutil.copy(sorted(photo_dir.glob("*.JPG"))[0], small / "face.jpg")
    (small / "empty.jpg").write_bytes(b"")
    out = tmp_path / "out" / "pred.csv"
    done = _fahr("predict", f"model={export}", f"input={small}", f"output={out}", "device=cpu", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = read_rows(out)
    assert [(Path(r["path"]).name, r["status"]) for r in rows] == [("empty.jpg", "unreadable"), ("face.jpg", "ok")]
    assert "photos/s" in done.stdout + done.stderr
    assert not list(out.parent.glob(".*.tmp"))  # atomic: no temporary file left behind

    typo = _fahr("predict", f"model={export}", f"input={small}", f"output={out}", "batchsize=4", cwd=tmp_path)
    assert typo.returncode != 0
    assert "batchsize" in typo.stderr and "PredictConfig" in typo.stderr


def test_missing_model_or_photos_is_a_clear_error(export, tmp_path):
    from fahr.pipeline.predict import predict

    (tmp_path / "empty").mkdir()
    cfg = compose_predict([f"model={tmp_path / 'nope'}", f"input={tmp_path}", f"output={tmp_path / 'o.csv'}"])
    with pytest.raises(InputError, match="nope: not a directory"):
        predict(cfg)
    cfg = compose_predict([f"model={export}", f"input={tmp_path / 'empty'}", f"output={tmp_path / 'o.csv'}"])
    with pytest.raises(ValueError, match="no photos"):
        predict(cfg)
    assert not (tmp_path / "o.csv").exists()


@pytest.mark.real_data
def test_raw_photos_and_their_own_crops_give_the_same_faceage(export, photo_dir, tmp_path):
    """One preprocessing: a raw photo through detection + alignment, and the crop that alignment
    made, saved losslessly and given with preprocessing.detect=false, give the same FaceAge."""
    from fahr.inference.photos import load_photo
    from fahr.inference.predict import make_aligner

    model, card = load_face_model(export)
    raws = sorted(photo_dir.glob("*.JPG"))
    from_raw = predict_photos(model, card, raws, device="cpu")
    aligner = make_aligner(resolve_preprocessing(card))
    crops, expected = [], []
    for path, row in zip(raws, from_raw):
        if row["status"] != "ok":
            continue
        (aligned,) = aligner.align([load_photo(path)])
        crops.append(tmp_path / f"{path.stem}.png")
        Image.fromarray(aligned.crop).save(crops[-1])
        expected.append(row["faceage"])
    assert len(crops) >= N_FGNET - 1  # FG-NET faces are found
    from_crops = predict_photos(model, card, crops, device="cpu", preprocessing={"detect": False})
    assert [r["status"] for r in from_crops] == ["ok"] * len(crops)
    assert np.std(expected) > 0.1  # distinct faces, distinct ages: the comparison can fail
    np.testing.assert_allclose([r["faceage"] for r in from_crops], expected, atol=1e-3)


# ---------------------------------------------------------------- CPUs: detection workers and model threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cpus_are_shared_between_detection_workers_and_the_model(restore_threads, monkeypatch):
    """Workers start from 1,000 photos, one per usable CPU (at most 8), and never without detection,
    unless told; the model gets torch's thread count less one per worker (at least 1) unless told."""
    from fahr.inference import align_stream
    from fahr.inference.align_stream import resolve_workers
    from fahr.pipeline.predict import model_threads

    monkeypatch.setattr(align_stream, "usable_cpus", lambda: 4)
    assert resolve_workers(None, 999) == 0 and resolve_workers(None, 1000) == 4 and resolve_workers(1, 10) == 1
    assert resolve_workers(None, 10**6, detect=False) == 0 and resolve_workers(3, 10, detect=False) == 3
    torch.set_num_threads(4)
    assert model_threads(None, 0) == 4 and torch.get_num_threads() == 4
    assert model_threads(None, 4) == 1 and torch.get_num_threads() == 1
    torch.set_num_threads(4)
    assert model_threads(None, 1) == 3 and torch.get_num_threads() == 3
    assert model_threads(5, 2) == 5 and torch.get_num_threads() == 5
    monkeypatch.setattr(align_stream, "usable_cpus", lambda: 64)
    assert resolve_workers(None, 10**6) == 8


def test_predict_leaves_torch_threads_as_it_found_them(restore_threads, export, photo_dir, tmp_path, caplog):
    """`fahr predict` with a detection worker runs the model on one thread fewer, and gives it back."""
    from fahr.pipeline.predict import predict

    torch.set_num_threads(2)
    cfg = compose_predict([f"model={export}", f"input={photo_dir}", f"output={tmp_path / 'o.csv'}", "device=cpu",
                           "workers=1"])
    with caplog.at_level("INFO", logger="fahr.predict"):
        predict(cfg)
    assert "runtime torch, 1 thread(s); 1 detection worker(s)" in caplog.text
    assert torch.get_num_threads() == 2


def test_predict_without_detection_keeps_every_core_for_the_model(restore_threads, monkeypatch, export, photo_dir,
                                                                 tmp_path, caplog):
    """`preprocessing.detect=false` on a large input: no workers (decoding a crop is a fraction of the
    model's time), the model on all of torch's threads; with detection the same input gets workers."""
    from fahr.inference import align_stream
    from fahr.pipeline.predict import detects_faces, predict

    monkeypatch.setattr(align_stream, "AUTO_WORKERS_FROM", 1)  # this small folder counts as large
    monkeypatch.setattr(align_stream, "usable_cpus", lambda: 2)
    torch.set_num_threads(2)
    args = [f"model={export}", f"input={photo_dir}", "device=cpu"]
    cfg = compose_predict([*args, f"output={tmp_path / 'o.csv'}", "preprocessing.detect=false"])
    assert not detects_faces(cfg) and detects_faces(compose_predict([*args, f"output={tmp_path / 'p.csv'}"]))
    with caplog.at_level("INFO", logger="fahr.predict"):
        predict(cfg)
    assert "runtime torch, 2 thread(s); 0 detection worker(s)" in caplog.text
    assert torch.get_num_threads() == 2


def test_detection_workers_import_no_model_code():
    """What a spawned worker imports (fahr.inference.align_stream) leaves out the model, timm and
    torchmetrics (and torch itself until a worker starts): the commands start their workers before
    their own heavy imports, and each worker starts in the time of torch + the detector."""
    code = ("import sys, fahr.inference.align_stream; "
            "print(sorted(m for m in ('torch', 'timm', 'torchmetrics', 'lightning', 'fahr.models', "
            "'fahr.inference.predict') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(("n", "side", "size"), [(1, 112, 64), (5, 112, 64), (3, 100, 224), (2, 112, 112)])
def test_resize_crops_is_torchvisions_resize(dtype, layout, n, side, size):
    """predict resizes crops without importing torchvision, bit for bit as torchvision's v2 resize
    (what the training loaders use) does."""
    from torchvision.transforms.v2 import functional as tvf

    from fahr.inference.predict import resize_crops

    g = torch.Generator().manual_seed(n * side)
    crops = torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8)
    if layout == "channels_last":  # as crops stacked from (N, S, S, 3) arrays arrive
        crops = crops.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    crops = crops.to(dtype)
    ours = resize_crops(crops, size)
    theirs = tvf.resize(crops, [size, size], antialias=True)
    assert ours.dtype == dtype and ours.shape == (n, 3, size, size)
    assert torch.equal(ours, theirs)


def test_predict_and_the_detection_workers_import_neither_timm_nor_torchvision(tmp_path):
    """The ONNX path's main process and the detection workers need neither (seconds of start-up)."""
    code = ("import sys, fahr.pipeline.predict, fahr.inference.predict, fahr.inference.align_stream, "
            "fahr.models.onnx_export, fahr.faces.align\n"
            "fahr.faces.align.FaceAligner()\n"
            "print(sorted(m for m in ('timm', 'torchvision', 'torch._dynamo', 'facenet_pytorch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_commands_give_back_torchs_thread_count_without_importing_torch_first(restore_threads):
    """predict/far change torch's threads for the model and restore them on the way out; the wrapper
    imports torch only through the command (the workers start first), and a process that had not
    imported torch gets torch's own default back."""
    from fahr.pipeline.predict import model_threads, torch_threads_restored

    @torch_threads_restored
    def command(threads):
        model_threads(threads, 0)
        return torch.get_num_threads()

    torch.set_num_threads(3)
    assert command(1) == 1 and torch.get_num_threads() == 3
    code = ("import sys\nfrom fahr.pipeline.predict import model_threads, torch_threads_restored\n"
            "seen = torch_threads_restored(lambda n: ('torch' in sys.modules, model_threads(n, 0)))(1)\n"
            "import torch\nprint(seen[0], seen[1], torch.get_num_threads())")
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == ["False", "1", "2"]  # torch not yet imported when the command began
