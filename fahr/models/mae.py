"""Masked autoencoder (MAE) around a timm ViT encoder.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 (arXiv:2111.06377).
As in the paper: per-sample random masking (default ratio 0.75), the encoder runs on the visible
patches only (plus the class token), a small transformer decoder fills in mask tokens, and the loss
is the mean squared error on per-patch normalised pixels of the masked patches only.
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from fahr.boundary import InputError

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, patch_size**2 * C), patches in row-major order, pixels (p, q, c)."""
    b, c, h, w = images.shape
    gh, gw = h // patch_size, w // patch_size
    x = images.reshape(b, c, gh, patch_size, gw, patch_size)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(b, gh * gw, patch_size * patch_size * c)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify` for square images: (B, N, p*p*C) -> (B, C, H, W)."""
    b, n, _ = patches.shape
    g = int(round(n**0.5))
    if g * g != n:
        raise ValueError(f"unpatchify expects a square grid, got {n} patches")
    x = patches.reshape(b, g, g, patch_size, patch_size, channels)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(b, channels, g * patch_size, g * patch_size)


def random_masking(
    num_patches: int, batch_size: int, mask_ratio: float, device: torch.device,
    generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw an independent random mask per sample.

    ``noise`` (B, N) float: the per-patch scores to sort instead of uniform random ones (the patches
    with the lowest scores stay visible), for a fixed mask as transformers' ViTMAE ``noise=`` takes.

    Returns:
        ids_keep: (B, K) int64 indices of visible patches, K = round(N * (1 - mask_ratio)), K >= 1.
        mask: (B, N) float, 1 = masked (to reconstruct), 0 = visible, in the original patch order.
        ids_restore: (B, N) int64; gathering [visible; mask tokens] with it restores patch order.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    len_keep = max(1, int(round(num_patches * (1.0 - mask_ratio))))
    if noise is None:
        noise = torch.rand(batch_size, num_patches, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(batch_size, num_patches, device=device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, mask, ids_restore


#: fixed sin-cos layouts of the decoder's position table: timm's ``build_sincos2d_pos_embed`` (fahr's
#: own decoders) and the one of facebookresearch/mae (``get_2d_sincos_pos_embed``; transformers' ViTMAE)
DECODER_POS_EMBEDS = ("timm", "mae")


def mae_sincos_pos_embed(grid: int, dim: int) -> torch.Tensor:
    """The 2D sin-cos position table of facebookresearch/mae (``util/pos_embed.py``), (grid * grid, dim).

    Per patch (row-major), ``[sin(x w) | cos(x w) | sin(y w) | cos(y w)]`` with x the column, y the row
    and ``w = 10000 ** (-k / (dim / 4))``, k = 0 .. dim/4 - 1; computed in float64 as the original
    (NumPy) and returned as float32. MAE names the column half ``emb_h``; transformers keeps that order.
    """
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    x = cols.flatten().outer(omega)
    y = rows.flatten().outer(omega)
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1).float()


class MAEDecoder(nn.Module):
    """Small transformer decoder: visible encoder tokens + mask tokens -> pixels per patch.

    Input (B, 1 + K, D_enc) encoder tokens (class token first); output (B, N, p*p*3).

    ``norm_eps``: epsilon of every LayerNorm; None keeps what fahr's decoders always had (timm's 1e-6
    in the blocks, torch's 1e-5 in the final norm). ``pos_embed``: which fixed sin-cos table
    (:data:`DECODER_POS_EMBEDS`); it is computed, never stored, so it is the same on every rebuild.
    """

    def __init__(
        self, num_patches: int, grid_size: tuple[int, int], encoder_dim: int, patch_size: int,
        dim: int = 128, depth: int = 2, num_heads: int = 4, mlp_ratio: float = 4.0,
        norm_eps: float | None = None, qkv_bias: bool = True, pos_embed: str = "timm",
    ) -> None:
        super().__init__()
        if dim % 4:
            raise ValueError(f"decoder dim must be divisible by 4 (sin-cos position embedding), got {dim}")
        if pos_embed not in DECODER_POS_EMBEDS:
            raise ValueError(f"decoder pos_embed must be one of {DECODER_POS_EMBEDS}, got {pos_embed!r}")
        self.num_patches = num_patches
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        if pos_embed == "mae":
            pos = mae_sincos_pos_embed(grid_size[0], dim)
        else:
            from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

            pos = build_sincos2d_pos_embed(list(grid_size), dim=dim)
        # Fixed sin-cos positions (class token slot = 0), as in MAE; a buffer, not trained.
        self.register_buffer("pos_embed", torch.cat([torch.zeros(1, dim), pos]).unsqueeze(0), persistent=False)
        from timm.layers import LayerNorm
        from timm.models.vision_transformer import Block

        block_norm = LayerNorm if norm_eps is None else partial(LayerNorm, eps=norm_eps)
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, norm_layer=block_norm)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim) if norm_eps is None else nn.LayerNorm(dim, eps=norm_eps)
        self.pred = nn.Linear(dim, patch_size * patch_size * 3)
        self.config = {"dim": dim, "depth": depth, "num_heads": num_heads, "mlp_ratio": float(mlp_ratio),
                       "norm_eps": norm_eps, "qkv_bias": qkv_bias, "pos_embed": pos_embed}
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        b, n = ids_restore.shape
        visible = x[:, 1:]
        mask_tokens = self.mask_token.expand(b, n - visible.shape[1], -1)
        x_ = torch.cat([visible, mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], x_], dim=1) + self.pos_embed.to(x.dtype)
        x = self.norm(self.blocks(x))
        return self.pred(x[:, 1:])


#: bounds of a decoder's facts in a model card (name -> (type, low, high))
DECODER_BOUNDS: dict[str, tuple[type, float, float]] = {
    "dim": (int, 8, 4096), "depth": (int, 1, 48), "num_heads": (int, 1, 64), "mlp_ratio": (float, 0.25, 16.0),
}


def decoder_args(facts: Any, where: str = "") -> dict[str, Any]:
    """A model card's ``decoder`` section -> checked :class:`MaskedAutoencoder` decoder arguments
    (``decoder_dim``, ``decoder_depth``, ``decoder_heads``, ``decoder_mlp_ratio``, ``decoder_norm_eps``,
    ``decoder_qkv_bias``, ``decoder_pos_embed``).

    Raises:
        InputError: ``<where><key> must be <expected>`` for a missing, mistyped or out-of-range fact.
    """
    if not isinstance(facts, Mapping):
        raise InputError(f"{where.rstrip('.')} must be an object (dim, depth, num_heads, ...)")
    args: dict[str, Any] = {}
    for key, (kind, low, high) in DECODER_BOUNDS.items():
        value = facts.get(key)
        ok = isinstance(value, int) if kind is int else isinstance(value, (int, float)) and math.isfinite(value)
        if isinstance(value, bool) or not ok or not low <= value <= high:
            kind_name = "an integer" if kind is int else "a number"
            raise InputError(f"{where}{key} must be {kind_name} in [{low:g}, {high:g}]")
        args[key] = kind(value)
    if args["dim"] % 4 or args["dim"] % args["num_heads"]:
        raise InputError(f"{where}dim must be divisible by 4 and by num_heads")
    eps = facts.get("norm_eps")
    if eps is not None and not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and 1e-12 <= eps <= 1e-2):
        raise InputError(f"{where}norm_eps must be null or a number in [1e-12, 0.01]")
    if not isinstance(facts.get("qkv_bias", True), bool):
        raise InputError(f"{where}qkv_bias must be true or false")
    if facts.get("pos_embed", "timm") not in DECODER_POS_EMBEDS:
        raise InputError(f"{where}pos_embed must be one of {list(DECODER_POS_EMBEDS)}")
    return {"decoder_dim": args["dim"], "decoder_depth": args["depth"], "decoder_heads": args["num_heads"],
            "decoder_mlp_ratio": args["mlp_ratio"], "decoder_norm_eps": None if eps is None else float(eps),
            "decoder_qkv_bias": facts.get("qkv_bias", True), "decoder_pos_embed": facts.get("pos_embed", "timm")}


class MaskedAutoencoder(nn.Module):
    """MAE with a timm ViT encoder (from :func:`fahr.models.backbone.create_backbone`).

    ``forward(images)`` takes normalised float images (B, 3, H, W) and returns a dict:
    ``loss`` (scalar), ``pred`` (B, N, p*p*3) in the target space, ``mask`` (B, N), ``target``.
    """

    def __init__(
        self, encoder: VisionTransformer, mask_ratio: float = 0.75, decoder_dim: int = 128,
        decoder_depth: int = 2, decoder_heads: int = 4, norm_pix_loss: bool = True,
        decoder_mlp_ratio: float = 4.0, decoder_norm_eps: float | None = None, decoder_qkv_bias: bool = True,
        decoder_pos_embed: str = "timm",
    ) -> None:
        super().__init__()
        if getattr(encoder, "num_reg_tokens", 0) or not getattr(encoder, "has_class_token", True):
            raise ValueError("MAE expects a ViT with one class token and no register tokens")
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = int(encoder.patch_embed.patch_size[0])
        grid = tuple(encoder.patch_embed.grid_size)
        self.decoder = MAEDecoder(
            num_patches=grid[0] * grid[1], grid_size=grid, encoder_dim=encoder.embed_dim,
            patch_size=self.patch_size, dim=decoder_dim, depth=decoder_depth, num_heads=decoder_heads,
            mlp_ratio=decoder_mlp_ratio, norm_eps=decoder_norm_eps, qkv_bias=decoder_qkv_bias,
            pos_embed=decoder_pos_embed,
        )

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | {"decoder.mask_token"}

    def encode_visible(self, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Encoder on visible patches only: (B, 3, H, W), (B, K) -> (B, 1 + K, D)."""
        enc = self.encoder
        x = enc.patch_embed(images) + enc.pos_embed[:, 1:]
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = enc.pos_drop(torch.cat([cls, x], dim=1))
        x = enc.norm_pre(x)
        if enc.grad_checkpointing and self.training:
            from timm.models._manipulate import checkpoint_seq

            x = checkpoint_seq(enc.blocks, x)
        else:
            x = enc.blocks(x)
        return enc.norm(x)

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """Per-patch pixel targets (B, N, p*p*3), normalised per patch when ``norm_pix_loss``."""
        target = patchify(images, self.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``noise`` (B, N): a fixed mask, as :func:`random_masking` takes it (None: a random one)."""
        b = images.shape[0]
        n = self.decoder.num_patches
        ids_keep, mask, ids_restore = random_masking(n, b, self.mask_ratio, images.device, generator, noise)
        tokens = self.encode_visible(images, ids_keep)
        pred = self.decoder(tokens, ids_restore)
        target = self.target(images)
        per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # (B, N)
        loss = (per_patch * mask).sum() / mask.sum()
        return {"loss": loss, "pred": pred, "mask": mask, "target": target}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Images (B, 3, H, W) in the input space: visible patches as given, masked ones predicted.

        With ``norm_pix_loss`` the prediction is de-normalised with the true patch mean/std, as in
        the MAE paper's figures.
        """
        patches = patchify(images, self.patch_size)
        pred = out["pred"].float()
        if self.norm_pix_loss:
            mean = patches.mean(dim=-1, keepdim=True)
            std = (patches.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
            pred = pred * std + mean
        m = out["mask"].unsqueeze(-1)
        return unpatchify(patches * (1 - m) + pred * m, self.patch_size)

