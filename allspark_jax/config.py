"""The run's configuration: loading config files, validating every key once, resolving data options.

`configs/default.py` is the only home of defaults; every key a run reads is there, with its meaning.
This module reads a config and never adds values of its own:

  * `load_config("configs/pascal.py:1_16")` loads a config file (with its optional argument) by path,
    so notebooks and tests need no `sys.path` edits;
  * `validate(config)` checks every enum, range and cross-key constraint and raises a one-line
    `ConfigError` (a `DataError` for `data.*` keys) naming the key, its value and what is allowed.
    `main.py` calls it before anything starts;
  * `data_options(config, workdir)` resolves the data keys once per run into a frozen `DataOptions`
    (absolute root, the synthetic dataset written when asked for, class names checked against
    `data.num_classes`), which the input pipelines take.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import os
import sys
from typing import Any

import ml_collections

from allspark_jax.data import datasets
from allspark_jax.errors import ConfigError, DataError
from allspark_jax.workdir import SYNTHETIC_DIR

METHODS = ("allspark", "semi", "supervised")  # the release's three trainers (configs/default.py)
TEACHERS = ("online", "ema")
LOSSES_X = ("ce", "ohem")
STUDENT_VIEWS = ("weak", "strong")
SOURCES = ("files", "tfds")
CHECK_FILES = ("none", "exist", "decode")
BEST_OF = ("student", "ema")
# JAX's names for the arithmetic of float32 matrix products and convolutions (model.precision).


# ------------------------------------------------------------------------------------------ loading


def _config_package(directory: str) -> str:
    """Registers `directory` (holding __init__.py) as an importable package; returns its name.

    Config files import their siblings (`from configs import default`); registering the folder as
    a package in `sys.modules` lets them do so wherever the repository lies.
    """
    name = os.path.basename(directory)
    module = sys.modules.get(name)
    if module is not None and os.path.dirname(os.path.abspath(getattr(module, "__file__", "") or
                                                              "")) == directory:
        return name
    init = os.path.join(directory, "__init__.py")
    if not os.path.isfile(init):
        raise ConfigError(f"config folder {directory!r} has no __init__.py; expected the "
                          "repository's configs/ folder")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[directory])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return name


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`path/to/config.py[:arg]` -> the ConfigDict its `get_config(arg)` returns."""
    path, _, arg = str(spec).partition(":")
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    package = _config_package(os.path.dirname(path))
    module = importlib.import_module(f"{package}.{os.path.splitext(os.path.basename(path))[0]}")
    return module.get_config(arg) if arg else module.get_config()


def configs_dir() -> str:
    """The repository's `configs/` folder (beside the package, in a source checkout)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def register_configs_package(directory: str | None = None) -> None:
    """Makes `from configs import default` work in config files loaded by `ml_collections`' flags."""
    _config_package(directory or configs_dir())


# --------------------------------------------------------------------------------------- validation


def _error(key: str, value: Any, expected: str, data: bool = False) -> Exception:
    cls = DataError if key.startswith("data.") or data else ConfigError
    return cls(f"config.{key}={value!r}: expected {expected}")


def _one_of(config, key: str, allowed) -> None:
    value = _get(config, key)
    if value not in allowed:
        raise _error(key, value, "one of " + ", ".join(repr(a) for a in allowed))


