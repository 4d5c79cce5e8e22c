"""Orbax checkpoints of the whole TrainState: the latest N, and the best by mIoU kept apart.

Layout under the workdir:
  checkpoints/<step>/       the last `config.keep_checkpoints` periodic saves
  checkpoints_best/<step>/  the one with the best validation mIoU so far
Each step directory holds `state` (the TrainState: weights, optimizer, EMA, Semantic Memory and its
pointers, PRNG key, step) and `meta` (JSON: step, epoch, mIoU results, ...). Orbax writes into a
temporary directory and renames it when complete, so an interrupted save never leaves a checkpoint
that looks valid. Resuming restores the state; the data position follows from the step.

Checkpoint specs (`--checkpoint` of main.py): a step number, 'latest', 'best', or a weight source
(an official `.pth` / `.pt` / `.npz`, UniMatch V2's DPT checkpoint for a DINOv2 model, or a
Hugging Face `SegformerForSemanticSegmentation` checkpoint, whose config.json fixes the model),
which `allspark_jax.weights.loader` decides and loads.

Topology: a restore reads every array straight into the placement the restoring run asks for
(its template's shardings: replicated, or split with `shard_params`, over this process's devices),
whatever number of processes and devices wrote the checkpoint. Before reading, the checkpoint's
array paths, shapes and dtypes are compared with the template's, so a checkpoint of another model,
method or teacher is reported by what differs (`CheckpointMismatchError`); a failure after that
check is orbax's own (`CheckpointReadError`).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from allspark_jax.errors import (CheckpointError, CheckpointMismatchError, CheckpointReadError,
                                 WeightImportError)
from allspark_jax import method as method_lib
from allspark_jax import optimizer
from allspark_jax import sharding as sharding_lib
from allspark_jax import state as state_lib
from allspark_jax import workdir as workdir_lib
from allspark_jax.workdir import BEST_DIR, LATEST_DIR
from allspark_jax.models.segmentor import build_model
from allspark_jax.weights import loader


# Config keys that decide the train state's arrays (for mismatch messages).
STATE_KEYS = ("model.* (backbone, decoder_dim, allspark_heads, num_classes), data.crop_size (the "
              "Semantic Memory's length), train.teacher and optim.name")
# Where each optimiser's state keeps its per-parameter arrays (`optimizer.create_optimizer`'s
# chains, in orbax's saved layout): SGD's momentum, AdamW's first moment.
_OPTIMIZER_ARRAYS = {"sgd": "opt_state/1/trace/", "adamw": "opt_state/0/mu/"}
MAX_LISTED_DIFFERENCES = 12


def parse_spec(spec) -> str | int | loader.WeightSource:
    """'latest' | 'best' | int step | a weight source (`loader.source_of`); anything else is a
    CheckpointError."""
    spec = str(spec).strip()
    if spec in ("latest", "best"):
        return spec
    if spec.isdigit():
        return int(spec)
    try:
        return loader.source_of(spec)
    except FileNotFoundError:
        raise CheckpointError(f"--checkpoint={spec!r}: no such file") from None
    except WeightImportError:
        raise CheckpointError(f"--checkpoint={spec!r}: expected a step number, 'latest', 'best', "
                              f"or a weight source: {loader.SOURCES}") from None


def _restore_target(template):
    """ShapeDtypeStructs, each with a sharding over this process's devices: the template leaf's own
    (arrays, and ShapeDtypeStructs that carry one), else replicated over every device."""
    default = sharding_lib.replicated(sharding_lib.create_mesh())
    return sharding_lib.abstract(
        template, jax.tree.map(lambda x: getattr(x, "sharding", None) or default, template))


def _flat_arrays(saved_tree) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{'params/head/linear_pred/kernel': (shape, dtype), ...} of a tree in orbax's saved layout
    (nested dicts and lists: a checkpoint's metadata, or a template's `ocp.tree.serialize_tree`)."""
    flat = ocp.tree.to_flat_dict(saved_tree, sep="/")
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in flat.items()}


