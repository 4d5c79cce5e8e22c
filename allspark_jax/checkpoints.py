"""Orbax checkpoints of the whole TrainState: the latest N, and the best by mIoU kept apart.

Layout under the workdir:
  checkpoints/<step>/       the last `config.keep_checkpoints` periodic saves
  checkpoints_best/<step>/  the one with the best validation mIoU so far
Each step directory holds `state` (the TrainState: weights, optimizer, EMA, Semantic Memory and its
pointers, PRNG key, step) and `meta` (JSON: step, epoch, mIoU results, ...). Orbax writes into a
temporary directory and renames it when complete, so an interrupted save never leaves a checkpoint
that looks valid. Resuming restores the state; the data position follows from the step.

Checkpoint specs (`--checkpoint` of main.py): a step number, 'latest', 'best', or the path of an
official `.pth` / `.npz` state dict (imported with `allspark_jax.convert.load_variables`).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from allspark_jax import convert
from allspark_jax import optimizer
from allspark_jax import state as state_lib
from allspark_jax import workdir as workdir_lib
from allspark_jax.models.segmentor import build_model, init_variables

LATEST_DIR = "checkpoints"
BEST_DIR = "checkpoints_best"
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".npz")


class CheckpointError(ValueError):
    """A checkpoint spec that names nothing restorable; the message says what exists."""


def is_weight_file(spec: str) -> bool:
    return str(spec).endswith(WEIGHT_FILE_SUFFIXES)


def parse_spec(spec) -> str | int:
    """'latest' | 'best' | int step | a .pth/.npz path; anything else is a CheckpointError."""
    spec = str(spec).strip()
    if spec in ("latest", "best"):
        return spec
    if spec.isdigit():
        return int(spec)
    if is_weight_file(spec):
        if not os.path.isfile(spec):
            raise CheckpointError(f"--checkpoint={spec!r}: no such file")
        return spec
    raise CheckpointError(f"--checkpoint={spec!r}: expected a step number, 'latest', 'best', or "
                          f"the path of an official weight file ({', '.join(WEIGHT_FILE_SUFFIXES)})")


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """Saves and restores TrainStates under `workdir` (all processes call every method)."""

    def __init__(self, workdir: str, keep: int = 2, *, read_only: bool = False):
        self.workdir = os.fspath(workdir_lib.resolve(workdir))
        # read_only: for eval / predict; the managers then neither create nor delete anything.
        # Otherwise leftovers of writes cut short (`<step>.orbax-checkpoint-tmp*`) are removed.
        opts = dict(create=not read_only, cleanup_tmp_directories=not read_only)
        if read_only:
            keep = None
        # Each manager's own barrier names: both save the same step after an evaluation, which
        # otherwise fails in multi-process runs ("Barrier _async_write_complete.<step> is already
        # ongoing").
        self.latest = ocp.CheckpointManager(
            os.path.join(self.workdir, LATEST_DIR),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=None if keep is None else max(int(keep), 1), **opts,
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    barrier_sync_key_prefix=LATEST_DIR)))
        self.best = ocp.CheckpointManager(
            os.path.join(self.workdir, BEST_DIR),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=None if read_only else 1, **opts,
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    barrier_sync_key_prefix=BEST_DIR)))

    # ------------------------------------------------------------------------------------ save
    @staticmethod
    def _save(manager, step: int, state, meta: dict) -> None:
        if step in manager.all_steps():
            return
        # A line to read in logs; the fault tests also wait for it to kill a run mid-write.
        logging.info("Writing checkpoint %s", manager.directory / str(int(step)))
        manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def save(self, step: int, state, meta: dict) -> None:
        """A periodic checkpoint (the oldest beyond `keep` is deleted)."""
        self._save(self.latest, step, state, meta)

    def save_best(self, step: int, state, meta: dict) -> None:
        """Replaces the best checkpoint."""
        self._save(self.best, step, state, meta)

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()

    # --------------------------------------------------------------------------------- restore
    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def resolve(self, spec) -> tuple[Any, int]:
        """(manager, step) of 'latest' | 'best' | a step number."""
        spec = parse_spec(spec) if not isinstance(spec, int) else spec
        steps, best = self.latest.all_steps(), self.best.all_steps()
        where = (f"{self.workdir} holds steps {sorted(steps)} in {LATEST_DIR}/ and "
                 f"{sorted(best)} in {BEST_DIR}/")
        if spec == "latest":
            candidates = [(s, self.latest) for s in steps] + [(s, self.best) for s in best]
            if not candidates:
                raise CheckpointError(f"--checkpoint=latest: no checkpoint in {self.workdir}")
            step, manager = max(candidates, key=lambda t: t[0])
            return manager, step
        if spec == "best":
            if not best:
                raise CheckpointError(f"--checkpoint=best: no best checkpoint yet; {where}")
            return self.best, max(best)
        if isinstance(spec, int):
            if spec in steps:
                return self.latest, spec
            if spec in best:
                return self.best, spec
            raise CheckpointError(f"--checkpoint={spec}: no such step; {where}")
        raise CheckpointError(f"--checkpoint={spec!r} is a weight file, not a workdir checkpoint")

    def restore(self, spec, template) -> tuple[Any, dict, int]:
        """(state, meta, step). `template`: a TrainState (arrays or ShapeDtypeStructs with
        shardings) giving the structure, shapes, dtypes and placement."""
        return self._restore_from(*self.resolve(spec), template)

    def _restore_from(self, manager, step: int, template) -> tuple[Any, dict, int]:
        out = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(template)), meta=ocp.args.JsonRestore()))
        return out["state"], dict(out["meta"] or {}), step

    def restore_newest_readable(self, template, *, set_aside: bool = False
                                ) -> tuple[Any, dict, int, list[str]]:
        """(state, meta, step, skipped): 'latest', falling back past checkpoints that fail to load.

        Tries every checkpoint (of both folders) newest first. Each one that fails to restore (a
        file inside it truncated, missing or corrupt) is logged as a warning naming its path and
        the error, and listed in `skipped`; with `set_aside` (training) process 0 renames it to
        `<step>.unreadable` so that the run can write that step again. Raises CheckpointError
        naming every checkpoint and its error when none loads, or when there is none.
        """
        candidates = sorted([(s, 1, self.latest) for s in self.latest.all_steps()]
                            + [(s, 0, self.best) for s in self.best.all_steps()], reverse=True)
        if not candidates:
            raise CheckpointError(f"--checkpoint=latest: no checkpoint in {self.workdir}")
        skipped = []
        for step, _, manager in candidates:
            path = manager.directory / str(step)
            try:
                out = self._restore_from(manager, step, template)
            except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many types
                reason = _root_cause(e)
                skipped.append(f"{path} ({reason})")
                logging.warning("Skipping checkpoint %s, which cannot be restored: %s", path, reason)
                if set_aside:
                    _set_aside(manager, step, path)
                continue
            if skipped:
                logging.warning("Restored step %d after skipping %d unreadable checkpoint(s)",
                                step, len(skipped))
            return (*out, skipped)
        raise CheckpointError(
            f"no checkpoint in {self.workdir} can be restored: {'; '.join(skipped)} (when every "
            "one fails alike, they are likely of another model: model.*, data.crop_size and "
            "train.teacher must be those of the run)")

    def best_meta(self) -> dict | None:
        """The meta of the best checkpoint (its mIoU), to continue best-tracking after a resume."""
        steps = self.best.all_steps()
        if not steps:
            return None
        try:
            out = self.best.restore(max(steps),
                                    args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:  # pylint: disable=broad-except  # as in restore_newest_readable
            logging.warning("The best checkpoint %s cannot be read (%s: %s); best-tracking "
                            "starts anew", self.best.directory / str(max(steps)),
                            type(e).__name__, e)
            return None
        return dict(out["meta"] or {})


def _root_cause(error: BaseException, limit: int = 500) -> str:
    """'Type: first line' of the innermost exception in the chain (orbax wraps tensorstore's)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:limit]


def _set_aside(manager, step: int, path) -> None:
    """Renames an unreadable step directory to `<step>.unreadable[.N]` (kept for inspection)."""
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if jax.process_index() == 0:
        target, n = path.parent / f"{path.name}.unreadable", 1
        while target.exists():
            target, n = path.parent / f"{path.name}.unreadable.{n}", n + 1
        path.rename(target)
        logging.warning("Renamed %s to %s", path, target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"set aside {path}")
    manager.reload()


def restore_template(config, model=None) -> state_lib.TrainState:
    """The abstract TrainState (shapes, dtypes) that a run of `config` checkpoints.

    Built by the one constructor, `state.create_train_state`, under `jax.eval_shape` (nothing is
    initialised); the optimizer state's structure does not depend on the schedule's length.
    """
    model = model if model is not None else build_model(config.model)
    tx, _ = optimizer.create_optimizer(config.optim, total_steps=1)
    return jax.eval_shape(lambda: state_lib.create_train_state(
        model, tx, jax.random.key(0), int(config.data.crop_size),
        ema=config.train.teacher == "ema"))


def load_inference_variables(config, workdir: str | None, spec) -> tuple[dict, dict]:
    """Variables to evaluate / predict with: {'student': vars[, 'ema': vars]} and an info dict.

    `spec`: a step number, 'latest', 'best' (checkpoints in `workdir`), or an official `.pth` /
    `.npz` state dict (imported into a model built from `config.model`, training crop
    `config.data.crop_size` for the memory's shape).
    """
    parsed = parse_spec(spec)
    model = build_model(config.model)
    if isinstance(parsed, str) and is_weight_file(parsed):
        template = jax.eval_shape(lambda: init_variables(model, jax.random.key(0),
                                                         int(config.data.crop_size)))
        variables = convert.load_variables(parsed, template)
        return {"student": variables}, {"checkpoint": os.path.abspath(parsed), "step": None}
    if not workdir or not workdir_lib.resolve(workdir).is_dir():
        raise CheckpointError(f"--checkpoint={spec}: workdir {workdir!r} does not exist")
    checkpointer = Checkpointer(workdir, read_only=True)
    template, skipped = restore_template(config, model), []
    try:
        if parsed == "latest":
            state, meta, step, skipped = checkpointer.restore_newest_readable(template)
        else:
            state, meta, step = checkpointer.restore(parsed, template)
    except (ValueError, KeyError) as e:  # orbax: tree structure / shape mismatch
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(
            f"--checkpoint={spec}: the checkpoint in {workdir} does not fit the model of this "
            f"config (model.*, data.crop_size, train.teacher must be those of the run): {e}") from e
    out = {"student": state.variables()}
    if state.ema_params is not None:
        out["ema"] = state.variables(teacher=True)
    return out, {"checkpoint": spec, "step": int(step), "meta": meta, "skipped": skipped}
