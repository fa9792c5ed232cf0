"""One life cycle for a sweep's trials, shared by both launchers, and the local launcher.

DIR/<trial>/trial.json is a trial's one state file: status (pending, running, finished,
failed, stopped), command, error (its output's tail), attempts, wall time, and the launcher
(and job id) that ran it last; train.py's output goes to DIR/<trial>/train.log. `plan`
decides for every trial: finished, skip it; running elsewhere, leave it alone (reported
'running', its trial.json untouched, the sweep not done); else (new, failed, stopped, left
'running' by a dead process) run it, and train.py resumes from its checkpoints. Elsewhere
means a live train.py holding DIR/<trial>/lock.json, another live process holding its claim
DIR/<trial>/sweep_lock.json (taken before train.py starts), or its job still queued or
running. `run_trial` runs one attempt; the launchers differ in where: `run_sweep` here, N
trials at a time on disjoint GPUs, mixer/sweep_submitit.py in a submitit (SLURM) job.
SIGTERM or Ctrl-C asks the running trials to save a checkpoint and stop ('stopped'). No
orphans: on Linux a train.py gets SIGTERM when the process that started it dies, even by
SIGKILL (`sweep_children.start_child`).
"""
from __future__ import annotations

import concurrent.futures
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
import time
from typing import Any, Mapping

from mixer import errors, sweeps, workdir, workdir_lock
from mixer.sweep_children import Stopper, run_child

TRIAL_FILE = "trial.json"
CLAIM_FILE = "sweep_lock.json"  # the process running the trial (a workdir_lock lock)
LOG_FILE = "train.log"
SUBMITIT_DIR = "submitit"  # DIR/submitit/: submitit's files (mixer/sweep_submitit.py)
STATUSES = ("pending", "running", "finished", "failed", "stopped")
ERROR_CHARS = 4000
_ABSL_INFO_LINE = re.compile(r"^I\d{4} ")
# An exception's last line, absl's FATAL, or a script's one-line `error: ...` (cli_errors).
_EXCEPTION_LINE = re.compile(r"^([\w.]*(Error|Exception|Interrupt)\b|FATAL\b|error: )")
_FINAL_SLURM_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY",
                       "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED", "FINISHED")


# ---------------------------------------------------------------------------------------
# DIR/<trial>/trial.json and what it says.

