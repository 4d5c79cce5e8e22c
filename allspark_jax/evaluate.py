"""Evaluation as the release does it: per-image predictions, mIoU over the whole validation set.

Modes (SPEC 4, "Evaluation"):
  * ``original``       the whole image at its own size;
  * ``center_crop``    the central crop_size x crop_size window (image and mask);
  * ``sliding_window`` windows of crop_size at stride floor(2/3 * crop_size), clipped at the borders,
                       softmax probabilities summed, argmax.
Every image is predicted on its own ("eval" mode), so its result never depends on the others.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = 255
EVAL_MODES = ("original", "center_crop", "sliding_window")


def intersection_and_union(pred, target, num_classes: int, ignore_index: int = IGNORE_INDEX):
    """The release's `intersectionAndUnion`: per-class pixel counts.

    Args:
      pred, target: int arrays of the same shape (any rank); target pixels equal to
        `ignore_index` are excluded.
    Returns:
      (intersection, union, target_area), each (num_classes,) int32.
    """
    pred, target = jnp.asarray(pred).reshape(-1), jnp.asarray(target).reshape(-1)
    valid = target != ignore_index
    out_of_range = num_classes  # bincount bin that is cut off below
    pred = jnp.where(valid, pred, out_of_range)
    target = jnp.where(valid, target, out_of_range)
    count = lambda x: jnp.bincount(x, length=num_classes + 1)[:num_classes]  # noqa: E731
    inter = count(jnp.where(pred == target, pred, out_of_range))
    area_pred, area_target = count(pred), count(target)
    return inter, area_pred + area_target - inter, area_target


def miou(intersection, union) -> tuple[float, np.ndarray]:
    """Mean IoU in percent over ALL classes, and the per-class IoU: I / (U + 1e-10) * 100."""
    iou = np.asarray(intersection, np.float64) / (np.asarray(union, np.float64) + 1e-10) * 100.0
    return float(iou.mean()), iou
