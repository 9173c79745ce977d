"""`fahr robustness`: graded perturbations of aligned crops and the change they cause in FaceAge.

Perturbations are checked exactly where they can be (the identity level, a grey image's greyscale,
pixel arithmetic, the libraries they wrap); the table's statistics on hand-made predictions; the
command end to end on crops and on real FG-NET photos; bad input as one line and exit status 2.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from fahr.analysis.perturbations import (
    EYESHADOW_COLOUR,
    FAMILIES,
    LENS_COLOUR,
    LIP_COLOUR,
    MASK_COLOUR,
    PERTURBATIONS,
    perturb,
)
from fahr.analysis.regions import REGIONS, region_boxes, region_labels
from fahr.analysis.robustness import perturbation_predictions, ranking, robustness_table
from fahr.faces.align import template
from tests.conftest import shared_data
from tests.test_predict import make_export, read_rows

CROPS = "preprocessing.detect=false"


def face_like(size: int = 112, seed: int = 0) -> np.ndarray:
    """A smooth random (S, S, 3) uint8 image (no flat areas, so every perturbation changes it)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(30, 226, (8, 8, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))
    return np.clip(img.astype(int) + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- the table


def test_the_table_covers_the_issue_families_each_with_identity_and_three_severities():
    assert FAMILIES == {
        "pose": ["rotation", "yaw", "off_centre"],
        "lighting": ["brightness", "contrast", "gamma", "colour_temperature", "side_shadow"],
        "device": ["jpeg", "downscale", "blur", "sensor_noise", "greyscale"],
        "coverings": ["face_mask", "sunglasses"],
        "makeup": ["skin_smoothing", "lip_colour", "eye_colour"],
    }
    for name, p in PERTURBATIONS.items():
        assert len(p.levels) == 4 and len(set(p.levels)) == 4, name


@pytest.mark.parametrize("size", [112, 64])
@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_level_zero_is_the_identity_and_every_severity_changes_the_crop(name, size):
    img = face_like(size)
    points = template(size)
    p = PERTURBATIONS[name]
    assert np.array_equal(perturb(img, name, p.levels[0], 3, points), img)
    for level in p.levels[1:]:
        out = perturb(img, name, level, 3, points)
        assert out.shape == img.shape and out.dtype == np.uint8
        assert not np.array_equal(out, img), (name, level)
        assert np.array_equal(out, perturb(img, name, level, 3, points)), "deterministic"
    assert np.array_equal(img, face_like(size)), "the input is never modified"


def test_greyscale_of_a_grey_image_is_itself():
    v = np.random.default_rng(1).integers(0, 256, (112, 112), dtype=np.uint8)
    grey = np.repeat(v[..., None], 3, axis=2)
    for level in PERTURBATIONS["greyscale"].levels:
        assert np.array_equal(perturb(grey, "greyscale", level, 0, template(112)), grey)
    full = perturb(face_like(), "greyscale", 1.0, 0, template(112))
    assert np.array_equal(full[..., 0], full[..., 1]) and np.array_equal(full[..., 1], full[..., 2])


def test_pixel_arithmetic_is_exact():
    pts = template(112)
    flat = np.full((112, 112, 3), 100, np.uint8)
    assert (perturb(flat, "brightness", 0.5, 0, pts) == 50).all()
    assert np.array_equal(perturb(flat, "colour_temperature", 0.2, 0, pts)[0, 0], [120, 100, 80])
    ramp = np.zeros((112, 112, 3), np.uint8)
    ramp[..., :] = np.arange(256)[::2][:112, None, None].astype(np.uint8)  # rows 0, 2, ..., 222
    out = perturb(ramp, "gamma", 2.0, 0, pts)
    assert np.array_equal(out, np.clip(np.rint(255 * (ramp / 255.0) ** 2), 0, 255).astype(np.uint8))
    # contrast keeps the mean luma and scales deviations: a two-tone image 50 / 150 -> 75 / 125
    two = np.full((112, 112, 3), 50, np.uint8)
    two[:, 56:] = 150
    out = perturb(two, "contrast", 0.5, 0, pts)
    assert (out[:, :56] == 75).all() and (out[:, 56:] == 125).all()
    # side shadow: the right half untouched, the left edge at 1 - depth * (c - 0.5) / c
    out = perturb(flat, "side_shadow", 0.6, 0, pts)
    assert np.array_equal(out[:, 56:], flat[:, 56:])
    assert (out[:, 0] == round(100 * (1 - 0.6 * 55.5 / 56))).all()


def test_geometric_perturbations():
    img, pts = face_like(), template(112)
    shifted = perturb(img, "off_centre", 0.1, 0, pts)  # 11 pixels right and down
    assert np.array_equal(shifted[:-11, :-11], img[11:, 11:])
    # a 90-degree rotation samples pixel centres: np.rot90, up to PIL's bilinear rounding (cos 90 deg is
    # 6e-17 in floating point, which moves some values across a half grey level)
    turned = perturb(img, "rotation", 90, 0, pts).astype(int)
    assert np.abs(turned - np.rot90(img, k=1)).max() == 1
    assert np.abs(turned - np.rot90(img, k=-1)).max() > 100
    # yaw only moves pixels horizontally: an image constant along each row is unchanged
    rows = np.repeat(face_like()[:, :1], 112, axis=1)
    assert np.array_equal(perturb(rows, "yaw", 0.3, 0, pts), rows)


def test_library_backed_perturbations_match_the_library():
    img, pts = face_like(), template(112)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=20)
    assert np.array_equal(perturb(img, "jpeg", 80, 0, pts), np.asarray(Image.open(buf).convert("RGB")))
    blurred = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius=2.0)))
    assert np.array_equal(perturb(img, "blur", 2, 0, pts), blurred)
    flat = np.full((112, 112, 3), 77, np.uint8)
    assert np.array_equal(perturb(flat, "downscale", 4, 0, pts), flat)


