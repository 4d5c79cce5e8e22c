"""Bilinear resizing with PyTorch's `F.interpolate(mode='bilinear', align_corners=False)` semantics."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(B, H, W, C) -> (B, h, w, C); half-pixel centres, edge-clamped, NO antialiasing.

    PyTorch's bilinear interpolation does not antialias when downsampling (the AllSpark grouping
    downsamples the teacher's logits); the weights are `interpolation_matrix`'s, PyTorch's formula.
    Computed from each axis's at most two taps per output (`_resize_taps`), not as products with
    the dense (out, in) matrices: a gather and two multiply-adds per output that XLA fuses with
    their consumers (the head's sum of upsampled maps), where the dense products cost in_len
    multiply-adds per output and write every upsampled map.
    """
    if tuple(size) == tuple(x.shape[1:3]):
        return x
    return _resize_taps(x, tuple(x.shape[1:3]), tuple(size))


@functools.lru_cache(maxsize=None)
def _axis_taps(in_len: int, out_len: int):
    """Static taps of PyTorch's bilinear weights along one axis, both ways.

    Returns (fwd_idx, fwd_w) (out_len, 2): the inputs each output reads and their weights, and
    (bwd_idx, bwd_w) (in_len, T): the outputs each input's gradient reads (the transpose, T the most
    outputs one input feeds; padded with weight 0), all numpy.
    """
    # numpy, not jnp: every new (in_len, out_len) pair would otherwise compile a dozen tiny XLA
    # programs while the model is traced.
    m = interpolation_matrix(np.array([in_len]), np.array([out_len]), in_len, out_len, xp=np)[0]

    def taps(mat):
        width = max(int((mat != 0).sum(1).max()), 1)
        idx = np.zeros((mat.shape[0], width), np.int32)
        w = np.zeros((mat.shape[0], width), np.float32)
        for r in range(mat.shape[0]):
            nz = np.flatnonzero(mat[r])
            idx[r, :len(nz)], w[r, :len(nz)] = nz, mat[r, nz]
        return idx, w

    return taps(m) + taps(m.T)


def _apply_taps(x: jax.Array, idx: np.ndarray, w: np.ndarray, axis: int) -> jax.Array:
    """sum_t w[o, t] * x[..., idx[o, t], ...] along `axis` (static numpy taps)."""
    shape = [1] * x.ndim
    shape[axis] = idx.shape[0]
    out = None
    for t in range(idx.shape[1]):
        term = (jnp.take(x, idx[:, t], axis=axis, mode="clip")
                * jnp.asarray(w[:, t].reshape(shape), x.dtype))
        out = term if out is None else out + term
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _resize_taps(x: jax.Array, in_size: tuple[int, int], size: tuple[int, int]) -> jax.Array:
    (fh, wh, _, _), (fw, ww, _, _) = (_axis_taps(in_size[0], size[0]),
                                      _axis_taps(in_size[1], size[1]))
    return _apply_taps(_apply_taps(x, fh, wh, 1), fw, ww, 2)


def _resize_taps_fwd(x, in_size, size):
    return _resize_taps(x, in_size, size), None


def _resize_taps_bwd(in_size, size, _, g):
    # The transpose reads taps too (each input gathers the outputs it fed): autodiff's transpose
    # of a gather is a scatter-add, a serial loop on XLA:CPU.
    (_, _, bh, wh), (_, _, bw, ww) = (_axis_taps(in_size[0], size[0]),
                                      _axis_taps(in_size[1], size[1]))
    return (_apply_taps(_apply_taps(g, bw, ww, 2), bh, wh, 1),)


_resize_taps.defvjp(_resize_taps_fwd, _resize_taps_bwd)


def interpolation_matrix(in_size: jax.Array, out_size: jax.Array, in_len: int,
                         out_len: int, xp=jnp) -> jax.Array:
    """Per-sample bilinear weights along one axis, PyTorch's align_corners=False formula.

    Args:
      in_size, out_size: (B,) int, the true lengths (<= in_len, out_len; 0 allowed).
      in_len, out_len: the static (padded) lengths.
      xp: the array module, `jnp` (traced sizes) or `np` (static sizes, computed on the host in
        the same float32 arithmetic).
    Returns:
      (B, out_len, in_len) float32 M with `out[o] = sum_i M[o, i] in[i]`: for o < out_size, weights
      1 - l and l on rows i0 and i1 = min(i0 + 1, in_size - 1), where src = max(scale (o + 0.5)
      - 0.5, 0), scale = in_size / out_size, i0 = floor(src), l = src - i0 (as PyTorch computes
      them: the scale first, in float32). Rows o >= out_size and columns i >= in_size are zero, so
      padded inputs are never read and padded outputs are 0.
    """
    in_size = in_size.astype(xp.int32)[:, None]
    out_size = out_size.astype(xp.int32)[:, None]
    # max(., 1): an empty output (size 0, a batch's filler slot) must not divide by zero.
    scale = in_size.astype(xp.float32) / xp.maximum(out_size, 1).astype(xp.float32)
    o = xp.arange(out_len, dtype=xp.int32)[None, :]
    src = xp.maximum(scale * (o.astype(xp.float32) + 0.5) - 0.5, 0.0)  # (B, out_len)
    last = xp.maximum(in_size - 1, 0)
    i0 = xp.minimum(xp.floor(src).astype(xp.int32), last)
    i1 = xp.minimum(i0 + 1, last)
    l1 = xp.clip(src - i0.astype(xp.float32), 0.0, 1.0)
    l0 = 1.0 - l1
    i = xp.arange(in_len, dtype=xp.int32)[None, None, :]
    m = (xp.where(i == i0[..., None], l0[..., None], 0.0)
         + xp.where(i == i1[..., None], l1[..., None], 0.0))
    return xp.where((o < out_size)[..., None], m, 0.0)


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
