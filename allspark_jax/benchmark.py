"""Speed, memory and scaling of the AllSpark train step and of inference, on whatever JAX finds.

    python -m allspark_jax.benchmark --config configs/pascal.py --config.model.backbone=b0 \
        --per_device_batch 1 --what matmul,train,infer,profile,pipeline,scaling --json out.json

The model, crop, precision (`model.dtype`), rematerialisation (`model.remat`) and the train step's
settings come from the config, as in training; the flags below only say what to measure. Every
measurement prints as a table and all of them go to `--json`.

What is measured (times are medians over `--steps` calls after `--warmup` calls, each call waited for
with `block_until_ready`; compile time excludes tracing, which is reported apart as `lower_s`):
  * matmul   FLOP/s of an (N, N) @ (N, N) product in the model's dtype on one device: the peak that
             utilisation is measured against (on CPU, the whole host: its threads serve every
             simulated device).
  * train    the full step as training runs it (`train.make_train_step`, memory read, state donated):
             teacher pass + student forward/backward + SGD (+ EMA) on B labeled + B unlabeled images.
             images/s counts 2B (as the run loop logs); FLOPs from XLA's cost analysis; memory from
             XLA's buffer assignment (arguments + outputs + temporaries - aliased) and, where the
             backend reports it, the device's peak bytes in use.
  * infer    the "eval"-mode forward of B images at the crop (every image attends only to itself).
  * profile  where the step's time goes: a profiler trace of a few steps, each XLA op's time summed
             and attributed to its phase (teacher / forward / backward / update) and module (encoder
             stage and sub-layer, AllSpark, head) through the op metadata of the compiled program.
  * pipeline the training input pipeline (synthetic Pascal-sized JPEGs at the crop) alone, in
             examples/s, against the examples/s the step consumes; and the step fed by it.
  * compile  the train step compiled, not run: compile time, FLOPs and XLA's memory estimate, for
             configurations that do not fit the host.
  * scaling  the train step in subprocesses with 1..N devices (`--devices`) at a fixed per-device
             batch; on CPU the devices are simulated (`jax_num_cpu_devices`) and share the host.
"""
from __future__ import annotations

import collections
import gzip
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

ALL = ("matmul", "train", "infer", "profile", "pipeline", "scaling", "compile")
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "pascal.py")


# ----------------------------------------------------------------------------------------- timing


def median_time(call: Callable[[], Any], steps: int, warmup: int) -> tuple[float, list[float]]:
    """Median wall seconds of `call()` (which must block until its results are ready)."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), times


def compile_stats(jitted, *args) -> tuple[Any, dict]:
    """Lowers and compiles `jitted` for `args`; XLA's cost and memory analyses of the program.

    Returns (compiled, stats) with stats: lower_s, compile_s, flops (per device: the partitioned
    program's count), bytes_accessed, xla_memory_bytes (arguments + outputs + temporaries - aliased,
    per device), and the parts of that sum.
    """
    t = time.perf_counter()
    lowered = jitted.lower(*args)
    t_lower = time.perf_counter() - t
    t = time.perf_counter()
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per partition
        cost = cost[0]
    cost = cost or {}
    stats = {"lower_s": t_lower, "compile_s": t_compile, "flops": float(cost.get("flops", 0.0)),
             "bytes_accessed": float(cost.get("bytes accessed", 0.0))}
    mem = compiled.memory_analysis()
    if mem is not None:
        parts = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in
                 ("argument", "output", "alias", "temp", "generated_code")}
        stats["xla_memory_bytes"] = (parts["argument"] + parts["output"] - parts["alias"]
                                     + parts["temp"] + parts["generated_code"])
        stats["xla_memory_parts"] = parts
    return compiled, stats


def device_peak_bytes() -> int | None:
    """The first local device's peak bytes in use, where the backend keeps it (GPU/TPU; not CPU)."""
    import jax  # pylint: disable=g-import-not-at-top
    stats = jax.local_devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def host_peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _block(tree):
    import jax  # pylint: disable=g-import-not-at-top
    return jax.block_until_ready(tree)


# --------------------------------------------------------------------------------- what it runs


