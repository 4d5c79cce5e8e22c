"""The run loop behind `main.py --mode train`: train, evaluate, checkpoint, resume.

`train_and_evaluate(config, workdir)` resolves the data options and the training lists once, builds
the sharded train state (`state`), compiles the step (`train_step`, one program before the memory
warm-up and one after), and runs it on the input pipeline, evaluating (`evaluation.evaluator`) and
checkpointing (`checkpoints`) as the config says. A workdir that holds checkpoints resumes from the
newest one, and the pipeline restarts at that step's batch.
"""
from __future__ import annotations

import itertools
import os
import sys
import time
from typing import Callable, Iterable

import jax
from absl import logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils

from allspark_jax import checkpoints as ckpt_lib
from allspark_jax import config as config_lib
from allspark_jax import nonfinite
from allspark_jax import optimizer
from allspark_jax import runtime
from allspark_jax import sharding as sharding_lib
from allspark_jax import workdir as workdir_lib
from allspark_jax import state as state_lib
from allspark_jax import train_step as train_step_lib
from allspark_jax.data import input_pipeline
from allspark_jax.errors import NonFiniteError
from allspark_jax.evaluation import evaluator
from allspark_jax.models.segmentor import build_model, init_variables
from allspark_jax.weights import loader as weights_loader


def _every(value: int, steps_per_epoch: int) -> int:
    return int(value) if value and int(value) > 0 else steps_per_epoch


def initial_state(config, model, tx, mesh, method) -> tuple[state_lib.TrainState,
                                                           state_lib.TrainState]:
    """A fresh, sharded TrainState (the encoder from `model.pretrained` when set, an EMA teacher
    when `method` has one) and its shardings."""
    crop = int(config.data.crop_size)
    init_rng, state_rng = jax.random.split(jax.random.key(int(config.seed)))
    variables = None
    if config.model.pretrained:
        variables = init_variables(model, init_rng, crop)
        variables = weights_loader.load_pretrained_encoder(config.model.pretrained, variables,
                                                           model_config=model.config)
        logging.info("Encoder initialised from %s", config.model.pretrained)
    ema = method.ema
    # Jitted: Flax init run op by op dispatches every small op alone, which is slow.
    init_fn = lambda r, v: state_lib.create_train_state(  # noqa: E731
        model, tx, r, crop, ema=ema, variables=v)
    init_args = (init_rng if variables is None else state_rng, variables)
    shardings = state_lib.state_sharding(jax.eval_shape(init_fn, *init_args), mesh,
                                         bool(config.shard_params))
    return jax.jit(init_fn, out_shardings=shardings)(*init_args), shardings


class _TrainLogger:
    """Averages the step metrics between log steps and writes them with the learning rates."""

    def __init__(self, writer, schedules, images_per_step: int, steps_per_epoch: int, step: int):
        self.writer, self.schedules = writer, schedules
        self.images_per_step, self.steps_per_epoch = images_per_step, steps_per_epoch
        self._reset(step)

    def _reset(self, step):
        self.sums, self.count, self.t0, self.step0 = {}, 0, time.time(), step

    def add(self, metrics):
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def write(self, step) -> dict[str, float]:
        """Writes (and returns) the averages since the last write, learning rates, throughput."""
        scalars = {f"train/{k}": float(v) / self.count for k, v in self.sums.items()}
        dt = max(time.time() - self.t0, 1e-9)
        scalars.update({
            "train/lr_encoder": float(self.schedules["encoder"](step - 1)),
            "train/lr_rest": float(self.schedules["rest"](step - 1)),
            "train/images_per_second": self.images_per_step * (step - self.step0) / dt,
            "train/epoch": step / self.steps_per_epoch})
        self.writer.write_scalars(step, scalars)
        self._reset(step)
        return scalars


