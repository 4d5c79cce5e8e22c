"""Throughput of the training input pipeline on Pascal-sized synthetic JPEGs, per CPU core.

    python -m allspark_jax.benchmark.pipeline [--crop 513] [--cores 1,2] [--steps 20]

Writes a synthetic dataset of JPEGs whose sides are each in [375, 500] (Pascal VOC is about 500 x 375)
to a temporary folder, then, for each core count k, runs the training pipeline in a subprocess pinned
to k CPU cores (sched_setaffinity; data.num_parallel_calls = AUTOTUNE) and reports training examples
per second in total and per core. One example = one labeled image (strong photometric chain) + one
unlabeled image as weak and strong views (data.student_view='strong', CutMix boxes p 0.5), i.e. two
decoded JPEGs and three 513 x 513 outputs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from allspark_jax.data import datasets


def make_options(root: str, crop: int, batch: int, parallel: int = -1, student_view="strong", *,
                 method: str = "allspark", teacher: str = "online"):
    """DataOptions of the synthetic dataset at `root` (configs/default.py with these data keys, and
    `method` with `teacher`, which decide the entries of a batch: `input_pipeline`)."""
    from allspark_jax import config as config_lib  # pylint: disable=g-import-not-at-top
    config = config_lib.default_config()
    config.method, config.train.teacher = method, teacher
    config.data.update(name="synthetic", root=root, split="default", crop_size=crop,
                       batch_size=batch, student_view=student_view, cutmix_prob=0.5,
                       source="files", num_parallel_calls=parallel, prefetch=2)
    config.data.num_classes = len(datasets.synthetic_class_names(root))
    return config_lib.data_options(config)


def measure(root: str, crop: int, batch: int, steps: int, warmup: int = 3,
            student_view: str = "strong", *, method: str = "allspark",
            teacher: str = "online") -> float:
    """Training examples per second of create_train_iterator (numpy batches, as the trainer sees)."""
    from allspark_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    it = input_pipeline.create_train_iterator(
        make_options(root, crop, batch, student_view=student_view, method=method, teacher=teacher),
        process_index=0, process_count=1)
    for _ in range(warmup):
        next(it)
    t = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * batch / (time.perf_counter() - t)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--crop", type=int, default=513)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cores", default=None, help="comma-separated core counts (default 1, all)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--root", default=None, help="reuse/write the synthetic data here")
    parser.add_argument("--student_view", default="strong", choices=("weak", "strong"),
                        help="'weak' = the release (unlabeled student view = teacher view)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps({"rate": measure(args.root, args.crop, args.batch, args.steps,
                                                student_view=args.student_view)}))
        return
    available = sorted(os.sched_getaffinity(0))
    cores = ([int(c) for c in args.cores.split(",")] if args.cores
             else sorted({1, len(available)}))
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or tmp
        if not os.path.isfile(os.path.join(root, "class_names.txt")):
            from allspark_jax.data import synthetic  # pylint: disable=g-import-not-at-top
            synthetic.write_dataset(root, args.num_images, 0, 500, 21, seed=0,
                                    num_labeled=args.num_images // 2)
        print(f"crop {args.crop}, batch {args.batch}, {len(available)} CPU cores available; JPEGs with "
              "sides in [375, 500]; example = 1 labeled (strong) + 1 unlabeled (student view: "
              f"{args.student_view})")
        for k in cores:
            pinned = available[:k]
            out = subprocess.run(
                [sys.executable, "-m", "allspark_jax.benchmark.pipeline", "--worker", "--root", root,
                 "--crop", str(args.crop), "--batch", str(args.batch), "--steps", str(args.steps),
                 "--student_view", args.student_view],
                preexec_fn=lambda p=pinned: os.sched_setaffinity(0, p), capture_output=True, text=True,
                check=True)
            rate = json.loads(out.stdout.strip().splitlines()[-1])["rate"]
            print(f"cores {k:3d}: {rate:8.1f} examples/s  {rate / k:7.1f} examples/s per core  "
                  f"({2 * rate / k:7.1f} source images/s per core)", flush=True)


if __name__ == "__main__":
    main()
