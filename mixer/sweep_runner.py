"""Runs a sweep's trials as separate train.py processes, N at a time, resumably.

A crash or an out-of-memory kill ends its own trial only. Each trial keeps its state in
DIR/<trial>/trial.json: status (pending, running, finished, failed, stopped), the exact
command, the error (tail of its output) and the wall time over all attempts; its output
goes to DIR/<trial>/train.log. Running the same sweep again skips finished trials and runs
the others again, which resume from their own checkpoints (train.py does that by itself).
SIGTERM or Ctrl-C asks every running trial to save a checkpoint and stop ('stopped').

No orphans: on Linux each train.py gets SIGTERM (save, then exit) when the sweep dies, even
by SIGKILL (`start_child`). A trial left 'running' by a dead sweep is run again (resumed)
unless its train.py still holds DIR/<trial>/lock.json, or another live sweep process holds
its claim DIR/<trial>/sweep_lock.json (taken before train.py starts; `running_elsewhere`):
then it is skipped with status 'running', its trial.json untouched, and the sweep does not
count as done.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import datetime
import json
import logging
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Mapping

from mixer import sweeps, workdir_lock

TRIAL_FILE = "trial.json"
# DIR/<trial>/sweep_lock.json: the sweep process running the trial (a workdir_lock lock).
CLAIM_FILE = "sweep_lock.json"
LOG_FILE = "train.log"
STATUSES = ("pending", "running", "finished", "failed", "stopped")
RUN_FILE = "run.json"  # train_lib.RunResult as train.py last wrote it (status, num_params, ...)
ERROR_CHARS = 4000
_ABSL_INFO_LINE = re.compile(r"^I\d{4} ")
# An exception's last line, absl's FATAL, or a script's one-line `error: ...` (cli_errors).
_EXCEPTION_LINE = re.compile(r"^([\w.]*(Error|Exception|Interrupt)\b|FATAL\b|error: )")


def read_state(trial_dir: str) -> dict[str, Any] | None:
  """DIR/<trial>/trial.json, or None before the trial was ever queued."""
  path = os.path.join(trial_dir, TRIAL_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def write_state(trial_dir: str, state: Mapping[str, Any]) -> None:
  path = os.path.join(trial_dir, TRIAL_FILE)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(state, f, indent=1)
  os.replace(path + ".tmp", path)


def is_finished(state: Mapping[str, Any] | None) -> bool:
  return bool(state) and state["status"] == "finished" and state.get("returncode") == 0


def without_info_lines(output: str) -> str:
  """A run's output without absl INFO lines (orbax alone writes dozens per checkpoint)."""
  return "\n".join(line for line in output.splitlines() if not _ABSL_INFO_LINE.match(line))


def error_line(error: str) -> str:
  """The most telling line of an error: the last exception line, else the last line."""
  lines = [line.strip() for line in error.splitlines() if line.strip()]
  exceptions = [line for line in lines if _EXCEPTION_LINE.match(line)]
  return (exceptions or lines or [""])[-1][:300]


def visible_gpus(environ: Mapping[str, str] = os.environ) -> list[str]:
  """GPU ids for the trials, found without initialising JAX here.

  jax.local_device_count() in this process would make JAX take most of every GPU's memory
  for the sweep itself, so ask CUDA_VISIBLE_DEVICES, then nvidia-smi.
  """
  if "cpu" == environ.get("JAX_PLATFORMS", "").strip():
    return []
  if environ.get("CUDA_VISIBLE_DEVICES") is not None:
    return [d.strip() for d in environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
  if shutil.which("nvidia-smi") is None:
    return []
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return [line.strip() for line in out.splitlines() if line.strip()]


def device_envs(parallel: int, gpus: list[str]) -> list[dict[str, str]]:
  """One environment per concurrent trial: disjoint CUDA_VISIBLE_DEVICES, or none on CPU."""
  if not gpus:
    return [{} for _ in range(parallel)]
  if parallel > len(gpus):
    raise ValueError(f"--parallel={parallel} needs at least {parallel} GPUs; found {len(gpus)}.")
  per_trial = len(gpus) // parallel
  if len(gpus) % parallel:
    logging.warning("%d GPUs do not split evenly over %d trials: %d stay idle.", len(gpus),
                    parallel, len(gpus) % parallel)
  return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * per_trial:(i + 1) * per_trial])}
          for i in range(parallel)]


