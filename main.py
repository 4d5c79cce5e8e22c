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

`train` resumes from the latest checkpoint in --workdir when there is one. The console shows a
progress bar, evaluation tables, warnings and errors; the log lines go to <workdir>/main.INFO
(--verbose: everything on the console too, TensorFlow's and XLA's C++ logs and JAX's backend
probe included).
"""
import contextlib
import logging as py_logging
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

MODES = ("train", "eval", "predict")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an argument: configs/pascal.py:1_16. Override "
    "keys with --config.key=value.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard logs and eval results go here.")
flags.DEFINE_string("mode", "train", f"One of {', '.join(MODES)}.")
flags.DEFINE_string("checkpoint", "latest", "eval / predict: a step number, 'latest', 'best', "
                    "the path of an official .pth / .npz state dict, or a Hugging Face "
                    "SegformerForSemanticSegmentation checkpoint (directory, .safetensors or hub id).")
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
        from allspark_jax import checkpoints, errors
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


def parse_flags(argv):
    """absl's flag parsing; a bad config file, key or value is one line on stderr, exit status 2.

    The config file is loaded and the `--config.KEY` overrides' keys checked here first, so the
    error names the key and the keys allowed there (ml_collections would raise an AttributeError).
    """
    from allspark_jax import config as config_lib
    config = None
    try:
        argv = FLAGS.read_flags_from_files(argv, force_gnu=False)
        for i, arg in enumerate(argv):
            name, eq, value = arg.partition("=")
            if name in ("-config", "--config"):
                spec = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
                config = config_lib.load_config(spec) if spec else None
        keys = [re.sub(r"^-{1,2}(no)?config\.", "", a.split("=", 1)[0]) for a in argv
                if re.match(r"-{1,2}(no)?config\.", a)]
        if keys and config is None:
            raise UsageError(f"--config.{keys[0]} overrides a key of a config file; expected "
                             "--config FILE before it")
        if config is not None:
            config_lib.check_override_keys(config, keys)
        return FLAGS(argv)
    except flags.Error as e:
        message = str(e).strip().split("\n")[0]
        bad_value = re.match(r"flag --config\.([\w.]+)=(.*?): (.*)", message)
        if bad_value and config is not None:
            message = str(config_lib.override_value_error(config, *bad_value.groups()))
    except (ValueError, UsageError) as e:  # ConfigError, or get_config(arg) refusing its argument
        message = " ".join(str(e).split())
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def quiet_native_logs(verbose: bool) -> None:
    """Off unless `verbose`: TensorFlow's and XLA's C++ INFO / WARNING lines (oneDNN, CPU features,
    ...) and JAX's backend-probe warnings. Must run before TensorFlow and JAX load, which read
    TF_CPP_MIN_LOG_LEVEL once; a level set in the environment wins."""
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", QUIET_TF_CPP_MIN_LOG_LEVEL)
    for name in ("tensorflow", "jax._src.xla_bridge"):
        py_logging.getLogger(name).setLevel(py_logging.ERROR)


def log_to_workdir(workdir: str | None, verbose: bool) -> None:
    """absl log lines into <workdir>/main.INFO (a local workdir; remote ones keep them on stderr);
    warnings and errors still reach the console, and with `verbose` everything does."""
    if not workdir or "://" in workdir:
        return
    from allspark_jax import workdir as workdir_lib
    os.makedirs(workdir, exist_ok=True)
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


def main(argv):
    quiet_native_logs(FLAGS.verbose)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    check_flags()
    from allspark_jax import runtime
    from allspark_jax import errors

    config = FLAGS.config
    runtime.validate_or_exit(config)
    log_to_workdir(FLAGS.workdir, FLAGS.verbose)
    with native_stderr_to_log(FLAGS.verbose):
        runtime.hide_accelerators_from_tensorflow()
    import jax

    from allspark_jax import predict as predict_lib
    from allspark_jax import train
    from allspark_jax import workdir as workdir_lib
    from allspark_jax.evaluation import evaluator

    try:
        runtime.start(config)
    except errors.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    with native_stderr_to_log(FLAGS.verbose):
        devices = jax.local_devices()  # starts the backends
    logging.info("JAX process %d / %d, local devices: %s", jax.process_index(),
                 jax.process_count(), devices)
    try:
        if FLAGS.mode == "train":
            train.train_and_evaluate(config, FLAGS.workdir)
        elif FLAGS.mode == "eval":
            evaluator.run_evaluation(config, FLAGS.workdir, FLAGS.checkpoint)
        else:
            out = FLAGS.output_dir or os.path.join(FLAGS.workdir, workdir_lib.PREDICTIONS_DIR)
            predict_lib.run_predict(config, FLAGS.workdir, FLAGS.checkpoint, FLAGS.inputs, out)
    except runtime.user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except errors.NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # pylint: disable=broad-except
        if jax.process_count() == 1:
            raise
        # Most often a collective that lost its peer: name this process and what to do.
        logging.exception("process %d failed", jax.process_index())
        lines = str(e).splitlines()
        print(f"error: process {jax.process_index()} of {jax.process_count()} stopped: "
              f"{type(e).__name__}: {lines[0] if lines else ''}\nWhen another process of the run "
              "dies (killed, host lost), the others stop like this, at the latest after "
              "config.distributed.heartbeat_timeout_seconds; restart every process with the same "
              "--workdir to resume from the newest checkpoint.", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    from allspark_jax import config as _config_lib
    # Config files import their siblings (`from configs import default`) wherever main.py runs from.
    _config_lib.register_configs_package(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "configs"))
    flags.mark_flags_as_required(["config"])  # parse_flags turns its error into one line, status 2
    app.run(main, flags_parser=parse_flags)
