"""The shared first steps of the notebooks in `colabs/`: a config by name, its data, a short summary.

    from allspark_jax import notebook
    config, opts = notebook.setup("demo", workdir="/tmp/allspark_notebooks")

Configs are the package's own (`allspark_jax/configs/`, by name) or a config file of the user's
(`configs_dir`); the synthetic demo dataset is written into the workdir when the config asks for it.
"""
from __future__ import annotations

import os

from allspark_jax import config as config_lib


def setup(config_name: str = "demo", split: str | None = None, data_root: str | None = None,
          workdir: str = "/tmp/allspark_notebooks", *, overrides: dict | None = None,
          configs_dir: str | None = None):
    """Loads config `config_name` (shipped, or `<configs_dir>/<config_name>.py`) with its optional
    `split`, points it at `data_root`, resolves its data.

    `overrides`: {"data.student_view": "strong", ...} applied before validation. Returns (config,
    DataOptions). Keeps tf.data off any accelerator, turns the evaluation progress bar off
    (notebook output) and prints the dataset, its classes and the JAX devices.
    """
    import jax  # pylint: disable=g-import-not-at-top
    from allspark_jax.data import host_tensorflow  # pylint: disable=g-import-not-at-top
    host_tensorflow.keep_off_accelerators()  # tf.data stays on the host

    source = os.path.join(configs_dir, f"{config_name}.py") if configs_dir else config_name
    config = config_lib.load_config(f"{source}:{split}" if split else source)
    if data_root:
        config.data.root = data_root
    config.eval.progress_bar = False
    for key, value in (overrides or {}).items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    config_lib.validate(config)
    os.makedirs(workdir, exist_ok=True)
    opts = config_lib.data_options(config, workdir)
    print(f"{opts.name}: root {opts.root}, split {opts.split}, {opts.num_classes} classes:",
          ", ".join(opts.class_names))
    print("JAX devices:", jax.devices())
    return config, opts
