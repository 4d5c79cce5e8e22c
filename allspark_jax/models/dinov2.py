"""DINOv2 ViT encoder (facebookresearch's `DinoVisionTransformer`, as UniMatch V2 builds it), NHWC input.

Patch embedding (a 14x14 stride-14 convolution), a class token, learned position embeddings for a
stored `pos_grid` x `pos_grid` token grid (37 for DINOv2's 518 px pretraining crops) interpolated to
the input's grid, pre-norm blocks (LayerNorm eps 1e-6, multi-head attention with a fused qkv
projection, layer scale on both residual branches, an MLP with exact GELU or, for the giant size,
a SwiGLU feed-forward), a final LayerNorm. No register tokens and no stochastic depth (UniMatch V2
builds its encoders with neither).

The position embeddings are interpolated (bicubic, align_corners=False, no antialiasing) in one of
the two ways the checkpoints' own code does it (`DINOv2Config.pos_interpolation`):
  * 'dinov2' (facebookresearch's code, which UniMatch V2 runs): by scale factor
    ((h + 0.1) / side, (w + 0.1) / side), `interpolate_offset` = 0.1, so the output grid is
    floor(h + 0.1) = h but the sampling scale is side / (h + 0.1), not side / h;
  * 'transformers' (transformers' `Dinov2Model`): to the size (h, w), scale side / h.
Both keep the stored embeddings unchanged when the grid has `pos_grid`^2 tokens and the input is
square in pixels, as both codes do. The interpolation matrices are computed once per shape on the
host (`allspark_jax.models.resize`).

Padded batches (`DINOv2.__call__(..., valid_grid=)`): image b is the top-left valid_grid[b] tokens
of the padded (h, w) grid (its input cropped to patch * valid_grid[b] pixels); its position
embeddings are interpolated to its own grid (`interpolate_pos_embed_valid`) and the padded patch
tokens are no attention keys, so its true tokens equal those of the image alone, to float32
round-off. The grids are traced: one program serves every grid up to (h, w).

Parameter names follow facebookresearch's state dict (`patch_embed`, `blocks_{i}` for `blocks.{i}`,
`attn/qkv`, `ls1/gamma`, `mlp/fc1` or `mlp/w12`, `norm`); `allspark_jax.weights.dinov2` maps both
checkpoint layouts.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from allspark_jax.models.mit import (PatchConv, dense_init, grid_mask, masked_softmax_attention,
                                     softmax_attention)
from allspark_jax.models.resize import checked_sizes, resize_bicubic, resize_bicubic_valid

Dtype = Any

# Width, depth and heads of the published DINOv2 encoders (ViT-S/14, B/14, L/14, g/14); all share
# patch 14, mlp ratio 4, layer scale, qkv bias and 518 px (37 x 37 token) position embeddings; the
# giant uses the SwiGLU feed-forward.
DINOV2_PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "giant": dict(embed_dim=1536, depth=40, num_heads=24, ffn="swiglu"),
}
FFN_KINDS = ("mlp", "swiglu")
# The encoder's parameters that a segmentation forward never applies (no `masks` given): the mask
# token of DINOv2's masked-image modelling gets no gradient, so PyTorch's optimisers skip it (no
# weight decay either); `allspark_jax.optimizer` does the same.
NEVER_APPLIED = ("mask_token",)
POS_INTERPOLATIONS = ("dinov2", "transformers")


@dataclasses.dataclass(frozen=True)
class DINOv2Config:
    """Free-form DINOv2 architecture. `preset(name)` gives the published small / base / large /
    giant (as UniMatch V2's `DINOv2(model_name)` builds them)."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    # 'mlp': fc1 -> exact GELU -> fc2, hidden int(D * mlp_ratio); 'swiglu': w12 -> silu(x1) * x2
    # -> w3, hidden (int(2/3 * int(D * mlp_ratio)) + 7) // 8 * 8 (DINOv2's SwiGLUFFNFused).
    ffn: str = "mlp"
    patch_size: int = 14
    # Side of the stored position-embedding grid: pretraining size / patch (518 / 14 = 37).
    pos_grid: int = 37
    in_channels: int = 3
    qkv_bias: bool = True
    # Initial layer-scale value (DINOv2's init_values; UniMatch V2 and transformers use 1.0).
    layer_scale_init: float = 1.0
    norm_eps: float = 1e-6
    # How the position embeddings are interpolated to another grid (module docstring).
    pos_interpolation: str = "dinov2"
    # facebookresearch's interpolate_offset (0.1; 0.0 in its register models); 'dinov2' only.
    interpolate_offset: float = 0.1

    @classmethod
    def preset(cls, name: str, **overrides) -> "DINOv2Config":
        key = name.lower().removeprefix("dinov2_")
        if key not in DINOV2_PRESETS:
            raise ValueError(f"unknown DINOv2 size {name!r}; expected one of "
                             f"{sorted(DINOV2_PRESETS)}")
        return cls(**{**DINOV2_PRESETS[key], **overrides})

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"DINOv2 config: embed_dim {self.embed_dim} is not divisible by "
                             f"num_heads {self.num_heads}")
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"DINOv2 config: ffn {self.ffn!r}; expected one of {FFN_KINDS}")
        if self.pos_interpolation not in POS_INTERPOLATIONS:
            raise ValueError(f"DINOv2 config: pos_interpolation {self.pos_interpolation!r}; "
                             f"expected one of {POS_INTERPOLATIONS}")
        for field in ("depth", "patch_size", "pos_grid", "in_channels"):
            if getattr(self, field) < 1:
                raise ValueError(f"DINOv2 config: {field} must be >= 1, got {getattr(self, field)}")

    @property
    def ffn_hidden(self) -> int:
        hidden = int(self.embed_dim * self.mlp_ratio)
        return (int(hidden * 2 / 3) + 7) // 8 * 8 if self.ffn == "swiglu" else hidden


