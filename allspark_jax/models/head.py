"""SegFormer all-MLP decode head and a PyTorch-semantics BatchNorm, NHWC."""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from allspark_jax.models.resize import resize_bilinear

Dtype = Any

# PyTorch's default Linear/Conv init (kaiming-uniform with a = sqrt(5)): U(+-1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


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
        if train:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x32, axes)
            var = jnp.mean(jnp.square(x32 - mean), axes)
            if not self.is_initializing():
                n = x32.size // c
                m = self.momentum
                mean_v.value = (1 - m) * mean_v.value + m * jax.lax.stop_gradient(mean)
                var_v.value = (1 - m) * var_v.value + m * jax.lax.stop_gradient(var) * n / max(n - 1, 1)
                count_v.value = count_v.value + 1
        else:
            mean, var = mean_v.value, var_v.value
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(x.dtype)


class MLPProjection(nn.Module):
    """Per-stage token projection `linear_ci.proj`. (B, h, w, C_i) -> (B, h, w, E)."""

    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.dim, kernel_init=torch_default_init,
                        bias_init=nn.initializers.zeros, dtype=self.dtype, name="proj")(x)


class ConvBNReLU(nn.Module):
    """`linear_fuse`: 1x1 conv without bias -> BatchNorm -> ReLU."""

    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(self.dim, (1, 1), use_bias=False, kernel_init=torch_default_init,
                    dtype=self.dtype, name="conv")(x)
        return nn.relu(TorchBatchNorm(name="bn")(x, train))


class SegFormerHead(nn.Module):
    """All-MLP decoder. Four maps (B, h_i, w_i, C_i) -> logits (B, h_1, w_1, num_classes).

    The stage-2..4 projections are upsampled to the stage-1 grid and concatenated as
    [c4, c3, c2, c1] (the release's order, which fixes the layout of `linear_fuse`'s kernel).
    """

    num_classes: int
    embed_dim: int = 768
    dropout: float = 0.1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], train: bool = False):
        size = features[0].shape[1:3]
        projected = []
        for i in (4, 3, 2, 1):
            y = MLPProjection(self.embed_dim, self.dtype, name=f"linear_c{i}")(features[i - 1])
            projected.append(y if i == 1 else resize_bilinear(y, size))
        x = ConvBNReLU(self.embed_dim, self.dtype, name="linear_fuse")(
            jnp.concatenate(projected, axis=-1), train)
        # Dropout2d: whole channels of a sample are dropped together.
        x = nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)(x)
        return nn.Conv(self.num_classes, (1, 1), kernel_init=torch_default_init,
                       dtype=self.dtype, name="linear_pred")(x)
