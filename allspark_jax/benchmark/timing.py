"""Timing and XLA's compile-time statistics of a program; peak memory of the device and the host."""
from __future__ import annotations

import collections
import resource
import time
from typing import Any, Callable

import jax
import numpy as np


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


class CompileCounter:
    """Counts XLA backend compilations (`jax.monitoring` events) while active.

    `count`: all of them; `by_name`: per jitted function name (e.g. ``"jit(per_size_predict)"``).
    """

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0
        self.by_name: collections.Counter = collections.Counter()

    def __call__(self, event, duration, **kwargs):
        if event == self.EVENT:
            self.count += 1
            self.by_name[kwargs.get("fun_name", "?")] += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


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
    stats = jax.local_devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def host_peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
