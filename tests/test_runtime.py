"""Process set-up: the XLA:CPU flags that hand dots to oneDNN, and what they compile to."""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from mixer import runtime


@pytest.fixture
def env(monkeypatch):
  monkeypatch.setattr(runtime, "_jaxlib_version", lambda: "0.10.2")
  monkeypatch.delenv("MIXER_XLA_CPU", raising=False)
  return monkeypatch


def test_onednn_flags_are_added_once_beside_existing_ones(env):
  env.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  runtime.configure_xla_cpu()
  runtime.configure_xla_cpu()
  flags = runtime.os.environ["XLA_FLAGS"].split()
  assert flags == ["--xla_force_host_platform_device_count=8", *runtime.ONEDNN_DOT_FLAGS]
  assert runtime.xla_cpu_dots() == "onednn"


@pytest.mark.parametrize("setting, xla_flags, jaxlib", [
    ("default", "", "0.10.2"),                           # opted out
    ("onednn", "--xla_cpu_use_onednn=false", "0.10.2"),  # the user's own flag wins
    ("onednn", "", "0.11.0"),                            # flags not measured on this jaxlib
])
def test_onednn_flags_are_left_out(env, setting, xla_flags, jaxlib):
  env.setenv("MIXER_XLA_CPU", setting)
  env.setenv("XLA_FLAGS", xla_flags)
  env.setattr(runtime, "_jaxlib_version", lambda: jaxlib)
  runtime.configure_xla_cpu()
  assert runtime.os.environ["XLA_FLAGS"] == xla_flags
  assert runtime.xla_cpu_dots() == "default"


def test_this_process_compiles_dots_to_onednn_including_chains():
  """conftest configured this process; a chain of dots once killed oneDNN's compiler."""
  import jax  # pylint: disable=g-import-not-at-top
  assert runtime.xla_cpu_dots() == "onednn"
  rng = np.random.default_rng(0)
  a = rng.standard_normal((96, 64), np.float32)
  b = rng.standard_normal((64, 32), np.float32)
  chain = jax.jit(lambda a, b: (a @ b) @ b.T)
  assert "__onednn_fusion" in chain.lower(a, b).compile().as_text()
  expected = (a.astype(np.float64) @ b) @ b.T
  np.testing.assert_allclose(chain(a, b), expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("jax_platforms, plugins, devices, expected", [
    ("cpu", ["jax-cuda12-plugin"], ["nvidia0"], True),   # the user's choice wins
    ("cuda,cpu", [], [], False),
    ("", [], ["nvidia0"], True),                          # a GPU without JAX's CUDA plugin
    ("", ["jax-cuda12-plugin"], [], True),                # the plugin on a CPU-only node
    ("", ["jax-cuda12-plugin"], ["nvidia0"], False),
    ("", ["libtpu"], ["accel0"], False),
    ("", ["libtpu"], ["vfio/0"], False),
])
def test_cpu_tuning_is_decided_before_jax_starts(monkeypatch, tmp_path, jax_platforms, plugins,
                                                 devices, expected):
  for device in devices:
    (tmp_path / device).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / device).touch()
  monkeypatch.setenv("JAX_PLATFORMS", jax_platforms)
  monkeypatch.setattr(runtime, "_installed_distributions", lambda: ["numpy", *plugins])
  real_present = runtime.accelerator_present
  monkeypatch.setattr(runtime, "accelerator_present", lambda: real_present(str(tmp_path)))
  assert runtime.will_run_on_cpu() is expected


PROBE = ("import os, sys; from mixer import runtime; runtime.prepare_process(); "
         "print(sys.flags.utf8_mode, sys.flags.dont_write_bytecode, "
         "repr(os.environ.get('LD_PRELOAD', '')), repr(os.environ.get('XLA_FLAGS', '')), sep='|')")


def _probe(jax_platforms):
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "XLA_FLAGS")}
  env.update(JAX_PLATFORMS=jax_platforms, MIXER_ALLOCATOR="tcmalloc", MIXER_XLA_CPU="onednn")
  proc = subprocess.run([sys.executable, "-X", "utf8", "-B", "-c", PROBE], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  return proc.stdout.strip().split("|")


@pytest.mark.skipif(runtime.find_tcmalloc() is None, reason="tcmalloc is not installed")
def test_tcmalloc_reexec_keeps_the_interpreters_own_flags():
  utf8, no_bytecode, preload, _ = _probe("cpu")
  assert "tcmalloc" in preload  # re-executed ...
  assert (utf8, no_bytecode) == ("1", "1")  # ... with -X utf8 and -B still in force


def test_nothing_cpu_specific_when_jax_will_use_an_accelerator():
  assert _probe("cuda")[2:] == ["''", "''"]  # no tcmalloc re-exec, no XLA:CPU flags
