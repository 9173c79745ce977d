"""`fahr import-weights`: published ViT / MAE weights in, parity with the source library, hostile
inputs refused, exports that plain timm loads, and continuing / fine-tuning from an import.

The sources are small random models built by the source libraries themselves and saved in their own
formats: transformers (in a subprocess, tests/hf_reference.py: see :func:`hf_reference_env`), timm,
and a facebookresearch/mae ``.pth`` assembled the way ``models_mae.py`` names its state dict.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer

from fahr.boundary import InputError
from fahr.models import MaskedAutoencoder, create_backbone, load_backbone, read_card, save_backbone
from fahr.models.backbone import backbone_args, backbone_config
from fahr.models.import_weights import import_weights
from fahr.models.mae import decoder_args
from fahr.models.weights import init_from_export, model_card

from conftest import REPO

# 32 px images of 8 px patches: a 4 x 4 grid, 16 patches; ViTMAE keeps int(16 * 0.25) = 4 visible
SIDE, PATCH, N = 32, 8, 16
MAE_CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=SIDE,
                  patch_size=PATCH, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                  decoder_intermediate_size=32, norm_pix_loss=True, mask_ratio=0.75)  # layer_norm_eps: 1e-12
TOL = 1e-5  # fp32 parity


def hf_reference_env() -> dict[str, str] | None:
    """The environment of a process that imports transformers, or None.

    transformers >= 5.18 requires safetensors >= 0.8, newer than fahr's pin (0.7.0); 5.0-5.17 and 4.x
    require huggingface_hub < 2, older than fahr's pin. So transformers (a test-only reference) lives in
    ``.cache/hf-reference`` (``make hf-reference``: pip --target) and only this subprocess puts it first
    on its path; fahr's own process keeps its pinned packages. ``FAHR_HF_REFERENCE`` points elsewhere.
    """
    target = os.environ.get("FAHR_HF_REFERENCE", str(REPO / ".cache" / "hf-reference"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([target, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    probe = subprocess.run([sys.executable, "-c", "import transformers"], env=env, capture_output=True)
    return env if probe.returncode == 0 else None


# ---- a facebookresearch/mae checkpoint, assembled independently of fahr --------------------------


def mae_numpy_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """facebookresearch/mae util/pos_embed.py get_2d_sincos_pos_embed (cls_token=True), as published."""
    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(dim // 2, dtype=np.float64)
        omega /= dim / 2.0
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


def mae_checkpoint(seed: int = 0) -> tuple[dict[str, torch.Tensor], VisionTransformer]:
    """A models_mae.py state dict (ViT 32 wide, 2 blocks, 2 heads; decoder 16 wide, 1 block, 2 heads),
    every tensor perturbed so that no LayerNorm is an identity; and the timm encoder holding it."""
    torch.manual_seed(seed)
    ln = partial(torch.nn.LayerNorm, eps=1e-6)
    encoder = VisionTransformer(img_size=SIDE, patch_size=PATCH, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                                norm_layer=ln)
    blocks = torch.nn.ModuleList([Block(16, 2, 4.0, qkv_bias=True, norm_layer=ln)])
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in encoder.state_dict().items()}
    encoder.load_state_dict(state)
    state.update({f"decoder_blocks.{k}": v + 0.05 * torch.randn_like(v) for k, v in blocks.state_dict().items()})
    state.update({"decoder_embed.weight": torch.randn(16, 32) * 0.1, "decoder_embed.bias": torch.randn(16) * 0.1,
                  "mask_token": torch.randn(1, 1, 16) * 0.02,
                  "decoder_pos_embed": torch.from_numpy(mae_numpy_pos_embed(16, SIDE // PATCH)).float().unsqueeze(0),
                  "decoder_norm.weight": 1 + 0.1 * torch.randn(16), "decoder_norm.bias": 0.1 * torch.randn(16),
                  "decoder_pred.weight": torch.randn(PATCH * PATCH * 3, 16) * 0.1,
                  "decoder_pred.bias": torch.randn(PATCH * PATCH * 3) * 0.1})
    return state, encoder.eval()


def mae_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors in transformers 4.x ViTMAEForPreTraining names (its conversion of MAE weights)."""
    parts = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
             "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    top = {"cls_token": "vit.embeddings.cls_token", "pos_embed": "vit.embeddings.position_embeddings",
           "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
           "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
           "norm.weight": "vit.layernorm.weight", "norm.bias": "vit.layernorm.bias",
           "mask_token": "decoder.mask_token", "decoder_pos_embed": "decoder.decoder_pos_embed"}
    out = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        m = re.match(r"(decoder_)?(?:blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)$", key)
        if m is None:  # decoder_embed, decoder_norm, decoder_pred
            out["decoder." + key] = value
            continue
        layer = "decoder.decoder_layers" if key.startswith("decoder_") else "vit.encoder.layer"
        prefix = f"{layer}.{m.group(2)}."
        if m.group(3) == "attn.qkv":
            for name, chunk in zip(("query", "key", "value"), value.chunk(3)):
                out[f"{prefix}attention.attention.{name}.{m.group(4)}"] = chunk.contiguous()
        else:
            out[f"{prefix}{parts[m.group(3)]}.{m.group(4)}"] = value
    return out


