"""`validate(config)`: every key a run reads, checked once before anything starts.

Each check raises a one-line ConfigError (a DataError for `data.*` keys) naming the key, its value
and what is allowed (`checks.error`). Reads no data: data roots and lists are checked when the data
options are resolved (`config.options.data_options`). The keys of `learning.*` are the learning
experiment's, which validates them (`allspark_jax.experiments.learning`).
"""
from __future__ import annotations

from allspark_jax import method as method_lib
from allspark_jax.config import unread
from allspark_jax.config.checks import error, get, in_range, one_of
from allspark_jax.data import datasets
from allspark_jax.errors import ConfigError, UserError

LOSSES_X = ("ce", "ohem")
SOURCES = ("files", "tfds")
CHECK_FILES = ("none", "exist", "decode")
BEST_OF = ("student", "ema")
OPTIMIZERS = ("sgd", "adamw")  # allspark_jax.optimizer.create_optimizer

BOOL_KEYS = ("data.labeled_strong", "model.remat", "train.loss_u_ignore_padding",
             "train.progress_bar", "train.stop_on_nan", "eval.progress_bar", "profile",
             "compilation_cache", "shard_params", "distributed.auto")


def _validate_custom(config) -> None:
    """data.custom.*: required for data.name 'custom', and left at their defaults otherwise."""
    custom = config.data.custom
    if config.data.name != "custom":
        defaults = unread.defaults().data.custom
        for key in ("class_names", "palette", "ignore_index"):
            if custom[key] != defaults[key]:
                raise error(f"data.custom.{key}", custom[key],
                            f"{defaults[key]!r}: it is read only when data.name == 'custom' "
                            f"(data.name={config.data.name!r})")
        return
    if config.data.source != "files":
        raise error("data.source", config.data.source, "'files' for data.name == 'custom'")
    if not custom.class_names:
        raise error("data.custom.class_names", custom.class_names,
                    "the path of a file with one class name per line (absolute or relative to "
                    "data.root)")
    in_range(config, "data.custom.ignore_index", 0, 255, integer=True)
    if int(custom.ignore_index) < int(config.data.num_classes):
        raise error("data.custom.ignore_index", custom.ignore_index,
                    f"a mask value no class uses (>= data.num_classes = {config.data.num_classes})")


def validate_data(config) -> None:
    """The `data.*` keys (raises DataError)."""
    datasets.layout(config.data.name)
    if not config.data.split:
        raise error("data.split", config.data.split, "a split name or the path of a labeled list")
    in_range(config, "data.num_classes", 2, 255, integer=True)
    in_range(config, "data.crop_size", 1, integer=True)
    in_range(config, "data.batch_size", 1, integer=True)
    one_of(config, "data.source", SOURCES)
    one_of(config, "data.student_view", method_lib.STUDENT_VIEWS)
    one_of(config, "data.check_files", CHECK_FILES)
    in_range(config, "data.cutmix_prob", 0.0, 1.0)
    scale = tuple(config.data.scale_range)
    if not (len(scale) == 2 and 0 < scale[0] <= scale[1]):
        raise error("data.scale_range", config.data.scale_range, "(low, high) with 0 < low <= high")
    if not (config.data.num_parallel_calls == -1 or config.data.num_parallel_calls >= 1):
        raise error("data.num_parallel_calls", config.data.num_parallel_calls,
                    "-1 (AUTOTUNE) or >= 1")
    in_range(config, "data.prefetch", 1, integer=True)
    in_range(config, "data.max_image_pixels", 1, integer=True)
    # the synthetic dataset's style (allspark_jax.data.synthetic.Style's ranges)
    in_range(config, "data.synthetic.colours", 0, integer=True)
    in_range(config, "data.synthetic.max_objects", 1, integer=True)
    in_range(config, "data.synthetic.distractors", 0, integer=True)
    in_range(config, "data.synthetic.hue_jitter", 0.0, 0.5)
    _validate_custom(config)