def read_state(trial_dir: str) -> dict[str, Any] | None:
  """DIR/<trial>/trial.json, or None before the trial was ever queued."""
  path = os.path.join(trial_dir, TRIAL_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (FileNotFoundError, NotADirectoryError):
    return None
  except json.JSONDecodeError as e:
    raise errors.SweepError(f"{path} is damaged ({e}); delete it to run the trial again.") from e


def write_state(trial_dir: str, state: Mapping[str, Any]) -> None:
  workdir.write_json_atomically(os.path.join(trial_dir, TRIAL_FILE), state)


def _job_alive(trial_dir: str, state: Mapping[str, Any]) -> bool:
  """Whether the scheduler job recorded in trial.json is still queued or running."""
  launcher, job_id = state.get("launcher"), state.get("job_id")
  if not job_id or launcher not in ("slurm", "submitit_local"):
    return False
  if launcher == "slurm":
    import submitit  # pylint: disable=g-import-not-at-top
    folder = os.path.join(os.path.dirname(trial_dir), SUBMITIT_DIR, "%j")
    try:
      slurm_state = submitit.SlurmJob(folder, job_id).state
    except Exception:  # pylint: disable=broad-except  # sacct unavailable: assume it ended
      return False
    return slurm_state != "UNKNOWN" and slurm_state.split()[0] not in _FINAL_SLURM_STATES
  try:  # submitit_local: the job id is its controller's pid
    os.kill(int(job_id), 0)
    return True
  except (OSError, ValueError):
    return False


def running_elsewhere(trial_dir: str,
                      state: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
  """Who else runs the trial: the lock of a train.py that still holds its workdir, the claim
  of another live process running it (CLAIM_FILE: the seconds before its train.py takes the
  lock), or, given its `state`, its scheduler job still queued or running; else None.

  Starting a second writer would corrupt the run, so launchers leave such a trial alone.
  """
  info = workdir_lock.read_lock(trial_dir)
  if info is not None and workdir_lock.holder_alive(info):
    return info
  claim = workdir_lock.read_lock(trial_dir, CLAIM_FILE)
  if claim is not None and workdir_lock.holder_alive(claim) and not (
      claim.get("pid") == os.getpid() and claim.get("host") == socket.gethostname()):
    return claim
  if state and _job_alive(trial_dir, state):
    return {"launcher": state["launcher"], "job_id": state["job_id"]}
  return None


def describe(holder: Mapping[str, Any]) -> str:
  """'pid 12 on host (started ..., last heartbeat ...)', or 'slurm job 345'."""
  if "job_id" in holder:
    return f"{holder['launcher']} job {holder['job_id']}"
  return workdir_lock.describe(dict(holder))


def plan(sweep: sweeps.Sweep, sweep_dir: str,
         launcher: str) -> tuple[dict[str, str], list[sweeps.Trial]]:
  """What a launcher does with each trial: saves DIR/sweep.json; returns {trial: status} and
  the trials to run (marked pending, with `launcher`). A finished trial is skipped, one that
  runs elsewhere is left alone ('running'), any other is run (again)."""
  sweeps.save_sweep(sweep, sweep_dir)
  statuses, todo = {}, []
  for trial in sweep.trials:
    trial_dir = os.path.join(sweep_dir, trial.name)
    state = read_state(trial_dir)
    if state and state["status"] == "finished" and state.get("returncode") == 0:
      logging.info("Trial %s: finished before; skipped.", trial.name)
      statuses[trial.name] = "finished"
    elif (holder := running_elsewhere(trial_dir, state)) is not None:
      logging.warning("Trial %s: still running elsewhere (%s); skipped.", trial.name,
                      describe(holder))
      statuses[trial.name] = "running"
    else:
      os.makedirs(trial_dir, exist_ok=True)
      write_state(trial_dir, {"name": trial.name, "attempts": 0, "wall_time_s": 0.0,
                              **(state or {}), "overrides": trial.overrides,
                              "status": "pending", "launcher": launcher, "job_id": None})
      statuses[trial.name] = "pending"
      todo.append(trial)
  return statuses, todo


def statuses(sweep_dir: str) -> dict[str, str]:
  """{trial name: status} of a sweep directory's trials, as their trial.json files say."""
  return {t.name: (read_state(os.path.join(sweep_dir, t.name)) or {}).get("status", "pending")
          for t in sweeps.load_sweep(sweep_dir).trials}


def log_end(trial_dir: str, state: Mapping[str, Any]) -> None:
  """'Trial NAME: finished (12s over 1 attempt(s), val/top1 0.5120).'"""
  run = workdir.read_run(trial_dir)
  scores = {k: v for k, v in (run.metrics if run else {}).items()
            if k.endswith("/top1")}
  logging.info("Trial %s: %s (%.0fs over %d attempt(s)%s).", os.path.basename(trial_dir),
               state["status"], state.get("wall_time_s") or 0, state.get("attempts") or 0,
               "".join(f", {k} {v:.4f}" for k, v in sorted(scores.items(), reverse=True)))


def report_line(sweep_dir: str, statuses: Mapping[str, str]) -> str:
  """'Sweep DIR: 3 trials: 2 finished, 1 failed.', then each failed trial's error line."""
  counts = {s: list(statuses.values()).count(s) for s in STATUSES if s in statuses.values()}
  line = (f"Sweep {sweep_dir}: {len(statuses)} trials: "
          + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".")
  for name, status in statuses.items():
    state = read_state(os.path.join(sweep_dir, name)) or {}
    if status == "failed":
      line += f"\n  failed: {name}: {state.get('error_line')}"
    elif status == "running":
      holder = running_elsewhere(os.path.join(sweep_dir, name), state)
      line += f"\n  running elsewhere: {name}: " + (describe(holder) if holder else
                                                     "it has ended since")
  if any(s != "finished" for s in statuses.values()):
    line += "\nRun the same command again to resume; finished trials are skipped."
  return line


# ---------------------------------------------------------------------------------------
# One attempt: train.py as a child process (mixer/sweep_children.py).

def error_line(error: str) -> str:
  """The most telling line of an error: the last exception line, else the last line."""
  lines = [line.strip() for line in error.splitlines() if line.strip()]
  exceptions = [line for line in lines if _EXCEPTION_LINE.match(line)]
  return (exceptions or lines or [""])[-1][:300]


def _outcome(returncode: int, output: str, stop_requested: bool,
             run_status: str | None) -> dict[str, Any]:
  """status, error (the output's tail, without absl INFO lines) and error_line of an attempt."""
  if returncode == 0:
    return {"status": "stopped" if run_status == "stopped" else "finished"}
  if stop_requested and returncode == -signal.SIGTERM:  # stopped before its handler was set
    return {"status": "stopped"}
  error = "\n".join(line for line in output.splitlines() if not _ABSL_INFO_LINE.match(line))
  line = error_line(error)
  if returncode < 0:
    hint = " (out of memory?)" if returncode == -signal.SIGKILL else ""
    line = f"Killed by {signal.Signals(-returncode).name}{hint}."
    error = f"{error}\n{line}"
  return {"status": "failed", "error": error[-ERROR_CHARS:], "error_line": line}


def _now() -> str:
  return datetime.datetime.now().isoformat(timespec="seconds")


def run_trial(sweep: sweeps.Sweep, trial: sweeps.Trial, sweep_dir: str, stopper: Stopper,
              env: Mapping[str, str] | None = None,
              job: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Runs (or resumes) one trial to the end of this attempt; returns and stores its trial.json
  state, with `job`'s fields (launcher, job id). One that another process runs meanwhile
  (`running_elsewhere`) is left to it: {'status': 'running'}, its trial.json untouched."""
  trial_dir = os.path.join(sweep_dir, trial.name)
  os.makedirs(trial_dir, exist_ok=True)
  claim = workdir_lock.WorkdirLock(trial_dir, CLAIM_FILE)
  if (holder := running_elsewhere(trial_dir)) is None:
    try:
      claim.acquire()
    except workdir_lock.WorkdirLocked:  # another process claimed it since
      holder = workdir_lock.read_lock(trial_dir, CLAIM_FILE) or {}
  if holder is not None:
    logging.warning("Trial %s: started elsewhere meanwhile (%s); skipped.", trial.name,
                    describe(holder))
    return {"status": "running"}
  try:
    command = sweeps.trial_command(sweep, trial, sweep_dir)
    before = read_state(trial_dir)
    state = {"attempts": 0, "wall_time_s": 0.0, **(before or {})}
    state.update(name=trial.name, overrides=trial.overrides, command=shlex.join(command),
                 status="running", returncode=None, error=None, error_line=None,
                 started=_now(), ended=None, attempts=state["attempts"] + 1,
                 devices=(env or {}).get("CUDA_VISIBLE_DEVICES", "all"), **(job or {}))
    write_state(trial_dir, state)
    log_path = os.path.join(trial_dir, LOG_FILE)
    with open(log_path, "a", encoding="utf-8") as log:
      log.write(f"\n=== attempt {state['attempts']}, {state['started']}: {state['command']}\n")
      offset = log.tell()
    start = time.time()
    proc = run_child(command, log_path, stopper, env)
    with open(log_path, encoding="utf-8", errors="replace") as f:
      f.seek(offset)
      output = f.read()
    holder = running_elsewhere(trial_dir) if proc.returncode else None
    if holder is not None and holder.get("pid") != proc.pid:
      # Its train.py found the workdir taken by a writer started elsewhere meanwhile: the
      # trial is that writer's, so its trial.json goes back to what it was, not "failed".
      logging.warning("Trial %s: running elsewhere (%s); left to it.", trial.name,
                      describe(holder))
      if before is not None:
        write_state(trial_dir, before)
      return dict(before or state, status="running")
    run = workdir.read_run(trial_dir)
    state.update(_outcome(proc.returncode, output, stopper.requested, run and run.status),
                 returncode=proc.returncode, ended=_now(),
                 wall_time_s=round(state["wall_time_s"] + time.time() - start, 1))
    write_state(trial_dir, state)
    return state
  finally:
    claim.release()


# ---------------------------------------------------------------------------------------
# The local launcher: trials as processes here, N at a time.

def visible_gpus(environ: Mapping[str, str] = os.environ) -> list[str]:
  """GPU ids for the trials, found without initialising JAX here.

  jax.local_device_count() in this process would make JAX take most of every GPU's memory
  for the sweep itself, so ask CUDA_VISIBLE_DEVICES, then nvidia-smi.
  """
  if environ.get("JAX_PLATFORMS", "").strip() == "cpu":
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
    raise errors.SweepError(f"--parallel={parallel} needs at least {parallel} GPUs; found "
                            f"{len(gpus)}.")
  per_trial = len(gpus) // parallel
  if len(gpus) % parallel:
    logging.warning("%d GPUs do not split evenly over %d trials: %d stay idle.", len(gpus),
                    parallel, len(gpus) % parallel)
  return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * per_trial:(i + 1) * per_trial])}
          for i in range(parallel)]


def run_sweep(sweep: sweeps.Sweep, sweep_dir: str, parallel: int = 1,
              env: Mapping[str, str] | None = None) -> dict[str, str]:
  """Runs every trial of `sweep` that `plan` says to run, `parallel` at a time, in
  DIR/<trial>/; returns {trial name: status}. `env` is added to each trial's environment."""
  if parallel < 1:
    raise errors.SweepError(f"--parallel must be >= 1, got {parallel}.")
  sweep_dir = os.path.abspath(sweep_dir)
  statuses, todo = plan(sweep, sweep_dir, "local")
  if not todo:
    return statuses
  device_slots = device_envs(min(parallel, len(todo)),
                             visible_gpus({**os.environ, **(env or {})}))
  trials: queue.SimpleQueue = queue.SimpleQueue()
  for trial in todo:
    trials.put(trial)

  def worker(device_env: dict[str, str]) -> None:  # runs trials one after the other
    while not stopper.requested:
      try:
        trial = trials.get_nowait()
      except queue.Empty:
        return
      logging.info("Trial %s: starting (%s).", trial.name, device_env or "cpu")
      state = run_trial(sweep, trial, sweep_dir, stopper, {**(env or {}), **device_env},
                        {"launcher": "local"})
      statuses[trial.name] = state["status"]
      if state["status"] != "running":
        log_end(os.path.join(sweep_dir, trial.name), state)

  with Stopper() as stopper, concurrent.futures.ThreadPoolExecutor(len(device_slots)) as pool:
    for future in [pool.submit(worker, device_env) for device_env in device_slots]:
      while concurrent.futures.wait([future], timeout=1.0).not_done:  # signal handlers run
        pass
      future.result()
  return statuses