# ---- the transformers references, built once per session ----------------------------------------


@pytest.fixture(scope="session")
def refs(tmp_path_factory) -> dict[str, Path]:
    env = hf_reference_env()
    if env is None:
        pytest.skip("transformers reference not installed: `make hf-reference` (CI installs it)")
    root = tmp_path_factory.mktemp("hf")
    gen = torch.Generator().manual_seed(1)
    save_file({"images": torch.randn(3, 3, SIDE, SIDE, generator=gen), "noise": torch.rand(3, N, generator=gen)},
              str(root / "inputs.safetensors"))
    mae_state, _ = mae_checkpoint()
    # as main_pretrain.py's misc.save_model writes it: the argparse arguments beside the weights
    args = argparse.Namespace(model="mae_vit_base_patch16", norm_pix_loss=True)
    torch.save({"model": mae_state, "epoch": 799, "args": args}, root / "mae.pth")
    as_hf = root / "mae_as_hf"
    as_hf.mkdir()
    save_file(mae_to_transformers(mae_state), str(as_hf / "model.safetensors"), metadata={"format": "pt"})
    (as_hf / "config.json").write_text(json.dumps({
        **MAE_CONFIG, "model_type": "vit_mae", "architectures": ["ViTMAEForPreTraining"], "intermediate_size": 128,
        "decoder_intermediate_size": 64, "layer_norm_eps": 1e-6, "qkv_bias": True, "hidden_act": "gelu"}))
    inputs = str(root / "inputs.safetensors")
    jobs = {
        "mae_pre": dict(cls="ViTMAEForPreTraining", config=MAE_CONFIG, layout="pretrained"),
        "mae_pre_native": dict(cls="ViTMAEForPreTraining", config=MAE_CONFIG, layout="native"),
        "mae_enc": dict(cls="ViTMAEModel", config={**MAE_CONFIG, "num_attention_heads": 4, "intermediate_size": 96,
                                                   "qkv_bias": False, "layer_norm_eps": 1e-6}, layout="pretrained"),
        "vit": dict(cls="ViTModel", config={k: MAE_CONFIG[k] for k in ("hidden_size", "num_hidden_layers",
                    "num_attention_heads", "image_size", "patch_size")} | {"intermediate_size": 128},
                    layout="pretrained"),
    }
    spec = [{"class": j["cls"], "config": j["config"], "seed": 0, "save": str(root / name), "layout": j["layout"],
             "inputs": inputs, "outputs": str(root / f"{name}.out.safetensors")} for name, j in jobs.items()]
    spec.append({"class": "ViTMAEForPreTraining", "load": str(as_hf), "inputs": inputs,
                 "outputs": str(root / "mae_as_hf.out.safetensors")})
    (root / "jobs.json").write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, str(REPO / "tests" / "hf_reference.py"), str(root / "jobs.json")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (root / "mae_pre" / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "ViTImageProcessor", "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
         "image_std": [0.5, 0.5, 0.5], "do_rescale": True, "rescale_factor": 1 / 255}))
    hub_card = "---\nlicense: apache-2.0\ntags:\n- masked-autoencoder\n---\n# a model\n"  # the hub's README.md
    (root / "mae_pre" / "README.md").write_text(hub_card)
    return {"root": root, "inputs": root / "inputs.safetensors", "mae_pth": root / "mae.pth",
            **{name: root / name for name in [*jobs, "mae_as_hf"]}}


