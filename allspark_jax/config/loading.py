"""Loading a run's config: a config file by path or a shipped config by name, and the checks of
`--config.KEY=VALUE` overrides.

`load_config(spec)` takes `SOURCE[:ARG]` and returns the ConfigDict that the source's
`get_config(ARG)` (or `get_config()`) returns. SOURCE is, in this order:
  * the path of an existing file: a config file of the user's own (it may import the shipped ones,
    `from allspark_jax.configs import default`), or a file of `allspark_jax/configs/`;
  * `configs/NAME.py`, `NAME.py` or `NAME`: the shipped config `allspark_jax.configs.NAME`, so
    `--config configs/pascal.py:1_16` works from a checkout and from anywhere an installed package
    is, and `--config pascal:1_16` names the same config.
`default_config()` is `allspark_jax/configs/default.py`'s config, the value of every key before a
config file changes it.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import sys

import ml_collections

from allspark_jax import configs as configs_package
from allspark_jax.config.checks import get
from allspark_jax.errors import ConfigError

PACKAGE = configs_package.__name__
CONFIGS_DIR = os.path.dirname(os.path.abspath(configs_package.__file__))


def shipped_configs() -> tuple[str, ...]:
    """The names of the configs shipped in `allspark_jax.configs` ('cityscapes', ..., 'pascal')."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules([CONFIGS_DIR])))


def _shipped_name(source: str) -> str | None:
    """`configs/NAME.py`, `NAME.py` or `NAME` -> NAME when it is a shipped config, else None."""
    head, tail = os.path.split(os.path.normpath(source))
    name = tail[:-3] if tail.endswith(".py") else tail
    if head and os.path.basename(head) != "configs":
        return None
    return name if name in shipped_configs() else None


def _user_module(path: str):
    """Imports the config file at `path`. A folder holding __init__.py is imported as a package of
    its name, so its files can import their siblings (`from myconfigs import base`)."""
    directory = os.path.dirname(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    if directory == CONFIGS_DIR:
        return importlib.import_module(f"{PACKAGE}.{stem}")
    if os.path.isfile(os.path.join(directory, "__init__.py")):
        name = os.path.basename(directory)
        module = sys.modules.get(name)
        if module is None or os.path.dirname(os.path.abspath(
                getattr(module, "__file__", "") or "")) != directory:
            spec = importlib.util.spec_from_file_location(
                name, os.path.join(directory, "__init__.py"), submodule_search_locations=[directory])
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        return importlib.import_module(f"{name}.{stem}")
    spec = importlib.util.spec_from_file_location(f"_allspark_jax_config_{stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`SOURCE[:ARG]` (module docstring) -> the ConfigDict of its `get_config(ARG)`.

    Raises ConfigError naming SOURCE and the shipped configs when SOURCE is neither a file nor a
    shipped config; a config's own `get_config` raises ValueError for an argument it refuses.
    """
    source, _, arg = str(spec).partition(":")
    path = os.path.abspath(os.path.expanduser(source))
    if os.path.isfile(path):
        module = _user_module(path)
    else:
        name = _shipped_name(source)
        if name is None:
            raise ConfigError(f"config file {path!r} does not exist, and {source!r} names no "
                              f"shipped config; expected a config file or one of "
                              f"{', '.join(shipped_configs())} (e.g. configs/pascal.py:1_16)")
        module = importlib.import_module(f"{PACKAGE}.{name}")
    return module.get_config(arg) if arg else module.get_config()


def default_config() -> ml_collections.ConfigDict:
    """configs/default.py's config: the value of every key before a config file changes it."""
    from allspark_jax.configs import default  # pylint: disable=g-import-not-at-top
    return default.get_config()


# --------------------------------------------------------------------------- command-line overrides

_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
          tuple: "a tuple such as (1, 2)"}


def check_override_keys(config, keys) -> None:
    """Raises ConfigError for the first dotted key of `keys` (`--config.KEY=VALUE` on the command
    line) that `config` does not have, naming the keys it has at that level."""
    for key in keys:
        node, parents = config, []
        for part in key.split("."):
            where = "config." + ".".join(parents) if parents else "config"
            if not isinstance(node, ml_collections.ConfigDict):
                raise ConfigError(f"config.{key} is not a key: {where} is {node!r}, not a group of "
                                  "keys")
            if part not in node:
                raise ConfigError(f"config.{key} is not a key; {where} has: "
                                  f"{', '.join(sorted(node.keys()))}")
            node, parents = node[part], parents + [part]


def override_value_error(config, key: str, value: str, reason: str) -> ConfigError:
    """The error of `--config.KEY=VALUE` whose VALUE does not parse as the key's type."""
    *parents, leaf = key.split(".")
    field_type = (get(config, ".".join(parents)) if parents else config).get_type(leaf)
    now = get(config, key)
    if isinstance(now, ml_collections.ConfigDict):  # named, not dumped
        return ConfigError(f"config.{key}={value!r}: expected a group of keys; set them with "
                           f"--config.{key}.KEY=VALUE (config.{key} has: "
                           f"{', '.join(sorted(now.keys()))})")
    kind = _KINDS.get(field_type) or f"a {field_type.__name__} ({reason})"
    return ConfigError(f"config.{key}={value!r}: expected {kind} (now {now!r})")
