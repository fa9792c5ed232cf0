"""A run's workdir is guarded: one writer (lock.json) and one config (config_guard)."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import tiny_config
from mixer import config_guard, train_lib, workdir_lock
from mixer import workdir as layout


def _write_lock(workdir, **info):
  os.makedirs(workdir, exist_ok=True)
  base = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": "then",
          "heartbeat": time.time()}
  with open(os.path.join(workdir, layout.LOCK_FILE), "w", encoding="utf-8") as f:
    json.dump({**base, **info}, f)


@pytest.fixture
def live_pid():
  proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  yield proc.pid
  proc.kill()
  proc.wait()


@pytest.fixture
def dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_lock_names_its_holder_and_is_released(tmp_path):
  lock = workdir_lock.WorkdirLock(str(tmp_path))
  lock.acquire()
  info = workdir_lock.read_lock(str(tmp_path))
  assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
  before = info["heartbeat"]
  time.sleep(0.01)
  lock.heartbeat()
  assert workdir_lock.read_lock(str(tmp_path))["heartbeat"] > before
  lock.release()
  assert not os.path.exists(tmp_path / layout.LOCK_FILE)


def test_live_holder_refuses_a_second_writer(tmp_path, live_pid):
  _write_lock(str(tmp_path), pid=live_pid)
  with pytest.raises(workdir_lock.WorkdirLocked, match=f"pid {live_pid} on {socket.gethostname()}"):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  assert workdir_lock.read_lock(str(tmp_path))["pid"] == live_pid  # untouched


def test_dead_holder_on_this_host_is_taken_over(tmp_path, dead_pid, caplog):
  _write_lock(str(tmp_path), pid=dead_pid)
  lock = workdir_lock.WorkdirLock(str(tmp_path))
  lock.acquire()
  assert workdir_lock.read_lock(str(tmp_path))["pid"] == os.getpid()
  assert "stale lock" in caplog.text
  lock.release()


def test_other_host_is_stale_only_after_its_heartbeat_ages(tmp_path):
  now = time.time()
  fresh = {"host": "node-7", "pid": 1, "heartbeat": now - 60}
  old = {"host": "node-7", "pid": 1, "heartbeat": now - workdir_lock.STALE_AFTER_S - 1}
  assert workdir_lock.holder_alive(fresh, now) and not workdir_lock.holder_alive(old, now)
  _write_lock(str(tmp_path), **fresh)
  with pytest.raises(workdir_lock.WorkdirLocked, match="node-7"):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  _write_lock(str(tmp_path), **old)
  workdir_lock.WorkdirLock(str(tmp_path)).acquire()  # a requeued job takes over its own run


def test_train_refuses_a_locked_workdir_before_reading_data(tmp_path, live_pid):
  workdir = str(tmp_path / "run")
  _write_lock(workdir, pid=live_pid)
  start = time.time()
  # No mock data: reaching the data loader would fail with another error.
  with pytest.raises(workdir_lock.WorkdirLocked, match=f"pid {live_pid}"):
    train_lib.train_and_evaluate(tiny_config(data_dir=str(tmp_path / "nodata")), workdir)
  assert time.time() - start < 30


def test_config_differences_compare_new_keys_at_their_defaults(tmp_path):
  current = config_guard.as_json(tiny_config())
  saved = json.loads(json.dumps(current))
  del saved["random_erasing"]  # a key added to the code after the run started
  del saved["model"]["token_mixing"]
  layout.write_config(str(tmp_path), saved)

  def differences():  # as config_guard.check reads the saved config
    return config_guard.differences(config_guard.as_json(layout.load_config(str(tmp_path))),
                                    current)

  assert differences() == {}
  saved["learning_rate"] = current["learning_rate"] * 2
  saved["model"]["hidden_dim"] = 7
  layout.write_config(str(tmp_path), saved)
  assert set(differences()) == {"learning_rate", "model.hidden_dim"}
  current["random_erasing"] = 0.5
  current["model"]["token_mixing"] = "batched"
  assert differences()["random_erasing"] == (0.0, 0.5)
  assert differences()["model.token_mixing"] == ("auto", "batched")


def test_resume_with_another_config_is_refused_naming_the_keys(mock_cifar, tmp_path):
  workdir = str(tmp_path / "run")
  train_lib.train_and_evaluate(tiny_config(total_steps=3, eval_every_steps=3,
                                           checkpoint_every_steps=3), workdir)
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    first = json.load(f)
  changed = tiny_config(total_steps=6, eval_every_steps=3, checkpoint_every_steps=3,
                        learning_rate=0.5)
  with pytest.raises(ValueError, match=r"learning_rate: .*0\.5.*total_steps: 3 -> 6.*"
                                       r"--allow_config_change=learning_rate,total_steps"):
    train_lib.train_and_evaluate(changed, workdir)
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    assert json.load(f) == first  # the record is untouched
  # Operational keys change freely; named keys change on purpose and are recorded.
  changed.log_every_steps = 2
  result = train_lib.train_and_evaluate(changed, workdir,
                                        allow_config_change=("learning_rate", "total_steps"))
  assert result.step == 6
  with open(os.path.join(workdir, layout.HISTORY_FILE), encoding="utf-8") as f:
    history = [json.loads(line) for line in f]
  history = [h for h in history if "config" in h]  # not the device count's entries
  assert [h["step"] for h in history] == [0, 3]
  assert history[0]["config"] == first
  assert set(history[1]["changes"]) == {"learning_rate", "total_steps", "log_every_steps"}
  assert history[1]["changes"]["total_steps"] == {"from": 3, "to": 6}
  assert not os.path.exists(os.path.join(workdir, layout.LOCK_FILE))  # released
