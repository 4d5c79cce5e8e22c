r"""Whole training runs against the release's: same start, same (or each side's own) batches.

    python -m allspark_jax.experiments.versus_release_training --config configs/learning.py \
        --release_dir=/path/to/release --release_python=/path/to/venv-with-torch/bin/python \
        --methods supervised,semi,allspark --seeds 0,1,2 --batches same,own --json out.json

For every method (`supervised`, `semi`, `allspark`), seed and batch source, two runs of the learning
benchmark's task (`configs/learning.py`, or any config whose `data.name` is 'synthetic') train from
the same initial weights, each evaluated with this library's evaluator on the same validation
images:
- the release's: its trainer (`train_baseline_sup.py`, `train_baseline_semi.py`,
  `train_allspark.py`) run unchanged by `--release_python` (a Python with torch; this process never
  imports it) through `benchmarks/release_training.py` (`--release_runner`), which stands in for
  the GPU, the process group and the dataset around it. `--release_dir` is a folder holding
  `allspark_release/` (the release's files; `dataset/` among them for `--batches own`) and `shim/`
  (mmcv's ConvModule, timm's helpers);
- ours: `train.train_and_evaluate` with the same config.

The start is ours: the initial variables of the run (encoder from `model.pretrained`, the source
task's model when `learning.pretrain_steps` > 0; decoder, AllSpark module and Semantic Memory from
the seed), written as the release's state dict and loaded into its model, strict.

Batches (`--batches`):
- `same`: our input pipeline's batches for the run (seed, method, config), written once as arrays
  (`image_l`, `mask_l`, `image_u`: step-major, NHWC, normalised) and read by both sides in step
  order. Any difference is then the training itself.
- `own`: ours from our pipeline; the release's from its own `dataset/semi.py` on the same image
  files with its own randomness (seeded by the run's seed) and its sampler's order. The
  difference from `same` is the augmentation's share.

Every run uses the release's recipe for its method, which the config must hold (`check_release_recipe`);
the labeled images get the strong photometric augmentation (`data.labeled_strong`), as the
release's dataset code gives it. `--nodropout` (the default) sets every dropout and
stochastic-depth rate to 0 on both sides, so that a run is a deterministic function of its start
and batches and the two sides can agree step by step; `--dropout` keeps the model's rates (each side
draws its own masks: the losses part from step 0).

Reported per method, seed and batch source: both sides' losses per step (`loss`, `loss_x`,
`loss_u`), the first step whose total loss differs by more than 1e-3 and 1e-2 relative, the final
parameters' relative difference (L2 over every parameter, and the tensor with the largest absolute
difference), and both validation mIoUs (the release's own `evaluate` too). For AllSpark on the same
batches also the first step after which the Semantic Memory's write pointers differ (the two sides
grouped a channel under different classes) and our closest calls at that step
(`run_comparison.memory_parting`):
the memory is written from step 1 but read only from the warm-up on, so a parting there shows in
the losses only later. JSON:
  {"runs": [{"method", "seed", "batches", "steps",
             "release": {"losses": {name: [per step]}, "miou", "miou_release_evaluate", "seconds"},
             "ours": {"losses": {...}, "miou", "seconds"},
             "first_step_over": {"0.001": step or null, "0.01": ...},
             "params_rel_diff", "params_worst": {"name", "max_abs_diff"}, "buffers_rel_diff",
             "miou_diff", "memory_parting" (AllSpark, same batches: `run_comparison.memory_parting` or
             null)}],
   "pretrain": ..., "seconds", "command", "config"}
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app
from absl import flags
from absl import logging

from allspark_jax.commands import config_flag
from allspark_jax.config import checks
from allspark_jax.experiments import run_comparison

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RELEASE_RUNNER = os.path.join(PACKAGE_ROOT, "benchmarks", "release_training.py")
METHODS = ("supervised", "semi", "allspark")
BATCH_SOURCES = ("same", "own")
TOLERANCES = (1e-3, 1e-2)
# The release's scalar tags -> our metric names (`train_step.LOSS_KEYS`).
RELEASE_LOSSES = {"train/loss_all": "loss", "train/loss_x": "loss_x", "train/loss_u": "loss_u",
                  "train/loss_w_fp": "loss_u"}
# What the release's trainers do, as config values; any other value is refused.
RELEASE_RECIPE = {
    "train.teacher": "online", "data.student_view": "weak", "train.conf_thresh": 0.0,
    "data.cutmix_prob": 0.0, "train.loss_x": "ce", "train.loss_u_ignore_padding": False,
    "optim.name": "sgd", "optim.momentum": 0.9, "optim.weight_decay": 1e-4,
    "model.encoder": "mit", "data.name": "synthetic",
}
DROPOUT_KEYS = ("model.head_dropout", "model.attn_drop", "model.proj_drop", "model.drop_path_rate")

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The command's flags (defined when it runs)."""
    config_flag.define("config", None, "Config file or shipped config (configs/learning.py); override "
                       "keys with --config.key=value.")
    flags.DEFINE_string("release_dir", None, "Folder holding allspark_release/ (the release's files) "
                        "and shim/.")
    flags.DEFINE_string("release_python", None, "A Python with torch, to run the release.")
    flags.DEFINE_string("release_runner", RELEASE_RUNNER, "The script the release's Python runs "
                        "(default: benchmarks/release_training.py).")
    flags.DEFINE_list("methods", list(METHODS), "Methods to compare: a subset of "
                      f"{', '.join(METHODS)}.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; one pair of runs per seed, method and batch "
                      "source.")
    flags.DEFINE_list("batches", ["same"], "Batch sources: 'same' (ours written once, read by both) "
                      "and/or 'own' (each side's own augmentation).")
    flags.DEFINE_bool("dropout", False, "Keep the model's dropout and stochastic-depth rates (each "
                      "side draws its own masks); default: all 0, for a deterministic comparison.")
    flags.DEFINE_list("states_at", [], "Also compare both sides' states (every tensor, the "
                      "memory's write pointers) after these optimizer steps.")
    flags.DEFINE_float("timeout", 7200.0, "Seconds one release run may take.")
    flags.DEFINE_string("json", None, "Write the results here.")
    flags.DEFINE_string("workdir", None, "Runs, batches and the dataset go here (default: a temporary "
                        "folder, removed at the end).")


