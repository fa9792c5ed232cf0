"""cli_errors: a user error ends a script with one `error:` line, a library bug keeps its
traceback and says so; MIXER_DEBUG=1 re-raises."""
import errno
import os
import subprocess
import sys

import pytest
from absl import app

from conftest import ROOT
from mixer import cli_errors, errors

SCRIPT = """
import logging
import sys
sys.path.insert(0, {root!r})
from mixer import cli_errors

class LateCallback:  # what TensorStore's writes do once the failed save's event loop ended
  def __del__(self):
    raise RuntimeError("Event loop is closed")

logging.basicConfig(format="%(levelname)s %(message)s")
with cli_errors.user_errors():
  logging.warning("kept: an unrelated warning")
  try:
    raise OSError(28, "No space left on device", "/data/run/checkpoints/6/x")
  except OSError:
    logging.exception("Orbax: a write failed")  # dropped: its traceback tells a full disk
  logging.error("RESOURCE_EXHAUSTED: [os_error_code=28] No space left on device")  # dropped
  LateCallback()
  try:
    raise OSError(28, "No space left on device", "/data/run/checkpoints/6")
  except OSError as e:
    raise RuntimeError("The checkpoint at step 6 could not be written") from e
"""

# A library function failing: a user error (ConfigError) or a bug (a plain ValueError/KeyError).
LIBRARY_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from mixer import cli_errors, errors

def restore(kind):
  if kind == "user":
    raise errors.ConfigError("config.learning_rate=-1.0 is invalid: must be > 0.")
  if kind == "value":
    raise ValueError("shapes (3,) and (4,) do not match")
  return {{}}["params"]

with cli_errors.user_errors():
  restore(sys.argv[1])
