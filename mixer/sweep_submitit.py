"""The submitit launcher: each trial a SLURM job (or a local submitit job), requeued on preemption.

`sweep.py --launcher=slurm` (or `submitit_local`, the same path on this machine). The trials
have the local launcher's life cycle (mixer/sweep_runner.py: `plan`, `run_trial`, trial.json,
train.log, skip-finished and resume); trial.json also records the trial's job (launcher and
job id), so that a trial whose job is still queued is not submitted twice. submitit's own
files (pickles, job stdout/stderr) go to DIR/submitit/.

Each job runs `TrialJob`: `run_trial` from a thread, so that the job's main thread stays free
for signals. When the scheduler signals the job before its time limit or a preemption (USR2,
`signal_delay_s` ahead: submitit's `--signal`), submitit calls `TrialJob.checkpoint`: it
stops train.py (SIGTERM: it finishes its step, saves a checkpoint and exits) and the job is
requeued; train.py then resumes from that checkpoint. A SIGTERM from SLURM itself (scancel,
preemption without the warning) reaches train.py directly and it saves the same way. A
trial of several nodes runs one task per node; train.py finds its processes from srun's
environment (runtime.slurm_step_tasks) and task 0 keeps trial.json.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
import time
from typing import Any

from mixer import errors, sweep_children, sweep_runner, sweeps

LAUNCHERS = ("local", "slurm", "submitit_local")


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


def make_executor(launcher: str, sweep_dir: str, options: JobOptions) -> Any:
  """A submitit executor for `launcher` ('slurm' or 'submitit_local'), its files in DIR/submitit."""
  try:
    import submitit  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.ConfigError(f"--launcher={launcher} needs submitit: pip install "
                             "'submitit>=1.5,<2' (or use --launcher=local).") from e
  folder = os.path.join(sweep_dir, sweep_runner.SUBMITIT_DIR, "%j")
  if launcher == "slurm":
    if shutil.which("sbatch") is None:
      raise errors.SweepError("--launcher=slurm needs SLURM (sbatch is not on PATH here); use "
                              "--launcher=local, or --launcher=submitit_local for the same "
                              "path locally.")
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=options.max_requeues)
    optional = {"partition": options.partition, "cpus_per_task": options.cpus_per_task,
                "gpus_per_node": options.gpus_per_trial or None,
                "mem": f"{options.mem_gb}GB" if options.mem_gb else None}
    executor.update_parameters(
        nodes=options.nodes, ntasks_per_node=1, time=options.time_min,
        signal_delay_s=options.signal_delay_s, job_name="mixer-sweep",
        additional_parameters={"requeue": True, **options.slurm_args},
        **{key: value for key, value in optional.items() if value is not None})
  elif launcher == "submitit_local":
    if options.nodes != 1:
      raise errors.SweepError("--launcher=submitit_local runs on this machine: --slurm_nodes "
                              "must be 1.")
    executor = submitit.LocalExecutor(folder=folder, max_num_timeout=options.max_requeues)
    executor.update_parameters(timeout_min=options.time_min, tasks_per_node=1,
                               gpus_per_node=options.gpus_per_trial,
                               signal_delay_s=options.signal_delay_s)
  else:
    raise errors.SweepError(f"Unknown launcher {launcher!r}: expected one of {LAUNCHERS}.")
  return executor


class TrialJob:
  """The callable a trial's job runs: `run_trial` to its end, stopped cleanly on the
  scheduler's signal and requeued (submitit calls `checkpoint`)."""

  def __init__(self, sweep: sweeps.Sweep, trial: sweeps.Trial, sweep_dir: str):
    self.sweep, self.trial, self.sweep_dir = sweep, trial, sweep_dir

  def __call__(self) -> dict[str, Any]:
    import submitit  # pylint: disable=g-import-not-at-top
    job = submitit.JobEnvironment()
    self._stopper = sweep_children.Stopper()  # not entered: submitit owns this job's signals
    self._result: dict[str, Any] = {}
    self._thread = threading.Thread(target=self._run, args=(job,), name="train.py")
    self._thread.start()
    while self._thread.is_alive():  # short joins: signal handlers run in between
      self._thread.join(0.5)
    if self._result.get("status") == "failed":  # the scheduler records the job as failed
      raise RuntimeError(f"Trial {self.trial.name} failed: {self._result.get('error_line')}")
    return self._result

  def _run(self, job: Any) -> None:
    if job.global_rank == 0:
      launcher = "slurm" if job.cluster == "slurm" else "submitit_local"
      self._result = sweep_runner.run_trial(
          self.sweep, self.trial, self.sweep_dir, self._stopper,
          job={"launcher": launcher, "job_id": str(job.job_id), "job_pid": os.getpid()})
      return
    # Tasks > 0 of a multi-node trial run the same train.py; task 0 keeps trial.json.
    proc = sweep_children.run_child(
        sweeps.trial_command(self.sweep, self.trial, self.sweep_dir),
        os.path.join(self.sweep_dir, self.trial.name, f"train.rank{job.global_rank}.log"),
        self._stopper)
    self._result = {"status": "finished" if proc.returncode == 0 else "failed",
                    "error_line": f"train.py exited with {proc.returncode} on task "
                                  f"{job.global_rank}"}

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
    return submitit.helpers.DelayedSubmission(TrialJob(self.sweep, self.trial, self.sweep_dir))