def _validate_model(config) -> None:
    from allspark_jax.models import segmentor  # pylint: disable=g-import-not-at-top
    one_of(config, "model.encoder", segmentor.ENCODERS)
    try:
        model = segmentor.model_config_from(config)
    except UserError:  # the method's keys
        raise
    except (TypeError, ValueError) as e:
        backbone = config.model.backbone
        family = {"mit": "MiT", "dinov2": "DINOv2"}[config.model.encoder]
        shown = repr(backbone) if isinstance(backbone, str) else f"a dict of {family} fields"
        family_note = "" if config.model.encoder == "mit" else " (model.encoder='dinov2')"
        raise ConfigError(f"config.model.backbone={shown}{family_note}: {e}") from None
    if config.data.crop_size % model.patch_multiple:
        raise error("data.crop_size", config.data.crop_size,
                    f"a multiple of {model.patch_multiple} (the {config.model.encoder} encoder's "
                    f"patch: UniMatch V2 trains on 518 and 798 px crops)")
    if config.model.num_classes != config.data.num_classes:
        raise error("model.num_classes", config.model.num_classes,
                    f"data.num_classes ({config.data.num_classes})")
    in_range(config, "model.drop_path_rate", 0.0, 1.0, hi_open=True, optional=True)
    in_range(config, "model.allspark_heads", 1, integer=True)
    in_range(config, "model.decoder_dim", 1, integer=True)
    for key in ("head_dropout", "attn_drop", "proj_drop"):
        in_range(config, f"model.{key}", 0.0, 1.0, hi_open=True)
    one_of(config, "model.dtype", tuple(segmentor.DTYPES))
    one_of(config, "model.precision", segmentor.PRECISIONS)


def _validate_train(config) -> None:
    batch = int(config.data.batch_size)
    in_range(config, "train.epochs", 1, integer=True)
    in_range(config, "train.num_train_steps", integer=True)
    in_range(config, "train.warmup_epoch", 0, integer=True)
    one_of(config, "train.loss_x", LOSSES_X)
    in_range(config, "train.ohem_thresh", 0.0, 1.0)
    in_range(config, "train.ohem_min_kept", 0, integer=True)
    in_range(config, "train.loss_groups", 1, integer=True)
    if batch % int(config.train.loss_groups):
        raise error("train.loss_groups", config.train.loss_groups,
                    f"a divisor of data.batch_size ({batch})")
    one_of(config, "train.teacher", method_lib.TEACHERS)
    in_range(config, "train.ema_decay", 0.0, 1.0)
    in_range(config, "train.conf_thresh", 0.0, 1.0)
    in_range(config, "train.key_group_size", 1, integer=True, optional=True)
    if config.train.key_group_size is not None and batch % int(config.train.key_group_size):
        raise error("train.key_group_size", config.train.key_group_size,
                    f"None or a divisor of data.batch_size ({batch})")


def _validate_eval(config) -> None:
    from allspark_jax.evaluation import bucketing  # pylint: disable=g-import-not-at-top
    from allspark_jax.evaluation.predictor import EVAL_MODES  # pylint: disable=g-import-not-at-top
    one_of(config, "eval.mode", EVAL_MODES)
    in_range(config, "eval.crop_size", 1, integer=True, optional=True)
    try:
        bucketing.as_buckets(config.eval.buckets)
    except (ValueError, TypeError):
        raise error("eval.buckets", config.eval.buckets,
                    "positive sides or (height, width) pairs") from None
    in_range(config, "eval.batch_size", 1, integer=True)
    one_of(config, "eval.best_of", BEST_OF)
    if config.eval.best_of == "ema" and config.train.teacher != "ema":
        raise error("eval.best_of", "ema", "'student' unless config.train.teacher == 'ema'")
    in_range(config, "eval.max_images", integer=True)


