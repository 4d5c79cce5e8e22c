r"""The learning benchmark: supervised, semi and AllSpark on the same labels, several seeds.

    python -m allspark_jax.experiments.learning --config configs/learning.py --seeds 0,1,2 \
        --methods supervised,semi,allspark --json out.json [--config.KEY=VALUE ...]

Every row trains one run per seed from the same config (`config.seed` = the seed: initialisation,
data order, augmentation; the dataset itself is fixed by the config) and evaluates it once at the
end. Rows (`ROWS`): one per method of `--methods` (UniMatch V2's on an AllSpark base config with
the demo's settings of that recipe: `recipe_config`); with `allspark` the project's extensions on it
(`allspark_ema`: the EMA teacher; `allspark_strong_cutmix`: the strong student view, confidence
threshold and CutMix; `allspark_unlabeled_branch`: the module's unlabeled branch, the one the
pseudo-label loss trains, evaluates (`model.inference_branch`); `allspark_unlabeled_teacher`: it
also makes the pseudo-labels (`train.teacher_branch`)); with
`supervised` the ceiling `supervised_all_labels`, every training image
labeled (the split's labeled and unlabeled lists together), and, with a UniMatch V2 method too,
`supervised_adamw` (the supervised baseline with the 'unimatch_v2' row's optimiser). Every run takes the same number of
optimizer steps with the same labeled batch: that of the config's semi-supervised schedule
(`train.epochs` x unlabeled // batch); the supervised rows, whose epochs walk the labeled list, get as
many epochs as that takes (the schedule spans them, the run stops at the common step count).

With `learning.pretrain_steps` > 0 (configs/default.py) every run's encoder starts from one model
trained first, supervised, on a source task: a synthetic dataset of `learning.pretrain_num_classes`
classes (other shape / colour / stripe pairings than the compared task's), rendered with its own
seed, every image labeled; none of its images is a training or validation image of the comparison.
That is the role of the ImageNet-pretrained MiT encoder with which the paper starts every run; the
decoder (and AllSpark) start from random initialisation per seed. 0: every run from scratch.

`--branches` also scores every AllSpark run's final student through the module's other
branches (`allspark_jax.models.allspark.BRANCHES`): "memory" (the labeled-to-unlabeled attention
with the Semantic Memory as keys, as the student trains after the warm-up) and "unlabeled" (the
unlabeled images' branch, the one the pseudo-label loss trains). The row's own mIoU is its
`model.inference_branch`'s: the release's inference, branch "labeled", except in
`allspark_unlabeled_branch` and `allspark_unlabeled_teacher` ("unlabeled"; there "labeled" and
"memory" are scored). Inspection
only: the memory needs validation crops with the training crop's token grid (`eval.mode`
'center_crop' or 'sliding_window').

Prints a table (mIoU of every seed, mean, sample standard deviation, wall and CPU minutes) and
writes JSON:
  {"results": {row: {"miou": [per seed], "mean": m, "std": s, "miou_ema": [...] (EMA rows),
                     "branches": {"memory": {"miou": [...], "mean", "std"}, "unlabeled": ...}
                     (AllSpark rows with --branches),
                     "seconds": [...], "cpu_seconds": [...], "steps": n, "method": ...,
                     "overrides": {...}}},
   "summary": {"allspark_minus_supervised": ..., "ceiling_minus_supervised": ..., ...},
   "pretrain": {"miou": source validation mIoU, "steps", "seconds", ...} or null,
   "seeds": [...], "seconds": wall, "cpu_seconds": this process's CPU time, "command": "...",
   "config": {the base config}}
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging

from allspark_jax import method as method_lib
from allspark_jax.commands import config_flag
from allspark_jax.config.checks import error, in_range, set_value
from allspark_jax.errors import NonFiniteError

ALL_LABELED = "<all labeled>"  # replaced by the list of every training image (`write_all_labeled`)
# Row name -> (method, config overrides). The extension values are UniMatch's (threshold 0.95,
# CutMix probability 0.5).
ROWS = {
    "supervised": ("supervised", {}),
    "supervised_all_labels": ("supervised", {"data.split": ALL_LABELED}),
    "semi": ("semi", {}),
    "allspark": ("allspark", {}),
    "allspark_ema": ("allspark", {"train.teacher": "ema"}),
    "allspark_strong_cutmix": ("allspark", {"data.student_view": "strong",
                                            "train.conf_thresh": 0.95, "data.cutmix_prob": 0.5}),
    # The module's unlabeled branch (the one loss_u trains) evaluates; in the second row it also
    # makes the pseudo-labels.
    "allspark_unlabeled_branch": ("allspark", {"model.inference_branch": "unlabeled"}),
    "allspark_unlabeled_teacher": ("allspark", {"model.inference_branch": "unlabeled",
                                                "train.teacher_branch": "unlabeled"}),
    # UniMatch V2's recipe, without and with AllSpark (`recipe_config`).
    "unimatch_v2": ("unimatch_v2", {}),
    "unimatch_v2_allspark": ("unimatch_v2_allspark", {}),
    # The supervised baseline with the 'unimatch_v2' row's optimiser (`OPTIMIZER_ROWS`): what the
    # optimiser alone is worth.
    "supervised_adamw": ("supervised", {}),
}
# Rows that take the 'unimatch_v2' row's optimiser (optim.*) and nothing else of its recipe; listed
# when --methods has 'supervised' and a UniMatch V2 method.
OPTIMIZER_ROWS = ("supervised_adamw",)

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The command's flags (defined when it runs, so that other commands can import this module)."""
    config_flag.define("config", None, "Config file or shipped config (configs/learning.py); override "
                       "keys with --config.key=value.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; one run per seed and row.")
    flags.DEFINE_list("methods", ["supervised", "semi", "allspark"], "Methods to compare.")
    flags.DEFINE_bool("extensions", True, "With allspark: the rows allspark_ema, "
                      "allspark_strong_cutmix, allspark_unlabeled_branch and "
                      "allspark_unlabeled_teacher.")
    flags.DEFINE_bool("ceiling", True, "With supervised: the row supervised_all_labels.")
    flags.DEFINE_list("rows", None, "Run exactly these rows (names of ROWS, in table order) instead "
                      "of those --methods, --extensions and --ceiling give.")
    flags.DEFINE_bool("branches", False, "AllSpark rows: also score each run's final student through "
                      "the module's other branches (inspection; 'memory' and 'unlabeled' for the "
                      "release's inference).")
    flags.DEFINE_string("json", None, "Write the results here.")
    flags.DEFINE_string("workdir", None, "Runs and the dataset go here (default: a temporary folder, "
                        "removed at the end).")


