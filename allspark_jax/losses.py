"""Segmentation losses of the release: cross-entropy with an ignore label, and probability OHEM.

Layouts: logits (B, H, W, K) float; targets (B, H, W) int with `ignore_index` for unlabeled pixels.
Every loss takes `groups`: the batch is split into that many equal groups, the loss is computed per
group and averaged. With `groups` = the release's number of processes this reproduces DDP, where
each GPU averages over its own pixels (and OHEM ranks its own pixels) before gradients are averaged.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from allspark_jax.data.datasets import IGNORE_INDEX


def _per_group(fn, groups: int, *arrays):
    """mean over `groups` equal batch groups of fn(*each array's group)."""
    b = arrays[0].shape[0]
    if b % groups:
        raise ValueError(f"loss groups={groups} must divide the batch of {b}")
    split = lambda x: x.reshape(groups, b // groups, *x.shape[1:])  # noqa: E731
    return jnp.mean(jax.vmap(fn)(*map(split, arrays)))


def _nll(logits, target):
    """-log p[target] per pixel (float32); target values outside [0, K) give 0."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    # A select against the class index rather than a gather: the gradient of a gather is a
    # scatter-add, which XLA:CPU runs as a serial loop over the pixels; a select's is elementwise.
    hit = target[..., None] == jnp.arange(logp.shape[-1], dtype=target.dtype)
    return -jnp.sum(jnp.where(hit, logp, 0.0), axis=-1)


def _masked_ce(logits, target, keep):
    """Mean of -log p[target] over pixels where `keep`; 0 when no pixel is kept."""
    nll = _nll(logits, target)
    return jnp.sum(jnp.where(keep, nll, 0.0)) / jnp.maximum(jnp.sum(keep), 1)


def cross_entropy(logits, target, *, ignore_index: int = IGNORE_INDEX, groups: int = 1):
    """`nn.CrossEntropyLoss(ignore_index=...)`: mean over the non-ignored pixels."""
    fn = lambda lg, t: _masked_ce(lg, t, t != ignore_index)  # noqa: E731
    return _per_group(fn, groups, logits, target)


def ohem_cross_entropy(logits, target, *, thresh: float = 0.7, min_kept: int = 200000,
                       ignore_index: int = IGNORE_INDEX, groups: int = 1):
    """The release's `ProbOhemCrossEntropy2d`.

    Among valid pixels: if fewer than `min_kept` are valid, plain CE. Otherwise rank the softmax
    probability of each pixel's true class (ignored pixels count as probability 1, so they rank
    last); the threshold is the `min_kept`-th smallest probability if that exceeds `thresh`, else
    `thresh`; CE over the valid pixels whose probability is <= threshold.
    """

    def fn(lg, t):
        valid = t != ignore_index
        prob = jax.nn.softmax(lg.astype(jnp.float32), axis=-1)
        p_true = jnp.take_along_axis(prob, jnp.where(valid, t, 0)[..., None], axis=-1)[..., 0]
        p_true = jnp.where(valid, p_true, 1.0).reshape(-1)
        k = min(min_kept, p_true.size)
        kth = jnp.sort(p_true)[max(k - 1, 0)]
        threshold = jnp.where(kth > thresh, kth, thresh)
        keep = valid & (p_true.reshape(t.shape) <= threshold)
        use_ohem = (jnp.sum(valid) >= min_kept) & (min_kept > 0)
        return jnp.where(use_ohem, _masked_ce(lg, t, keep), _masked_ce(lg, t, valid))

    return _per_group(fn, groups, logits, target)


def confident_cross_entropy(logits, target, confident, valid, *, groups: int = 1):
    """UniMatch V2's unlabeled loss: -log p[target] summed over the pixels that are `confident`
    (the teacher's confidence >= its threshold) and `valid` (not ignored), divided by the count of
    `valid` pixels (confident or not); 0 for a group without a valid pixel.

    confident, valid: (B, H, W) bool; target (B, H, W) int, the teacher's argmax.
    """

    def fn(lg, t, conf, ok):
        nll = _nll(lg, t)
        return jnp.sum(jnp.where(conf & ok, nll, 0.0)) / jnp.maximum(jnp.sum(ok), 1)

    return _per_group(fn, groups, logits, target, confident, valid)
