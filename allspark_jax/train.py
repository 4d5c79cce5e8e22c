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

import json
import os
import time
from typing import Any, Callable

import flax
import flax.struct
import jax
import jax.numpy as jnp
import optax
from absl import logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils

from allspark_jax import checkpoints as ckpt_lib
from allspark_jax import convert, losses
from allspark_jax import evaluate as evaluate_lib
from allspark_jax import sharding as sharding_lib
from allspark_jax.data import input_pipeline, synthetic
from allspark_jax.models.segmentor import AllSparkSegmentor, build_model, init_variables

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


# Run loop: train_and_evaluate (`main.py --mode train`) and the helpers that eval / predict share
# with it. Everything the loop does is set by the config (configs/default.py documents it).




def prepare_data(config, workdir: str):
    """Returns `config` with `data.root` set; writes the synthetic dataset if it is asked for.

    With `data.name == 'synthetic'` and no `data.root`, the dataset described by `data.synthetic` is
    written into <workdir>/synthetic_data (once; process 0 writes, the others wait).
    """
    if config.data.name != "synthetic" or config.data.root:
        return config
    root = os.path.join(os.path.abspath(workdir), "synthetic_data")
    if jax.process_index() == 0 and not os.path.isfile(os.path.join(root, "class_names.txt")):
        s = config.data.synthetic
        logging.info("Writing the synthetic dataset to %s", root)
        synthetic.write_dataset(root, num_train=s.num_train, num_val=s.num_val, size=s.size,
                                num_classes=config.data.num_classes, seed=s.seed,
                                num_labeled=s.num_labeled)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("synthetic data written")
    config = config.copy_and_resolve_references()
    config.data.root = root
    return config


def setup_compilation_cache(config, workdir: str) -> None:
    """Persistent XLA compilation cache in <workdir>/jax_cache (`config.compilation_cache`)."""
    if config.get("compilation_cache", False):
        jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def eval_crop_size(config) -> int:
    return int(config.eval.crop_size or config.data.crop_size)


def make_predictor(config, model=None):
    model = model if model is not None else build_model(config.model)
    return evaluate_lib.Predictor(model, config.eval.mode, eval_crop_size(config))


def evaluate_variables(config, predictor, variables, *, desc: str = "eval") -> dict:
    """mIoU of one set of variables on the validation set (every process calls it)."""
    ds = input_pipeline.create_val_dataset(
        config, process_index=jax.process_index(), process_count=jax.process_count())
    count = int(ds.cardinality())
    max_images = int(config.eval.get("max_images", -1) or -1)
    if max_images > 0:
        # positions p, p + P, ... of this process below max_images
        ds = ds.filter(lambda ex: ex["index"] < max_images)
        p, n = jax.process_index(), jax.process_count()
        count = len(range(p, max_images, n))
    names = input_pipeline.class_names(config)
    inference_vars = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
    return evaluate_lib.evaluate(
        predictor, inference_vars, ds.as_numpy_iterator(), config.data.num_classes,
        class_names=names, progress=bool(config.eval.progress_bar) and jax.process_index() == 0,
        desc=desc, num_images=count if count >= 0 else None)


def evaluate_state(config, predictor, state: TrainState) -> dict:
    """{'student': result[, 'ema': result]}: the EMA teacher is evaluated too when there is one."""
    results = {"student": evaluate_variables(config, predictor, state.variables(), desc="eval")}
    if state.ema_params is not None:
        results["ema"] = evaluate_variables(config, predictor, state.variables(teacher=True),
                                            desc="eval (ema)")
    return results


def write_json(path: str, obj) -> None:
    """Writes JSON atomically (process 0 only)."""
    if jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _every(value: int, steps_per_epoch: int) -> int:
    return int(value) if value and int(value) > 0 else steps_per_epoch