class _ProgressBar:
    """The console's view of training (process 0, `train.progress_bar`): a tqdm bar over the run's
    steps (tqdm's rate and ETA) with epoch, losses and images/s of the last log interval, and the
    evaluation tables printed above it."""

    def __init__(self, enabled: bool, start_step: int, num_steps: int):
        self.bar = None
        if enabled:
            from tqdm import tqdm  # pylint: disable=g-import-not-at-top
            self.bar = tqdm(total=num_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, smoothing=0.1)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def show(self, scalars: dict[str, float]) -> None:
        if self.bar is not None:
            shown = {"epoch": f"{scalars['train/epoch']:.2f}"}
            shown.update({k: f"{scalars[f'train/{k}']:.4f}" for k in train_step_lib.LOSS_KEYS
                          if f"train/{k}" in scalars})
            shown["img/s"] = f"{scalars['train/images_per_second']:.1f}"
            self.bar.set_postfix(shown, refresh=True)

    def print(self, text: str) -> None:
        """`text` on stdout (above the bar when there is one)."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_and_evaluate(config, workdir: str, *, stop_after: int | None = None,
                       batches: Iterable[dict] | None = None,
                       on_step: Callable[[int, dict, state_lib.TrainState], None] | None = None
                       ) -> dict:
    """Trains, evaluates and checkpoints; resumes from the latest checkpoint in `workdir`.

    Args:
      config: the run's ConfigDict (configs/default.py), validated (`config.validate`).
      workdir: checkpoints, TensorBoard events, eval JSON (and the synthetic data) go here.
      stop_after: stop after this many steps of THIS call without a final evaluation or
        checkpoint, as if the process were killed (for tests of resumption).
      batches: host batches in place of the input pipeline, the first for step 0 (a resumed run
        skips those of the steps taken): dicts holding at least the method's
        `train_step.batch_keys`, global batch, as the pipeline yields them. For experiments on
        fixed inputs (`experiments.versus_release_training`); one process only.
      on_step: called after every step with (steps taken, that step's metrics as Python floats,
        the state after it); the metrics come to the host each step.
    Returns:
      {'state': the final TrainState, 'step': int, 'eval': {step: results}, 'best': meta or None}.
    """
    wd = workdir_lib.resolve(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    workdir = os.fspath(wd)
    runtime.setup_compilation_cache(config, workdir)
    opts = config_lib.data_options(config, workdir)
    plan = input_pipeline.train_plan(opts, progress=jax.process_index() == 0)
    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, asynchronous=False)
    if jax.process_index() == 0:
        (wd / workdir_lib.CONFIG_JSON).write_text(config.to_json_best_effort(indent=2))

    # Model, optimiser, schedule.
    model = build_model(config)
    steps_per_epoch = plan.steps_per_epoch
    total_steps = int(config.train.epochs) * steps_per_epoch
    num_steps = total_steps
    if int(config.train.num_train_steps) > 0:
        num_steps = min(total_steps, int(config.train.num_train_steps))
    warmup_steps = int(config.train.warmup_epoch) * steps_per_epoch
    tx, schedules = optimizer.create_optimizer(config.optim, total_steps)
    logging.info("steps/epoch %d, total steps %d (running to %d), memory read from step %d",
                 steps_per_epoch, total_steps, num_steps, warmup_steps)

    # Mesh and state.
    mesh = sharding_lib.create_mesh()
    sharding_lib.check_batch_divisible(opts.batch_size, mesh)
    b_sharding = sharding_lib.batch_sharding(mesh)
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=int(config.keep_checkpoints))
    start_step = 0
    if checkpointer.latest.all_steps() or checkpointer.best.all_steps():
        # An abstract template: a resume neither initialises a state nor reads model.pretrained.
        template = ckpt_lib.restore_template(config, model, mesh)
        s_sharding = jax.tree.map(lambda x: x.sharding, template)
        state, _, start_step, _ = checkpointer.restore_newest_readable(template, set_aside=True)
        logging.info("Resumed from step %d (%s)", start_step, workdir)
    else:
        state, s_sharding = initial_state(config, model, tx, mesh, opts.method)
    best_of = config.eval.best_of
    history_path = wd / workdir_lib.EVAL_HISTORY_JSON
    history = {int(k): v for k, v in workdir_lib.read_json(history_path, {}).items()
               if int(k) <= start_step}
    best = checkpointer.best_meta(history)

    method = opts.method
    # Only AllSpark reads the memory: the baselines compile one step.
    flags = (False, True) if method.allspark else (False,)
    compiled = {flag: train_step_lib.make_train_step(model, tx, config.train, use_memory=flag,
                                                     state_sharding=s_sharding,
                                                     batch_sharding=b_sharding, method=method)
                for flag in flags}
    steps = {flag: compiled.get(flag, compiled[False]) for flag in (False, True)}
    predictor = evaluator.make_predictor(config, model)

    log_every = _every(config.log_every_steps, steps_per_epoch)
    eval_every = _every(config.eval_every_steps, steps_per_epoch)
    ckpt_every = _every(config.checkpoint_every_steps, steps_per_epoch)
    hooks = []
    if jax.process_index() == 0:
        hooks.append(periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                                     every_steps=log_every))
        if config.profile:
            hooks.append(periodic_actions.Profile(
                logdir=workdir, first_profile=int(config.profile_first_step),
                num_profile_steps=int(config.profile_num_steps)))

    def meta_for(step, results=None):
        return {"step": int(step), "epoch": int(step) // steps_per_epoch,
                "steps_per_epoch": steps_per_epoch, "eval": results}

    def run_eval(step):
        nonlocal best
        t0 = time.time()
        results = evaluator.evaluate_state(config, opts, predictor, state)
        scalars = {f"eval/miou_{k}": r["miou"] for k, r in results.items()}
        scalars["eval/miou"] = results["student"]["miou"]
        scalars["eval/seconds"] = time.time() - t0
        writer.write_scalars(step, scalars)
        for k, r in results.items():
            table = evaluator.format_iou_table(r, f"{k} @ step {step}")
            logging.info("step %d %s\n%s", step, k, table)
            if jax.process_index() == 0:
                progress.print(table)
        history[int(step)] = results
        if jax.process_index() == 0:
            workdir_lib.write_json(history_path, {str(k): v for k, v in sorted(history.items())})
        score = results[best_of]["miou"]
        if best is None or score > best["eval"][best_of]["miou"]:
            best = meta_for(step, results)
            checkpointer.save_best(step, state, best)

    watch = nonfinite.LossWatch(config.train.stop_on_nan)

    def check_finite(step, with_state: bool = False):
        """train.stop_on_nan: the losses since the last check (and the state) must be finite."""
        if not watch.enabled:
            return
        try:
            watch.check()
            parts = nonfinite.nonfinite_parts(state) if with_state else []
            if parts:
                raise NonFiniteError(
                    f"non-finite values in {', '.join(parts)} of the train state after step {step}")
        except NonFiniteError as e:
            checkpointer.wait()  # the saves already started hold finite states: let them finish
            newest = checkpointer.latest_step()
            raise NonFiniteError(
                f"{e}. Training stopped (train.stop_on_nan) without checkpointing this state; "
                f"the newest checkpoint is {'none' if newest is None else f'step {newest}'}"
                f" in {workdir}. Lower optim.lr, or set train.stop_on_nan=False to "
                "train on regardless.") from None

    if batches is None:
        train_iter = input_pipeline.create_train_iterator(opts, start_step=start_step, plan=plan)
    elif jax.process_count() > 1:
        raise ValueError("train_and_evaluate(batches=...) feeds one process; this run has "
                         f"{jax.process_count()}")
    else:
        train_iter = itertools.islice(iter(batches), start_step, None)
    keys = train_step_lib.batch_keys(method)
    train_iter = ({k: b[k] for k in keys} for b in train_iter)
    device_iter = input_pipeline.prefetch_to_device(train_iter, b_sharding, size=opts.prefetch)

    step = start_step
    images_per_step = opts.batch_size * method.images_per_labeled_image
    logger = _TrainLogger(writer, schedules, images_per_step, steps_per_epoch, step)
    progress = _ProgressBar(bool(config.train.progress_bar) and jax.process_index() == 0,
                            start_step, num_steps)
    with metric_writers.ensure_flushes(writer):
        while step < num_steps:
            if stop_after is not None and step - start_step >= stop_after:
                break
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch_arrays = next(device_iter)
                state, metrics = steps[step >= warmup_steps](state, batch_arrays)
            logger.add(metrics)
            step += 1
            if on_step is not None:
                on_step(step, {k: float(v) for k, v in jax.device_get(metrics).items()}, state)
            progress.step()
            watch.add(step, metrics)
            for hook in hooks:
                hook(step)
            if step % log_every == 0 or step == num_steps:
                progress.show(logger.write(step))
                check_finite(step)
            last = step == num_steps
            evaluate, save = step % eval_every == 0 or last, step % ckpt_every == 0 or last
            if evaluate or save:
                check_finite(step, with_state=True)
            if evaluate:
                run_eval(step)
            if save:
                checkpointer.save(step, state, meta_for(step, history.get(step)))
    progress.close()
    # The input pipeline (tf.data threads, batches prefetched past the last step) is torn down here,
    # not when the process exits: that takes seconds on a loaded host, and in a multi-process run a
    # process that exits first waits for the others at JAX's shutdown barrier, which has a timeout.
    device_iter.close()
    train_iter.close()
    checkpointer.wait()
    checkpointer.close()
    writer.flush()
    if jax.process_count() > 1:  # every process's work is done: they exit together
        multihost_utils.sync_global_devices("train_and_evaluate done")
    return {"state": state, "step": step, "eval": history, "best": best}
