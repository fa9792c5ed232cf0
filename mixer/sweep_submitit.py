"""Sweeps through submitit: each trial a SLURM job (or a local submitit job), requeued on preemption.

`sweep.py --launcher=slurm` (or `submitit_local`, the same path on this machine). The trials
keep the local runner's layout (sweep_runner): DIR/<trial>/trial.json (status, command,
attempts, error, job id), DIR/<trial>/job.json (the latest job), train.log, skip-finished and resume. submitit's own files
(pickles, job stdout/stderr) go to DIR/submitit/.

Each job runs `TrialJob`: the trial's train.py command as a child process (from a thread, so
that the job's main thread stays free for signals), exactly as the local runner does. When
the scheduler signals the job before its time limit or a preemption (USR2, `signal_delay_s`
ahead: submitit's `--signal`), submitit calls `TrialJob.checkpoint`: it sends SIGTERM to
train.py, which finishes its step, saves a checkpoint and exits; the job is then requeued and
runs train.py again, which resumes from that checkpoint. A SIGTERM from SLURM itself (scancel,
preemption without the USR2 warning) reaches train.py directly and it saves the same way.
A trial of several nodes runs one task per node; train.py finds its processes from srun's
environment (train.py, runtime.slurm_step_tasks) and task 0 keeps trial.json.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from typing import Any

from mixer import sweep_runner, sweeps

SUBMITIT_DIR = "submitit"
LAUNCHERS = ("local", "slurm", "submitit_local")
_FINAL_SLURM_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY",
                       "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED", "FINISHED")


@dataclasses.dataclass
class JobOptions:
  """What each trial's job asks the scheduler for (sweep.py's --slurm_* flags)."""
  partition: str | None = None
  gpus_per_trial: int = 0  # per node
  nodes: int = 1
  time_min: int = 24 * 60
  cpus_per_task: int | None = None
  mem_gb: float | None = None
  signal_delay_s: int = 120  # warning before the time limit: train.py must save within it
  max_requeues: int = 10
  slurm_args: dict[str, Any] = dataclasses.field(default_factory=dict)


def check_slurm() -> None:
  """Raises ValueError in one line where SLURM is not installed."""
  if shutil.which("sbatch") is None:
    raise ValueError("--launcher=slurm needs SLURM (sbatch is not on PATH here); use "
                     "--launcher=local, or --launcher=submitit_local for the same path locally.")


def make_executor(launcher: str, workdir: str, options: JobOptions) -> Any:
  """A submitit executor for `launcher` ('slurm' or 'submitit_local'), its files in DIR/submitit."""
  import submitit  # pylint: disable=g-import-not-at-top
  folder = os.path.join(workdir, SUBMITIT_DIR, "%j")
  if launcher == "slurm":
    check_slurm()
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=options.max_requeues)
    params: dict[str, Any] = dict(
        nodes=options.nodes, ntasks_per_node=1, time=options.time_min,
        signal_delay_s=options.signal_delay_s, job_name="mixer-sweep",
        additional_parameters={"requeue": True, **options.slurm_args})
    if options.gpus_per_trial:
      params["gpus_per_node"] = options.gpus_per_trial
    for key, value in (("partition", options.partition), ("cpus_per_task", options.cpus_per_task),
                       ("mem", f"{options.mem_gb}GB" if options.mem_gb else None)):
      if value is not None:
        params[key] = value
    executor.update_parameters(**params)
    return executor
  if launcher == "submitit_local":
    if options.nodes != 1:
      raise ValueError("--launcher=submitit_local runs on this machine: --slurm_nodes must be 1.")
    executor = submitit.LocalExecutor(folder=folder, max_num_timeout=options.max_requeues)
    executor.update_parameters(timeout_min=options.time_min, tasks_per_node=1,
                               gpus_per_node=options.gpus_per_trial,
                               signal_delay_s=options.signal_delay_s)
    return executor
  raise ValueError(f"Unknown launcher {launcher!r}: expected one of {LAUNCHERS}.")


class TrialJob:
  """The callable a trial's job runs: train.py to the end, stopped cleanly on the scheduler's
  signal and requeued (submitit calls `checkpoint`)."""

  def __init__(self, sweep: sweeps.Sweep, trial: sweeps.Trial, workdir: str):
    self.sweep, self.trial, self.workdir = sweep, trial, workdir

  def __call__(self) -> dict[str, Any]:
    import submitit  # pylint: disable=g-import-not-at-top
    rank = submitit.JobEnvironment().global_rank
    self._stopper = sweep_runner.Stopper()  # not entered: submitit owns this job's signals
    self._result: dict[str, Any] = {}
    target = self._run_rank0 if rank == 0 else lambda: self._run_other_rank(rank)
    self._thread = threading.Thread(target=target, name="train.py")
    self._thread.start()
    while self._thread.is_alive():  # short joins: signal handlers run in between
      self._thread.join(0.5)
    state = self._result
    if state.get("status") == "failed":
      raise RuntimeError(f"Trial {self.trial.name} failed: {state.get('error_line')}")
    return state

  def _run_rank0(self) -> None:
    import submitit  # pylint: disable=g-import-not-at-top
    job_id = str(submitit.JobEnvironment().job_id)
    self._result = sweep_runner.run_trial(self.sweep, self.trial, self.workdir,
                                          stopper=self._stopper,
                                          extra={"job_id": job_id, "job_pid": os.getpid()})

  def _run_other_rank(self, rank: int) -> None:
    """Tasks > 0 of a multi-node trial run the same train.py; task 0 keeps trial.json."""
    trial_dir = os.path.join(self.workdir, self.trial.name)
    command = sweeps.trial_command(self.sweep, self.trial, self.workdir)
    with open(os.path.join(trial_dir, f"train.rank{rank}.log"), "a", encoding="utf-8") as log:
      proc = sweep_runner.start_child(command, stdout=log, stderr=subprocess.STDOUT,
                                      cwd=sweeps.ROOT)
      self._stopper.add(proc)
      proc.wait()
    self._result = {"status": "finished" if proc.returncode == 0 else "failed",
                    "error_line": f"train.py exited with {proc.returncode} on task {rank}"}

  def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
    """On the scheduler's warning: train.py saves and exits, then the job is requeued."""
    del args, kwargs
    import submitit  # pylint: disable=g-import-not-at-top
    logging.warning("Trial %s: preempted or near its time limit; stopping train.py (it saves) "
                    "and requeueing.", self.trial.name)
    stopper, thread = getattr(self, "_stopper", None), getattr(self, "_thread", None)
    if stopper is not None:
      stopper.stop()
    if thread is not None:
      thread.join()
    return submitit.helpers.DelayedSubmission(TrialJob(self.sweep, self.trial, self.workdir))


