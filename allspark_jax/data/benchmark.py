"""Throughput of the training input pipeline on Pascal-sized synthetic JPEGs.

    python -m allspark_jax.data.benchmark [--crop 513] [--threads 1,2] [--steps 30]

Writes a synthetic dataset of JPEGs whose sides are each in [375, 500] (Pascal VOC is about 500 x 375)
to a temporary folder, then runs the training pipeline (labeled image with the strong photometric
chain + unlabeled image as weak and strong views, data.student_view='strong', CutMix boxes on) with
tf.data limited to N threads, and reports training examples per second (one example = one labeled
and one unlabeled image) in total and per thread (= per CPU core when N <= the number of cores).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import ml_collections
import tensorflow as tf

from allspark_jax.data import input_pipeline
from allspark_jax.data import synthetic


def make_config(root: str, crop: int, batch: int, threads: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"seed": 0, "data": {
      "name": "synthetic", "root": root, "split": "default", "crop_size": crop,
      "batch_size": batch, "student_view": "strong", "cutmix_prob": 0.5, "source": "files",
      "num_parallel_calls": threads, "prefetch": 2}})


def measure(config, threads: int, steps: int, warmup: int = 3) -> float:
  """Training examples per second with tf.data restricted to `threads` threads."""
  ds = input_pipeline.create_train_dataset(config, process_index=0, process_count=1)
  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  options.threading.max_intra_op_parallelism = 1
  ds = ds.with_options(options)
  it = iter(ds)
  for _ in range(warmup):
    next(it)
  t = time.perf_counter()
  for _ in range(steps):
    batch = next(it)
  _ = batch["image_l"].numpy()
  dt = time.perf_counter() - t
  return steps * config.data.batch_size / dt


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--crop", type=int, default=513)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--threads", default=None,
                      help="comma-separated thread counts (default: 1 and all cores)")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--num_images", type=int, default=64)
  parser.add_argument("--root", default=None, help="reuse/write the synthetic data here")
  args = parser.parse_args(argv)
  cores = os.cpu_count() or 1
  threads = ([int(t) for t in args.threads.split(",")] if args.threads
             else sorted({1, cores}))
  with tempfile.TemporaryDirectory() as tmp:
    root = args.root or tmp
    if not os.path.isfile(os.path.join(root, "class_names.txt")):
      synthetic.write_dataset(root, args.num_images, 0, 500, 21, seed=0,
                              num_labeled=args.num_images // 2)
    print(f"crop {args.crop}, global batch {args.batch}, {cores} CPU cores, JPEGs with sides in "
          "[375, 500]; one example = 1 labeled (strong) + 1 unlabeled (weak + strong views)")
    for n in threads:
      rate = measure(make_config(root, args.crop, args.batch, n), n, args.steps)
      print(f"threads {n:3d}: {rate:8.1f} examples/s  {rate / n:7.1f} examples/s per thread  "
            f"({2 * rate / n:7.1f} images/s per thread)")


if __name__ == "__main__":
  main()
