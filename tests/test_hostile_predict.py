"""Hostile inputs for `fahr predict` and `fahr far`, through the shipped command line.

Every case is generated here (no stored binaries) and asserts its exact outcome: the exit status and
the one error line that names the culprit, or the status each photo gets, or the correct number.
Nothing may end in a traceback ("internal error"), a hang, or a silently wrong result.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.conftest import shared_data
from tests.test_predict import make_export, read_rows

# ---------------------------------------------------------------- fixtures


#: the crop model's inputs are crops: said on every run, as its card (crops made outside fahr) demands
CROPS = "preprocessing.detect=false"


@pytest.fixture(scope="module")
def crop_export(tmp_path_factory) -> Path:
    """A FaceAge + risk model whose card says the photos are aligned crops (no detection): fast."""
    return make_export(tmp_path_factory.mktemp("crop_export"), preprocessing={"detect": False, "image_size": 64})


@pytest.fixture(scope="module")
def detect_export(tmp_path_factory) -> Path:
    """The same model with the default preprocessing (MTCNN detection + 5-point alignment)."""
    return make_export(tmp_path_factory.mktemp("detect_export"))


def _face(seed: int, size: int = 96) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.fixture
def crops(tmp_path) -> Path:
    """Three good 96x96 'aligned crops' (noise: the crop model does not detect)."""
    d = tmp_path / "crops"
    d.mkdir()
    for i in range(3):
        Image.fromarray(_face(i)).save(d / f"face{i}.png")
    return d


def tampered(export: Path, dst: Path, edit_card=None, edit_weights=None) -> Path:
    """A copy of ``export`` with its card and/or weights changed."""
    shutil.copytree(export, dst)
    if edit_card is not None:
        card = json.loads((dst / "model_card.json").read_text())
        out = edit_card(card)
        text = out if isinstance(out, str) else json.dumps(card if out is None else out)
        (dst / "model_card.json").write_text(text)
    if edit_weights is not None:
        edit_weights(dst / "model.safetensors")
    return dst


def set_key(path: str, value):
    def edit(card):
        node = card
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return edit


def drop_key(path: str):
    def edit(card):
        node = card
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        del node[last]
    return edit


def edit_tensors(fn):
    def edit(path: Path):
        state = load_file(str(path))
        fn(state)
        save_file(state, str(path))
    return edit


class _Evil:
    """Unpickling this creates a marker file: proof that a loader executed data."""

    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------- the model (predict)

MODEL_CASES = {
    "card_not_json": (dict(edit_card=lambda c: "{not json"), r"model card .*model_card\.json: not valid JSON"),
    "card_is_a_list": (dict(edit_card=lambda c: "[1, 2]"), r"a model card must be a JSON object, got list"),
    "card_nan_constant": (dict(edit_card=lambda c: json.dumps(c).replace('"img_size": 64', '"img_size": NaN')),
                          r"NaN is not JSON"),
    "card_duplicate_key": (dict(edit_card=lambda c: '{"format": "fahr-model/1", "format": "x"}'),
                           r"key 'format' appears twice"),
    "card_wrong_format": (dict(edit_card=set_key("format", "pytorch")), r"unsupported model card format 'pytorch'"),
    "card_without_heads": (dict(edit_card=drop_key("heads")), r"heads must be an object"),
    "card_unknown_head": (dict(edit_card=set_key("heads", {"gender": {}})), r"heads must be 'age' and/or 'risk'"),
    "card_head_bad_key": (dict(edit_card=set_key("heads.age.depth", 3)), r"heads\.age is not a valid head config"),
    "card_head_huge": (dict(edit_card=set_key("heads.risk.hidden", [10**9])),
                       r"heads\.risk\.hidden must be a list of at most 16 layer widths"),
    "card_age_bins_huge": (dict(edit_card=set_key("heads.age.bin_width", 1e-9)), r"at most 10,000 bins"),
    "card_std_zero": (dict(edit_card=set_key("normalization.std", [0.25, 0.0, 0.25])),
                      r"normalization\.std must be positive"),
    "card_std_short": (dict(edit_card=set_key("normalization.std", [0.25])),
                       r"normalization\.std must be a list of 3 finite numbers"),
    "card_mean_text": (dict(edit_card=set_key("normalization.mean", ["a", "b", "c"])),
                       r"normalization\.mean must be a list of 3 finite numbers"),
    "card_img_size_huge": (dict(edit_card=set_key("backbone.img_size", 100000)),
                           r"backbone\.img_size must be an integer in \[16, 1024\]"),
    "card_img_size_not_multiple": (dict(edit_card=set_key("backbone.img_size", 70)), r"backbone\.img_size"),
    "card_unknown_arch": (dict(edit_card=set_key("backbone.arch", "resnet50")), r"backbone\.arch must be one of"),
    "card_prep_image_size_huge": (dict(edit_card=set_key("preprocessing.image_size", 100000)),
                                  r"preprocessing\.image_size must be an integer number of pixels in \[16, 1024\]"),
    "card_prep_multi_face": (dict(edit_card=set_key("preprocessing.multi_face", "all")),
                             r"preprocessing\.multi_face must be reject, largest or central"),
    "card_prep_detect_text": (dict(edit_card=set_key("preprocessing.detect", "no")),
                              r"preprocessing\.detect must be true or false"),
    "card_prep_crops_unknown_word": (dict(edit_card=set_key("preprocessing.crops", "mine")),
                                     r"preprocessing\.crops must be fahr, external or unknown"),
    "card_prep_source_multiline": (dict(edit_card=set_key("preprocessing.source", "a\nb")),
                                   r"preprocessing\.source must be a line of at most 300 printable characters"),
    "card_calibration_decision_text": (dict(edit_card=set_key("age_calibration_decision", "kept")),
                                       r"age_calibration_decision must be null or an object with kept"),
    "card_calibration_slope_zero": (dict(edit_card=set_key("age_calibration", {"slope": 0, "intercept": 1})),
                                    r"age_calibration must be null or"),
    "card_flip_text": (dict(edit_card=set_key("flip_average", "yes")), r"flip_average must be true or false"),
    "card_is_backbone": (dict(edit_card=lambda c: {**c["backbone"], "format": "fahr-backbone/1"}),
                         r"holds a backbone \(fahr-backbone/1\) without task heads"),
    "weights_truncated": (dict(edit_weights=lambda p: p.write_bytes(p.read_bytes()[:1000])),
                          r"model\.safetensors: not a valid safetensors file"),
    "weights_garbage": (dict(edit_weights=lambda p: p.write_bytes(b"\x00" * 64)),
                        r"model\.safetensors: not a valid safetensors file"),
    "weights_nan": (dict(edit_weights=edit_tensors(lambda s: s["heads.age.net.0.weight"].fill_(float("nan")))),
                    r"tensor 'heads\.age\.net\.0\.weight' holds NaN or infinite values"),
    "weights_inf": (dict(edit_weights=edit_tensors(lambda s: s["backbone.norm.weight"].fill_(float("inf")))),
                    r"tensor 'backbone\.norm\.weight' holds NaN or infinite values"),
    "weights_missing_tensor": (dict(edit_weights=edit_tensors(lambda s: s.pop("heads.risk.net.0.bias"))),
                               r"do not fit the architecture in model_card\.json: missing 1 \(heads\.risk\.net\.0\.bias\)"),
    "weights_extra_tensor": (dict(edit_weights=edit_tensors(lambda s: s.update(extra=torch.zeros(2)))),
                             r"unexpected 1 \(extra\)"),
    "weights_wrong_shape": (dict(edit_card=set_key("backbone.patch_size", 8)), r"wrong shape"),
    "card_arch_contradicts_size": (dict(edit_card=set_key("backbone.arch", "vit_tiny")),
                                   r"backbone\.embed_dim must be 192 for arch vit_tiny"),
    "weights_missing": (dict(edit_weights=lambda p: p.unlink()), r"model\.safetensors: no such file"),
    "weights_directory": (dict(edit_weights=lambda p: (p.unlink(), p.mkdir())), r"model\.safetensors: is a directory"),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_tampered_model_is_refused_in_one_line(case, crop_export, crops, tmp_path, run_fahr):
    edits, message = MODEL_CASES[case]
    model = tampered(crop_export, tmp_path / "model", **edits)
    out = tmp_path / "out.csv"
    r = run_fahr("predict", f"model={model}", f"input={crops}", f"output={out}", "device=cpu", CROPS)
    assert r.status == 2, r
    assert r.error_line.startswith("fahr predict: error: "), r
    assert __import__("re").search(message, r.error_line), r.error_line
    assert not out.exists()


def test_pickled_weights_are_never_unpickled(crop_export, crops, tmp_path, run_fahr):
    marker = tmp_path / "pwned"
    _Evil.marker = str(marker)
    model = tampered(crop_export, tmp_path / "model",
                     edit_weights=lambda p: torch.save({"x": _Evil()}, p))  # a pickle named .safetensors
    r = run_fahr("predict", f"model={model}", f"input={crops}", f"output={tmp_path / 'o.csv'}", "device=cpu", CROPS)
    assert r.status == 2 and "not a valid safetensors file" in r.error_line, r
    assert not marker.exists()


def test_model_paths_that_are_not_an_export(crop_export, crops, tmp_path, run_fahr):
    out = f"output={tmp_path / 'o.csv'}"
    r = run_fahr("predict", f"model={tmp_path / 'nope'}", f"input={crops}", out)
    assert r.status == 2 and r.error_line.endswith("nope: not a directory; give a `fahr export` directory "
                                                   "(model_card.json + model.safetensors)"), r
    (tmp_path / "empty").mkdir()
    r = run_fahr("predict", f"model={tmp_path / 'empty'}", f"input={crops}", out)
    assert r.status == 2 and "no model_card.json in" in r.error_line, r
    fifo_model = tampered(crop_export, tmp_path / "fifo_model", edit_card=lambda c: "{}")
    (fifo_model / "model_card.json").unlink()
    os.mkfifo(fifo_model / "model_card.json")
    r = run_fahr("predict", f"model={fifo_model}", f"input={crops}", out)  # must not wait for a writer
    assert r.status == 2 and "is a FIFO (named pipe), not a regular file" in r.error_line, r


def test_model_without_a_faceage_head_cannot_give_far(tmp_path, run_fahr, crops):
    from fahr.models.backbone import create_backbone
    from fahr.models.face_model import FaceModel, save_face_model
    from fahr.models.heads import RiskHead

    bb = create_backbone("vit_test", img_size=64, patch_size=16)
    risk_only = save_face_model(tmp_path / "risk", FaceModel(bb, {"risk": RiskHead(bb.num_features)}, [0.5] * 3,
                                                             [0.25] * 3), {"preprocessing": {"detect": False}})
    table = tmp_path / "people.csv"
    table.write_text(f"person,path,age_at_photo\na,{crops}/face0.png,30\na,{crops}/face1.png,32\n")
    r = run_fahr("far", f"model={risk_only}", f"input={table}", f"output={tmp_path / 'far.csv'}", "device=cpu", CROPS)
    assert r.status == 2 and "has no FaceAge head" in r.error_line, r


# ---------------------------------------------------------------- the input list (predict)


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


INPUT_CASES = {
    "missing": (lambda d: d / "nope.csv", r"input .*nope\.csv: no such file or directory"),
    "empty_folder": (lambda d: (d / "empty").mkdir() or d / "empty", r"no photos in .*empty"),
    "csv_without_path_column": (lambda d: _write(d / "l.csv", "file\nx.png\n"),
                                r"input CSV .*l\.csv: missing required column\(s\) \['path'\] \(the header has 1"),
    "csv_header_only": (lambda d: _write(d / "l.csv", "path\n"), r"no photos in .*l\.csv"),
    "csv_empty": (lambda d: _write(d / "l.csv", ""), r"l\.csv: empty, or no header row"),
    "csv_not_utf8": (lambda d: _write(d / "l.csv", "path\ncaf\xe9.png\n".encode("latin-1")),
                     r"l\.csv: not UTF-8 \(invalid byte in line 2, at byte 8\)"),
    "csv_binary": (lambda d: _write(d / "l.csv", b"PK\x03\x04\x00\x00zipdata"), r"l\.csv: holds NUL bytes"),
    "csv_semicolons": (lambda d: _write(d / "l.csv", "path;age\nx.png;3\n"),
                       r"missing required column\(s\) \['path'\].*looks ';'-separated"),
    "csv_duplicate_columns": (lambda d: _write(d / "l.csv", "path,path\nx,y\n"),
                              r"columns 1 and 2 of the header have the same name"),
    "csv_unnamed_column": (lambda d: _write(d / "l.csv", "path,,age\nx,1,2\n"), r"column 2 of the header \(line 1\) has no name"),
    "csv_too_many_cells": (lambda d: _write(d / "l.csv", "path\nx.png,surprise\n"),
                           r"line 2 has 2 cells, the header 1"),
    "csv_huge_field": (lambda d: _write(d / "l.csv", "path\n\"" + "x" * (1 << 21) + "\"\n"),
                       r"line \d+ is not valid CSV \(a field is too long\)"),
    "fifo": (lambda d: (os.mkfifo(d / "l.csv"), d / "l.csv")[1], r"is a FIFO \(named pipe\), not a regular file"),
    "device": (lambda d: Path("/dev/zero"), r"/dev/zero: is a character device, not a regular file"),
}


@pytest.mark.parametrize("case", sorted(INPUT_CASES))
def test_bad_input_list_is_one_line(case, crop_export, tmp_path, run_fahr):
    make, message = INPUT_CASES[case]
    inp = make(tmp_path)
    r = run_fahr("predict", f"model={crop_export}", f"input={inp}", f"output={tmp_path / 'o.csv'}", "device=cpu", CROPS)
    assert r.status == 2, r
    assert __import__("re").search(message, r.error_line), r.error_line


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb's signature)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1), 7).save(buf, format="PNG")
    data = buf.getvalue()
    chunk = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


def _jpeg(array: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def test_every_bad_row_gets_a_status_and_the_run_finishes(crop_export, tmp_path, run_fahr, monkeypatch):
    """One CSV holding every kind of bad row: each gets its status, no hang (FIFO, /dev/zero), no
    endless read, and the good rows are predicted."""
    import fahr.inference.photos as photos

    monkeypatch.setattr(photos, "MAX_PHOTO_BYTES", 200_000)
    d = tmp_path / "rows"
    d.mkdir()
    Image.fromarray(_face(0)).save(d / "good.png")
    (d / "folder.png").mkdir()
    os.mkfifo(d / "fifo.png")
    (d / "zero.png").symlink_to("/dev/zero")
    _write(d / "empty.jpg", b"")
    _write(d / "text.jpg", "not an image")
    _write(d / "truncated.jpg", _jpeg(_face(1))[:400])
    _write(d / "bomb.png", _png_claiming(50000, 50000))
    _write(d / "big.png", b"\x89PNG" + os.urandom(300_000))  # over the (patched) byte cap: never read
    Image.new("RGB", (1, 1)).save(d / "one_pixel.png")
    Image.fromarray(_face(2, 300)[:60]).save(d / "strip.png")  # 300x60: not an aligned crop
    rows = ["good.png", "", "folder.png", "fifo.png", "zero.png", "missing.png", "empty.jpg", "text.jpg",
            "truncated.jpg", "bomb.png", "big.png", "one_pixel.png", "strip.png", "good.png"]
    _write(d / "list.csv", "path,note\n" + "\n".join(f'"{r}",row {i}' for i, r in enumerate(rows)) + "\n")
    out = tmp_path / "out.csv"
    r = run_fahr("predict", f"model={crop_export}", f"input={d / 'list.csv'}", f"output={out}", "device=cpu", CROPS,
                 "batch_size=5")
    assert r.status == 0, r
    got = [(row["path"], row["status"]) for row in read_rows(out)]
    expected = ["ok"] + ["unreadable"] * 10 + ["no_face", "no_face", "ok"]
    assert got == list(zip(rows, expected))
    first, last = read_rows(out)[0], read_rows(out)[-1]
    assert first["faceage"] == last["faceage"] != ""


def test_image_formats_decode_to_the_same_prediction(crop_export, tmp_path, run_fahr):
    """The same crop stored as 8-bit PNG, float TIFF in [0, 1] (was decoded as black), 16-bit PNG, RGBA
    PNG (opaque) and a one-frame GIF gives the same FaceAge (GIF/JPEG/CMYK: close, lossy)."""
    grey = np.random.default_rng(5).integers(0, 256, (96, 96), dtype=np.uint8)
    d = tmp_path / "formats"
    d.mkdir()
    Image.fromarray(grey).convert("RGB").save(d / "a_png8.png")
    Image.fromarray(grey.astype(np.float32) / 255.0, mode="F").save(d / "b_float.tiff")
    Image.fromarray(grey.astype(np.uint16) * 257).save(d / "c_png16.png")
    Image.fromarray(np.dstack([grey] * 3 + [np.full_like(grey, 255)]), mode="RGBA").save(d / "d_rgba.png")
    Image.fromarray(grey).save(d / "e_gif.gif")
    Image.fromarray(grey).convert("CMYK").save(d / "f_cmyk.jpg", quality=100)
    out = tmp_path / "o.csv"
    r = run_fahr("predict", f"model={crop_export}", f"input={d}", f"output={out}", "device=cpu", CROPS)
    assert r.status == 0, r
    rows = {Path(row["path"]).name: row for row in read_rows(out)}
    assert all(row["status"] == "ok" for row in rows.values())
    ref = float(rows["a_png8.png"]["faceage"])
    for name in ("b_float.tiff", "c_png16.png", "d_rgba.png", "e_gif.gif"):
        assert float(rows[name]["faceage"]) == pytest.approx(ref, abs=1e-4), name
    assert float(rows["f_cmyk.jpg"]["faceage"]) == pytest.approx(ref, abs=0.5)


def test_file_names_that_are_not_utf8_or_look_like_formulas(crop_export, tmp_path, run_fahr):
    """A non-UTF-8 file name aborted the whole run after all the work; a name starting with '=' went
    into the CSV as a spreadsheet formula."""
    d = tmp_path / "names"
    d.mkdir()
    face = _face(3)
    Image.fromarray(face).save(os.fsencode(d) + b"/caf\xe9.png")
    Image.fromarray(face).save(d / "=HYPERLINK(1).png")
    Image.fromarray(face).save(d / "quote\",comma.png")
    Image.fromarray(face).save(d / "new\nline.png")
    out = tmp_path / "o.csv"
    r = run_fahr("predict", f"model={crop_export}", f"input={d}", f"output={out}", "device=cpu", CROPS)
    assert r.status == 0, r
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    names = sorted(Path(row["path"].lstrip("'")).name for row in rows)
    assert names == sorted(["=HYPERLINK(1).png", "caf\\xe9.png", "new\nline.png", "quote\",comma.png"])
    formula = [row["path"] for row in rows if "HYPERLINK" in row["path"]]
    assert formula == [f"{d}/=HYPERLINK(1).png"]  # starts with the folder: not a formula
    # a CSV list whose path cell starts with '=' is written back neutralised
    _write(d / "list.csv", "path\n=HYPERLINK(1).png\n")
    r = run_fahr("predict", f"model={crop_export}", f"input={d / 'list.csv'}", f"output={out}", "device=cpu", CROPS)
    assert r.status == 0 and read_rows(out)[0]["path"] == "'=HYPERLINK(1).png", r
    assert len({row["faceage"] for row in rows}) == 1  # same pixels, same FaceAge


def test_a_single_photo_is_an_input_too(crop_export, crops, tmp_path, run_fahr):
    out = tmp_path / "o.csv"
    r = run_fahr("predict", f"model={crop_export}", f"input={crops / 'face0.png'}", f"output={out}", "device=cpu", CROPS)
    assert r.status == 0, r
    assert [(Path(x["path"]).name, x["status"]) for x in read_rows(out)] == [("face0.png", "ok")]


# ---------------------------------------------------------------- options and outputs (predict)

OPTION_CASES = {
    "batch_size_zero": ("batch_size=0", r"batch_size must be in \[1, 4096\], got 0"),
    "batch_size_huge": ("batch_size=100000", r"batch_size must be in \[1, 4096\], got 100000"),
    "batch_size_text": ("batch_size=many", r"batch_size"),
    "device_tpu": ("device=tpu", r"device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    "device_cuda_without_gpu": ("device=cuda", r"device=cuda but no CUDA GPU is visible"),
    "image_size_huge": ("preprocessing.image_size=100000",
                        r"preprocessing\.image_size must be an integer number of pixels in \[16, 1024\]"),
    "image_size_zero": ("preprocessing.image_size=0", r"preprocessing\.image_size must be"),
    "margin_negative": ("preprocessing.margin=-5", r"preprocessing\.margin must be a number in \[0, 2\]"),
    "multi_face_unknown": ("preprocessing.multi_face=everyone", r"preprocessing\.multi_face must be reject"),
    "min_confidence_above_one": ("preprocessing.min_confidence=1.5", r"preprocessing\.min_confidence must be a"),
    "workers_negative": ("workers=-1", r"workers must be in \[0, 64\], got -1"),
    "threads_zero": ("threads=0", r"threads must be in \[1, 256\], got 0"),
    "unknown_key": ("batchsize=4", r"batchsize"),
    "unknown_appended_key": ("+preprocessing.marign=0.2", r"marign"),
}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_bad_option_is_refused_before_work(case, crop_export, crops, tmp_path, run_fahr):
    if case == "device_cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    option, message = OPTION_CASES[case]
    out = tmp_path / "o.csv"
    r = run_fahr("predict", f"model={crop_export}", f"input={crops}", f"output={out}", option, CROPS)
    assert r.status == 2, r
    assert __import__("re").search(message, r.err), r.err
    assert "internal error" not in r.err and "Traceback" not in r.err
    assert not out.exists()


def test_missing_required_options_are_named(run_fahr, tmp_path):
    r = run_fahr("predict", f"input={tmp_path}", f"output={tmp_path / 'o.csv'}")
    assert r.status == 2 and r.error_line == "fahr predict: error: model is required: add model=... to the command line"


def test_outputs_are_checked_before_any_work(crop_export, crops, tmp_path, run_fahr):
    listing = _write(tmp_path / "list.csv", f"path\n{crops / 'face0.png'}\n")
    before = listing.read_bytes()
    cases = {
        str(tmp_path): r"output=.* is a directory; give a file path",
        str(listing): r"output=.*list\.csv is also an input of this command; refusing to overwrite it",
        str(crop_export / "model_card.json"): r"is also an input of this command",
        str(listing / "sub.csv"): r"exists and is not a directory",
        "/proc/fahr/out.csv": r"cannot (create folder|write in)",
        " ": r"output: empty path",
    }
    for output, message in cases.items():
        r = run_fahr("predict", f"model={crop_export}", f"input={listing}", f"output={output}", "device=cpu", CROPS)
        assert r.status == 2, (output, r)
        assert __import__("re").search(message, r.error_line), (output, r.error_line)
    assert listing.read_bytes() == before
    nested = tmp_path / "new" / "dir" / "o.csv"  # a missing folder is created
    r = run_fahr("predict", f"model={crop_export}", f"input={listing}", f"output={nested}", "device=cpu", CROPS)
    assert r.status == 0 and len(read_rows(nested)) == 1, r


# ---------------------------------------------------------------- determinism (predict, real photos)


@pytest.mark.real_data
def test_same_photos_in_batches_of_1_7_32_shuffled_give_the_same_rows(detect_export, tmp_path, run_fahr):
    """With detection: the same photos, listed in four shuffled orders and predicted in batches of 1,
    7 and 32 in this process (the model on 1, 2 and the default threads) and of 5 in two worker
    processes, get the same status and FaceAge (to the CSV's 1e-4 years) row for row."""
    fgnet = sorted(shared_data("fgnet/images").iterdir())[:10]
    utk = sorted(shared_data("utkface/images").iterdir())[:6]
    faces = [np.asarray(Image.open(p).convert("RGB")) for p in utk[:2]]
    two = np.full((240, 560, 3), 90, dtype=np.uint8)
    two[20:220, 0:200] = faces[0]
    two[40:200, 300:460] = np.asarray(Image.fromarray(faces[1]).resize((160, 160)))
    Image.fromarray(two).save(tmp_path / "two_faces.png")
    big = tmp_path / "big.png"
    Image.fromarray(np.asarray(Image.open(utk[2]).convert("RGB").resize((900, 900)))).save(big)
    photos = [*map(str, fgnet + utk), str(tmp_path / "two_faces.png"), str(big)]
    results = {}
    for size, seed, workers, threads in ((1, 0, 0, ["threads=1"]), (7, 1, 0, ["threads=2"]), (32, 2, 0, []),
                                         (5, 3, 2, [])):
        order = photos[:]
        random.Random(seed).shuffle(order)
        listing = _write(tmp_path / f"list{size}.csv", "path\n" + "\n".join(order) + "\n")
        out = tmp_path / f"out{size}.csv"
        r = run_fahr("predict", f"model={detect_export}", f"input={listing}", f"output={out}", "device=cpu",
                     f"batch_size={size}", f"workers={workers}", *threads)
        assert r.status == 0, r
        results[size] = {row["path"]: row for row in read_rows(out)}
    ref = results[1]
    assert ref[str(tmp_path / "two_faces.png")]["status"] == "multiple_faces"
    assert sum(row["status"] == "ok" for row in ref.values()) >= 14
    for size in (7, 32, 5):  # 5: decoded and aligned in 2 worker processes
        for path, row in ref.items():
            other = results[size][path]
            assert other["status"] == row["status"], (size, path)
            if row["status"] == "ok":
                assert float(other["faceage"]) == pytest.approx(float(row["faceage"]), abs=1.5e-4), (size, path)


# ---------------------------------------------------------------- far


@pytest.fixture
def far_photos(crops) -> dict[str, str]:
    return {f"f{i}": str(crops / f"face{i}.png") for i in range(3)}


def _far_csv(path: Path, rows: list[dict[str, str]], columns=("person", "path", "date", "age_at_photo")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def _run_far(run_fahr, export, table, tmp_path, *extra):
    out = tmp_path / "far.csv"
    r = run_fahr("far", f"model={export}", f"input={table}", f"output={out}", "device=cpu", CROPS, *extra)
    return r, ({row["person"]: row for row in read_rows(out)} if out.exists() else None)


def test_far_rows_with_bad_times_or_persons_never_make_a_wrong_rate(crop_export, far_photos, tmp_path, run_fahr):
    f0, f1, f2 = far_photos.values()
    rows = [
        {"person": "", "path": f0, "age_at_photo": "30"},  # empty ids were merged into one person
        {"person": " ", "path": f1, "age_at_photo": "70"},
        {"person": "neg", "path": f0, "age_at_photo": "-5"}, {"person": "neg", "path": f1, "age_at_photo": "30"},
        {"person": "huge", "path": f0, "age_at_photo": "1e300"}, {"person": "huge", "path": f1, "age_at_photo": "30"},
        {"person": "nan", "path": f0, "age_at_photo": "nan"}, {"person": "nan", "path": f1, "age_at_photo": "inf"},
        {"person": "text", "path": f0, "age_at_photo": "thirty"}, {"person": "text", "path": f1, "age_at_photo": "31"},
        {"person": "feb30", "path": f0, "date": "2019-02-30"}, {"person": "feb30", "path": f1, "date": "2020-01-01"},
        {"person": "old", "path": f0, "date": "1850-01-01"}, {"person": "old", "path": f1, "date": "2020-01-01"},
        {"person": "future", "path": f0, "date": "2999-01-01"}, {"person": "future", "path": f1, "date": "2020-01-01"},
        {"person": "us_date", "path": f0, "date": "12/31/2019"}, {"person": "us_date", "path": f1, "date": "2020-01-01"},
        # a date on one photo and only an age on another: days since year 1 against 365.25 x age
        {"person": "mixed", "path": f0, "date": "2019-01-01"}, {"person": "mixed", "path": f1, "age_at_photo": "40"},
        {"person": "good", "path": f0, "date": "2018-01-01"}, {"person": "good", "path": f1, "date": "2020-01-01"},
        {"person": "=HYPERLINK(1)", "path": f2, "date": "2018-01-01"},
        {"person": "=HYPERLINK(1)", "path": f0, "date": "2019-01-01"},
        {"person": "nopath", "path": "", "date": "2018-01-01"}, {"person": "nopath", "path": f0, "date": "2019-01-01"},
    ]
    r, table = _run_far(run_fahr, crop_export, _far_csv(tmp_path / "people.csv", rows), tmp_path)
    assert r.status == 0, r
    assert "" not in table and " " not in table and len(table) == 12
    expect = {"neg": "missing_dates", "huge": "missing_dates", "nan": "missing_dates", "text": "missing_dates",
              "feb30": "missing_dates", "old": "missing_dates", "future": "missing_dates", "us_date": "missing_dates",
              "mixed": "mixed_time_kinds", "good": "ok", "'=HYPERLINK(1)": "ok", "nopath": "one_photo"}
    assert {p: row["status"] for p, row in table.items()} == expect
    assert table["good"]["interval_days"] == "730.0000" and table["mixed"]["far"] == ""
    log = r.out + r.err
    assert "2 empty person" in log and "5 age_at_photo not a number in [0, 120]" in log, log
    for row in table.values():  # no rate from an impossible interval
        assert row["far"] == "" or abs(float(row["far"])) < 1e4


FAR_INPUT_CASES = {
    "no_time_column": ("person,path\na,x.png\n", r"needs a `date` \(ISO, e\.g\. 2019-05-31\) or `age_at_photo`"),
    "no_person_column": ("path,date\nx.png,2019-01-01\n", r"missing required column\(s\) \['person'\]"),
    "header_only": ("person,path,date\n", r"has no rows"),
    "not_utf8": ("person,path,date\nJos\xe9,x.png,2019-01-01\n".encode("latin-1"), r"not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(FAR_INPUT_CASES))
def test_far_bad_table_is_one_line(case, crop_export, tmp_path, run_fahr):
    text, message = FAR_INPUT_CASES[case]
    table = _write(tmp_path / "people.csv", text)
    r, _ = _run_far(run_fahr, crop_export, table, tmp_path)
    assert r.status == 2 and __import__("re").search(message, r.error_line), r


def test_far_options_and_outputs(crop_export, far_photos, tmp_path, run_fahr):
    f0, f1, _ = far_photos.values()
    table = _far_csv(tmp_path / "people.csv", [{"person": "a", "path": f0, "date": "2018-01-01"},
                                               {"person": "a", "path": f1, "date": "2019-01-01"}])
    r, _ = _run_far(run_fahr, crop_export, table, tmp_path, "method=median")
    assert r.status == 2 and "method must be one of ('pair', 'slope'), got 'median'" in r.error_line
    r, _ = _run_far(run_fahr, crop_export, table, tmp_path, f"photos_output={tmp_path / 'far.csv'}")
    assert r.status == 2 and "photos_output=" in r.error_line and "also an input" in r.error_line, r
    r, _ = _run_far(run_fahr, crop_export, table, tmp_path, f"photos_output={table}")
    assert r.status == 2 and "also an input" in r.error_line, r
    r = run_fahr("far", f"model={crop_export}", f"input={table}", f"output={table}")
    assert r.status == 2 and "refusing to overwrite it" in r.error_line
    r = run_fahr("far", f"model={crop_export}", f"input={tmp_path}", f"output={tmp_path / 'x.csv'}")
    assert r.status == 2 and "is a folder; give a CSV" in r.error_line


def test_far_fifo_input_does_not_hang(crop_export, tmp_path, run_fahr):
    os.mkfifo(tmp_path / "people.csv")  # opening it for reading used to wait for a writer forever
    r, _ = _run_far(run_fahr, crop_export, tmp_path / "people.csv", tmp_path)
    assert r.status == 2 and "FIFO" in r.error_line, r


def test_raw_photos_for_a_model_of_external_crops_are_refused(crop_export, crops, tmp_path, run_fahr):
    """The card says the training crops were made outside fahr: without the statement that the inputs
    are such crops, or with detection asked for, predict and far stop before any work."""
    out = tmp_path / "o.csv"
    r = run_fahr("predict", f"model={crop_export}", f"input={crops}", f"output={out}", "device=cpu")
    assert r.status == 2 and "say preprocessing.detect=false" in r.error_line, r
    r = run_fahr("predict", f"model={crop_export}", f"input={crops}", f"output={out}", "device=cpu",
                 "preprocessing.detect=true")
    assert r.status == 2 and "make crops this model never saw" in r.error_line, r
    table = tmp_path / "people.csv"
    table.write_text(f"person,path,age_at_photo\na,{crops}/face0.png,30\na,{crops}/face1.png,32\n")
    r = run_fahr("far", f"model={crop_export}", f"input={table}", f"output={out}", "device=cpu")
    assert r.status == 2 and "say preprocessing.detect=false" in r.error_line, r
    assert not out.exists()
