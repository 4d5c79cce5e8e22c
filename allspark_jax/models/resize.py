"""Bilinear resizing with PyTorch's `F.interpolate(mode='bilinear', align_corners=False)` semantics."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(B, H, W, C) -> (B, h, w, C); half-pixel centres, edge-clamped, NO antialiasing.

    `jax.image.resize` antialiases when downsampling by default; PyTorch's bilinear interpolation
    does not, and the AllSpark grouping downsamples the teacher's logits.
    """
    b, _, _, c = x.shape
    return jax.image.resize(x, (b, size[0], size[1], c), method="bilinear", antialias=False)


def interpolation_matrix(in_size: jax.Array, out_size: jax.Array, in_len: int,
                         out_len: int) -> jax.Array:
    """Per-sample bilinear weights along one axis, PyTorch's align_corners=False formula.

    Args:
      in_size, out_size: (B,) int, the true lengths (<= in_len, out_len; 0 allowed).
      in_len, out_len: the static (padded) lengths.
    Returns:
      (B, out_len, in_len) float32 M with `out[o] = sum_i M[o, i] in[i]`: for o < out_size, weights
      1 - l and l on rows i0 and i1 = min(i0 + 1, in_size - 1), where src = max(scale (o + 0.5)
      - 0.5, 0), scale = in_size / out_size, i0 = floor(src), l = src - i0 (as PyTorch computes
      them: the scale first, in float32). Rows o >= out_size and columns i >= in_size are zero, so
      padded inputs are never read and padded outputs are 0.
    """
    in_size = in_size.astype(jnp.int32)[:, None]
    out_size = out_size.astype(jnp.int32)[:, None]
    # max(., 1): an empty output (size 0, a batch's filler slot) must not divide by zero.
    scale = in_size.astype(jnp.float32) / jnp.maximum(out_size, 1).astype(jnp.float32)
    o = jnp.arange(out_len, dtype=jnp.int32)[None, :]
    src = jnp.maximum(scale * (o.astype(jnp.float32) + 0.5) - 0.5, 0.0)  # (B, out_len)
    last = jnp.maximum(in_size - 1, 0)
    i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), last)
    i1 = jnp.minimum(i0 + 1, last)
    l1 = jnp.clip(src - i0.astype(jnp.float32), 0.0, 1.0)
    l0 = 1.0 - l1
    i = jnp.arange(in_len, dtype=jnp.int32)[None, None, :]
    m = (jnp.where(i == i0[..., None], l0[..., None], 0.0)
         + jnp.where(i == i1[..., None], l1[..., None], 0.0))
    return jnp.where((o < out_size)[..., None], m, 0.0)


def resize_bilinear_valid(x: jax.Array, size: tuple[int, int], in_sizes: jax.Array,
                          out_sizes: jax.Array) -> jax.Array:
    """`resize_bilinear` of the top-left true part of each sample of a padded batch.

    Args:
      x: (B, H, W, C); sample b's true map is x[b, :in_sizes[b, 0], :in_sizes[b, 1]].
      size: (h, w) the static output shape.
      in_sizes, out_sizes: (B, 2) int (height, width), traced: one program serves every size.
    Returns:
      (B, h, w, C) in x's dtype: y[b, :out_sizes[b, 0], :out_sizes[b, 1]] equals
      `resize_bilinear(x[b:b+1, :in_h, :in_w], (out_h, out_w))` (float32 round-off apart); the rest
      is 0. Computed as two products with `interpolation_matrix`es built from the sizes (what
      `jax.image.resize` does too, with constant matrices), at HIGHEST precision so that
      accelerators do not round the operands to bfloat16 / TF32.
    """
    b, h_in, w_in, _ = x.shape
    mh = interpolation_matrix(in_sizes[:, 0], out_sizes[:, 0], h_in, size[0])
    mw = interpolation_matrix(in_sizes[:, 1], out_sizes[:, 1], w_in, size[1])
    hi = jax.lax.Precision.HIGHEST
    y = jnp.einsum("boh,bhwc->bowc", mh, x.astype(jnp.float32), precision=hi)
    y = jnp.einsum("bpw,bowc->bopc", mw, y, precision=hi)
    return y.astype(x.dtype)
