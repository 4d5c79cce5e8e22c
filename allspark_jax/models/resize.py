"""Static-shape resizing of NHWC maps as PyTorch's `F.interpolate` computes it on float32.

Three of `F.interpolate`'s modes, none antialiased:
  * `bilinear`, align_corners=False (`resize_bilinear`; `resize_bilinear_valid` for the true parts
    of a padded batch): SegFormer's head, AllSpark's grouping, evaluation;
  * `bicubic`, align_corners=False (`resize_bicubic`): DINOv2's position-embedding interpolation,
    both facebookresearch's and transformers', given either the output size (scale = in / out) or
    a scale factor (scale = 1 / factor, which differs from in / out when the output size was
    floored);
  * `bilinear`, align_corners=True (`resize_bilinear_align_corners`;
    `resize_bilinear_align_corners_valid` for padded batches): the DPT head's fusion blocks, its
    final resize and UniMatch V2's evaluation resizes.

The `_valid` versions resize the top-left true part of each sample of a padded batch to a true
output size, both given as traced (B, 2) arrays, so that one program serves every size: per-sample
weight matrices built inside the program (`interpolation_matrix`, `align_corners_matrix`; for
bicubic, `bicubic_matrix_valid` gathers host-computed taps by the traced length) that read only
true inputs and write 0 beyond the true output, applied as two products.

Each axis of a static-shape resize is an (out_len, in_len) weight matrix built on the host in
numpy, in the float32 arithmetic of PyTorch's CPU kernels (UpSampleKernel.cpp: the scale first,
then the source index, its floor and fraction; for bicubic Keys' cubic with A = -0.75 on the four
taps floor - 1 .. floor + 2 clamped to the edges). A map is resized from each row's few non-zero
taps (a gather and multiply-adds per output that XLA fuses with their consumers), never as a dense
product, and its gradient from the transposed taps (a gather again, where autodiff's transpose of a
gather is a scatter-add, a serial loop on XLA:CPU). Taps are computed once per shape (cached) and
in numpy: jnp would compile a dozen tiny XLA programs per new shape while the model is traced.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Keys' cubic convolution parameter of PyTorch's non-antialiased bicubic interpolation.
_CUBIC_A = -0.75


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """`F.interpolate(x, size, mode='bilinear', align_corners=False)` on (B, H, W, C) -> (B, h, w, C).

    Half-pixel centres, edge-clamped, no antialiasing when downsampling (the AllSpark grouping
    downsamples the teacher's logits); the weights are `interpolation_matrix`'s.
    """
    h, w = x.shape[1:3]
    if (h, w) == tuple(size):
        return x
    return resample(x, ("bilinear", h, int(size[0]), None), ("bilinear", w, int(size[1]), None))


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """(n,) fractions -> (n, 4) float32 weights of taps floor - 1 .. floor + 2, PyTorch's
    get_cubic_upsample_coefficients (cubic_convolution1 on |x| <= 1, cubic_convolution2 beyond).
    Evaluated in float64 and rounded once: PyTorch's float32 polynomials are compiled with fused
    multiply-adds, which this reproduces more closely than float32 steps (within 1e-6)."""
    a, t = _CUBIC_A, t.astype(np.float64)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1).astype(np.float32)


@functools.lru_cache(maxsize=None)
def bicubic_matrix(in_len: int, out_len: int, scale_factor: float | None = None) -> np.ndarray:
    """(out_len, in_len) float32 weights of `F.interpolate(mode='bicubic', align_corners=False)`.

    `scale_factor` None: called with `size` (scale in_len / out_len); else the factor passed to
    `F.interpolate(scale_factor=...)`, whose inverse PyTorch uses as the scale. Taps beyond the
    edges read the edge (their weights add onto it).
    """
    if scale_factor is None:
        scale = np.float32(in_len) / np.float32(out_len)
    else:
        scale = np.float32(1.0 / scale_factor)  # 1 / factor in double, then float, as PyTorch
    # scale * (o + 0.5) - 0.5 rounded to float32 once: a fused multiply-add in PyTorch's kernel.
    o = np.arange(out_len, dtype=np.float64)
    src = (np.float64(scale) * (o + 0.5) - 0.5).astype(np.float32)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_len - 1)
    t = np.clip(src - i0.astype(np.float32), 0.0, 1.0)
    weights = _cubic_weights(t)
    m = np.zeros((out_len, in_len), np.float32)
    for j in range(4):
        cols = np.clip(i0 - 1 + j, 0, in_len - 1)
        np.add.at(m, (np.arange(out_len), cols), weights[:, j])
    return m


@functools.lru_cache(maxsize=None)
def bilinear_align_corners_matrix(in_len: int, out_len: int) -> np.ndarray:
    """(out_len, in_len) float32 weights of `F.interpolate(mode='bilinear', align_corners=True)`:
    source index o * (in_len - 1) / (out_len - 1), whether the call gave a size or a scale factor
    (align_corners ignores the factor)."""
    if out_len == in_len:
        return np.eye(out_len, dtype=np.float32)
    scale = (np.float32(in_len - 1) / np.float32(out_len - 1) if out_len > 1
             else np.float32(0.0))
    src = scale * np.arange(out_len, dtype=np.float32)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_len - 1)
    l1 = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    i1 = np.minimum(i0 + 1, in_len - 1)
    m = np.zeros((out_len, in_len), np.float32)
    rows = np.arange(out_len)
    np.add.at(m, (rows, i0), np.float32(1.0) - l1)
    np.add.at(m, (rows, i1), l1)
    return m


# An axis's resizing, hashable: (kind, in_len, out_len, scale_factor | None), kind one of
# "bilinear" (align_corners=False), "bicubic", "bilinear_align_corners" (factor None but bicubic's).
AxisSpec = tuple[str, int, int, "float | None"]


def _matrix(spec: AxisSpec) -> np.ndarray:
    kind, in_len, out_len, factor = spec
    if kind == "bilinear":
        return interpolation_matrix(np.array([in_len]), np.array([out_len]), in_len, out_len,
                                    xp=np)[0]
    if kind == "bicubic":
        return bicubic_matrix(in_len, out_len, factor)
    if kind == "bilinear_align_corners":
        return bilinear_align_corners_matrix(in_len, out_len)
    raise ValueError(f"unknown resizing {kind!r}; expected 'bilinear', 'bicubic' or "
                     "'bilinear_align_corners'")


def _taps_of(mat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, T) int32 column indices and float32 weights of each row's non-zeros (zero-padded)."""
    width = max(int((mat != 0).sum(1).max()), 1)
    idx = np.zeros((mat.shape[0], width), np.int32)
    w = np.zeros((mat.shape[0], width), np.float32)
    for r in range(mat.shape[0]):
        nz = np.flatnonzero(mat[r])
        idx[r, :len(nz)], w[r, :len(nz)] = nz, mat[r, nz]
    return idx, w


@functools.lru_cache(maxsize=None)
def _taps(spec: AxisSpec):
    """(forward taps, transposed taps) of an axis, numpy (see `_taps_of`)."""
    m = _matrix(spec)
    return _taps_of(m), _taps_of(m.T)


def _apply(x: jax.Array, taps: tuple[np.ndarray, np.ndarray], axis: int) -> jax.Array:
    idx, w = taps
    shape = [1] * x.ndim
    shape[axis] = idx.shape[0]
    out = None
    for t in range(idx.shape[1]):
        term = (jnp.take(x, idx[:, t], axis=axis, mode="clip")
                * jnp.asarray(w[:, t].reshape(shape), x.dtype))
        out = term if out is None else out + term
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def resample(x: jax.Array, spec_h: AxisSpec, spec_w: AxisSpec) -> jax.Array:
    """(B, in_h, in_w, C) -> (B, out_h, out_w, C), axis 1 by `spec_h`, then axis 2 by `spec_w`."""
    return _apply(_apply(x, _taps(spec_h)[0], 1), _taps(spec_w)[0], 2)


def _resample_fwd(x, spec_h, spec_w):
    return resample(x, spec_h, spec_w), None


def _resample_bwd(spec_h, spec_w, _, g):
    return (_apply(_apply(g, _taps(spec_w)[1], 2), _taps(spec_h)[1], 1),)


resample.defvjp(_resample_fwd, _resample_bwd)


def resize_bicubic(x: jax.Array, size: tuple[int, int],
                   scale_factor: tuple[float, float] | None = None) -> jax.Array:
    """`F.interpolate(x, size, mode='bicubic', align_corners=False)` on (B, H, W, C) -> (B, h, w, C).

    `scale_factor` (f_h, f_w) or None: the factors of a `scale_factor=` call, whose output `size`
    is floor(in * f) (the caller's; checked) and whose scale is 1 / f.
    """
    h, w = x.shape[1:3]
    if scale_factor is None:
        fh = fw = None
    else:
        fh, fw = (float(f) for f in scale_factor)
        if (int(np.floor(h * fh)), int(np.floor(w * fw))) != tuple(size):
            raise ValueError(f"resize_bicubic: size {tuple(size)} is not floor({(h, w)} * "
                             f"{(fh, fw)})")
    return resample(x, ("bicubic", h, int(size[0]), fh), ("bicubic", w, int(size[1]), fw))


def resize_bilinear_align_corners(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """`F.interpolate(x, size, mode='bilinear', align_corners=True)` on (B, H, W, C) -> (B, h, w, C)."""
    h, w = x.shape[1:3]
    if (h, w) == tuple(size):
        return x
    return resample(x, ("bilinear_align_corners", h, int(size[0]), None),
                    ("bilinear_align_corners", w, int(size[1]), None))


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
    _, h_in, w_in, _ = x.shape
    mh = interpolation_matrix(in_sizes[:, 0], out_sizes[:, 0], h_in, size[0])
    mw = interpolation_matrix(in_sizes[:, 1], out_sizes[:, 1], w_in, size[1])
    return _resize_valid(x, mh, mw)


def _resize_valid(x: jax.Array, mh: jax.Array, mw: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, h, w, C) by per-sample (B, h, H) and (B, w, W) weight matrices, as two
    products at HIGHEST precision (accelerators would otherwise round the operands to bfloat16 /
    TF32), in float32; the result in x's dtype."""
    hi = jax.lax.Precision.HIGHEST
    y = jnp.einsum("boh,bhwc->bowc", mh, x.astype(jnp.float32), precision=hi)
    y = jnp.einsum("bpw,bowc->bopc", mw, y, precision=hi)
    return y.astype(x.dtype)


def align_corners_matrix(in_size: jax.Array, out_size: jax.Array, in_len: int,
                         out_len: int, xp=jnp) -> jax.Array:
    """Per-sample bilinear weights along one axis, PyTorch's align_corners=True formula.

    Args:
      in_size, out_size: (B,) int, the true lengths (<= in_len, out_len; 0 allowed).
      in_len, out_len: the static (padded) lengths.
      xp: `jnp` (traced sizes) or `np` (static sizes, the same float32 arithmetic on the host).
    Returns:
      (B, out_len, in_len) float32 M with `out[o] = sum_i M[o, i] in[i]`: for o < out_size,
      weights 1 - l and l on columns i0 and i1 = min(i0 + 1, in_size - 1), where src = scale o,
      scale = (in_size - 1) / (out_size - 1) in float32 (0 when out_size <= 1), i0 =
      min(floor(src), in_size - 1), l = src - i0 clipped to [0, 1] (as `bilinear_align_corners_matrix`
      and PyTorch's kernel). Rows o >= out_size and columns i >= in_size are zero.
    """
    in_size = in_size.astype(xp.int32)[:, None]
    out_size = out_size.astype(xp.int32)[:, None]
    # max(., 1): sizes 0 and 1 (a filler slot, a one-pixel side) must not divide by zero.
    scale = xp.where(out_size > 1, (in_size - 1).astype(xp.float32)
                     / xp.maximum(out_size - 1, 1).astype(xp.float32), 0.0).astype(xp.float32)
    o = xp.arange(out_len, dtype=xp.int32)[None, :]
    src = scale * o.astype(xp.float32)  # (B, out_len)
    last = xp.maximum(in_size - 1, 0)
    i0 = xp.minimum(xp.floor(src).astype(xp.int32), last)
    i1 = xp.minimum(i0 + 1, last)
    l1 = xp.clip(src - i0.astype(xp.float32), 0.0, 1.0).astype(xp.float32)
    l0 = (1.0 - l1).astype(xp.float32)
    i = xp.arange(in_len, dtype=xp.int32)[None, None, :]
    m = (xp.where(i == i0[..., None], l0[..., None], 0.0)
         + xp.where(i == i1[..., None], l1[..., None], 0.0))
    return xp.where((o < out_size)[..., None], m, 0.0).astype(xp.float32)


def resize_bilinear_align_corners_valid(x: jax.Array, size: tuple[int, int], in_sizes: jax.Array,
                                        out_sizes: jax.Array) -> jax.Array:
    """`resize_bilinear_align_corners` of the top-left true part of each sample of a padded batch.

    Args:
      x: (B, H, W, C); sample b's true map is x[b, :in_sizes[b, 0], :in_sizes[b, 1]].
      size: (h, w) the static output shape.
      in_sizes, out_sizes: (B, 2) int (height, width), traced.
    Returns:
      (B, h, w, C) in x's dtype: y[b, :out_sizes[b, 0], :out_sizes[b, 1]] equals
      `resize_bilinear_align_corners(x[b:b+1, :in_h, :in_w], (out_h, out_w))` (float32 round-off
      apart); the rest is 0. Padded inputs are never read (`align_corners_matrix`).
    """
    _, h_in, w_in, _ = x.shape
    mh = align_corners_matrix(in_sizes[:, 0], out_sizes[:, 0], h_in, size[0])
    mw = align_corners_matrix(in_sizes[:, 1], out_sizes[:, 1], w_in, size[1])
    return _resize_valid(x, mh, mw)


@functools.lru_cache(maxsize=None)
def _bicubic_tap_table(in_len: int, max_out: int, factor_offset: float | None):
    """(max_out + 1, max_out, 4) int32 columns and float32 weights: entry n holds, in rows < n, the
    taps of `bicubic_matrix(in_len, n, factor)` (factor None, or (n + factor_offset) / in_len) in
    their order floor - 1 .. floor + 2 (edge-clamped, so columns repeat at the edges); rows >= n
    and entry 0 are zero weights."""
    idx = np.zeros((max_out + 1, max_out, 4), np.int32)
    w = np.zeros((max_out + 1, max_out, 4), np.float32)
    for n in range(1, max_out + 1):
        factor = None if factor_offset is None else (n + factor_offset) / in_len
        if factor is None:
            scale = np.float32(in_len) / np.float32(n)
        else:
            if int(np.floor(in_len * factor)) != n:
                raise ValueError(f"bicubic position interpolation: floor({in_len} * {factor}) "
                                 f"is not {n}")
            scale = np.float32(1.0 / factor)
        # As `bicubic_matrix` (one float32 rounding of scale (o + 0.5) - 0.5).
        o = np.arange(n, dtype=np.float64)
        src = (np.float64(scale) * (o + 0.5) - 0.5).astype(np.float32)
        i0 = np.minimum(np.floor(src).astype(np.int64), in_len - 1)
        t = np.clip(src - i0.astype(np.float32), 0.0, 1.0)
        w[n, :n] = _cubic_weights(t)
        idx[n, :n] = np.clip(i0[:, None] - 1 + np.arange(4)[None, :], 0, in_len - 1)
    return idx, w


def bicubic_matrix_valid(out_size: jax.Array, in_len: int, out_len: int,
                         factor_offset: float | None = None) -> jax.Array:
    """Per-sample `bicubic_matrix`es for traced output lengths, inside a program.

    Args:
      out_size: (B,) int traced output lengths, 0 .. out_len.
      in_len: the (static, whole) input length; out_len: the static padded output length.
      factor_offset: None: each sample resized by size (scale in_len / out_size); else by the
        scale factor (out_size + factor_offset) / in_len (facebookresearch's DINOv2 call with
        its interpolate_offset), as `bicubic_matrix` with that factor.
    Returns:
      (B, out_len, in_len) float32: rows < out_size[b] equal `bicubic_matrix(in_len, out_size[b],
      factor)` exactly, the other rows are 0. The taps of every possible length are computed on
      the host once (the factor's scale is 1 / factor in double, which float32 arithmetic in the
      program could not reproduce) and gathered by the traced length; the matrix is summed from
      its four one-hot taps in the host's order.
    """
    idx, w = _bicubic_tap_table(int(in_len), int(out_len), factor_offset)
    n = jnp.clip(jnp.asarray(out_size).astype(jnp.int32), 0, out_len)
    idx, w = jnp.asarray(idx)[n], jnp.asarray(w)[n]  # (B, out_len, 4)
    cols = jnp.arange(in_len, dtype=jnp.int32)
    m = jnp.zeros(idx.shape[:2] + (in_len,), jnp.float32)
    for j in range(4):  # the four taps, summed in bicubic_matrix's order
        m = m + jnp.where(cols == idx[..., j:j + 1], w[..., j:j + 1], 0.0)
    return m


def resize_bicubic_valid(x: jax.Array, size: tuple[int, int], out_sizes: jax.Array,
                         factor_offset: float | None = None) -> jax.Array:
    """`resize_bicubic` of one whole (1, H, W, C) map to a traced size per sample.

    Args:
      x: (1, H, W, C) the map (every sample resizes all of it: the position embeddings).
      size: (h, w) the static padded output shape.
      out_sizes: (B, 2) int traced output (height, width), each <= size.
      factor_offset: as `bicubic_matrix_valid` (None: by size; else by the scale factor
        (out + factor_offset) / in).
    Returns:
      (B, h, w, C) in x's dtype: y[b, :out_h, :out_w] equals `resize_bicubic(x, (out_h, out_w),
      factors)` (float32 round-off apart), the rest is 0.
    """
    _, h_in, w_in, _ = x.shape
    mh = bicubic_matrix_valid(out_sizes[:, 0], h_in, size[0], factor_offset)
    mw = bicubic_matrix_valid(out_sizes[:, 1], w_in, size[1], factor_offset)
    return _resize_valid(jnp.broadcast_to(x, (out_sizes.shape[0],) + x.shape[1:]), mh, mw)


def checked_sizes(sizes, batch: int, name: str) -> jax.Array:
    """A (batch, 2) int array of true (height, width) sizes as int32, or a ValueError naming
    `name`."""
    sizes = jnp.asarray(sizes)
    if sizes.shape != (batch, 2) or not jnp.issubdtype(sizes.dtype, jnp.integer):
        raise ValueError(f"{name} must be ({batch}, 2) int (height, width) for a batch of {batch}, "
                         f"got {sizes.shape} {sizes.dtype}")
    return sizes.astype(jnp.int32)
