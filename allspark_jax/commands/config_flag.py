"""The `--config` flag of the commands: a config file, or a shipped config by name, with its
optional argument and `--config.KEY=VALUE` overrides of any key.

    --config configs/pascal.py:1_16 --config.optim.lr=0.002   # also: --config pascal:1_16

`define` registers it (ml_collections' config flag, loading through `config.load_config`, the
config locked: an override of a key that does not exist is refused). Before the overrides are
applied, two of them change the loaded config:
  * `--config.method=M` switches the method (`config.unread.with_method`): the keys that M does not
    read go back to their configs/default.py values unless the command line sets them too, so
    `--config configs/demo.py --config.method=supervised` runs the demo's keys that every method
    reads (`configs/demo.py:supervised` gives the release's supervised hyperparameters instead);
  * a key that holds a group of keys or a name (`NAME_OR_GROUP_KEYS`: `model.backbone`, a MiT
    preset or a dict of its fields) takes a name: `--config.model.backbone=b0` on the demo.
`parse_flags` is the commands' flag parser: a bad config file, key or value is one line on stderr
and exit status 2.
"""
from __future__ import annotations

import re
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags

from allspark_jax import config as config_lib
from allspark_jax import method as method_lib
from allspark_jax.config.checks import get

# Keys whose value is a name or a group of keys (a preset or its fields).
NAME_OR_GROUP_KEYS = ("model.backbone",)
_OVERRIDE = re.compile(r"^-{1,2}(no)?config\.([\w.]+)(=(.*))?$")


def overrides(argv) -> dict[str, str | None]:
    """{dotted key: its raw value (None when it is the next argument or a boolean)} of the
    `--config.KEY[=VALUE]` arguments in `argv`."""
    out = {}
    for i, arg in enumerate(argv):
        m = _OVERRIDE.match(arg)
        if m:
            value = m.group(4)
            if value is None and m.group(1) is None and i + 1 < len(argv):
                value = argv[i + 1]
            out[m.group(2)] = value
    return out


def prepare(config: ml_collections.ConfigDict, argv) -> ml_collections.ConfigDict:
    """The loaded `config` ready for the overrides of `argv` (module docstring)."""
    given = overrides(argv)
    method = given.get("method")
    if method in method_lib.METHODS and method != config.method:
        config = config_lib.with_method(config, method, keep=given)
    for key in NAME_OR_GROUP_KEYS:
        value = given.get(key)
        *parents, leaf = key.split(".")
        parent = get(config, ".".join(parents))
        if (value is not None and isinstance(parent[leaf], ml_collections.ConfigDict)
                and re.fullmatch(r"\w+", value)):
            del parent[leaf]  # a group of keys cannot take a string: the key holds the name
            parent[leaf] = value
    return config


class _Parser(flags.ArgumentParser):
    """`SOURCE[:ARG]` -> the locked ConfigDict, prepared for the command line's overrides."""

    def __init__(self, argv):
        self._argv = argv

    def parse(self, argument):
        if isinstance(argument, ml_collections.ConfigDict):
            return argument
        argv = flags.FLAGS.read_flags_from_files(self._argv(), force_gnu=False)
        config = prepare(config_lib.load_config(argument), argv)
        config.lock()
        return config

    def flag_type(self):
        return "config object"


def define(name: str = "config", default: str | None = None,
           help_string: str = "A config file, or a shipped config by name, optionally with an "
           "argument: configs/pascal.py:1_16. Override keys with --config.KEY=VALUE.",
           flag_values=flags.FLAGS, sys_argv=None):
    """Registers the config flag `name` (module docstring); `sys_argv`: the command line it reads
    (default: sys.argv at parse time)."""
    holder = config_flags.DEFINE_config_file(name, None, help_string, flag_values=flag_values,
                                             lock_config=True, sys_argv=sys_argv)
    flag_values[name].parser = _Parser(lambda: sys.argv if sys_argv is None else sys_argv)
    if default is not None:
        flag_values.set_default(name, default)
    return holder


def parse_flags(argv, flag_values=flags.FLAGS):
    """absl's flag parsing; a bad config file, key or value is one line on stderr, exit status 2.

    The config file is loaded and the `--config.KEY` overrides' keys checked here first, so the
    error names the key and the keys allowed there (ml_collections would raise an AttributeError).
    """
    config = None
    try:
        argv = flag_values.read_flags_from_files(argv, force_gnu=False)
        for i, arg in enumerate(argv):
            name, eq, value = arg.partition("=")
            if name in ("-config", "--config"):
                spec = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
                config = prepare(config_lib.load_config(spec), argv) if spec else None
        keys = list(overrides(argv))
        if keys and config is None:
            raise flags.Error(f"--config.{keys[0]} overrides a key of a config file; expected "
                              "--config FILE before it")
        if config is not None:
            config_lib.check_override_keys(config, keys)
        return flag_values(argv)
    except flags.Error as e:
        message = str(e).strip().split("\n")[0]
        bad_value = re.match(r"flag --config\.([\w.]+)=(.*?): (.*)", message)
        if bad_value and config is not None:
            message = str(config_lib.override_value_error(config, *bad_value.groups()))
    except ValueError as e:  # ConfigError, or get_config(arg) refusing its argument
        message = " ".join(str(e).split())
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
