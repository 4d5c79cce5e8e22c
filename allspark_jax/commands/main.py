"""AllSpark in JAX: train, evaluate or predict from one command.

    python main.py --config configs/demo.py --workdir /tmp/demo                      # train (+eval)
    python main.py --config configs/pascal.py:1_16 --workdir /tmp/voc \\
        --config.data.root=/data/VOC2012 --config.data.batch_size=16 --config.optim.lr=0.002
    python main.py --config configs/demo.py --workdir /tmp/demo --mode eval --checkpoint best
    python main.py --config configs/pascal.py:1_16 --workdir /tmp/voc --mode eval \\
        --checkpoint /path/to/official/best.pth
    python main.py --config configs/demo.py --workdir /tmp/demo --mode predict --checkpoint latest \\
        --inputs /tmp/demo/synthetic_data/JPEGImages --output_dir /tmp/demo/predictions
    python main.py --config configs/cityscapes.py:1_16 --workdir /tmp/cs --mode eval \\
        --checkpoint nvidia/segformer-b0-finetuned-cityscapes-1024-1024      # or its local directory
    python main.py --config configs/pascal.py:1_16 --workdir /tmp/voc --mode eval \\
        --config.model.encoder=dinov2 --config.model.backbone=small --config.method=semi \\
        --config.data.crop_size=518 --checkpoint /path/to/unimatch_v2/best.pth  # UniMatch V2's

`python -m allspark_jax ...` and the console script `allspark-jax ...` are the same command (`run`).
`train` resumes from the latest checkpoint in --workdir when there is one. The console shows a
progress bar, evaluation tables, warnings and errors; the log lines go to <workdir>/main.INFO
(--verbose: everything on the console too, TensorFlow's and XLA's C++ logs and JAX's backend
probe included). A user error (a bad flag, config key, data or weight file, checkpoint) is one line
`error: ...` on stderr with exit status 2.
"""
from __future__ import annotations

import contextlib
import logging as py_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging

from allspark_jax.commands import config_flag

MODES = ("train", "eval", "predict")

FLAGS = flags.FLAGS
config_flag.define("config")
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard logs and eval results go here.")
flags.DEFINE_string("mode", "train", f"One of {', '.join(MODES)}.")
flags.DEFINE_string("checkpoint", "latest", "eval / predict: a step number, 'latest', 'best', "
                    "the path of an official .pth / .npz state dict, of UniMatch V2's DPT "
                    "checkpoint (model.encoder='dinov2'; its trainer's model_ema is evaluated as "
                    "'ema'), or a Hugging Face SegformerForSemanticSegmentation checkpoint "
                    "(directory, .safetensors or hub id).")
flags.DEFINE_list("inputs", None, "predict: image files and/or folders (comma separated).")
flags.DEFINE_string("output_dir", None, "predict: where masks and overlays go "
                    "(default <workdir>/predictions).")
flags.DEFINE_bool("verbose", False, "Every log line on the console as well: absl INFO, TensorFlow "
                  "and XLA C++ logs, JAX's backend probe. By default the log lines go to "
                  "<workdir>/main.INFO and the console shows progress, results and warnings.")

# TensorFlow / XLA C++ log threshold unless the environment sets one: 2 keeps errors only.
QUIET_TF_CPP_MIN_LOG_LEVEL = "2"


class UsageError(app.UsageError):
    pass


def check_flags():
    """Clear errors for the flags themselves (before any work starts)."""
    if FLAGS.mode not in MODES:
        raise UsageError(f"--mode={FLAGS.mode!r}: expected one of {', '.join(MODES)}")
    if not FLAGS.workdir:
        if FLAGS.mode == "train" or FLAGS.mode == "eval" or not FLAGS.output_dir:
            raise UsageError(f"--workdir is required for --mode={FLAGS.mode} (checkpoints and "
                             "results live there)")
    if FLAGS.mode in ("eval", "predict"):
        from allspark_jax import checkpoints, errors  # pylint: disable=g-import-not-at-top
        try:
            checkpoints.parse_spec(FLAGS.checkpoint)
        except errors.CheckpointError as e:
            raise UsageError(str(e)) from None
    if FLAGS.mode == "predict" and not FLAGS.inputs:
        raise UsageError("--mode=predict needs --inputs (image files or folders)")


class _QuietLibraries:
    """Drops INFO records of chatty libraries (orbax logs every file it writes) from the console."""

    PREFIXES = ("orbax", "jax._src", "absl.testing")

    def filter(self, record):
        if record.levelno >= 30:  # WARNING and above always pass
            return True
        return not any(f"/{p.replace('.', '/')}/" in record.pathname for p in self.PREFIXES)