def check_release_recipe(config, method: str) -> None:
    """ValueError naming the first key whose value the release's trainer for `method` does not
    have (the release's iteration is fixed: online teacher, one unlabeled view, no threshold, ...).
    Keys a method does not read are not checked."""
    from allspark_jax import method as method_lib  # pylint: disable=g-import-not-at-top
    unread = method_lib.unread_keys(method)
    for key, want in RELEASE_RECIPE.items():
        if key in unread:
            continue
        got = checks.get(config, key)
        if got != want:
            raise ValueError(f"--config.{key}={got!r}: the release's trainer for '{method}' runs "
                             f"{want!r}; versus_release_training compares that iteration")
    if method_lib.from_config(config).allspark:
        from allspark_jax.models.mit import token_grid  # pylint: disable=g-import-not-at-top
        from allspark_jax.models.segmentor import model_config_from  # pylint: disable=g-import-not-at-top
        crop = int(config.data.crop_size)
        side = token_grid(crop, model_config_from(config).backbone)[-1]
        if crop // 32 + 1 != side:
            raise ValueError(
                f"--config.data.crop_size={crop}: the release sizes its Semantic Memory for "
                f"(crop // 32 + 1)^2 = {(crop // 32 + 1) ** 2} tokens, but a {crop} px crop has "
                f"{side}^2; its AllSpark trains only at crops where the two agree (not a multiple "
                "of 32, e.g. 65 or 513)")