def inputs(refs) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_file(str(refs["inputs"]))
    return data["images"], data["noise"]


def outputs(refs, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(refs["root"] / f"{name}.out.safetensors"))


def features(export: Path, images: torch.Tensor) -> torch.Tensor:
    """What fahr fine-tunes on: the class token after the final LayerNorm (global_pool "token")."""
    backbone, _ = load_backbone(export, global_pool="token")
    with torch.no_grad():
        return backbone.eval()(images)


def mae_from_export(export: Path) -> MaskedAutoencoder:
    card = read_card(export)
    decoder = card["decoder"]
    mae = MaskedAutoencoder(create_backbone(**backbone_args(card)), mask_ratio=decoder["mask_ratio"] or 0.75,
                            norm_pix_loss=decoder["norm_pix_loss"] is not False, **decoder_args(decoder))
    init_from_export(mae, str(export))
    return mae.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# ---- parity: transformers ------------------------------------------------------------------------


def test_transformers_vitmae_for_pretraining_features_and_loss_equal_the_source(refs, tmp_path):
    card = import_weights("hf", refs["mae_pre"], tmp_path / "x")
    images, noise = inputs(refs)
    ref = outputs(refs, "mae_pre")
    assert max_diff(features(tmp_path / "x", images), ref["cls"]) <= TOL
    with torch.no_grad():
        out = mae_from_export(tmp_path / "x")(images, noise=noise)
    assert torch.equal(out["mask"], ref["mask"])
    assert abs(float(out["loss"]) - float(ref["loss"])) <= TOL * max(1.0, float(ref["loss"]))
    assert max_diff(out["pred"], ref["logits"]) <= TOL
    # every numeric detail of the source's config is in the card
    assert (card["arch"], card["embed_dim"], card["depth"], card["num_heads"], card["mlp_ratio"]) == \
        ("vit_custom", 32, 2, 2, 2.0)
    assert (card["norm_eps"], card["qkv_bias"], card["img_size"], card["patch_size"]) == (1e-12, True, SIDE, PATCH)
    assert card["decoder"] == {"dim": 16, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0, "norm_eps": 1e-12,
                               "qkv_bias": True, "pos_embed": "mae", "norm_pix_loss": True, "mask_ratio": 0.75}
    assert card["normalization"]["mean"] == [0.5] * 3 and card["normalization"]["std"] == [0.5] * 3
    assert card["license"] == "apache-2.0" and card["source"]["model_type"] == "vit_mae"
    assert "4.x" in card["conversion"]["keys"] and card["task"] == "imported"


def test_the_two_transformers_key_layouts_give_the_same_export(refs, tmp_path):
    """5.x's save_pretrained writes the 4.x names (encoder.layer.N.attention.attention.query); its
    modules are named layers.N.attention.q_proj / mlp.fc1, which a state_dict saved as is holds."""
    native = load_file(str(refs["mae_pre_native"] / "model.safetensors"))
    assert "vit.layers.0.attention.q_proj.weight" in native and "decoder.decoder_layers.0.mlp.fc1.weight" in native
    legacy = load_file(str(refs["mae_pre"] / "model.safetensors"))
    assert "vit.encoder.layer.0.attention.attention.query.weight" in legacy
    import_weights("hf", refs["mae_pre"], tmp_path / "a")
    card = import_weights("hf", refs["mae_pre_native"], tmp_path / "b", mean=[0.5] * 3, std=[0.5] * 3)
    assert "5.x" in card["conversion"]["keys"]
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    images, _ = inputs(refs)
    assert max_diff(features(tmp_path / "b", images), outputs(refs, "mae_pre_native")["cls"]) <= TOL