def rows_for(methods, extensions: bool = True, ceiling: bool = True) -> list[str]:
    """The rows that `--methods` (with the extension / ceiling switches) asks for, in table order."""
    unknown = [m for m in methods if m not in method_lib.METHODS]
    if unknown or not methods:
        raise app.UsageError(f"--methods={','.join(methods)}: expected a comma-separated subset of "
                             f"{', '.join(method_lib.METHODS)}")
    rows = []
    for name, (method, _) in ROWS.items():
        if method not in methods:
            continue
        if name == "supervised_all_labels" and not ceiling:
            continue
        if name.startswith("allspark_") and not extensions:
            continue
        if name in OPTIMIZER_ROWS and not any(m.startswith("unimatch_v2") for m in methods):
            continue
        rows.append(name)
    return rows


def named_rows(names) -> list[str]:
    """`--rows`: the named rows in table order; an unknown or repeated name -> UsageError."""
    unknown = [n for n in names if n not in ROWS]
    if unknown or not names or len(set(names)) != len(names):
        raise app.UsageError(f"--rows={','.join(names)}: expected distinct names among "
                             f"{', '.join(ROWS)}")
    return [name for name in ROWS if name in names]


def validate_learning(config) -> None:
    """The `learning.*` keys (the source task's pretraining): raises ConfigError naming the first
    bad one. The rest of the config is `config.validate`'s."""
    in_range(config, "learning.pretrain_steps", 0, integer=True)
    in_range(config, "learning.pretrain_num_classes", 2, 255, integer=True)
    in_range(config, "learning.pretrain_num_images", 2, integer=True)
    in_range(config, "learning.pretrain_seed", 0, integer=True)
    in_range(config, "learning.pretrain_lr", 0.0, lo_open=True, optional=True)
    if int(config.learning.pretrain_steps) == 0:
        if config.learning.pretrain_lr is not None:
            raise error("learning.pretrain_lr", config.learning.pretrain_lr,
                        "None with learning.pretrain_steps 0 (no source task to train)")
        return
    if config.data.name != "synthetic":
        raise error("learning.pretrain_steps", config.learning.pretrain_steps,
                    f"0 with data.name={config.data.name!r} (the source task is synthetic, "
                    "pretraining for the synthetic benchmark task)")
    if config.model.pretrained:
        raise error("model.pretrained", config.model.pretrained,
                    "None with learning.pretrain_steps > 0 (the source task's encoder is the "
                    "runs' pretrained encoder)")
    if int(config.learning.pretrain_num_images) < int(config.data.batch_size):
        raise error("learning.pretrain_num_images", config.learning.pretrain_num_images,
                    f"at least data.batch_size ({config.data.batch_size}): one source batch")
    if int(config.learning.pretrain_seed) == int(config.data.synthetic.seed):
        raise error("learning.pretrain_seed", config.learning.pretrain_seed,
                    f"a seed other than data.synthetic.seed ({config.data.synthetic.seed}): the "
                    "source task's images must not be the benchmark's")


