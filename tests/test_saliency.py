"""`fahr saliency`: attention rollout, integrated gradients, regions, overlap and the sanity check.

Rollout is checked against a hand-computed example and timm's own attention; both methods against a
model built to depend on the mouth only (they must rank the mouth first); the rank statistics
against scipy; the command end to end and on bad input (one line, exit status 2).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fahr.analysis.regions import REGIONS, outside_importance, region_importance, region_labels
from fahr.analysis.saliency import (
    attribution_maps,
    randomized_copy,
    rank_data,
    recorded_attention,
    rollout,
    spearman,
)
from fahr.models.backbone import create_backbone
from fahr.models.face_model import FaceModel, save_face_model
from fahr.models.heads import AgeHead, RiskHead
from tests.conftest import shared_data
from tests.test_predict import make_export, read_rows

CROPS = "preprocessing.detect=false"
MOUTH = REGIONS.index("mouth")


# ---------------------------------------------------------------- a model that looks at the mouth only


def mouth_patches(size: int = 112, patch: int = 16) -> np.ndarray:
    """Indices of the patches at least 30 % of whose pixels are in the template's mouth region."""
    labels = region_labels(size)
    g = size // patch
    per_patch = labels.reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, -1)
    return np.flatnonzero((per_patch == MOUTH).mean(1) >= 0.3)


def mouth_model(marker: float = 30.0, sharpness: float = 3.0) -> FaceModel:
    """A vit_test FaceModel (112 px, patch 16) whose outputs depend on the mouth patches only.

    Channel 0 of the tokens is a marker: ``marker`` on the class token and the mouth patches (through
    the position embedding), 0 elsewhere (its patch-embedding row is zero). Block 1's attention
    scores are ``sharpness**2 * m_i * m_j`` on that channel, so the class token attends to itself and
    the mouth patches only and copies their mean (value and output projections are identities);
    block 1 and both MLPs add nothing. The heads read the class token: random linear maps of it."""
    torch.manual_seed(0)
    bb = create_backbone("vit_test", img_size=112, patch_size=16)
    selected = torch.as_tensor(mouth_patches())
    dim = bb.embed_dim
    with torch.no_grad():
        bb.patch_embed.proj.weight[0].zero_()
        bb.patch_embed.proj.bias[0] = 0
        bb.pos_embed.zero_()
        bb.cls_token.zero_()
        bb.cls_token[0, 0, 0] = marker
        bb.pos_embed[0, 1 + selected, 0] = marker
        first, second = bb.blocks
        head_dim = dim // first.attn.num_heads
        first.attn.qkv.weight.zero_()
        first.attn.qkv.bias.zero_()
        for h in range(first.attn.num_heads):
            first.attn.qkv.weight[h * head_dim, 0] = sharpness  # query
            first.attn.qkv.weight[dim + h * head_dim, 0] = sharpness  # key
        first.attn.qkv.weight[2 * dim :] = torch.eye(dim)  # value
        first.attn.proj.weight.copy_(torch.eye(dim))
        first.attn.proj.bias.zero_()
        for block in (first, second):
            block.mlp.fc2.weight.zero_()
            block.mlp.fc2.bias.zero_()
        for p in (second.attn.qkv.weight, second.attn.qkv.bias, second.attn.proj.weight, second.attn.proj.bias):
            p.zero_()
    age = AgeHead(bb.num_features, kind="regression")
    torch.nn.init.normal_(age.net[-1].weight, std=1.0)
    return FaceModel(bb, {"age": age, "risk": RiskHead(bb.num_features)}, [0.5] * 3, [0.25] * 3).eval()


