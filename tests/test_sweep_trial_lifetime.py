"""Sweep trials as processes: no orphans and no second writer.

A trial dies with the sweep that started it (PR_SET_PDEATHSIG), even one whose sweep died
before it started; a trial whose train.py still holds its workdir lock is left alone, and
a dead one is resumed.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from mixer import errors, sweep_children, sweep_runner, sweeps
from sweep_helpers import CONFIG, ENV, read_text, run_sweep_cli, state

# Trials start with a preexec_fn, so Python forks; JAX warns when it runs threads in the
# forking process. It does in this test process, not in sweep.py (tested below).
pytestmark = pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning")


PARENT = """
import signal, subprocess, sys, threading, time
sys.path.insert(0, {root!r})
from mixer import sweep_children
signal.signal(signal.SIGTERM, lambda *_: None)  # as Stopper: the child must not inherit it

def run():  # as run_sweep: a worker thread starts the trial and waits for it
  child = sweep_children.start_child([sys.executable, "-c", "import time; time.sleep(120)"])
  print(child.pid, flush=True)
  child.wait()

threading.Thread(target=run).start()
time.sleep(120)
"""


def alive(pid):
  """Running (a zombie nobody reaped yet counts as dead)."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def dead_pid():
  proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  return int(proc.stdout)


def write_lock(trial_dir, **info):
  os.makedirs(trial_dir, exist_ok=True)
  info = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": "2026-12-01 10:00:00",
          "heartbeat": time.time(), **info}
  with open(os.path.join(trial_dir, "lock.json"), "w", encoding="utf-8") as f:
    json.dump(info, f)
  return info


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="PR_SET_PDEATHSIG is Linux's")


@linux_only
def test_trial_process_dies_when_the_sweep_is_killed(tmp_path):
  script = tmp_path / "parent.py"
  script.write_text(PARENT.format(root=ROOT))
  parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
  child = None
  try:
    child = int(parent.stdout.readline())
    assert alive(child) and os.getsid(child) == child  # its own session: Ctrl-C spares it
    parent.kill()  # SIGKILL: no handler of the sweep runs
    parent.wait(timeout=10)
    deadline = time.time() + 10
    while alive(child) and time.time() < deadline:
      time.sleep(0.05)
    assert not alive(child), "the trial outlived its SIGKILLed sweep"
  finally:
    parent.kill()
    if child and alive(child):
      os.kill(child, signal.SIGKILL)


@linux_only
def test_trial_whose_sweep_died_before_it_started_ends_itself():
  # The parent "died" (another pid is its parent) before prctl took effect: no signal would
  # ever come, so the child ends itself at once instead of running on as an orphan, even
  # though it inherited a SIGTERM handler (the sweep's Stopper) that would swallow it.
  previous = signal.signal(signal.SIGTERM, lambda *_: None)
  try:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            preexec_fn=sweep_children.die_with_parent(parent_pid=dead_pid()))
  finally:
    signal.signal(signal.SIGTERM, previous)
  try:
    assert proc.wait(timeout=30) == -signal.SIGTERM
  finally:
    proc.kill()


def test_running_elsewhere_only_while_the_locks_holder_lives(tmp_path):
  trial_dir = str(tmp_path / "trial")
  assert sweep_runner.running_elsewhere(trial_dir) is None  # never started
  live = write_lock(trial_dir)
  assert sweep_runner.running_elsewhere(trial_dir) == live
  write_lock(trial_dir, pid=dead_pid())
  assert sweep_runner.running_elsewhere(trial_dir) is None
  other_host = write_lock(trial_dir, host="elsewhere.invalid", pid=dead_pid())
  assert sweep_runner.running_elsewhere(trial_dir) == other_host  # fresh heartbeat
  write_lock(trial_dir, host="elsewhere.invalid", heartbeat=time.time() - 3600)
  assert sweep_runner.running_elsewhere(trial_dir) is None


FAKE_TRAIN = """
import os, sys
workdir = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir=")][0]
with open(os.path.join(workdir, "ran.txt"), "a") as f:
  f.write("ran\\n")
"""


