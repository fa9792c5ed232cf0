"""Shared fixtures: a tiny config, mock CIFAR-100 data, and subprocess helpers."""
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import pytest
import tensorflow_datasets as tfds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mixer import data, runtime  # pylint: disable=wrong-import-position

runtime.configure_xla_cpu()  # before JAX starts: tests run the XLA:CPU kernels users get
jax.devices()  # XLA reads XLA_FLAGS once, here: this process keeps the default optimisation level

# Child processes (train.py, sweeps, multi-device scripts) run models of a few thousand
# parameters for a few steps: they are compile-bound, and LLVM -O0 cuts XLA:CPU's compile of the
# train step by a third (3.5 -> 2.4 s; a 6-step tiny run 10.8 -> 8.9 s). Same HLO, same oneDNN
# dots; the fused elementwise loops are unoptimised, and their results can differ in the last
# bit. What compares numbers with the kernels users run stays in this process.
CHILD_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), CHILD_XLA_FLAGS]))


def cpu_env(devices: int = 1, **extra: str) -> dict[str, str]:
  """The environment of a child process on `devices` fake CPU devices (and `extra`)."""
  return dict(os.environ, JAX_PLATFORMS="cpu", **extra,
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {CHILD_XLA_FLAGS}")


METADATA_DIR = os.path.join(ROOT, "tests", "tfds_metadata")
MOCK_EXAMPLES = 128

# A Mixer small enough that a dozen steps take seconds; every option is exercised.
TINY = {
    "model.variant": "Ti/8", "model.hidden_dim": 32, "model.num_blocks": 2,
    "model.tokens_mlp_dim": 16, "model.channels_mlp_dim": 64, "model.stoch_depth": 0.1,
    "model.dropout": 0.1, "batch_size": 32, "eval_batch_size": 48, "total_steps": 12,
    "warmup_epochs": 0.5, "log_every_steps": 3, "eval_every_steps": 6,
    "checkpoint_every_steps": 6, "keep_checkpoints": 2, "mixup_alpha": 0.2, "cutmix_alpha": 0.2,
}


def tiny_config(**overrides):
  from configs import cifar100_ti  # pylint: disable=g-import-not-at-top
  config = cifar100_ti.get_config("smoke")
  for key, value in {**TINY, **overrides}.items():
    parent = config
    *path, leaf = key.split(".")
    for part in path:
      parent = parent[part]
    parent[leaf] = value
  return config


def tiny_flags(**overrides):
  return [f"--config.{k}={v}" for k, v in {**TINY, **overrides}.items()]


@pytest.fixture
def mock_cifar():
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES, data_dir=METADATA_DIR):
    yield


def run_mock_train(workdir, *flags, devices=1, env=None, check=True, timeout=300):
  """Runs tests/mock_train.py in a fresh process with `devices` fake CPU devices."""
  full_env = dict(cpu_env(devices), **(env or {}))
  cmd = [sys.executable, os.path.join(ROOT, "tests", "mock_train.py"),
         "--config=" + os.path.join(ROOT, "configs", "cifar100_ti.py:smoke"),
         f"--workdir={workdir}", *flags]
  proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout,
                        cwd=ROOT)
  if check and proc.returncode != 0:
    raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-5000:]}")
  return proc


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def metric_at(rows, name, step):
  values = [r[name] for r in rows if r["step"] == step and name in r]
  assert values, f"no {name} at step {step}"
  return values[-1]


_PERCENT_SLICE = re.compile(r"^(\w+)\[(\d*)%?:(\d*)%?\]$")


@contextlib.contextmanager
def sliced_mock_cifar():
  """Mock CIFAR-100 whose `split[a%:b%]` slices hold those rows of the split.

  tfds.testing.mock_data ignores slices (every split is the same examples), so validation
  splits cut from train would overlap it; the real slicing is tested on real data.
  """
  load = data.load_split

  def load_split(dataset, split, data_dir=None):
    match = _PERCENT_SLICE.match(split)
    if not match:
      return load(dataset, split, data_dir)
    full = load(dataset, match[1], data_dir)
    lo, hi = (len(full) * int(p or d) // 100 for p, d in ((match[2], 0), (match[3], 100)))
    cut = lambda x: None if x is None else x[lo:hi]
    return dataclasses.replace(full, images=cut(full.images), labels=cut(full.labels),
                               coarse_labels=cut(full.coarse_labels))

  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES, data_dir=METADATA_DIR), \
       pytest.MonkeyPatch.context() as patch:
    patch.setattr(data, "load_split", load_split)
    yield
