"""SegFormer's all-MLP decode head, NHWC."""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from allspark_jax.models.layers import Conv1x1, TorchBatchNorm, torch_default_init
from allspark_jax.models.resize import resize_bilinear, resize_bilinear_valid

Dtype = Any

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