class Stopper:
  """On SIGTERM/SIGINT: start no more trials and SIGTERM the running ones (they save, exit)."""

  def __init__(self):
    self.requested = False
    self._procs: set[subprocess.Popen] = set()
    self._lock = threading.Lock()
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> "Stopper":
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def _handle(self, signum, frame) -> None:
    del frame
    logging.warning("%s received: stopping the running trials (they save a checkpoint).",
                    signal.Signals(signum).name)
    self.stop()

  def stop(self) -> None:
    """SIGTERM to every running trial (they save and exit); no new trial starts."""
    with self._lock:
      self.requested = True
      for proc in self._procs:
        proc.terminate()

  def add(self, proc: subprocess.Popen) -> None:
    with self._lock:
      self._procs.add(proc)
      if self.requested:
        proc.terminate()

  def remove(self, proc: subprocess.Popen) -> None:
    with self._lock:
      self._procs.discard(proc)


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent_pid: int | None = None) -> Callable[[], None] | None:
  """A Popen `preexec_fn`: the child gets SIGTERM when its parent dies (Linux only).

  The child asks the kernel for SIGTERM on its parent's death (prctl PR_SET_PDEATHSIG);
  train.py answers SIGTERM by saving a checkpoint and exiting. If the parent (`parent_pid`,
  default this process) died before the request took effect, the child ends itself at once.
  The kernel sends the signal when the *thread* that started the child ends, so start it
  from a thread that outlives it (run_trial waits for it in the same thread). Returns None
  off Linux, or where libc has no prctl: there a child outlives a killed sweep, and the
  next sweep finds it through its lock (`running_elsewhere`).
  """
  if not sys.platform.startswith("linux"):
    return None
  try:
    prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
  except (OSError, AttributeError):
    return None
  prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                    ctypes.c_ulong]
  parent = os.getpid() if parent_pid is None else parent_pid
  sigterm, default = signal.SIGTERM, signal.SIG_DFL

  def preexec() -> None:  # runs in the forked child before exec: no logging, no locks
    # The sweep's own SIGTERM handler came along with the fork; a signal caught by it here
    # would be lost at exec, so take the default action (die) until train.py sets its own.
    signal.signal(sigterm, default)
    prctl(_PR_SET_PDEATHSIG, int(sigterm), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl: no signal would come
      os.kill(os.getpid(), sigterm)

  return preexec


def start_child(command: list[str], **popen_kwargs: Any) -> subprocess.Popen:
  """subprocess.Popen(command, ...) in a session of its own that dies with this process.

  A session of its own: Ctrl-C in the terminal reaches the sweep only, which then stops
  its trials cleanly (Stopper). `die_with_parent` ends the child if the sweep is killed.
  """
  return subprocess.Popen(command, start_new_session=True, preexec_fn=die_with_parent(),
                          **popen_kwargs)


def running_elsewhere(trial_dir: str) -> dict[str, Any] | None:
  """The lock of a train.py that still holds the trial's workdir, or the claim of another
  live sweep process that runs the trial (CLAIM_FILE), else None.

  Such a trial was started by another sweep (alive, or killed while its train.py lives
  on): starting a second writer would corrupt the run, so the sweep leaves it alone. The
  claim covers the seconds before the trial's train.py takes its own lock.
  """
  info = workdir_lock.read_lock(trial_dir)
  if info is not None and workdir_lock.holder_alive(info):
    return info
  claim = workdir_lock.read_lock(trial_dir, CLAIM_FILE)
  if claim is None or not workdir_lock.holder_alive(claim) or _is_this_process(claim):
    return None
  return claim


def _is_this_process(info: Mapping[str, Any]) -> bool:
  return info.get("pid") == os.getpid() and info.get("host") == socket.gethostname()


def _claim(trial_dir: str) -> workdir_lock.WorkdirLock | None:
  """This sweep's claim on a trial (released when it ends), or None when another live
  sweep process holds it."""
  claim = workdir_lock.WorkdirLock(trial_dir, CLAIM_FILE)
  try:
    claim.acquire()
  except workdir_lock.WorkdirLocked:
    return None
  return claim


def _now() -> str:
  return datetime.datetime.now().isoformat(timespec="seconds")


def read_run(trial_dir: str) -> dict[str, Any]:
  """The trial's run.json written by train.py ({} before training started)."""
  try:
    with open(os.path.join(trial_dir, RUN_FILE), encoding="utf-8") as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return {}


def _outcome(returncode: int, output: str, stop_requested: bool,
             run_status: str | None) -> dict[str, Any]:
  """status, error (the output's tail) and error_line of one ended attempt."""
  if returncode == 0:
    return {"status": "stopped" if run_status == "stopped" else "finished"}
  if stop_requested and returncode == -signal.SIGTERM:  # stopped before its handler was set
    return {"status": "stopped"}
  error = without_info_lines(output)
  line = error_line(error)
  if returncode < 0:
    hint = " (out of memory?)" if returncode == -signal.SIGKILL else ""
    line = f"Killed by {signal.Signals(-returncode).name}{hint}."
    error = f"{error}\n{line}"
  return {"status": "failed", "error": error[-ERROR_CHARS:], "error_line": line}


def run_trial(sweep: sweeps.Sweep, trial: sweeps.Trial, workdir: str,
              device_env: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None,
              stopper: Stopper | None = None,
              extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Runs (or resumes) one trial to its end; returns and stores its trial.json state
  (with `extra`'s fields, e.g. a scheduler's job id)."""
  trial_dir = os.path.join(workdir, trial.name)
  os.makedirs(trial_dir, exist_ok=True)
  command = sweeps.trial_command(sweep, trial, workdir)
  before = read_state(trial_dir)
  state = dict(before or {"attempts": 0, "wall_time_s": 0.0})
  state.update(name=trial.name, overrides=trial.overrides, command=shlex.join(command),
               status="running", returncode=None, error=None, error_line=None, started=_now(),
               ended=None,
               devices=(device_env or {}).get("CUDA_VISIBLE_DEVICES", "all"),
               attempts=state["attempts"] + 1, **(extra or {}))
  write_state(trial_dir, state)
  log_path = os.path.join(trial_dir, LOG_FILE)
  start = time.time()
  with open(log_path, "a", encoding="utf-8") as log:
    log.write(f"\n=== attempt {state['attempts']}, {state['started']}: {state['command']}\n")
    log.flush()
    offset = log.tell()
    proc = start_child(command, stdout=log, stderr=subprocess.STDOUT, cwd=sweeps.ROOT,
                       env={**os.environ, **(env or {}), **(device_env or {})})
    if stopper:
      stopper.add(proc)
    try:
      proc.wait()
    finally:
      if stopper:
        stopper.remove(proc)
  with open(log_path, encoding="utf-8", errors="replace") as f:
    f.seek(offset)
    output = f.read()
  holder = running_elsewhere(trial_dir) if proc.returncode else None
  if holder is not None and holder.get("pid") != proc.pid:
    # Its train.py found the workdir taken by a writer started elsewhere meanwhile: the
    # trial is that writer's, so its trial.json goes back to what it was, not "failed".
    logging.warning("Trial %s: running elsewhere (%s); left to it.", trial.name,
                    workdir_lock.describe(holder))
    if before is not None:
      write_state(trial_dir, before)
    return dict(before or state, status="running")
  state.update(_outcome(proc.returncode, output, bool(stopper and stopper.requested),
                        read_run(trial_dir).get("status")),
               returncode=proc.returncode, ended=_now(),
               wall_time_s=round(state["wall_time_s"] + time.time() - start, 1))
  write_state(trial_dir, state)
  return state


def run_sweep(sweep: sweeps.Sweep, workdir: str, parallel: int = 1,
              env: Mapping[str, str] | None = None) -> dict[str, str]:
  """Runs every unfinished trial of `sweep` in DIR/<trial>/; returns {trial name: status}.

  `env` is added to each trial's environment. Trials with a finished trial.json are skipped,
  and so are those whose train.py still runs elsewhere (`running_elsewhere`): status
  'running', their trial.json left to the sweep that started them.
  """
  if parallel < 1:
    raise ValueError(f"--parallel must be >= 1, got {parallel}.")
  workdir = os.path.abspath(workdir)
  sweeps.save_sweep(sweep, workdir)
  statuses, todo = {}, []
  for trial in sweep.trials:
    trial_dir = os.path.join(workdir, trial.name)
    state = read_state(trial_dir)
    if is_finished(state):
      logging.info("Trial %s: finished before; skipped.", trial.name)
      statuses[trial.name] = "finished"
      continue
    holder = running_elsewhere(trial_dir)
    if holder is not None:  # its trial.json belongs to the sweep that started it
      logging.warning("Trial %s: still running elsewhere (%s); skipped.", trial.name,
                      workdir_lock.describe(holder))
      statuses[trial.name] = "running"
      continue
    os.makedirs(trial_dir, exist_ok=True)
    state = state or {"name": trial.name, "overrides": trial.overrides, "attempts": 0,
                      "wall_time_s": 0.0}
    write_state(trial_dir, dict(state, status="pending"))
    statuses[trial.name] = "pending"
    todo.append(trial)
  if not todo:
    return statuses
  slots: queue.Queue = queue.Queue()  # one per worker thread: the devices of a running trial
  workers = min(parallel, len(todo))
  for device_env in device_envs(workers, visible_gpus({**os.environ, **(env or {})})):
    slots.put(device_env)

  def run_in_slot(trial: sweeps.Trial) -> dict[str, Any]:
    device_env = slots.get()
    try:
      if stopper.requested:
        return {"status": "pending"}
      trial_dir = os.path.join(workdir, trial.name)
      holder = running_elsewhere(trial_dir)
      claim = _claim(trial_dir) if holder is None else None
      if claim is None:  # started by another sweep while this one waited for a slot
        holder = holder or workdir_lock.read_lock(trial_dir, CLAIM_FILE) or {}
        logging.warning("Trial %s: started elsewhere meanwhile (%s); skipped.", trial.name,
                        workdir_lock.describe(holder))
        return {"status": "running"}
      logging.info("Trial %s: starting (%s).", trial.name, device_env or "cpu")
      try:
        state = run_trial(sweep, trial, workdir, device_env, env, stopper)
      finally:
        claim.release()
      scores = {k: v for k, v in read_run(os.path.join(workdir, trial.name)).get(
          "metrics", {}).items() if k.endswith("/top1")}
      result = "".join(f", {k} {v:.4f}" for k, v in sorted(scores.items(), reverse=True))
      logging.info("Trial %s: %s (%.0fs over %d attempt(s)%s).", trial.name, state["status"],
                   state["wall_time_s"], state["attempts"], result)
      return state
    finally:
      slots.put(device_env)

  with Stopper() as stopper, concurrent.futures.ThreadPoolExecutor(workers) as pool:
    futures = {pool.submit(run_in_slot, trial): trial for trial in todo}
    waiting = set(futures)
    while waiting:  # polls, so that signal handlers run promptly in this thread
      done, waiting = concurrent.futures.wait(waiting, timeout=1.0)
      for future in done:
        statuses[futures[future].name] = future.result()["status"]
  return statuses


def statuses(workdir: str) -> dict[str, str]:
  """{trial name: status} of a sweep directory's trials, as their trial.json files say."""
  return {t.name: (read_state(os.path.join(workdir, t.name)) or {}).get("status", "pending")
          for t in sweeps.load_sweep(workdir).trials}


def report_line(workdir: str, statuses: Mapping[str, str]) -> str:
  """'Sweep DIR: 3 trials: 2 finished, 1 failed.', then each failed trial's error line."""
  counts = {s: list(statuses.values()).count(s) for s in STATUSES if s in statuses.values()}
  line = (f"Sweep {workdir}: {len(statuses)} trials: "
          + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".")
  failed = [name for name, s in statuses.items() if s == "failed"]
  for name in failed:
    state = read_state(os.path.join(workdir, name)) or {}
    line += f"\n  failed: {name}: {state.get('error_line')}"
  for name in [name for name, s in statuses.items() if s == "running"]:
    holder = running_elsewhere(os.path.join(workdir, name))
    where = workdir_lock.describe(holder) if holder else "it has ended since"
    line += f"\n  running elsewhere: {name}: {where}"
  if any(s != "finished" for s in statuses.values()):
    line += "\nRun the same command again to resume; finished trials are skipped."
  return line
