"""models.features: the captured representations are the model's own, from the same parameters."""
import os
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest

from conftest import ROOT, cpu_env
from mixer import models


def _model(token_mixing="batched"):
  model = models.create_model("Ti/4", 10, hidden_dim=16, num_blocks=3, tokens_mlp_dim=8,
                              channels_mlp_dim=32, token_mixing=token_mixing)
  params = models.init_params(model, 16, seed=0)
  # A non-zero head (it is initialised to zeros), so that equal logits mean something.
  head = params["head"]
  params["head"] = {"kernel": jax.random.normal(jax.random.key(1), head["kernel"].shape),
                    "bias": jax.random.normal(jax.random.key(2), head["bias"].shape)}
  images = jax.random.uniform(jax.random.key(3), (6, 16, 16, 3), minval=-1, maxval=1)
  return model, params, images


def test_names_in_depth_order_and_shapes():
  model, params, images = _model()
  logits, feats = models.features(model, params, images)
  assert list(feats) == models.feature_names(3) == ["stem", "block_0", "block_1", "block_2",
                                                     "pre_logits"]
  assert logits.shape == (6, 10)
  assert all(v.shape == (6, 16) for v in feats.values())


@pytest.mark.parametrize("token_mixing", ["batched", "transpose"])
def test_pre_logits_through_the_head_are_the_logits(token_mixing):
  model, params, images = _model(token_mixing)
  logits, feats = jax.jit(lambda p, x: models.features(model, p, x))(params, images)
  plain = model.apply({"params": params}, images, train=False)
  np.testing.assert_allclose(logits, plain, rtol=1e-6, atol=1e-6)
  head = params["head"]
  np.testing.assert_allclose(feats["pre_logits"] @ head["kernel"] + head["bias"], plain,
                             rtol=1e-5, atol=1e-5)


def test_block_outputs_equal_an_independent_recomputation():
  """Stem and blocks applied one by one as separate modules with the same parameters."""
  model, params, images = _model()
  _, feats = models.features(model, params, images)
  stem = flax.linen.Conv(16, (4, 4), strides=(4, 4), padding="VALID")
  x = stem.apply({"params": params["stem"]}, images)
  x = x.reshape(6, 16, 16)
  np.testing.assert_allclose(feats["stem"], x.mean(axis=1), rtol=1e-5, atol=1e-6)
  for k in range(3):
    block = models.MixerBlock(8, 32, token_mixing="transpose")
    x = block.apply({"params": params[f"MixerBlock_{k}"]}, x, train=False)
    np.testing.assert_allclose(feats[f"block_{k}"], x.mean(axis=1), rtol=1e-5, atol=1e-5)


def test_plain_apply_and_parameters_are_unchanged():
  """Sowing leaves model.apply's output alone (no collection returned) and adds no variables."""
  model, params, images = _model()
  out = model.apply({"params": params}, images, train=False)
  assert isinstance(out, jax.Array)
  variables = model.init(jax.random.key(0), images, train=False)
  assert set(variables) == {"params"}
  assert jax.tree.structure(variables["params"]) == jax.tree.structure(params)


SHARDED = r"""
import jax, numpy as np
from mixer import models, parallel
model = models.create_model("Ti/4", 10, hidden_dim=16, num_blocks=3, tokens_mlp_dim=8,
                            channels_mlp_dim=32)
params = models.init_params(model, 16, seed=0)
images = jax.random.uniform(jax.random.key(3), (6, 16, 16, 3), minval=-1, maxval=1)
mesh = parallel.make_mesh()
assert mesh.devices.size == 2
x = jax.device_put(images, parallel.batch_sharded(mesh))
p = jax.device_put(params, parallel.replicated(mesh))
logits, feats = jax.jit(lambda p, x: models.features(model, p, x))(p, x)
want_logits, want = models.features(model, params, images)
np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
for name, value in feats.items():
  assert value.sharding.is_equivalent_to(parallel.batch_sharded(mesh), 2), name
  np.testing.assert_allclose(value, want[name], rtol=1e-5, atol=1e-5)
print("ok")
"""


def test_features_of_a_batch_split_over_two_devices():
  """Jitted on a batch sharded over 2 (fake CPU) devices: sharded alike, the same numbers."""
  env = cpu_env(2)
  proc = subprocess.run([sys.executable, "-c", SHARDED], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
