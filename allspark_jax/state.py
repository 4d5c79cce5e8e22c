"""The train state: everything a run needs to continue, one pytree, checkpointed whole."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from allspark_jax import sharding
from allspark_jax.models.segmentor import AllSparkSegmentor, init_variables

# Fields holding parameter-shaped trees: split over devices with `shard_params`.
PARAMETER_FIELDS = ("params", "opt_state", "ema_params")


@flax.struct.dataclass
class TrainState:
    """step: () int32 optimizer steps taken. params / batch_stats / memory: the student's variables
    (memory = {'allspark': {'attn': {'kv_queue': (K, C, n), 'queue_ptr': (K,)}}}; None for a model
    without AllSpark, config.method 'semi' / 'supervised'). ema_params /
    ema_batch_stats: the EMA teacher (None when the teacher is the online model). opt_state: the
    optimiser's (`optim.name`: SGD's momentum, or AdamW's step count and moments). rng: the run's base PRNG key as raw key data (uint32, so that it checkpoints and
    crosses hosts like any array); step t's dropout key is fold_in(rng, t).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    memory: Any
    opt_state: Any
    ema_params: Any
    ema_batch_stats: Any
    rng: jax.Array

    def variables(self, teacher: bool = False) -> dict:
        """The model variables of the student, or of the EMA teacher when there is one."""
        if teacher and self.ema_params is not None:
            return {"params": self.ema_params, "batch_stats": self.ema_batch_stats}
        student = {"params": self.params, "batch_stats": self.batch_stats}
        return student if self.memory is None else {**student, "memory": self.memory}


def create_train_state(model: AllSparkSegmentor, tx: optax.GradientTransformation, rng: jax.Array,
                       crop_size: int, *, ema: bool, variables: dict | None = None) -> TrainState:
    """A fresh state; `variables` (e.g. imported official weights) replaces the initialisation.

    Under `jax.eval_shape` it is the restore template of a checkpoint (no initialisation runs).
    """
    init_rng, state_rng = jax.random.split(rng)
    if variables is None:
        variables = init_variables(model, init_rng, crop_size)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables["batch_stats"],
        memory=variables.get("memory"), opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params) if ema else None,
        ema_batch_stats=jax.tree.map(jnp.copy, variables["batch_stats"]) if ema else None,
        rng=jax.random.key_data(state_rng))


def state_sharding(state: TrainState, mesh, shard_params: bool = False) -> TrainState:
    """A sharding for every leaf: replicated, or parameter-shaped fields split (`shard_params`)."""
    fields = {}
    for name in TrainState.__dataclass_fields__:
        tree = getattr(state, name)
        split = shard_params and name in PARAMETER_FIELDS
        fields[name] = sharding.fsdp(tree, mesh) if split else sharding.replicate(tree, mesh)
    return TrainState(**fields)
