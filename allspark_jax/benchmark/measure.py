"""The measurements: each returns its figures (and, where the step donates it, the next state)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Callable

import jax
import jax.numpy as jnp

from allspark_jax import method as method_lib
from allspark_jax import runtime
from allspark_jax import train_step as train_step_lib
from allspark_jax.benchmark import evaluation as evaluation_lib
from allspark_jax.benchmark import profile as profile_lib
from allspark_jax.benchmark import programs
from allspark_jax.benchmark.timing import (compile_stats, device_peak_bytes, host_peak_rss_bytes,
                                           median_time)
from allspark_jax.data import synthetic
from allspark_jax.evaluation import bucketing
from allspark_jax.models.segmentor import DTYPES

ALL = ("matmul", "train", "infer", "profile", "pipeline", "scaling", "compile", "eval", "predict")


def _host_shared() -> bool:
    """Simulated CPU devices share the host's cores: the host's peak is the ceiling for all."""
    return jax.default_backend() == "cpu"


def _rates(seconds: float, flops_per_device: float, devices: int, peak: float | None,
           host_shared: bool) -> dict:
    achieved = flops_per_device * devices / seconds if seconds > 0 else 0.0
    out = {"tflops_per_s": achieved / 1e12}
    if peak:
        # Simulated CPU devices share the host's cores: the host's peak is the ceiling for all.
        out["utilisation"] = achieved / (peak * (1 if host_shared else devices))
    return out


def bench_matmul(n: int, dtype: str, steps: int, warmup: int = 1) -> dict:
    """FLOP/s of an (n, n) @ (n, n) product in `dtype` on the first device."""
    dt = DTYPES[dtype]
    device = jax.local_devices()[0]
    a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), dt), device)
    b = jax.device_put(jax.random.normal(jax.random.key(1), (n, n), dt), device)
    compiled, stats = compile_stats(jax.jit(jnp.matmul), a, b)
    seconds, _ = median_time(lambda: compiled(a, b).block_until_ready(), steps, warmup)
    flops = 2.0 * n ** 3
    return {"n": n, "dtype": dtype, "seconds": seconds, "flops": flops,
            "xla_flops": stats["flops"], "peak_tflops_per_s": flops / seconds / 1e12}


def bench_train(s: programs.Setup, config, state, steps: int, warmup: int, peak: float | None):
    """The full train step of the config's method (AllSpark: memory read) on a synthetic batch,
    carrying the donated state.

    Returns (figures, the compiled step, its batch, the state after the calls).
    """
    step, batch = programs.train_program(s, config)
    compiled, stats = compile_stats(step, state, batch)
    holder = {"state": state}

    def call():
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics)

    seconds, times = median_time(call, steps, warmup)
    images = s.batch * method_lib.from_config(config).images_per_labeled_image
    out = {"seconds": seconds, "times": times, "images_per_step": images,
           "images_per_s": images / seconds, **stats,
           **_rates(seconds, stats["flops"], s.devices, peak, _host_shared()),
           "device_peak_bytes": device_peak_bytes(), "host_peak_rss_bytes": host_peak_rss_bytes()}
    return out, compiled, batch, holder["state"]


def compile_train(s: programs.Setup, config, state) -> dict:
    """The train step's compile statistics without running it."""
    step, batch = programs.train_program(s, config)
    return compile_stats(step, state, batch)[1]


def bench_infer(s: programs.Setup, config, state, steps: int, warmup: int,
                peak: float | None) -> dict:
    """The eval-mode forward of a batch of B images at the crop."""
    fn, x = programs.infer_program(s, config)
    # the collections the model's branch reads (the memory for `model.inference_branch` 'memory')
    variables = {k: v for k, v in state.variables().items()
                 if k in bucketing.inference_collections(s.model)}
    variables = jax.device_put(variables, programs.sharding_lib.replicated(s.mesh))
    compiled, stats = compile_stats(fn, variables, x)
    seconds, times = median_time(lambda: compiled(variables, x).block_until_ready(), steps, warmup)
    return {"seconds": seconds, "times": times, "images_per_step": s.batch,
            "images_per_s": s.batch / seconds, **stats,
            **_rates(seconds, stats["flops"], s.devices, peak, _host_shared()),
            "device_peak_bytes": device_peak_bytes(), "host_peak_rss_bytes": host_peak_rss_bytes()}