def test_rerun_leaves_a_live_trial_alone_and_resumes_a_dead_one(tmp_path):
  workdir = str(tmp_path / "sweep")
  script = tmp_path / "fake_train.py"
  script.write_text(FAKE_TRAIN)
  sweep = sweeps.make_sweep(CONFIG, [{"seed": 1}, {"seed": 2}], train_script=str(script))
  live, dead = (os.path.join(workdir, t.name) for t in sweep.trials)
  left_running = {"status": "running", "attempts": 1, "wall_time_s": 5.0}
  for trial_dir, pid in ((live, os.getpid()), (dead, dead_pid())):
    write_lock(trial_dir, pid=pid)
    with open(os.path.join(trial_dir, sweep_runner.TRIAL_FILE), "w", encoding="utf-8") as f:
      json.dump(dict(left_running, name=os.path.basename(trial_dir)), f)

  statuses = sweep_runner.run_sweep(sweep, workdir, env=ENV)
  assert statuses == {"seed=1": "running", "seed=2": "finished"}
  assert not os.path.exists(os.path.join(live, "ran.txt"))  # no second writer started
  assert state(workdir, "seed=1") == dict(left_running, name="seed=1")  # not ours to touch
  assert read_text(os.path.join(dead, "ran.txt")) == "ran\n"
  assert state(workdir, "seed=2")["attempts"] == 2
  line = sweep_runner.report_line(workdir, statuses)
  assert "2 trials: 1 running, 1 finished." in line
  assert f"running elsewhere: seed=1: pid {os.getpid()} on {socket.gethostname()}" in line

  proc = run_sweep_cli(f"--config={CONFIG}", f"--workdir={workdir}", "--sweep=seed=[1,2,3]",
                       f"--train_script={script}")
  assert proc.returncode == 1, proc.stderr[-3000:]  # not done while a trial still runs
  assert "Trial seed=1: still running elsewhere (pid" in proc.stderr
  assert "3 trials: 1 running, 2 finished." in proc.stdout
  assert read_text(os.path.join(workdir, "seed=3", "ran.txt")) == "ran\n"
  # sweep.py starts its trials before JAX runs any thread (forking then would risk a deadlock;
  # JAX warns). This test process does run JAX: the warning is filtered here (pytestmark).
  assert "os.fork() was called" not in proc.stderr


def test_one_decision_per_trial_for_every_launcher(tmp_path):
  """`plan` (both launchers): finished is skipped; stopped and failed run again; a trial whose
  job (trial.json's launcher and job id) is still queued or running is left to it."""
  workdir, script = str(tmp_path / "sweep"), tmp_path / "fake_train.py"
  script.write_text(FAKE_TRAIN)
  sweep = sweeps.make_sweep(CONFIG, [{"seed": s} for s in range(1, 6)], train_script=str(script))
  before = {"seed=1": {"status": "finished", "returncode": 0},
            "seed=2": {"status": "stopped", "returncode": 0},
            "seed=3": {"status": "failed", "returncode": 1, "error_line": "boom"},
            "seed=4": {"status": "pending", "launcher": "submitit_local",  # queued
                       "job_id": str(os.getpid())},
            "seed=5": {"status": "running", "launcher": "submitit_local",  # its job died
                       "job_id": str(dead_pid())}}
  for name, content in before.items():
    os.makedirs(os.path.join(workdir, name))
    sweep_runner.write_state(os.path.join(workdir, name),
                             dict(content, name=name, attempts=1, wall_time_s=1.0))

  statuses = sweep_runner.run_sweep(sweep, workdir, env=ENV)
  assert statuses == {"seed=1": "finished", "seed=2": "finished", "seed=3": "finished",
                      "seed=4": "running", "seed=5": "finished"}
  ran = {name: os.path.exists(os.path.join(workdir, name, "ran.txt")) for name in before}
  assert ran == {"seed=1": False, "seed=2": True, "seed=3": True, "seed=4": False, "seed=5": True}
  for name in ("seed=2", "seed=3", "seed=5"):
    after = state(workdir, name)
    assert after["attempts"] == 2 and after["launcher"] == "local" and after["job_id"] is None
    assert after["error_line"] is None
  assert state(workdir, "seed=4") == dict(before["seed=4"], name="seed=4", attempts=1,
                                          wall_time_s=1.0)  # its job's, untouched
  line = sweep_runner.report_line(workdir, statuses)
  assert f"running elsewhere: seed=4: submitit_local job {os.getpid()}" in line
  assert "5 trials: 1 running, 4 finished." in line


