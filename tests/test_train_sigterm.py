"""SIGTERM during training: one process saves and exits 0; under srun's environment, SIGTERM
to one of two processes stops both at the same step and the run resumes bit-exactly.

(Apart from tests/test_train.py so that pytest-xdist's --dist loadfile can run them beside it.)
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

from conftest import ROOT, cpu_env, tiny_flags
from mixer import stop_signal


def test_sigterm_finishes_step_saves_and_exits_zero(tmp_path):
  workdir = str(tmp_path / "term")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "tests", "mock_train.py"),
       "--config=" + os.path.join(ROOT, "configs", "cifar100_ti.py:smoke"), f"--workdir={workdir}",
       *tiny_flags(total_steps=100000, log_every_steps=1, checkpoint_every_steps=100000,
                   eval_every_steps=100000)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 120
  while time.time() < deadline and not (os.path.exists(metrics_path)
                                        and os.path.getsize(metrics_path) > 0):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == 0, out[-5000:]
  assert "Stopped by SIGTERM" in out
  saved = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
  assert len(saved) == 1 and 0 < saved[0] < 100000


def _slurm_env(port, process_id):
  """The environment srun gives task `process_id` of 2 on one node; JAX's SLURM detection
  derives the coordinator's port from the job id (61440 + id % 4096)."""
  return cpu_env(1, SLURM_JOB_ID=str(port - 61440), SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
              SLURM_STEP_NUM_TASKS="2", SLURM_PROCID=str(process_id),
              SLURM_LOCALID=str(process_id), SLURM_NODEID="0")


def _free_slurm_port():
  for port in range(61440 + os.getpid() % 4000, 65536):
    with socket.socket() as s:
      try:
        s.bind(("localhost", port))
        return port
      except OSError:
        continue
  raise RuntimeError("no free port in JAX's SLURM range")


def _srun_like(workdir, flags):
  """Two train.py processes with srun's environment and no process flags."""
  port = _free_slurm_port()
  return [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "tests", "mock_train.py"),
       "--config=" + os.path.join(ROOT, "configs", "cifar100_ti.py:smoke"), f"--workdir={workdir}",
       *flags], env=_slurm_env(port, i), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(2)]


def test_sigterm_to_one_of_two_srun_processes_stops_both_at_one_step_and_resumes_exactly(
    tmp_path):
  """Under srun's environment train.py needs no process flags; SIGTERM to process 1 alone
  makes both save at the same step and exit 0; the same command then resumes bit-exactly."""
  flags = tiny_flags(total_steps=80, log_every_steps=1, checkpoint_every_steps=1000,
                     eval_every_steps=1000)
  reference, workdir = str(tmp_path / "reference"), str(tmp_path / "run")
  for p, out in [(p, p.communicate(timeout=300)[0]) for p in _srun_like(reference, flags)]:
    assert p.returncode == 0, out[-5000:]
  procs = _srun_like(workdir, flags)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 120
  while time.time() < deadline and not (os.path.exists(metrics_path)
                                        and os.path.getsize(metrics_path) > 0):
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=120)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  assert "in 2 process(es)" in outputs[0]
  stopped = [int(line.split("after step ")[1].split(",")[0]) for out in outputs
             for line in out.splitlines() if "Stopped by SIGTERM after step" in line]
  assert len(stopped) == 2 and stopped[0] == stopped[1] < 80
  assert stopped[0] % stop_signal.STOP_SYNC_STEPS == 0
  assert "Another process received SIGTERM" in outputs[0]
  saved = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
  assert saved == [stopped[0]]
  for p, out in [(p, p.communicate(timeout=300)[0]) for p in _srun_like(workdir, flags)]:
    assert p.returncode == 0 and "Resuming from the checkpoint" in out, out[-5000:]
  # A checkpoint of two processes' devices does not restore in this one process: compare
  # every step's logged loss and the final evaluation (printed with all their digits).
  rows = [[json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"), encoding="utf-8")]
          for d in (reference, workdir)]
  assert [r["step"] for r in rows[1] if "train/loss" in r] == list(range(1, 81))
  timing = lambda r: {k: v for k, v in r.items() if "per_sec" not in k and "seconds" not in k}
  assert [timing(r) for r in rows[0]] == [timing(r) for r in rows[1]]
