"""The optimisers (`optim.name`): the release's SGD with momentum and PyTorch-coupled weight decay,
or UniMatch V2's PyTorch AdamW (decoupled weight decay); both with two learning-rate groups (`lr`
for the encoder, `lr * lr_multi` for the rest) and the poly schedule with its offset."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from allspark_jax.models import dinov2, dpt


def poly_schedule(base_lr: float, total_steps: int, power: float = 0.9) -> Callable:
    """Learning rate of optimizer step t, with the release's offset.

    The release sets the rate AFTER iteration i from iters = i: step 0 runs at the base rate set at
    start-up, and step t >= 1 at base * (1 - (t - 1) / total)^power.
    """

    def schedule(step):
        t = jnp.maximum(step - 1, 0).astype(jnp.float32)
        return base_lr * jnp.maximum(1.0 - t / total_steps, 0.0) ** power

    return schedule


def param_groups(params) -> Any:
    """'encoder' for the backbone (MiT or DINOv2), 'rest' for everything else (the release's two
    groups)."""
    return {k: jax.tree.map(lambda _: "encoder" if k == "backbone" else "rest", v)
            for k, v in params.items()}


# Parameter paths (from the params root) that the forward never applies: the DINOv2 encoder's
# mask token and the DPT head's refinenet4 resConfUnit1 (each module's NEVER_APPLIED says why).
NEVER_APPLIED = (("backbone",) + dinov2.NEVER_APPLIED, ("head",) + dpt.NEVER_APPLIED)


def _applied(path) -> bool:
    keys = tuple(getattr(k, "key", k) for k in path)
    return not any(keys[:len(p)] == p for p in NEVER_APPLIED)


def decayed(params) -> Any:
    """True for every parameter that weight decay applies to: all but those the forward never
    applies (`NEVER_APPLIED`), which PyTorch's optimisers skip (they get no gradient)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _applied(path), params)


def add_decayed_weights(weight_decay: float) -> optax.GradientTransformation:
    """optax.add_decayed_weights on the `decayed` parameters only, with its (empty) state: the
    optimizer state's structure is the same for every model."""

    def update(updates, state, params):
        return jax.tree.map(lambda g, p, on: g + weight_decay * p if on else g, updates, params,
                            decayed(params)), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


# PyTorch AdamW's default epsilon (added to sqrt of the bias-corrected second moment).
ADAMW_EPS = 1e-8


def create_optimizer(optim_config, total_steps: int) -> tuple[optax.GradientTransformation, dict]:
    """The `optim.name` optimiser with two learning-rate groups and weight decay on every parameter
    the forward applies (`decayed`).

    'sgd': PyTorch SGD adds `wd * p` to the gradient before the momentum buffer and multiplies by
    the learning rate after it; add_decayed_weights -> trace -> scale does the same.
    'adamw': PyTorch AdamW (UniMatch V2's) updates p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)
    with p before the step; scale_by_adam -> add_decayed_weights -> scale does the same.
    Returns the transformation and the two schedules {'encoder': fn, 'rest': fn} for logging. The
    optimizer state's structure does not depend on `total_steps`.
    """
    schedules = {
        "encoder": poly_schedule(optim_config.lr, total_steps, optim_config.poly_power),
        "rest": poly_schedule(optim_config.lr * optim_config.lr_multi, total_steps,
                              optim_config.poly_power),
    }
    by_group = optax.multi_transform(
        {g: optax.scale_by_learning_rate(s) for g, s in schedules.items()}, param_groups)
    if optim_config.name == "adamw":
        b1, b2 = optim_config.betas
        tx = optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=ADAMW_EPS),
                         add_decayed_weights(optim_config.weight_decay), by_group)
    elif optim_config.name == "sgd":
        tx = optax.chain(add_decayed_weights(optim_config.weight_decay),
                         optax.trace(decay=optim_config.momentum, nesterov=False), by_group)
    else:
        raise ValueError(f"optim.name={optim_config.name!r}: expected 'sgd' or 'adamw'")
    return tx, schedules
