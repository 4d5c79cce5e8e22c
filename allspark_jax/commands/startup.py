"""A command line's start-up and its one-line errors: the config checked before anything starts
(`validate_or_exit`), the user errors reported as `error: <message>` with exit status 2
(`user_errors`), and `validated_start`, the whole start-up of a command that trains.
"""
from __future__ import annotations

import sys

from allspark_jax import config as config_lib
from allspark_jax import runtime
from allspark_jax.errors import UserError


def validate_or_exit(config) -> None:
    """`config.validate`; a bad key prints its one-line error and exits with status 2."""
    try:
        config_lib.validate(config)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def user_errors() -> tuple[type[Exception], ...]:
    """What a command line reports as one line `error: ...` with exit status 2: a bad config,
    data, checkpoint or weight file, or a missing file. Anything else keeps its traceback."""
    return (UserError, FileNotFoundError)


def validated_start(config) -> None:
    """A command line's start-up: `validate_or_exit`, TensorFlow kept off the accelerators,
    `runtime.start`."""
    validate_or_exit(config)
    runtime.hide_accelerators_from_tensorflow()
    runtime.start(config)
