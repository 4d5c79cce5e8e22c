"""Every error the package raises on purpose: the bottom layer, which imports nothing of the package.

A `UserError` is a problem with what the user gave (a config key, a data file, a weight file, a
checkpoint): commands report it as one line `error: <message>` with exit status 2, and its message
names the key, file or option and what was expected. Anything else is a bug or a failure of the
machine and keeps its traceback.
"""


class UserError(ValueError):
    """A bad input the user can fix; the message names the key, file or option and what is allowed."""


class ConfigError(UserError):
    """A config key whose value is not allowed; the message names the key and what is allowed."""


class DataError(UserError):
    """A bad data root, list, file or option; the message names the culprit and what was expected."""


class WeightImportError(UserError):
    """A weight file that cannot be read, or whose keys or shapes do not fit the model."""


class PthFormatError(WeightImportError):
    """The file is not a PyTorch zip checkpoint that can be (safely) read."""


class CheckpointError(UserError):
    """A checkpoint spec that names nothing restorable; the message says what exists."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint holds another train state than the template (the message: what differs)."""


class CheckpointReadError(CheckpointError):
    """Orbax failed to read a checkpoint that fits the template (damaged or missing files)."""


class ReferenceFileError(UserError):
    """A reference file lacks what every reference file holds (meta_json, state0/*, inputs/*)."""


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or state; the message names the step and the values."""
