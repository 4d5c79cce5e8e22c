"""Bilinear resizing with PyTorch's `F.interpolate(mode='bilinear', align_corners=False)` semantics."""
from __future__ import annotations

import jax


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(B, H, W, C) -> (B, h, w, C); half-pixel centres, edge-clamped, NO antialiasing.

    `jax.image.resize` antialiases when downsampling by default; PyTorch's bilinear interpolation
    does not, and the AllSpark grouping downsamples the teacher's logits (SPEC 3a).
    """
    b, _, _, c = x.shape
    return jax.image.resize(x, (b, size[0], size[1], c), method="bilinear", antialias=False)
