"""AllSpark training: the train state, the official optimiser and one jitted train step (SPEC 4).

A step, as the release's train_allspark.py iteration:
  1. teacher pass ("teacher" mode: BN running statistics, no dropout, no memory) on the unlabeled
     weak view -> logits; pseudo-labels = argmax;
  2. student pass ("train" mode) on concat(labeled, unlabeled student view): BN batch statistics
     over the whole global batch, dropout, stochastic depth, memory update; the memory is read by
     the labeled-to-unlabeled attention once `use_memory` (epoch >= warmup_epoch);
  3. loss = (loss_x + loss_u) / 2; SGD with momentum and coupled weight decay; poly learning rate,
     `lr` for the encoder and `lr * lr_multi` for the rest.
Batches are dicts of NHWC arrays: image_l (B, S, S, 3), mask_l (B, S, S), image_u_w, image_u_s
(B, S, S, 3), pad_u (B, S, S) bool.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.struct
import jax
import jax.numpy as jnp
import optax

from allspark_jax import losses
from allspark_jax.models.segmentor import AllSparkSegmentor, init_variables

IGNORE_INDEX = 255


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: a pytree, checkpointed whole.

    step: () int32 optimizer steps taken. params / batch_stats / memory: the student's variables
    (memory = {'allspark': {'attn': {'kv_queue': (K, C, n), 'queue_ptr': (K,)}}}). ema_params /
    ema_batch_stats: the EMA teacher (None when the teacher is the online model). opt_state: SGD
    momentum. rng: the run's base PRNG key as raw key data (uint32, so that it checkpoints and
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
        if teacher and self.ema_params is not None:
            return {"params": self.ema_params, "batch_stats": self.ema_batch_stats}
        return {"params": self.params, "batch_stats": self.batch_stats, "memory": self.memory}


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
    """'encoder' for the MiT backbone, 'rest' for AllSpark and the head (the release's two groups)."""
    return {k: jax.tree.map(lambda _: "encoder" if k == "backbone" else "rest", v)
            for k, v in params.items()}


def create_optimizer(optim_config, total_steps: int) -> tuple[optax.GradientTransformation, dict]:
    """SGD, momentum, PyTorch-coupled weight decay on every parameter, two learning-rate groups.

    PyTorch SGD adds `wd * p` to the gradient before the momentum buffer and multiplies by the
    learning rate after it; optax's add_decayed_weights -> trace -> scale does the same.
    Returns the transformation and the two schedules {'encoder': fn, 'rest': fn} for logging.
    """
    schedules = {
        "encoder": poly_schedule(optim_config.lr, total_steps, optim_config.poly_power),
        "rest": poly_schedule(optim_config.lr * optim_config.lr_multi, total_steps,
                              optim_config.poly_power),
    }
    tx = optax.chain(
        optax.add_decayed_weights(optim_config.weight_decay),
        optax.trace(decay=optim_config.momentum, nesterov=False),
        optax.multi_transform({g: optax.scale_by_learning_rate(s) for g, s in schedules.items()},
                              param_groups),
    )
    return tx, schedules


def create_train_state(model: AllSparkSegmentor, tx: optax.GradientTransformation, rng: jax.Array,
                       crop_size: int, *, ema: bool, variables: dict | None = None) -> TrainState:
    """A fresh state; `variables` (e.g. imported official weights) replaces the initialisation."""
    init_rng, state_rng = jax.random.split(rng)
    if variables is None:
        variables = init_variables(model, init_rng, crop_size)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables["batch_stats"],
        memory=variables["memory"], opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params) if ema else None,
        ema_batch_stats=jax.tree.map(jnp.copy, variables["batch_stats"]) if ema else None,
        rng=jax.random.key_data(state_rng))