def bench_pipeline(s: programs.Setup, config, state, step, steps: int, warmup: int,
                   step_seconds: float, num_images: int = 64, image_size: int = 500):
    """The input pipeline alone and the step fed by it, against the step on a resident batch.

    The data: `num_images` synthetic Pascal-layout JPEGs (half labeled) with sides in
    [0.75, 1] x `image_size` (Pascal VOC images are about 500 x 375), read as the config's method
    reads them (its student view, and its batch entries: two strong views under UniMatch V2's
    recipe, labeled images only for a labeled-only method), CutMix p 0.5. Returns (figures, state).
    """
    # tf.data: imported here, so that the model measurements run where TensorFlow is not installed.
    from allspark_jax.benchmark import pipeline as data_benchmark  # pylint: disable=g-import-not-at-top
    from allspark_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    with tempfile.TemporaryDirectory() as root:
        synthetic.write_dataset(root, num_images, 0, image_size, int(config.data.num_classes),
                                seed=0, num_labeled=num_images // 2)
        # the run's method decides what a batch holds (UniMatch V2: two strong views)
        which = dict(student_view=config.data.student_view, method=config.method,
                     teacher=config.train.teacher)
        rate = data_benchmark.measure(root, s.crop, s.batch, steps, warmup, **which)
        opts = data_benchmark.make_options(root, s.crop, s.batch, **which)
        keys = train_step_lib.batch_keys(method_lib.from_config(config))
        it = ({k: b[k] for k in keys}
              for b in input_pipeline.create_train_iterator(opts, process_index=0, process_count=1))
        it = input_pipeline.prefetch_to_device(it, s.batch_sharding, size=2)
        holder = {"state": state}

        def call():
            holder["state"], metrics = step(holder["state"], next(it))
            jax.block_until_ready(metrics)

        fed, _ = median_time(call, steps, warmup)
    need = s.batch / step_seconds
    return {"pipeline_examples_per_s": rate, "step_examples_per_s": need,
            "pipeline_over_step": rate / need, "fed_step_seconds": fed,
            "resident_step_seconds": step_seconds, "fed_slowdown": fed / step_seconds}, holder["state"]


def bench_scaling(argv: list[str], devices: list[int], per_device_batch: int) -> list[dict]:
    """The train benchmark in one subprocess per device count (simulated on CPU)."""
    rows = []
    for n in devices:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "r.json")
            cmd = [sys.executable, "-m", "allspark_jax.benchmark", *argv, "--what=train",
                   f"--num_devices={n}", f"--per_device_batch={per_device_batch}", f"--json={out}",
                   "--quiet"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"scaling: the {n}-device run failed:\n{proc.stderr[-4000:]}")
            with open(out) as f:
                r = json.load(f)
        t = r["train"]
        rows.append({"devices": n, "global_batch": r["batch"], "seconds": t["seconds"],
                     "images_per_s": t["images_per_s"], "compile_s": t["compile_s"]})
    base = rows[0]["images_per_s"] / rows[0]["devices"] if rows else 0.0
    for row in rows:
        row["efficiency"] = row["images_per_s"] / (base * row["devices"]) if base else None
    return rows


def run(config, *, what, steps: int = 5, warmup: int = 1, per_device_batch: int | None = None,
        matmul_size: int = 4096, profile_steps: int = 2, devices=(1, 2, 4, 8),
        pipeline_images: int = 64, pipeline_image_size: int = 500, eval_images: int = 200,
        eval_sizes: int = 100, eval_sides: tuple[int, int] = (100, 500),
        eval_ways=("per_size", "bucketed"),
        argv: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    """Runs the measurements named in `what` (subset of ALL) and returns the JSON-able results."""
    unknown = set(what) - set(ALL)
    if unknown:
        raise ValueError(f"--what: unknown measurements {sorted(unknown)}; expected some of {ALL}")
    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {steps}, {warmup}")
    if {"eval", "predict"} & set(what):
        evaluation_lib.check_config(config)
    r = {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
         "jax": jax.__version__, "backbone": str(config.model.backbone),
         "dtype": config.model.dtype, "precision": runtime.matmul_precision(),
         "remat": bool(config.model.remat),
         "crop": int(config.data.crop_size), "steps": steps, "warmup": warmup}
    peak = None
    if "matmul" in what:
        r["matmul"] = bench_matmul(matmul_size, config.model.dtype, steps)
        peak = r["matmul"]["peak_tflops_per_s"] * 1e12
        log(f"matmul: {r['matmul']['peak_tflops_per_s']:.3f} TFLOP/s")
    s, state = None, None
    if {"train", "infer", "profile", "pipeline", "compile"} & set(what):
        s, state = programs.setup(config, per_device_batch)
        r["devices"], r["batch"] = s.devices, s.batch
    else:
        r["devices"] = jax.device_count()
        r["batch"] = (per_device_batch * r["devices"] if per_device_batch
                      else int(config.data.batch_size))
    r["per_device_batch"] = r["batch"] // r["devices"]
    if {"train", "profile", "pipeline"} & set(what):
        r["train"], step, batch, state = bench_train(s, config, state, steps, warmup, peak)
        log(f"train: {r['train']['seconds']:.3f} s/step (compile {r['train']['compile_s']:.1f} s)")
    if "compile" in what:
        r["compile"] = compile_train(s, config, state)
        log(f"compile: {r['compile']['compile_s']:.1f} s, XLA memory "
            f"{r['compile'].get('xla_memory_bytes', 0) / 2 ** 30:.2f} GiB")
    if "infer" in what:
        r["infer"] = bench_infer(s, config, state, steps, warmup, peak)
        log(f"infer: {r['infer']['seconds']:.3f} s/batch")
    if "profile" in what:
        r["profile"], state = profile_lib.profile(step, batch, state, profile_steps)
    if "pipeline" in what:
        r["pipeline"], state = bench_pipeline(s, config, state, step, steps, warmup,
                                              r["train"]["seconds"], pipeline_images,
                                              pipeline_image_size)
    eval_args = dict(num_images=eval_images, num_sizes=eval_sizes, min_side=eval_sides[0],
                     max_side=eval_sides[1], ways=tuple(eval_ways))
    if "eval" in what:
        r["eval"] = evaluation_lib.bench_eval(config, **eval_args)
        log(f"eval: {r['eval']}")
    if "predict" in what:
        r["predict"] = evaluation_lib.bench_predict(config, **eval_args)
        log(f"predict: {r['predict']}")
    if "scaling" in what:
        r["scaling"] = bench_scaling(argv or [], list(devices), r["per_device_batch"] or 1)
    return r
