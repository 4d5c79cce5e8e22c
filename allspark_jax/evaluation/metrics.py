"""Pixel counting and mIoU as the release computes them (its `intersectionAndUnion`, summed over the
whole validation set, IoU = I / (U + 1e-10) in percent, mean over ALL classes)."""
from __future__ import annotations

import numpy as np

from allspark_jax.data.datasets import IGNORE_INDEX

IOU_EPSILON = 1e-10  # the release's denominator guard


def confusion_matrix(pred, target, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(K, K) int64 pixel counts: entry [t, p] = pixels of ground-truth class t predicted as p.

    `pred`, `target`: int arrays of one shape (any rank); target pixels equal to `ignore_index`
    are skipped. Raises ValueError for labels outside [0, K) other than the ignore index.
    """
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    target = np.asarray(target).reshape(-1).astype(np.int64)
    if pred.shape != target.shape:
        raise ValueError(f"pred has {pred.size} pixels but target has {target.size}")
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if target.size and (target.max() >= num_classes or target.min() < 0):
        raise ValueError(f"target labels outside [0, {num_classes}) other than {ignore_index}")
    if pred.size and (pred.max() >= num_classes or pred.min() < 0):
        raise ValueError(f"predictions outside [0, {num_classes})")
    return np.bincount(target * num_classes + pred,
                       minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def intersection_and_union(pred, target, num_classes: int, ignore_index: int = IGNORE_INDEX):
    """The release's `intersectionAndUnion`: (intersection, union, target_area), each (K,) int64."""
    conf = confusion_matrix(pred, target, num_classes, ignore_index)
    inter, area_target, area_pred = np.diag(conf), conf.sum(1), conf.sum(0)
    return inter, area_pred + area_target - inter, area_target


def miou(intersection, union) -> tuple[float, np.ndarray]:
    """Mean IoU in percent over ALL classes, and the per-class IoU: I / (U + 1e-10) * 100."""
    iou = (np.asarray(intersection, np.float64) / (np.asarray(union, np.float64) + IOU_EPSILON)
           * 100.0)
    return float(iou.mean()), iou