def train_and_evaluate(config, workdir: str, *, stop_after: int | None = None) -> dict:
    """Trains, evaluates and checkpoints; resumes from the latest checkpoint in `workdir`.

    Args:
      config: the run's ConfigDict (configs/default.py).
      workdir: checkpoints, TensorBoard events, eval JSON (and the synthetic data) go here.
      stop_after: stop after this many steps of THIS call without a final evaluation or
        checkpoint, as if the process were killed (for tests of resumption).
    Returns:
      {'state': the final TrainState, 'step': int, 'eval': {step: results}, 'best': meta or None}.
    """


    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    setup_compilation_cache(config, workdir)
    config = prepare_data(config, workdir)
    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, asynchronous=False)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    # Model, optimiser, schedule.
    model = build_model(config.model)
    steps_per_epoch = input_pipeline.steps_per_epoch(config, process_count=jax.process_count())
    total_steps = int(config.train.epochs) * steps_per_epoch
    num_steps = total_steps
    if int(config.train.get("num_train_steps", -1) or -1) > 0:
        num_steps = min(total_steps, int(config.train.num_train_steps))
    warmup_steps = int(config.train.warmup_epoch) * steps_per_epoch
    tx, schedules = create_optimizer(config.optim, total_steps)
    crop = int(config.data.crop_size)
    batch = int(config.data.batch_size)
    logging.info("steps/epoch %d, total steps %d (running to %d), memory read from step %d",
          steps_per_epoch, total_steps, num_steps, warmup_steps)

    # Mesh and state.
    mesh = sharding_lib.create_mesh()
    sharding_lib.check_batch_divisible(batch, mesh)
    b_sharding = sharding_lib.batch_sharding(mesh)
    rng = jax.random.key(int(config.seed))
    init_rng, state_rng = jax.random.split(rng)
    variables = None
    if config.model.get("pretrained"):
        variables = init_variables(model, init_rng, crop)
        variables = convert.load_pretrained_encoder(config.model.pretrained, variables)
        logging.info("Encoder initialised from %s", config.model.pretrained)
    ema = config.train.teacher == "ema"
    if config.train.teacher not in ("online", "ema"):
        raise ValueError(f"config.train.teacher must be 'online' or 'ema', got "
                         f"{config.train.teacher!r}")
    # Jitted: Flax init op by op is slow (tens of seconds on CPU even for a tiny model).
    init_fn = lambda r, v: create_train_state(model, tx, r, crop, ema=ema, variables=v)  # noqa: E731
    init_args = (init_rng if variables is None else state_rng, variables)
    s_sharding = sharding_lib.state_sharding(jax.eval_shape(init_fn, *init_args), mesh,
                                             bool(config.get("shard_params", False)))
    state = jax.jit(init_fn, out_shardings=s_sharding)(*init_args)

    checkpointer = ckpt_lib.Checkpointer(workdir, keep=int(config.keep_checkpoints))
    start_step = 0
    if checkpointer.latest_step() is not None:
        state, meta, start_step = checkpointer.restore("latest", state)
        logging.info("Resumed from step %d (%s)", start_step, workdir)
    best = checkpointer.best_meta()
    best_of = config.eval.best_of
    if best_of not in ("student", "ema") or (best_of == "ema" and not ema):
        raise ValueError(f"config.eval.best_of={best_of!r}: expected 'student' (or 'ema' when "
                         "config.train.teacher == 'ema')")
    history_path = os.path.join(workdir, "eval_results.json")
    history = {}
    if os.path.isfile(history_path):
        with open(history_path) as f:
            history = {int(k): v for k, v in json.load(f).items() if int(k) <= start_step}

    steps = {flag: make_train_step(model, tx, config.train, use_memory=flag,
                                   state_sharding=s_sharding, batch_sharding=b_sharding)
             for flag in (False, True)}
    predictor = evaluate_lib.Predictor(model, config.eval.mode, eval_crop_size(config))
    names = input_pipeline.class_names(config)
    del names  # checked early: a bad data config fails before the first step

    log_every = max(int(config.log_every_steps), 1)
    eval_every = _every(config.eval_every_steps, steps_per_epoch)
    ckpt_every = _every(config.checkpoint_every_steps, steps_per_epoch)
    hooks = []
    if jax.process_index() == 0:
        hooks.append(periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                                     every_steps=log_every))
        if config.get("profile", False):
            hooks.append(periodic_actions.Profile(
                logdir=workdir, first_profile=int(config.profile_first_step),
                num_profile_steps=int(config.profile_num_steps)))

    def meta_for(step, results=None):
        return {"step": int(step), "epoch": int(step) // steps_per_epoch,
                "steps_per_epoch": steps_per_epoch, "eval": results}

    def run_eval(step):
        nonlocal best
        t0 = time.time()
        results = evaluate_state(config, predictor, state)
        scalars = {f"eval/miou_{k}": r["miou"] for k, r in results.items()}
        scalars["eval/miou"] = results["student"]["miou"]
        scalars["eval/seconds"] = time.time() - t0
        writer.write_scalars(step, scalars)
        for k, r in results.items():
            logging.info("step %d %s\n%s", step, k, evaluate_lib.format_iou_table(r, f"{k} @ step {step}"))
        history[int(step)] = results
        write_json(history_path, {str(k): v for k, v in sorted(history.items())})
        score = results[best_of]["miou"]
        if best is None or score > best["eval"][best_of]["miou"]:
            best = meta_for(step, results)
            checkpointer.save_best(step, state, best)
        return results

    train_iter = input_pipeline.create_train_iterator(config, start_step=start_step)
    keys = ("image_l", "mask_l", "image_u_w", "image_u_s", "pad_u")
    train_iter = ({k: b[k] for k in keys} for b in train_iter)
    device_iter = input_pipeline.prefetch_to_device(train_iter, b_sharding,
                                                    size=int(config.data.prefetch))

    step = start_step
    acc, acc_n, t_log, step_log = {}, 0, time.time(), step
    with metric_writers.ensure_flushes(writer):
        while step < num_steps:
            if stop_after is not None and step - start_step >= stop_after:
                break
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch_arrays = next(device_iter)
                state, metrics = steps[step >= warmup_steps](state, batch_arrays)
            for k, v in metrics.items():
                acc[k] = acc.get(k, 0.0) + v
            acc_n += 1
            step += 1
            for hook in hooks:
                hook(step)
            if step % log_every == 0 or step == num_steps:
                scalars = {f"train/{k}": float(v) / acc_n for k, v in acc.items()}
                dt = time.time() - t_log
                scalars["train/lr_encoder"] = float(schedules["encoder"](step - 1))
                scalars["train/lr_rest"] = float(schedules["rest"](step - 1))
                scalars["train/images_per_second"] = 2 * batch * (step - step_log) / max(dt, 1e-9)
                scalars["train/epoch"] = step / steps_per_epoch
                writer.write_scalars(step, scalars)
                acc, acc_n, t_log, step_log = {}, 0, time.time(), step
            last = step == num_steps
            if step % eval_every == 0 or last:
                run_eval(step)
            if step % ckpt_every == 0 or last:
                checkpointer.save(step, state, meta_for(step, history.get(step)))
    checkpointer.wait()
    checkpointer.close()
    writer.flush()
    return {"state": state, "step": step, "eval": history, "best": best}