def setup(config, per_device_batch: int | None):
    """Model, optimiser, mesh and a train state for `config` (params random; memory filled).

    The parameters do not depend on the crop, so they are initialised at a small crop (a fraction
    of the compile of the full one); the Semantic Memory gets the full crop's shape from
    `jax.eval_shape`. Returns a dict of what the measurements share.
    """
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    from allspark_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
    from allspark_jax import train as train_lib  # pylint: disable=g-import-not-at-top
    from allspark_jax.models.segmentor import build_model, init_variables  # pylint: disable=g-import-not-at-top

    mesh = sharding_lib.create_mesh()
    n_dev = mesh.devices.size
    if per_device_batch is None:
        batch = int(config.data.batch_size)
        sharding_lib.check_batch_divisible(batch, mesh)
    else:
        batch = int(per_device_batch) * n_dev
    crop = int(config.data.crop_size)
    model = build_model(config.model)
    tx, _ = train_lib.create_optimizer(config.optim, 1000)
    rng = jax.random.key(int(config.seed))
    memory_shape = jax.eval_shape(lambda r: init_variables(model, r, crop), rng)["memory"]
    init_crop = min(crop, 64)

    def init(r):
        variables = init_variables(model, r, init_crop)
        variables["memory"] = jax.tree.map(
            lambda s, v: (jax.random.normal(r, s.shape, s.dtype) if s.dtype == jnp.float32
                          else jnp.zeros(s.shape, s.dtype)), memory_shape, variables["memory"])
        return train_lib.create_train_state(model, tx, r, init_crop,
                                            ema=config.train.teacher == "ema", variables=variables)

    s_sharding = sharding_lib.state_sharding(jax.eval_shape(init, rng), mesh,
                                             bool(config.get("shard_params", False)))
    state = jax.jit(init, out_shardings=s_sharding)(rng)
    return {"model": model, "tx": tx, "mesh": mesh, "state": state, "state_sharding": s_sharding,
            "batch_sharding": sharding_lib.batch_sharding(mesh), "batch": batch, "crop": crop,
            "devices": n_dev}


def synthetic_batch(batch: int, crop: int, num_classes: int, sharding, seed: int = 0) -> dict:
    """A training batch of random normalised images and labels, placed with `sharding`."""
    from allspark_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
    r = np.random.default_rng(seed)
    host = {
        "image_l": r.standard_normal((batch, crop, crop, 3), np.float32),
        "mask_l": r.integers(0, num_classes, (batch, crop, crop), dtype=np.int32),
        "image_u_w": r.standard_normal((batch, crop, crop, 3), np.float32),
        "image_u_s": r.standard_normal((batch, crop, crop, 3), np.float32),
        "pad_u": np.zeros((batch, crop, crop), bool),
    }
    return sharding_lib.put_global(host, {k: sharding for k in host})


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
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    from allspark_jax.models.segmentor import DTYPES  # pylint: disable=g-import-not-at-top
    dt = DTYPES[dtype]
    device = jax.local_devices()[0]
    a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), dt), device)
    b = jax.device_put(jax.random.normal(jax.random.key(1), (n, n), dt), device)
    compiled, stats = compile_stats(jax.jit(jnp.matmul), a, b)
    seconds, _ = median_time(lambda: compiled(a, b).block_until_ready(), steps, warmup)
    flops = 2.0 * n ** 3
    return {"n": n, "dtype": dtype, "seconds": seconds, "flops": flops,
            "xla_flops": stats["flops"], "peak_tflops_per_s": flops / seconds / 1e12}


def _train_program(ctx: dict, config):
    """The jitted train step (memory read, state donated) and a synthetic batch for it."""
    from allspark_jax import train as train_lib  # pylint: disable=g-import-not-at-top
    step = train_lib.make_train_step(ctx["model"], ctx["tx"], config.train, use_memory=True,
                                     state_sharding=ctx["state_sharding"],
                                     batch_sharding=ctx["batch_sharding"])
    batch = synthetic_batch(ctx["batch"], ctx["crop"], int(config.data.num_classes),
                            ctx["batch_sharding"])
    return step, batch


