"""Layers with PyTorch's semantics that the heads and AllSpark's module share, NHWC: the default
Linear / Conv initialisation, the 1x1 convolution as a matmul, BatchNorm, and UniMatch V2's
complementary channel dropout (`complementary_dropout_scale`).

Same parameters, initialisation and results as PyTorch's `nn.Conv2d(k=1)` and `nn.BatchNorm2d`,
so state dicts map unchanged.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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


def complementary_dropout_scale(key: jax.Array, batch: int, dim: int) -> jax.Array:
    """UniMatch V2's complementary channel dropout as a (batch, dim) float32 scale.

    Image i of the first half and image i of the second half drop complementary channel sets: a
    Bernoulli(0.5) draw m gives 2 m to the first and 2 - 2 m to the second; for a random
    int(batch / 2 * 0.5) of the pairs both keep every channel (scale 1). `batch` must be even (the
    two halves are the two strong views of the same images).
    """
    if batch % 2:
        raise ValueError(f"complementary dropout needs an even batch (two halves), got {batch}")
    half = batch // 2
    k_mask, k_keep = jax.random.split(key)
    first = jax.random.bernoulli(k_mask, 0.5, (half, dim)).astype(jnp.float32) * 2.0
    # The values of a random permutation below n mark a uniformly random n-subset of the pairs.
    kept = (jax.random.permutation(k_keep, half) < int(half * 0.5))[:, None]
    first = jnp.where(kept, 1.0, first)
    second = jnp.where(kept, 1.0, 2.0 - first)
    return jnp.concatenate([first, second], axis=0)