def write_batches(opts, plan, method, steps: int, folder: str) -> dict:
    """Our pipeline's first `steps` batches of the run as .npy arrays in `folder` (step-major):
    `image_l` (S, B, H, W, 3) float32, `mask_l` (S, B, H, W) int32, and for the semi-supervised
    methods `image_u` and `pad_u`. The release's iteration has one unlabeled view: the teacher's
    and the student's views must be the same image. Returns {name: array} (memory-mapped)."""
    from allspark_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    from allspark_jax import train_step as train_step_lib  # pylint: disable=g-import-not-at-top
    keys = train_step_lib.batch_keys(method)
    it = input_pipeline.create_train_iterator(opts, start_step=0, plan=plan)
    os.makedirs(folder, exist_ok=True)
    arrays = {}
    try:
        for s in range(steps):
            b = next(it)
            if "image_u_s" in keys and not np.array_equal(b["image_u_w"], b["image_u_s"]):
                raise ValueError("versus_release_training: the teacher's and the student's "
                                 "unlabeled views differ; the release's iteration has one view "
                                 "(data.student_view 'weak')")
            row = {"image_l": b["image_l"], "mask_l": b["mask_l"]}
            if "image_u_w" in keys:
                row.update(image_u=b["image_u_w"], pad_u=b["pad_u"])
            for k, v in row.items():
                v = np.asarray(v)
                if k not in arrays:
                    arrays[k] = np.lib.format.open_memmap(os.path.join(folder, f"{k}.npy"), "w+",
                                                          v.dtype, (steps,) + v.shape)
                arrays[k][s] = v
    finally:
        it.close()
    for v in arrays.values():
        v.flush()
    return {k: np.load(os.path.join(folder, f"{k}.npy"), mmap_mode="r") for k in arrays}


def batches_for_ours(arrays: dict, method):
    """The written arrays as the batches `train.train_and_evaluate(batches=...)` reads."""
    from allspark_jax import train_step as train_step_lib  # pylint: disable=g-import-not-at-top
    keys = train_step_lib.batch_keys(method)
    names = {"image_l": "image_l", "mask_l": "mask_l", "image_u_w": "image_u",
             "image_u_s": "image_u", "pad_u": "pad_u"}
    for s in range(arrays["image_l"].shape[0]):
        yield {k: np.asarray(arrays[names[k]][s]) for k in keys}


def release_spec(config, method: str, seed: int, *, init: str, batches: str | None, out: str,
                 opts, labeled: str, unlabeled: str, epochs: int, dropout: bool) -> dict:
    """The spec `benchmarks/release_training.py` reads: the release's yaml config for the run,
    its architecture, start, data and output folder."""
    from allspark_jax.models.segmentor import model_config_from  # pylint: disable=g-import-not-at-top
    mc = model_config_from(config)
    mit = mc.backbone
    ce = {"name": "CELoss", "kwargs": {"ignore_index": 255}}
    return {
        "method": method, "seed": int(seed), "dropout": bool(dropout),
        "init": init, "batches": batches, "out": out,
        "class_names": list(opts.class_names),
        "data": {"root": opts.root, "labeled": labeled, "unlabeled": unlabeled,
                 "val": os.path.join(opts.root, "splits", "val.txt")},
        "cfg": {"dataset": "pascal", "nclass": int(config.data.num_classes),
                "crop_size": int(config.data.crop_size), "data_root": opts.root,
                "epochs": int(epochs), "batch_size": int(config.data.batch_size),
                "lr": float(config.optim.lr), "lr_multi": float(config.optim.lr_multi),
                "criterion": ce, "criterion_u": ce},
        "architecture": {"embed_dims": list(mit.embed_dims), "depths": list(mit.depths),
                         "num_heads": list(mit.num_heads), "mlp_ratios": list(mit.mlp_ratios),
                         "sr_ratios": list(mit.sr_ratios), "norm_eps": float(mit.norm_eps),
                         "drop_path_rate": float(mit.drop_path_rate),
                         "num_classes": int(mc.num_classes), "allspark_heads": int(mc.allspark_heads),
                         "decoder_dim": int(mc.decoder_dim), "crop_size": int(config.data.crop_size),
                         "warmup_epoch": int(config.train.warmup_epoch)},
    }