def random_crops(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


def as_tensor(crops: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous()


def test_the_mouth_model_depends_on_the_mouth_patches_only():
    model = mouth_model()
    crops = random_crops()
    outside = np.ones((7, 7), bool)
    outside.flat[mouth_patches()] = False
    mask = np.kron(outside, np.ones((16, 16), bool)).astype(bool)  # pixels of the other patches
    edited = crops.copy()
    edited[:, mask] = 255 - edited[:, mask]
    with torch.no_grad():
        before, after = model(as_tensor(crops)), model(as_tensor(edited))
        inside = crops.copy()
        inside[:, ~mask] = 255 - inside[:, ~mask]
        moved = model(as_tensor(inside))
    for head in ("age", "risk"):
        assert torch.allclose(before[head], after[head], atol=1e-4)
        assert (before[head] - moved[head]).abs().min() > 20 * (before[head] - after[head]).abs().max()
        assert (before[head] - moved[head]).abs().min() > 1e-3


@pytest.mark.parametrize("method", ["integrated_gradients", "rollout"])
@pytest.mark.parametrize("head", ["age", "risk"])
def test_maps_of_a_model_built_on_the_mouth_put_the_mouth_first(method, head):
    labels = region_labels(112)
    maps, error = attribution_maps(mouth_model(), random_crops(), method, head, steps=32)
    importance = region_importance(maps, labels)  # (photos, regions)
    assert (importance.argmax(axis=1) == MOUTH).all(), importance
    if method == "integrated_gradients":
        # nothing outside the mouth patches gets attribution: eyes, nose, forehead are 0 (to float underflow)
        assert importance[:, [REGIONS.index(r) for r in ("eyes", "nose", "forehead")]].max() < 1e-30
        assert error < 0.1  # completeness: the attributions add up to f(x) - f(baseline)


def test_randomising_the_weights_changes_the_maps():
    model = mouth_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    random_model = randomized_copy(model, seed=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), "the original is untouched"
    changed = [k for k, v in random_model.state_dict().items() if not torch.equal(v, before[k])]
    # every parameter but the layer norms' (which are still at their initial ones and zeros here)
    assert set(changed) == {k for k, _ in model.named_parameters() if "norm" not in k}
    crops = random_crops()
    for method in ("integrated_gradients", "rollout"):
        trained, _ = attribution_maps(model, crops, method, "age")
        randomised, _ = attribution_maps(random_model, crops, method, "age")
        rho = np.mean([spearman(a, b) for a, b in zip(trained, randomised)])
        assert rho < 0.3, (method, rho)
        assert region_importance(randomised, region_labels(112)).mean(0).argmax() != MOUTH


# ---------------------------------------------------------------- rollout


def test_rollout_of_a_hand_computed_example():
    # layer 1: two heads whose mean is [[0.5, 0.5], [0, 1]]; layer 2: tokens swap
    layer1 = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]]])
    layer2 = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]])
    # 0.5 I + 0.5 A: [[0.75, 0.25], [0, 1]] then [[0.5, 0.5], [0.5, 0.5]]; product layer2 @ layer1
    expected = torch.tensor([[[0.375, 0.625], [0.375, 0.625]]])
    assert torch.allclose(rollout([layer1, layer2]), expected)
    assert torch.allclose(rollout([layer1]), torch.tensor([[[0.75, 0.25], [0.0, 1.0]]]))
    with pytest.raises(ValueError):
        rollout([])