def _fmt(entry) -> str:
    shape, dtype = entry
    return f"{dtype.name}{list(shape)}"


def state_differences(saved: dict, wanted: dict) -> list[str]:
    """What differs between two `_flat_arrays` maps (a checkpoint's, this config's), one line each.

    The teacher (EMA arrays or none), the optimiser (SGD or AdamW) and the method (AllSpark arrays
    or plain SegFormer) are named first and their arrays are not listed; optimizer / EMA arrays that only mirror a listed
    parameter are left out.
    """
    lines = []

    def has(flat, prefix):
        return any(k.startswith(prefix) for k in flat)

    explained = []
    ema = has(saved, "ema_params/"), has(wanted, "ema_params/")
    if ema[0] != ema[1]:
        teacher = {True: "'ema'", False: "'online' (no EMA arrays)"}
        lines.append(f"teacher: the checkpoint was written with train.teacher={teacher[ema[0]]}, "
                     f"this config has train.teacher={teacher[ema[1]]}")
        explained.append(lambda k: k.startswith(("ema_params/", "ema_batch_stats/")))
    optim = [next((n for n, p in _OPTIMIZER_ARRAYS.items() if has(flat, p)), None)
             for flat in (saved, wanted)]
    if None not in optim and optim[0] != optim[1]:
        lines.append(f"optimizer: the checkpoint was written with optim.name={optim[0]!r}, this "
                     f"config has optim.name={optim[1]!r}")
        explained.append(lambda k: k.startswith("opt_state/"))
    allspark = has(saved, "params/allspark/"), has(wanted, "params/allspark/")
    if allspark[0] != allspark[1]:
        method = {True: "AllSpark (params/allspark, the Semantic Memory)",
                  False: "plain SegFormer (no AllSpark module, no Semantic Memory)"}
        lines.append(f"method: the checkpoint is {method[allspark[0]]}, this config builds "
                     f"{method[allspark[1]]}")
        explained.append(lambda k: k.startswith("memory/") or "/allspark/" in k)

    diffs = [k for k in sorted(set(saved) | set(wanted))
             if saved.get(k) != wanted.get(k) and not any(e(k) for e in explained)]
    param_suffixes = tuple("/" + k[len("params/"):] for k in diffs if k.startswith("params/"))
    diffs = [k for k in diffs if k.startswith("params/")
             or not (k.startswith(("opt_state/", "ema_params/")) and k.endswith(param_suffixes))]
    order = {name: i for i, name in enumerate(state_lib.TrainState.__dataclass_fields__)}
    diffs.sort(key=lambda k: (order.get(k.split("/")[0], len(order)), k))
    for k in diffs:
        if k not in wanted:
            lines.append(f"{k}: {_fmt(saved[k])} only in the checkpoint")
        elif k not in saved:
            lines.append(f"{k}: {_fmt(wanted[k])} only in this config")
        else:
            lines.append(f"{k}: {_fmt(saved[k])} in the checkpoint, {_fmt(wanted[k])} in this "
                         "config")
    if len(lines) > MAX_LISTED_DIFFERENCES:
        lines = lines[:MAX_LISTED_DIFFERENCES] + [
            f"... and {len(lines) - MAX_LISTED_DIFFERENCES} more differences"]
    return lines


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
        raise CheckpointError(f"--checkpoint={str(spec)!r} is a weight file, not a workdir "
                              "checkpoint")

    def restore(self, spec, template) -> tuple[Any, dict, int]:
        """(state, meta, step). `template`: a TrainState of arrays or ShapeDtypeStructs giving the
        structure, shapes, dtypes and placement of the result; a leaf without a sharding is restored
        replicated over every device. Raises CheckpointMismatchError (the checkpoint holds other
        arrays) or CheckpointReadError (orbax failed on a checkpoint that fits)."""
        return self._restore_from(*self.resolve(spec), template)

    def _restore_from(self, manager, step: int, template) -> tuple[Any, dict, int]:
        target = _restore_target(template)
        where = f"checkpoint step {step} in {manager.directory}"
        wanted = _flat_arrays(ocp.tree.serialize_tree(target, keep_empty_nodes=True))
        differences = state_differences(self._saved_arrays(manager, step, where), wanted)
        if differences:
            raise CheckpointMismatchError(
                f"{where} does not fit the train state of this config ({STATE_KEYS} must be those "
                "of the run that wrote it):\n  " + "\n  ".join(differences))
        try:
            out = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - orbax / storage failures of every kind
            raise CheckpointReadError(
                f"orbax could not read {where}; its array paths, shapes and dtypes match this "
                f"config, so the config is not the cause: {type(e).__name__}: {e}") from e
        return out["state"], dict(out["meta"] or {}), step

    @staticmethod
    def _saved_arrays(manager, step: int, where: str) -> dict:
        """`_flat_arrays` of the state saved at `step` (from its metadata; no array is read)."""
        handler = ocp.StandardCheckpointHandler()
        try:
            metadata = handler.metadata(epath.Path(manager.directory) / str(step) / "state")
            return _flat_arrays(dict(metadata.tree))
        except Exception as e:  # noqa: BLE001 - orbax / storage failures of every kind
            raise CheckpointReadError(
                f"orbax could not read {where} (its array metadata; damaged or missing files), so "
                f"the config is not the cause: {type(e).__name__}: {e}") from e
        finally:
            handler.close()

    def restore_newest_readable(self, template, *, set_aside: bool = False
                                ) -> tuple[Any, dict, int, list[str]]:
        """(state, meta, step, skipped): 'latest', falling back past checkpoints that fail to load.

        Tries every checkpoint (of both folders) newest first. Each one that fails to restore (a
        file inside it truncated, missing or corrupt) is logged as a warning naming its path and
        the error, and listed in `skipped`; with `set_aside` (training) process 0 renames it to
        `<step>.unreadable` so that the run can write that step again, once an older one has
        restored (when none does, nothing is renamed: a rerun fails the same way instead of
        starting from step 0). Raises CheckpointError naming every checkpoint and its error when
        none loads, or when there is none.
        """
        candidates = sorted([(s, 1, self.latest) for s in self.latest.all_steps()]
                            + [(s, 0, self.best) for s in self.best.all_steps()], reverse=True)
        if not candidates:
            raise CheckpointError(f"--checkpoint=latest: no checkpoint in {self.workdir}")
        skipped, failed = [], []
        for step, _, manager in candidates:
            path = manager.directory / str(step)
            try:
                out = self._restore_from(manager, step, template)
            except CheckpointMismatchError:  # the config's fault, not damage: every step would fail
                raise
            except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many types
                reason = _root_cause(e)
                skipped.append(f"{path} ({reason})")
                failed.append((manager, step, path))
                logging.warning("Skipping checkpoint %s, which cannot be restored: %s", path, reason)
                continue
            if set_aside:
                for args in failed:
                    _set_aside(*args)
            if skipped:
                logging.warning("Restored step %d after skipping %d unreadable checkpoint(s)",
                                step, len(skipped))
            return (*out, skipped)
        raise CheckpointError(
            f"no checkpoint in {self.workdir} can be restored: {'; '.join(skipped)}")

    def best_meta(self, history: dict | None = None) -> dict | None:
        """The meta of the best checkpoint (its mIoU), to continue best-tracking after a resume.

        When its meta cannot be read, `history` (the run's eval results by step) supplies its
        results ({'step', 'eval'}), so that a worse result does not replace it; None when neither
        has it (best-tracking starts anew) or when there is no best checkpoint.
        """
        steps = self.best.all_steps()
        if not steps:
            return None
        step = max(steps)
        try:
            out = self.best.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:  # pylint: disable=broad-except  # as in restore_newest_readable
            recorded = (history or {}).get(step)
            logging.warning("The meta of the best checkpoint %s cannot be read (%s: %s); %s",
                            self.best.directory / str(step), type(e).__name__, e,
                            "its results come from the eval history" if recorded is not None
                            else "best-tracking starts anew")
            return None if recorded is None else {"step": step, "eval": recorded}
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