def run_release(spec: dict, *, release_dir: str, release_python: str, runner: str,
                timeout: float) -> dict:
    """Runs the release's trainer for `spec`; returns its losses.json and final state dict."""
    os.makedirs(spec["out"], exist_ok=True)
    path = os.path.join(spec["out"], "spec.json")
    with open(path, "w") as f:
        json.dump(spec, f, indent=2)
    cmd = [release_python, runner, "--release", release_dir, "--spec", path]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"versus_release_training: the release timed out after {timeout:.0f} s: "
                           f"{' '.join(cmd)}") from None
    losses = os.path.join(spec["out"], "losses.json")
    final = os.path.join(spec["out"], "final.npz")
    if proc.returncode or not (os.path.isfile(losses) and os.path.isfile(final)):
        raise RuntimeError(f"versus_release_training: the release failed (exit {proc.returncode}): "
                           f"{' '.join(cmd)}\n{proc.stderr[-4000:]}")
    with open(losses) as f:
        out = json.load(f)
    with np.load(final) as f:
        out["state"] = {k: f[k] for k in f.files}
    out["losses"] = {RELEASE_LOSSES[k]: v for k, v in out["losses"].items() if k in RELEASE_LOSSES}
    return out


def train_ours(config, run_dir: str, batches, states_at=(), *, release_ptrs=None,
               parting=None) -> dict:
    """Our run (`batches` None: from our input pipeline): {'losses': {name: [per step]}, 'miou',
    'seconds', 'state': the final variables as the release's state dict, 'states': {N: the
    variables after step N} for N in `states_at`, 'memory_parting'}.

    With `release_ptrs` (the release's Semantic Memory write pointers after each step, on the same
    batches) and `parting` ({'start': the initial variables, 'batch': step -> that step's batch,
    'model', 'warmup_steps'}): at the first step whose pointers differ from the release's,
    `run_comparison.memory_parting` of it (else None)."""
    import jax  # pylint: disable=g-import-not-at-top
    from allspark_jax import inspection, train  # pylint: disable=g-import-not-at-top
    from allspark_jax.weights import release as release_names  # pylint: disable=g-import-not-at-top
    losses, states, found = {}, {}, {}
    prev = [parting["start"]] if parting else None

    def on_step(step, metrics, state):
        for k, v in metrics.items():
            if k.startswith("loss"):
                losses.setdefault(k, []).append(v)
        if step in states_at:
            states[step] = release_names.to_state_dict(jax.device_get(state.variables()))
        if prev is None or found or step > len(release_ptrs):
            return
        variables = jax.device_get(state.variables())
        ptr = inspection.memory_of(variables)["queue_ptr"]
        if not np.array_equal(ptr, release_ptrs[step - 1]):
            b = parting["batch"](step)
            internals = inspection.allspark_internals(
                parting["model"], prev[0], b["image_l"], b["image_u_w"],
                use_memory=step - 1 >= parting["warmup_steps"],
                key_group_size=config.train.key_group_size)
            found["parting"] = run_comparison.memory_parting(step, ptr, release_ptrs[step - 1],
                                                             internals)
        prev[0] = variables

    t0 = time.time()
    out = train.train_and_evaluate(config, run_dir, on_step=on_step, batches=batches)
    return {"losses": losses, "miou": float(out["eval"][out["step"]]["student"]["miou"]),
            "seconds": time.time() - t0, "states": states,
            "memory_parting": found.get("parting"),
            "state": release_names.to_state_dict(jax.device_get(out["state"].variables()))}


