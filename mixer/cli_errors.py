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
import re
import sys
from typing import Iterator

DEBUG_ENV = "MIXER_DEBUG"
USER_ERRORS = (ValueError, OSError, RuntimeError, FloatingPointError)


def debugging() -> bool:
  """True when MIXER_DEBUG asks for tracebacks."""
  return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


# TensorStore (Orbax's writer) reports ENOSPC as text: `RESOURCE_EXHAUSTED: ... Failed
# writing: "<file>": ... No space left on device [os_error_code='28']`.
_ENOSPC_TEXT = re.compile(rf"No space left on device|os_error_code='?{errno.ENOSPC}\b")
_FAILED_FILE = re.compile(r'(?:Failed writing|local file):? "([^"]+)"')


def _disk_full(e: BaseException) -> OSError | None:
  """The ENOSPC OSError of e's chain; else, for an ENOSPC told as text (the deepest such
  error of the chain), an OSError made from it with the file it names; or None."""
  seen, told = set(), None
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
      return e
    if _ENOSPC_TEXT.search(str(e)):
      told = e
    e = e.__cause__ or e.__context__
  if told is None:
    return None
  files = _FAILED_FILE.findall(str(told))
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), files[-1] if files else None)


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
  """`app.run(main, flags_parser=cli_errors.parse_flags)`: a bad flag, a missing config file,
  a config-file argument the file refuses (`--config=PATH:foo`) or an unknown `--config.key`
  (`unknown config key 'a.b' (did you mean 'a.c'?)`) is one `error:` line (exit status 2),
  not a traceback."""
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
    text = _config_file_error(e) or _unknown_config_key(e, argv)
    if text is None:
      text = message(e)
      if isinstance(e, flags.Error):
        text += " (--helpshort lists the flags)"
    sys.stderr.write(f"error: {text}\n")
    sys.exit(2)


def _innermost(e: BaseException) -> BaseException:
  """The first exception of the __cause__/__context__ chain (the one raised first)."""
  seen = {id(e)}
  while (inner := e.__cause__ or e.__context__) is not None and id(inner) not in seen:
    seen.add(id(inner))
    e = inner
  return e


_CONFIG_FILE_ERROR = "Error whilst parsing config file"


def _config_file_error(e: BaseException) -> str | None:
  """`--config=PATH:ARG: <message>` for a ValueError of the config file's get_config (e.g.
  an unknown ARG), which ml_collections re-raises with the whole traceback in its message."""
  text = str(e)
  if _CONFIG_FILE_ERROR not in text:
    return None
  inner = _innermost(e)
  if not isinstance(inner, ValueError) or _CONFIG_FILE_ERROR in str(inner):
    return None  # a bug in the config file (TypeError, ...): its traceback is the message
  flag = text.split(_CONFIG_FILE_ERROR, 1)[0].strip().rstrip(":").removeprefix("flag ")
  return f"{flag or '--config'}: {message(inner)}"


def _unknown_config_key(e: BaseException, argv: list[str]) -> str | None:
  """`unknown config key 'a.b' (did you mean 'a.c'?)` for a `--config.a.b=...` naming no key.

  ml_collections raises the KeyError of the missing name (wrapped, with its own suggestion)."""
  inner = _innermost(e)
  if not isinstance(e, (AttributeError, KeyError)) or not isinstance(inner, KeyError):
    return None
  name = inner.args[0] if inner.args else None
  key = _override_path(name, argv) if isinstance(name, str) else None
  if key is None:
    return None
  suggestion = re.search(r'Did you mean "([^"]+)" instead of', str(e))
  if suggestion is None:
    return f"unknown config key {key!r} (the keys are declared in mixer/config_lib.py)"
  parent = key.rpartition(".")[0]
  close = f"{parent}.{suggestion[1]}" if parent else suggestion[1]
  return f"unknown config key {key!r} (did you mean {close!r}?)"


def _override_path(name: str, argv: list[str]) -> str | None:
  """'a.b' for `name` 'b' of the first `--config.a.b[.c]=...` in argv holding it."""
  for arg in argv:
    match = re.match(r"--?(?:no)?config\.([^=]+)", arg)
    parts = match[1].split(".") if match else []
    if name in parts:
      return ".".join(parts[:parts.index(name) + 1])
  return None