def bench_train(ctx: dict, config, steps: int, warmup: int, peak: float | None) -> dict:
    """The full train step (memory read) on a synthetic batch; carries the donated state."""
    step, batch = _train_program(ctx, config)
    compiled, stats = compile_stats(step, ctx["state"], batch)
    holder = {"state": ctx["state"]}

    def call():
        holder["state"], metrics = compiled(holder["state"], batch)
        _block(metrics)

    seconds, times = median_time(call, steps, warmup)
    ctx["state"] = holder["state"]
    ctx["train_step"], ctx["train_batch"] = compiled, batch
    out = {"seconds": seconds, "times": times, "images_per_step": 2 * ctx["batch"],
           "images_per_s": 2 * ctx["batch"] / seconds, **stats,
           **_rates(seconds, stats["flops"], ctx["devices"], peak, _host_shared())}
    out["device_peak_bytes"] = device_peak_bytes()
    out["host_peak_rss_bytes"] = host_peak_rss_bytes()
    return out


def compile_train(ctx: dict, config) -> dict:
    """The train step's compile statistics without running it."""
    step, batch = _train_program(ctx, config)
    return compile_stats(step, ctx["state"], batch)[1]


def bench_infer(ctx: dict, config, steps: int, warmup: int, peak: float | None) -> dict:
    """The eval-mode forward of a batch of B images at the crop."""
    import jax  # pylint: disable=g-import-not-at-top

    from allspark_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
    model, mesh = ctx["model"], ctx["mesh"]
    variables = {"params": ctx["state"].params, "batch_stats": ctx["state"].batch_stats}
    fn = jax.jit(lambda v, x: model.apply(v, x, mode="eval"),
                 in_shardings=(sharding_lib.replicated(mesh), ctx["batch_sharding"]),
                 out_shardings=ctx["batch_sharding"])
    x = synthetic_batch(ctx["batch"], ctx["crop"], int(config.data.num_classes),
                        ctx["batch_sharding"])["image_l"]
    variables = jax.device_put(variables, sharding_lib.replicated(mesh))
    compiled, stats = compile_stats(fn, variables, x)
    seconds, times = median_time(lambda: compiled(variables, x).block_until_ready(), steps, warmup)
    out = {"seconds": seconds, "times": times, "images_per_step": ctx["batch"],
           "images_per_s": ctx["batch"] / seconds, **stats,
           **_rates(seconds, stats["flops"], ctx["devices"], peak, _host_shared())}
    out["device_peak_bytes"] = device_peak_bytes()
    out["host_peak_rss_bytes"] = host_peak_rss_bytes()
    return out


def _host_shared() -> bool:
    import jax  # pylint: disable=g-import-not-at-top
    return jax.default_backend() == "cpu"


# -------------------------------------------------------------------------------------- profile

