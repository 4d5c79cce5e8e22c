"""Stopping a run on non-finite values (`train.stop_on_nan`) without a host round-trip per step.

The run loop hands every step's loss scalars (device arrays) to a `LossWatch`, which only keeps
them; `check()` fetches the kept ones in one transfer. The loop checks at the steps where it already
waits for the device (log steps, before every evaluation and checkpoint, at the end), and before
every checkpoint it also checks the state itself (`nonfinite_parts`: one reduction over every
floating-point array, one boolean per part fetched). So a run stops at the first check after a
non-finite loss, and no checkpoint ever holds a non-finite array.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from allspark_jax.errors import NonFiniteError
from allspark_jax.train_step import LOSS_KEYS


def _format(losses: dict) -> str:
    return ", ".join(f"{k}={float(losses[k]):.6g}" for k in LOSS_KEYS if k in losses)


class LossWatch:
    """The losses of the steps since the last check, kept on the device until `check()`."""

    def __init__(self, enabled: bool):
        self.enabled = bool(enabled)
        self._pending: list[tuple[int, dict]] = []

    def add(self, step: int, metrics: dict) -> None:
        """`metrics` of the step that ended at `step` (device scalars; nothing is fetched)."""
        if self.enabled:
            self._pending.append((int(step), {k: metrics[k] for k in LOSS_KEYS if k in metrics}))

    def check(self) -> None:
        """Raises NonFiniteError naming the first step whose losses are not all finite."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        fetched = jax.device_get([losses for _, losses in pending])
        for (step, _), losses in zip(pending, fetched):
            if not all(np.isfinite(v) for v in losses.values()):
                raise NonFiniteError(f"non-finite loss at step {step}: {_format(losses)}")


@jax.jit
def _finite_parts(state) -> dict:
    def part_finite(tree):
        leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
                  if jnp.issubdtype(x.dtype, jnp.inexact)]
        return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)
    return {f.name: part_finite(getattr(state, f.name)) for f in dataclasses.fields(state)
            if f.name not in ("step", "rng")}


def nonfinite_parts(state) -> list[str]:
    """The fields of a TrainState (params, opt_state, memory, ...) that hold a non-finite value."""
    return sorted(name for name, ok in _finite_parts(state).items() if not bool(ok))