def restore_template(config, model=None, mesh=None) -> state_lib.TrainState:
    """The abstract TrainState (shapes, dtypes, shardings) that a run of `config` checkpoints.

    Built by the one constructor, `state.create_train_state`, under `jax.eval_shape` (nothing is
    initialised); the optimizer state's structure does not depend on the schedule's length. Placed
    as this run places its state: on `mesh` (default: every device of every process), replicated or
    split with `config.shard_params`.
    """
    model = model if model is not None else build_model(config)
    tx, _ = optimizer.create_optimizer(config.optim, total_steps=1)
    shapes = jax.eval_shape(lambda: state_lib.create_train_state(
        model, tx, jax.random.key(0), int(config.data.crop_size),
        ema=method_lib.from_config(config).ema))
    mesh = sharding_lib.create_mesh() if mesh is None else mesh
    return sharding_lib.abstract(
        shapes, state_lib.state_sharding(shapes, mesh, bool(config.shard_params)))


def load_inference_variables(config, workdir: str | None, spec) -> tuple[dict, dict]:
    """Variables to evaluate / predict with: {'student': vars[, 'ema': vars]} and an info dict
    (checkpoint, step, and `model`: the Flax module the variables belong to).

    `spec`: a step number, 'latest', 'best' (checkpoints in `workdir`), or a weight source
    (`loader.load_network`): an official `.pth` / `.pt` / `.npz` state dict, or UniMatch V2's DPT
    checkpoint for a DINOv2 `config.model` (imported into a model built from `config.model`,
    training crop `config.data.crop_size` for the memory's shape; UniMatch V2's trainer
    checkpoints give `model` as 'student' and `model_ema` as 'ema'), or a Hugging Face
    `SegformerForSemanticSegmentation` checkpoint for a MiT `config.model`: its config.json builds
    the model (SegFormer without AllSpark, as transformers computes it; `config.model` is not
    used, and `model.inference_branch` must be the release's 'labeled'). The model's class count
    must be `config.data.num_classes`. Workdir checkpoints are read onto this process's devices as
    `restore_template` places them, whatever topology wrote them.
    """
    parsed = parse_spec(spec)
    model = build_model(config)
    if isinstance(parsed, loader.WeightSource):
        network = loader.load_network(parsed, model, int(config.data.crop_size))
        if network.model.config.num_classes != int(config.data.num_classes):
            labels = ("" if network.labels is None
                      else f" (config.json id2label: {', '.join(network.labels)})")
            raise CheckpointError(
                f"--checkpoint={spec}: the checkpoint predicts {network.model.config.num_classes} "
                f"classes{labels}, but config.data.num_classes={config.data.num_classes}")
        if network.model.branch != model.branch:  # a Hugging Face SegFormer: no AllSpark module
            raise CheckpointError(
                f"--checkpoint={spec}: a model without the AllSpark module has no branch to "
                f"predict with; config.model.inference_branch={model.branch!r}: expected "
                f"'labeled'")
        out = {"student": network.variables}
        if network.ema is not None:
            out["ema"] = network.ema
        return out, {"checkpoint": parsed.name, "step": None, "model": network.model}
    if not workdir or not workdir_lib.resolve(workdir).is_dir():
        raise CheckpointError(f"--checkpoint={spec}: workdir {workdir!r} does not exist")
    checkpointer = Checkpointer(workdir, read_only=True)
    template, skipped = restore_template(config, model), []
    try:
        if parsed == "latest":
            state, meta, step, skipped = checkpointer.restore_newest_readable(template)
        else:
            state, meta, step = checkpointer.restore(parsed, template)
    finally:
        checkpointer.close()
    out = {"student": state.variables()}
    if state.ema_params is not None:
        out["ema"] = state.variables(teacher=True)
    return out, {"checkpoint": spec, "step": int(step), "meta": meta, "model": model,
                 "skipped": skipped}