def compare_run(config, method_name: str, seed: int, source: str, *, workdir: str, plan,
                total_steps: int, release: dict, dropout: bool, ours_runs: dict,
                states_at=(), print_fn=print) -> dict:
    """One method / seed / batch source: both sides trained and evaluated, compared (and their
    states after the steps `states_at`: `run_comparison.tensor_diffs`). `ours_runs` holds our runs by (method,
    seed), reused across batch sources."""
    import jax  # pylint: disable=g-import-not-at-top
    from allspark_jax import config as config_lib  # pylint: disable=g-import-not-at-top
    from allspark_jax import optimizer, sharding  # pylint: disable=g-import-not-at-top
    from allspark_jax import train  # pylint: disable=g-import-not-at-top
    from allspark_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    from allspark_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
    from allspark_jax.models.segmentor import build_model  # pylint: disable=g-import-not-at-top
    from allspark_jax.weights import loader, release as release_names  # pylint: disable=g-import-not-at-top

    folder = os.path.join(workdir, "runs", f"{method_name}_seed{seed}_{source}")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    run_opts = config_lib.data_options(config)
    method = run_opts.method
    run_plan = input_pipeline.train_plan(run_opts)
    epochs = int(config.train.epochs)
    if epochs * run_plan.steps_per_epoch != total_steps:
        raise ValueError(f"versus_release_training: '{method_name}' runs {epochs} epochs of "
                         f"{run_plan.steps_per_epoch} steps, not the {total_steps} steps of the "
                         "comparison; the release runs whole epochs")
    if not method.labeled_only and run_plan.steps_per_epoch < 8:
        raise ValueError(f"versus_release_training: {run_plan.steps_per_epoch} steps per epoch; "
                         f"the release's '{method_name}' trainer logs every (steps per epoch // 8) "
                         "steps and needs at least 8 (more unlabeled images or a smaller batch)")

    # The start: our initial variables as the release's state dict.
    model = build_model(config)
    tx, _ = optimizer.create_optimizer(config.optim, total_steps)
    state, _ = train.initial_state(config, model, tx, sharding.create_mesh(), method)
    start = jax.device_get(state.variables())
    init_path = os.path.join(folder, "init.npz")
    np.savez(init_path, **release_names.to_state_dict(start))
    param_names = set(release_names.to_state_dict({"params": start["params"]}))

    arrays = None
    if source == "same":
        arrays = write_batches(run_opts, run_plan, method, total_steps, os.path.join(folder, "batches"))
    # The release's lists: the labeled and unlabeled images as our pipeline resolved them.
    lists = {}
    for name, pairs in (("labeled", run_plan.split.labeled), ("unlabeled", plan.split.unlabeled)):
        lists[name] = os.path.join(folder, f"{name}.txt")
        with open(lists[name], "w") as f:
            f.write("".join(f"{image} {mask}\n" for image, mask in pairs))
    spec = release_spec(config, method_name, seed, init=init_path,
                        batches=os.path.join(folder, "batches") if arrays is not None else None,
                        out=os.path.join(folder, "release"), opts=run_opts,
                        labeled=lists["labeled"], unlabeled=lists["unlabeled"], epochs=epochs,
                        dropout=dropout)
    spec["states_at"] = sorted(int(n) for n in states_at)
    rel = run_release(spec, **release)

    # Ours: our batches are our augmentation, so one run serves both batch sources.
    ours = ours_runs.get((method_name, seed))
    if ours is None:
        parting = None
        if arrays is not None and rel.get("queue_ptr"):  # AllSpark on the same batches
            parting = {"start": start, "model": model,
                       "warmup_steps": int(config.train.warmup_epoch) * run_plan.steps_per_epoch,
                       "batch": lambda step: next(batches_for_ours(
                           {k: v[step - 1:step] for k, v in arrays.items()}, method))}
        ours = ours_runs[(method_name, seed)] = train_ours(
            config, os.path.join(folder, "ours"),
            None if arrays is None else batches_for_ours(arrays, method), states_at,
            release_ptrs=rel.get("queue_ptr"), parting=parting)
    ours_losses, ours_miou = ours["losses"], ours["miou"]

    # The release's final weights through our evaluator.
    template = jax.eval_shape(lambda: start)
    variables = loader.load_variables(os.path.join(spec["out"], "final.npz"), template,
                                      model_config=model.config)
    predictor = evaluator.make_predictor(config, model)
    rel_miou = float(evaluator.evaluate_variables(config, run_opts, predictor, variables,
                                                  desc="release")["miou"])
    row = {"method": method_name, "seed": int(seed), "batches": source, "steps": total_steps,
           "dropout": bool(dropout),
           "release": {"losses": rel["losses"], "miou": rel_miou,
                       "miou_release_evaluate": rel.get("miou"), "seconds": rel.get("seconds"),
                       "torch": rel.get("torch")},
           "ours": {"losses": ours_losses, "miou": ours_miou, "seconds": ours["seconds"]},
           "first_step_over": {str(t): run_comparison.first_step_over(
               ours_losses.get("loss", []), rel["losses"].get("loss", []), t) for t in TOLERANCES},
           **run_comparison.state_diff(ours["state"], rel["state"], param_names),
           "miou_diff": ours_miou - rel_miou}
    if source == "same" and rel.get("queue_ptr"):
        row["memory_parting"] = ours["memory_parting"]
    if states_at:
        row["states"] = {}
        for n in sorted(states_at):
            with np.load(os.path.join(spec["out"], f"state_{n}.npz")) as f:
                row["states"][str(n)] = run_comparison.tensor_diffs(ours["states"][n],
                                                                    {k: f[k] for k in f.files})
    print_fn(f"{method_name} seed {seed} ({source} batches): release {rel_miou:.2f}, ours "
             f"{ours_miou:.2f} mIoU; losses part (>1e-3) at step {row['first_step_over']['0.001']}; "
             f"final params differ by {row['params_rel_diff']:.3g} (relative L2)")
    parted = row.get("memory_parting")
    if parted:
        best = parted["candidates"][0] if parted["candidates"] else None
        print_fn(f"  the memory's write pointers part after step {parted['step']} (ours minus the "
                 f"release's writes per class: {parted['ours_minus_release_writes']}); "
                 + (f"our closest call: image {best['image']} channel {best['channel']}, class "
                    f"{best['ours_class']} over {best['runner_up']} by {best['margin']:.3g}"
                    if best else "no channel of ours explains it"))
    shutil.rmtree(os.path.join(folder, "batches"), ignore_errors=True)
    return row


