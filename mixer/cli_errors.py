"""How a script ends on an error: one `error: ...` line for the user's mistakes, the
traceback and a line asking for a report for the library's bugs.

  from mixer import cli_errors

  with cli_errors.user_errors():        # in a script's main(), around the work
    step, params = restore(...)

Inside the block:
- a `mixer.errors.UserError` (a config value, workdir, checkpoint, dataset the user can fix)
  or an OSError (a missing file, a permission, a full disk), or any error caused by a full
  disk, becomes `sys.exit("error: <message>")`: the message on stderr, no traceback, exit
  status 1;
- any other exception (ValueError, KeyError, TypeError, RuntimeError... raised by the library
  itself) is a bug: its traceback is printed, then one line
  `error: this is a bug in mixer, not in your input; please report it with the traceback
  above (<type>: <message>)`, exit status 1;
- KeyboardInterrupt, SystemExit and absl's app.UsageError pass through unchanged.
`user_errors(prefix="sweep.py")` writes `sweep.py: <message>` instead of `error: <message>`.

`message(e)` is the text after `error: `: str(e) (the type's name when that is empty; a
message that lists problems on lines of its own keeps them), except that an error caused
by a full disk (an OSError with errno ENOSPC, itself or anywhere in its __cause__/__context__
chain) reads `disk full: <filename> (No space left on device)` (the filename when the error
has one), followed by `: <message>` when the ENOSPC error was wrapped in another.

`parse_flags`, absl's flags parser for the scripts, ends a bad flag, a missing or refusing
config file or an unknown `--config.key` with one `error:` line (exit status 2).

MIXER_DEBUG=1 in the environment (any value but empty or "0") re-raises instead, with the
full traceback.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys
import traceback
from typing import Iterator

from mixer import errors

DEBUG_ENV = "MIXER_DEBUG"
USER_ERRORS = (errors.UserError, OSError)


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


def is_user_error(e: BaseException) -> bool:
  """A UserError, an OSError, or an error caused by a full disk: the user's to fix."""
  return isinstance(e, USER_ERRORS) or _disk_full(e) is not None


def bug_line(e: BaseException) -> str:
  """The text after `error: ` for a bug: what to do, and the exception's type and first line."""
  kind = type(e).__qualname__
  if type(e).__module__ not in ("builtins", "__main__"):
    kind = f"{type(e).__module__}.{kind}"
  first = (str(e).strip().splitlines() or [""])[0]
  what = f"{kind}: {first}" if first else kind
  return ("this is a bug in mixer, not in your input; please report it with the traceback "
          f"above ({what})")


class _DiskFullLogs(logging.Filter):
  """Drops log records about a full disk (Orbax and asyncio log the ENOSPC with tracebacks
  before, and at exit after, the one `disk full:` line that says it all)."""

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    if error is not None and _disk_full(error) is not None:
      return False
    return not _ENOSPC_TEXT.search(record.getMessage())


def _quiet_disk_full_logs() -> None:
  """Puts _DiskFullLogs on the root logger's handlers (where every logger's records end),
  once; it stays for the process's life, since asyncio logs its lost errors at exit. Also
  drops the `Event loop is closed` tracebacks of TensorStore writes that complete after the
  failed save's event loop ended (their callbacks report through sys.unraisablehook)."""
  for handler in logging.getLogger().handlers:
    if not any(isinstance(f, _DiskFullLogs) for f in handler.filters):
      handler.addFilter(_DiskFullLogs())
  if not getattr(sys.unraisablehook, "drops_closed_loop_errors", False):
    sys.unraisablehook = _without_closed_loop_errors(sys.unraisablehook)


def _without_closed_loop_errors(hook):
  def unraisablehook(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
      return  # a late callback of an ended event loop: nothing left to tell or to do
    hook(unraisable)
  unraisablehook.drops_closed_loop_errors = True
  return unraisablehook


@contextlib.contextmanager
def user_errors(prefix: str = "error") -> Iterator[None]:
  """Ends the script on an exception raised inside (see the module docstring): a user error
  as `sys.exit(f"{prefix}: {message(e)}")`, a bug as its traceback and `{prefix}: <bug_line>`.
  Log records about a full disk are dropped (but under MIXER_DEBUG)."""
  if not debugging():
    _quiet_disk_full_logs()
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  # sorted into user errors and bugs
    if debugging() or _is_usage_error(e):
      raise
    if is_user_error(e):
      sys.exit(f"{prefix}: {message(e)}")
    traceback.print_exc()
    sys.exit(f"{prefix}: {bug_line(e)}")


def _is_usage_error(e: BaseException) -> bool:
  """absl's app.UsageError: absl.app.run prints the usage for it."""
  from absl import app  # pylint: disable=g-import-not-at-top
  return isinstance(e, app.UsageError)


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
