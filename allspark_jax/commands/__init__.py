"""The commands: what a command line runs, above the library (no library module imports them).

  main         `main.py` / `python -m allspark_jax` / `allspark-jax`: flags, logging, and the
               dispatch to train (`allspark_jax.train`), eval and predict;
  evaluate     `--mode eval`: a checkpoint's results on the validation set;
  predict      `--mode predict`: masks and overlays of image files;
  config_flag  the `--config` flag (a config file or shipped config by name, with overrides).
The benchmarks (`allspark_jax.benchmark`, `allspark_jax.benchmark.pipeline`), the learning experiment
(`allspark_jax.experiments.learning`) and the reference verifier (`allspark_jax.tools`) are commands
of their own at the same level.
"""
