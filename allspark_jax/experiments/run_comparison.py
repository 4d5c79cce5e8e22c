"""Two training runs of one task compared (`versus_release_training`: ours against the
release's): losses step by step, final states tensor by tensor, and where AllSpark's Semantic
Memories part.

States are dicts of numpy arrays under the release's state-dict names; losses are lists, one value
per optimizer step.
"""
from __future__ import annotations

import numpy as np


def relative_diff(a, b) -> np.ndarray:
    """|a - b| / |b| elementwise (inf where b is 0 and a is not)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.abs(a - b) / np.abs(b)
    return np.where(a == b, 0.0, d)


def first_step_over(ours, release, tol: float):
    """The first step (1-based: after that many optimizer steps; the loss of step t is that of the
    t-th batch) whose values differ by more than `tol` relative, or None."""
    n = min(len(ours), len(release))
    over = np.nonzero(relative_diff(ours[:n], release[:n]) > tol)[0]
    return int(over[0]) + 1 if over.size else None


def state_diff(ours: dict, release: dict, param_names) -> dict:
    """Two state dicts (release names) compared: the relative L2 difference over every parameter
    and over every floating-point buffer, and the parameter tensor with the largest absolute
    difference."""
    def rel(names):
        num = sum(float(np.sum((np.asarray(ours[k], np.float64) - release[k]) ** 2)) for k in names)
        den = sum(float(np.sum(np.asarray(release[k], np.float64) ** 2)) for k in names)
        return float(np.sqrt(num / den)) if den else 0.0

    def max_abs(k):
        return float(np.max(np.abs(np.asarray(ours[k], np.float64) - release[k]), initial=0.0))
    params = sorted(param_names)
    buffers = sorted(k for k in release if k not in param_names
                     and np.issubdtype(np.asarray(release[k]).dtype, np.floating))
    worst = max(params, key=max_abs) if params else None
    return {"params_rel_diff": rel(params),
            "params_worst": {"name": worst, "max_abs_diff": max_abs(worst) if worst else 0.0},
            "buffers_rel_diff": rel(buffers)}


def tensor_diffs(ours: dict, release: dict, top: int = 5) -> dict:
    """Two states (release names) at the same step, tensor by tensor: the `top` floating-point
    tensors with the largest relative L2 difference, and the Semantic Memory's write pointers of
    both sides (integers: a class whose pointer differs was written a different number of
    channels)."""
    rel = {}
    for k, b in release.items():
        b = np.asarray(b)
        if np.issubdtype(b.dtype, np.floating):
            den = float(np.linalg.norm(b.astype(np.float64)))
            num = float(np.linalg.norm(np.asarray(ours[k], np.float64) - b))
            rel[k] = num / den if den else num
    worst = sorted(rel, key=rel.get, reverse=True)[:top]
    out = {"worst": [[k, rel[k]] for k in worst]}
    for k in release:
        if k.endswith("queue_ptr"):
            out["queue_ptr"] = {"ours": np.asarray(ours[k]).tolist(),
                                "release": np.asarray(release[k]).tolist()}
    return out


def channel_margins(similarity) -> np.ndarray:
    """(b, K, C) channel-class similarities -> (b, C): each channel's best minus its second-best
    class similarity (how far its class is from flipping)."""
    top = np.sort(np.asarray(similarity, np.float64), axis=1)
    return top[:, -1] - top[:, -2]


def memory_parting(step: int, ours_ptr, release_ptr, internals: dict, top: int = 5) -> dict:
    """Where the two sides' Semantic Memory write pointers first differ (after optimizer step
    `step`), explained by our channel grouping at that step.

    A channel grouped under class a by one side and b by the other moves one write from b's FIFO to
    a's: a's pointer runs one ahead, b's one behind (modulo C). `internals` is our training-mode
    forward of that step (`inspection.allspark_internals` from the state before it, on its batch);
    the candidates are our channels whose class gained a write and whose runner-up lost one, the
    `top` with the smallest margins (best minus runner-up similarity); `closest` are the `top`
    channels of any classes with the smallest margins at that step (two flips that share a class,
    a -> b and b -> c, show there as a near-tie each)."""
    ours_ptr, release_ptr = np.asarray(ours_ptr, np.int64), np.asarray(release_ptr, np.int64)
    sim = np.asarray(internals["channel_class_similarity"], np.float64)  # (b, K, C)
    c = sim.shape[2]
    delta = (ours_ptr - release_ptr + c // 2) % c - c // 2  # ours minus the release's writes
    gained, lost = np.nonzero(delta > 0)[0], np.nonzero(delta < 0)[0]
    order = np.argsort(sim, axis=1)
    best, second = order[:, -1], order[:, -2]
    margins = channel_margins(sim)
    cand = np.isin(best, gained) & np.isin(second, lost)
    images, channels = np.nonzero(cand)
    rank = np.argsort(margins[images, channels])[:top]

    def call(i, c):
        return {"image": int(i), "channel": int(c), "ours_class": int(best[i, c]),
                "runner_up": int(second[i, c]), "similarity": float(sim[i, best[i, c], c]),
                "margin": float(margins[i, c])}
    closest = np.argsort(margins, axis=None)[:top]
    return {
        "step": int(step), "ours_ptr": ours_ptr.tolist(), "release_ptr": release_ptr.tolist(),
        "ours_minus_release_writes": {int(k): int(delta[k]) for k in np.nonzero(delta)[0]},
        "candidates": [call(images[i], channels[i]) for i in rank],
        "closest": [call(*np.unravel_index(j, margins.shape)) for j in closest],
        "smallest_margin": float(margins.min()), "median_margin": float(np.median(margins)),
    }
