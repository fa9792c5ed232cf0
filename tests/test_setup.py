"""The set-up picks the jax build and the recipe for the machine (scripts/detect_accelerator.sh,
Makefile)."""
import os
import subprocess

import pytest

from conftest import ROOT

DETECT = os.path.join(ROOT, "scripts", "detect_accelerator.sh")


def detect(tmp_path, devices=(), cuda_version=None):
  dev, bin_dir = tmp_path / "dev", tmp_path / "bin"
  for device in devices:
    (dev / device).parent.mkdir(parents=True, exist_ok=True)
    (dev / device).touch()
  bin_dir.mkdir()
  smi = bin_dir / "nvidia-smi"  # shadows a real one: the answer depends on the fake alone
  smi.write_text("#!/bin/sh\n" + (f"echo '| NVIDIA-SMI 580.1  Driver Version: 580.1  CUDA Version: "
                                  f"{cuda_version}  |'\n" if cuda_version else "exit 9\n"))
  smi.chmod(0o755)
  env = dict(os.environ, DEV_ROOT=str(dev), PATH=f"{bin_dir}:/usr/bin:/bin")
  return subprocess.run([DETECT], env=env, capture_output=True, text=True,
                        check=True).stdout.strip()


@pytest.mark.parametrize("devices, cuda_version, expected", [
    ((), None, ""),
    (("nvidia0", "nvidiactl"), "12.8", "cuda12"),
    (("nvidia0",), "13.0", "cuda13"),
    (("accel0",), None, "tpu"),
    (("vfio/0",), None, "tpu"),
])
def test_detects_the_jax_build_this_machine_needs(tmp_path, devices, cuda_version, expected):
  assert detect(tmp_path, devices, cuda_version) == expected


@pytest.mark.parametrize("make_args, chosen, installs", [
    (["JAX_EXTRA="], "configs/cifar100_cpu_hour.py (no GPU/TPU", '".[test]"'),
    (["JAX_EXTRA=cuda12"], "configs/cifar100_s.py (a GPU/TPU is present (jax[cuda12]))",
     '".[test,cuda12]"'),
    (["JAX_EXTRA=tpu", "CONFIG=configs/cifar100_ti.py"], "configs/cifar100_ti.py (CONFIG= given)",
     '".[test,tpu]"'),
])
def test_make_train_picks_the_recipe_and_jax_build(tmp_path, make_args, chosen, installs):
  """Dry run (make -n) with a fresh venv path: what `make train` would install and train."""
  proc = subprocess.run(["make", "-n", "train", f"VENV={tmp_path / 'venv'}", *make_args],
                        cwd=ROOT, capture_output=True, text=True, check=True)
  assert f"make train: {chosen}" in proc.stdout
  assert f"pip install -q -e {installs}" in proc.stdout
