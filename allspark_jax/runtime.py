"""Process start-up: XLA flags, the float32 matmul precision, multi-host initialisation, the
persistent compilation cache, and TensorFlow kept off the accelerators
(`hide_accelerators_from_tensorflow`); `commands.startup.validated_start` runs them, after the config
check, for a command line.

Everything here runs once per process, before the first computation (`main.py` and the learning
benchmark start with it, the speed benchmark with `set_xla_flags` and `apply_precision`), because
XLA and `jax.distributed` read their settings when JAX starts its backends, and jit traces with the
precision in force.
"""
from __future__ import annotations

import os

import jax

from allspark_jax.errors import ConfigError
from allspark_jax.models.segmentor import PRECISIONS
from allspark_jax.workdir import COMPILATION_CACHE_DIR

# Environment variables naming the coordinator, the process count and this process's id.
ENV_COORDINATOR = "ALLSPARK_COORDINATOR"
ENV_NUM_PROCESSES = "ALLSPARK_NUM_PROCESSES"
ENV_PROCESS_ID = "ALLSPARK_PROCESS_ID"


# Flags read by XLA:CPU's compiler alone.
XLA_CPU_FLAG_PREFIX = "--xla_cpu_"


def accelerator_possible() -> bool:
    """Whether JAX may start a GPU or TPU backend in this process, judged before any backend starts.

    JAX_PLATFORMS (jax_platforms) naming only 'cpu' says no; without it, an installed accelerator
    plugin (the `jax_plugins` namespace or entry points: CUDA, ROCm; libtpu) says yes. A host with
    a plugin but no device counts as an accelerator host.
    """
    import importlib.util  # pylint: disable=g-import-not-at-top
    import pkgutil  # pylint: disable=g-import-not-at-top
    from importlib.metadata import entry_points  # pylint: disable=g-import-not-at-top
    platforms = [p.strip() for p in str(jax.config.jax_platforms or "").split(",") if p.strip()]
    if platforms:
        return any(p != "cpu" for p in platforms)
    try:
        import jax_plugins  # pylint: disable=g-import-not-at-top
        if any(True for _ in pkgutil.iter_modules(jax_plugins.__path__)):
            return True
    except ImportError:
        pass
    return bool(entry_points(group="jax_plugins")) or importlib.util.find_spec("libtpu") is not None


def xla_flags_for_backend(flags: list[str], accelerator: bool) -> list[str]:
    """`flags` less the XLA:CPU ones (`--xla_cpu_*`) where an accelerator may run the programs."""
    return [f for f in flags if not (accelerator and f.startswith(XLA_CPU_FLAG_PREFIX))]


def set_xla_flags(config) -> None:
    """Appends `config.xla_flags` to the XLA_FLAGS environment variable; the XLA:CPU flags among
    them (`--xla_cpu_*`) only where JAX runs on the CPU alone (`accelerator_possible`).

    XLA reads XLA_FLAGS once, when JAX starts its backends, so this must run before the first
    computation or device query. A flag already present in the environment is left as the user set it.
    """
    extra = xla_flags_for_backend(str(config.get("xla_flags", None) or "").split(),
                                  accelerator_possible())
    if not extra:
        return
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    if xla_bridge.backends_are_initialized():
        raise RuntimeError(f"config.xla_flags={' '.join(extra)!r} can only take effect before JAX "
                           "starts its backends; call runtime.set_xla_flags(config) first")
    current = os.environ.get("XLA_FLAGS", "").split()
    present = {f.split("=")[0] for f in current}
    os.environ["XLA_FLAGS"] = " ".join(current + [f for f in extra if f.split("=")[0] not in present])


def set_matmul_precision(precision: str) -> None:
    """Sets JAX's precision of float32 matrix products and convolutions ('default', 'high',
    'highest': configs/default.py, model.precision) for every program traced afterwards.

    jit keys its cache on this setting, so a program traced before the call is traced again after it.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    jax.config.update("jax_default_matmul_precision", precision)


def apply_precision(config) -> None:
    """`config.model.precision` for the rest of the process (training, evaluation, predict, the
    benchmark all call it at start-up)."""
    set_matmul_precision(str(config.model.get("precision", "default")))


def matmul_precision() -> str:
    """The precision in force ('default' when none was set): what a run records."""
    return str(jax.config.jax_default_matmul_precision or "default")


def initialize_distributed(config) -> None:
    """`jax.distributed.initialize` for multi-host runs.

    Settings come from `config.distributed` (coordinator_address, num_processes, process_id) when
    given, else from the environment (ALLSPARK_COORDINATOR / ALLSPARK_NUM_PROCESSES /
    ALLSPARK_PROCESS_ID, or JAX's own auto-detection on TPU pods and SLURM with
    `distributed.auto`). Single-host runs with no settings skip it. A process that stops sending
    heartbeats for `distributed.heartbeat_timeout_seconds` (killed, host lost) makes every other
    process terminate with an error naming it, instead of waiting in a collective forever.
    """
    dist = config.get("distributed", None) or {}
    timeouts = {k: int(dist[k]) for k in ("heartbeat_timeout_seconds", "shutdown_timeout_seconds")
                if dist.get(k) is not None}
    address = dist.get("coordinator_address") or os.environ.get(ENV_COORDINATOR)
    num = dist.get("num_processes") or os.environ.get(ENV_NUM_PROCESSES)
    pid = dist.get("process_id")
    pid = os.environ.get(ENV_PROCESS_ID) if pid is None else pid
    if address:
        if num is None or pid is None:
            raise ConfigError("distributed: coordinator_address needs num_processes and process_id "
                              f"(config.distributed.* or {ENV_NUM_PROCESSES}/{ENV_PROCESS_ID})")
        num = _integer(num, f"config.distributed.num_processes or {ENV_NUM_PROCESSES}", 1)
        pid = _integer(pid, f"config.distributed.process_id or {ENV_PROCESS_ID}", 0)
        if pid >= num:
            raise ConfigError(f"distributed: process_id={pid} must be below num_processes={num}")
        jax.distributed.initialize(coordinator_address=address, num_processes=num,
                                   process_id=pid, **timeouts)
    elif dist.get("auto", False):
        jax.distributed.initialize(**timeouts)


def _integer(value, name: str, minimum: int) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        out = None
    if out is None or out < minimum:
        raise ConfigError(f"{name}={value!r}: expected an integer >= {minimum}")
    return out


def setup_compilation_cache(config, workdir: str) -> None:
    """Persistent XLA compilation cache in <workdir>/jax_cache (`config.compilation_cache`)."""
    if config.get("compilation_cache", False):
        jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, COMPILATION_CACHE_DIR))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def hide_accelerators_from_tensorflow() -> None:
    """tf.data runs on the host: TensorFlow must not take GPU or TPU memory from JAX, so it sees
    neither (`data.host_tensorflow`; importing it does this, for every user of the pipelines)."""
    from allspark_jax.data import host_tensorflow  # pylint: disable=g-import-not-at-top
    host_tensorflow.keep_off_accelerators()


def start(config) -> None:
    """XLA flags and jax.distributed, in that order (both before JAX starts its backends), and the
    float32 matmul precision."""
    set_xla_flags(config)
    initialize_distributed(config)
    apply_precision(config)