def token_grid(image_size: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Token grid (h, w) of an (H, W) input: floor(H / p), floor(W / p) (pixels past the last whole
    patch are not read, as by the stride-p convolution)."""
    return image_size[0] // patch_size, image_size[1] // patch_size


def interpolate_pos_embed(pos_embed: jax.Array, image_size: tuple[int, int],
                          config: DINOv2Config) -> jax.Array:
    """Stored (1, 1 + side^2, D) position embeddings -> (1, 1 + h * w, D) for an (H, W) input.

    The class token's embedding is kept; the patch embeddings are resized as the module docstring
    says (static shapes: one interpolation matrix per (side, h, w), built once).
    """
    h, w = token_grid(image_size, config.patch_size)
    n = pos_embed.shape[1] - 1
    if n == h * w and image_size[0] == image_size[1]:
        return pos_embed
    side, dim = config.pos_grid, pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, side, side, dim).astype(jnp.float32)
    if config.pos_interpolation == "dinov2":
        # The factors facebookresearch passes: (grid + offset) / sqrt(N), in Python floats.
        root = math.sqrt(n)
        factors = ((h + config.interpolate_offset) / root, (w + config.interpolate_offset) / root)
        patch = resize_bicubic(grid, (h, w), factors)
    else:
        patch = resize_bicubic(grid, (h, w))
    patch = patch.reshape(1, h * w, dim).astype(pos_embed.dtype)
    return jnp.concatenate([pos_embed[:, :1], patch], axis=1)


def interpolate_pos_embed_valid(pos_embed: jax.Array, grids: jax.Array, shape: tuple[int, int],
                                config: DINOv2Config) -> jax.Array:
    """`interpolate_pos_embed` per image of a padded batch, inside a program.

    Args:
      pos_embed: (1, 1 + side^2, D) the stored embeddings.
      grids: (B, 2) int traced true token grids (h_b, w_b), each <= shape.
      shape: (h, w) the static padded token grid.
    Returns:
      (B, 1 + h * w, D): the class token's embedding, then the padded (h, w) grid row-major whose
      top-left (h_b, w_b) part is `interpolate_pos_embed(pos_embed, (p h_b, p w_b), config)` of
      image b (float32 round-off apart), 0 elsewhere. As there, a (side, side) grid keeps the
      stored embeddings (its input, p * grid pixels, is square); any other grid is resampled.
    """
    side, dim = config.pos_grid, pos_embed.shape[-1]
    grids = jnp.asarray(grids).astype(jnp.int32)
    b, (h, w) = grids.shape[0], shape
    grid = pos_embed[:, 1:].reshape(1, side, side, dim).astype(jnp.float32)
    # 'dinov2': the factors (g + offset) / sqrt(N), sqrt(N) = side exactly (N = side^2).
    offset = config.interpolate_offset if config.pos_interpolation == "dinov2" else None
    patch = resize_bicubic_valid(grid, (h, w), grids, offset)
    if h >= side and w >= side:
        stored = jnp.all(grids == side, axis=1)[:, None, None, None]
        kept = jnp.pad(grid, ((0, 0), (0, h - side), (0, w - side), (0, 0)))
        patch = jnp.where(stored, kept, patch)
    patch = patch.reshape(b, h * w, dim).astype(pos_embed.dtype)
    return jnp.concatenate([jnp.broadcast_to(pos_embed[:, :1], (b, 1, dim)), patch], axis=1)


class LayerScale(nn.Module):
    """x * gamma, gamma (D,) initialised to `init`."""

    init: float

    @nn.compact
    def __call__(self, x):
        gamma = self.param("gamma", nn.initializers.constant(self.init), (x.shape[-1],))
        return x * gamma.astype(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection. (B, N, D) -> (B, N, D).

    `key_mask` (B, N) bool or None: tokens where it is False are no keys (padded tokens).

    The qkv kernel's output columns are [q | k | v], each head-major (head h: columns h * d ..
    (h + 1) * d of its block), as DINOv2's reshape(B, N, 3, heads, d) reads them.
    """

    num_heads: int
    qkv_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask=None):
        b, n, c = x.shape
        hd = c // self.num_heads
        qkv = nn.Dense(3 * c, use_bias=self.qkv_bias, kernel_init=dense_init, dtype=self.dtype,
                       name="qkv")(x).reshape(b, n, 3, self.num_heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = (softmax_attention(q, k, v) if key_mask is None
               else masked_softmax_attention(q, k, v, key_mask)).reshape(b, n, c)
        return nn.Dense(c, kernel_init=dense_init, dtype=self.dtype, name="proj")(out)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2. (B, N, D) -> (B, N, D)."""

    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = nn.Dense(self.hidden, kernel_init=dense_init, dtype=self.dtype, name="fc1")(x)
        y = nn.gelu(y, approximate=False)
        return nn.Dense(x.shape[-1], kernel_init=dense_init, dtype=self.dtype, name="fc2")(y)


class SwiGLU(nn.Module):
    """w12 -> silu(first half) * second half -> w3. (B, N, D) -> (B, N, D).

    w12's output columns are [gate | value] (DINOv2's `chunk(2)`; transformers' `weights_in`).
    """

    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = nn.Dense(2 * self.hidden, kernel_init=dense_init, dtype=self.dtype, name="w12")(x)
        y = nn.silu(y[..., :self.hidden]) * y[..., self.hidden:]
        return nn.Dense(x.shape[-1], kernel_init=dense_init, dtype=self.dtype, name="w3")(y)


class Block(nn.Module):
    """x + ls1(attn(norm1(x))), then + ls2(ffn(norm2(x))). (B, N, D) -> (B, N, D).
    `key_mask`: the attention's (`Attention`)."""

    config: DINOv2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask=None):
        cfg = self.config
        norm = lambda name: nn.LayerNorm(epsilon=cfg.norm_eps, dtype=self.dtype, name=name)  # noqa: E731
        y = Attention(cfg.num_heads, cfg.qkv_bias, self.dtype, name="attn")(norm("norm1")(x),
                                                                            key_mask)
        x = x + LayerScale(cfg.layer_scale_init, name="ls1")(y)
        ffn = (SwiGLU if cfg.ffn == "swiglu" else Mlp)(cfg.ffn_hidden, self.dtype, name="mlp")
        return x + LayerScale(cfg.layer_scale_init, name="ls2")(ffn(norm("norm2")(x)))


