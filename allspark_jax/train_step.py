"""One training iteration of each method (`method.Method`): the release's trainers and UniMatch
V2's, jitted.

'allspark' (train_allspark.py) and 'semi' (train_baseline_semi.py, the model without AllSpark):
  1. teacher pass ("teacher" mode: BN running statistics, no dropout, no memory write) on the
     unlabeled weak view -> logits; pseudo-labels = argmax (optionally 255 below `conf_thresh` / on
     padding); with AllSpark through the branch `train.teacher_branch` (the release's "labeled", or
     "unlabeled", or "memory", which reads the memory from the warm-up on:
     `segmentor.teacher_model`);
  2. CutMix (when the batch carries `cutmix_u`): inside image i's box the student sees unlabeled
     image i - 1 (mod B) of the global batch and learns its pseudo-labels (`cutmix`);
  3. student pass ("train" mode) on concat(labeled, unlabeled student view): BN batch statistics
     over the whole global batch, dropout, stochastic depth; with AllSpark the memory update, and the
     memory is read by the labeled-to-unlabeled attention once `use_memory` (epoch >= warmup_epoch);
     before that its keys, as the teacher's, are the unlabeled images of the labeled image's group
     of `key_group_size` (None: the whole global batch);
  4. loss = (loss_x + loss_u) / 2; the optimiser update (`allspark_jax.optimizer`); the EMA teacher.
'supervised' (train_baseline_sup.py): the student pass on the labeled images alone, loss = loss_x.
UniMatch V2's recipe ('unimatch_v2', 'unimatch_v2_allspark'; its unimatch_v2.py), `unimatch_v2_step`:
  1. the EMA teacher ("teacher" mode; with AllSpark through `train.teacher_branch`, as above) on the
     weak view -> logits; confidence = max softmax, pseudo-label = argmax, valid = not padding
     (`train.loss_u_ignore_padding`);
  2. two strong views, each with its own CutMix box: inside view v's box of image i the view, the
     teacher's logits and the valid mask become those of image i's partner, the mirrored position
     of its group of `train.loss_groups` (its `flip(0)` of one GPU's batch; `flip_in_groups`);
  3. the student ("train" mode): without AllSpark, one pass on the labeled images and one on
     concat(view 1, view 2) with complementary channel dropout (`feature_scale`), as its code
     (BatchNorm statistics per pass); with AllSpark one pass on concat(labeled, view 1, view 2)
     (the module needs both), the dropout on the unlabeled part, the memory fed by both views;
  4. loss = (loss_x + (loss_s1 + loss_s2) / 2) / 2, loss_s per view `losses.confident_cross_entropy`
     (confidence >= `train.conf_thresh`); the optimiser; the EMA of parameters and BatchNorm
     statistics with decay min(1 - 1/(t + 1), `train.ema_decay`) after step t (`ema_decay`).
Batches are dicts of NHWC arrays (`input_pipeline.create_train_iterator`): image_l (B, S, S, 3),
mask_l (B, S, S), image_u_w, image_u_s (B, S, S, 3), pad_u (B, S, S) bool, cutmix_u (B, S, S) bool;
under UniMatch V2's recipe image_u_s1, image_u_s2, cutmix_u1, cutmix_u2 in place of image_u_s and
cutmix_u, and optionally feature_scale (the complementary dropout's scale, as
`models.segmentor.draw_feature_scale` gives it, to replace the step's own draw: verification).
`batch_keys` says which of them a method reads.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from allspark_jax import losses
from allspark_jax.method import Method
from allspark_jax.data.datasets import IGNORE_INDEX
from allspark_jax.models.segmentor import AllSparkSegmentor, draw_feature_scale, teacher_model
from allspark_jax.state import TrainState

# The scalar losses a step returns ('supervised' has no loss_u); the run loop logs and checks them.
LOSS_KEYS = ("loss", "loss_x", "loss_u")
# Every scalar a step returns for the log: the losses, and under UniMatch V2's recipe each view's
# loss and the fraction of confident weak-view pixels (its log's "Mask ratio").
SCALAR_KEYS = LOSS_KEYS + ("loss_s1", "loss_s2", "mask_ratio")

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


def ema_decay(step, method: Method, train_config):
    """The EMA teacher's decay after optimizer step `step` (0-based): `train.ema_decay`, or under
    UniMatch V2's recipe min(1 - 1 / (step + 1), train.ema_decay) (0 after the first step: the
    teacher starts as the updated student)."""
    if method.recipe == "unimatch_v2":
        return jnp.minimum(1.0 - 1.0 / (step.astype(jnp.float32) + 1.0), train_config.ema_decay)
    return train_config.ema_decay


def _average(ema, value, decay):
    """decay * ema + (1 - decay) * value in ema's dtype: an integer buffer (BatchNorm's
    num_batches_tracked) truncated toward zero, as PyTorch's `copy_` of the float result does."""
    return (decay * ema + (1 - decay) * value).astype(ema.dtype)