def test_transformers_encoder_only_models_and_a_pooler_that_must_be_named(refs, tmp_path):
    images, _ = inputs(refs)
    card = import_weights("hf", refs["mae_enc"], tmp_path / "enc", mean=[0.5] * 3, std=[0.25] * 3)
    assert "decoder" not in card and (card["num_heads"], card["mlp_ratio"], card["qkv_bias"]) == (4, 3.0, False)
    assert card["normalization"]["from"] == "given (mean=, std=)"
    assert max_diff(features(tmp_path / "enc", images), outputs(refs, "mae_enc")["cls"]) <= TOL

    with pytest.raises(InputError, match=r"unexpected 2 tensor\(s\).*pooler\.dense\.bias.*drop=\[pooler\.dense\]"):
        import_weights("hf", refs["vit"], tmp_path / "vit", mean=[0.5] * 3, std=[0.5] * 3)
    assert not (tmp_path / "vit" / "model.safetensors").exists()
    card = import_weights("hf", refs["vit"], tmp_path / "vit", drop=["pooler"], mean=[0.5] * 3, std=[0.5] * 3)
    assert card["conversion"]["dropped"] == ["pooler.dense.bias", "pooler.dense.weight"]
    assert max_diff(features(tmp_path / "vit", images), outputs(refs, "vit")["cls"]) <= TOL


def test_layer_norm_epsilon_is_carried_not_replaced_by_timms(refs, tmp_path):
    """transformers' 1e-12, not timm's 1e-6, in every LayerNorm of the rebuilt backbone; the card
    decides (edited to 1e-6, the same tensors give other features where activations are small)."""
    import_weights("hf", refs["mae_pre"], tmp_path / "x")
    backbone, _ = load_backbone(tmp_path / "x")
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 5 and {m.eps for m in norms} == {1e-12}
    tokens = torch.randn(2, 1 + N, 32) * 1e-4  # activations of the size a LayerNorm's epsilon competes with
    with torch.no_grad():
        at_1e12 = backbone.norm(tokens)
        card = json.loads((tmp_path / "x" / "model_card.json").read_text())
        (tmp_path / "x" / "model_card.json").write_text(json.dumps({**card, "norm_eps": 1e-6}))
        at_1e6 = load_backbone(tmp_path / "x")[0].norm(tokens)
    assert max_diff(at_1e12, at_1e6) > 0.1


def test_image_size_resamples_position_embeddings_and_the_decoder_follows(refs, tmp_path):
    import_weights("hf", refs["mae_pre"], tmp_path / "same")
    card = import_weights("hf", refs["mae_pre"], tmp_path / "small", image_size=16)
    assert (card["img_size"], card["conversion"]["source_img_size"]) == (16, SIDE)
    same = load_file(str(tmp_path / "same" / "model.safetensors"))
    small = load_file(str(tmp_path / "small" / "model.safetensors"))
    expected = resample_abs_pos_embed(same["pos_embed"], new_size=[2, 2], old_size=[4, 4], num_prefix_tokens=1)
    assert torch.equal(small["pos_embed"], expected)
    mae = mae_from_export(tmp_path / "small")  # the decoder's sin-cos positions are computed for a 2 x 2 grid
    assert mae.decoder.pos_embed.shape == (1, 5, 16)
    assert torch.isfinite(mae(torch.randn(2, 3, 16, 16))["loss"])


# ---- parity: facebookresearch/mae .pth ------------------------------------------------------------


def test_mae_checkpoint_features_equal_timm_and_loss_equals_transformers(refs, tmp_path):
    card = import_weights("mae", refs["mae_pth"], tmp_path / "x", num_heads=2, decoder_num_heads=2)
    images, noise = inputs(refs)
    _, encoder = mae_checkpoint()
    with torch.no_grad():
        timm_features = encoder.forward_head(encoder.forward_features(images), pre_logits=True)
    assert max_diff(features(tmp_path / "x", images), timm_features) <= TOL
    # the loss of the same weights in transformers' ViTMAEForPreTraining (loaded there with no key left over)
    reference = outputs(refs, "mae_as_hf")
    assert max_diff(reference["cls"], timm_features) <= TOL  # the renaming into transformers is right
    with torch.no_grad():
        out = mae_from_export(tmp_path / "x")(images, noise=noise)
    assert abs(float(out["loss"]) - float(reference["loss"])) <= TOL * max(1.0, float(reference["loss"]))
    assert max_diff(out["pred"], reference["logits"]) <= TOL
    assert card["normalization"]["mean"] == [0.485, 0.456, 0.406] and card["norm_eps"] == 1e-6
    assert card["decoder"]["pos_embed"] == "mae" and card["decoder"]["norm_pix_loss"] is None


