"""UniMatch V2's DPT segmentation head on a DINOv2 encoder, NHWC.

`DPTHead` (UniMatch V2's `DPTHead` without batch norm, as it builds it): four encoder maps
(B, h, w, D), read from blocks `DPTConfig.layers`, are projected by 1x1 convolutions to
`out_channels` and brought to four scales (4x and 2x by stride-k k x k transposed convolutions,
1x, 1/2x by a stride-2 3x3 convolution); 3x3 convolutions without bias (`layer{i}_rn`) take each
to `features` channels; four fusion blocks (`refinenet4` .. `refinenet1`) merge them coarse to fine
(residual conv units, bilinear upsampling with align_corners=True to the next scale, 1x1 `out_conv`);
`output_conv` (3x3 conv, ReLU, 1x1 conv) gives the logits at 8x the token grid.

UniMatch V2's `DPT` model (DINOv2 encoder + this head, the logits resized to the 14-multiple grid)
is `allspark_jax.models.segmentor.AllSparkSegmentor` with a DINOv2 backbone (`dpt_model`). Its
complementary channel dropout (`comp_drop`, training only) is a per-(image, channel) scale of the
encoder maps, passed in (drawn by `complementary_dropout_scale`) so that the forward stays a pure
function.

Parameter names follow UniMatch V2's state dict (`backbone` = the encoder, `head/projects_{i}`,
`head/resize_layers_{i}`, `head/layer{i}_rn` for `head.scratch.layer{i}_rn`, `refinenet{i}`,
`output_conv_0` / `output_conv_2`); `allspark_jax.weights.dinov2` maps them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from allspark_jax.models.layers import Conv1x1, torch_default_init
from allspark_jax.models.resize import resize_bilinear_align_corners

Dtype = Any

# UniMatch V2's per-size head (its trainers' `model_configs`) and the encoder blocks that its DPT
# reads (`DPT.intermediate_layer_idx`).
DPT_PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(features=64, out_channels=(48, 96, 192, 384), layers=(2, 5, 8, 11)),
    "base": dict(features=128, out_channels=(96, 192, 384, 768), layers=(2, 5, 8, 11)),
    "large": dict(features=256, out_channels=(256, 512, 1024, 1024), layers=(4, 11, 17, 23)),
    "giant": dict(features=384, out_channels=(1536, 1536, 1536, 1536), layers=(9, 19, 29, 39)),
}


@dataclasses.dataclass(frozen=True)
class DPTConfig:
    """UniMatch V2's DPT head. `preset(name, num_classes)` gives its head for each encoder size."""

    num_classes: int = 21
    features: int = 128
    out_channels: tuple[int, ...] = (96, 192, 384, 768)
    # Encoder blocks read, finest scale first (4 of them, increasing).
    layers: tuple[int, ...] = (2, 5, 8, 11)

    @classmethod
    def preset(cls, name: str, **overrides) -> "DPTConfig":
        key = name.lower().removeprefix("dinov2_")
        if key not in DPT_PRESETS:
            raise ValueError(f"unknown DPT size {name!r}; expected one of {sorted(DPT_PRESETS)}")
        return cls(**{**DPT_PRESETS[key], **overrides})

    def __post_init__(self):
        if len(self.out_channels) != 4 or len(self.layers) != 4:
            raise ValueError(f"DPT config: out_channels {self.out_channels} and layers "
                             f"{self.layers} must have 4 entries each")
        if list(self.layers) != sorted(set(self.layers)) or self.layers[0] < 0:
            raise ValueError(f"DPT config: layers {self.layers} must be increasing block indices")
        if self.num_classes < 1 or self.features < 1 or min(self.out_channels) < 1:
            raise ValueError(f"DPT config: num_classes {self.num_classes}, features "
                             f"{self.features} and out_channels {self.out_channels} must be >= 1")


def conv3x3(features: int, name: str, dtype: Dtype, use_bias: bool = True,
            stride: int = 1) -> nn.Conv:
    """A PyTorch-initialised 3x3 convolution with padding 1. Kernel (3, 3, in, out)."""
    return nn.Conv(features, (3, 3), (stride, stride), padding=((1, 1), (1, 1)),
                   use_bias=use_bias, kernel_init=torch_default_init, dtype=dtype, name=name)