def run(base, *, methods, seeds, sources, workdir: str, release: dict, dropout: bool,
        states_at=(), print_fn=print) -> dict:
    """Every (method, seed, batch source) pair of runs; {'runs': [...], 'pretrain': ...}."""
    import copy  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    from allspark_jax import config as config_lib  # pylint: disable=g-import-not-at-top
    from allspark_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
    from allspark_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    from allspark_jax.experiments import learning  # pylint: disable=g-import-not-at-top

    os.makedirs(workdir, exist_ok=True)
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir",
                          os.path.join(workdir, workdir_lib.COMPILATION_CACHE_DIR))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    base = copy.deepcopy(base)
    base.compilation_cache = False
    base.train.progress_bar = False
    opts = config_lib.data_options(base, os.path.join(workdir, "data"))
    base.data.root = opts.root
    pretrain = None
    if int(base.learning.pretrain_steps) > 0:  # the learning benchmark's source task, as it is
        pretrain = learning.pretrain_encoder(base, workdir, print_fn)
        base.model.pretrained = pretrain["path"]
        base.learning.pretrain_steps = 0
        base.learning.pretrain_lr = None
    base.data.labeled_strong = True  # the release's dataset code jitters every labeled image
    if not dropout:
        for key in DROPOUT_KEYS:
            checks.set_value(base, key, 0.0)
    plan = input_pipeline.train_plan(config_lib.data_options(config_lib.with_method(base, "allspark")))
    total_steps = int(base.train.epochs) * plan.steps_per_epoch
    plan_fn = lambda c: input_pipeline.train_plan(config_lib.data_options(c))  # noqa: E731
    runs, ours_runs = [], {}
    for method_name in methods:
        for seed in seeds:
            config = learning.row_config(base, method_name, seed, all_labeled="",
                                         total_steps=total_steps, plan_fn=plan_fn)
            check_release_recipe(config, method_name)
            for source in sorted(sources, key=BATCH_SOURCES.index):
                runs.append(compare_run(config, method_name, seed, source, workdir=workdir,
                                        plan=plan, total_steps=total_steps, release=release,
                                        dropout=dropout, ours_runs=ours_runs,
                                        states_at=states_at, print_fn=print_fn))
    return {"runs": runs, "pretrain": pretrain}