def test_mae_checkpoint_of_a_published_size_needs_no_head_count(tmp_path):
    """ViT-B/16 (768 x 12) has 12 heads in models_mae.py; a checkpoint without decoder is an encoder."""
    torch.manual_seed(0)
    vit_b = VisionTransformer(img_size=32, patch_size=16, embed_dim=768, depth=12, num_heads=12, num_classes=0)
    torch.save({"model": vit_b.state_dict()}, tmp_path / "mae_pretrain_vit_base.pth")
    card = import_weights("mae", tmp_path / "mae_pretrain_vit_base.pth", tmp_path / "x")
    assert (card["arch"], card["num_heads"], "decoder" in card) == ("vit_base", 12, False)
    with pytest.raises(InputError, match=r"give num_heads="):
        torch.save({"model": create_backbone("vit_test", img_size=32).state_dict()}, tmp_path / "odd.pth")
        import_weights("mae", tmp_path / "odd.pth", tmp_path / "y")


# ---- parity: timm ---------------------------------------------------------------------------------


def timm_checkpoint(folder: Path, **model_args) -> torch.nn.Module:
    """A timm hub directory (config.json + model.safetensors) of a ViT with a 5-class head."""
    args = dict(img_size=SIDE, patch_size=PATCH, embed_dim=48, depth=2, num_heads=3, **model_args)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=5, **args).eval()
    folder.mkdir(parents=True)
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": "vit_base_patch16_224", "num_classes": 5, "model_args": args,
        "pretrained_cfg": {"mean": [0.4, 0.4, 0.4], "std": [0.2, 0.2, 0.2], "license": "cc-by-4.0"}}))
    return model


def test_timm_checkpoint_features_equal_timm(tmp_path):
    model = timm_checkpoint(tmp_path / "src", global_pool="avg")
    with pytest.raises(InputError, match=r"unexpected 2 tensor\(s\) .*head\.bias.*drop=\[head\]"):
        import_weights("timm", tmp_path / "src", tmp_path / "x")
    card = import_weights("timm", tmp_path / "src", tmp_path / "x", drop=["head"])
    assert (card["global_pool"], card["normalization"]["std"], card["license"]) == ("avg", [0.2] * 3, "cc-by-4.0")
    images = torch.randn(2, 3, SIDE, SIDE)
    backbone, _ = load_backbone(tmp_path / "x")
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(images), pre_logits=True)
        assert max_diff(backbone.eval()(images), expected) <= TOL


@pytest.mark.parametrize("model_args, message", [
    (dict(init_values=1e-5), r"layer scale"),
    (dict(act_layer="gelu_tanh"), r"an MLP other than Linear-GELU-Linear"),
    (dict(reg_tokens=4), r"register tokens"),
    (dict(class_token=False, global_pool="avg"), r"no class token"),
])
def test_timm_parts_fahr_cannot_represent_are_named(tmp_path, model_args, message):
    timm_checkpoint(tmp_path / "src", **model_args)
    with pytest.raises(InputError, match=message):
        import_weights("timm", tmp_path / "src", tmp_path / "x", drop=["head"])
    assert not (tmp_path / "x").exists()


# ---- exports that plain timm loads ----------------------------------------------------------------


def timm_load(export: Path) -> torch.nn.Module:
    card = json.loads((export / "model_card.json").read_text())
    return timm.create_model(card["timm_architecture"], pretrained=True, num_classes=0,
                             pretrained_cfg_overlay=dict(file=str(export / "model.safetensors")),
                             **card["timm_kwargs"]).eval()


@pytest.mark.parametrize("make", ["fahr_vit_test", "fahr_custom_avg", "mae_pth", "timm"])
def test_plain_timm_rebuilds_a_backbone_export_with_the_same_features(make, tmp_path):
    if make == "fahr_vit_test":
        enc = create_backbone("vit_test", img_size=64, patch_size=8)
        save_backbone(tmp_path / "x", enc.state_dict(), model_card(enc, task="mae_pretrain"))
    elif make == "fahr_custom_avg":
        enc = create_backbone("vit_custom", img_size=48, patch_size=16, embed_dim=40, depth=1, num_heads=5,
                              mlp_ratio=3.0, qkv_bias=False, global_pool="avg")
        save_backbone(tmp_path / "x", enc.state_dict(), model_card(enc))
    elif make == "mae_pth":  # an import with its MAE decoder (beside model.safetensors, in mae_decoder.safetensors)
        state, _ = mae_checkpoint()
        torch.save({"model": state}, tmp_path / "mae.pth")
        import_weights("mae", tmp_path / "mae.pth", tmp_path / "x", num_heads=2, decoder_num_heads=2)
        assert (tmp_path / "x" / "mae_decoder.safetensors").is_file()
    else:
        timm_checkpoint(tmp_path / "src")
        import_weights("timm", tmp_path / "src", tmp_path / "x", drop=["head"], image_size=48)
    card = json.loads((tmp_path / "x" / "model_card.json").read_text())
    assert "timm_note" not in card
    ours, _ = load_backbone(tmp_path / "x")
    side = card["img_size"]
    images = torch.randn(2, 3, side, side)
    with torch.no_grad():
        assert max_diff(timm_load(tmp_path / "x")(images), ours.eval()(images)) <= TOL