class PatchExpand(nn.Module):
    """A transposed convolution with kernel = stride = k and no padding. (B, h, w, C) ->
    (B, k h, k w, features).

    Each input pixel writes its own k x k output block: out[k i + a, k j + c] = x[i, j] @
    kernel[a, c] + bias, kernel (k, k, C, features) (PyTorch's ConvTranspose2d weight
    (C, features, k, k) transposed to (2, 3, 0, 1)). Computed as one matmul and a reshape: the
    blocks do not overlap.
    """

    features: int
    k: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        kernel = self.param("kernel", torch_default_init, (self.k, self.k, c, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jnp.einsum("bhwc,ijco->bhiwjo", x, kernel)
        return y.reshape(b, h * self.k, w * self.k, self.features) + bias


class ResidualConvUnit(nn.Module):
    """x + conv2(relu(conv1(relu(x)))), 3x3 convolutions with bias. (B, h, w, F) -> same."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        f = x.shape[-1]
        y = conv3x3(f, "conv1", self.dtype)(nn.relu(x))
        return x + conv3x3(f, "conv2", self.dtype)(nn.relu(y))


class FeatureFusionBlock(nn.Module):
    """(x [+ resConfUnit1(skip)]) -> resConfUnit2 -> bilinear (align_corners) to `size` (None:
    twice x's) -> 1x1 out_conv. (B, h, w, F) -> (B, size[0], size[1], F).

    Without a skip (`refinenet4`) resConfUnit1 is not applied; its parameters still exist, as in
    UniMatch V2's model and state dict (they round-trip, and receive no gradient).
    """

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, skip=None, size: tuple[int, int] | None = None):
        unit1 = ResidualConvUnit(self.dtype, name="resConfUnit1")
        if skip is not None:
            x = x + unit1(skip)
        elif self.is_initializing():
            unit1(x)
        x = ResidualConvUnit(self.dtype, name="resConfUnit2")(x)
        size = (2 * x.shape[1], 2 * x.shape[2]) if size is None else tuple(size)
        x = resize_bilinear_align_corners(x, size)
        return Conv1x1(x.shape[-1], dtype=self.dtype, name="out_conv")(x)


class DPTHead(nn.Module):
    """Four (B, h, w, D) encoder maps (finest-read first) -> logits (B, 8 h, 8 w, num_classes).

    `channel_scale` (B, D) or None: every map is multiplied by it per (image, channel) before its
    projection (UniMatch V2's complementary dropout), folded into the projections' kernels.
    """

    config: DPTConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], channel_scale=None):
        cfg, dt = self.config, self.dtype
        if len(features) != 4:
            raise ValueError(f"DPTHead: expected 4 encoder maps, got {len(features)}")
        outs = []
        for i, (x, ch) in enumerate(zip(features, cfg.out_channels)):
            x = Conv1x1(ch, dtype=dt, name=f"projects_{i}")(x, channel_scale)
            if i == 0:
                x = PatchExpand(ch, 4, dt, name="resize_layers_0")(x)
            elif i == 1:
                x = PatchExpand(ch, 2, dt, name="resize_layers_1")(x)
            elif i == 3:
                x = conv3x3(ch, "resize_layers_3", dt, stride=2)(x)
            outs.append(conv3x3(cfg.features, f"layer{i + 1}_rn", dt, use_bias=False)(x))
        l1, l2, l3, l4 = outs
        path = FeatureFusionBlock(dt, name="refinenet4")(l4, size=l3.shape[1:3])
        path = FeatureFusionBlock(dt, name="refinenet3")(path, l3, size=l2.shape[1:3])
        path = FeatureFusionBlock(dt, name="refinenet2")(path, l2, size=l1.shape[1:3])
        path = FeatureFusionBlock(dt, name="refinenet1")(path, l1)
        y = nn.relu(conv3x3(cfg.features, "output_conv_0", dt)(path))
        return Conv1x1(cfg.num_classes, dtype=dt, name="output_conv_2")(y)


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
