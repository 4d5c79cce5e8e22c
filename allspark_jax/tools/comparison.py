"""Comparing our outputs with recorded ones: one `Result` per case, `compare` per tensor.

Tolerance: per tensor, ||ours - reference|| / ||reference||; integer tensors must be equal.
"""
from __future__ import annotations

import dataclasses

import numpy as np

# Forward computations from a recorded state (encoder, eval_single, train_forward_*, losses,
# learning rates, the losses of step 0; the DPT recordings' layers and logits) agree to float32
# round-off: <= 5.1e-7 on allspark_tiny.npz, <= 1.1e-6 on the DPT recordings.
# 2e-6 leaves headroom for other BLAS/XLA builds yet fails real mistakes of that size, e.g. a
# BatchNorm running variance from the biased estimator (5.9e-6 on the shipped file).
FORWARD_RTOL = 2e-6
# Gradients, states after optimizer steps and the losses computed from those states accumulate
# round-off through backward passes and updates (<= 3.3e-6 on allspark_tiny.npz).
TRAINED_RTOL = 1e-4
# Pseudo-labels are argmaxes: a near-tie may flip; at most 1 pixel in 10^4 may differ.
PSEUDO_LABEL_AGREEMENT = 0.9999


@dataclasses.dataclass
class Result:
    name: str
    max_rel: float
    max_abs: float
    ok: bool
    rtol: float
    note: str = ""
    fallback: str = ""  # set when the case passed only through the ReLU-kink fallback

    @property
    def status(self) -> str:
        return "FAIL" if not self.ok else "ok*" if self.fallback else "ok"

    def line(self) -> str:
        notes = "; ".join(filter(None, (self.fallback and f"fallback: {self.fallback}", self.note)))
        return (f"{self.status:<4} {self.name:<34} max rel {self.max_rel:.2e}  "
                f"max abs {self.max_abs:.2e}  tol {self.rtol:.0e}"
                + (f"  ({notes})" if notes else ""))


def nhwc(x):
    return np.transpose(x, (0, 2, 3, 1)) if x.ndim == 4 else x


def _non_finite(side: str, key: str, x: np.ndarray) -> str:
    if x.dtype.kind not in "fc" or np.isfinite(x).all():
        return ""
    nan, inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
    return f"{side} {key}: {nan} NaN, {inf} inf"


def compare(name: str, pairs: dict[str, tuple[np.ndarray, np.ndarray]], rtol: float,
            note: str = "") -> Result:
    """Per-tensor relative error for floats, which must all be finite; integers must be equal."""
    max_rel = max_abs = 0.0
    ok, problems = True, []
    for key, (out, ref) in pairs.items():
        out, ref = np.asarray(out), np.asarray(ref)
        if out.shape != ref.shape:
            return Result(name, np.inf, np.inf, False, rtol,
                          f"{key}: shape {out.shape} vs {ref.shape}")
        bad = [m for m in (_non_finite("ours", key, out), _non_finite("reference", key, ref)) if m]
        if bad:  # the norms below would be NaN, which max() drops: it used to print as 0.0
            problems += bad
            ok, max_rel, max_abs = False, np.inf, np.inf
            continue
        diff = out.astype(np.float64) - ref.astype(np.float64)
        abs_err = float(np.abs(diff).max()) if diff.size else 0.0
        if ref.dtype.kind in "iub":
            rel = 0.0 if abs_err == 0 else np.inf
        else:
            rel = float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30))
        ok &= rel <= rtol
        max_rel, max_abs = max(max_rel, rel), max(max_abs, abs_err)
    if problems:
        note = "; ".join(filter(None, ["NON-FINITE " + ", ".join(problems), note]))
    return Result(name, max_rel, max_abs, ok, rtol, note)