def test_sensor_noise_is_a_function_of_the_seed():
    img, pts = face_like(), template(112)
    a, b = perturb(img, "sensor_noise", 12, 5, pts), perturb(img, "sensor_noise", 12, 6, pts)
    assert np.array_equal(a, perturb(img, "sensor_noise", 12, 5, pts)) and not np.array_equal(a, b)
    noise = a.astype(int) - img.astype(int)
    inside = (img > 40) & (img < 215)  # no clipping there
    assert abs(noise[inside].std() - 12) < 0.5 and abs(noise[inside].mean()) < 0.5


def test_coverings_and_makeup_stay_in_their_regions():
    img, pts = face_like(), template(112)
    boxes = region_boxes(pts, 112)
    mask = perturb(img, "face_mask", 1.0, 0, pts)
    assert (mask[boxes["mouth"]] == MASK_COLOUR.astype(np.uint8)).all()
    assert np.array_equal(mask[boxes["eyes"] | boxes["forehead"]], img[boxes["eyes"] | boxes["forehead"]])
    glasses = perturb(img, "sunglasses", 1.0, 0, pts)
    for x, y in np.rint(pts[:2]).astype(int):
        assert np.array_equal(glasses[y, x], LENS_COLOUR.astype(np.uint8))
    assert np.array_equal(glasses[boxes["mouth"] | boxes["chin"]], img[boxes["mouth"] | boxes["chin"]])
    for name, region, colour in (("lip_colour", "mouth", LIP_COLOUR), ("eye_colour", "eyes", EYESHADOW_COLOUR)):
        out = perturb(img, name, 1.0, 0, pts)
        assert (out[boxes[region]] == colour.astype(np.uint8)).all()
        assert np.array_equal(out[~boxes[region]], img[~boxes[region]])
    smooth = perturb(img, "skin_smoothing", 1.0, 0, pts)
    keep = boxes["eyes"] | boxes["mouth"]
    assert np.array_equal(smooth[keep], img[keep]) and not np.array_equal(smooth[boxes["cheeks"]], img[boxes["cheeks"]])


def test_bad_crop_is_refused():
    with pytest.raises(ValueError, match="square"):
        perturb(np.zeros((10, 12, 3), np.uint8), "blur", 1, 0, template(112))
    with pytest.raises(ValueError, match="uint8"):
        perturb(np.zeros((10, 10, 3), np.float32), "blur", 1, 0, template(112))


# ---------------------------------------------------------------- statistics


