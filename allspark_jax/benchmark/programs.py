"""What the benchmark runs: the train state, the jitted train step and inference, synthetic batches.

Built the way training builds them (`state.create_train_state`, `train_step.make_train_step`,
`sharding`), so the measured programs are the ones a run compiles.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from allspark_jax import method as method_lib
from allspark_jax import optimizer
from allspark_jax import sharding as sharding_lib
from allspark_jax import state as state_lib
from allspark_jax import train_step as train_step_lib
from allspark_jax.errors import ConfigError
from allspark_jax.models.segmentor import build_model, init_variables, small_crop


@dataclasses.dataclass(frozen=True)
class Setup:
    """The model and placement every measurement shares. `batch` is the GLOBAL labeled batch."""

    model: Any
    tx: Any
    mesh: Any
    state_sharding: Any
    batch_sharding: Any
    batch: int
    crop: int
    devices: int


def setup(config, per_device_batch: int | None) -> tuple[Setup, state_lib.TrainState]:
    """The Setup of `config` and a train state (params random; the Semantic Memory filled).

    The parameters do not depend on the crop, so they are initialised at a small crop (a fraction
    of the compile of the full one); the Semantic Memory gets the full crop's shape from
    `jax.eval_shape`.
    """
    mesh = sharding_lib.create_mesh()
    n_dev = mesh.devices.size
    if per_device_batch is None:
        batch = int(config.data.batch_size)
        sharding_lib.check_batch_divisible(batch, mesh)
    else:
        batch = int(per_device_batch) * n_dev
        groups = int(config.train.loss_groups)
        if batch % groups:
            raise ConfigError(f"--per_device_batch={per_device_batch} on {n_dev} device(s) gives a "
                              f"global batch of {batch}, which config.train.loss_groups={groups} "
                              f"does not divide; expected a multiple of {groups} (or "
                              f"--config.train.loss_groups=1)")
    crop = int(config.data.crop_size)
    model = build_model(config)
    tx, _ = optimizer.create_optimizer(config.optim, 1000)
    rng = jax.random.key(int(config.seed))
    # No memory without AllSpark (the baselines 'semi' / 'supervised').
    memory_shape = jax.eval_shape(lambda r: init_variables(model, r, crop), rng).get("memory")
    init_crop = min(crop, small_crop(model.config))

    def init(r):
        variables = init_variables(model, r, init_crop)
        if memory_shape is not None:
            variables["memory"] = jax.tree.map(
                lambda s, v: (jax.random.normal(r, s.shape, s.dtype) if s.dtype == jnp.float32
                              else jnp.zeros(s.shape, s.dtype)), memory_shape, variables["memory"])
        return state_lib.create_train_state(model, tx, r, init_crop,
                                            ema=method_lib.from_config(config).ema,
                                            variables=variables)

    s_sharding = state_lib.state_sharding(jax.eval_shape(init, rng), mesh,
                                          bool(config.shard_params))
    state = jax.jit(init, out_shardings=s_sharding)(rng)
    return Setup(model=model, tx=tx, mesh=mesh, state_sharding=s_sharding,
                 batch_sharding=sharding_lib.batch_sharding(mesh), batch=batch, crop=crop,
                 devices=n_dev), state


def synthetic_batch(batch: int, crop: int, num_classes: int, sharding, seed: int = 0,
                    keys=train_step_lib.BATCH_KEYS) -> dict:
    """A training batch (the entries `keys`, drawn in that order) of random normalised images and
    labels, no padding, and CutMix boxes on every other image (a quarter of the crop; the second
    strong view's in the opposite corner), placed with `sharding`."""
    r = np.random.default_rng(seed)

    def image():
        return r.standard_normal((batch, crop, crop, 3), np.float32)

    def box(corner: int):
        b = np.zeros((batch, crop, crop), bool)
        b[::2, corner:corner + crop // 2, corner:corner + crop // 2] = True
        return b

    make = {"image_l": image,
            "mask_l": lambda: r.integers(0, num_classes, (batch, crop, crop), dtype=np.int32),
            "image_u_w": image, "image_u_s": image, "image_u_s1": image, "image_u_s2": image,
            "pad_u": lambda: np.zeros((batch, crop, crop), bool),
            "cutmix_u": lambda: box(0), "cutmix_u1": lambda: box(0),
            "cutmix_u2": lambda: box(crop - crop // 2)}
    host = {k: make[k]() for k in keys}
    return sharding_lib.put_global(host, {k: sharding for k in keys})


def train_program(s: Setup, config):
    """The jitted train step of the config's method (AllSpark: memory read; state donated) and a
    synthetic batch for it."""
    step = train_step_lib.make_train_step(s.model, s.tx, config.train, use_memory=True,
                                          state_sharding=s.state_sharding,
                                          batch_sharding=s.batch_sharding,
                                          method=method_lib.from_config(config))
    keys = train_step_lib.batch_keys(method_lib.from_config(config))
    batch = synthetic_batch(s.batch, s.crop, int(config.data.num_classes), s.batch_sharding,
                            keys=keys)
    return step, batch


def infer_program(s: Setup, config):
    """The jitted eval-mode forward of B images at the crop, and a synthetic batch of images."""
    model = s.model
    fn = jax.jit(lambda v, x: model.apply(v, x, mode="eval"),
                 in_shardings=(sharding_lib.replicated(s.mesh), s.batch_sharding),
                 out_shardings=s.batch_sharding)
    x = synthetic_batch(s.batch, s.crop, int(config.data.num_classes), s.batch_sharding)["image_l"]
    return fn, x
