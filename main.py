"""AllSpark in JAX: train, evaluate or predict from one command.

    python main.py --config configs/demo.py --workdir /tmp/demo                      # train (+eval)
    python main.py --config configs/pascal.py:1_16 --workdir /tmp/voc \\
        --config.data.root=/data/VOC2012 --config.data.batch_size=16 --config.optim.lr=0.002
    python main.py --config configs/demo.py --workdir /tmp/demo --mode eval --checkpoint best
    python main.py --config configs/pascal.py:1_16 --workdir /tmp/voc --mode eval \\
        --checkpoint /path/to/official/best.pth
    python main.py --config configs/demo.py --workdir /tmp/demo --mode predict --checkpoint latest \\
        --inputs /tmp/demo/synthetic_data/JPEGImages --output_dir /tmp/demo/predictions

`train` resumes from the latest checkpoint in --workdir when there is one.
"""
import os
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
flags.DEFINE_string("checkpoint", "latest", "eval / predict: a step number, 'latest', 'best', or "
                    "the path of an official .pth / .npz state dict.")
flags.DEFINE_list("inputs", None, "predict: image files and/or folders (comma separated).")
flags.DEFINE_string("output_dir", None, "predict: where masks and overlays go "
                    "(default <workdir>/predictions).")


class UsageError(app.UsageError):
    pass


def check_flags():
    """Clear errors for the flags themselves (before any work starts)."""
    if FLAGS.config is None:
        raise UsageError("--config is required, e.g. --config configs/demo.py")
    if FLAGS.mode not in MODES:
        raise UsageError(f"--mode={FLAGS.mode!r}: expected one of {', '.join(MODES)}")
    if not FLAGS.workdir:
        if FLAGS.mode == "train" or FLAGS.mode == "eval" or not FLAGS.output_dir:
            raise UsageError(f"--workdir is required for --mode={FLAGS.mode} (checkpoints and "
                             "results live there)")
    if FLAGS.mode in ("eval", "predict"):
        from allspark_jax import checkpoints
        try:
            checkpoints.parse_spec(FLAGS.checkpoint)
        except checkpoints.CheckpointError as e:
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


def main(argv):
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    check_flags()
    from allspark_jax import checkpoints
    from allspark_jax import config as config_lib
    from allspark_jax import convert
    from allspark_jax.data.datasets import DataError

    config = FLAGS.config
    try:
        config_lib.validate(config)
    except (config_lib.ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    # Hide the GPUs / TPUs from TensorFlow (tf.data runs on the host).
    import tensorflow as tf
    tf.config.experimental.set_visible_devices([], "GPU")
    import jax

    from allspark_jax import nonfinite
    from allspark_jax import predict as predict_lib
    from allspark_jax import runtime
    from allspark_jax import train
    from allspark_jax import workdir as workdir_lib
    from allspark_jax.evaluation import evaluator

    runtime.start(config)
    logging.info("JAX process %d / %d, local devices: %s", jax.process_index(),
                 jax.process_count(), jax.local_devices())
    try:
        if FLAGS.mode == "train":
            train.train_and_evaluate(config, FLAGS.workdir)
        elif FLAGS.mode == "eval":
            evaluator.run_evaluation(config, FLAGS.workdir, FLAGS.checkpoint)
        else:
            out = FLAGS.output_dir or os.path.join(FLAGS.workdir, workdir_lib.PREDICTIONS_DIR)
            predict_lib.run_predict(config, FLAGS.workdir, FLAGS.checkpoint, FLAGS.inputs, out)
    except (checkpoints.CheckpointError, convert.WeightImportError, DataError,
            FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except nonfinite.NonFiniteError as e:
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
    flags.mark_flags_as_required(["config"])
    app.run(main)
