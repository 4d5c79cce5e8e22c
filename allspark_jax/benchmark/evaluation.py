"""Evaluation and predict speed, compilation included: per-size programs against size buckets.

A set of `num_images` random images in `num_sizes` distinct sizes (sides uniform in
[min_side, max_side]; every size used equally often) is evaluated from a cold start twice:
  * per_size: the release's way in JAX: each image alone (`model.apply(..., mode="eval")` on a batch
    of one), jitted, so one compilation per distinct size;
  * bucketed: `evaluation.predictor.Predictor` (`config.eval.buckets`, `config.eval.batch_size`),
    one compilation per bucket.
`predict` times `main.py --mode predict`'s path (`predict.run_predict`: JPEG files in a folder ->
palette PNGs and overlays) on such a folder, against the same loop with per-size programs.
Every figure is wall time from the first image to the last result on the host.
"""
from __future__ import annotations

import os
import tempfile
import time

import jax
import numpy as np
from PIL import Image

from allspark_jax.commands import predict as predict_lib
from allspark_jax.benchmark.timing import CompileCounter, compile_stats, host_peak_rss_bytes
from allspark_jax.data import datasets
from allspark_jax.errors import ConfigError
from allspark_jax.evaluation import bucketing
from allspark_jax.evaluation import evaluator
from allspark_jax.models.segmentor import build_model, init_variables, small_crop
from allspark_jax.weights import release, release_files


def image_sizes(num_sizes: int, min_side: int, max_side: int, seed: int = 0) -> list[tuple]:
    """`num_sizes` distinct (height, width) pairs with sides uniform in [min_side, max_side]."""
    rng = np.random.default_rng(seed)
    sizes: list[tuple] = []
    while len(sizes) < num_sizes:
        hw = tuple(int(v) for v in rng.integers(min_side, max_side + 1, size=2))
        if hw not in sizes:
            sizes.append(hw)
    return sizes


def _images(sizes, num_images: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((*sizes[i % len(sizes)], 3)).astype(np.float32)
            for i in range(num_images)]


def check_config(config) -> None:
    """Whole images ('original', what these benchmarks time) are refused by the AllSpark branch
    'memory', which needs the training crop's token grid: a one-line ConfigError."""
    if config.model.inference_branch == "memory":
        raise ConfigError("config.model.inference_branch='memory': expected 'labeled' or "
                          "'unlabeled' for the 'eval' / 'predict' benchmarks (they time whole "
                          "images, eval.mode 'original'; the memory branch needs the training "
                          "crop's token grid)")


def _setup(config, num_sizes: int, min_side: int, max_side: int):
    """(config evaluating whole images, its model, random inference variables, the image sizes).

    Whole images ('original') are the mode whose compilations depend on the image sizes.
    """
    config = config.copy_and_resolve_references()
    config.eval.mode = "original"
    model = build_model(config)
    v = jax.jit(lambda r: init_variables(model, r, small_crop(model.config)))(
        jax.random.key(int(config.seed)))
    variables = {"params": v["params"], "batch_stats": v["batch_stats"]}
    return config, model, variables, image_sizes(num_sizes, min_side, max_side)


def _per_size_fn(model):
    """The release's way in JAX: (variables, one image (1, h, w, 3)) -> (1, h, w) classes, jitted, so
    one compilation per distinct image size."""
    def per_size_predict(v, x):
        return jax.numpy.argmax(model.apply(v, x, mode="eval"), -1)
    return jax.jit(per_size_predict)


def _per_size_predictions(model, variables, images):
    fn = _per_size_fn(model)
    return [np.asarray(fn(variables, im[None]))[0] for im in images]


def bucket_memory(config, model, variables) -> dict:
    """Memory of the bucketed logits program for the largest bucket at `eval.batch_size` per device.

    XLA's estimate (arguments + outputs + temporaries, per device; `timing.compile_stats`) of the
    program compiled on its own, and this process's peak resident memory so far.
    """
    bucket = max(bucketing.as_buckets(config.eval.buckets), key=lambda hw: hw[0] * hw[1])
    batch = int(config.eval.batch_size)
    fn = jax.jit(lambda v, x, s: model.apply(v, x, mode="eval", valid_size=s))
    _, stats = compile_stats(fn, variables, jax.ShapeDtypeStruct((batch, *bucket, 3), np.float32),
                             jax.ShapeDtypeStruct((batch, 2), np.int32))
    return {"bucket": list(bucket), "batch_per_device": batch,
            "xla_memory_bytes": stats.get("xla_memory_bytes"),
            "host_peak_rss_bytes": host_peak_rss_bytes()}


