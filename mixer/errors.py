"""The project's exceptions for mistakes a user can act on.

Raise a `UserError` subclass where the user can fix the cause (a config value, a workdir, a
file, a flag). Entry scripts run inside `cli_errors.user_errors()`, which turns these (and
OSError, e.g. a full disk or a missing file) into one `error: <message>` line; any other
exception is a bug in the library and keeps its traceback, followed by a line asking for a
report. Each subclass also derives from the built-in type callers used to catch before it
existed (ValueError, FileNotFoundError, ...), so `except ValueError` still works.

  from mixer import errors
  raise errors.ConfigError(f"config.learning_rate={lr} is invalid: must be > 0")
"""
from __future__ import annotations


class UserError(Exception):
  """A mistake the user can act on: its message says what is wrong and what to do."""


class ConfigError(UserError, ValueError):
  """A config value, config file argument or flag that cannot be used."""


class WorkdirError(UserError, ValueError):
  """A workdir that is not (or not the right kind of) run directory, or is damaged."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or directory the user named (or a run needs) does not exist."""


class CheckpointError(UserError, ValueError):
  """A checkpoint that is missing, corrupt, or does not fit the model."""


class DataError(UserError, ValueError):
  """A dataset, split or input image that cannot be read as asked."""


class SweepError(UserError, ValueError):
  """A sweep definition or sweep directory that cannot be run or summarised."""


class BusyError(UserError, RuntimeError):
  """Another live process holds the workdir (or trial) this one needs."""


class DivergedError(UserError, FloatingPointError):
  """Training produced a non-finite loss: lower the learning rate or check the data."""
