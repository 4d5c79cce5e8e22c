"""SegFormer all-MLP decode head and a PyTorch-semantics BatchNorm, NHWC."""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from allspark_jax.models.resize import resize_bilinear, resize_bilinear_valid

Dtype = Any

# PyTorch's default Linear/Conv init (kaiming-uniform with a = sqrt(5)): U(+-1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class Conv1x1(nn.Module):
    """A 1x1 convolution computed as a matmul over channels. (B, H, W, C_in) -> (B, H, W, features).

    Same parameters, initialisation and result as `nn.Conv(features, (1, 1))` (kernel
    (1, 1, C_in, features), bias (features,)), so state dicts map unchanged. Why not `nn.Conv`:
    XLA:CPU hands 1x1 convolutions to a library kernel whose weight gradient runs far below the
    matmul peak.
    """

    features: int
    use_bias: bool = True
    kernel_init: Any = torch_default_init
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, channel_scale=None):
        """`channel_scale` (B, C_in) or None: computes conv(x * channel_scale[:, None, None]) as
        x @ (channel_scale[b, :, None] * kernel) per image, without forming the scaled map."""
        kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features))
        bias = (self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias
                else None)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if channel_scale is None:
            y = jnp.dot(x, kernel[0, 0])
        else:
            scaled = channel_scale.astype(kernel.dtype)[:, :, None] * kernel[0, 0]
            y = jnp.einsum("bhwc,bck->bhwk", x, scaled)
        return y if bias is None else y + bias


def _sums(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel (sum a, sum b) of two (N, C) arrays: sibling reductions of the same operands,
    which XLA fuses into one pass (a variadic `lax.reduce` would, but XLA:CPU runs it unvectorised)."""
    return jnp.sum(a, 0), jnp.sum(b, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float):
    """Training-mode BatchNorm on float32 (N, C) rows: (y, mean, biased var), y (N, C).

    The statistics come from one pass over x: the sums of d = x - s and d^2 with s a per-channel
    shift (the mean of the first row-block of up to 64 rows, so that the difference of the two sums
    does not cancel when |mean| >> std). The backward is BatchNorm's closed form, its two sums again
    in one pass; autodiff of the two-pass form reads the map in more passes.
    """
    return _batch_norm_fwd(x, scale, bias, epsilon)[0]


def _batch_norm_fwd(x, scale, bias, epsilon):
    n = x.shape[0]
    shift = jnp.mean(x[:64], 0)
    d = x - shift
    s1, s2 = _sums(d, d * d)
    dm = s1 / n
    mean = shift + dm
    var = jnp.maximum(s2 / n - dm * dm, 0.0)
    inv = jax.lax.rsqrt(var + epsilon)
    y = (x - mean) * (inv * scale) + bias
    return (y, mean, var), (x, mean, inv, scale)


def _batch_norm_bwd(epsilon, res, g):
    del epsilon
    x, mean, inv, scale = res
    gy, gmean, gvar = g
    n = x.shape[0]
    xhat = (x - mean) * inv
    sum_g, sum_gx = _sums(gy, gy * xhat)
    dx = (inv * scale) * (gy - sum_g / n - xhat * (sum_gx / n))
    # Cotangents of the returned statistics (zero when only running averages read them).
    dx = dx + gmean / n + (x - mean) * (2.0 * gvar / n)
    return dx, sum_gx.astype(scale.dtype), sum_g.astype(scale.dtype)


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)


class TorchBatchNorm(nn.Module):
    """BatchNorm2d as PyTorch computes it. (B, H, W, C) -> (B, H, W, C).

    Differs from `flax.linen.BatchNorm` where it matters for parity: the running variance is updated
    with the UNBIASED batch variance (n / (n - 1)), the momentum is PyTorch's (new = (1 - m) * old +
    m * batch), and `num_batches_tracked` is kept so that state dicts round-trip. Statistics are
    reduced over the whole (global) batch: under `jit` with a data-sharded batch XLA inserts the
    cross-device reduction, which is what SyncBatchNorm does in the release.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x, train: bool):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean_v = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        var_v = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        count_v = self.variable("batch_stats", "num_batches_tracked", jnp.zeros, (), jnp.int32)
        x32 = x.astype(jnp.float32)
        if not train:
            y = (x32 - mean_v.value) * jax.lax.rsqrt(var_v.value + self.epsilon) * scale + bias
            return y.astype(x.dtype)
        y, mean, var = batch_norm_train(x32.reshape(-1, c), scale, bias, self.epsilon)
        if not self.is_initializing():
            n = x32.size // c
            m = self.momentum
            mean_v.value = (1 - m) * mean_v.value + m * jax.lax.stop_gradient(mean)
            var_v.value = (1 - m) * var_v.value + m * jax.lax.stop_gradient(var) * n / max(n - 1, 1)
            count_v.value = count_v.value + 1
        return y.reshape(x.shape).astype(x.dtype)