def quiet_native_logs(verbose: bool) -> None:
    """Off unless `verbose`: TensorFlow's and XLA's C++ INFO / WARNING lines (oneDNN, CPU features,
    ...) and JAX's backend-probe warnings. Must run before TensorFlow and JAX load, which read
    TF_CPP_MIN_LOG_LEVEL once; a level set in the environment wins."""
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", QUIET_TF_CPP_MIN_LOG_LEVEL)
    for name in ("tensorflow", "jax._src.xla_bridge"):
        py_logging.getLogger(name).setLevel(py_logging.ERROR)


def make_workdir(workdir: str) -> None:
    """Creates a local `workdir` (and its parents); one that cannot be created is a UserError
    naming --workdir and the reason."""
    from allspark_jax.errors import UserError  # pylint: disable=g-import-not-at-top
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--workdir={workdir}: cannot create it ({e.strerror or e}); expected a "
                        "folder that exists or can be created") from None


def log_to_workdir(workdir: str | None, verbose: bool) -> None:
    """absl log lines into <workdir>/main.INFO (a local workdir; remote ones keep them on stderr);
    warnings and errors still reach the console, and with `verbose` everything does."""
    if not workdir or "://" in workdir:
        return
    from allspark_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
    make_workdir(workdir)
    logging.get_absl_handler().use_absl_log_file(workdir_lib.LOG_NAME, workdir)
    if not FLAGS["stderrthreshold"].present:
        FLAGS.stderrthreshold = "warning"
    if verbose:
        FLAGS.alsologtostderr = True


@contextlib.contextmanager
def native_stderr_to_log(verbose: bool):
    """Unless `verbose`, the process's stderr (fd 2) goes to the absl log file (or nowhere) while
    TensorFlow loads and JAX starts its backends: their C++ start-up lines (oneDNN, ...) are
    written before TF_CPP_MIN_LOG_LEVEL is read. Python exceptions still reach the console."""
    if verbose:
        yield
        return
    stream = getattr(logging.get_absl_handler().python_handler, "stream", None)
    target = getattr(stream, "name", None) if stream not in (sys.stderr, None) else None
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(target or os.devnull, "ab") as sink:
            if stream is not None and target:
                stream.flush()
            os.dup2(sink.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _exit_with(message: str, status: int):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def main(argv):
    quiet_native_logs(FLAGS.verbose)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    check_flags()
    from allspark_jax import errors  # pylint: disable=g-import-not-at-top
    from allspark_jax import runtime  # pylint: disable=g-import-not-at-top
    from allspark_jax.commands import startup  # pylint: disable=g-import-not-at-top

    config = FLAGS.config
    startup.validate_or_exit(config)
    try:
        log_to_workdir(FLAGS.workdir, FLAGS.verbose)
    except errors.UserError as e:
        _exit_with(str(e), 2)
    with native_stderr_to_log(FLAGS.verbose):
        runtime.hide_accelerators_from_tensorflow()
    import jax  # pylint: disable=g-import-not-at-top

    from allspark_jax import train  # pylint: disable=g-import-not-at-top
    from allspark_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
    from allspark_jax.commands import evaluate  # pylint: disable=g-import-not-at-top
    from allspark_jax.commands import predict  # pylint: disable=g-import-not-at-top

    try:
        runtime.start(config)
    except errors.ConfigError as e:
        _exit_with(str(e), 2)
    with native_stderr_to_log(FLAGS.verbose):
        devices = jax.local_devices()  # starts the backends
    logging.info("JAX process %d / %d, local devices: %s", jax.process_index(),
                 jax.process_count(), devices)
    try:
        if FLAGS.mode == "train":
            train.train_and_evaluate(config, FLAGS.workdir)
        elif FLAGS.mode == "eval":
            evaluate.run_evaluation(config, FLAGS.workdir, FLAGS.checkpoint)
        else:
            out = FLAGS.output_dir or os.path.join(FLAGS.workdir, workdir_lib.PREDICTIONS_DIR)
            predict.run_predict(config, FLAGS.workdir, FLAGS.checkpoint, FLAGS.inputs, out)
    except startup.user_errors() as e:
        _exit_with(str(e), 2)
    except errors.NonFiniteError as e:
        _exit_with(str(e), 1)
    except Exception as e:  # pylint: disable=broad-except
        if jax.process_count() == 1:
            raise
        # Most often a collective that lost its peer: name this process and what to do.
        logging.exception("process %d failed", jax.process_index())
        lines = str(e).splitlines()
        _exit_with(f"process {jax.process_index()} of {jax.process_count()} stopped: "
                   f"{type(e).__name__}: {lines[0] if lines else ''}\nWhen another process of the "
                   "run dies (killed, host lost), the others stop like this, at the latest after "
                   "config.distributed.heartbeat_timeout_seconds; restart every process with the "
                   "same --workdir to resume from the newest checkpoint.", 1)


def run(argv=None) -> None:
    """The command line (`main.py`, `python -m allspark_jax`, `allspark-jax`)."""
    flags.mark_flags_as_required(["config"])  # parse_flags turns its error into one line, status 2
    app.run(main, argv=argv, flags_parser=config_flag.parse_flags)