def _apply_update(state: TrainState, grads, tx: optax.GradientTransformation, batch_stats, memory,
                  method: Method, train_config):
    """The optimiser step, the EMA teacher's update and the step count: the new state."""
    opt_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, opt_updates)
    ema_params, ema_batch_stats = state.ema_params, state.ema_batch_stats
    if ema_params is not None:
        d = ema_decay(state.step, method, train_config)
        ema_params = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema_params, params)
        if method.recipe == "unimatch_v2":  # its EMA runs over every buffer too
            ema_batch_stats = jax.tree.map(lambda e, b: _average(e, b, d), ema_batch_stats,
                                           batch_stats)
        else:  # BN running statistics are themselves averages: the teacher takes the student's.
            ema_batch_stats = batch_stats
    return state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, memory=memory,
        opt_state=opt_state, ema_params=ema_params, ema_batch_stats=ema_batch_stats)


def train_step(state: TrainState, batch: dict, *, model: AllSparkSegmentor,
               tx: optax.GradientTransformation, train_config, use_memory: bool,
               method: Method):
    """One iteration of `method` (module docstring). Returns (new state, metrics dict of scalars,
    'pseudo_label' (B, S, S) unless supervised, and 'grads')."""
    if method.recipe == "unimatch_v2":
        return unimatch_v2_step(state, batch, model=model, tx=tx, train_config=train_config,
                                use_memory=use_memory, method=method)
    n_l = batch["image_l"].shape[0]
    if method.labeled_only:
        x, teacher_logits = batch["image_l"], None
    else:
        teacher_logits = jax.lax.stop_gradient(teacher_model(
            model, train_config.teacher_branch, use_memory).apply(
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
    new_state = _apply_update(state, grads, tx, updates["batch_stats"], updates.get("memory"),
                              method, train_config)
    metrics = {"loss": loss, **parts, "grads": grads}
    if not method.labeled_only:
        metrics["pseudo_label"] = pseudo
    return new_state, metrics


def flip_in_groups(a, groups: int):
    """UniMatch V2's CutMix partners: image i of each of `groups` equal batch groups takes the
    image at the mirrored position of its group (`a.flip(0)` on each of its GPUs' batches)."""
    b = a.shape[0]
    if b % groups:
        raise ValueError(f"train.loss_groups={groups} must divide the unlabeled batch of {b}")
    return a.reshape(groups, b // groups, *a.shape[1:])[:, ::-1].reshape(a.shape)


def _in_box(box, a, partner):
    return jnp.where(box.reshape(box.shape + (1,) * (a.ndim - 3)), partner, a)


def _with_labeled_rows(scale, n_l: int):
    """The complementary dropout's scale of the strong batch, preceded by n_l rows of ones (the
    labeled images of a one-pass AllSpark student keep every channel)."""
    pad = lambda s: jnp.concatenate([jnp.ones((n_l, s.shape[1]), s.dtype), s])  # noqa: E731
    return pad(scale) if hasattr(scale, "shape") else tuple(pad(s) for s in scale)


def unimatch_v2_step(state: TrainState, batch: dict, *, model: AllSparkSegmentor,
                     tx: optax.GradientTransformation, train_config, use_memory: bool,
                     method: Method):
    """One iteration of UniMatch V2's recipe (module docstring). Returns (new state, metrics:
    the scalars loss, loss_x, loss_u (= (loss_s1 + loss_s2) / 2), loss_s1, loss_s2, mask_ratio
    (the fraction of valid weak-view pixels whose confidence passes), 'teacher_logits'
    (B, S, S, K), 'pseudo_label' (2B, S, S): each view's target, 255 where it is not learned, and
    'grads')."""
    n_l = batch["image_l"].shape[0]
    groups = int(train_config.loss_groups)
    teacher_logits = jax.lax.stop_gradient(teacher_model(
        model, train_config.teacher_branch, use_memory).apply(
        state.variables(teacher=True), batch["image_u_w"], mode="teacher",
        key_group_size=train_config.key_group_size))
    pad = batch["pad_u"]
    valid = ~pad if train_config.loss_u_ignore_padding else jnp.ones_like(pad)
    views, view_logits, view_valid = [], [], []
    for v in (1, 2):
        image, logits, ok = batch[f"image_u_s{v}"], teacher_logits, valid
        box = batch.get(f"cutmix_u{v}")
        if box is not None:
            image, logits, ok = (_in_box(box, a, flip_in_groups(a, groups))
                                 for a in (image, logits, ok))
        views.append(image)
        view_logits.append(logits)
        view_valid.append(ok)
    # Each pixel's confidence and argmax come from its own logits: mixing the logits mixes both.
    conf = [jnp.max(jax.nn.softmax(t, axis=-1), axis=-1) for t in view_logits]
    label = [jnp.argmax(t, axis=-1).astype(jnp.int32) for t in view_logits]
    confident = [c >= train_config.conf_thresh for c in conf]

    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    k_x, k_s, k_drop = jax.random.split(key, 3)
    x_s = jnp.concatenate(views, axis=0)
    scale = batch.get("feature_scale")
    if scale is None:
        scale = draw_feature_scale(model.config, k_drop, x_s.shape[0])
    student = state.variables()
    mutable = [k for k in student if k != "params"]

    def loss_fn(params):
        variables = {**student, "params": params}
        if method.allspark:  # one pass: the module reads labeled and unlabeled images together
            logits, updates = model.apply(
                variables, jnp.concatenate([batch["image_l"], x_s], axis=0), mode="train",
                teacher_logits=jnp.concatenate(view_logits, axis=0), use_memory=use_memory,
                key_group_size=train_config.key_group_size,
                feature_scale=_with_labeled_rows(scale, n_l), rngs={"dropout": k_x},
                mutable=mutable)
            logits_x, logits_s = logits[:n_l], logits[n_l:]
        else:  # its two passes, BatchNorm statistics of each
            logits_x, updates = model.apply(variables, batch["image_l"], mode="train",
                                            rngs={"dropout": k_x}, mutable=mutable)
            logits_s, updates = model.apply({**variables, **updates}, x_s, mode="train",
                                            feature_scale=scale, rngs={"dropout": k_s},
                                            mutable=mutable)
        loss_x = supervised_loss(logits_x, batch["mask_l"], train_config)
        loss_s = [losses.confident_cross_entropy(lg, lb, c, ok, groups=groups)
                  for lg, lb, c, ok in zip(jnp.split(logits_s, 2), label, confident, view_valid)]
        loss_u = (loss_s[0] + loss_s[1]) / 2
        parts = {"loss_x": loss_x, "loss_u": loss_u, "loss_s1": loss_s[0], "loss_s2": loss_s[1]}
        return (loss_x + loss_u) / 2, (parts, updates)

    (loss, (parts, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = _apply_update(state, grads, tx, updates["batch_stats"], updates.get("memory"),
                              method, train_config)
    weak_conf = jnp.max(jax.nn.softmax(teacher_logits, axis=-1), axis=-1)
    mask_ratio = (jnp.sum((weak_conf >= train_config.conf_thresh) & valid)
                  / jnp.maximum(jnp.sum(valid), 1))
    pseudo = jnp.concatenate([jnp.where(c & ok, lb, IGNORE_INDEX)
                              for lb, c, ok in zip(label, confident, view_valid)])
    metrics = {"loss": loss, **parts, "mask_ratio": mask_ratio, "grads": grads,
               "teacher_logits": teacher_logits, "pseudo_label": pseudo}
    return new_state, metrics


def make_train_step(model: AllSparkSegmentor, tx: optax.GradientTransformation, train_config, *,
                    use_memory: bool, state_sharding=None, batch_sharding=None,
                    method: Method, with_outputs: bool = False):
    """The jitted step of `method`. `use_memory` is static: an AllSpark run compiles one step before
    the warm-up, one after.

    The state buffers are donated. Unless `with_outputs`, only the scalars (`SCALAR_KEYS`) leave
    the step (the pseudo-labels, teacher logits and gradients are for verification).
    """

    def step(state, batch):
        state, metrics = train_step(state, batch, model=model, tx=tx, train_config=train_config,
                                    use_memory=use_memory, method=method)
        if not with_outputs:
            metrics = {k: metrics[k] for k in SCALAR_KEYS if k in metrics}
        return state, metrics

    kwargs = {}
    if state_sharding is not None:
        kwargs = dict(in_shardings=(state_sharding, batch_sharding),
                      out_shardings=(state_sharding, None))
    return jax.jit(step, donate_argnums=(0,), **kwargs)