def load_inference_variables(config, workdir: str | None, spec) -> tuple[dict, dict]:
    """Variables to evaluate / predict with: {'student': vars[, 'ema': vars]} and an info dict.

    `spec`: a step number, 'latest', 'best' (checkpoints in `workdir`), or an official `.pth` /
    `.npz` state dict (imported into a model built from `config.model`, training crop
    `config.data.crop_size` for the memory's shape).
    """

    parsed = ckpt_lib.parse_spec(spec)
    model = build_model(config.model)
    if isinstance(parsed, str) and ckpt_lib.is_weight_file(parsed):
        template = jax.eval_shape(lambda: init_variables(model, jax.random.key(0),
                                                         int(config.data.crop_size)))
        variables = convert.load_variables(parsed, template)
        return {"student": variables}, {"checkpoint": os.path.abspath(parsed), "step": None}
    if not workdir or not os.path.isdir(workdir):
        raise ckpt_lib.CheckpointError(f"--checkpoint={spec}: workdir {workdir!r} does not exist")
    checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
    # The template's optimizer state does not depend on the schedule length.
    tx, _ = create_optimizer(config.optim, 1)
    state = jax.eval_shape(lambda: create_train_state(
        model, tx, jax.random.key(0), int(config.data.crop_size),
        ema=config.train.teacher == "ema"))
    try:
        state, meta, step = checkpointer.restore(parsed, state)
    except ckpt_lib.CheckpointError:
        raise
    except Exception as e:  # structure / shape mismatch: name the likely cause
        raise ckpt_lib.CheckpointError(
            f"--checkpoint={spec}: the checkpoint in {workdir} does not fit the model of this "
            f"config (model.*, data.crop_size, train.teacher must be those of the run): {e}") from e
    out = {"student": state.variables()}
    if state.ema_params is not None:
        out["ema"] = state.variables(teacher=True)
    return out, {"checkpoint": spec, "step": int(step), "meta": meta}


def run_evaluation(config, workdir: str, spec) -> dict:
    """`main.py --mode eval`: evaluates a checkpoint; writes <workdir>/eval_<spec>.json."""

    setup_compilation_cache(config, workdir)
    config = prepare_data(config, workdir)
    variables, info = load_inference_variables(config, workdir, spec)
    predictor = evaluate_lib.Predictor(build_model(config.model), config.eval.mode,
                                       eval_crop_size(config))
    results = {}
    for k, v in variables.items():
        results[k] = evaluate_variables(config, predictor, v, desc=f"eval ({k})")
        print(evaluate_lib.format_iou_table(results[k], f"{k} weights, {info['checkpoint']} "
                                            f"(step {info['step']}), mode {config.eval.mode}"),
              flush=True)
    tag = (os.path.splitext(os.path.basename(str(spec)))[0]
           if ckpt_lib.is_weight_file(str(spec)) else str(spec))
    out = {"checkpoint": info["checkpoint"], "step": info["step"], "results": results}
    write_json(os.path.join(workdir, f"eval_{tag}.json"), out)
    return out
