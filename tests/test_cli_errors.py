"""cli_errors: a user error ends a script with one `error:` line; MIXER_DEBUG=1 re-raises."""
import errno
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from mixer import cli_errors

SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from mixer import cli_errors
with cli_errors.user_errors():
  try:
    raise OSError(28, "No space left on device", "/data/run/checkpoints/6")
  except OSError as e:
    raise RuntimeError("The checkpoint at step 6 could not be written") from e
"""


def test_user_errors_exit_with_one_line(monkeypatch):
  monkeypatch.delenv(cli_errors.DEBUG_ENV, raising=False)
  for error in (ValueError("bad value"), FileNotFoundError("No config.json in /x"),
                PermissionError(13, "Permission denied", "/x"), RuntimeError("unreadable"),
                FloatingPointError("nan")):
    with pytest.raises(SystemExit) as exit_info:
      with cli_errors.user_errors():
        raise error
    assert exit_info.value.code == f"error: {error}"
  with pytest.raises(SystemExit, match="^sweep.py: bad$"):
    with cli_errors.user_errors(prefix="sweep.py"):
      raise ValueError("bad")
  with pytest.raises(TypeError):  # a bug, not a user error: the traceback stays
    with cli_errors.user_errors():
      raise TypeError("bug")


@pytest.mark.parametrize("value", ["1", "yes"])
def test_mixer_debug_re_raises(monkeypatch, value):
  monkeypatch.setenv(cli_errors.DEBUG_ENV, value)
  with pytest.raises(RuntimeError, match="unreadable"):
    with cli_errors.user_errors():
      raise RuntimeError("unreadable")
  monkeypatch.setenv(cli_errors.DEBUG_ENV, "0")
  with pytest.raises(SystemExit):
    with cli_errors.user_errors():
      raise RuntimeError("unreadable")


def test_disk_full_names_the_file_even_when_wrapped():
  full = OSError(errno.ENOSPC, "No space left on device", "/data/ckpt/6")
  assert cli_errors.message(full) == "disk full: /data/ckpt/6 (No space left on device)"
  try:
    try:
      raise full
    except OSError as e:
      raise RuntimeError("could not save step 6") from e
  except RuntimeError as wrapped:
    assert cli_errors.message(wrapped) == (
        "disk full: /data/ckpt/6 (No space left on device): could not save step 6")
  assert cli_errors.message(OSError(errno.ENOSPC, "No space left on device")) == (
      "disk full (No space left on device)")
  assert cli_errors.message(OSError(errno.EACCES, "Permission denied", "/x")) == (
      "[Errno 13] Permission denied: '/x'")
  assert cli_errors.message(RuntimeError()) == "RuntimeError"


def test_script_prints_one_line_without_traceback_unless_debugging(tmp_path):
  script = tmp_path / "fails.py"
  script.write_text(SCRIPT.format(root=ROOT))
  env = {k: v for k, v in os.environ.items() if k != cli_errors.DEBUG_ENV}
  proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                        timeout=120, env=env)
  assert proc.returncode == 1
  assert proc.stderr == ("error: disk full: /data/run/checkpoints/6 (No space left on device): "
                         "The checkpoint at step 6 could not be written\n")
  proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                        timeout=120, env=dict(env, MIXER_DEBUG="1"))
  assert proc.returncode == 1
  assert "Traceback (most recent call last)" in proc.stderr
  assert "RuntimeError: The checkpoint at step 6 could not be written" in proc.stderr