def write_all_labeled(split, folder: str, needed_by: str = "the row supervised_all_labels "
                      "(run with --noceiling)") -> str:
    """Writes `folder`/labeled.txt: every training image of `split` (a TrainSplit: labeled and
    unlabeled) with its mask; returns its path. A supervised run reads no unlabeled list."""
    from allspark_jax.errors import DataError  # pylint: disable=g-import-not-at-top
    pairs = list(split.labeled) + list(split.unlabeled)
    missing = [image for image, mask in pairs if not mask]
    if missing:
        raise DataError(f"{split.unlabeled_source} lists {len(missing)} images without a mask "
                        f"(e.g. {missing[0]}); {needed_by} needs a mask for every training image")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "labeled.txt")
    with open(path, "w") as f:
        f.writelines(f"{image} {mask}\n" for image, mask in pairs)
    return path


def row_config(base, row: str, seed: int, *, all_labeled: str, total_steps: int, plan_fn):
    """The config of one run: `base` with the row's method and overrides, the seed, and (supervised)
    the epochs that the common step count takes. `plan_fn(config)` -> its TrainPlan."""
    from allspark_jax import config as config_lib  # pylint: disable=g-import-not-at-top
    method, overrides = ROWS[row]
    config = recipe_config(base, method)
    if row in OPTIMIZER_ROWS:
        config.optim = copy.deepcopy(recipe_config(base, "unimatch_v2").optim)
    config.seed = int(seed)
    for key, value in overrides.items():
        set_value(config, key, all_labeled if value == ALL_LABELED else value)
    config.train.num_train_steps = int(total_steps)
    if method_lib.from_config(config).labeled_only:
        per_epoch = plan_fn(config).steps_per_epoch
        config.train.epochs = max(1, math.ceil(total_steps / per_epoch))
    config_lib.validate(config)
    return config


def recipe_config(base, method: str):
    """`base` switched to `method`: the keys the method does not read back at their defaults
    (`config.with_method`). A UniMatch V2 method on a base config of another recipe (the
    benchmark's default base is AllSpark's) also takes the demo's UniMatch V2 settings
    (`configs/demo.py` `use_unimatch_v2`: AdamW at its rates, the EMA teacher, two strong views
    with CutMix); a base config of that recipe (`configs/learning.py:unimatch_v2`) keeps its own,
    command-line overrides included."""
    from allspark_jax import config as config_lib  # pylint: disable=g-import-not-at-top
    from allspark_jax.configs import default, demo  # pylint: disable=g-import-not-at-top
    config = config_lib.with_method(base, method)
    if method in default.UNIMATCH_V2_METHODS and base.method not in default.UNIMATCH_V2_METHODS:
        demo.use_unimatch_v2(config, method)
    return config


