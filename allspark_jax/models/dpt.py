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
encoder maps, passed in (drawn by `models.layers.complementary_dropout_scale`) so that the forward
stays a pure function.

Padded batches (`valid_grid=` of `DINOv2`, `DPTHead`; `valid_size=` of the segmentor, evaluation
only): images of different sizes zero-padded (bottom / right) into one static shape, with their
true sizes as traced (B, 2) int arrays; the true part of each image's output equals its output
alone, to float32 round-off. True sizes through the head, for a true token grid g = (h_b, w_b):
4 g, 2 g, g and ceil(g / 2) (the stride-2 convolution's) for the four scales, 8 g for the logits.
Every 3x3 convolution reads zeros beyond the true region (as PyTorch's zero padding at the true
border) and the align-corners resizes map true size to true size.

UniMatch V2's evaluation ('original' mode, multiplier 14, its `evaluate`) resizes each (H, W) image
(bilinear, align_corners=True) to `eval_input_size` (int(H / 14 + 0.5) * 14, ...), runs the model
and resizes the logits back to (H, W) (the same way), per image. For a padded batch:
`resize_eval_input` (the input canvas and true sizes), the model with valid grids, `resize_to_patch_grid`
(DPT's own resize to (14 h, 14 w)), `resize_eval_output`; `AllSparkSegmentor`'s "eval" mode
chains them (with or without AllSpark between encoder and head).

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
from allspark_jax.models.mit import grid_mask
from allspark_jax.models.resize import (checked_sizes, resize_bilinear_align_corners,
                                        resize_bilinear_align_corners_valid)

Dtype = Any

# The head's parameters that its forward never applies (path under the head): refinenet4 has no
# skip input, so its resConfUnit1 exists (UniMatch V2's model and state dict hold it) but gets no
# gradient. PyTorch's optimisers skip a parameter without a gradient (no weight decay either);
# `allspark_jax.optimizer` leaves these out of the decay to do the same.
NEVER_APPLIED = ("refinenet4", "resConfUnit1")

# UniMatch V2's per-size head (its trainers' `model_configs`) and the encoder blocks that its DPT
# reads (`DPT.intermediate_layer_idx`).
DPT_PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(features=64, out_channels=(48, 96, 192, 384), layers=(2, 5, 8, 11)),
    "base": dict(features=128, out_channels=(96, 192, 384, 768), layers=(2, 5, 8, 11)),
    "large": dict(features=256, out_channels=(256, 512, 1024, 1024), layers=(4, 11, 17, 23)),
    "giant": dict(features=384, out_channels=(1536, 1536, 1536, 1536), layers=(9, 19, 29, 39)),
}
# The head's logits are at HEAD_SCALE x the token grid (4x by resize_layers_0, 2x by refinenet1).
HEAD_SCALE = 8


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


def zero_outside(x: jax.Array, sizes: jax.Array | None) -> jax.Array:
    """(B, h, w, C) -> the same with 0 outside each sample's top-left true (B, 2) `sizes` (None:
    x unchanged): what a zero-padded convolution must read beyond a padded sample's true border."""
    if sizes is None:
        return x
    return jnp.where(grid_mask(sizes, x.shape[1:3])[..., None], x, jnp.zeros((), x.dtype))


class ResidualConvUnit(nn.Module):
    """x + conv2(relu(conv1(relu(x)))), 3x3 convolutions with bias. (B, h, w, F) -> same.
    `valid` (B, 2) int or None: the true sizes of a padded batch (`zero_outside`)."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, valid=None):
        f = x.shape[-1]
        y = conv3x3(f, "conv1", self.dtype)(zero_outside(nn.relu(x), valid))
        return x + conv3x3(f, "conv2", self.dtype)(zero_outside(nn.relu(y), valid))


class FeatureFusionBlock(nn.Module):
    """(x [+ resConfUnit1(skip)]) -> resConfUnit2 -> bilinear (align_corners) to `size` (None:
    twice x's) -> 1x1 out_conv. (B, h, w, F) -> (B, size[0], size[1], F).

    Without a skip (`refinenet4`) resConfUnit1 is not applied; its parameters still exist, as in
    UniMatch V2's model and state dict (they round-trip, and receive no gradient).

    `valid`, `valid_out` (B, 2) int or None: the true sizes of x (and skip) and of the output in a
    padded batch; the convolutions then read zeros beyond `valid` and the resize maps `valid`
    to `valid_out` (outputs outside `valid_out` are out_conv's bias).
    """

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, skip=None, size: tuple[int, int] | None = None, valid=None,
                 valid_out=None):
        unit1 = ResidualConvUnit(self.dtype, name="resConfUnit1")
        if skip is not None:
            x = x + unit1(skip, valid)
        elif self.is_initializing():
            unit1(x)
        x = ResidualConvUnit(self.dtype, name="resConfUnit2")(x, valid)
        size = (2 * x.shape[1], 2 * x.shape[2]) if size is None else tuple(size)
        if valid is None:
            x = resize_bilinear_align_corners(x, size)
        else:
            x = resize_bilinear_align_corners_valid(x, size, valid, valid_out)
        return Conv1x1(x.shape[-1], dtype=self.dtype, name="out_conv")(x)


class DPTHead(nn.Module):
    """Four (B, h, w, D) encoder maps (finest-read first) -> logits (B, 8 h, 8 w, num_classes).

    `channel_scale` (B, D) or None: every map is multiplied by it per (image, channel) before its
    projection (UniMatch V2's complementary dropout), folded into the projections' kernels.
    `valid_grid` (B, 2) int or None: the maps are a padded batch, image b's true token grid the
    top-left valid_grid[b] (traced); its logits, the top-left HEAD_SCALE * valid_grid[b], then
    equal those of its maps alone (the module docstring's true sizes); the rest is 0.
    """

    config: DPTConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], channel_scale=None, valid_grid=None):
        cfg, dt = self.config, self.dtype
        if len(features) != 4:
            raise ValueError(f"DPTHead: expected 4 encoder maps, got {len(features)}")
        if valid_grid is None:
            sizes = [None] * 4
        else:
            g = checked_sizes(valid_grid, features[0].shape[0], "DPTHead: valid_grid")
            sizes = [4 * g, 2 * g, g, (g + 1) // 2]  # (g + 1) // 2: the stride-2 conv's ceil(g / 2)
        outs = []
        for i, (x, ch) in enumerate(zip(features, cfg.out_channels)):
            x = Conv1x1(ch, dtype=dt, name=f"projects_{i}")(x, channel_scale)
            if i == 0:
                x = PatchExpand(ch, 4, dt, name="resize_layers_0")(x)
            elif i == 1:
                x = PatchExpand(ch, 2, dt, name="resize_layers_1")(x)
            elif i == 3:
                x = conv3x3(ch, "resize_layers_3", dt, stride=2)(zero_outside(x, sizes[2]))
            x = zero_outside(x, sizes[i])
            outs.append(conv3x3(cfg.features, f"layer{i + 1}_rn", dt, use_bias=False)(x))
        l1, l2, l3, l4 = outs
        s1, s2, s3, s4 = sizes
        out = None if valid_grid is None else HEAD_SCALE * g
        path = FeatureFusionBlock(dt, name="refinenet4")(l4, size=l3.shape[1:3], valid=s4,
                                                         valid_out=s3)
        path = FeatureFusionBlock(dt, name="refinenet3")(path, l3, size=l2.shape[1:3], valid=s3,
                                                         valid_out=s2)
        path = FeatureFusionBlock(dt, name="refinenet2")(path, l2, size=l1.shape[1:3], valid=s2,
                                                         valid_out=s1)
        path = FeatureFusionBlock(dt, name="refinenet1")(path, l1, valid=s1, valid_out=out)
        y = nn.relu(conv3x3(cfg.features, "output_conv_0", dt)(zero_outside(path, out)))
        return zero_outside(Conv1x1(cfg.num_classes, dtype=dt, name="output_conv_2")(y), out)


def eval_input_size(size: Sequence[int], patch: int = 14) -> tuple[int, int]:
    """UniMatch V2's evaluation size of an (H, W) image ('original' mode, multiplier = patch):
    (int(H / patch + 0.5) * patch, int(W / patch + 0.5) * patch). Non-decreasing in each side, so
    a padded canvas's size is the largest of its images'."""
    return tuple(int(int(s) / patch + 0.5) * patch for s in size[:2])


def eval_input_sizes(valid_size: jax.Array, patch: int = 14) -> jax.Array:
    """`eval_input_size` inside a program: (B, 2) int true (H, W) -> (B, 2) int32. In integers,
    int(s / p + 0.5) = floor((2 s + p) / (2 p)) for s >= 0 (s / p + 0.5 is at least 1 / (2 p) away
    from the next integer when it is not one, far above double round-off). A side below p / 2
    gives 0 (an empty image, as a filler slot; UniMatch V2 fails on it)."""
    s = jnp.asarray(valid_size).astype(jnp.int32)
    return (2 * s + patch) // (2 * patch) * patch


def resize_eval_input(x: jax.Array, valid_size: jax.Array,
                      patch: int = 14) -> tuple[jax.Array, jax.Array]:
    """UniMatch V2's evaluation input resize for a padded batch.

    Args:
      x: (B, H, W, C) images, image b the top-left valid_size[b] (bottom / right padding is never
        read).
      valid_size: (B, 2) int true (height, width), traced.
    Returns:
      (B, H', W', C) with (H', W') = `eval_input_size((H, W))`: image b resized (bilinear,
      align_corners=True) to its own `eval_input_size`, top-left, 0 elsewhere; and those sizes
      (B, 2) int32 (multiples of `patch`: the true token grids are sizes // patch).
    """
    sizes = eval_input_sizes(valid_size, patch)
    canvas = eval_input_size(x.shape[1:3], patch)
    return resize_bilinear_align_corners_valid(x, canvas, valid_size, sizes), sizes


def resize_to_patch_grid(logits: jax.Array, grid: tuple[int, int], patch: int = 14,
                         valid_grid: jax.Array | None = None) -> jax.Array:
    """UniMatch V2's `DPT.forward` resize of the head's logits (B, 8 h, 8 w, K) to (B, patch h,
    patch w, K), (h, w) = `grid` the static token grid (bilinear, align_corners=True).
    `valid_grid` (B, 2) int or None: per image of a padded batch, from HEAD_SCALE * valid_grid to
    patch * valid_grid (0 outside)."""
    size = (patch * grid[0], patch * grid[1])
    if valid_grid is None:
        return resize_bilinear_align_corners(logits, size)
    return resize_bilinear_align_corners_valid(logits, size, HEAD_SCALE * valid_grid,
                                               patch * valid_grid)


def resize_eval_output(logits: jax.Array, size: tuple[int, int], model_sizes: jax.Array,
                       valid_size: jax.Array) -> jax.Array:
    """UniMatch V2's evaluation output resize for a padded batch: (B, H', W', K) logits, image b's
    the top-left model_sizes[b] (`resize_eval_input`'s), -> (B, size[0], size[1], K) float32,
    each resized (bilinear, align_corners=True) to its valid_size[b], 0 outside."""
    return resize_bilinear_align_corners_valid(logits.astype(jnp.float32), size, model_sizes,
                                               valid_size)
