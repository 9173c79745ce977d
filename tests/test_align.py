"""Photo decoding (fahr.faces.decode) and face alignment (fahr.faces.align).

Pure geometry and decoding tests always run; tests on real faces read ../shared/data (FG-NET raw
photos with 68-point landmarks, UTKFace crops) and skip when it is absent. CPU only, no downloads.
"""

from __future__ import annotations

import csv
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from fahr.faces.align import (
    ARCFACE_TEMPLATE_112,
    AlignedFace,
    FaceAligner,
    apply,
    eye_centres_68,
    invert,
    read_pts,
    similarity_transform,
    template,
    warp,
)
from fahr.faces.decode import decode_photo
from fahr.faces.rejection import RejectedError

from conftest import SHARED_DATA

FGNET = SHARED_DATA / "fgnet"
UTKFACE = SHARED_DATA / "utkface"


def _needs(folder: Path, name: str):
    """Mark a test real_data and skip it, saying why, when ../shared/data lacks ``folder``."""
    skip = pytest.mark.skipif(not (folder / "manifest.csv").is_file(),
                              reason=f"{name} test data not found at {folder} (shared data folder absent)")
    return lambda test: pytest.mark.real_data(skip(test))


needs_fgnet = _needs(FGNET, "FG-NET")
needs_utkface = _needs(UTKFACE, "UTKFace")


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose IHDR claims width x height (the pixel data is 1x1)."""
    data = _png(Image.new("L", (1, 1), 7))
    assert data[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + data[24:29]
    chunk = b"IHDR" + ihdr
    return data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


def _utk(n: int) -> list[np.ndarray]:
    rows = list(csv.DictReader(open(UTKFACE / "manifest.csv", newline="")))
    return [decode_photo((UTKFACE / r["file"]).read_bytes()) for r in rows[:: max(1, len(rows) // n)][:n]]


@pytest.fixture(scope="module")
def aligner() -> FaceAligner:
    return FaceAligner()


# -- geometry ---------------------------------------------------------------------------------------
def test_similarity_transform_recovers_known_transform_and_inverts():
    rng = np.random.default_rng(0)
    theta, scale, t = np.deg2rad(23.0), 1.7, np.array([12.5, -40.25])
    a = scale * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    m_true = np.hstack([a, t[:, None]])
    src = rng.uniform(0, 500, size=(5, 2))
    dst = apply(m_true, src)
    m = similarity_transform(src, dst)
    np.testing.assert_allclose(m, m_true, atol=1e-6)
    np.testing.assert_allclose(apply(invert(m), dst), src, atol=1e-6)
    np.testing.assert_allclose(apply(m, apply(invert(m), src)), src, atol=1e-6)
    # the template maps onto itself; a mirrored point set is not fitted with a reflection
    np.testing.assert_allclose(similarity_transform(ARCFACE_TEMPLATE_112, ARCFACE_TEMPLATE_112),
                               np.hstack([np.eye(2), np.zeros((2, 1))]), atol=1e-9)
    mirrored = src * np.array([-1.0, 1.0])
    assert np.linalg.det(similarity_transform(src, mirrored)[:, :2]) > 0


def test_template_scaling_and_margin():
    np.testing.assert_allclose(template(112), ARCFACE_TEMPLATE_112, atol=1e-12)
    t224 = template(224)
    np.testing.assert_allclose(t224, (ARCFACE_TEMPLATE_112 + 0.5) * 2 - 0.5)
    t_m = template(112, margin=0.25)
    c = 55.5
    np.testing.assert_allclose(t_m - c, (ARCFACE_TEMPLATE_112 - c) / 1.25)
    # zooming out shrinks the inter-ocular distance
    assert np.linalg.norm(t_m[1] - t_m[0]) < np.linalg.norm(ARCFACE_TEMPLATE_112[1] - ARCFACE_TEMPLATE_112[0])


def test_warp_pixel_conventions():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8)
    ident = np.hstack([np.eye(2), np.zeros((2, 1))])
    np.testing.assert_array_equal(warp(img, ident, 112), img)
    shift = np.array([[1.0, 0, -10], [0, 1.0, -20]])  # crop pixel (x, y) = source (x + 10, y + 20)
    np.testing.assert_array_equal(warp(img, shift, 50), img[20:70, 10:60])
    big = np.kron(img[:56, :56], np.ones((4, 4, 1), dtype=np.uint8))  # 224x224, 4x4 blocks
    quarter = np.array([[0.25, 0, -0.375], [0, 0.25, -0.375]])  # block centres -> integer pixels
    np.testing.assert_array_equal(warp(big, quarter, 56), img[:56, :56])


def test_read_pts_and_eye_centres():
    pts = np.arange(136, dtype=float).reshape(68, 2)
    text = "version: 1\nn_points: 68\n{\n" + "\n".join(f"{x} {y}" for x, y in pts) + "\n}\n"
    np.testing.assert_array_equal(read_pts(text), pts)
    eyes = eye_centres_68(pts)  # FG-NET markup: contours 27-30 and 32-35
    np.testing.assert_allclose(eyes, [pts[27:31].mean(0), pts[32:36].mean(0)])
    np.testing.assert_allclose(eye_centres_68(pts, scheme="ibug"), [pts[36:42].mean(0), pts[42:48].mean(0)])
    swapped = pts.copy()
    swapped[27:31, 0] += 1000  # the first contour is now on the image's right
    assert eye_centres_68(swapped)[0, 0] < eye_centres_68(swapped)[1, 0]
    with pytest.raises(ValueError):
        read_pts("no landmarks here")


# -- decoding ---------------------------------------------------------------------------------------
def _rejected(data: bytes, **kw) -> str:
    with pytest.raises(RejectedError) as e:
        decode_photo(data, **kw)
    return e.value.reason


def test_decode_rejects_bad_input():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert _rejected(b"") == "image:empty"
    assert _rejected(b"this is not an image at all" * 10) == "image:unreadable"
    rng = np.random.default_rng(2)
    good = _jpeg(Image.fromarray(rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8)))
    assert decode_photo(good).shape == (256, 256, 3)
    assert _rejected(good[: len(good) // 2]) == "image:unreadable"  # truncated: not half-decoded
    assert _rejected(_png(Image.new("RGB", (64, 64)))[:-30]) == "image:unreadable"


def test_decode_rejects_decompression_bombs_from_the_header():
    before = Image.MAX_IMAGE_PIXELS
    # 8000 x 8000 = 64 Mpx: above our limit, below PIL's; the data holds 1 pixel, so decoding it would
    # fail as "unreadable": "too_large" proves the size check runs before any decoding
    assert _rejected(_png_claiming(8000, 8000)) == "image:too_large"
    assert _rejected(_png_claiming(100_000, 100_000)) == "image:too_large"  # beyond PIL's hard limit too
    assert _rejected(_png_claiming(300, 300), max_pixels=10_000) == "image:too_large"
    assert _rejected(_png_claiming(300, 300)) == "image:unreadable"
    assert Image.MAX_IMAGE_PIXELS == before


def test_decode_converts_modes_to_rgb():
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:4, :, 3] = 255  # top half opaque red, bottom half fully transparent
    out = decode_photo(_png(Image.fromarray(rgba, "RGBA")))
    assert out.dtype == np.uint8 and out.shape == (8, 8, 3)
    np.testing.assert_array_equal(out[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(out[7, 7], [255, 255, 255])  # composited on white

    la = Image.fromarray(np.stack([np.full((4, 4), 10, np.uint8), np.zeros((4, 4), np.uint8)], -1), "LA")
    np.testing.assert_array_equal(decode_photo(_png(la)), 255)

    grey = decode_photo(_jpeg(Image.new("L", (16, 16), 128)))
    assert grey.shape == (16, 16, 3) and abs(int(grey[8, 8, 0]) - 128) <= 1

    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    np.testing.assert_array_equal(decode_photo(_png(pal))[0, 0], [10, 20, 30])

    cmyk = decode_photo(_jpeg(Image.new("CMYK", (16, 16), (0, 255, 255, 0))))  # red in CMYK
    assert cmyk.shape == (16, 16, 3)
    r, g, b = (int(v) for v in cmyk[8, 8])
    assert r > 200 and g < 60 and b < 60

    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)  # full 16-bit range
    sixteen = Image.fromarray(ramp)
    assert sixteen.mode.startswith("I;16")
    out16 = decode_photo(_png(sixteen))
    assert out16.dtype == np.uint8 and out16.shape == (16, 16, 3)
    np.testing.assert_array_equal(out16[..., 0], np.arange(256).reshape(16, 16))


@needs_utkface
def test_decode_applies_exif_orientation():
    original = _utk(1)[0]
    stored = Image.fromarray(original).transpose(Image.Transpose.ROTATE_90)  # stored rotated 90 CCW
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    out = decode_photo(_jpeg(stored, exif=exif.tobytes()))
    assert out.shape == original.shape
    err = np.abs(out.astype(int) - original.astype(int)).mean()
    wrong = np.abs(np.asarray(stored).astype(int) - original.astype(int)).mean()
    assert err < 3 < wrong, (err, wrong)


# -- alignment on real faces ------------------------------------------------------------------------
@needs_fgnet
def test_fgnet_detection_and_eye_error(aligner):
    rows = list(csv.DictReader(open(FGNET / "manifest.csv", newline="")))
    assert len(rows) == 61
    images = [decode_photo((FGNET / r["file"]).read_bytes()) for r in rows]
    results = aligner.align(images)
    assert len(results) == len(rows)
    found = [(r, a) for r, a in zip(rows, results) if isinstance(a, AlignedFace)]
    rate = len(found) / len(rows)
    template_eyes = template(aligner.image_size, aligner.margin)[:2]
    err_px, err_iod = [], []
    for row, face in found:
        assert face.crop.shape == (112, 112, 3) and face.crop.dtype == np.uint8
        assert face.landmarks.dtype == np.float64 and face.matrix.shape == (2, 3)
        truth = eye_centres_68(read_pts(FGNET / row["landmarks"]))
        back = apply(invert(face.matrix), template_eyes)  # crop's template eyes in source pixels
        e = np.linalg.norm(back - truth, axis=1).mean()
        err_px.append(e)
        err_iod.append(e / np.linalg.norm(truth[1] - truth[0]))
    print(f"\nFG-NET: faces found {len(found)}/{len(rows)} ({rate:.1%}); template-eye error mean "
          f"{np.mean(err_px):.2f} px (median {np.median(err_px):.2f}, max {np.max(err_px):.1f}), "
          f"{np.mean(err_iod):.3f} of inter-ocular distance (max {np.max(err_iod):.3f})")
    assert rate >= 0.95
    # measured (defaults): 61/61 found, 7.4 px mean (0.059 IOD; IODs are ~120 px), max 15 px (0.13 IOD).
    # This includes the 5-point fit residual (a child's face does not have the adult template's
    # proportions) and the difference between FG-NET's eye-contour centre and MTCNN's eye point.
    assert np.mean(err_px) < 12.0
    assert np.mean(err_iod) < 0.10
    assert np.median(err_iod) < 0.08
    assert np.max(err_iod) < 0.25


@needs_utkface
def test_no_face_and_too_small_and_low_confidence(aligner):
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
    flat = np.full((240, 320, 3), 128, dtype=np.uint8)
    res = aligner.align([noise, flat])
    assert [r.reason for r in res] == ["face:none", "face:none"]
    tiny = aligner.align([np.zeros((10, 10, 3), np.uint8), np.zeros((30, 3000, 3), np.uint8)])
    assert [r.reason for r in tiny] == ["face:too_small", "face:none"]
    face = _utk(1)[0]
    with pytest.raises(RejectedError) as e:
        FaceAligner(min_face_size=400).align_one(face)
    assert e.value.reason == "face:too_small"
    with pytest.raises(RejectedError) as e:
        FaceAligner(min_confidence=1.01).align_one(face)
    assert e.value.reason == "face:low_confidence"


@needs_utkface
def test_multiple_faces_policies():
    a, b = _utk(2)
    canvas = _two_faces(a, b)  # the larger face (200 px) far from the centre (x = 280), a 160-px one nearer
    with pytest.raises(RejectedError) as e:
        FaceAligner(multi_face="reject").align_one(canvas)
    assert e.value.reason == "face:multiple"
    largest = FaceAligner(multi_face="largest").align_one(canvas)
    central = FaceAligner(multi_face="central").align_one(canvas)
    assert largest.box[2] < 230  # the left (200 px) face
    assert central.box[0] > 270  # the right face, nearer the centre
    assert largest.crop.shape == central.crop.shape == (112, 112, 3)


def _same_result(a, b) -> bool:
    """Bit-identical alignment results (or the same rejection reason)."""
    if isinstance(a, RejectedError) or isinstance(b, RejectedError):
        return isinstance(a, RejectedError) and isinstance(b, RejectedError) and a.reason == b.reason
    return (np.array_equal(a.crop, b.crop) and np.array_equal(a.landmarks, b.landmarks)
            and np.array_equal(a.matrix, b.matrix) and a.confidence == b.confidence)


def _two_faces(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    canvas = np.full((240, 560, 3), 90, dtype=np.uint8)
    canvas[20:220, 0:200] = a
    canvas[40:200, 300:460] = np.asarray(Image.fromarray(b).resize((160, 160), Image.Resampling.BILINEAR))
    return canvas


@needs_utkface
def test_a_photos_result_never_depends_on_the_other_photos_or_threads():
    """One photo's detection and crop are bit-identical alone, in any batch, in any order and with
    any torch thread count (a batched detector searched every photo of a batch for the smallest
    photo's face size on one padded canvas: a two-face photo was `multiple` alone and `ok` beside a
    large photo, and FaceAge moved 33.95 -> 48.59 with the batch size)."""
    import random

    import torch

    faces = _utk(6)
    big = np.asarray(Image.fromarray(faces[1]).resize((640, 640), Image.Resampling.BILINEAR))
    two = _two_faces(faces[2], faces[3])
    photos = [faces[0], big, np.ascontiguousarray(faces[4][:, 20:180]), two, faces[5],
              np.full((30, 30, 3), 128, np.uint8), np.full((23, 400, 3), 5, np.uint8)]
    aligner = FaceAligner(detect_pad=0.25)
    alone = [aligner.align([p])[0] for p in photos]
    assert isinstance(alone[3], RejectedError) and alone[3].reason == "face:multiple"
    assert [isinstance(r, AlignedFace) for r in alone[:3]] == [True, True, True]
    assert alone[6].reason == "face:too_small"
    threads = torch.get_num_threads()
    try:
        for n_threads, seed in ((1, 0), (2, 1), (3, 2)):
            torch.set_num_threads(n_threads)
            order = list(range(len(photos)))
            random.Random(seed).shuffle(order)
            for size in (1, 3, len(photos)):
                results: dict[int, object] = {}
                for i in range(0, len(order), size):
                    part = order[i : i + size]
                    results.update(zip(part, FaceAligner(detect_pad=0.25).align([photos[j] for j in part])))
                for j in range(len(photos)):
                    assert _same_result(alone[j], results[j]), (n_threads, size, j)
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads  # the aligner restores the caller's thread count


@needs_utkface
def test_downscaled_and_padded_detection_finds_frame_filling_faces():
    faces = _utk(3)
    big = np.asarray(Image.fromarray(faces[1]).resize((640, 640), Image.Resampling.BILINEAR))
    upscaled = FaceAligner(detect_pad=0.25).align_one(big)
    # the upscaled photo's landmarks are the original's, scaled (downscaled for detection and back)
    ref = FaceAligner(detect_pad=0.25).align_one(faces[1])
    assert np.abs((upscaled.landmarks + 0.5) / 3.2 - 0.5 - ref.landmarks).max() < 0.05 * 200
    # padded, the eyes of this frame-filling face are found where they are (y ~ 60 of 200); without
    # padding MTCNN clips the face box to the frame and puts them ~20-40 px too high
    eyes_y = ref.landmarks[:2, 1].mean()
    assert eyes_y > 45, eyes_y

    skip = FaceAligner(skip_detection=True, image_size=64)
    out = skip.align_one(faces[0])
    assert out.crop.shape == (64, 64, 3) and out.confidence == 1.0
    np.testing.assert_allclose(apply(out.matrix, out.landmarks), template(64), atol=1e-9)
    assert skip._detector is None


def _detection_inputs(folder: Path, n: int) -> list[np.ndarray]:
    """``n`` photos as FaceAligner's detector sees them: longest side <= 224, padded by 20% (black)."""
    rows = list(csv.DictReader(open(folder / "manifest.csv", newline="")))
    out = []
    for r in rows[:: max(1, len(rows) // n)][:n]:
        im = Image.fromarray(decode_photo((folder / r["file"]).read_bytes()))
        s = min(1.0, 224 / max(im.size))
        a = np.asarray(im.resize((round(im.size[0] * s), round(im.size[1] * s)), Image.Resampling.BOX))
        p = round(0.2 * max(a.shape[:2]))
        out.append(np.pad(a, ((p, p), (p, p), (0, 0))))
    return out


@needs_fgnet
@needs_utkface
def test_fast_mtcnn_matches_facenet_detect():
    """Our batched MTCNN with facenet's settings against facenet-pytorch's own ``MTCNN.detect``.

    Its crops are PIL box resamples (exact pixel fractions, uint8) instead of facenet's
    ``adaptive_avg_pool2d`` bins (float), so boxes are not bit-identical: measured on 61 FG-NET +
    60 UTKFace photos, 2/121 face/no-face decisions differ and the top face's box corners and
    landmarks differ by a median 2-4% (max 11%) of the box width (~100 px here: a few pixels)."""
    from facenet_pytorch import MTCNN

    from fahr.faces.mtcnn import MTCNNDetector

    ours = MTCNNDetector()  # facenet's defaults: thresholds 0.6/0.7/0.7, factor 0.709, NMS 0.7/0.7
    photos = _detection_inputs(FGNET, 16) + _detection_inputs(UTKFACE, 16)
    same, dev = 0, []
    for a in photos:
        min_face = 0.2 * min(a.shape[:2])
        boxes, probs, points = MTCNN(keep_all=True, min_face_size=min_face).detect(a, landmarks=True)
        ((b, p, pts),) = ours.detect(a[None], min_face)
        assert b.shape[1:] == (4,) and pts.shape[1:] == (5, 2) and len(b) == len(p) == len(pts)
        assert np.all(np.diff(p) <= 0)  # highest probability first, as facenet
        theirs_found = boxes is not None and probs[0] >= 0.95
        ours_found = len(b) > 0 and p[0] >= 0.95
        same += theirs_found == ours_found
        if theirs_found and ours_found:
            width = boxes[0][2] - boxes[0][0]
            dev.append(max(np.abs(boxes[0] - b[0]).max(), np.abs(points[0] - pts[0]).max()) / width)
    assert same >= len(photos) - 2, f"{len(photos) - same} face/no-face decisions differ"
    assert len(dev) >= len(photos) - 4
    assert np.median(dev) < 0.06, np.median(dev)  # of the box width (~100 px: < 6 px)
    assert np.max(dev) < 0.15, np.max(dev)


def test_fast_mtcnn_rejects_bad_input_and_finds_nothing_in_flat_images():
    from fahr.faces.mtcnn import MTCNNDetector

    det = MTCNNDetector()
    with pytest.raises(ValueError):
        det.detect(np.zeros((2, 64, 64), np.uint8))
    with pytest.raises(ValueError):
        det.detect(np.zeros((1, 64, 64, 3), np.float32))
    out = det.detect(np.full((2, 80, 100, 3), 128, np.uint8), 20.0)
    assert len(out) == 2 and all(len(b) == 0 and pts.shape == (0, 5, 2) for b, _, pts in out)


@pytest.mark.parametrize("name", ["pnet", "rnet", "onet"])
def test_functional_mtcnn_nets_equal_facenets_modules_bit_for_bit(name):
    """The detector runs facenet's P/R/O-Net as functional calls on the wheel's weights (no facenet or
    torchvision import): the outputs equal facenet's modules exactly, channels-last input included."""
    from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

    from fahr.faces import mtcnn

    module = {"pnet": PNet, "rnet": RNet, "onet": ONet}[name]().eval()
    forward = {"pnet": mtcnn._pnet, "rnet": mtcnn._rnet, "onet": mtcnn._onet}[name]
    size = {"pnet": 57, "rnet": 24, "onet": 48}[name]
    pixels = np.random.default_rng(0).integers(0, 256, (6, size, size, 3), dtype=np.uint8)
    x = mtcnn._to_input(list(pixels))
    with torch.inference_mode():
        expected, got = module(x), forward(mtcnn.mtcnn_weights(name), x)
    assert len(expected) == len(got)
    for e, g in zip(expected, got):
        assert torch.equal(e, g)


def test_pnet_cells_become_facenets_boxes_bit_for_bit():
    """P-Net cells above the threshold -> boxes (x1, y1, x2, y2, score, 4 offsets) and photo indices:
    facenet's ``generateBoundingBox`` exactly, at the pyramid scales of many photo sizes, with
    probabilities on the threshold as float32 (which rounds 0.6 up and 0.7 down) and several photos."""
    from facenet_pytorch.models.utils.detect_face import generateBoundingBox

    from fahr.faces.mtcnn import MTCNNDetector

    g = torch.Generator().manual_seed(2)
    for threshold in (0.6, 0.7):
        det = MTCNNDetector(thresholds=(threshold, 0.7, 0.7))
        for h, w in [(200, 200), (112, 96), (481, 640), (3000, 4000), (57, 57)]:
            for scale in det.scales(h, w, 20.0):
                size = (int(h * scale + 1) - 10) // 2 + 1, (int(w * scale + 1) - 10) // 2 + 1
                if min(size) < 1:
                    continue
                n = int(torch.randint(1, 4, (1,), generator=g))
                reg = torch.randn(n, 4, *size, generator=g)
                prob = torch.rand(n, *size, generator=g)
                prob[prob > 0.9] = torch.tensor(threshold, dtype=torch.float32)
                expected, expected_photo = generateBoundingBox(reg, prob, scale, threshold)
                got, got_photo = det._pnet_boxes(reg, prob, scale)
                assert got.dtype == expected.dtype and torch.equal(got, expected), (threshold, h, w, scale)
                assert torch.equal(got_photo, expected_photo)


def test_nms_is_torchvisions_nms_bit_for_bit():
    """Random boxes on an integer grid (exact IoU ties with the threshold happen) or fractional, tied
    scores, and thresholds that float32 rounds up (0.6) or down (0.7): the same kept indices in the
    same order."""
    from torchvision.ops import batched_nms as tv_batched_nms
    from torchvision.ops import nms as tv_nms

    from fahr.faces.mtcnn import batched_nms, nms

    g = torch.Generator().manual_seed(0)
    for case in range(600):
        n = int(torch.randint(1, 120, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 60
        size = torch.rand(n, 2, generator=g) * 30 + 1
        if case % 3:  # on the grid: exact ties of IoU and threshold; else fractional, as P/R-Net boxes are
            xy, size = xy.round(), size.round()
        boxes = torch.cat([xy, xy + size], 1)
        scores = (torch.rand(n, generator=g) * 10).round() / 10
        for threshold in (0.3, 0.5, 0.6, 0.7):
            assert torch.equal(nms(boxes, scores, threshold), tv_nms(boxes, scores, threshold))
            one_photo = torch.zeros(n, dtype=torch.int64)
            assert torch.equal(batched_nms(boxes, scores, one_photo, threshold),
                               tv_batched_nms(boxes, scores, one_photo, threshold))
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []


def test_batched_nms_keeps_each_photos_own_result():
    """Several photos: each photo's kept boxes are those it keeps alone, whatever the others hold."""
    from fahr.faces.mtcnn import batched_nms, nms

    g = torch.Generator().manual_seed(1)
    xy = torch.rand(90, 2, generator=g) * 500
    boxes = torch.cat([xy, xy + torch.rand(90, 2, generator=g) * 80 + 1], 1)
    scores = torch.rand(90, generator=g)
    photo = torch.randint(0, 3, (90,), generator=g)
    kept = batched_nms(boxes, scores, photo, 0.5)
    assert scores[kept].tolist() == sorted(scores[kept].tolist(), reverse=True)
    for j in range(3):
        rows = torch.nonzero(photo == j)[:, 0]
        alone = rows[nms(boxes[rows], scores[rows], 0.5)]
        assert sorted(kept[photo[kept] == j].tolist()) == sorted(alone.tolist())