def test_a_card_says_when_timm_cannot_rebuild_the_backbone_from_json(refs, tmp_path):
    card = import_weights("hf", refs["mae_pre"], tmp_path / "x")  # LayerNorm eps 1e-12
    assert "timm_kwargs" not in card and "timm_architecture" not in card
    assert "epsilon is 1e-12" in card["timm_note"] and "1e-06" in card["timm_note"]


def test_a_fine_tuned_models_card_tells_timm_about_the_backbone_prefix(tmp_path):
    from fahr.models.face_model import FaceModel, save_face_model
    from fahr.models.heads import AgeHead

    backbone = create_backbone("vit_test", img_size=32, patch_size=8, global_pool="avg")
    save_face_model(tmp_path / "m", FaceModel(backbone, {"age": AgeHead(64)}, [0.5] * 3, [0.5] * 3), {})
    section = json.loads((tmp_path / "m" / "model_card.json").read_text())["backbone"]
    assert "prefix 'backbone.'" in section["timm_note"]
    # what the note says: the backbone's tensors alone, without the prefix, and timm loads them
    save_file(load_backbone(tmp_path / "m")[0].state_dict(), str(tmp_path / "backbone.safetensors"))
    model = timm.create_model(section["timm_architecture"], pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "backbone.safetensors")),
                              **section["timm_kwargs"]).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(model(images), backbone.eval()(images)) <= TOL


# ---- the architecture facts of a card --------------------------------------------------------------


def test_old_cards_without_the_new_facts_load_exactly_as_before(tmp_path):
    enc = create_backbone("vit_test", img_size=64, patch_size=16)
    old = {k: v for k, v in model_card(enc).items() if k in ("arch", "img_size", "patch_size", "embed_dim", "depth",
                                                               "num_heads", "global_pool")}
    save_backbone(tmp_path / "x", enc.state_dict(), old)
    loaded, _ = load_backbone(tmp_path / "x")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images), enc.eval()(images))
    block = loaded.blocks[0]
    assert (block.norm1.eps, loaded.norm.eps, block.attn.qkv.bias is not None) == (1e-6, 1e-6, True)


@pytest.mark.parametrize("edit, message", [
    (dict(embed_dim=192), r"embed_dim must be 64 for arch vit_test"),
    (dict(arch="vit_custom", embed_dim=None), r"embed_dim must be stated for arch vit_custom"),
    (dict(arch="vit_custom", num_heads=3), r"num_heads must be a divisor of embed_dim 64"),
    (dict(norm_eps=0.5), r"norm_eps must be a number in \[1e-12, 0\.01\]"),
    (dict(qkv_bias="yes"), r"qkv_bias must be true or false"),
    (dict(depth=10**6, arch="vit_custom"), r"depth must be an integer in \[1, 128\]"),
    (dict(mlp_ratio="4"), r"mlp_ratio must be a number in \[0\.25, 16\]"),
    (dict(patch_size=12), r"patch_size must be one of \[8, 14, 16\]"),
])
def test_card_architecture_facts_are_checked(tmp_path, edit, message):
    enc = create_backbone("vit_test", img_size=64, patch_size=16)
    card = {**model_card(enc), **edit}
    save_backbone(tmp_path / "x", enc.state_dict(), {k: v for k, v in card.items() if v is not None})
    with pytest.raises(InputError, match=r"model_card\.json: " + message):
        load_backbone(tmp_path / "x")


