"""The tiny official-architecture model of tests/data/allspark_tiny.npz, shared by the tests."""
import functools
import os

import jax
import numpy as np

from allspark_jax.tools.verify_reference import Reference

DATA = os.path.join(os.path.dirname(__file__), "data")
REFERENCE_NPZ = os.path.join(DATA, "allspark_tiny.npz")
# The release's semi / supervised baselines (record_baselines.py).
BASELINES_NPZ = os.path.join(DATA, "baselines_tiny.npz")
# The release's AllSpark module on UniMatch V2's DINOv2 + DPT head (record_allspark_dinov2.py).
ALLSPARK_DINOV2_NPZ = os.path.join(DATA, "allspark_dinov2_tiny.npz")
OFFICIAL_PTH = os.path.join(DATA, "allspark_tiny_official_checkpoint.pth")
MIT_PTH = os.path.join(DATA, "mit_tiny_imagenet.pth")


@functools.lru_cache(maxsize=None)
def reference() -> Reference:
    return Reference(REFERENCE_NPZ)


def assert_trees_equal(a, b, rtol=0.0, atol=0.0):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype, (path, x.shape, y.shape, x.dtype, y.dtype)
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def rel_err(out, ref) -> float:
    """The relative error of `out` against `ref` (Frobenius norms, float64)."""
    return float(np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref))


def nhwc(x):
    """NCHW (PyTorch) -> NHWC."""
    return np.transpose(x, (0, 2, 3, 1))


def shapes(tree):
    """The tree's arrays as ShapeDtypeStructs."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