def submit_sweep(sweep: sweeps.Sweep, sweep_dir: str, launcher: str, options: JobOptions,
                 wait: bool = True) -> dict[str, str]:
  """Submits every trial that `plan` says to run as a job (one job array on SLURM); with
  `wait`, waits for them (`wait_for_jobs`). Returns {trial name: status}; without `wait` the
  jobs' statuses are 'pending' and `sweep.py --summarize` (or the same command again)
  collects them later."""
  sweep_dir = os.path.abspath(sweep_dir)
  executor = make_executor(launcher, sweep_dir, options)  # fails before anything is written
  statuses, todo = sweep_runner.plan(sweep, sweep_dir, launcher)
  if not todo:
    return statuses
  with executor.batch():
    jobs = {trial.name: executor.submit(TrialJob(sweep, trial, sweep_dir)) for trial in todo}
  for name, job in jobs.items():
    trial_dir = os.path.join(sweep_dir, name)
    state = sweep_runner.read_state(trial_dir)
    if state["status"] == "pending":  # else its job started and wrote its own id already
      sweep_runner.write_state(trial_dir, dict(state, job_id=str(job.job_id)))
    logging.info("Trial %s: submitted as job %s (%s).", name, job.job_id, launcher)
  if wait:
    statuses.update(wait_for_jobs(sweep_dir, jobs))
  return statuses


def wait_for_jobs(sweep_dir: str, jobs: dict[str, Any]) -> dict[str, str]:
  """Waits for the jobs ({trial name: job}); each trial's status is then its trial.json's (a
  job that ended without saying: 'failed'). Ctrl-C or SIGTERM cancels the jobs (their
  train.py saves first): 'stopped'."""
  statuses: dict[str, str] = {}
  with sweep_children.Stopper() as stopper:
    for job in jobs.values():
      stopper.add(lambda job=job: job.done() or job.cancel(check=False))
    pending = dict(jobs)
    while pending:
      for name, job in list(pending.items()):
        if job.done():
          trial_dir = os.path.join(sweep_dir, name)
          state = sweep_runner.read_state(trial_dir) or {}
          if state.get("status") not in ("finished", "failed", "stopped"):
            if sweep_runner.running_elsewhere(trial_dir) is not None:  # its job left it alone
              state["status"] = "running"
            else:  # the job ended before its train.py said how
              state.update(_job_end(job, stopper.requested))
              sweep_runner.write_state(trial_dir, state)
          statuses[name] = state["status"]
          sweep_runner.log_end(trial_dir, state)
          del pending[name]
      time.sleep(1.0)
  return statuses


def _job_end(job: Any, cancelled: bool) -> dict[str, Any]:
  """'stopped' when the sweep cancelled the job, else 'failed' with the job's stderr."""
  try:
    error = (job.stderr() or "")[-sweep_runner.ERROR_CHARS:]
  except Exception:  # pylint: disable=broad-except  # its files may be gone
    error = ""
  return {"status": "stopped" if cancelled else "failed", "error": error or None,
          "error_line": sweep_runner.error_line(error) or f"job {job.job_id} ended ({job.state})"}
