"""MAE (He et al. 2022): masking, encoder on visible patches only, loss on masked patches only."""

import pytest
import torch

from fahr.models import MaskedAutoencoder, create_backbone, patchify, random_masking, unpatchify


@pytest.fixture
def mae():
    torch.manual_seed(0)
    return MaskedAutoencoder(create_backbone("vit_test", img_size=112, patch_size=16), mask_ratio=0.75).eval()


def test_patchify_roundtrip_and_layout():
    x = torch.randn(2, 3, 112, 112)
    p = patchify(x, 16)
    assert p.shape == (2, 49, 16 * 16 * 3)
    # patch 1 is the second patch of the first row; pixel (0, 0) channel 0 comes first
    assert p[0, 1, 0] == x[0, 0, 0, 16]
    assert torch.equal(unpatchify(p, 16), x)


@pytest.mark.parametrize("ratio, visible", [(0.75, 12), (0.5, 24), (0.0, 49), (0.9, 5)])
def test_visible_count(ratio, visible):
    ids_keep, mask, ids_restore = random_masking(49, 4, ratio, torch.device("cpu"))
    assert ids_keep.shape == (4, visible)
    assert (mask.sum(1) == 49 - visible).all()
    # the kept patches are exactly the unmasked ones
    for b in range(4):
        assert set(ids_keep[b].tolist()) == set((mask[b] == 0).nonzero().flatten().tolist())


def test_masks_differ_per_sample():
    _, mask, _ = random_masking(49, 8, 0.75, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert len({tuple(m.tolist()) for m in mask}) == 8


def test_unshuffling_restores_order():
    g = torch.Generator().manual_seed(1)
    ids_keep, mask, ids_restore = random_masking(49, 3, 0.75, torch.device("cpu"), g)
    tokens = torch.arange(49).float().view(1, 49, 1).expand(3, -1, -1)
    visible = torch.gather(tokens, 1, ids_keep.unsqueeze(-1))
    # the decoder lays out [visible; mask tokens] in shuffle order, then gathers with ids_restore
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    shuffled = torch.gather(tokens, 1, ids_shuffle.unsqueeze(-1))
    assert torch.equal(shuffled[:, :12], visible)
    restored = torch.gather(shuffled, 1, ids_restore.unsqueeze(-1))
    assert torch.equal(restored, tokens)


def test_encoder_sees_only_visible_patches(mae):
    seen = []
    mae.encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    mae(torch.randn(2, 3, 112, 112))
    assert seen == [torch.Size([2, 1 + 12, 64])]  # class token + 25% of 49 patches


def test_loss_only_on_masked_patches(mae):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 112, 112)
    out = mae(x, generator=torch.Generator().manual_seed(3))
    pred = out["pred"].detach().requires_grad_(True)
    per_patch = ((pred - out["target"]) ** 2).mean(-1)
    loss = (per_patch * out["mask"]).sum() / out["mask"].sum()
    assert loss.item() == pytest.approx(out["loss"].item(), rel=1e-5)
    loss.backward()
    grad_per_patch = pred.grad.abs().sum(-1)
    assert (grad_per_patch[out["mask"] == 0] == 0).all()
    assert (grad_per_patch[out["mask"] == 1] > 0).all()


def test_norm_pix_target_is_per_patch_normalised(mae):
    t = mae.target(torch.rand(2, 3, 112, 112))
    assert torch.allclose(t.mean(-1), torch.zeros(2, 49), atol=1e-5)
    assert torch.allclose(t.var(-1), torch.ones(2, 49), atol=1e-3)


def test_reconstruction_keeps_visible_pixels(mae):
    x = torch.randn(2, 3, 112, 112)
    out = mae(x)
    recon = mae.reconstruct(x, out)
    vis = (1 - out["mask"]).bool()
    assert torch.allclose(patchify(recon, 16)[vis], patchify(x, 16)[vis], atol=1e-5)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    """Recomputing the blocks in backward (with drop path active, so the RNG replay matters) changes
    neither the loss nor any gradient, and really recomputes (each block runs twice per step)."""
    torch.manual_seed(0)
    a = MaskedAutoencoder(create_backbone("vit_test", drop_path_rate=0.2))
    b = MaskedAutoencoder(create_backbone("vit_test", drop_path_rate=0.2, grad_checkpointing=True))
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 112, 112)
    calls = {"a": 0, "b": 0}
    a.encoder.blocks[0].register_forward_pre_hook(lambda *_: calls.__setitem__("a", calls["a"] + 1))
    b.encoder.blocks[0].register_forward_pre_hook(lambda *_: calls.__setitem__("b", calls["b"] + 1))
    losses = {}
    for name, model in (("a", a), ("b", b)):
        model.train()
        torch.manual_seed(1)  # the same drop-path draws in both models
        losses[name] = model(x, generator=torch.Generator().manual_seed(0))["loss"]
        losses[name].backward()
    assert calls == {"a": 1, "b": 2}
    assert losses["a"].item() == pytest.approx(losses["b"].item(), rel=1e-6)
    grads_b = dict(b.named_parameters())
    checked = 0
    for name, p in a.named_parameters():
        if p.grad is None:
            assert grads_b[name].grad is None, name
            continue
        torch.testing.assert_close(grads_b[name].grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
        checked += 1
    assert checked > 10 and a.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("patch", [8, 16])
def test_backbone_interface(patch):
    m = create_backbone("vit_test", img_size=112, patch_size=patch)
    x = torch.randn(2, 3, 112, 112)
    n = (112 // patch) ** 2
    assert m.forward_features(x).shape == (2, 1 + n, 64)
    assert m(x).shape == (2, 64)  # pre-logits
    assert {"pos_embed", "cls_token"} <= set(m.no_weight_decay())


def test_backbone_rejects_bad_args():
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("vit_huge")
    with pytest.raises(ValueError, match="patch_size"):
        create_backbone("vit_test", patch_size=12)  # 8, 14 (ViT-H/14) and 16 are supported
