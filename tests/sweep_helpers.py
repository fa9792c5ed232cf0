"""What the sweep tests share: the smoke config, the environment of trials, the sweep CLI."""
import os
import subprocess
import sys

from conftest import ROOT, cpu_env
from mixer import sweep_runner

CONFIG = os.path.join(ROOT, "configs", "cifar100_ti.py:smoke")
ENV = {key: cpu_env(1)[key] for key in ("JAX_PLATFORMS", "XLA_FLAGS")}  # of every trial


def run_sweep_cli(*args, timeout=120):
  return subprocess.run([sys.executable, os.path.join(ROOT, "sweep.py"), *args], cwd=ROOT,
                        env=dict(os.environ, **ENV), capture_output=True, text=True,
                        timeout=timeout)


def read_text(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def state(workdir, name):
  return sweep_runner.read_state(os.path.join(workdir, name))
