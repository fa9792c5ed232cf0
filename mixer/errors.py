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

import errno


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


# A missing file is damage to the step; other OS errors, and these texts, blame the machine.
_MISSING_ERRNOS = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR)
_ENVIRONMENT_TEXT = ("resource_exhausted", "permission_denied", "unavailable:",
                     "deadline_exceeded", "out of memory", "cannot allocate memory",
                     "no space left", "disk quota exceeded", "input/output error",
                     "permission denied", "read-only file system", "too many open files",
                     "stale file handle")


class MachineError(UserError, RuntimeError):
  """Reading or writing a checkpoint failed because of the machine (memory, disk, I/O,
  permissions), not because of the checkpoint: the same step works once that is fixed."""


def environment_error(error: BaseException) -> BaseException | None:
  """The error (or one it was raised from) that blames the machine, not the files; or None.

  MemoryError, an OSError other than a missing file/directory, or an error whose text says
  out of memory/disk, I/O error or permission denied (TensorStore reports OS errors as
  ValueError with such text).
  """
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, MemoryError):
      return error
    missing = isinstance(error, (FileNotFoundError, NotADirectoryError, IsADirectoryError))
    if isinstance(error, OSError) and not missing and error.errno not in _MISSING_ERRNOS:
      return error
    text = str(error).lower()
    if any(marker in text for marker in _ENVIRONMENT_TEXT):
      return error
    error = error.__cause__ or error.__context__
  return None