def test_damaged_state_files_are_user_errors_naming_the_file(tmp_path):
  (tmp_path / sweep_runner.TRIAL_FILE).write_text('{"status": "runn')
  with pytest.raises(errors.SweepError, match=f"{tmp_path}/trial.json is damaged"):
    sweep_runner.read_state(str(tmp_path))
  (tmp_path / sweeps.SWEEP_FILE).write_text('{"config": "c.py"}')
  with pytest.raises(errors.SweepError, match=f"{tmp_path}/sweep.json is damaged .*KeyError"):
    sweeps.load_sweep(str(tmp_path))


SLOW_TRAIN = """
import os, sys, time
workdir = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir=")][0]
deadline = time.time() + 60  # as train.py reading its data before it takes the workdir lock
while not os.path.exists(os.path.join(workdir, "go")) and time.time() < deadline:
  time.sleep(0.05)
with open(os.path.join(workdir, "ran.txt"), "a") as f:
  f.write("ran\\n")
"""


def test_second_sweep_reports_a_trial_of_the_first_as_running_elsewhere(tmp_path):
  """Before its train.py holds the workdir lock, a trial is claimed by the sweep running it."""
  workdir, script = str(tmp_path / "sweep"), tmp_path / "slow_train.py"
  script.write_text(SLOW_TRAIN)
  args = [f"--config={CONFIG}", f"--workdir={workdir}", "--sweep=seed=[1]",
          f"--train_script={script}"]
  first = subprocess.Popen([sys.executable, os.path.join(ROOT, "sweep.py"), *args], cwd=ROOT,
                           env=dict(os.environ, **ENV), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  try:
    claim = os.path.join(workdir, "seed=1", sweep_runner.CLAIM_FILE)
    deadline = time.time() + 60
    while not os.path.exists(claim) and time.time() < deadline and first.poll() is None:
      time.sleep(0.05)
    second = run_sweep_cli(*args)
    assert second.returncode == 1, second.stderr[-3000:]
    assert f"running elsewhere: seed=1: pid {first.pid} on" in second.stdout, second.stdout
    assert "failed" not in second.stdout
    assert state(workdir, "seed=1")["status"] == "running"
  finally:
    open(os.path.join(workdir, "seed=1", "go"), "w", encoding="utf-8").close()
    out, err = first.communicate(timeout=60)
  assert first.returncode == 0, err[-3000:]
  assert read_text(os.path.join(workdir, "seed=1", "ran.txt")) == "ran\n"  # one writer only
  assert state(workdir, "seed=1")["status"] == "finished"
  assert not os.path.exists(claim)


LOCKED_TRAIN = """
import json, os, socket, sys, time
workdir = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir=")][0]
lock = {{"host": socket.gethostname(), "pid": {pid}, "start_time": "now",
         "heartbeat": time.time()}}
with open(os.path.join(workdir, "lock.json"), "w") as f:  # another train.py took it meanwhile
  json.dump(lock, f)
sys.exit("error: " + workdir + " is in use by another train.py")
"""


def test_trial_whose_workdir_was_taken_meanwhile_is_not_marked_failed(tmp_path):
  workdir, script = str(tmp_path / "sweep"), tmp_path / "locked_train.py"
  script.write_text(LOCKED_TRAIN.format(pid=os.getpid()))
  sweep = sweeps.make_sweep(CONFIG, [{"seed": 1}], train_script=str(script))
  statuses = sweep_runner.run_sweep(sweep, workdir, env=ENV)
  assert statuses == {"seed=1": "running"}
  assert state(workdir, "seed=1")["status"] == "pending"  # as before the attempt
  line = sweep_runner.report_line(workdir, statuses)
  assert f"running elsewhere: seed=1: pid {os.getpid()}" in line and "failed" not in line
