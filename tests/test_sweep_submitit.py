"""sweep.py --launcher=submitit_local|slurm: the submitit path, run here with submitit's local
executor (the SLURM executor differs only in submitting through sbatch)."""
import json
import os
import signal
import subprocess
import sys
import time

import flax
import numpy as np
import pytest

from conftest import ROOT
from test_sweeps import BASE, CONFIG, ENV, MOCK_TRAIN
from mixer import checkpoints, sweep_runner, sweep_submitit, sweep_summary, sweeps

pytestmark = pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning")
OPTIONS = sweep_submitit.JobOptions(time_min=30)


@pytest.fixture
def trial_env(monkeypatch):
  for key, value in ENV.items():  # submitit's jobs inherit this process's environment
    monkeypatch.setenv(key, value)


def final_params(trial_dir):
  manager = checkpoints.Checkpoints(trial_dir, read_only=True)
  restored = manager.restore(manager.latest_step())
  manager.close()
  return flax.traverse_util.flatten_dict(restored["params"], sep="/")


def read_job(workdir, trial):
  """The trial's job as its trial.json records it (no job.json any more)."""
  state = sweep_runner.read_state(os.path.join(workdir, trial.name))
  return {key: state[key] for key in ("launcher", "job_id", "job_pid")}


def test_slurm_launcher_without_slurm_is_one_line_and_creates_nothing(tmp_path):
  workdir = tmp_path / "sweep"
  env = dict(os.environ, **ENV, PATH=os.path.dirname(sys.executable) + ":/usr/bin:/bin")
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "sweep.py"), f"--config={CONFIG}",
                         f"--workdir={workdir}", "--sweep=learning_rate=[1e-3]",
                         "--launcher=slurm"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: --launcher=slurm needs SLURM (sbatch is not on PATH here); use "
      "--launcher=local, or --launcher=submitit_local for the same path locally.")
  assert not workdir.exists()


def test_two_trial_sweep_completes_and_is_summarized(tmp_path, trial_env):
  """Two good trials and one that fails at run time, as the local runner's test has."""
  workdir = str(tmp_path / "sweep")
  trials = [{"learning_rate": 1e-3}, {"learning_rate": 4e-3},
            {"learning_rate": 1e-3, "dataset": "no_such_dataset"}]
  sweep = sweeps.make_sweep(CONFIG, trials, BASE, train_script=MOCK_TRAIN)
  good, failing = sweep.trials[:2], sweep.trials[2]
  statuses = sweep_submitit.submit_sweep(sweep, workdir, "submitit_local", OPTIONS)
  assert statuses == {**{t.name: "finished" for t in good}, failing.name: "failed"}
  for trial in good:
    state = sweep_runner.read_state(os.path.join(workdir, trial.name))
    assert state["status"] == "finished" and state["attempts"] == 1 and state["job_id"]
    assert state["launcher"] == "submitit_local"
    assert not os.path.exists(os.path.join(workdir, trial.name, "job.json"))
  failed = sweep_runner.read_state(os.path.join(workdir, failing.name))
  assert "no_such_dataset" in failed["error_line"]
  rows = sweep_summary.summarize(workdir)
  assert sorted(r["trial"] for r in rows) == sorted(t.name for t in sweep.trials)
  assert sorted(r["final_step"] for r in rows if r["status"] == "finished") == [4, 4]
  # Submitting the good trials again skips them and submits nothing.
  jobs = [read_job(workdir, t) for t in good]
  again = sweep_submitit.submit_sweep(sweeps.make_sweep(CONFIG, trials[:2], BASE,
                                                        train_script=MOCK_TRAIN),
                                      workdir, "submitit_local", OPTIONS)
  assert again == {t.name: "finished" for t in good}
  assert [read_job(workdir, t) for t in good] == jobs


def test_preempted_trial_is_requeued_and_ends_as_an_uninterrupted_one(tmp_path, trial_env):
  """Two identical trainings (checkpoint intervals differ, which changes no number); one gets
  the scheduler's warning signal mid-run: train.py saves, the job is requeued and resumes."""
  workdir = str(tmp_path / "sweep")
  base = {**BASE, "total_steps": 300, "log_every_steps": 1, "eval_every_steps": 1000}
  sweep = sweeps.make_sweep(CONFIG, [{"checkpoint_every_steps": 1000},
                                     {"checkpoint_every_steps": 999}], base,
                            train_script=MOCK_TRAIN)
  plain, preempted = (os.path.join(workdir, t.name) for t in sweep.trials)
  executor = sweep_submitit.make_executor("submitit_local", workdir, OPTIONS)
  sweeps.save_sweep(sweep, workdir)
  jobs = {t.name: executor.submit(sweep_submitit.TrialJob(sweep, t, workdir))
          for t in sweep.trials}
  metrics = os.path.join(preempted, "metrics.jsonl")
  deadline = time.time() + 120
  while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics)):
    time.sleep(0.05)
  job_pid = sweep_runner.read_state(preempted)["job_pid"]
  os.kill(job_pid, signal.SIGUSR2)  # what SLURM sends before a time limit or preemption
  statuses = sweep_submitit.wait_for_jobs(workdir, jobs)
  assert set(statuses.values()) == {"finished"}
  state = sweep_runner.read_state(preempted)
  assert state["attempts"] == 2 and state["job_pid"] != job_pid
  log = open(os.path.join(preempted, sweep_runner.LOG_FILE), encoding="utf-8").read()
  assert "Stopped by SIGTERM" in log and "Resuming from the checkpoint at step" in log
  a, b = final_params(plain), final_params(preempted)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  runs = [json.load(open(os.path.join(d, "run.json"), encoding="utf-8")) for d in (plain, preempted)]
  assert runs[0]["step"] == runs[1]["step"] == 300 and runs[0]["metrics"] == runs[1]["metrics"]
