"""Device mesh and shardings: data parallelism on one `data` axis, over every device of every host.

The global batch is split along its first axis over `data`. Trees are replicated, or split ZeRO/FSDP
style (`fsdp`: every array along its largest axis that the device count divides; XLA inserts the
gathers) for parameters and optimizer state that do not fit one device.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from allspark_jax.errors import ConfigError

DATA_AXIS = "data"


def create_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all (global) devices, axis `data`."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data`."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _split_spec(shape: tuple[int, ...], n: int) -> P:
    """Split the largest axis divisible by n; scalars and indivisible arrays stay replicated."""
    axes = [i for i in np.argsort(shape)[::-1] if shape[i] % n == 0 and shape[i] >= n]
    if not axes or n == 1:
        return P()
    spec = [None] * len(shape)
    spec[axes[0]] = DATA_AXIS
    return P(*spec)


def replicate(tree, mesh: Mesh):
    """The replicated sharding for every leaf of `tree`."""
    return jax.tree.map(lambda _: replicated(mesh), tree)


def fsdp(tree, mesh: Mesh):
    """A sharding for every leaf of `tree` that splits it over `data` where it can (see `_split_spec`)."""
    n = mesh.shape[DATA_AXIS]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, _split_spec(tuple(np.shape(x)), n)) if np.ndim(x) >= 1
        else replicated(mesh), tree)


def abstract(tree, shardings):
    """ShapeDtypeStructs of `tree`'s leaves (arrays or ShapeDtypeStructs) placed by `shardings`.

    A restore target: orbax reads each array straight into this placement, whatever mesh wrote it.
    """
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                        tree, shardings)


def check_batch_divisible(global_batch: int, mesh: Mesh) -> None:
    n = mesh.shape[DATA_AXIS]
    if global_batch % n:
        raise ConfigError(f"config.data.batch_size={global_batch} (global) must be divisible by "
                          f"the {n} devices of the mesh")


def to_host(tree):
    """Global arrays -> numpy on every process (replicated leaves are read from a local replica)."""

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