def memory_branch_problem(config) -> str | None:
    """Why the AllSpark branch "memory" cannot predict with `config.eval`, or None: it reads the
    Semantic Memory, which holds the training crop's token grid (`data.crop_size`), so evaluation
    must feed crops or windows of that grid (`eval.mode` 'center_crop' / 'sliding_window')."""
    from allspark_jax.evaluation.predictor import eval_crop_size  # pylint: disable=g-import-not-at-top
    from allspark_jax.models.segmentor import model_config_from  # pylint: disable=g-import-not-at-top
    if config.eval.mode == "original":
        return ("the memory branch needs validation crops on the training crop's token grid; "
                "config.eval.mode='original' feeds whole images (use 'center_crop' or "
                "'sliding_window')")
    model = model_config_from(config)
    grid = "token grid" if model.encoder == "dinov2" else "stage-4 grid"
    crop, eval_crop = int(config.data.crop_size), eval_crop_size(config)
    train_grid = model.allspark_grid((crop, crop))
    eval_grid = model.eval_allspark_grid((eval_crop, eval_crop))
    if eval_grid != train_grid:
        return (f"config.eval.crop_size={eval_crop} gives a {grid} of {eval_grid[0]} x "
                f"{eval_grid[1]} tokens, config.data.crop_size={crop} {train_grid[0]} x "
                f"{train_grid[1]}: the memory branch needs the training crop's grid")
    return None


def _validate_branches(config) -> None:
    """`model.inference_branch` and `train.teacher_branch`: AllSpark module branches; "memory"
    needs the online teacher (the EMA teacher has no memory), and for evaluation the training
    crop's token grid."""
    from allspark_jax.models.allspark import BRANCHES  # pylint: disable=g-import-not-at-top
    for key in ("model.inference_branch", "train.teacher_branch"):
        one_of(config, key, BRANCHES)
        section, name = key.split(".")
        if config[section][name] == "memory" and method_lib.from_config(config).ema:
            raise error(key, "memory",
                        f"'labeled' or 'unlabeled' with train.teacher={config.train.teacher!r} "
                        "(the EMA teacher has no Semantic Memory: the memory holds the student's "
                        "features)")
    if config.model.inference_branch != "memory":
        return
    problem = memory_branch_problem(config)
    if problem:
        raise ConfigError(f"config.model.inference_branch='memory': {problem}")


def validate(config) -> None:
    """Checks every key of a run's config; raises ConfigError / DataError naming the first bad one.

    Order: the data keys, the method and the keys it (or another key's value) leaves unread, which
    must keep their configs/default.py values (`unread.check`), then model, optimiser, training,
    evaluation and run loop.
    """
    validate_data(config)
    one_of(config, "method", method_lib.METHODS)
    unread.check(config)
    _validate_model(config)
    in_range(config, "optim.lr", 0.0, lo_open=True)
    in_range(config, "optim.lr_multi", 0.0, lo_open=True)
    one_of(config, "optim.name", OPTIMIZERS)
    in_range(config, "optim.momentum", 0.0, 1.0, hi_open=True)
    betas = config.optim.betas
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                       for b in betas)):
        raise error("optim.betas", betas, "two numbers in [0, 1) (beta1, beta2)")
    in_range(config, "optim.weight_decay", 0.0)
    in_range(config, "optim.poly_power", 0.0)
    _validate_train(config)
    _validate_eval(config)
    _validate_branches(config)
    for key in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
        in_range(config, key, integer=True)
    in_range(config, "keep_checkpoints", 1, integer=True)
    in_range(config, "profile_first_step", 0, integer=True)
    in_range(config, "profile_num_steps", 1, integer=True)
    for key in ("heartbeat_timeout_seconds", "shutdown_timeout_seconds"):
        in_range(config, f"distributed.{key}", 1, integer=True)
    for key in BOOL_KEYS:
        if not isinstance(get(config, key), bool):
            raise error(key, get(config, key), "True or False")
