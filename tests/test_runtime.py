"""Process set-up: the XLA:CPU flags that hand dots to oneDNN, and what they compile to."""
import numpy as np
import pytest

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