def format_table(runs) -> str:
    lines = ["| method | seed | batches | loss parts > 1e-3 at step | > 1e-2 at step | final params "
             "rel. diff | release mIoU | ours mIoU | ours - release |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        f = r["first_step_over"]
        lines.append(
            f"| {r['method']} | {r['seed']} | {r['batches']} | {f['0.001'] or 'never'} | "
            f"{f['0.01'] or 'never'} | {r['params_rel_diff']:.3g} | {r['release']['miou']:.2f} | "
            f"{r['ours']['miou']:.2f} | {r['miou_diff']:+.2f} |")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.config is None:
        raise app.UsageError("--config is required, e.g. --config configs/learning.py")
    for name in ("release_dir", "release_python"):
        if not FLAGS[name].value:
            raise app.UsageError(f"--{name} is required")
    if not os.path.isdir(FLAGS.release_dir):
        raise app.UsageError(f"--release_dir={FLAGS.release_dir!r} is not a folder; expected one "
                             "holding allspark_release/ and shim/")
    if not (os.path.isfile(FLAGS.release_python) and os.access(FLAGS.release_python, os.X_OK)):
        raise app.UsageError(f"--release_python={FLAGS.release_python!r} is not an executable "
                             "file; expected a Python with torch")
    if not os.path.isfile(FLAGS.release_runner):
        raise app.UsageError(f"--release_runner={FLAGS.release_runner!r}: no such file")
    bad = [m for m in FLAGS.methods if m not in METHODS]
    if bad or not FLAGS.methods:
        raise app.UsageError(f"--methods={','.join(FLAGS.methods)}: expected a subset of "
                             f"{', '.join(METHODS)}")
    bad = [s for s in FLAGS.batches if s not in BATCH_SOURCES]
    if bad or not FLAGS.batches:
        raise app.UsageError(f"--batches={','.join(FLAGS.batches)}: expected a subset of "
                             f"{', '.join(BATCH_SOURCES)}")
    try:
        seeds = [int(s) for s in FLAGS.seeds]
    except ValueError:
        raise app.UsageError(f"--seeds={','.join(FLAGS.seeds)}: expected integers") from None
    try:
        states_at = {int(s) for s in FLAGS.states_at}
    except ValueError:
        raise app.UsageError(f"--states_at={','.join(FLAGS.states_at)}: expected step numbers"
                             ) from None
    if any(n < 1 for n in states_at):
        raise app.UsageError(f"--states_at={','.join(FLAGS.states_at)}: steps count from 1")
    from allspark_jax.commands import startup  # pylint: disable=g-import-not-at-top
    base = FLAGS.config
    startup.validated_start(base)
    logging.set_verbosity(logging.WARNING)
    workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="allspark_versus_training_")
    release = {"release_dir": os.path.abspath(FLAGS.release_dir),
               "release_python": FLAGS.release_python,
               "runner": os.path.abspath(FLAGS.release_runner), "timeout": FLAGS.timeout}
    t0 = time.time()
    try:
        ran = run(base, methods=FLAGS.methods, seeds=seeds, sources=FLAGS.batches,
                  workdir=workdir, release=release, dropout=FLAGS.dropout, states_at=states_at,
                  print_fn=lambda s: print(s, flush=True))
    except (ValueError, *startup.user_errors()) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if not FLAGS.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    out = {**ran, "seconds": time.time() - t0,
           "command": " ".join(["python -m allspark_jax.experiments.versus_release_training"]
                               + sys.argv[1:]),
           "config": json.loads(base.to_json_best_effort())}
    if ran["pretrain"] and not FLAGS.workdir:
        out["pretrain"]["path"] = None
    print(format_table(ran["runs"]))
    print(f"total: {out['seconds'] / 60:.1f} min")
    if FLAGS.json:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
        with open(FLAGS.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {FLAGS.json}")


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["config"])
    app.run(main)