def inspected_branches(config) -> tuple[str, ...]:
    """--branches: the AllSpark branches other than the run's own (`model.inference_branch`)."""
    from allspark_jax.models.allspark import BRANCHES  # pylint: disable=g-import-not-at-top
    return tuple(b for b in BRANCHES if b != config.model.inference_branch)


def check_branches(base) -> None:
    """--branches: the memory branch needs validation inputs on the training crop's token grid."""
    from allspark_jax.config.validation import memory_branch_problem  # pylint: disable=g-import-not-at-top
    problem = memory_branch_problem(base)
    if problem:
        raise app.UsageError(f"--branches: {problem}")


def branch_results(config, state) -> dict:
    """{branch: validation mIoU} of a trained AllSpark state's student through the branches other
    than its own (`inspected_branches`)."""
    from allspark_jax import config as config_lib  # pylint: disable=g-import-not-at-top
    from allspark_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
    from allspark_jax.models.segmentor import build_model  # pylint: disable=g-import-not-at-top
    opts = config_lib.data_options(config)
    variables = state.variables()
    out = {}
    for branch in inspected_branches(config):
        predictor = evaluator.make_predictor(config, build_model(config).clone(branch=branch))
        out[branch] = float(evaluator.evaluate_variables(config, opts, predictor, variables,
                                                         desc=f"eval ({branch})")["miou"])
    return out


