"""Faults that used to slip through (issue 24): Ctrl-C, a really full disk, a resume on another
device count (two sweeps on one directory: tests/test_sweep_trial_lifetime.py)."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, cpu_env, read_metrics, run_mock_train, tiny_flags
from mixer import config_guard, stop_signal
from mixer import workdir as layout

CONFIG = "--config=" + os.path.join(ROOT, "configs", "cifar100_ti.py:smoke")


def _wait_for_metrics(workdir, proc, timeout=120):
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None and not (
      os.path.exists(path) and os.path.getsize(path) > 0):
    time.sleep(0.05)


def _without_timing(rows):
  return [{k: v for k, v in r.items() if "per_sec" not in k and "seconds" not in k}
          for r in rows]


def test_ctrl_c_saves_stops_and_the_same_command_resumes_bit_exactly(tmp_path):
  flags = tiny_flags(total_steps=200, log_every_steps=1, checkpoint_every_steps=100000,
                     eval_every_steps=100000)
  reference, workdir = str(tmp_path / "reference"), str(tmp_path / "run")
  run_mock_train(reference, *flags)
  proc = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "tests", "mock_train.py"), CONFIG,
       f"--workdir={workdir}", *flags],
      env=cpu_env(1),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
      # As from a terminal: pytest-xdist's workers ignore SIGINT, and an ignored SIGINT is
      # inherited (train.py keeps it ignored, as under nohup).
      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  _wait_for_metrics(workdir, proc)
  proc.send_signal(signal.SIGINT)
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == 0, out[-5000:]
  assert "SIGINT received" in out and "Stopped by SIGINT" in out, out[-5000:]
  assert "Traceback" not in out and "KeyboardInterrupt" not in out
  assert layout.read_run(workdir).status == "stopped"
  saved = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
  assert len(saved) == 1 and 0 < saved[0] < 200
  resumed = run_mock_train(workdir, *flags)
  assert "Resuming from the checkpoint" in resumed.stderr
  assert "bit-exact" not in resumed.stderr  # same device count: nothing to warn of
  assert _without_timing(read_metrics(workdir)) == _without_timing(read_metrics(reference))


def test_second_ctrl_c_aborts_at_once():
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  stop = stop_signal.StopSignal()
  try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)  # the handler runs in this (main) thread at the next bytecode
    assert stop.received
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
  finally:
    stop.restore()
    signal.signal(signal.SIGINT, previous)


def test_resume_on_another_device_count_warns_once_and_is_recorded(tmp_path):
  workdir = str(tmp_path / "run")
  flags = tiny_flags(total_steps=6, log_every_steps=3, checkpoint_every_steps=6,
                     eval_every_steps=100000)
  first = run_mock_train(workdir, *flags, devices=1)
  assert "bit-exact" not in first.stderr
  more = tiny_flags(total_steps=12, log_every_steps=3, checkpoint_every_steps=6,
                    eval_every_steps=100000)
  resumed = run_mock_train(workdir, *more, "--allow_config_change=total_steps", devices=2)
  warnings = [line for line in resumed.stderr.splitlines() if "bit-exact" in line]
  assert len(warnings) == 1 and "on 2 device(s)" in warnings[0], resumed.stderr[-3000:]
  with open(os.path.join(workdir, layout.HISTORY_FILE), encoding="utf-8") as f:
    entries = [json.loads(line) for line in f]
  devices = [e for e in entries if config_guard.DEVICES_KEY in e]
  assert [(e["step"], e["devices"]) for e in devices] == [(0, 1), (6, 2)]
  assert "not bit-exact" in devices[1]["not_bit_exact"]


def _mount_tmpfs(path, size):
  try:
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True, capture_output=True, text=True)
  except (OSError, subprocess.CalledProcessError) as e:
    pytest.skip(f"cannot mount a tmpfs here (needs root): {getattr(e, 'stderr', e)}")


def test_really_full_disk_is_one_disk_full_line_and_leaves_no_partial_checkpoint(tmp_path):
  """A 20 MB tmpfs filled but for 600 KB: the run's files and its first checkpoint (~400 KB)
  fit, its second checkpoint does not."""
  mount = tmp_path / "fs"
  mount.mkdir()
  _mount_tmpfs(mount, "20m")
  try:
    stat = os.statvfs(mount)
    with open(mount / "filler", "wb") as f:
      f.write(b"\0" * (stat.f_bavail * stat.f_frsize - 600 * 1024))
    workdir = str(mount / "run")
    proc = run_mock_train(workdir, *tiny_flags(total_steps=12, checkpoint_every_steps=6,
                                               eval_every_steps=100000), check=False)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1, proc.stderr[-5000:]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr[-5000:]
    # Orbax's E lines, asyncio's and TensorStore's late tracebacks are dropped: one line says it.
    assert "Traceback" not in proc.stderr and not re.search(r"^E\d{4} ", proc.stderr, re.M), (
        proc.stderr[-5000:])
    assert errors[0].startswith(f"error: disk full: {ckpt_dir}/12"), errors[0]
    assert "Saving the checkpoint of step 12" in errors[0]
    assert "the last complete checkpoint (step 6) is kept" in errors[0]
    assert os.listdir(ckpt_dir) == ["6"]  # no partial (checkpoints.TMP_MARKER) directory
    assert layout.read_run(workdir).status == "failed"
  finally:
    subprocess.run(["umount", str(mount)], check=False)
