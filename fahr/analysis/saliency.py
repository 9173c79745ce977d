"""Attribution maps of a :class:`~fahr.models.face_model.FaceModel` on aligned crops.

- **Attention rollout** (Abnar & Zuidema, ACL 2020): each block's attention probabilities, averaged
  over heads, with the residual connection added as identity (``0.5 A + 0.5 I``), multiplied through
  the blocks; the class token's row (or, for ``global_pool="avg"``, the mean of the patch rows) over
  the patch tokens is the map. It follows the backbone's attention only, so it is the same for every
  head on one backbone.
- **Integrated gradients** (Sundararajan et al., ICML 2017), from captum: the path integral of the
  gradient of one head's output (FaceAge in years, or risk) from a baseline image to the photo,
  summed over colour channels.
- **Randomisation sanity check** (Adebayo et al., NeurIPS 2018): the same maps from a copy of the
  model with every weight re-initialised; a method whose maps barely change is not explaining the
  trained model.

Every map is (N, S, S) float64 over the crop's pixels, non-negative (|attribution|), S the crop side.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

#: the methods :func:`attribution_maps` knows
METHODS = ("rollout", "integrated_gradients")


# ---------------------------------------------------------------- attention rollout


@contextmanager
def recorded_attention(backbone: nn.Module):
    """Record each block's attention probabilities (B, heads, T, T) during forward passes of a timm
    ``VisionTransformer``: the fused kernel (which never forms them) is switched off and the
    probabilities are read where timm applies attention dropout to them (an identity in eval mode).
    Yields the list the probabilities are appended to, one entry per block per pass."""
    recorded: list[torch.Tensor] = []
    handles, fused = [], []
    for block in backbone.blocks:
        attn = block.attn
        fused.append(attn.fused_attn)
        attn.fused_attn = False
        handles.append(attn.attn_drop.register_forward_hook(lambda _m, _i, out: recorded.append(out.detach())))
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()
        for block, was in zip(backbone.blocks, fused):
            block.attn.fused_attn = was


def rollout(attentions: list[torch.Tensor], residual: float = 0.5) -> torch.Tensor:
    """Attention rollout: (B, heads, T, T) per block, first block first -> (B, T, T), row i = how
    much token i's final representation draws on each input token.

    Per block: ``A = residual * I + (1 - residual) * mean_heads(attention)`` (rows still sum to 1),
    then ``R = A_L @ ... @ A_1``."""
    result = None
    for probs in attentions:
        a = probs.float().mean(dim=1)
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = residual * eye + (1 - residual) * a
        result = a if result is None else a @ result
    if result is None:
        raise ValueError("no attention maps: the backbone has no blocks")
    return result


def _patch_map(model, x: torch.Tensor) -> torch.Tensor:
    """Rollout over the patch grid for normalised images x (B, 3, s, s) -> (B, gh, gw)."""
    backbone = model.backbone
    with recorded_attention(backbone) as recorded, torch.no_grad():
        backbone.forward_features(x)
    r = rollout(recorded)
    prefix = getattr(backbone, "num_prefix_tokens", 1)
    if backbone.global_pool == "avg":
        weights = r[:, prefix:, prefix:].mean(dim=1)
    else:
        weights = r[:, 0, prefix:]
    gh, gw = backbone.patch_embed.grid_size
    return weights.reshape(len(x), gh, gw)


def rollout_maps(model, crops: torch.Tensor) -> torch.Tensor:
    """uint8 crops (B, 3, S, S) -> rollout maps (B, S, S), each patch's weight spread over its pixels
    (then resized to S when the model's input side differs). Mirror-averaged when the model is."""
    x = model.normalize(_model_size(model, crops))
    grid = _patch_map(model, x)
    if model.flip_average:
        grid = (grid + _patch_map(model, x.flip(-1)).flip(-1)) / 2
    size = int(model.backbone.patch_embed.img_size[0])
    gh = grid.shape[-2]
    full = grid.repeat_interleave(size // gh, dim=-2).repeat_interleave(size // grid.shape[-1], dim=-1)
    return _crop_size(full, crops.shape[-1])


# ---------------------------------------------------------------- integrated gradients


class HeadOutput(nn.Module):
    """``float images (B, 3, s, s) in pixel units [0, 255] -> (B,)`` one head's output of a
    FaceModel (``"age"`` years or ``"risk"`` log-hazard), normalised exactly as
    :meth:`FaceModel.features` does, so gradients flow to the pixels."""

    def __init__(self, model, head: str) -> None:
        super().__init__()
        self.model, self.head = model, head

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = (pixels / 255.0 - m.mean) / m.std
        embed = lambda v: m.backbone.forward_head(m.backbone.forward_features(v), pre_logits=True)  # noqa: E731
        feats = (embed(x) + embed(x.flip(-1))) / 2 if m.flip_average and not m.training else embed(x)
        return m.heads[self.head](feats)[self.head]


def integrated_gradients_maps(model, crops: torch.Tensor, head: str, steps: int = 32, baseline: str = "mean",
                              batch_size: int = 16) -> tuple[torch.Tensor, float]:
    """uint8 crops (B, 3, S, S) -> (|IG summed over channels| (B, S, S), mean relative completeness
    error). The error is |sum of attributions - (f(x) - f(baseline))| / |f(x) - f(baseline)|
    averaged over photos (Riemann-trapezoid approximation; more ``steps`` lower it).

    ``baseline``: ``"mean"`` (every pixel at the normalisation mean: a featureless grey image) or
    ``"black"``."""
    try:
        from captum.attr import IntegratedGradients
    except ImportError:
        from fahr.boundary import InputError

        raise InputError("integrated gradients need captum: pip install 'fahr[analysis]' "
                         "(or methods=[rollout])") from None
    forward = HeadOutput(model, head)
    pixels = _model_size(model, crops).float()
    if baseline == "mean":
        base = (model.mean * 255.0).expand_as(pixels).contiguous()
    elif baseline == "black":
        base = torch.zeros_like(pixels)
    else:
        raise ValueError(f"baseline must be 'mean' or 'black', got {baseline!r}")
    ig = IntegratedGradients(forward)
    maps, errors = [], []
    for i in range(0, len(pixels), batch_size):
        x, b = pixels[i : i + batch_size], base[i : i + batch_size]
        attr, delta = ig.attribute(x, baselines=b, n_steps=steps, method="riemann_trapezoid",
                                   internal_batch_size=batch_size * 4, return_convergence_delta=True)
        with torch.no_grad():
            span = (forward(x) - forward(b)).abs().clamp_min(1e-12)
        errors.append((delta.abs() / span).detach())
        maps.append(attr.sum(dim=1).abs().detach())
    return _crop_size(torch.cat(maps), crops.shape[-1]), float(torch.cat(errors).mean())


# ---------------------------------------------------------------- helpers


def _model_size(model, crops: torch.Tensor) -> torch.Tensor:
    """Crops resized to the backbone's input side as ``fahr predict`` does (bilinear, antialiased)."""
    from torchvision.transforms.v2 import functional as tvf

    size = int(model.backbone.patch_embed.img_size[0])
    if crops.shape[-1] != size or crops.shape[-2] != size:
        crops = tvf.resize(crops, [size, size], antialias=True)
    return crops


def _crop_size(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(B, s, s) maps -> (B, size, size) (bilinear when s differs)."""
    if maps.shape[-1] == size:
        return maps
    return torch.nn.functional.interpolate(maps[:, None], size=(size, size), mode="bilinear",
                                           align_corners=False)[:, 0]


def attribution_maps(model, crops: np.ndarray, method: str, head: str, *, steps: int = 32, baseline: str = "mean",
                     batch_size: int = 16) -> tuple[np.ndarray, float | None]:
    """(N, S, S, 3) uint8 crops -> ((N, S, S) non-negative maps, IG completeness error or None)."""
    x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).contiguous()
    model = model.eval()
    if method == "rollout":
        maps = torch.cat([rollout_maps(model, x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
        return maps.double().numpy(), None
    if method == "integrated_gradients":
        maps, error = integrated_gradients_maps(model, x, head, steps=steps, baseline=baseline, batch_size=batch_size)
        return maps.double().numpy(), error
    raise ValueError(f"unknown method {method!r}; known: {METHODS}")


def randomized_copy(model, seed: int = 0):
    """A deep copy of ``model`` with every weight re-initialised (seeded): each module's own
    ``reset_parameters`` (linear, conv, layer norm), and timm's position embedding and class token
    drawn from N(0, 0.02^2) as timm initialises them. The original is untouched."""
    clone = copy.deepcopy(model)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for module in clone.modules():
            if hasattr(module, "reset_parameters") and module is not clone:
                module.reset_parameters()
        backbone = clone.backbone
        with torch.no_grad():
            for name in ("pos_embed", "cls_token"):
                if getattr(backbone, name, None) is not None:
                    getattr(backbone, name).normal_(0.0, 0.02)
    finally:
        torch.random.set_rng_state(generator_state)
    return clone.eval()


def normalised(maps: np.ndarray) -> np.ndarray:
    """Each (S, S) map divided by its sum (an all-zero map stays zero), so photos weigh equally."""
    total = maps.sum(axis=(-2, -1), keepdims=True)
    return np.divide(maps, total, out=np.zeros_like(maps), where=total > 0)


def rank_data(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n along the last axis, ties given their average rank (as ``scipy.stats.rankdata``)."""
    values = np.asarray(values, dtype=np.float64)
    flat = values.reshape(-1, values.shape[-1])
    out = np.empty_like(flat)
    for row, v in zip(out, flat):
        _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
        last = np.cumsum(counts)  # rank of the last member of each group of ties
        row[:] = (last - (counts - 1) / 2.0)[inverse]
    return out.reshape(values.shape)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two equally long vectors (NaN when either is constant)."""
    ra, rb = rank_data(np.ravel(a)), rank_data(np.ravel(b))
    if len(ra) != len(rb):
        raise ValueError(f"need equally long vectors, got {len(ra)} and {len(rb)}")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(np.sqrt((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")