def hlo_op_names(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (opcode, JAX op_name metadata) for every instruction of an HLO module.

    A fusion is described by what it fuses: its opcode becomes `fusion:<root opcode>` of the
    called computation, and when XLA gave the fusion no metadata (as for some gradients it
    creates), it takes the first op_name found inside.
    """
    out, calls = {}, {}
    comp_root, comp_name, current = {}, {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$", line)
        if header:
            current = header.group(1)
            continue
        m = re.match(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$", line)
        if not m:
            continue
        is_root, name, rest = m.groups()
        op = re.search(r"\s([a-z][\w\-]*)\(", " " + rest.split(", metadata=")[0])
        opcode = op.group(1) if op else "?"
        meta = re.search(r'op_name="([^"]*)"', rest)
        op_name = meta.group(1) if meta else ""
        out[name] = (opcode, op_name)
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        if opcode == "fusion" and called:
            calls[name] = called.group(1)
        if current is not None:
            if is_root:
                comp_root[current] = opcode
            if op_name and current not in comp_name:
                comp_name[current] = op_name
    for name, comp in calls.items():
        opcode, op_name = out[name]
        out[name] = (f"fusion:{comp_root.get(comp, '?')}", op_name or comp_name.get(comp, ""))
    return out


def classify(op_name: str) -> tuple[str, str]:
    """(phase, module) of an op from its JAX name stack.

    phase: 'teacher' (the teacher pass, no autodiff), 'forward' / 'backward' (the student under
    jvp / its transpose), 'update' (loss, optimizer, EMA: ops outside the model).
    module: 'encoder s<i> attention|mlp|patch_embed|norm', 'allspark', 'head', 'other'.
    Ops that XLA created without any JAX name (it does so for some convolution weight gradients)
    are ('unattributed', 'unattributed').
    """
    if not op_name:
        return "unattributed", "unattributed"
    if "transpose(" in op_name:
        phase = "backward"
    elif "jvp(" in op_name:
        phase = "forward"
    elif "/backbone/" in op_name or "/allspark/" in op_name or "/head/" in op_name:
        phase = "teacher"
    else:
        phase = "update"
    m = re.search(r"/backbone/(?:block(\d)_\d+/(attn|mlp|norm\d)|patch_embed(\d)|norm(\d))", op_name)
    if m:
        if m.group(1):
            part = {"attn": "attention", "mlp": "mlp"}.get(m.group(2), "norm")
            module = f"encoder s{m.group(1)} {part}"
        elif m.group(3):
            module = f"encoder s{m.group(3)} patch_embed"
        else:
            module = f"encoder s{m.group(4)} norm"
    elif "/allspark/" in op_name:
        module = "allspark"
    elif "/head/" in op_name:
        module = "head"
    else:
        module = "other"
    return phase, module


def op_kind(opcode: str, name: str) -> str:
    """Coarse kind of a compiled op: matmul, conv, layout (transpose/copy), reduce, elementwise."""
    root = opcode.split(":")[-1]
    if root == "convolution":
        return "conv"
    if root == "dot" or any(w in name.lower() for w in ("gemm", "cublas", "matmul")):
        return "matmul"
    if root in ("transpose", "copy"):
        return "layout"
    if root in ("reduce", "reduce-window"):
        return "reduce"
    if opcode.startswith("fusion") or root in ("add", "multiply", "select", "exponential"):
        return "elementwise"
    return "other"


def _trace_events(logdir: str) -> list[dict]:
    paths = []
    for root, _, files in os.walk(logdir):
        paths += [os.path.join(root, f) for f in files if f.endswith("perfetto_trace.json.gz")]
    if not paths:
        raise RuntimeError(f"profile: no perfetto trace written under {logdir}")
    with gzip.open(sorted(paths)[-1]) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def profile(ctx: dict, steps: int, logdir: str | None = None) -> dict:
    """Op-level time of the compiled train step over `steps` traced calls.

    Sums each XLA op's traced duration (ops run in parallel on several threads, so the sum exceeds
    the wall time; shares are of the summed op time) and groups by phase, module and kind.
    """
    import jax  # pylint: disable=g-import-not-at-top
    compiled, batch = ctx["train_step"], ctx["train_batch"]
    names = hlo_op_names(compiled.as_text())
    holder = {"state": ctx["state"]}
    with tempfile.TemporaryDirectory() as tmp:
        logdir = logdir or tmp
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            for _ in range(steps):
                holder["state"], metrics = compiled(holder["state"], batch)
                _block(metrics)
        events = _trace_events(logdir)
    ctx["state"] = holder["state"]
    per_op = collections.Counter()
    for e in events:
        if e.get("ph") != "X":
            continue
        name = (e.get("args") or {}).get("hlo_op") or e.get("name")
        if name in names:
            per_op[name] += float(e.get("dur", 0.0)) * 1e-6 / steps
    total = sum(per_op.values())
    groups = {"phase": collections.Counter(), "module": collections.Counter(),
              "kind": collections.Counter(), "phase_module_kind": collections.Counter()}
    for name, sec in per_op.items():
        opcode, op_name = names[name]
        phase, module = classify(op_name)
        kind = op_kind(opcode, name)
        groups["phase"][phase] += sec
        groups["module"][module] += sec
        groups["kind"][kind] += sec
        groups["phase_module_kind"][f"{phase} | {module} | {kind}"] += sec
    top = [{"op": n, "opcode": names[n][0], "op_name": names[n][1], "seconds": s}
           for n, s in per_op.most_common(15)]
    return {"op_seconds_per_step": total, "ops_traced": len(per_op),
            **{k: dict(v.most_common()) for k, v in groups.items()}, "top_ops": top}


# ------------------------------------------------------------------------------------- pipeline


def bench_pipeline(ctx: dict, config, steps: int, warmup: int, step_seconds: float,
                   num_images: int = 64, image_size: int = 500) -> dict:
    """The input pipeline alone and the step fed by it, against the step on a resident batch.

    The data: `num_images` synthetic Pascal-layout JPEGs (half labeled) with sides in
    [0.75, 1] x `image_size` (Pascal VOC images are about 500 x 375).
    """
    from allspark_jax.data import benchmark as data_benchmark  # pylint: disable=g-import-not-at-top
    from allspark_jax.data import input_pipeline, synthetic  # pylint: disable=g-import-not-at-top
    batch, crop = ctx["batch"], ctx["crop"]
    with tempfile.TemporaryDirectory() as root:
        synthetic.write_dataset(root, num_images, 0, image_size, int(config.data.num_classes),
                                seed=0, num_labeled=num_images // 2)
        rate = data_benchmark.measure(root, crop, batch, steps, warmup,
                                      student_view=config.data.student_view)
        cfg = data_benchmark.make_config(root, crop, batch, student_view=config.data.student_view)
        keys = ("image_l", "mask_l", "image_u_w", "image_u_s", "pad_u")
        it = ({k: b[k] for k in keys}
              for b in input_pipeline.create_train_iterator(cfg, process_index=0, process_count=1))
        it = input_pipeline.prefetch_to_device(it, ctx["batch_sharding"], size=2)
        holder = {"state": ctx["state"]}

        def call():
            holder["state"], metrics = ctx["train_step"](holder["state"], next(it))
            _block(metrics)

        fed, _ = median_time(call, steps, warmup)
        ctx["state"] = holder["state"]
    need = batch / step_seconds
    return {"pipeline_examples_per_s": rate, "step_examples_per_s": need,
            "pipeline_over_step": rate / need, "fed_step_seconds": fed,
            "resident_step_seconds": step_seconds, "fed_slowdown": fed / step_seconds}


# -------------------------------------------------------------------------------------- scaling


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


# ---------------------------------------------------------------------------------------- report


def _fmt_bytes(b) -> str:
    return "-" if b is None else f"{b / 2 ** 30:.2f} GiB"


def format_report(r: dict) -> str:
    """The results as text tables."""
    lines = [f"backend {r['backend']} ({r['device_kind']}) x {r['devices']} devices, "
             f"model {r['backbone']} {r['dtype']} remat={r['remat']}, crop {r['crop']}, "
             f"global batch {r['batch']} labeled + {r['batch']} unlabeled"]
    if "matmul" in r:
        m = r["matmul"]
        lines.append(f"matmul peak: {m['n']}^3 {m['dtype']}: {m['seconds'] * 1e3:.1f} ms, "
                     f"{m['peak_tflops_per_s']:.3f} TFLOP/s")
    rows = [(k, r[k]) for k in ("train", "infer") if k in r]
    if rows:
        lines.append(f"{'':6} {'median s':>9} {'img/s':>8} {'compile s':>9} {'TFLOP/step':>10} "
                     f"{'TFLOP/s':>8} {'util':>6} {'XLA mem':>10} {'dev peak':>10} {'host RSS':>10}")
        for k, v in rows:
            util = f"{100 * v['utilisation']:.1f}%" if "utilisation" in v else "-"
            lines.append(
                f"{k:6} {v['seconds']:9.3f} {v['images_per_s']:8.2f} {v['compile_s']:9.1f} "
                f"{v['flops'] * r['devices'] / 1e12:10.3f} {v['tflops_per_s']:8.3f} {util:>6} "
                f"{_fmt_bytes(v.get('xla_memory_bytes')):>10} "
                f"{_fmt_bytes(v.get('device_peak_bytes')):>10} "
                f"{_fmt_bytes(v.get('host_peak_rss_bytes')):>10}")
    if "profile" in r:
        p = r["profile"]
        lines.append(f"profile: {p['op_seconds_per_step']:.3f} op-seconds per step "
                     f"({p['ops_traced']} ops)")
        for group in ("phase", "module", "kind"):
            parts = ", ".join(f"{k} {100 * v / p['op_seconds_per_step']:.1f}%"
                              for k, v in list(p[group].items())[:12])
            lines.append(f"  by {group}: {parts}")
        lines.append("  top (phase | module | kind):")
        for k, v in list(p["phase_module_kind"].items())[:10]:
            lines.append(f"    {100 * v / p['op_seconds_per_step']:5.1f}%  {k}")
    if "pipeline" in r:
        p = r["pipeline"]
        lines.append(f"pipeline: {p['pipeline_examples_per_s']:.2f} examples/s; the step consumes "
                     f"{p['step_examples_per_s']:.2f} (ratio {p['pipeline_over_step']:.2f}); step fed "
                     f"by the pipeline {p['fed_step_seconds']:.3f} s vs {p['resident_step_seconds']:.3f}"
                     f" s on a resident batch (x{p['fed_slowdown']:.2f})")
    if "scaling" in r:
        lines.append(f"scaling (per-device batch {r['per_device_batch']}):")
        lines.append(f"  {'devices':>7} {'batch':>6} {'median s':>9} {'img/s':>8} {'efficiency':>10}")
        for row in r["scaling"]:
            lines.append(f"  {row['devices']:7d} {row['global_batch']:6d} {row['seconds']:9.3f} "
                         f"{row['images_per_s']:8.2f} {100 * row['efficiency']:9.1f}%")
    return "\n".join(lines)


def markdown_table(paths: list[str]) -> str:
    """One Markdown row per results JSON (train and infer figures), for BENCHMARKS.md."""
    head = ("| run | model | crop | dtype | remat | batch | train s/step | train img/s | compile s | "
            "TFLOP/step | util | XLA mem | host RSS | infer s | infer img/s | infer util |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for path in paths:
        with open(path) as f:
            r = json.load(f)
        t, i = r.get("train"), r.get("infer")
        if t is None:
            continue
        pct = lambda v: f"{100 * v['utilisation']:.1f}%" if v and "utilisation" in v else "-"  # noqa: E731
        gib = lambda b: f"{b / 2 ** 30:.2f} GiB" if b else "-"  # noqa: E731
        name = os.path.splitext(os.path.basename(path))[0]
        rows.append(
            f"| {name} | {r['backbone']} | {r['crop']} | {r['dtype']} | {r['remat']} | "
            f"{r['batch']}+{r['batch']} | {t['seconds']:.2f} | {t['images_per_s']:.3f} | "
            f"{t['compile_s']:.1f} | {t['flops'] * r['devices'] / 1e12:.3f} | {pct(t)} | "
            f"{gib(t.get('xla_memory_bytes'))} | {gib(t.get('host_peak_rss_bytes'))} | "
            + (f"{i['seconds']:.2f} | {i['images_per_s']:.2f} | {pct(i)} |" if i else "- | - | - |"))
    return "\n".join(rows)


def run(config, *, what, steps: int = 5, warmup: int = 1, per_device_batch: int | None = None,
        matmul_size: int = 4096, profile_steps: int = 2, devices=(1, 2, 4, 8),
        pipeline_images: int = 64, pipeline_image_size: int = 500,
        argv: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    """Runs the measurements named in `what` (subset of ALL) and returns the JSON-able results."""
    import jax  # pylint: disable=g-import-not-at-top
    unknown = set(what) - set(ALL)
    if unknown:
        raise ValueError(f"--what: unknown measurements {sorted(unknown)}; expected some of {ALL}")
    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {steps}, {warmup}")
    r = {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
         "jax": jax.__version__, "backbone": str(config.model.backbone),
         "dtype": config.model.dtype, "remat": bool(config.model.remat),
         "crop": int(config.data.crop_size), "steps": steps, "warmup": warmup}
    peak = None
    if "matmul" in what:
        r["matmul"] = bench_matmul(matmul_size, config.model.dtype, steps)
        peak = r["matmul"]["peak_tflops_per_s"] * 1e12
        log(f"matmul: {r['matmul']['peak_tflops_per_s']:.3f} TFLOP/s")
    needs_state = {"train", "infer", "profile", "pipeline", "compile"} & set(what)
    ctx = setup(config, per_device_batch) if needs_state else None
    if ctx is not None:
        r["devices"], r["batch"] = ctx["devices"], ctx["batch"]
    else:
        r["devices"] = jax.device_count()
        r["batch"] = (per_device_batch * r["devices"] if per_device_batch
                      else int(config.data.batch_size))
    r["per_device_batch"] = r["batch"] // r["devices"]
    if {"train", "profile", "pipeline"} & set(what):
        r["train"] = bench_train(ctx, config, steps, warmup, peak)
        log(f"train: {r['train']['seconds']:.3f} s/step (compile {r['train']['compile_s']:.1f} s)")
    if "compile" in what:
        r["compile"] = compile_train(ctx, config)
        log(f"compile: {r['compile']['compile_s']:.1f} s, XLA memory "
            f"{r['compile'].get('xla_memory_bytes', 0) / 2 ** 30:.2f} GiB")
    if "infer" in what:
        r["infer"] = bench_infer(ctx, config, steps, warmup, peak)
        log(f"infer: {r['infer']['seconds']:.3f} s/batch")
    if "profile" in what:
        r["profile"] = profile(ctx, profile_steps)
    if "pipeline" in what:
        r["pipeline"] = bench_pipeline(ctx, config, steps, warmup, r["train"]["seconds"],
                                       pipeline_images, pipeline_image_size)
    if "scaling" in what:
        r["scaling"] = bench_scaling(argv or [], list(devices), r["per_device_batch"] or 1)
    return r


def main(argv) -> None:
    from absl import flags  # pylint: disable=g-import-not-at-top
    f = flags.FLAGS
    if f.table:
        paths = sorted(os.path.join(f.table, p) for p in os.listdir(f.table) if p.endswith(".json"))
        print(markdown_table(paths))
        return
    from allspark_jax import sharding  # pylint: disable=g-import-not-at-top
    sharding.set_xla_flags(f.config)
    if f.num_devices:
        import jax  # pylint: disable=g-import-not-at-top
        jax.config.update("jax_num_cpu_devices", int(f.num_devices))
    what = [w for w in f.what.split(",") if w]
    devices = [int(d) for d in f.devices.split(",") if d]
    # The scaling subprocesses get this command line back (later flags override earlier ones).
    passthrough = [a for a in sys.argv[1:] if not a.startswith(("--what", "--json", "--devices"))]
    results = run(f.config, what=what, steps=f.steps, warmup=f.warmup,
                  per_device_batch=f.per_device_batch, matmul_size=f.matmul_size,
                  profile_steps=f.profile_steps, devices=devices, argv=passthrough,
                  log=(lambda s: None) if f.quiet else (lambda s: print(s, flush=True)))
    del argv
    if not f.quiet:
        print(format_report(results), flush=True)
    if f.json:
        os.makedirs(os.path.dirname(os.path.abspath(f.json)), exist_ok=True)
        with open(f.json, "w") as fh:
            json.dump(results, fh, indent=2, sort_keys=True)


def _define_flags():
    from absl import flags  # pylint: disable=g-import-not-at-top
    from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Config file (model, crop, batch, "
                                    "precision, remat, train step settings).")
    flags.DEFINE_string("what", "matmul,train,infer", f"Comma-separated subset of {','.join(ALL)}.")
    flags.DEFINE_integer("steps", 5, "Timed calls per measurement (median reported).")
    flags.DEFINE_integer("warmup", 1, "Untimed calls after compilation.")
    flags.DEFINE_integer("per_device_batch", None, "Labeled (= unlabeled) images per device; "
                         "default: config.data.batch_size / devices.")
    flags.DEFINE_integer("num_devices", None, "CPU only: simulate this many devices.")
    flags.DEFINE_string("devices", "1,2,4,8", "Device counts for 'scaling'.")
    flags.DEFINE_integer("matmul_size", 4096, "N of the (N, N) @ (N, N) peak measurement.")
    flags.DEFINE_integer("profile_steps", 2, "Steps traced by 'profile'.")
    flags.DEFINE_string("json", None, "Write the results as JSON here.")
    flags.DEFINE_string("table", None, "Print a Markdown table of the results JSONs in this "
                        "folder and exit.")
    flags.DEFINE_bool("quiet", False, "Print nothing (for the scaling subprocesses).")


if __name__ == "__main__":
    from absl import app  # pylint: disable=g-import-not-at-top
    _define_flags()
    app.run(main)