"""
BUG_LINE = ("error: this is a bug in mixer, not in your input; please report it with the "
            "traceback above")
USER_ERRORS = [
    errors.ConfigError("config.batch_size=0 is invalid: must be >= 1."),
    errors.WorkdirError("/x is not a run directory"),
    errors.MissingFileError("No config.json in /x"),
    errors.CheckpointError("step 6 is corrupt"), errors.DataError("Unknown split 'tset'"),
    errors.SweepError("no trials"), errors.BusyError("/x is in use by pid 7"),
    errors.DivergedError("loss is nan at step 6"), FileNotFoundError("No config.json in /x"),
    PermissionError(13, "Permission denied", "/x"), IsADirectoryError(21, "Is a directory", "/x"),
]


@pytest.mark.parametrize("error", USER_ERRORS, ids=lambda e: type(e).__name__)
def test_user_errors_exit_with_one_line(monkeypatch, capsys, error):
  monkeypatch.delenv(cli_errors.DEBUG_ENV, raising=False)
  with pytest.raises(SystemExit) as exit_info:
    with cli_errors.user_errors():
      raise error
  assert exit_info.value.code == f"error: {error}"
  assert capsys.readouterr().err == ""  # no traceback


def test_prefix_replaces_error(monkeypatch):
  monkeypatch.delenv(cli_errors.DEBUG_ENV, raising=False)
  with pytest.raises(SystemExit, match="^sweep.py: bad$"):
    with cli_errors.user_errors(prefix="sweep.py"):
      raise errors.SweepError("bad")


@pytest.mark.parametrize("error,shown", [
    (ValueError("bad value"), "ValueError: bad value"), (KeyError("params"), "KeyError: 'params'"),
    (TypeError("bug"), "TypeError: bug"), (RuntimeError("unreadable"), "RuntimeError: unreadable"),
    (FloatingPointError("nan"), "FloatingPointError: nan"), (AssertionError(), "AssertionError"),
    (ValueError("first line\nsecond line"), "ValueError: first line"),
])
def test_library_bugs_keep_the_traceback_and_say_they_are_bugs(monkeypatch, capsys, error, shown):
  monkeypatch.delenv(cli_errors.DEBUG_ENV, raising=False)
  with pytest.raises(SystemExit) as exit_info:
    with cli_errors.user_errors():
      raise error
  assert exit_info.value.code == f"{BUG_LINE} ({shown})"
  stderr = capsys.readouterr().err
  assert stderr.startswith("Traceback (most recent call last)") and f"\n{shown}" in stderr


def test_disk_full_told_as_text_is_a_user_error_whatever_its_type(monkeypatch):
  monkeypatch.delenv(cli_errors.DEBUG_ENV, raising=False)
  told = ValueError('RESOURCE_EXHAUSTED: Failed writing: "/ckpt/6/d/0": No space left on device '
                    "[os_error_code='28']")  # how TensorStore (Orbax) reports it
  with pytest.raises(SystemExit) as exit_info:
    with cli_errors.user_errors():
      raise told
  assert exit_info.value.code.startswith("error: disk full: /ckpt/6/d/0 (No space left on device)")


@pytest.mark.parametrize("error", [KeyboardInterrupt(), SystemExit(3), app.UsageError("usage")],
                         ids=lambda e: type(e).__name__)
def test_interrupts_exits_and_usage_errors_pass_through(monkeypatch, error):
  monkeypatch.delenv(cli_errors.DEBUG_ENV, raising=False)
  with pytest.raises(type(error)) as info:
    with cli_errors.user_errors():
      raise error
  assert info.value is error


@pytest.mark.parametrize("value", ["1", "yes"])
def test_mixer_debug_re_raises(monkeypatch, value):
  monkeypatch.setenv(cli_errors.DEBUG_ENV, value)
  with pytest.raises(errors.CheckpointError, match="unreadable"):
    with cli_errors.user_errors():
      raise errors.CheckpointError("unreadable")
  with pytest.raises(KeyError, match="params"):  # a bug: re-raised too, with no bug line
    with cli_errors.user_errors():
      raise KeyError("params")
  monkeypatch.setenv(cli_errors.DEBUG_ENV, "0")
  with pytest.raises(SystemExit, match="^error: unreadable$"):
    with cli_errors.user_errors():
      raise errors.CheckpointError("unreadable")


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
  """...and drops the log records and late event-loop errors that tell the same full disk."""
  script = tmp_path / "fails.py"
  script.write_text(SCRIPT.format(root=ROOT))
  env = {k: v for k, v in os.environ.items() if k != cli_errors.DEBUG_ENV}
  proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                        timeout=120, env=env)
  assert proc.returncode == 1
  assert proc.stderr == ("WARNING kept: an unrelated warning\n"
                         "error: disk full: /data/run/checkpoints/6 (No space left on device): "
                         "The checkpoint at step 6 could not be written\n")
  proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                        timeout=120, env=dict(env, MIXER_DEBUG="1"))
  assert proc.returncode == 1
  assert "Traceback (most recent call last)" in proc.stderr
  assert "RuntimeError: The checkpoint at step 6 could not be written" in proc.stderr
  assert "Orbax: a write failed" in proc.stderr and "Event loop is closed" in proc.stderr


def _run(script, *args, debug=False):
  env = {k: v for k, v in os.environ.items() if k != cli_errors.DEBUG_ENV}
  if debug:
    env[cli_errors.DEBUG_ENV] = "1"
  return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                        timeout=120, env=env, cwd=ROOT)


def test_script_user_error_is_one_line_and_library_bug_is_traceback_then_bug_line(tmp_path):
  script = tmp_path / "library.py"
  script.write_text(LIBRARY_SCRIPT.format(root=ROOT))
  proc = _run(script, "user")
  assert proc.returncode == 1
  assert proc.stderr == "error: config.learning_rate=-1.0 is invalid: must be > 0.\n"
  for kind, shown in (("value", "ValueError: shapes (3,) and (4,) do not match"),
                      ("key", "KeyError: 'params'")):
    proc = _run(script, kind)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):", proc.stderr
    assert "in restore" in proc.stderr and lines[-2] == shown  # the traceback, whole
    assert lines[-1] == f"{BUG_LINE} ({shown})"
    debug = _run(script, kind, debug=True)
    assert debug.returncode == 1 and debug.stderr.splitlines()[-1] == shown
    assert "this is a bug" not in debug.stderr


@pytest.mark.parametrize("script", ["train.py", "evaluate.py", "predict.py", "export.py",
                                    "sweep.py"])
def test_every_script_parses_flags_through_cli_errors(script):
  proc = _run(os.path.join(ROOT, script), "--workdir=/nonexistent", "--no_such_flag=1")
  assert proc.returncode == 2
  assert proc.stderr.splitlines()[-1] == (
      "error: Unknown command line flag 'no_such_flag' (--helpshort lists the flags)")
  assert "Traceback" not in proc.stderr and "FATAL" not in proc.stderr


@pytest.mark.parametrize("script,args", [("evaluate.py", []), ("predict.py", ["image.png"]),
                                         ("export.py", ["--out=x.npz"])])
def test_every_script_runs_its_work_inside_user_errors(tmp_path, script, args):
  workdir = tmp_path / "no_run"
  proc = _run(os.path.join(ROOT, script), f"--workdir={workdir}", *args)
  errors_ = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert len(errors_) == 1 and str(workdir) in errors_[0]