JOB_FILE = "job.json"  # DIR/<trial>/job.json: the launcher and id of its latest job


def _write_job(trial_dir: str, launcher: str, job_id: str) -> None:
  path = os.path.join(trial_dir, JOB_FILE)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump({"launcher": launcher, "job_id": job_id, "submitted": time.time()}, f)
  os.replace(path + ".tmp", path)


def _read_job(trial_dir: str) -> dict[str, Any] | None:
  try:
    with open(os.path.join(trial_dir, JOB_FILE), encoding="utf-8") as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def _job_alive(launcher: str, workdir: str, job_id: str) -> bool:
  """Whether a trial's earlier job is still queued or running (so it is not submitted twice)."""
  if launcher == "slurm":
    import submitit  # pylint: disable=g-import-not-at-top
    try:
      state = submitit.SlurmJob(os.path.join(workdir, SUBMITIT_DIR, "%j"), job_id).state
    except Exception:  # pylint: disable=broad-except  # sacct unavailable: assume it ended
      return False
    return state.split()[0] not in _FINAL_SLURM_STATES if state != "UNKNOWN" else False
  try:  # submitit_local: the job id is its controller's pid
    os.kill(int(job_id), 0)
    return True
  except (OSError, ValueError):
    return False


def _todo(sweep: sweeps.Sweep, workdir: str, launcher: str) -> tuple[dict[str, str], list]:
  """{trial: status} of trials not to submit, and the trials to submit."""
  statuses, todo = {}, []
  for trial in sweep.trials:
    trial_dir = os.path.join(workdir, trial.name)
    state = sweep_runner.read_state(trial_dir)
    if sweep_runner.is_finished(state):
      logging.info("Trial %s: finished before; skipped.", trial.name)
      statuses[trial.name] = "finished"
    elif state and state.get("status") in ("pending", "running") and (job := _read_job(
        trial_dir)) and _job_alive(job["launcher"], workdir, job["job_id"]):
      logging.warning("Trial %s: job %s is still queued or running; skipped.", trial.name,
                      job["job_id"])
      statuses[trial.name] = state["status"]
    elif sweep_runner.running_elsewhere(trial_dir) is not None:
      logging.warning("Trial %s: still running elsewhere; skipped.", trial.name)
      statuses[trial.name] = "running"
    else:
      todo.append(trial)
  return statuses, todo