def _in_range(config, key: str, lo=None, hi=None, *, integer=False, lo_open=False,
              hi_open=False, optional=False) -> None:
    value = _get(config, key)
    if value is None and optional:
        return
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if integer:
        ok = ok and float(value) == int(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        bounds = []
        if lo is not None:
            bounds.append(f"{'>' if lo_open else '>='} {lo}")
        if hi is not None:
            bounds.append(f"{'<' if hi_open else '<='} {hi}")
        raise _error(key, value, kind + (" " + " and ".join(bounds) if bounds else "")
                     + (" or None" if optional else ""))


def _get(config, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _validate_custom(config) -> None:
    """data.custom.*: required for data.name 'custom', and left at their defaults otherwise."""
    custom = config.data.custom
    if config.data.name != "custom":
        for key, default in (("class_names", None), ("palette", None), ("ignore_index", 255)):
            if custom[key] != default:
                raise _error(f"data.custom.{key}", custom[key],
                             f"{default!r}: it is read only when data.name == 'custom' "
                             f"(data.name={config.data.name!r})")
        return
    if config.data.source != "files":
        raise _error("data.source", config.data.source, "'files' for data.name == 'custom'")
    if not custom.class_names:
        raise _error("data.custom.class_names", custom.class_names,
                     "the path of a file with one class name per line (absolute or relative to "
                     "data.root)")
    _in_range(config, "data.custom.ignore_index", 0, 255, integer=True)
    if int(custom.ignore_index) < int(config.data.num_classes):
        raise _error("data.custom.ignore_index", custom.ignore_index,
                     f"a mask value no class uses (>= data.num_classes = {config.data.num_classes})")


def _validate_data(config) -> None:
    datasets.layout(config.data.name)
    if not config.data.split:
        raise _error("data.split", config.data.split, "a split name or the path of a labeled list")
    _in_range(config, "data.num_classes", 2, 255, integer=True)
    _in_range(config, "data.crop_size", 1, integer=True)
    _in_range(config, "data.batch_size", 1, integer=True)
    _one_of(config, "data.source", SOURCES)
    _one_of(config, "data.student_view", STUDENT_VIEWS)
    _one_of(config, "data.check_files", CHECK_FILES)
    _in_range(config, "data.cutmix_prob", 0.0, 1.0)
    scale = tuple(config.data.scale_range)
    if not (len(scale) == 2 and 0 < scale[0] <= scale[1]):
        raise _error("data.scale_range", config.data.scale_range, "(low, high) with 0 < low <= high")
    if not (config.data.num_parallel_calls == -1 or config.data.num_parallel_calls >= 1):
        raise _error("data.num_parallel_calls", config.data.num_parallel_calls, "-1 (AUTOTUNE) or >= 1")
    _in_range(config, "data.prefetch", 1, integer=True)
    _in_range(config, "data.max_image_pixels", 1, integer=True)
    _validate_custom(config)


BOOL_KEYS = ("data.labeled_strong", "model.remat", "train.loss_u_ignore_padding",
             "train.progress_bar", "train.stop_on_nan", "eval.progress_bar", "profile",
             "compilation_cache", "shard_params", "distributed.auto")

# Keys that only some methods read. Under a method that does not read a key, the key must keep its
# value of configs/default.py: a changed value would be accepted and ignored.
ALLSPARK_ONLY_KEYS = ("model.allspark_heads", "model.attn_drop", "model.proj_drop",
                      "train.warmup_epoch", "train.key_group_size")
UNLABELED_ONLY_KEYS = ("data.unlabeled_split", "data.student_view", "data.cutmix_prob",
                       "train.teacher", "train.ema_decay", "train.conf_thresh",
                       "train.loss_u_ignore_padding")
_UNREAD_BECAUSE = {
    "allspark": "only AllSpark reads it (AllSpark module, Semantic Memory, teacher keys)",
    "unlabeled": "it trains on labeled images only (no unlabeled list, teacher or pseudo-labels)",
}


def unread_keys(method: str) -> dict[str, str]:
    """The keys that `method` does not read -> why (the methods' docs: configs/default.py)."""
    out = {}
    if method != "allspark":
        out.update(dict.fromkeys(ALLSPARK_ONLY_KEYS, _UNREAD_BECAUSE["allspark"]))
    if method == "supervised":
        out.update(dict.fromkeys(UNLABELED_ONLY_KEYS, _UNREAD_BECAUSE["unlabeled"]))
    return out


def default_config() -> ml_collections.ConfigDict:
    """configs/default.py's config: the value of every key before a config file changes it.

    Loaded under a private module name: a user's own `configs` package stays as it is.
    """
    path = os.path.join(configs_dir(), "default.py")
    spec = importlib.util.spec_from_file_location("_allspark_jax_default_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def with_method(config, method: str) -> ml_collections.ConfigDict:
    """A copy of `config` that runs `method`, the keys it does not read back at their defaults.

    For callers that derive one run per method from one config (the learning benchmark); a run's
    own config keeps what it says, and `validate` refuses changed keys its method does not read.
    """
    out = copy.deepcopy(config)
    out.method = method
    defaults = default_config()
    for key in unread_keys(method):
        *parents, leaf = key.split(".")
        _get(out, ".".join(parents))[leaf] = _get(defaults, key)
    return out


def unread_by_setting(config) -> dict[str, str]:
    """The keys that another key's value leaves unread -> why (whatever the method).

    Not here, because a dataset config's own value would then refuse a plain override of the other
    key: eval.crop_size (the demo's) under eval.mode 'original', data.synthetic.* (the demo's) for
    another dataset, train.ema_decay (configs/learning.py's) under the online teacher.
    """
    out = {}
    if config.train.loss_x != "ohem":
        out.update(dict.fromkeys(("train.ohem_thresh", "train.ohem_min_kept"),
                                 f"only train.loss_x 'ohem' reads it (train.loss_x="
                                 f"{config.train.loss_x!r})"))
    if not config.profile:
        out.update(dict.fromkeys(("profile_first_step", "profile_num_steps"),
                                 "only profile=True reads it (profile=False)"))
    if config.data.source != "tfds":
        out["data.tfds_data_dir"] = (f"only data.source 'tfds' reads it (data.source="
                                     f"{config.data.source!r})")
    return out


def _validate_unread(config) -> None:
    """`method`, and that the keys the method or another key's value leaves unread keep
    configs/default.py's values (a changed value would be accepted and ignored)."""
    _one_of(config, "method", METHODS)
    method = config.method
    if config.model.get("method", method) != method:
        raise _error("model.method", config.model.method, f"config.method ({method!r})")
    unread = {key: f" with method {method!r}: {why}" for key, why in unread_keys(method).items()}
    for key, why in unread_by_setting(config).items():
        unread.setdefault(key, f": {why}")
    defaults = default_config()
    for key, why in unread.items():
        value, default = _get(config, key), _get(defaults, key)
        if value != default:
            raise _error(key, value, f"{default!r} (its configs/default.py value){why}")


def validate(config) -> None:
    """Checks every key of a run's config; raises ConfigError / DataError naming the first bad one.

    Reads no data (data roots and lists are checked by `data_options`); only configs/default.py,
    whose values the keys a method does not read must keep.
    """
    from allspark_jax.evaluation import bucketing  # pylint: disable=g-import-not-at-top
    from allspark_jax.evaluation.predictor import EVAL_MODES  # pylint: disable=g-import-not-at-top
    from allspark_jax.models import segmentor  # pylint: disable=g-import-not-at-top

    _validate_data(config)
    _validate_unread(config)
    # model
    try:
        segmentor.model_config_from(config.model)
    except ValueError as e:
        raise ConfigError(f"config.model.backbone: {e}") from None
    if config.model.num_classes != config.data.num_classes:
        raise _error("model.num_classes", config.model.num_classes,
                     f"data.num_classes ({config.data.num_classes})")
    _in_range(config, "model.drop_path_rate", 0.0, 1.0, hi_open=True, optional=True)
    _in_range(config, "model.allspark_heads", 1, integer=True)
    _in_range(config, "model.decoder_dim", 1, integer=True)
    for key in ("head_dropout", "attn_drop", "proj_drop"):
        _in_range(config, f"model.{key}", 0.0, 1.0, hi_open=True)
    _one_of(config, "model.dtype", tuple(segmentor.DTYPES))
    _one_of(config, "model.precision", segmentor.PRECISIONS)
    # optimiser
    _in_range(config, "optim.lr", 0.0, lo_open=True)
    _in_range(config, "optim.lr_multi", 0.0, lo_open=True)
    _in_range(config, "optim.momentum", 0.0, 1.0, hi_open=True)
    _in_range(config, "optim.weight_decay", 0.0)
    _in_range(config, "optim.poly_power", 0.0)
    # training
    batch = int(config.data.batch_size)
    _in_range(config, "train.epochs", 1, integer=True)
    _in_range(config, "train.num_train_steps", integer=True)
    _in_range(config, "train.warmup_epoch", 0, integer=True)
    _one_of(config, "train.loss_x", LOSSES_X)
    _in_range(config, "train.ohem_thresh", 0.0, 1.0)
    _in_range(config, "train.ohem_min_kept", 0, integer=True)
    _in_range(config, "train.loss_groups", 1, integer=True)
    if batch % int(config.train.loss_groups):
        raise _error("train.loss_groups", config.train.loss_groups,
                     f"a divisor of data.batch_size ({batch})")
    _one_of(config, "train.teacher", TEACHERS)
    _in_range(config, "train.ema_decay", 0.0, 1.0)
    _in_range(config, "train.conf_thresh", 0.0, 1.0)
    _in_range(config, "train.key_group_size", 1, integer=True, optional=True)
    if config.train.key_group_size is not None and batch % int(config.train.key_group_size):
        raise _error("train.key_group_size", config.train.key_group_size,
                     f"None or a divisor of data.batch_size ({batch})")
    # evaluation
    _one_of(config, "eval.mode", EVAL_MODES)
    _in_range(config, "eval.crop_size", 1, integer=True, optional=True)
    try:
        bucketing.as_buckets(config.eval.buckets)
    except (ValueError, TypeError):
        raise _error("eval.buckets", config.eval.buckets,
                     "positive sides or (height, width) pairs") from None
    _in_range(config, "eval.batch_size", 1, integer=True)
    _one_of(config, "eval.best_of", BEST_OF)
    if config.eval.best_of == "ema" and config.train.teacher != "ema":
        raise _error("eval.best_of", "ema", "'student' unless config.train.teacher == 'ema'")
    _in_range(config, "eval.max_images", integer=True)
    # run loop
    for key in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
        _in_range(config, key, integer=True)
    _in_range(config, "keep_checkpoints", 1, integer=True)
    _in_range(config, "profile_first_step", 0, integer=True)
    _in_range(config, "profile_num_steps", 1, integer=True)
    for key in ("heartbeat_timeout_seconds", "shutdown_timeout_seconds"):
        _in_range(config, f"distributed.{key}", 1, integer=True)
    for key in BOOL_KEYS:
        if not isinstance(_get(config, key), bool):
            raise _error(key, _get(config, key), "True or False")
    _validate_learning(config)


def _validate_learning(config) -> None:
    """learning.*: the learning benchmark's source-task pretraining."""
    _in_range(config, "learning.pretrain_steps", 0, integer=True)
    _in_range(config, "learning.pretrain_num_classes", 2, 255, integer=True)
    _in_range(config, "learning.pretrain_num_images", 2, integer=True)
    _in_range(config, "learning.pretrain_seed", 0, integer=True)
    _in_range(config, "learning.pretrain_lr", 0.0, lo_open=True, optional=True)
    if int(config.learning.pretrain_steps) == 0:
        if config.learning.pretrain_lr is not None:
            raise _error("learning.pretrain_lr", config.learning.pretrain_lr,
                         "None with learning.pretrain_steps 0 (no source task to train)")
        return
    if config.data.name != "synthetic":
        raise _error("learning.pretrain_steps", config.learning.pretrain_steps,
                     f"0 with data.name={config.data.name!r} (the source task is synthetic, "
                     "pretraining for the synthetic benchmark task)")
    if config.model.pretrained:
        raise _error("model.pretrained", config.model.pretrained,
                     "None with learning.pretrain_steps > 0 (the source task's encoder is the "
                     "runs' pretrained encoder)")
    if int(config.learning.pretrain_num_images) < int(config.data.batch_size):
        raise _error("learning.pretrain_num_images", config.learning.pretrain_num_images,
                     f"at least data.batch_size ({config.data.batch_size}): one source batch")
    if int(config.learning.pretrain_seed) == int(config.data.synthetic.seed):
        raise _error("learning.pretrain_seed", config.learning.pretrain_seed,
                     f"a seed other than data.synthetic.seed ({config.data.synthetic.seed}): the "
                     "source task's images must not be the benchmark's")


# --------------------------------------------------------------------------- command-line overrides

_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
          tuple: "a tuple such as (1, 2)"}


def check_override_keys(config, keys) -> None:
    """Raises ConfigError for the first dotted key of `keys` (`--config.KEY=VALUE` on the command
    line) that `config` does not have, naming the keys it has at that level."""
    for key in keys:
        node, parents = config, []
        for part in key.split("."):
            where = "config." + ".".join(parents) if parents else "config"
            if not isinstance(node, ml_collections.ConfigDict):
                raise ConfigError(f"config.{key} is not a key: {where} is {node!r}, not a group of "
                                  "keys")
            if part not in node:
                raise ConfigError(f"config.{key} is not a key; {where} has: "
                                  f"{', '.join(sorted(node.keys()))}")
            node, parents = node[part], parents + [part]


def override_value_error(config, key: str, value: str, reason: str) -> ConfigError:
    """The error of `--config.KEY=VALUE` whose VALUE does not parse as the key's type."""
    *parents, leaf = key.split(".")
    field_type = (_get(config, ".".join(parents)) if parents else config).get_type(leaf)
    kind = _KINDS.get(field_type) or f"a {field_type.__name__} ({reason})"
    return ConfigError(f"config.{key}={value!r}: expected {kind} (now {_get(config, key)!r})")


def eval_crop_size(config) -> int:
    """The window / crop side of center_crop and sliding_window evaluation."""
    return int(config.eval.crop_size or config.data.crop_size)


# ------------------------------------------------------------------------------------ data options


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """The data keys of a run, resolved once (`data_options`). Field meanings: configs/default.py.

    `root` is absolute (or None for source 'tfds' without a root); `class_names` are the dataset's,
    checked against `data.num_classes`; `seed` is the run's seed (epoch order and augmentation);
    `ignore_index` is the mask value of ignored pixels in the files (255 but for custom datasets)
    and `palette` a custom dataset's colours (class k's at k, then optionally the ignore colour;
    None: the VOC colour map).
    """

    name: str
    root: str | None
    split: str
    unlabeled_split: str | None
    val_split: str
    num_classes: int
    class_names: tuple[str, ...]
    crop_size: int
    batch_size: int
    source: str
    tfds_data_dir: str | None
    student_view: str
    cutmix_prob: float
    labeled_strong: bool
    scale_range: tuple[float, float]
    check_files: str
    max_image_pixels: int
    num_parallel_calls: int
    prefetch: int
    seed: int
    ignore_index: int = datasets.IGNORE_INDEX
    palette: tuple[tuple[int, int, int], ...] | None = None
    labeled_only: bool = False  # config.method 'supervised': epochs walk the labeled list only


def synthetic_root(config, workdir: str | None) -> str | None:
    """The data root a run reads: data.root, or <workdir>/synthetic_data for an unrooted synthetic."""
    if config.data.root or config.data.name != "synthetic" or config.data.source == "tfds":
        return config.data.root
    if not workdir:
        raise DataError("config.data.root is not set; data.name='synthetic' without a root writes "
                        "its dataset into the workdir, and no workdir was given")
    return os.path.join(datasets.absolute_path(workdir), SYNTHETIC_DIR)


def _write_synthetic(config, root: str) -> None:
    """Process 0 writes the synthetic dataset described by data.synthetic; the others wait."""
    import jax  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    from allspark_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    if jax.process_index() == 0:
        s = config.data.synthetic
        synthetic.ensure_dataset(root, num_train=s.num_train, num_val=s.num_val, size=s.size,
                                 num_classes=config.data.num_classes, seed=s.seed,
                                 num_labeled=s.num_labeled)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("synthetic data written")


def data_options(config, workdir: str | None = None) -> DataOptions:
    """Resolves `config.data` (and `seed`) into DataOptions; writes the synthetic data if asked.

    Raises DataError naming the option or path when the root, the dataset or its class count is wrong.
    """
    d = config.data
    _validate_data(config)
    root = synthetic_root(config, workdir)
    if root != d.root:
        _write_synthetic(config, root)
    if root or d.source == "files":
        root = datasets.check_root(root)
    tfds_meta = None
    if d.name == "synthetic" and d.source == "tfds" and not root:
        from allspark_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
        tfds_meta = tfds_builders.open_prepared(d.name, d.tfds_data_dir).info.metadata
    names = datasets.class_names_for(d.name, root, tfds_meta, d.custom.class_names)
    if int(d.num_classes) != len(names):
        raise DataError(f"config.data.num_classes={d.num_classes} but dataset {d.name!r} has "
                        f"{len(names)} classes ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})")
    palette = None
    if d.name == "custom" and d.custom.palette:
        palette = datasets.read_palette(datasets.root_relative(root, d.custom.palette),
                                        len(names))
    return DataOptions(
        name=d.name, root=root, split=str(d.split), unlabeled_split=d.unlabeled_split,
        val_split=str(d.val_split), num_classes=int(d.num_classes), class_names=tuple(names),
        crop_size=int(d.crop_size), batch_size=int(d.batch_size), source=d.source,
        tfds_data_dir=d.tfds_data_dir, student_view=d.student_view,
        cutmix_prob=float(d.cutmix_prob), labeled_strong=bool(d.labeled_strong),
        scale_range=tuple(float(x) for x in d.scale_range), check_files=d.check_files,
        max_image_pixels=int(d.max_image_pixels), num_parallel_calls=int(d.num_parallel_calls),
        prefetch=int(d.prefetch),
        seed=int(config.seed), ignore_index=int(d.custom.ignore_index), palette=palette,
        labeled_only=config.get("method") == "supervised")
