"""Errors a user can act on end a script with one `error: ...` line instead of a traceback.

  from mixer import cli_errors

  with cli_errors.user_errors():        # in a script's main(), around the work
    step, params = restore(...)

Inside the block, USER_ERRORS (ValueError, OSError and its subclasses such as
FileNotFoundError and PermissionError, RuntimeError, FloatingPointError) become
`sys.exit("error: <message>")`: the message on stderr, no traceback, exit status 1. Other
exceptions (KeyboardInterrupt, SystemExit, bugs such as TypeError or KeyError) pass through
unchanged. `user_errors(prefix="sweep.py")` writes `sweep.py: <message>` instead.

`message(e)` is the text after `error: `: str(e) (the type's name when that is empty; a
message that lists problems on lines of its own keeps them), except that an error caused
by a full disk (an OSError with errno ENOSPC, itself or anywhere in its __cause__/__context__
chain) reads `disk full: <filename> (No space left on device)` (the filename when the error
has one), followed by `: <message>` when the ENOSPC error was wrapped in another.

MIXER_DEBUG=1 in the environment (any value but empty or "0") re-raises instead, with the
full traceback.
"""
from __future__ import annotations

import contextlib
import errno
import os
import sys
from typing import Iterator

DEBUG_ENV = "MIXER_DEBUG"
USER_ERRORS = (ValueError, OSError, RuntimeError, FloatingPointError)


def debugging() -> bool:
  """True when MIXER_DEBUG asks for tracebacks."""
  return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def _disk_full(e: BaseException) -> OSError | None:
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
      return e
    e = e.__cause__ or e.__context__
  return None


def message(e: BaseException) -> str:
  """The text after `error: ` (see the module docstring)."""
  text = str(e).strip() or type(e).__name__
  full = _disk_full(e)
  if full is None:
    return text
  reason = full.strerror or os.strerror(errno.ENOSPC)
  line = f"disk full: {full.filename} ({reason})" if full.filename else f"disk full ({reason})"
  return line if full is e else f"{line}: {text}"


@contextlib.contextmanager
def user_errors(prefix: str = "error") -> Iterator[None]:
  """Turns USER_ERRORS raised inside into `sys.exit(f"{prefix}: {message(e)}")`."""
  try:
    yield
  except USER_ERRORS as e:
    if debugging():
      raise
    sys.exit(f"{prefix}: {message(e)}")


def _missing_config_file(argv: list[str]) -> str | None:
  """The --config=PATH[:ARG] file named in argv when it does not exist."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      value = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
    else:
      continue
    path = value.split(":", 1)[0]
    if path and not os.path.exists(path):
      return path
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """`app.run(main, flags_parser=cli_errors.parse_flags)`: a bad flag, a missing config file
  or an unknown `--config.key` is one `error:` line (exit status 2), not a traceback."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  missing = _missing_config_file(argv)
  if missing and not debugging():
    sys.stderr.write(f"error: config file {missing} does not exist (--config=PATH[:ARG]).\n")
    sys.exit(2)
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  # flags and config files raise anything
    if debugging():
      raise
    text = message(e)
    if isinstance(e, flags.Error):
      text += " (--helpshort lists the flags)"
    sys.stderr.write(f"error: {text}\n")
    sys.exit(2)