def test_table_statistics_on_hand_made_predictions():
    results = {("none", 0): {"age": np.array([10.0, 20.0, 30.0]), "risk": np.array([0.0, 1.0, 2.0])},
               ("blur", 1): {"age": np.array([10.0, 27.0, 24.0]), "risk": np.array([0.5, 1.5, 2.5])},
               ("blur", 2): {"age": np.array([11.0, 21.0, 31.0]), "risk": np.array([0.0, 1.0, 2.0])}}
    ages = np.array([12.0, 20.0, np.nan])
    rows = robustness_table(results, ages, threshold=5.0)
    first = rows[0]
    assert first["perturbation"] == "blur" and first["level"] == 1 and first["value"] == 1.0 and first["n"] == 3
    assert first["faceage_change_mean"] == pytest.approx(1 / 3)
    assert first["faceage_change_sd"] == pytest.approx(np.std([0, 7, -6], ddof=1))
    assert first["faceage_abs_change_mean"] == pytest.approx(13 / 3)
    assert first["share_moved_gt_5y"] == pytest.approx(2 / 3)
    assert first["mae"] == pytest.approx((2 + 7) / 2) and first["mae_change"] == pytest.approx((2 + 7) / 2 - (2 + 0) / 2)
    assert first["risk_change_mean"] == pytest.approx(0.5) and first["risk_change_sd"] == pytest.approx(0.0)
    assert [r["perturbation"] for r in ranking(rows)] == ["blur"] and ranking(rows)[0]["level"] == 2
    no_ages = robustness_table(results, None)[0]
    assert "mae" not in no_ages


def test_a_photos_result_does_not_depend_on_the_batch(tmp_path):
    from fahr.models.face_model import load_face_model

    model, _ = load_face_model(make_export(tmp_path / "export"))
    a, b = face_like(112, 1), face_like(112, 2)
    names = ["sensor_noise", "face_mask"]
    both = perturbation_predictions(model, np.stack([a, b]), template(112), names, seed=0, batch_size=2)
    alone = perturbation_predictions(model, b[None], template(112), names, seed=1, batch_size=1)
    for key, out in alone.items():
        np.testing.assert_allclose(both[key]["age"][1:], out["age"], rtol=0, atol=1e-4)


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("export"), preprocessing={"detect": False, "image_size": 64})


@pytest.fixture(scope="module")
def crops_csv(tmp_path_factory) -> Path:
    """Six synthetic 112 px crops with ages, one with an unknown age, and a CSV naming them."""
    from fahr.data.synthetic import synthetic_face

    d = tmp_path_factory.mktemp("crops")
    lines = ["path,age"]
    for i in range(6):
        img, labels = synthetic_face(i, seed=3, size=112)
        Image.fromarray(img).save(d / f"face{i}.png")
        lines.append(f"face{i}.png,{'' if i == 5 else round(labels['age'], 1)}")
    (d / "faces.csv").write_text("\n".join(lines) + "\n")
    return d / "faces.csv"


