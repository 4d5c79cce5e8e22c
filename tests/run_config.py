"""The tiny run shared by test_checkpoints.py and test_main.py, and a compilation cache for them.

The demo config shortened by overrides: a 4-stage MiT with 8..32 channels, 32 px crops, 4 + 4 images a
step, 2 epochs of 4 steps (warm-up 1 epoch, so both train steps compile), centre-crop evaluation.
In-process runs and `main.py` subprocesses use the same overrides, so they compile the same programs
and share them through a persistent XLA compilation cache (one per test session).
"""
import atexit
import os
import shutil
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_DIR = tempfile.mkdtemp(prefix="allspark_test_jax_cache_")
atexit.register(shutil.rmtree, CACHE_DIR, True)

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
    env = dict(os.environ)
    env.update(JAX_COMPILATION_CACHE_DIR=CACHE_DIR, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
               JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def enable_cache():
    """Turns the persistent cache on in this process; returns a function that turns it off."""
    import jax
    from jax._src import compilation_cache
    old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    compilation_cache.reset_cache()

    def restore():
        jax.config.update("jax_compilation_cache_dir", old[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
        compilation_cache.reset_cache()
    return restore
