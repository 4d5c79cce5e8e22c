"""`python -m allspark_jax.benchmark`: the command line of the benchmark (see the package docstring)."""
from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags

from allspark_jax import runtime
from allspark_jax.benchmark import measure
from allspark_jax.benchmark import report
from allspark_jax.commands import config_flag, startup

FLAGS = flags.FLAGS
config_flag.define("config", "pascal", "Config file or shipped config (model, crop, batch, "
                   "precision, remat, train step settings).")
flags.DEFINE_string("what", "matmul,train,infer",
                    f"Comma-separated subset of {','.join(measure.ALL)}.")
flags.DEFINE_integer("steps", 5, "Timed calls per measurement (median reported).")
flags.DEFINE_integer("warmup", 1, "Untimed calls after compilation.")
flags.DEFINE_integer("per_device_batch", None, "Labeled (= unlabeled) images per device; "
                     "default: config.data.batch_size / devices.")
flags.DEFINE_integer("num_devices", None, "CPU only: simulate this many devices.")
flags.DEFINE_string("devices", "1,2,4,8", "Device counts for 'scaling'.")
flags.DEFINE_integer("matmul_size", 4096, "N of the (N, N) @ (N, N) peak measurement.")
flags.DEFINE_integer("profile_steps", 2, "Steps traced by 'profile'.")
flags.DEFINE_integer("eval_images", 200, "'eval' / 'predict': images in the set.")
flags.DEFINE_integer("eval_sizes", 100, "'eval' / 'predict': distinct image sizes in the set.")
flags.DEFINE_list("eval_sides", ["100", "500"], "'eval' / 'predict': smallest and largest side.")
flags.DEFINE_list("eval_ways", ["per_size", "bucketed"], "'eval' / 'predict': per-size programs "
                  "(the release's one image at a time) and / or size buckets.")
flags.DEFINE_string("json", None, "Write the results as JSON here.")
flags.DEFINE_string("table", None, "Print a Markdown table of the results JSONs in this folder "
                    "and exit.")
flags.DEFINE_bool("quiet", False, "Print nothing (for the scaling subprocesses).")


def main(argv) -> None:
    del argv
    if FLAGS.table:
        paths = sorted(os.path.join(FLAGS.table, p) for p in os.listdir(FLAGS.table)
                       if p.endswith(".json"))
        print(report.markdown_table(paths))
        return
    startup.validate_or_exit(FLAGS.config)  # a bad key: one line, as main.py's
    import jax  # pylint: disable=g-import-not-at-top
    runtime.set_xla_flags(FLAGS.config)
    runtime.apply_precision(FLAGS.config)
    if FLAGS.num_devices:
        jax.config.update("jax_num_cpu_devices", int(FLAGS.num_devices))
    what = [w for w in FLAGS.what.split(",") if w]
    devices = [int(d) for d in FLAGS.devices.split(",") if d]
    # The scaling subprocesses get this command line back (later flags override earlier ones).
    passthrough = [a for a in sys.argv[1:] if not a.startswith(("--what", "--json", "--devices"))]
    results = measure.run(FLAGS.config, what=what, steps=FLAGS.steps, warmup=FLAGS.warmup,
                          per_device_batch=FLAGS.per_device_batch, matmul_size=FLAGS.matmul_size,
                          profile_steps=FLAGS.profile_steps, devices=devices, argv=passthrough,
                          eval_images=FLAGS.eval_images, eval_sizes=FLAGS.eval_sizes,
                          eval_sides=tuple(int(s) for s in FLAGS.eval_sides),
                          eval_ways=FLAGS.eval_ways,
                          log=(lambda s: None) if FLAGS.quiet else (lambda s: print(s, flush=True)))
    if not FLAGS.quiet:
        print(report.format_report(results), flush=True)
    if FLAGS.json:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
        with open(FLAGS.json, "w") as fh:
            json.dump(results, fh, indent=2, sort_keys=True)


if __name__ == "__main__":
    app.run(main)