def summarize(miou: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one seed)."""
    n = len(miou)
    mean = sum(miou) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in miou) / (n - 1)) if n > 1 else 0.0
    return mean, std


def format_table(results: dict, seeds) -> str:
    """One line per row: mIoU (%) of each seed, mean, std, steps, wall and CPU minutes of all its
    runs."""
    head = (f"{'row':<24}" + "".join(f"{'seed ' + str(s):>9}" for s in seeds)
            + f"{'mean':>9}{'std':>7}{'steps':>7}{'minutes':>9}{'CPU min':>9}")
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        lines.append(f"{name:<24}" + "".join(f"{x:9.2f}" for x in r["miou"])
                     + f"{r['mean']:9.2f}{r['std']:7.2f}{r['steps']:7d}"
                     + f"{sum(r['seconds']) / 60:9.1f}{sum(r['cpu_seconds']) / 60:9.1f}")
        for branch, b in r.get("branches", {}).items():
            lines.append(f"{'  branch ' + branch:<24}" + "".join(f"{x:9.2f}" for x in b["miou"])
                         + f"{b['mean']:9.2f}{b['std']:7.2f}")
    return "\n".join(lines)


def summary(results: dict) -> dict:
    """Differences of means (mIoU points) against the supervised baseline, where both rows ran."""
    out = {}
    if "supervised" in results:
        sup = results["supervised"]["mean"]
        for name in ("semi", "allspark", "allspark_ema", "allspark_strong_cutmix",
                     "allspark_unlabeled_branch", "allspark_unlabeled_teacher", "unimatch_v2",
                     "unimatch_v2_allspark", "supervised_adamw", "supervised_all_labels"):
            if name in results:
                key = "ceiling" if name == "supervised_all_labels" else name
                out[f"{key}_minus_supervised"] = results[name]["mean"] - sup
    return out


def _train_run(config, run_dir: str) -> tuple[dict, float, float]:
    """train.train_and_evaluate in `run_dir` -> (its output, wall seconds, CPU seconds)."""
    from allspark_jax import train  # pylint: disable=g-import-not-at-top
    t0, c0 = time.time(), time.process_time()
    out = train.train_and_evaluate(config, run_dir)
    return out, time.time() - t0, time.process_time() - c0


def pretrain_encoder(base, workdir: str, print_fn=print) -> dict:
    """The source task of `learning.pretrain_*`: writes its synthetic dataset (other classes, other
    images, every one labeled), trains `supervised` on it for `learning.pretrain_steps` steps and
    writes the encoder as a `mit_bX.pth`-style state dict (`weights.release_files.save_pretrained_encoder`).

    Returns {'path': the encoder file, 'miou': source validation mIoU, 'steps', 'seconds',
    'cpu_seconds', 'num_classes', 'num_images', 'seed'}.
    """
    import jax  # pylint: disable=g-import-not-at-top

    from allspark_jax import config as config_lib  # pylint: disable=g-import-not-at-top
    from allspark_jax.data import splits as splits_lib  # pylint: disable=g-import-not-at-top
    from allspark_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    from allspark_jax.weights import release_files  # pylint: disable=g-import-not-at-top
    src = base.learning
    steps, num_images = int(src.pretrain_steps), int(src.pretrain_num_images)
    folder = os.path.join(workdir, "pretrain")
    root = os.path.join(folder, "data")
    synthetic.ensure_dataset(root, num_train=num_images, num_val=int(base.data.synthetic.num_val),
                             size=int(base.data.synthetic.size),
                             num_classes=int(src.pretrain_num_classes),
                             seed=int(src.pretrain_seed), num_labeled=1)
    split = splits_lib.resolve_train_split("synthetic", "default", root=root)
    config = config_lib.with_method(base, "supervised")
    config.seed = int(src.pretrain_seed)
    config.data.root = root
    config.data.split = write_all_labeled(split, os.path.join(root, "all_labeled"),
                                          "learning.pretrain_steps > 0")
    config.data.num_classes = int(src.pretrain_num_classes)
    config.train.num_train_steps = steps
    config.train.epochs = max(1, math.ceil(steps / (num_images // int(config.data.batch_size))))
    if src.pretrain_lr is not None:
        config.optim.lr, config.optim.lr_multi = float(src.pretrain_lr), 1.0
    config_lib.validate(config)
    out, seconds, cpu = _train_run(config, os.path.join(folder, "run"))
    path = os.path.join(folder, "encoder.npz")
    release_files.save_pretrained_encoder({"params": jax.device_get(out["state"].params)}, path)
    miou = float(out["eval"][out["step"]]["student"]["miou"])
    print_fn(f"source task ({src.pretrain_num_classes} classes, {num_images} labeled images): "
             f"mIoU {miou:.2f} after {out['step']} steps ({seconds / 60:.1f} min); every run's "
             f"encoder starts from {path}")
    shutil.rmtree(os.path.join(folder, "run"), ignore_errors=True)
    return {"path": path, "miou": miou, "steps": int(out["step"]), "seconds": seconds,
            "cpu_seconds": cpu, "num_classes": int(src.pretrain_num_classes),
            "num_images": num_images, "seed": int(src.pretrain_seed)}


def run_benchmark(base, *, seeds, rows, workdir: str, print_fn=print,
                  branches: bool = False) -> dict:
    """Trains every (row, seed) in `workdir` (after the source task, with learning.pretrain_steps
    > 0); returns {'results': the rows' results, 'pretrain': pretrain_encoder's dict or None}.
    `branches`: AllSpark runs are also scored through their other branches (`branch_results`)."""
    import jax  # pylint: disable=g-import-not-at-top

    from allspark_jax import config as config_lib  # pylint: disable=g-import-not-at-top
    from allspark_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
    from allspark_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top

    os.makedirs(workdir, exist_ok=True)
    # One persistent compilation cache (unless one is set already): runs of the same method share
    # their programs.
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, workdir_lib.COMPILATION_CACHE_DIR))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    base = copy.deepcopy(base)
    base.compilation_cache = False
    opts = config_lib.data_options(base, os.path.join(workdir, "data"))  # writes synthetic data
    base.data.root = opts.root
    pretrain = None
    if int(base.learning.pretrain_steps) > 0:
        pretrain = pretrain_encoder(base, workdir, print_fn)
        # every run starts from the source encoder, as from ImageNet weights; none pretrains itself
        base.model.pretrained = pretrain["path"]
        base.learning.pretrain_steps = 0
        base.learning.pretrain_lr = None
    semi_opts = config_lib.data_options(config_lib.with_method(base, "allspark"))
    plan = input_pipeline.train_plan(semi_opts)
    total_steps = int(base.train.epochs) * plan.steps_per_epoch
    if int(base.train.num_train_steps) > 0:
        total_steps = min(total_steps, int(base.train.num_train_steps))
    all_labeled = ""
    if "supervised_all_labels" in rows:
        all_labeled = write_all_labeled(plan.split, os.path.join(workdir, "all_labeled"))
    plan_fn = lambda c: input_pipeline.train_plan(config_lib.data_options(c))  # noqa: E731

    results = {}
    for row in rows:
        r = results[row] = {"method": ROWS[row][0], "overrides": ROWS[row][1], "miou": [],
                            "seconds": [], "cpu_seconds": [], "steps": total_steps}
        for seed in seeds:
            config = row_config(base, row, seed, all_labeled=all_labeled,
                                total_steps=total_steps, plan_fn=plan_fn)
            run_dir = os.path.join(workdir, "runs", f"{row}_seed{seed}")
            out, seconds, cpu = _train_run(config, run_dir)
            last = out["eval"][out["step"]]
            r["miou"].append(float(last["student"]["miou"]))
            if "ema" in last:
                r.setdefault("miou_ema", []).append(float(last["ema"]["miou"]))
            r["seconds"].append(seconds)
            r["cpu_seconds"].append(cpu)
            if branches and method_lib.from_config(config).allspark:
                for branch, miou in branch_results(config, out["state"]).items():
                    r.setdefault("branches", {}).setdefault(branch, {"miou": []})["miou"].append(
                        miou)
            print_fn(f"{row} seed {seed}: mIoU {r['miou'][-1]:.2f} after {out['step']} steps "
                     f"({seconds / 60:.1f} min, CPU {cpu / 60:.1f} min)")
            shutil.rmtree(run_dir, ignore_errors=True)
        r["mean"], r["std"] = summarize(r["miou"])
        for b in r.get("branches", {}).values():
            b["mean"], b["std"] = summarize(b["miou"])
    return {"results": results, "pretrain": pretrain}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.config is None:
        raise app.UsageError("--config is required, e.g. --config configs/learning.py")
    from allspark_jax.commands import startup  # pylint: disable=g-import-not-at-top

    try:
        seeds = [int(s) for s in FLAGS.seeds]
    except ValueError:
        raise app.UsageError(f"--seeds={','.join(FLAGS.seeds)}: expected integers") from None
    if not seeds:
        raise app.UsageError("--seeds: expected at least one seed")
    rows = (named_rows(FLAGS.rows) if FLAGS.rows is not None
            else rows_for(FLAGS.methods, FLAGS.extensions, FLAGS.ceiling))
    base = FLAGS.config
    if FLAGS.branches:
        check_branches(base)
    try:
        validate_learning(base)
    except startup.user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    startup.validated_start(base)
    logging.set_verbosity(logging.WARNING)
    workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="allspark_learning_")
    t0, c0 = time.time(), time.process_time()
    try:
        ran = run_benchmark(base, seeds=seeds, rows=rows, workdir=workdir,
                            branches=FLAGS.branches)
    except startup.user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:  # a run diverged (its message names the run's folder), as main.py
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if not FLAGS.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    results = ran["results"]
    out = {"results": results, "summary": summary(results), "pretrain": ran["pretrain"],
           "seeds": seeds, "seconds": time.time() - t0, "cpu_seconds": time.process_time() - c0,
           "command": " ".join(["python -m allspark_jax.experiments.learning"] + sys.argv[1:]),
           "config": json.loads(base.to_json_best_effort())}
    if ran["pretrain"] and not FLAGS.workdir:
        out["pretrain"]["path"] = None  # removed with the temporary workdir
    print(format_table(results, seeds))
    print(f"total: {out['seconds'] / 60:.1f} min, CPU {out['cpu_seconds'] / 60:.1f} min")
    for key, value in out["summary"].items():
        print(f"{key}: {value:+.2f} mIoU points")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {FLAGS.json}")


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["config"])
    app.run(main)
