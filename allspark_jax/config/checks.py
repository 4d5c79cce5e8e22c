"""The checks a config key's value goes through, each raising one line that names the key.

`error(key, value, expected)` is the one format of a bad value: `config.KEY=VALUE: expected ...`
(a DataError for `data.*` keys, else a ConfigError). `one_of` and `in_range` are the enum and range
checks that `validation` and the experiments' own keys use.
"""
from __future__ import annotations

from typing import Any

from allspark_jax.errors import ConfigError, DataError


def get(config, key: str):
    """The value of dotted `key` ('train.epochs') in `config`."""
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def set_value(config, key: str, value) -> None:
    """Sets dotted `key` of `config` to `value`."""
    *parents, leaf = key.split(".")
    node = get(config, ".".join(parents)) if parents else config
    node[leaf] = value


def error(key: str, value: Any, expected: str, data: bool = False) -> Exception:
    """`config.KEY=VALUE: expected EXPECTED` as a DataError (data.* keys, or `data`) or ConfigError."""
    cls = DataError if key.startswith("data.") or data else ConfigError
    return cls(f"config.{key}={value!r}: expected {expected}")


def one_of(config, key: str, allowed) -> None:
    value = get(config, key)
    if value not in allowed:
        raise error(key, value, "one of " + ", ".join(repr(a) for a in allowed))


def in_range(config, key: str, lo=None, hi=None, *, integer=False, lo_open=False,
             hi_open=False, optional=False) -> None:
    """A number (`integer`: an integral one) within the bounds; None too when `optional`."""
    value = get(config, key)
    if value is None and optional:
        return
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if integer:
        ok = ok and float(value) == int(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        bounds = []
        if lo is not None:
            bounds.append(f"{'>' if lo_open else '>='} {lo}")
        if hi is not None:
            bounds.append(f"{'<' if hi_open else '<='} {hi}")
        raise error(key, value, kind + (" " + " and ".join(bounds) if bounds else "")
                    + (" or None" if optional else ""))