def supervised_loss(logits, target, train_config):
    """loss_x: CE (ignore 255) or the release's OHEM, per `train_config.loss_x`."""
    if train_config.loss_x == "ce":
        return losses.cross_entropy(logits, target, groups=train_config.loss_groups)
    if train_config.loss_x == "ohem":
        return losses.ohem_cross_entropy(logits, target, thresh=train_config.ohem_thresh,
                                         min_kept=train_config.ohem_min_kept,
                                         groups=train_config.loss_groups)
    raise ValueError(f"config.train.loss_x must be 'ce' or 'ohem', got {train_config.loss_x!r}")


def pseudo_labels(teacher_logits, pad_u, train_config):
    """argmax of the teacher; optionally 255 below a confidence threshold and on padded pixels."""
    label = jnp.argmax(teacher_logits, axis=-1).astype(jnp.int32)
    if train_config.conf_thresh > 0:
        conf = jnp.max(jax.nn.softmax(teacher_logits, axis=-1), axis=-1)
        label = jnp.where(conf >= train_config.conf_thresh, label, IGNORE_INDEX)
    if train_config.loss_u_ignore_padding:
        label = jnp.where(pad_u, IGNORE_INDEX, label)
    return label


def train_step(state: TrainState, batch: dict, *, model: AllSparkSegmentor,
               tx: optax.GradientTransformation, train_config, use_memory: bool):
    """One official AllSpark iteration. Returns (new state, metrics dict of scalars + 'grads')."""
    teacher_logits = jax.lax.stop_gradient(model.apply(
        state.variables(teacher=train_config.teacher == "ema"), batch["image_u_w"], mode="teacher",
        key_group_size=train_config.key_group_size))
    pseudo = pseudo_labels(teacher_logits, batch["pad_u"], train_config)
    x = jnp.concatenate([batch["image_l"], batch["image_u_s"]], axis=0)
    n_l = batch["image_l"].shape[0]
    dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats, "memory": state.memory}, x,
            mode="train", teacher_logits=teacher_logits, use_memory=use_memory,
            rngs={"dropout": dropout_rng}, mutable=["batch_stats", "memory"])
        loss_x = supervised_loss(logits[:n_l], batch["mask_l"], train_config)
        loss_u = losses.cross_entropy(logits[n_l:], pseudo, groups=train_config.loss_groups)
        return (loss_x + loss_u) / 2, (loss_x, loss_u, updates)

    (loss, (loss_x, loss_u, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    opt_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, opt_updates)
    ema_params, ema_batch_stats = state.ema_params, state.ema_batch_stats
    if ema_params is not None:
        d = train_config.ema_decay
        ema_params = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema_params, params)
        # BN running statistics are themselves averages: the teacher takes the student's.
        ema_batch_stats = updates["batch_stats"]
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=updates["batch_stats"],
        memory=updates["memory"], opt_state=opt_state, ema_params=ema_params,
        ema_batch_stats=ema_batch_stats)
    metrics = {"loss": loss, "loss_x": loss_x, "loss_u": loss_u, "pseudo_label": pseudo,
               "grads": grads}
    return new_state, metrics


def make_train_step(model: AllSparkSegmentor, tx: optax.GradientTransformation, train_config, *,
                    use_memory: bool, state_sharding=None, batch_sharding=None,
                    with_outputs: bool = False):
    """The jitted step. `use_memory` is static: a run compiles one step before warm-up, one after.

    The state buffers are donated. Unless `with_outputs`, only the scalar losses leave the step
    (the pseudo-labels and gradients are for verification).
    """

    def step(state, batch):
        state, metrics = train_step(state, batch, model=model, tx=tx, train_config=train_config,
                                    use_memory=use_memory)
        if not with_outputs:
            metrics = {k: metrics[k] for k in ("loss", "loss_x", "loss_u")}
        return state, metrics

    kwargs = {}
    if state_sharding is not None:
        kwargs = dict(in_shardings=(state_sharding, batch_sharding),
                      out_shardings=(state_sharding, None))
    return jax.jit(step, donate_argnums=(0,), **kwargs)