def test_command_end_to_end_on_crops(export, crops_csv, tmp_path, run_fahr):
    out = tmp_path / "report"
    done = run_fahr("robustness", f"model={export}", f"input={crops_csv}", f"output={out}", CROPS, "device=cpu",
                    "perturbations=[blur,face_mask,greyscale]", "batch_size=4")
    assert done.status == 0, done
    rows = read_rows(out / "robustness.csv")
    assert [(r["perturbation"], r["level"]) for r in rows] == [(n, str(k)) for n in ("blur", "face_mask", "greyscale")
                                                              for k in (1, 2, 3)]
    assert all(r["n"] == "6" and r["mae"] != "" and r["risk_change_mean"] != "" for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["aligned"] == 6 and summary["baseline"]["photos_with_age"] == 5
    assert sorted(summary["most_disruptive"]) == ["blur", "face_mask", "greyscale"]
    assert {p.name for p in out.glob("*.png")} == {"robustness_device.png", "robustness_coverings.png"}
    assert (out / "robustness.md").read_text().startswith("# Robustness of")
    assert "face0" not in done.err + done.out, "no photo names in the logs"
    # the unperturbed FaceAge is `fahr predict`'s on the same crops
    pred = tmp_path / "pred.csv"
    assert run_fahr("predict", f"model={export}", f"input={crops_csv}", f"output={pred}", CROPS, "device=cpu").status == 0
    ages = [float(r["faceage"]) for r in read_rows(pred)]
    assert summary["baseline"]["faceage_mean"] == pytest.approx(np.mean(ages), abs=1e-3)


@pytest.mark.real_data
def test_command_on_real_fgnet_photos_with_detection(tmp_path, run_fahr):
    fgnet = shared_data("fgnet")
    with open(fgnet / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:4]
    table = tmp_path / "fgnet.csv"
    table.write_text("path,age\n" + "".join(f"{fgnet / r['file']},{r['age']}\n" for r in rows))
    export = make_export(tmp_path / "export")  # trained on fahr's crops: raw photos are detected + aligned
    out = tmp_path / "report"
    done = run_fahr("robustness", f"model={export}", f"input={table}", f"output={out}", "device=cpu",
                    "perturbations=[sunglasses]")
    assert done.status == 0, done
    summary = json.loads((out / "summary.json").read_text())
    assert summary["photos"] == 4 and summary["aligned"] + sum(v for k, v in summary["counts"].items() if k != "ok") == 4
    assert summary["aligned"] >= 3 and len(read_rows(out / "robustness.csv")) == 3


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("case, expected", [
    ("unknown_perturbation", "perturbations: unknown ['scratches']"),
    ("missing_model", "nope"),
    ("empty_folder", "no photos in"),
    ("bad_age", "row 3: age must be a number of years"),
    ("output_is_a_file", "exists and is not a directory"),
    ("output_is_the_input", "is also an input of this command"),
    ("zero_photos", "max_photos"),
    ("typo", "perturbation"),
    ("unreadable_photos", "none of the 2 photos"),
    ("backbone_only", "without task heads"),
])
def test_bad_input_is_one_line(case, expected, export, crops_csv, tmp_path, run_fahr):
    args = {"model": str(export), "input": str(crops_csv), "output": str(tmp_path / "out")}
    extra: list[str] = []
    if case == "unknown_perturbation":
        extra = ["perturbations=[blur,scratches]"]
    elif case == "missing_model":
        args["model"] = str(tmp_path / "nope")
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        args["input"] = str(tmp_path / "empty")
    elif case == "bad_age":
        bad = tmp_path / "bad.csv"
        bad.write_text(f"path,age\n{crops_csv.parent / 'face0.png'},30\n{crops_csv.parent / 'face1.png'},old\n")
        args["input"] = str(bad)
    elif case == "output_is_a_file":
        (tmp_path / "out").write_text("x")
    elif case == "output_is_the_input":
        args["output"] = str(export)
    elif case == "zero_photos":
        extra = ["max_photos=0"]
    elif case == "typo":
        extra = ["perturbation=[blur]"]
    elif case == "unreadable_photos":
        d = tmp_path / "broken"
        d.mkdir()
        (d / "a.jpg").write_bytes(b"")
        (d / "b.png").write_text("not an image")
        args["input"] = str(d)
    elif case == "backbone_only":
        from fahr.models.backbone import create_backbone
        from fahr.models.weights import model_card, save_backbone

        enc = create_backbone("vit_test", img_size=64)
        save_backbone(tmp_path / "bb", enc.state_dict(), model_card(enc, task="mae_pretrain",
                                                                     normalization={"mean": [0.5] * 3, "std": [0.25] * 3}))
        args["model"] = str(tmp_path / "bb")
    done = run_fahr("robustness", *(f"{k}={v}" for k, v in args.items()), CROPS, "device=cpu", *extra)
    assert done.status == 2, done
    assert expected in (done.err if case == "typo" else done.error_line), done.err  # Hydra reports a typo itself
    assert "Traceback" not in done.err
    if case == "output_is_a_file":
        assert (tmp_path / "out").read_text() == "x"


def test_region_labels_put_the_landmarks_in_their_regions():
    labels = region_labels(112)
    pts = np.rint(template(112)).astype(int)
    names = ["eyes", "eyes", "nose", "mouth", "mouth"]
    for (x, y), name in zip(pts, names):
        assert REGIONS[labels[y, x]] == name
    assert torch.tensor(labels).unique().tolist() == [-1, 0, 1, 2, 3, 4, 5]


def test_a_risk_only_model_gets_risk_changes(crops_csv, tmp_path, run_fahr):
    from fahr.models.backbone import create_backbone
    from fahr.models.face_model import FaceModel, save_face_model
    from fahr.models.heads import RiskHead

    torch.manual_seed(0)
    bb = create_backbone("vit_test", img_size=64, patch_size=16)
    export = save_face_model(tmp_path / "risk", FaceModel(bb, {"risk": RiskHead(bb.num_features)}, [0.5] * 3, [0.25] * 3),
                             {"task": "test", "preprocessing": {"detect": False, "image_size": 64, "crops": "external"}})
    out = tmp_path / "report"
    done = run_fahr("robustness", f"model={export}", f"input={crops_csv}", f"output={out}", CROPS, "device=cpu",
                    "perturbations=[gamma,sunglasses]")
    assert done.status == 0, done
    rows = read_rows(out / "robustness.csv")
    assert list(rows[0]) == ["perturbation", "family", "level", "value", "unit", "n", "risk_change_mean", "risk_change_sd"]
    ranked = read_rows(out / "ranking.csv")
    assert [r["level"] for r in ranked] == ["3", "3"]
    assert abs(float(ranked[0]["risk_change_mean"])) >= abs(float(ranked[1]["risk_change_mean"]))
    assert {p.name for p in out.glob("*.png")} == {"robustness_lighting.png", "robustness_coverings.png"}