def submit_sweep(sweep: sweeps.Sweep, workdir: str, launcher: str, options: JobOptions,
                 wait: bool = True) -> dict[str, str]:
  """Submits every unfinished trial as a job; with `wait`, waits for them as run_sweep does.

  Returns {trial name: status}. Ctrl-C or SIGTERM while waiting cancels the jobs (their
  train.py saves first). Without `wait` the jobs' statuses are 'pending'; `sweep.py
  --summarize` (or the same command again) collects them later.
  """
  workdir = os.path.abspath(workdir)
  executor = make_executor(launcher, workdir, options)  # fails before anything is written
  sweeps.save_sweep(sweep, workdir)
  statuses, todo = _todo(sweep, workdir, launcher)
  if not todo:
    return statuses
  for trial in todo:  # before submitting: a job may start at once and write its own state
    trial_dir = os.path.join(workdir, trial.name)
    os.makedirs(trial_dir, exist_ok=True)
    state = sweep_runner.read_state(trial_dir) or {"name": trial.name, "attempts": 0,
                                                   "wall_time_s": 0.0}
    sweep_runner.write_state(trial_dir, dict(state, overrides=trial.overrides, status="pending",
                                             launcher=launcher, job_id=None))
    statuses[trial.name] = "pending"
  jobs = {}
  with executor.batch():  # one job array on SLURM
    for trial in todo:
      jobs[trial.name] = executor.submit(TrialJob(sweep, trial, workdir))
  for trial in todo:
    job_id = str(jobs[trial.name].job_id)
    _write_job(os.path.join(workdir, trial.name), launcher, job_id)
    logging.info("Trial %s: submitted as job %s (%s).", trial.name, job_id, launcher)
  if wait:
    statuses.update(wait_for_jobs(workdir, jobs))
  return statuses


def wait_for_jobs(workdir: str, jobs: dict[str, Any]) -> dict[str, str]:
  """Waits for the jobs; each trial's status is then its trial.json's. Ctrl-C cancels them."""
  cancelled = []

  def cancel(signum, frame):
    del frame
    logging.warning("%s received: cancelling the sweep's jobs (train.py saves first).",
                    signal.Signals(signum).name)
    for job in jobs.values():
      if not job.done():
        job.cancel(check=False)
    cancelled.append(signum)

  previous = {s: signal.signal(s, cancel) for s in (signal.SIGINT, signal.SIGTERM)}
  statuses: dict[str, str] = {}
  try:
    pending = dict(jobs)
    while pending:
      for name, job in list(pending.items()):
        if job.done():
          statuses[name] = _final_status(workdir, name, job, bool(cancelled))
          scores = {k: v for k, v in sweep_runner.read_run(os.path.join(workdir, name)).get(
              "metrics", {}).items() if k.endswith("/top1")}
          logging.info("Trial %s: %s (job %s%s).", name, statuses[name], job.job_id,
                       "".join(f", {k} {v:.4f}" for k, v in sorted(scores.items(), reverse=True)))
          del pending[name]
      time.sleep(1.0)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  return statuses


def _final_status(workdir: str, name: str, job: Any, cancelled: bool) -> str:
  """The trial's status once its job ended; a job that died before saying is 'failed'."""
  trial_dir = os.path.join(workdir, name)
  state = sweep_runner.read_state(trial_dir) or {}
  if state.get("status") in ("finished", "failed", "stopped"):
    return state["status"]
  status = "stopped" if cancelled else "failed"
  error = ""
  try:
    error = (job.stderr() or "")[-sweep_runner.ERROR_CHARS:]
  except Exception:  # pylint: disable=broad-except
    pass
  state.update(status=status, error=error or None,
               error_line=sweep_runner.error_line(error) or f"job {job.job_id} ended ({job.state})")
  sweep_runner.write_state(trial_dir, state)
  return status