@pytest.mark.parametrize("timm_name, facts", [
    ("vit_large_patch16_224", dict(embed_dim=1024, depth=24, num_heads=16, patch_size=16)),
    ("vit_huge_patch14_224", dict(embed_dim=1280, depth=32, num_heads=16, patch_size=14)),
])
def test_vit_large_and_huge_cards_build_timms_networks(timm_name, facts):
    """Built on the meta device (no memory): every tensor name and shape equals timm's model."""
    args = backbone_args({"arch": "vit_custom", "img_size": 224, **facts})
    with torch.device("meta"):
        ours = create_backbone(**args)
        theirs = timm.create_model(timm_name, pretrained=False, num_classes=0)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert backbone_config(ours)["timm_architecture"] == timm_name
    millions = sum(p.numel() for p in ours.parameters()) / 1e6
    expected = {"vit_large_patch16_224": 303.3, "vit_huge_patch14_224": 630.8}[timm_name]  # million, headless
    assert math.isclose(millions, expected, abs_tol=0.1)


# ---- hostile inputs: one line, nothing run, nothing written ------------------------------------------


class WritesAMarker:
    """Unpickling it runs a shell command that creates ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def hostile_sources(root: Path, refs_dir: Path) -> dict[str, tuple[str, Path, str]]:
    """name -> (source, input, expected message)"""
    out = {}
    (root / "evil").mkdir(parents=True)
    payload = WritesAMarker(str(root / "marker"))
    torch.save({"model": {"x": torch.zeros(1)}, "payload": payload}, root / "evil" / "m.pth")
    out["pickle_with_code"] = ("mae", root / "evil" / "m.pth", r"not a plain weights file .*refers to posix\.system")

    def copy(name: str, edit_config=None, edit_state=None) -> Path:
        folder = root / name
        folder.mkdir()
        config = json.loads((refs_dir / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(edit_config(config) if edit_config else config))
        state = load_file(str(refs_dir / "model.safetensors"))
        save_file(edit_state(state) if edit_state else state, str(folder / "model.safetensors"))
        return folder

    truncated = copy("truncated")
    (truncated / "model.safetensors").write_bytes((truncated / "model.safetensors").read_bytes()[:5000])
    out["truncated_safetensors"] = ("hf", truncated, r"model\.safetensors: not a valid safetensors file")
    out["swin"] = ("hf", copy("swin", lambda c: {**c, "model_type": "swin"}), r"model_type 'swin' is not supported")
    out["non_square_patch"] = ("hf", copy("patch", lambda c: {**c, "patch_size": [8, 4]}),
                               r"patch_size must be one positive integer \(square\)")
    out["other_activation"] = ("hf", copy("act", lambda c: {**c, "hidden_act": "gelu_new"}), r"hidden_act 'gelu_new'")
    out["wrong_shape"] = ("hf", copy("shape", lambda c: {**c, "intermediate_size": 96}),
                          r"do not fit a ViT with the sizes .*wrong shape \d+ \(blocks\.0\.mlp\.fc1\.bias")

    def without(s):
        s.pop("vit.layernorm.bias")
        return s

    out["missing_key"] = ("hf", copy("missing", edit_state=without), r"missing 1 \(norm\.bias\)")
    out["unexpected_key"] = ("hf", copy("extra", edit_state=lambda s: {**s, "vit.extra.weight": torch.zeros(2)}),
                             r"unexpected 1 tensor\(s\) .*\(vit\.extra\.weight\); .*drop=\[vit\.extra\]")
    out["nan"] = ("hf", copy("nan", edit_state=lambda s: {**s, "vit.layernorm.weight": torch.full((32,), math.nan)}),
                  r"tensor 'vit\.layernorm\.weight' holds NaN")
    out["decoder_positions_learned"] = ("hf", copy("pos", edit_state=lambda s: {
        **s, "decoder.decoder_pos_embed": s["decoder.decoder_pos_embed"] + 0.01}),
        r"decoder_pos_embed is not MAE's fixed sin-cos table")
    out["not_a_directory"] = ("hf", root / "evil" / "m.pth", r"not a directory; source=hf takes a transformers model")
    return out


def test_hostile_inputs_are_refused_in_one_line_and_run_nothing(refs, tmp_path, run_fahr):
    cases = hostile_sources(tmp_path / "src", refs["mae_pre"])
    for name, (source, path, message) in cases.items():
        out = tmp_path / "out" / name
        r = run_fahr("import-weights", f"source={source}", f"input={path}", f"output={out}", "mean=[0.5,0.5,0.5]",
                     "std=[0.5,0.5,0.5]")
        assert r.status == 2, (name, r)
        assert r.error_line.startswith("fahr import-weights: error: "), (name, r.err[-2000:])
        assert len([line for line in r.err.splitlines() if line.strip()]) == 1, (name, r.err[-2000:])
        assert re.search(message, r.error_line), (name, r.error_line)
        assert not (out / "model.safetensors").exists() and not (out / "model_card.json").exists(), name
    assert not (tmp_path / "src" / "marker").exists()  # the pickle's payload never ran


def test_command_line_import_then_finetune_age_runs(refs, tmp_path, run_fahr):
    """Done when: `fahr finetune-age backbone=<imported transformers ViTMAE>` runs (2 + 2 steps)."""
    out = tmp_path / "imported"
    r = run_fahr("import-weights", "source=hf", f"input={refs['mae_pre']}", f"output={out}")
    assert r.status == 0, r
    assert (out / "model.safetensors").is_file() and read_card(out)["task"] == "imported"
    r = run_fahr("finetune-age", "experiment=demo_faceage", f"backbone={out}", f"paths.root_dir={tmp_path}",
                 "data.generate.train=64", "data.generate.val=16", "data.generate.test=16", "data.batch_size=16",
                 "data.num_workers=0", "data.image_size=32", "task.stage1.max_steps=2", "task.stage2.max_steps=2",
                 "task.stage1.val_every_n_steps=2", "task.stage2.val_every_n_steps=2",
                 "trainer.enable_progress_bar=false")
    assert r.status == 0, r.err[-3000:]
    exports = list((tmp_path / "runs" / "demo_faceage").glob("*/export/model_card.json"))
    assert len(exports) == 1
    card = json.loads(exports[0].read_text())
    assert card["backbone"]["norm_eps"] == 1e-12 and card["init"]["backbone"] == str(out)
    assert card["normalization"]["mean"] == [0.5] * 3  # the import's normalisation, not the data config's


def test_pretraining_continues_from_an_imported_mae_encoder_and_decoder(refs, tmp_path, tiny_overrides):
    from conftest import compose_config
    from fahr.pipeline.pretrain import pretrain
    from fahr.tasks.pretrain import MAEPretrainTask

    import_weights("hf", refs["mae_pre"], tmp_path / "imported")
    cfg = compose_config("pretrain", [*tiny_overrides, f"task.init_from={tmp_path / 'imported'}", "model.img_size=32",
                                      "trainer.max_steps=2"])
    from fahr.pipeline.pretrain import adopt_init_from

    adopt_init_from(cfg)
    assert (cfg.model.arch, cfg.model.patch_size, cfg.model.norm_eps, cfg.task.decoder_pos_embed) == \
        ("vit_custom", PATCH, 1e-12, "mae")
    assert list(cfg.data.mean) == [0.5] * 3
    task = MAEPretrainTask(model=dict(cfg.model), task=dict(cfg.task), mean=list(cfg.data.mean), std=list(cfg.data.std))
    images, noise = inputs(refs)
    with torch.no_grad():
        loss = task.model.eval()(images, noise=noise)["loss"]
    assert abs(float(loss) - float(outputs(refs, "mae_pre")["loss"])) <= TOL * max(1.0, float(loss))

    # the command: 2 steps at the data's 112 px (position embeddings resampled), then `fahr export`
    from fahr.pipeline.export import export

    run = [*tiny_overrides, f"task.init_from={tmp_path / 'imported'}", "trainer.max_steps=2"]
    result = pretrain(compose_config("pretrain", run))
    assert result.global_step == 2 and math.isfinite(result.metrics["train/loss_epoch"])
    saved = (result.run_dir / "config.yaml").read_text()
    assert "arch: vit_custom" in saved and "norm_eps: 1.0e-12" in saved and "decoder_pos_embed: mae" in saved
    card = read_card(export(compose_config("export", run)))
    assert (card["arch"], card["norm_eps"], card["img_size"], card["global_step"]) == ("vit_custom", 1e-12, 112, 2)
