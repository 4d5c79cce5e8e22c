"""Mix Transformer (MiT) encoder of SegFormer, NHWC.

Module and parameter names mirror the PyTorch release (`patch_embed1`, `block1_0`, `attn.q`, ...) so
that `allspark_jax.weights.release` maps state dicts by name alone (`block1.0` <-> `block1_0`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# embed dims, depths and heads of the published variants; every variant shares mlp ratio 4 and
# spatial-reduction ratios 8, 4, 2, 1, qkv bias, stochastic depth 0.1.
MIT_PRESETS: dict[str, dict[str, tuple[int, ...]]] = {
    "b0": dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "b1": dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2)),
    "b2": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3)),
    "b3": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 18, 3)),
    "b4": dict(embed_dims=(64, 128, 320, 512), depths=(3, 8, 27, 3)),
    "b5": dict(embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3)),
}


@dataclasses.dataclass(frozen=True)
class MiTConfig:
    """Free-form MiT architecture. `preset(name)` gives the published B0-B5."""

    embed_dims: tuple[int, ...] = (64, 128, 320, 512)
    depths: tuple[int, ...] = (3, 6, 40, 3)
    num_heads: tuple[int, ...] = (1, 2, 5, 8)
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
    mlp_ratios: tuple[int, ...] = (4, 4, 4, 4)
    qkv_bias: bool = True
    drop_path_rate: float = 0.1
    # (kernel, stride, padding) of the four overlapping patch embeddings.
    patch_kernels: tuple[int, ...] = (7, 3, 3, 3)
    patch_strides: tuple[int, ...] = (4, 2, 2, 2)
    # Epsilon of the blocks' (norm1, norm2) and stages' (norm1..4) LayerNorms: 1e-6 in the release;
    # transformers' SegFormer uses torch's default 1e-5 there (allspark_jax.weights
    # .huggingface). The patch-embedding and spatial-reduction norms use 1e-5 in both.
    norm_eps: float = 1e-6

    @classmethod
    def preset(cls, name: str, **overrides) -> "MiTConfig":
        key = name.lower().removeprefix("mit_")
        if key not in MIT_PRESETS:
            raise ValueError(f"unknown MiT variant {name!r}; expected one of {sorted(MIT_PRESETS)}")
        return cls(**{**MIT_PRESETS[key], **overrides})

    def __post_init__(self):
        fields = ("embed_dims", "depths", "num_heads", "sr_ratios", "mlp_ratios")
        lengths = {f: len(getattr(self, f)) for f in fields}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"MiT config: per-stage tuples must have equal lengths, got {lengths}")
        for d, h in zip(self.embed_dims, self.num_heads):
            if d % h:
                raise ValueError(f"MiT config: embed dim {d} is not divisible by {h} heads")


def token_grid(size: int, config: MiTConfig) -> list[int]:
    """Side of each stage's token grid for an input side `size`: floor((S + 2p - k) / s) + 1."""
    sides = []
    for k, s in zip(config.patch_kernels, config.patch_strides):
        size = (size + 2 * (k // 2) - k) // s + 1
        sides.append(size)
    return sides


def token_grid_sizes(valid_size: jax.Array, config: MiTConfig) -> list[jax.Array]:
    """`token_grid` on arrays, inside a program: (B, 2) int true input (height, width) -> per stage
    (B, 2) int32 true token-grid (height, width). Floor division as Python's, so size 0 (an empty
    filler slot) gives 0 at every stage."""
    sizes, out = jnp.asarray(valid_size).astype(jnp.int32), []
    for k, s in zip(config.patch_kernels, config.patch_strides):
        sizes = (sizes + 2 * (k // 2) - k) // s + 1
        out.append(sizes)
    return out


def grid_mask(sizes: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """(B, 2) int true (height, width) -> (B, h, w) bool, True on the top-left true part of a
    padded (h, w) grid."""
    rows = jnp.arange(shape[0])[None, :] < sizes[:, 0:1]
    cols = jnp.arange(shape[1])[None, :] < sizes[:, 1:2]
    return rows[:, :, None] & cols[:, None, :]


# The release's initialisers (SegFormer's _init_weights): trunc-normal linears, fan-out convs.
dense_init = nn.initializers.truncated_normal(stddev=0.02, lower=-100.0, upper=100.0)


def conv_init(groups: int = 1):
    """N(0, sqrt(2 / fan_out)) with fan_out = kh * kw * out / groups, as SegFormer's _init_weights."""

    def init(key, shape, dtype=jnp.float32):
        kh, kw, _, out = shape
        std = math.sqrt(2.0 / (kh * kw * out // groups))
        return std * jax.random.normal(key, shape, dtype)

    return init


def layer_norm(eps: float, name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, name=name)


class OverlapPatchEmbed(nn.Module):
    """Strided conv + LayerNorm. (B, H, W, C_in) -> (B, H', W', dim)."""

    dim: int
    kernel: int
    stride: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        p = self.kernel // 2
        x = nn.Conv(self.dim, (self.kernel, self.kernel), (self.stride, self.stride),
                    padding=((p, p), (p, p)), kernel_init=conv_init(), dtype=self.dtype,
                    name="proj")(x)
        return layer_norm(1e-5, "norm")(x)


class PatchConv(nn.Module):
    """`nn.Conv(features, (r, r), (r, r), padding='VALID')` as a matmul over flattened patches.

    (B, h, w, C) -> (B, h // r, w // r, features); rows / columns past the last whole patch are
    dropped, as by the VALID convolution. Same parameters (kernel (r, r, C, features), bias) and
    result. Why: the weight gradient of a strided convolution is a window-dilated convolution that
    XLA:CPU runs far below the matmul peak; as a matmul it is a plain dot.
    """

    features: int
    patch: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        r = self.patch
        kernel = self.param("kernel", conv_init(), (r, r, c, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        hh, ww = h // r, w // r
        patches = x[:, :hh * r, :ww * r].reshape(b, hh, r, ww, r, c)
        return jnp.einsum("bhiwjc,ijco->bhwo", patches, kernel) + bias


def _shifted_sum(padded: jax.Array, weights: jax.Array, flip: bool) -> jax.Array:
    """sum_ij padded[:, i:i+h, j:j+w] * weights[i, j] for a map padded by k // 2 on each side.

    padded (B, h + 2p, w + 2p, C), weights (k, k, C) -> (B, h, w, C); `flip` reads tap (k-1-i, k-1-j),
    which turns the correlation into its transpose (the input gradient).
    """
    k = weights.shape[0]
    h, w = padded.shape[1] - k + 1, padded.shape[2] - k + 1
    y = None
    for i in range(k):
        for j in range(k):
            wij = weights[k - 1 - i, k - 1 - j] if flip else weights[i, j]
            term = padded[:, i:i + h, j:j + w] * wij
            y = term if y is None else y + term
    return y


def _pad_same(x: jax.Array, k: int) -> jax.Array:
    p = k // 2
    return jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))


@jax.custom_vjp
def depthwise_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """Same-padded depthwise convolution as k * k shifted multiply-adds.

    x (B, h, w, C), kernel (k, k, 1, C), bias (C,) -> (B, h, w, C).
    Custom VJP: the backward keeps only `x` and the kernel and computes both gradients as shifted
    products too, reading shifted windows of one padded cotangent where autodiff would pad each of
    the k * k slices' cotangents to the full map and add them.
    """
    k = kernel.shape[0]
    return _shifted_sum(_pad_same(x, k), kernel[:, :, 0], flip=False) + bias


def _depthwise_fwd(x, kernel, bias):
    return depthwise_conv(x, kernel, bias), (x, kernel)


def _depthwise_bwd(res, g):
    x, kernel = res
    k, h, w = kernel.shape[0], x.shape[1], x.shape[2]
    xp = _pad_same(x, k)
    dkernel = jnp.stack([
        jnp.stack([jnp.sum(xp[:, i:i + h, j:j + w] * g, axis=(0, 1, 2)) for j in range(k)])
        for i in range(k)])[:, :, None, :]
    dx = _shifted_sum(_pad_same(g, k), kernel[:, :, 0], flip=True)
    return dx, dkernel.astype(kernel.dtype), jnp.sum(g, axis=(0, 1, 2)).astype(kernel.dtype)


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


class DepthwiseConv(nn.Module):
    """`nn.Conv(C, (k, k), padding=k // 2, feature_group_count=C)` as shifted multiply-adds.

    (B, h, w, C) -> (B, h, w, C). Same parameters (kernel (k, k, 1, C), bias (C,)) and result.
    Why: XLA:CPU computes a depthwise convolution's weight gradient as a slow library
    convolution; written as shifted products (`depthwise_conv`), the forward and both gradients
    are elementwise fusions and reductions.
    """

    kernel_size: int = 3
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c, k = x.shape[-1], self.kernel_size
        kernel = self.param("kernel", conv_init(c), (k, k, 1, c))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return depthwise_conv(x, kernel, bias)


@jax.custom_vjp
def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v per head; the softmax in float32.

    q (B, Q, H, d), k and v (B, K, H, d) -> (B, Q, H, d).
    Custom VJP: the softmax's backward needs, per query, sum_k p dp (p the weights, dp their
    gradient), which autodiff reduces over the (Q, K) weight matrix. It equals sum_d g out (g the
    output's gradient), a sum over the head's d channels of (Q, d) maps, so no reduction reads the
    matrix (the form of flash attention's backward).
    """
    return _attention_fwd(q, k, v)[0]


def masked_softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                             key_mask: jax.Array) -> jax.Array:
    """`softmax_attention` over the keys where key_mask (B, K) bool is True only (the true tokens
    of a padded batch); a query with no true key gets a zero output. q (B, Q, H, d), k and v
    (B, K, H, d) -> (B, Q, H, d)."""
    attn = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    keep = key_mask.reshape(key_mask.shape[0], 1, 1, -1)
    attn = jnp.where(keep, attn.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    # exp(min - max) is exactly 0 when one key is true; with none, every weight is zeroed.
    attn = jnp.where(keep, jax.nn.softmax(attn, axis=-1), 0.0).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", attn, v)


def _attention_fwd(q, k, v):
    scale = q.shape[-1] ** -0.5
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    p = jax.nn.softmax(s.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", p, v)
    return out, (q, k, v, p, out)


def _attention_bwd(res, g):
    q, k, v, p, out = res
    scale = q.shape[-1] ** -0.5
    dv = jnp.einsum("bhqk,bqhd->bkhd", p, g)
    dp = jnp.einsum("bqhd,bkhd->bhqk", g, v).astype(jnp.float32)
    row = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), -1)  # (B, Q, H) = sum_k p dp
    ds = (p.astype(jnp.float32) * (dp - jnp.swapaxes(row, 1, 2)[..., None]) * scale).astype(q.dtype)
    dq = jnp.einsum("bhqk,bkhd->bqhd", ds, k)
    dk = jnp.einsum("bhqk,bqhd->bkhd", ds, q)
    return dq, dk, dv


softmax_attention.defvjp(_attention_fwd, _attention_bwd)


class EfficientAttention(nn.Module):
    """Multi-head attention whose keys/values come from a spatially reduced map.

    x: (B, h, w, C) -> (B, h, w, C). `key_mask` (B, h // sr, w // sr) bool (sr = 1: (B, h, w)), or
    None: keys where it is False (built from padded tokens) get no attention. A query with no true
    key (a true grid smaller than sr, which the VALID reduction leaves without keys) gets a zero
    attention output, as the empty softmax of the image at its own size gives.
    """

    dim: int
    num_heads: int
    sr_ratio: int
    qkv_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask=None):
        b, h, w, c = x.shape
        hd = c // self.num_heads
        dense = lambda f, name, bias=True: nn.Dense(  # noqa: E731
            f, use_bias=bias, kernel_init=dense_init, dtype=self.dtype, name=name)
        q = dense(c, "q", self.qkv_bias)(x).reshape(b, h * w, self.num_heads, hd)
        if self.sr_ratio > 1:
            r = self.sr_ratio
            x = PatchConv(c, r, self.dtype, name="sr")(x)
            x = layer_norm(1e-5, "norm")(x)
        kv = dense(2 * c, "kv", self.qkv_bias)(x).reshape(b, -1, 2, self.num_heads, hd)
        k, v = kv[:, :, 0], kv[:, :, 1]
        if key_mask is None:
            out = softmax_attention(q, k, v).reshape(b, h, w, c)
        else:
            out = masked_softmax_attention(q, k, v, key_mask.reshape(b, -1)).reshape(b, h, w, c)
        return dense(c, "proj")(out)


class MixFFN(nn.Module):
    """Linear -> depthwise 3x3 conv -> exact GELU -> Linear. (B, h, w, C) -> (B, h, w, C).

    `mask` (B, h, w) bool or None: the hidden features of padded tokens are zeroed before the
    convolution, which then reads zeros beyond the true grid, as its zero padding does at the
    image's own size.
    """

    dim: int
    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        x = nn.Dense(self.hidden, kernel_init=dense_init, dtype=self.dtype, name="fc1")(x)
        if mask is not None:
            x = jnp.where(mask[..., None], x, 0)
        x = DepthwiseConv(3, self.dtype, name="dwconv")(x)
        x = nn.gelu(x, approximate=False)
        return nn.Dense(self.dim, kernel_init=dense_init, dtype=self.dtype, name="fc2")(x)


class Block(nn.Module):
    """Pre-norm transformer block with stochastic depth. (B, h, w, C) -> (B, h, w, C).

    `mask` (B, h, w) and `key_mask` (the attention's reduced key grid) bool, or None: see
    `MixVisionTransformer`'s `valid_size`.
    """

    dim: int
    num_heads: int
    sr_ratio: int
    mlp_ratio: int
    drop_path: float
    qkv_bias: bool = True
    dtype: Dtype = jnp.float32
    norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, x, train: bool, mask=None, key_mask=None):
        # DropPath drops whole samples: one Bernoulli per batch element, broadcast over h, w, C.
        drop = nn.Dropout(self.drop_path, broadcast_dims=(1, 2, 3), deterministic=not train)
        y = EfficientAttention(self.dim, self.num_heads, self.sr_ratio, self.qkv_bias, self.dtype,
                               name="attn")(layer_norm(self.norm_eps, "norm1")(x), key_mask)
        x = x + drop(y)
        y = MixFFN(self.dim, self.dim * self.mlp_ratio, self.dtype,
                   name="mlp")(layer_norm(self.norm_eps, "norm2")(x), mask)
        return x + drop(y)


class MixVisionTransformer(nn.Module):
    """MiT encoder. (B, H, W, 3) -> four maps (B, H/4, W/4, C1) ... (B, H/32, W/32, C4).

    `valid_size` (B, 2) int, or None: the true (height, width) of each image, placed at the top-left
    of the padded batch (inference only). The true part of every output map (its top-left
    `token_grid_sizes`) then equals the map of the image alone at its own size: the input is zeroed
    beyond the true size (the stage-1 convolution pads with zeros), every convolution that would
    read padded tokens reads zeros (the Mix-FFN's hidden features, each stage's output before the
    next patch embedding), and attention keys built from padded tokens are masked out (a reduction
    patch is true iff it lies inside the true grid: floor(h / sr) x floor(w / sr) keys). Outputs are
    0 beyond the true grid.
    """

    config: MiTConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False, valid_size=None) -> list[jax.Array]:
        cfg = self.config
        rates = np.linspace(0.0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
        block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
        if valid_size is not None:
            sizes = token_grid_sizes(valid_size, cfg)
            x = jnp.where(grid_mask(jnp.asarray(valid_size), x.shape[1:3])[..., None], x, 0)
        outs, i = [], 0
        for s, depth in enumerate(cfg.depths):
            x = OverlapPatchEmbed(cfg.embed_dims[s], cfg.patch_kernels[s], cfg.patch_strides[s],
                                  self.dtype, name=f"patch_embed{s + 1}")(x)
            masks = ()
            if valid_size is not None:  # computed once per stage, shared by its blocks
                r, grid = cfg.sr_ratios[s], x.shape[1:3]
                mask = grid_mask(sizes[s], grid)
                key_mask = mask if r == 1 else grid_mask(sizes[s] // r,
                                                         (grid[0] // r, grid[1] // r))
                masks = (mask, key_mask)
            for j in range(depth):
                x = block_cls(cfg.embed_dims[s], cfg.num_heads[s], cfg.sr_ratios[s],
                              cfg.mlp_ratios[s], rates[i], cfg.qkv_bias, self.dtype, cfg.norm_eps,
                              name=f"block{s + 1}_{j}")(x, train, *masks)
                i += 1
            x = layer_norm(cfg.norm_eps, f"norm{s + 1}")(x)
            if valid_size is not None:
                x = jnp.where(masks[0][..., None], x, 0)
            outs.append(x)
        return outs
