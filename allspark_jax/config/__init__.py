"""A run's configuration: loading config files, validating every key once, resolving data options.

`allspark_jax/configs/default.py` is the only home of defaults; every key a run reads is there,
with its meaning. This package reads a config and adds no values of its own:

  * `loading`: `load_config("configs/pascal.py:1_16")` loads a config file, or a shipped config by
    name, with its optional argument; the checks of `--config.KEY=VALUE` overrides;
  * `validation`: `validate(config)` checks every enum, range and cross-key constraint and raises a
    one-line ConfigError (a DataError for `data.*` keys) naming the key, its value and what is
    allowed; commands call it before anything starts;
  * `unread`: the keys a run does not read (by its method or another key's value) keep their
    defaults; `with_method` switches a config's method;
  * `options`: `data_options(config, workdir)` resolves the data keys once per run into a frozen
    `DataOptions`, which the input pipelines take;
  * `checks`: the value checks and the one error format they share.
The method itself is resolved by `allspark_jax.method.from_config`.
"""
from allspark_jax.config.loading import (check_override_keys, default_config, load_config,
                                         override_value_error, shipped_configs)
from allspark_jax.config.options import (DataOptions, data_options, synthetic_root,
                                         synthetic_style)
from allspark_jax.config.unread import unread_by_setting, with_method
from allspark_jax.config.validation import validate

__all__ = ["DataOptions", "check_override_keys", "data_options", "default_config", "load_config",
           "override_value_error", "shipped_configs", "synthetic_root", "synthetic_style",
           "unread_by_setting", "validate", "with_method"]
