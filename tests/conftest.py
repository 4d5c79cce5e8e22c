"""Shared pytest fixtures. Data fixtures are prefixed `data_`."""
import os

# On a GPU host JAX would take 75% of the GPU's memory at its first computation; tests run several
# JAX processes at once (pytest and the main.py / benchmark subprocesses), which then could not
# start. Allocating on demand lets them share the GPU (set before JAX starts; subprocesses inherit).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import pytest  # noqa: E402

import run_config  # first: the session's compilation cache goes into the environment before JAX starts

from allspark_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The modules that take longest (subprocess runs, notebooks, multi-process runs), run first, so that
# pytest-xdist's workers (pytest.ini: whole modules per worker) end together; the others keep their
# order. A module missing here only starts later.
SLOW_MODULES = ("test_faults.py", "test_notebooks.py", "test_gpu_path.py", "test_main.py",
                "test_learning.py", "test_topology.py", "test_distributed.py", "test_verify_reference.py",
                "test_allspark_dinov2.py", "test_verify_unimatch_v2.py",
                "test_train.py", "test_methods.py", "test_checkpoints.py", "test_bucketed.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a module


def make_config(seed=0, **data):
    """configs/default.py with `seed` and the given data.* keys."""
    config = config_lib.default_config()
    config.seed = seed
    config.data.update(data)
    return config


def make_options(seed=0, **data):
    """The DataOptions of `make_config(seed, **data)` (resolved as a run resolves them)."""
    return config_lib.data_options(make_config(seed, **data))


@pytest.fixture(scope="module")
def no_compilation_cache():
    """The persistent compilation cache off for a module whose tests count XLA compilations."""
    with run_config.compilation_cache_off():
        yield


@pytest.fixture(scope="session")
def data_synthetic_root(tmp_path_factory):
    """A tiny synthetic dataset (Pascal layout): 12 train (3 labeled, 9 unlabeled), 4 val, 5 classes."""
    from allspark_jax.data import synthetic
    root = str(tmp_path_factory.mktemp("data_synthetic"))
    synthetic.write_dataset(root, num_train=12, num_val=4, size=48, num_classes=5, seed=0,
                            num_labeled=3)
    return root


@pytest.fixture(scope="session")
def data_synthetic_tfds_dir(data_synthetic_root, tmp_path_factory):
    """TFDS records of `data_synthetic_root` prepared with allspark_jax.data.prepare."""
    from allspark_jax.data import prepare
    data_dir = str(tmp_path_factory.mktemp("data_tfds"))
    prepare.prepare("synthetic", data_synthetic_root, data_dir)
    return data_dir


@pytest.fixture()
def data_config(data_synthetic_root):
    """A factory of pipeline options on the synthetic dataset: data_config(**data_overrides)."""

    def make(seed=0, **overrides):
        data = {"name": "synthetic", "root": data_synthetic_root, "split": "default",
                "num_classes": 5, "crop_size": 40, "batch_size": 4, "source": "files",
                "student_view": "weak", "cutmix_prob": 0.0, "num_parallel_calls": -1, "prefetch": 2}
        data.update(overrides)
        return make_options(seed, **data)
    return make
