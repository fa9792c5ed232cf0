"""mixer/evaluator.py: all test-time views through the model together (and in chunks of rows)
give the logits and metrics of one model call per view, on one device and on two."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, cpu_env
from mixer import data, evaluator, models, parallel



def reference_logits(model, params, images, flip, shift):
  """The per-view loop as predict_logits computed it before the views were stacked."""
  views = [evaluator.shifted(images, dy, dx) for dy, dx in evaluator.test_time_views(shift)]
  if flip:
    views += [v[:, :, ::-1, :] for v in views]
  logits = [model.apply({"params": params}, v, train=False).astype(jnp.float32) for v in views]
  return np.asarray(sum(logits[1:], logits[0]) / len(logits))


def reference_metrics(logits, labels):
  logits = np.asarray(logits, np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  top5 = np.argsort(-logits, axis=-1)[:, :5]
  return {"loss": -np.mean(logp[np.arange(len(labels)), labels]),
          "top1": np.mean(logits.argmax(-1) == labels),
          "top5": np.mean((top5 == labels[:, None]).any(-1))}


def small_model():
  model = models.create_model("Ti/8", 10, hidden_dim=32, num_blocks=2, tokens_mlp_dim=16,
                              channels_mlp_dim=48, token_mixing="batched")
  params = models.init_params(model, 32, 0)
  # init's zero head gives zero logits: move every parameter off its initial value
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(next(keys), p.shape), params)
  return model, params


def small_split(n=37):
  rng = np.random.default_rng(0)
  return data.Split(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                    rng.integers(0, 10, n).astype(np.int32), [str(i) for i in range(10)])


VIEWS = [(False, 0), (True, 0), (False, 2), (True, 2)]  # neither, flip, shift, both


@pytest.fixture(scope="module")
def model_and_params():
  return small_model()


@pytest.mark.parametrize("rows_per_apply", [None, 16])
@pytest.mark.parametrize("flip,shift", VIEWS)
def test_stacked_views_equal_one_model_call_per_view(model_and_params, flip, shift,
                                                     rows_per_apply):
  model, params = model_and_params
  images = data.to_float(jnp.asarray(small_split(24).images), 32)
  predict = jax.jit(lambda p, x: evaluator.predict_logits(model, p, x, flip, shift,
                                                          rows_per_apply))
  got = np.asarray(predict(params, images))
  want = reference_logits(model, params, images, flip, shift)
  assert got.shape == (24, 10)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  if flip or shift:  # the views do change the answer, so averaging them is being tested
    plain = reference_logits(model, params, images, False, 0)
    assert np.abs(plain - want).max() > 1e-3


def test_stacked_views_keep_each_examples_views_together():
  images = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
  stacked = np.asarray(evaluator.stacked_views(images, flip=True, shift=1))
  assert stacked.shape == (20, 4, 4, 1) and evaluator.num_views(True, 1) == 10
  np.testing.assert_array_equal(stacked[0], images[0])
  np.testing.assert_array_equal(stacked[5], images[0, :, ::-1])  # the first view's mirror
  np.testing.assert_array_equal(stacked[10], images[1])
  np.testing.assert_array_equal(stacked[12], evaluator.shifted(images, 1, 0)[1])  # moved down


@pytest.mark.parametrize("per_device,views,rows,want", [
    (500, 10, 64, 5), (500, 1, 64, 50), (12, 10, 64, 6), (7, 10, 64, 1), (12, 10, None, 12),
    (3, 1, 64, 3)])
def test_chunk_examples_divides_the_batch(per_device, views, rows, want):
  assert evaluator.chunk_examples(per_device, views, rows) == want


@pytest.mark.parametrize("rows_per_apply", [None, 0, 20])
def test_evaluator_metrics_equal_the_per_view_reference(model_and_params, rows_per_apply):
  """37 examples in batches of 16 (the last one padded), 10 views, in chunks or at once."""
  model, params = model_and_params
  split = small_split()
  score = evaluator.Evaluator(model, split, 32, 16, parallel.make_mesh(), flip=True, shift=2,
                              prefix="val", rows_per_apply=rows_per_apply)
  got = score(params, keep_logits=True)
  logits = reference_logits(model, params, data.to_float(jnp.asarray(split.images), 32), True, 2)
  want = reference_metrics(logits, split.labels)
  np.testing.assert_allclose(got["logits"], logits, rtol=1e-5, atol=1e-6)
  assert got["val/num_examples"] == 37
  np.testing.assert_allclose(got["val/loss"], want["loss"], rtol=1e-5)
  assert got["val/top1"] == want["top1"] and got["val/top5"] == want["top5"]
  assert 0 < want["top1"] < 1  # not a degenerate split


TWO_DEVICES = r"""
import json, re, sys
sys.path.insert(0, "tests")
import jax.numpy as jnp, numpy as np
from mixer import data, evaluator, parallel
from test_evaluator import reference_logits, reference_metrics, small_model, small_split
mesh = parallel.make_mesh()
model, params = small_model()
split = small_split()
images = data.to_float(jnp.asarray(split.images), 32)
out = {"devices": mesh.devices.size, "cases": []}
for rows in (0, 20):
  for flip, shift in ((False, 0), (True, 0), (False, 2), (True, 2)):
    score = evaluator.Evaluator(model, split, 32, 24, mesh, flip=flip, shift=shift,
                                rows_per_apply=rows)
    got = score(params, keep_logits=True)
    logits = reference_logits(model, params, images, flip, shift)
    want = reference_metrics(logits, split.labels)
    hlo = score.step.lower(params, *score.arrays, np.int32(0)).compile().as_text()
    out["cases"].append({
        "rows": rows, "flip": flip, "shift": shift,
        "max_diff": float(np.abs(got["logits"] - logits).max()),
        "loss": [float(got["eval/loss"]), float(want["loss"])],
        "top1": [float(got["eval/top1"]), float(want["top1"])],
        "top5": [float(got["eval/top5"]), float(want["top5"])],
        "collectives": sorted(set(re.findall(
            r"(all-gather|all-to-all|all-reduce|collective-permute|reduce-scatter)", hlo))),
        "shapes": sorted(set(re.findall(r"f32\[([\d,]*),32,32,3\]", hlo)))})
print(json.dumps(out))
"""


def test_two_devices_give_the_reference_metrics_each_on_its_own_examples():
  """Batch 24 over 2 devices: 12 examples each, whose views (120 rows with 10 views, or
  chunks of 2 examples x 10 views) never leave their device: the only collective is the
  all-reduce of the metric sums, and no array holds the 240 view rows of the whole batch."""
  env = cpu_env(2)
  proc = subprocess.run([sys.executable, "-c", TWO_DEVICES], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == 2 and len(out["cases"]) == 8
  for case in out["cases"]:
    assert case["max_diff"] < 1e-5, case
    np.testing.assert_allclose(*case["loss"], rtol=1e-5)
    assert case["top1"][0] == case["top1"][1] and case["top5"][0] == case["top5"][1], case
    assert case["collectives"] == ["all-reduce"], case
    views = evaluator.num_views(case["flip"], case["shift"])
    assert str(24 * views) not in case["shapes"], case  # never the whole batch's views
    if case["rows"] == 0:
      assert str(12 * views) in case["shapes"], case  # one device's examples, all views
    else:
      chunk = evaluator.chunk_examples(12, views, 20) * views
      assert str(chunk) in case["shapes"], case