class DINOv2(nn.Module):
    """DINOv2 encoder. (B, H, W, C) -> the tokens after the requested blocks.

    `__call__(x, layers, norm=True, masks=None)`:
      x: (B, H, W, in_channels) images; the token grid is (h, w) = floor((H, W) / patch).
      layers: indices of the blocks (0 .. depth - 1) whose outputs are returned, in increasing
        order (UniMatch V2's DPT reads (2, 5, 8, 11) of small / base, (4, 11, 17, 23) of large,
        (9, 19, 29, 39) of giant); None: the last block.
      norm: apply the final LayerNorm to each returned output (`get_intermediate_layers`'
        norm=True, as UniMatch V2 reads them; transformers' `last_hidden_state` is the normed last
        block, its `hidden_states` the un-normed outputs).
      masks: (B, h, w) bool or None: patch embeddings where True are replaced by the learned
        mask token before the class token and position embeddings are added (DINOv2's
        masked-image modelling; transformers' `bool_masked_pos`).
      valid_grid: (B, 2) int or None: x is a padded batch and image b's true token grid is the
        top-left valid_grid[b] = (h_b, w_b) <= (h, w) (traced; an image of 0 tokens is an empty
        filler slot). Its position embeddings are interpolated to (h_b, w_b), and the other patch
        tokens are no attention keys (the class token always is one), so its true tokens equal
        those of `x[b:b+1, :p h_b, :p w_b]` alone. Returned patch tokens outside each true grid
        are 0.
    Returns a tuple of (B, 1 + h * w, D) arrays, one per layer: the class token first, then the
    patch tokens in row-major (h, w) order (`patch_map` makes them (B, h, w, D) maps).
    """

    config: DINOv2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, layers: Sequence[int] | None = None, norm: bool = True,
                 masks=None, valid_grid=None) -> tuple[jax.Array, ...]:
        cfg = self.config
        layers = (cfg.depth - 1,) if layers is None else tuple(int(i) for i in layers)
        if (not layers or list(layers) != sorted(set(layers))
                or not 0 <= layers[0] <= layers[-1] < cfg.depth):
            raise ValueError(f"DINOv2: layers {layers} must be increasing block indices in "
                             f"[0, {cfg.depth - 1}]")
        if x.shape[-1] != cfg.in_channels:
            raise ValueError(f"DINOv2: input has {x.shape[-1]} channels, the config "
                             f"{cfg.in_channels}")
        b, dim = x.shape[0], cfg.embed_dim
        h, w = token_grid(x.shape[1:3], cfg.patch_size)
        if h < 1 or w < 1:
            raise ValueError(f"DINOv2: input {x.shape[1:3]} is smaller than one "
                             f"{cfg.patch_size}-px patch")
        tokens = PatchConv(dim, cfg.patch_size, self.dtype, name="patch_embed")(x)
        tokens = tokens.reshape(b, h * w, dim)
        mask_token = self.param("mask_token", nn.initializers.zeros, (1, dim))
        if masks is not None:
            tokens = jnp.where(masks.reshape(b, h * w, 1), mask_token.astype(tokens.dtype), tokens)
        cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, dim))
        pos_embed = self.param("pos_embed", nn.initializers.truncated_normal(0.02),
                               (1, cfg.pos_grid ** 2 + 1, dim))
        tokens = jnp.concatenate(
            [jnp.broadcast_to(cls_token.astype(tokens.dtype), (b, 1, dim)), tokens], axis=1)
        if valid_grid is None:
            pos, key_mask = interpolate_pos_embed(pos_embed, x.shape[1:3], cfg), None
        else:
            valid_grid = checked_sizes(valid_grid, b, "DINOv2: valid_grid")
            pos = interpolate_pos_embed_valid(pos_embed, valid_grid, (h, w), cfg)
            key_mask = jnp.concatenate([jnp.ones((b, 1), bool),
                                        grid_mask(valid_grid, (h, w)).reshape(b, h * w)], axis=1)
        tokens = tokens + pos.astype(tokens.dtype)
        outs = []
        for i in range(cfg.depth):
            tokens = Block(cfg, self.dtype, name=f"blocks_{i}")(tokens, key_mask)
            if i in layers:
                outs.append(tokens)
        # The final norm's parameters exist whatever `norm` is (they are in every checkpoint).
        if norm or self.is_initializing():
            final = nn.LayerNorm(epsilon=cfg.norm_eps, dtype=self.dtype, name="norm")
            normed = [final(t) for t in outs]
            outs = normed if norm else outs
        if key_mask is not None:
            outs = [jnp.where(key_mask[..., None], t, 0) for t in outs]
        return tuple(outs)


def patch_map(tokens: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """(B, 1 + h * w, D) tokens -> (B, h, w, D) map of the patch tokens (class token dropped)."""
    return tokens[:, 1:].reshape(tokens.shape[0], grid[0], grid[1], tokens.shape[-1])