class DenseParams(nn.Module):
    """A dense layer's parameters, returned rather than applied: kernel `shape`, bias (shape[-1],).

    Initialised as PyTorch's Linear / Conv (fan_in = product of all but the last axis).
    """

    shape: tuple[int, ...]
    use_bias: bool = True

    @nn.compact
    def __call__(self):
        kernel = self.param("kernel", torch_default_init, self.shape)
        bias = (self.param("bias", nn.initializers.zeros, (self.shape[-1],)) if self.use_bias
                else None)
        return kernel, bias


class MLPProjection(nn.Module):
    """`linear_ci.proj`: the (C_i, E) kernel and (E,) bias of a stage's token projection."""

    dim: int

    @nn.compact
    def __call__(self, in_dim: int):
        return DenseParams((in_dim, self.dim), name="proj")()


class LinearFuse(nn.Module):
    """`linear_fuse`, 1x1 conv without bias -> BatchNorm -> ReLU, on the concatenated projections.

    `__call__(inputs, size, train)`: inputs = [(x_i (B, h_i, w_i, C_i), W_i (C_i, E), b_i (E,))] in
    the release's concatenation order; returns (B, size[0], size[1], E). The release computes
        relu(bn(concat_i(up(x_i W_i + b_i)) F)),   F = the (n E, E) fuse kernel,
    at the stage-1 resolution. Bilinear upsampling `up` is linear with weights summing to one, so
    that equals relu(bn(sum_i up(x_i (W_i F_i)) + sum_i b_i F_i)) with F_i the i-th block of F
    rows. The folded form multiplies each map at its own resolution by a (C_i, E) matrix and never
    forms the (B, H/4, W/4, n E) concatenation: the (n E x E) matmul at stage-1 resolution, most of
    the head's FLOPs, is gone. Same parameters, same function; float32 round-off differs.

    `valid_sizes` (one (B, 2) int per input) and `valid_out` ((B, 2) int), or None: the true
    (height, width) of each map of a padded batch and of the output; the upsampling then works
    with the scale of the true sizes (`resize_bilinear_valid`) and reads true tokens only.
    """

    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs, size: tuple[int, int], train: bool, valid_sizes=None,
                 valid_out=None):
        kernel, _ = DenseParams((1, 1, len(inputs) * self.dim, self.dim), use_bias=False,
                                name="conv")()
        blocks = jnp.split(kernel[0, 0], len(inputs), axis=0)  # F_i: (E, E) each
        if valid_sizes is None:
            valid_sizes = [None] * len(inputs)
        y, shift = None, None
        for (x, w, b), f, valid in zip(inputs, blocks, valid_sizes):
            x, w, b, f = nn.dtypes.promote_dtype(x, w, b, f, dtype=self.dtype)
            z = jnp.dot(x, jnp.dot(w, f))
            # A map already on the output grid is the stage-1 map itself: same true size, no resize.
            if z.shape[1:3] != tuple(size):
                z = (resize_bilinear(z, size) if valid is None
                     else resize_bilinear_valid(z, size, valid, valid_out))
            y = z if y is None else y + z
            shift = jnp.dot(b, f) if shift is None else shift + jnp.dot(b, f)
        return nn.relu(TorchBatchNorm(name="bn")(y + shift, train))


class SegFormerHead(nn.Module):
    """All-MLP decoder. Four maps (B, h_i, w_i, C_i) -> logits (B, h_1, w_1, num_classes).

    As the release: the stage-2..4 projections are upsampled to the stage-1 grid, concatenated as
    [c4, c3, c2, c1] (the order fixes the layout of `linear_fuse`'s kernel) and fused; computed in
    the folded form of `LinearFuse`.

    `valid_sizes` (four (B, 2) int, the true token grid of each map of a padded batch), or None:
    the true part of the logits (the top-left `valid_sizes[0]`) is then that of each image alone.
    """

    num_classes: int
    embed_dim: int = 768
    dropout: float = 0.1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], train: bool = False, valid_sizes=None):
        size = features[0].shape[1:3]
        inputs = []
        for i in (4, 3, 2, 1):
            w, b = MLPProjection(self.embed_dim, name=f"linear_c{i}")(features[i - 1].shape[-1])
            inputs.append((features[i - 1], w, b))
        fuse = LinearFuse(self.embed_dim, self.dtype, name="linear_fuse")
        if valid_sizes is None:
            x = fuse(inputs, size, train)
        else:
            x = fuse(inputs, size, train, [valid_sizes[i - 1] for i in (4, 3, 2, 1)],
                     valid_sizes[0])
        pred = Conv1x1(self.num_classes, dtype=self.dtype, name="linear_pred")
        if not train or self.dropout == 0:
            return pred(x)
        # Dropout2d drops whole channels of an image, so it is a per-(image, channel) scale (0 or
        # 1 / (1 - p)) that the classifier's kernel takes instead of the map: one pass over the
        # (B, H/4, W/4, E) map less each way. The scale is nn.Dropout's own mask (same module
        # path, PRNG stream and draws as on the map), so the dropped channels are unchanged.
        keep = nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=False)(
            jnp.ones((x.shape[0], 1, 1, x.shape[-1]), x.dtype))
        return pred(x, channel_scale=keep[:, 0, 0])
