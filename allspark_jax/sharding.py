"""Device mesh and shardings: data parallelism on one `data` axis, over every device of every host.

The global batch is split along its first axis over `data`. The train state is replicated, or with
`shard_params` (for models whose parameters and optimizer state do not fit one device) every
parameter-shaped leaf is split along its largest axis that the device count divides, ZeRO/FSDP
style; XLA inserts the gathers. The Semantic Memory stays replicated: it is written from the whole
global batch in batch order every step.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def set_xla_flags(config) -> None:
    """Appends `config.xla_flags` to the XLA_FLAGS environment variable.

    XLA reads XLA_FLAGS once, when JAX starts its backends, so this runs before the first
    computation or device query (main.py and the benchmark call it first). A flag already present
    in the environment is left as the user set it.
    """
    extra = str(config.get("xla_flags", None) or "").split()
    if not extra:
        return
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    if xla_bridge.backends_are_initialized():
        raise RuntimeError(f"config.xla_flags={' '.join(extra)!r} can only take effect before JAX "
                           "starts its backends; call sharding.set_xla_flags(config) first")
    current = os.environ.get("XLA_FLAGS", "").split()
    present = {f.split("=")[0] for f in current}
    os.environ["XLA_FLAGS"] = " ".join(current + [f for f in extra if f.split("=")[0] not in present])


def initialize_distributed(config) -> None:
    """`jax.distributed.initialize` for multi-host runs.

    Settings come from `config.distributed` (coordinator_address, num_processes, process_id) when
    given, else from the environment (JAX's own auto-detection on TPU pods and SLURM, or
    ALLSPARK_COORDINATOR / ALLSPARK_NUM_PROCESSES / ALLSPARK_PROCESS_ID). Single-host runs with no
    settings skip it.
    """
    dist = config.get("distributed", None) or {}
    address = dist.get("coordinator_address") or os.environ.get("ALLSPARK_COORDINATOR")
    num = dist.get("num_processes") or os.environ.get("ALLSPARK_NUM_PROCESSES")
    pid = dist.get("process_id")
    pid = os.environ.get("ALLSPARK_PROCESS_ID") if pid is None else pid
    if address:
        if num is None or pid is None:
            raise ValueError("distributed: coordinator_address needs num_processes and process_id "
                             "(config.distributed.* or ALLSPARK_NUM_PROCESSES/ALLSPARK_PROCESS_ID)")
        jax.distributed.initialize(coordinator_address=address, num_processes=int(num),
                                   process_id=int(pid))
    elif dist.get("auto", False):
        jax.distributed.initialize()


def create_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all (global) devices, axis `data`."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data`."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _param_spec(shape: tuple[int, ...], n: int) -> P:
    """Split the largest axis divisible by n; scalars and indivisible leaves stay replicated."""
    axes = [i for i in np.argsort(shape)[::-1] if shape[i] % n == 0 and shape[i] >= n]
    if not axes or n == 1:
        return P()
    spec = [None] * len(shape)
    spec[axes[0]] = DATA_AXIS
    return P(*spec)


def state_sharding(state, mesh: Mesh, shard_params: bool = False):
    """A sharding for every leaf of a TrainState (same tree structure)."""
    n = mesh.shape[DATA_AXIS]

    def leaf(path, x):
        top = getattr(path[0], "name", None)
        if shard_params and top in ("params", "opt_state", "ema_params") and np.ndim(x) >= 1:
            return NamedSharding(mesh, _param_spec(tuple(np.shape(x)), n))
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(leaf, state)


def check_batch_divisible(global_batch: int, mesh: Mesh) -> None:
    n = mesh.shape[DATA_AXIS]
    if global_batch % n:
        raise ValueError(f"config.data.batch_size={global_batch} (global) must be divisible by the "
                         f"{n} devices of the mesh")


def to_host(tree):
    """Global arrays -> numpy on every process (replicated leaves are read from a local replica)."""
    from jax.experimental import multihost_utils

    def leaf(x):
        if not isinstance(x, jax.Array):
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        if x.is_fully_addressable:
            return np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(leaf, tree)


def put_global(tree, shardings):
    """Host values that are identical on every process -> global arrays with `shardings`."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
        tree, shardings)


def put_batch(local_batch: dict, sharding: NamedSharding) -> dict:
    """This process's rows of the global batch -> global arrays sharded on `data`."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}
