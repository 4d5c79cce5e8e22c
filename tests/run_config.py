"""The tiny run shared by test_checkpoints.py and test_main.py, and the session's compilation cache.

The demo config shortened by overrides: a 4-stage MiT with 8..32 channels, 32 px crops, 4 + 4 images a
step, 2 epochs of 4 steps (warm-up 1 epoch, so both train steps compile), centre-crop evaluation.
In-process runs and `main.py` subprocesses use the same overrides, so they compile the same programs.

Compiled programs are shared by every process of a test session (the pytest process, its
pytest-xdist workers and every subprocess they start) through one persistent XLA compilation cache:
importing this module (conftest.py does, before JAX is imported) puts it in the environment, where
JAX reads it when it is imported. A cache directory given in the environment is used as it is (a
worker or subprocess of the session, or a user's own, kept between sessions); otherwise a temporary
one is made, removed when the process that made it ends.

The session also compiles with cheaper XLA:CPU settings (TEST_XLA_FLAGS, put into XLA_FLAGS the
same way): LLVM's optimisation level 0 and XLA's older fusion emitters. The suite compiles many
programs and runs each a few steps, so compiling is most of its time. The programs JAX hands to XLA
are the same; results differ from a user's build by float32 rounding only.
A flag given in XLA_FLAGS wins: `XLA_FLAGS="--xla_backend_optimization_level=2
--xla_cpu_use_fusion_emitters=true" python -m pytest` runs the suite as a user's run compiles.
"""
import atexit
import contextlib
import os
import shutil
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Only programs that take a while to compile are written: the runs of the tiny config (train and
# eval steps) that many processes compile again. Writing every small program too costs about what
# it saves in this suite (measured: in-process test modules, 0 vs no cache).
CACHE_ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}


def _session_cache_dir() -> str:
    given = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if given:
        return given
    made = tempfile.mkdtemp(prefix="allspark_test_jax_cache_")
    atexit.register(shutil.rmtree, made, True)
    return made


CACHE_DIR = _session_cache_dir()
os.environ["JAX_COMPILATION_CACHE_DIR"] = CACHE_DIR
for _key, _value in CACHE_ENV.items():
    os.environ.setdefault(_key, _value)

TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def xla_flags(*flags: str) -> str:
    """This process's XLA_FLAGS with `flags` appended, except those whose name it sets already."""
    now = os.environ.get("XLA_FLAGS", "").split()
    names = {f.split("=")[0] for f in now}
    return " ".join(now + [f for f in flags if f.split("=")[0] not in names])


os.environ["XLA_FLAGS"] = xla_flags(*TEST_XLA_FLAGS)

OVERRIDES = {
    "data.synthetic.num_train": 22,
    "data.synthetic.num_labeled": 6,
    "data.synthetic.num_val": 4,
    "data.synthetic.size": 40,
    "data.crop_size": 32,
    "data.batch_size": 4,
    "model.backbone.embed_dims": (8, 16, 24, 32),
    "model.backbone.num_heads": (1, 2, 3, 4),
    "model.decoder_dim": 16,
    "train.epochs": 2,
    "train.warmup_epoch": 1,
    "eval.crop_size": 28,
    "eval.progress_bar": False,
    "log_every_steps": 2,
    "eval_every_steps": 4,
    "checkpoint_every_steps": 3,
}
STEPS = 8  # 2 epochs x (18 unlabeled // 4)

# The same run moved between topologies (test_topology.py): a global batch of 8 (divisible by 1, 4
# and 8 devices), 3 epochs of 2 steps (18 unlabeled // 8), the memory read from the start (one train
# program per topology), checkpoints at steps 3 and 6 (kept), evaluated at step 6 only.
TOPOLOGY = {
    "data.batch_size": 8,
    "train.epochs": 3,
    "train.warmup_epoch": 0,
    "checkpoint_every_steps": 3,
    "eval_every_steps": 6,
    "keep_checkpoints": 4,
}
TOPOLOGY_STEPS, TOPOLOGY_RESUME_STEP = 6, 3


def tiny_config(**extra):
    """configs/demo.py with OVERRIDES (and `extra`, dotted keys with '__' for '.') applied.

    With `method=` in `extra`: configs/demo.py:METHOD, without the OVERRIDES the method does not
    read (the memory's warm-up of AllSpark)."""
    from allspark_jax import config as config_lib
    from allspark_jax import method as method_lib
    extra = {k.replace("__", "."): v for k, v in extra.items()}
    method = extra.get("method", "allspark")
    config = config_lib.load_config(f"configs/demo.py:{method}")
    unread = method_lib.unread_keys(method)
    overrides = {k: v for k, v in OVERRIDES.items() if k not in unread}
    for key, value in {**overrides, **extra}.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def cli_flags(**extra) -> list[str]:
    """The same overrides as `--config.key=value` flags of main.py."""
    def fmt(v):
        if isinstance(v, tuple):
            return "(" + ",".join(str(x) for x in v) + ",)"
        return str(v)
    items = {**OVERRIDES, **{k.replace("__", "."): v for k, v in extra.items()}}
    return [f"--config.{k}={fmt(v)}" for k, v in items.items()]


def subprocess_env() -> dict:
    """This process's environment (the session's compilation cache included) for a subprocess that
    runs the project on the CPU: tests/ and the checkout on its path, TensorFlow's C++ logs off."""
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    return env


@contextlib.contextmanager
def compilation_cache_off():
    """This process's persistent compilation cache off inside (for what counts XLA compilations: a
    program loaded from the cache is not compiled)."""
    import jax
    from jax._src import compilation_cache
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()
