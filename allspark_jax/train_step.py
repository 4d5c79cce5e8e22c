"""One training iteration of each of the release's trainers (`method.Method`), jitted.

'allspark' (train_allspark.py) and 'semi' (train_baseline_semi.py, the model without AllSpark):
  1. teacher pass ("teacher" mode: BN running statistics, no dropout, no memory) on the unlabeled
     weak view -> logits; pseudo-labels = argmax (optionally 255 below `conf_thresh` / on padding);
  2. CutMix (when the batch carries `cutmix_u`): inside image i's box the student sees unlabeled
     image i - 1 (mod B) of the global batch and learns its pseudo-labels (`cutmix`);
  3. student pass ("train" mode) on concat(labeled, unlabeled student view): BN batch statistics
     over the whole global batch, dropout, stochastic depth; with AllSpark the memory update, and the
     memory is read by the labeled-to-unlabeled attention once `use_memory` (epoch >= warmup_epoch);
     before that its keys, as the teacher's, are the unlabeled images of the labeled image's group
     of `key_group_size` (None: the whole global batch);
  4. loss = (loss_x + loss_u) / 2; the optimiser update (`allspark_jax.optimizer`); the EMA teacher.
'supervised' (train_baseline_sup.py): the student pass on the labeled images alone, loss = loss_x.
Batches are dicts of NHWC arrays (`input_pipeline.create_train_iterator`): image_l (B, S, S, 3),
mask_l (B, S, S), image_u_w, image_u_s (B, S, S, 3), pad_u (B, S, S) bool, cutmix_u (B, S, S) bool;
`batch_keys` says which of them a method reads.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from allspark_jax import losses
from allspark_jax.method import Method
from allspark_jax.data.datasets import IGNORE_INDEX
from allspark_jax.models.segmentor import AllSparkSegmentor
from allspark_jax.state import TrainState

# The scalar losses a step returns ('supervised' has no loss_u); the run loop logs and checks them.
LOSS_KEYS = ("loss", "loss_x", "loss_u")

# The batch entries an AllSpark / semi step reads (CutMix off).
BATCH_KEYS = ("image_l", "mask_l", "image_u_w", "image_u_s", "pad_u")


# The batch entries a UniMatch V2 step reads (CutMix off): two strong views of each unlabeled image.
TWO_VIEW_BATCH_KEYS = ("image_l", "mask_l", "image_u_w", "image_u_s1", "image_u_s2", "pad_u")


def batch_keys(method: Method) -> tuple[str, ...]:
    """The batch entries a step of `method` reads (CutMix's boxes when its probability is > 0:
    `cutmix_u`, or under UniMatch V2's recipe one per strong view, `cutmix_u1`, `cutmix_u2`)."""
    if method.labeled_only:
        return ("image_l", "mask_l")
    if method.strong_views == 2:
        return TWO_VIEW_BATCH_KEYS + (("cutmix_u1", "cutmix_u2") if method.cutmix_prob > 0 else ())
    return BATCH_KEYS + (("cutmix_u",) if method.cutmix_prob > 0 else ())


def supervised_loss(logits, target, train_config):
    """loss_x: CE (ignore 255) or the release's OHEM, per `train_config.loss_x` ('ce' | 'ohem')."""
    if train_config.loss_x == "ohem":
        return losses.ohem_cross_entropy(logits, target, thresh=train_config.ohem_thresh,
                                         min_kept=train_config.ohem_min_kept,
                                         groups=train_config.loss_groups)
    return losses.cross_entropy(logits, target, groups=train_config.loss_groups)


def pseudo_labels(teacher_logits, pad_u, train_config):
    """argmax of the teacher; optionally 255 below a confidence threshold and on padded pixels."""
    label = jnp.argmax(teacher_logits, axis=-1).astype(jnp.int32)
    if train_config.conf_thresh > 0:
        conf = jnp.max(jax.nn.softmax(teacher_logits, axis=-1), axis=-1)
        label = jnp.where(conf >= train_config.conf_thresh, label, IGNORE_INDEX)
    if train_config.loss_u_ignore_padding:
        label = jnp.where(pad_u, IGNORE_INDEX, label)
    return label


def cutmix(box, image_u_s, teacher_logits, pseudo):
    """UniMatch's CutMix within the global batch: image i's partner is image i - 1 (mod B).

    box (B, S, S) bool. Inside image i's box, the student view, the teacher logits (which route the
    unlabeled features into AllSpark's memory) and the pseudo-labels (255 where the partner's are
    ignored: confidence, padding) become those of the partner; outside they stay image i's own.
    """
    def inside(a):  # partner's values inside the box: jnp.roll(a, 1)[i] = a[i - 1]
        return jnp.where(box.reshape(box.shape + (1,) * (a.ndim - 3)), jnp.roll(a, 1, axis=0), a)

    return inside(image_u_s), inside(teacher_logits), inside(pseudo)


def train_step(state: TrainState, batch: dict, *, model: AllSparkSegmentor,
               tx: optax.GradientTransformation, train_config, use_memory: bool,
               method: Method):
    """One iteration of `method` (module docstring). Returns (new state, metrics dict of scalars,
    'pseudo_label' (B, S, S) unless supervised, and 'grads')."""
    n_l = batch["image_l"].shape[0]
    if method.labeled_only:
        x, teacher_logits = batch["image_l"], None
    else:
        teacher_logits = jax.lax.stop_gradient(model.apply(
            state.variables(teacher=method.ema), batch["image_u_w"],
            mode="teacher", key_group_size=train_config.key_group_size))
        pseudo = pseudo_labels(teacher_logits, batch["pad_u"], train_config)
        image_u_s = batch["image_u_s"]
        if "cutmix_u" in batch:
            image_u_s, teacher_logits, pseudo = cutmix(batch["cutmix_u"], image_u_s,
                                                       teacher_logits, pseudo)
        x = jnp.concatenate([batch["image_l"], image_u_s], axis=0)
    dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    student = state.variables()
    mutable = [k for k in student if k != "params"]

    def loss_fn(params):
        logits, updates = model.apply(
            {**student, "params": params}, x, mode="train", teacher_logits=teacher_logits,
            use_memory=use_memory, key_group_size=train_config.key_group_size,
            rngs={"dropout": dropout_rng}, mutable=mutable)
        loss_x = supervised_loss(logits[:n_l], batch["mask_l"], train_config)
        if method.labeled_only:
            return loss_x, ({"loss_x": loss_x}, updates)
        loss_u = losses.cross_entropy(logits[n_l:], pseudo, groups=train_config.loss_groups)
        return (loss_x + loss_u) / 2, ({"loss_x": loss_x, "loss_u": loss_u}, updates)

    (loss, (parts, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
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
        memory=updates.get("memory"), opt_state=opt_state, ema_params=ema_params,
        ema_batch_stats=ema_batch_stats)
    metrics = {"loss": loss, **parts, "grads": grads}
    if not method.labeled_only:
        metrics["pseudo_label"] = pseudo
    return new_state, metrics


def make_train_step(model: AllSparkSegmentor, tx: optax.GradientTransformation, train_config, *,
                    use_memory: bool, state_sharding=None, batch_sharding=None,
                    method: Method, with_outputs: bool = False):
    """The jitted step of `method`. `use_memory` is static: an AllSpark run compiles one step before
    the warm-up, one after.

    The state buffers are donated. Unless `with_outputs`, only the scalar losses leave the step
    (the pseudo-labels and gradients are for verification).
    """

    def step(state, batch):
        state, metrics = train_step(state, batch, model=model, tx=tx, train_config=train_config,
                                    use_memory=use_memory, method=method)
        if not with_outputs:
            metrics = {k: metrics[k] for k in LOSS_KEYS if k in metrics}
        return state, metrics

    kwargs = {}
    if state_sharding is not None:
        kwargs = dict(in_shardings=(state_sharding, batch_sharding),
                      out_shardings=(state_sharding, None))
    return jax.jit(step, donate_argnums=(0,), **kwargs)