def bench_eval(config, num_images: int = 200, num_sizes: int = 100, min_side: int = 100,
               max_side: int = 500, ways=("per_size", "bucketed")) -> dict:
    """Cold-start evaluation of the image set each way: seconds, images/s, programs compiled.

    `programs`: XLA compilations of the model's program (per-size: `per_size_predict`; bucketed:
    the bucketed logits / argmax programs); `compilations`: every XLA compilation the way caused,
    small helper programs included.
    """
    config, model, variables, sizes = _setup(config, num_sizes, min_side, max_side)
    images = _images(sizes, num_images)
    out = {"num_images": num_images, "num_sizes": num_sizes, "min_side": min_side,
           "max_side": max_side, "buckets": [list(b) for b in bucketing.as_buckets(
               config.eval.buckets)], "batch_per_device": int(config.eval.batch_size),
           "devices": jax.local_device_count()}
    preds = {}
    for way in ways:
        jax.clear_caches()
        t0 = time.perf_counter()
        with CompileCounter() as counter:
            if way == "per_size":
                preds[way] = _per_size_predictions(model, variables, images)
                programs = counter.by_name["jit(per_size_predict)"]
            else:
                predictor = evaluator.make_predictor(config, model)
                preds[way] = predictor.predict(variables, images)
                programs = counter.by_name["jit(_logits)"] + counter.by_name["jit(_predict)"]
        seconds = time.perf_counter() - t0
        out[way] = {"seconds": seconds, "images_per_s": num_images / seconds,
                    "programs": programs, "compilations": counter.count}
    if "bucketed" in ways:
        out["bucketed"]["memory"] = bucket_memory(config, model, variables)
    if len(preds) == 2:
        a, b = preds["per_size"], preds["bucketed"]
        out["pixels_differing"] = int(sum(np.sum(x != y) for x, y in zip(a, b)))
        out["speedup"] = out["per_size"]["seconds"] / out["bucketed"]["seconds"]
    return out


def bench_predict(config, num_images: int = 200, num_sizes: int = 100, min_side: int = 100,
                  max_side: int = 500, ways=("per_size", "bucketed")) -> dict:
    """`--mode predict` on a folder of JPEGs: per-size programs against `predict.run_predict`."""
    config, model, variables, sizes = _setup(config, num_sizes, min_side, max_side)
    rng = np.random.default_rng(0)
    out = {"num_images": num_images, "num_sizes": num_sizes}
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "images")
        os.makedirs(folder)
        for i in range(num_images):
            h, w = sizes[i % len(sizes)]
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                os.path.join(folder, f"{i:04d}.jpg"))
        weights = os.path.join(tmp, "weights.npz")
        template = jax.eval_shape(lambda: init_variables(model, jax.random.key(0),
                                                         int(config.data.crop_size)))
        full = {**jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template),
                **jax.tree.map(np.asarray, variables)}
        if model.config.encoder == "dinov2":  # UniMatch V2's layout (+ AllSpark's keys)
            release_files.save_unimatch_checkpoint(full, weights)
        else:
            np.savez(weights, **release.to_state_dict(full))
        for way in ways:
            jax.clear_caches()
            dest = os.path.join(tmp, way)
            t0 = time.perf_counter()
            if way == "per_size":
                fn = _per_size_fn(model)
                pal = datasets.palette(config.data.name)
                os.makedirs(dest)
                for path in predict_lib.list_images(folder):
                    rgb, image = predict_lib.load_image(path)
                    pred = np.asarray(fn(variables, image[None]))[0]
                    name = os.path.splitext(os.path.basename(path))[0]
                    predict_lib.save_outputs(rgb, pred, pal, dest, name)
            else:
                predict_lib.run_predict(config, None, weights, [folder], dest, quiet=True)
            seconds = time.perf_counter() - t0
            out[way] = {"seconds": seconds, "images_per_s": num_images / seconds}
    if {"per_size", "bucketed"} <= set(ways):
        out["speedup"] = out["per_size"]["seconds"] / out["bucketed"]["seconds"]
    return out