def test_recorded_attention_is_timms_own():
    torch.manual_seed(1)
    bb = create_backbone("vit_test", img_size=64, patch_size=16).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fused = bb.forward_features(x)
        with recorded_attention(bb) as recorded:
            unfused = bb.forward_features(x)
        tokens = bb.norm_pre(bb._pos_embed(bb.patch_embed(x)))
        attn = bb.blocks[0].attn
        qkv = attn.qkv(bb.blocks[0].norm1(tokens)).reshape(2, 17, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        by_hand = (qkv[0] @ qkv[1].transpose(-2, -1) * attn.head_dim**-0.5).softmax(-1)
    assert len(recorded) == 2 and recorded[0].shape == (2, 2, 17, 17)
    assert torch.allclose(recorded[0], by_hand, atol=1e-6)
    assert torch.allclose(recorded[1].sum(-1), torch.ones(2, 2, 17), atol=1e-6)
    assert torch.allclose(fused, unfused, atol=1e-5)
    assert all(b.attn.fused_attn == attn.fused_attn for b in bb.blocks) and attn.attn_drop._forward_hooks == {}


# ---------------------------------------------------------------- statistics and regions


def test_rank_statistics_match_scipy():
    from scipy import stats

    rng = np.random.default_rng(0)
    tied = rng.integers(0, 4, 40).astype(float)
    assert np.array_equal(rank_data(tied), stats.rankdata(tied))
    a, b = rng.normal(size=40), tied
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert np.isnan(spearman(np.ones(5), np.arange(5)))


def test_region_importance_is_a_per_pixel_ratio():
    labels = region_labels(112)
    only_mouth = (labels == MOUTH).astype(float)
    imp = region_importance(only_mouth, labels)
    assert imp[MOUTH] == pytest.approx(112 * 112 / (labels == MOUTH).sum())
    assert (np.delete(imp, MOUTH) == 0).all()
    assert np.allclose(region_importance(np.full((112, 112), 3.0), labels), 1.0)
    assert (region_importance(np.zeros((112, 112)), labels) == 0).all()
    assert outside_importance(only_mouth, labels) == 0
    assert outside_importance(np.full((2, 112, 112), 3.0), labels) == pytest.approx([1.0, 1.0])
    border = (labels == -1).astype(float)
    assert outside_importance(border, labels) == pytest.approx(112 * 112 / (labels == -1).sum())


def test_missing_captum_is_one_line(monkeypatch):
    import sys

    from fahr.boundary import InputError

    monkeypatch.setitem(sys.modules, "captum.attr", None)
    with pytest.raises(InputError, match=r"pip install 'fahr\[analysis\]'"):
        attribution_maps(mouth_model(), random_crops(1), "integrated_gradients", "age")


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """A FaceAge export (age head only), a FaceSurvival export (risk head only), a combined-risk one."""
    root = tmp_path_factory.mktemp("exports")
    card = {"task": "test", "preprocessing": {"detect": False, "image_size": 112, "crops": "external"}}
    out = {}
    for name, heads in (("age", {"age"}), ("risk", {"risk"}), ("combined", {"combined"})):
        torch.manual_seed(len(out))
        bb = create_backbone("vit_test", img_size=112, patch_size=16)
        made = {}
        if "age" in heads:
            made["age"] = AgeHead(bb.num_features, kind="regression")
            torch.nn.init.normal_(made["age"].net[-1].weight, std=1.0)
        if "risk" in heads:
            made["risk"] = RiskHead(bb.num_features)
        if "combined" in heads:
            made["risk"] = RiskHead(bb.num_features, num_covariates=2)
        out[name] = save_face_model(root / name, FaceModel(bb, made, [0.5] * 3, [0.25] * 3), card)
    return out


@pytest.fixture(scope="module")
def crops_csv(tmp_path_factory) -> Path:
    from fahr.data.synthetic import synthetic_face

    d = tmp_path_factory.mktemp("crops")
    lines = ["path,age"]
    for i in range(5):
        img, labels = synthetic_face(i, seed=4, size=112)
        Image.fromarray(img).save(d / f"face{i}.png")
        lines.append(f"face{i}.png,{[25, 31, 38, 52, ''][i]}")
    (d / "faces.csv").write_text("\n".join(lines) + "\n")
    return d / "faces.csv"


def test_command_end_to_end_with_two_models(exports, crops_csv, tmp_path, run_fahr):
    out = tmp_path / "saliency"
    done = run_fahr("saliency", f"model={exports['age']}", f"risk_model={exports['risk']}", f"input={crops_csv}",
                    f"output={out}", CROPS, "device=cpu", "ig_steps=8", "photo_figures=2")
    assert done.status == 0, done
    regions = read_rows(out / "regions.csv")
    assert len(regions) == 2 * 2 * 7 and sum(r["region"] == "outside" and r["rank"] == "" for r in regions) == 4
    for method in ("rollout", "integrated_gradients"):
        for model in ("faceage", "facesurvival"):
            ranks = sorted(int(r["rank"]) for r in regions if r["method"] == method and r["model"] == model
                           and r["region"] != "outside")
            assert ranks == [1, 2, 3, 4, 5, 6]
    overlap = read_rows(out / "overlap.csv")
    assert [r["method"] for r in overlap] == ["rollout", "integrated_gradients"]
    assert all(-1 <= float(r["regions_spearman"]) <= 1 and r["same_backbone"] == "False" for r in overlap)
    sanity = read_rows(out / "sanity.csv")
    assert len(sanity) == 4 and all(float(r["pixels_spearman_trained_vs_random"]) < 0.9 for r in sanity)
    decades = read_rows(out / "decades.csv")
    assert {r["decade"] for r in decades} == {"20s", "30s", "50s"}
    assert {r["photos"] for r in decades if r["decade"] == "30s"} == {"2"}
    maps = np.load(out / "maps.npz")
    assert maps["integrated_gradients__faceage"].shape == (5, 112, 112) and np.isnan(maps["ages"][4])
    assert {p.name for p in out.glob("*.png")} == {"saliency_mean.png", "saliency_regions.png",
                                                   "saliency_decades.png", "photo_000.png", "photo_001.png"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["aligned"] == 5 and summary["models"] == ["faceage", "facesurvival"]
    assert summary["ig_relative_completeness_error"]["faceage"] < 0.5
    assert "face0" not in done.err + done.out


def test_one_export_with_both_heads_shares_its_rollout(tmp_path, crops_csv, run_fahr):
    export = make_export(tmp_path / "both", preprocessing={"detect": False, "image_size": 112})
    out = tmp_path / "saliency"
    done = run_fahr("saliency", f"model={export}", f"input={crops_csv}", f"output={out}", CROPS, "device=cpu",
                    "methods=[rollout]", "photo_figures=0")
    assert done.status == 0, done
    (row,) = read_rows(out / "overlap.csv")
    assert row["same_backbone"] == "True" and float(row["regions_spearman"]) == 1.0


@pytest.mark.real_data
def test_command_on_real_fgnet_photos_with_detection(tmp_path, run_fahr):
    fgnet = shared_data("fgnet")
    with open(fgnet / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:3]
    table = tmp_path / "fgnet.csv"
    table.write_text("path,age\n" + "".join(f"{fgnet / r['file']},{r['age']}\n" for r in rows))
    export = make_export(tmp_path / "export")  # 64 px, trained on fahr's crops: photos are detected + aligned
    out = tmp_path / "saliency"
    done = run_fahr("saliency", f"model={export}", f"input={table}", f"output={out}", "device=cpu", "ig_steps=4",
                    "photo_figures=1")
    assert done.status == 0, done
    summary = json.loads((out / "summary.json").read_text())
    assert summary["photos"] == 3 and summary["aligned"] >= 2
    assert np.load(out / "maps.npz")["rollout__faceage"].shape[1:] == (112, 112)  # the aligned crop, not 64 px


@pytest.mark.parametrize("case, expected", [
    ("risk_only_model", "has no FaceAge head"),
    ("combined_risk_model", "no image-only risk head"),
    ("unknown_method", "methods: unknown ['gradcam']"),
    ("bad_baseline", "baseline"),
    ("missing_risk_model", "nope"),
    ("output_is_the_risk_model", "is also an input of this command"),
    ("no_photos", "no photos in"),
])
def test_bad_input_is_one_line(case, expected, exports, crops_csv, tmp_path, run_fahr):
    args = {"model": str(exports["age"]), "input": str(crops_csv), "output": str(tmp_path / "out")}
    extra: list[str] = []
    if case == "risk_only_model":
        args["model"] = str(exports["risk"])
    elif case == "combined_risk_model":
        extra = [f"risk_model={exports['combined']}"]
    elif case == "unknown_method":
        extra = ["methods=[rollout,gradcam]"]
    elif case == "bad_baseline":
        extra = ["baseline=white"]
    elif case == "missing_risk_model":
        extra = [f"risk_model={tmp_path / 'nope'}"]
    elif case == "output_is_the_risk_model":
        extra = [f"risk_model={exports['risk']}"]
        args["output"] = str(exports["risk"])
    elif case == "no_photos":
        (tmp_path / "empty").mkdir()
        args["input"] = str(tmp_path / "empty")
    done = run_fahr("saliency", *(f"{k}={v}" for k, v in args.items()), CROPS, "device=cpu", *extra)
    assert done.status == 2, done
    assert expected in done.error_line, done.error_line
    assert "Traceback" not in done.err
