"""The optimizers beyond AdamW and SGD (muon, schedule_free_adamw, lion): they train, resume
bit-exactly, decay kernels only, route parameters as documented, and bad names are refused."""
import logging
import os
import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import METADATA_DIR, MOCK_EXAMPLES, run_mock_train, tiny_config, tiny_flags
from mixer import (checkpoints, config_lib, data, errors, metrics, models, optim, saved_runs,
                   train_lib, train_step)

NEW = ("muon", "schedule_free_adamw", "lion")
# Learning rates in each optimizer's convention (muon's and schedule-free's AdamW's, lion's
# ~3x smaller).
LEARNING_RATE = {"muon": 3e-3, "schedule_free_adamw": 3e-3, "lion": 1e-3}
# A run short enough for three optimizers: checkpoints at 4 and 8, warmup 2 steps.
RUN = {"total_steps": 8, "checkpoint_every_steps": 4, "eval_every_steps": 8,
       "log_every_steps": 4}


def _config(name, **overrides):
  return tiny_config(optimizer=name, learning_rate=LEARNING_RATE[name], **overrides)


def _flat(tree):
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _params(config):
  return models.init_params(models.build_model(config, 100), config.image_size, config.seed)


def _random_like(tree):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  return treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module")
def batch():
  """64 fixed mock CIFAR-100 images as floats, and their labels."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES, data_dir=METADATA_DIR):
    split = data.load_split("cifar100", "train")
  return data.to_float(jnp.asarray(split.images[:64]), 32), jnp.asarray(split.labels[:64])


def _train(config, batch, steps, schedule=None):
  """`steps` updates of config's optimizer on one fixed batch (no dropout): the losses at the
  parameters before each step and after the last, and the final (params, opt_state)."""
  model = models.build_model(config, 100)
  images, labels = batch
  tx = optim.make_optimizer(config, schedule or optax.constant_schedule(config.learning_rate))

  def loss_fn(params):
    logits = model.apply({"params": params}, images, train=False)
    return metrics.cross_entropy(logits, jax.nn.one_hot(labels, 100)).mean()

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params = _params(config)
  opt_state, losses = tx.init(params), []
  for _ in range(steps):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  losses.append(float(jax.jit(loss_fn)(params)))
  return losses, params, opt_state, jax.jit(loss_fn)


@pytest.mark.parametrize("name", NEW)
def test_a_few_steps_lower_the_loss(name, batch):
  losses, params, opt_state, loss_fn = _train(_config(name), batch, steps=10)
  # The head starts at zero: the first loss is log(100) whatever the optimizer.
  assert abs(losses[0] - np.log(100)) < 1e-3
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  assert losses[-1] < losses[0] - 0.15, losses
  evaluated = optim.eval_params(_config(name), opt_state, params)
  assert float(loss_fn(evaluated)) < losses[0] - 0.1


def test_schedule_free_eval_params_are_optax_s_and_differ_from_the_trained(batch):
  config = _config("schedule_free_adamw")
  _, params, opt_state, _ = _train(config, batch, steps=5)
  with jax.transfer_guard("disallow"):  # as in the training loop
    evaluated = jax.block_until_ready(optim.eval_params(config, opt_state, params))
  state = opt_state[-1]  # after the clipping's
  assert isinstance(state, optax.contrib.ScheduleFreeState)
  jitted = jax.jit(optax.contrib.schedule_free_eval_params)(state, params)
  eager = optax.contrib.schedule_free_eval_params(state, params)
  assert _flat(evaluated).keys() == _flat(params).keys()
  for key, value in _flat(jitted).items():
    np.testing.assert_array_equal(_flat(evaluated)[key], value, err_msg=key)
    # Eagerly, without XLA's fusion: the same up to the last bit.
    np.testing.assert_allclose(_flat(evaluated)[key], _flat(eager)[key], rtol=1e-6, atol=1e-9)
  differences = [np.abs(_flat(evaluated)[k] - v).max() for k, v in _flat(params).items()]
  assert max(differences) > 1e-4
  # The other optimizers evaluate the trained parameters themselves.
  assert optim.eval_params(_config("lion"), opt_state, params) is params


def test_schedule_free_eval_params_from_a_checkpoint_read_without_target(batch, tmp_path):
  """evaluate.py, predict.py and export.py restore raw trees (dicts): the same parameters."""
  config = _config("schedule_free_adamw")
  _, params, opt_state, _ = _train(config, batch, steps=3)
  manager = checkpoints.Checkpoints(str(tmp_path), keep=1)
  manager.save(3, train_step.TrainState(step=jnp.asarray(3), params=params, opt_state=opt_state))
  manager.close()
  raw = checkpoints.Checkpoints(str(tmp_path), read_only=True).restore(3)
  assert isinstance(raw["opt_state"][-1], dict)
  restored = optim.eval_params(config, raw["opt_state"], raw["params"])
  for key, value in _flat(optim.eval_params(config, opt_state, params)).items():
    np.testing.assert_array_equal(_flat(restored)[key], value, err_msg=key)
  with pytest.raises(ValueError, match="schedule-free"):
    optim.eval_params(config, raw["opt_state"][:1], raw["params"])


def test_schedule_free_is_optax_s_schedule_free_adamw_with_a_decay_mask(batch):
  schedule = optax.warmup_constant_schedule(0.0, 3e-3, 2)
  ours = optim.schedule_free_adamw(schedule, 0.1, mask=None)  # the alias decays everything
  theirs = optax.contrib.schedule_free_adamw(schedule, weight_decay=0.1)
  params = _params(_config("schedule_free_adamw"))
  grads = _random_like(params)
  s_ours, s_theirs = ours.init(params), theirs.init(params)
  for _ in range(3):
    u_ours, s_ours = ours.update(grads, s_ours, params)
    u_theirs, s_theirs = theirs.update(grads, s_theirs, params)
    for key, value in _flat(u_theirs).items():
      np.testing.assert_array_equal(_flat(u_ours)[key], value, err_msg=key)
    params = optax.apply_updates(params, u_ours)


def test_schedule_free_warms_up_then_stays_constant():
  schedule = optim.learning_rate_schedule(
      tiny_config(optimizer="schedule_free_adamw", learning_rate=2e-3, warmup_epochs=1.0),
      total_steps=100, steps_per_epoch=10)
  assert [float(schedule(s)) for s in (0, 5)] == [0.0, pytest.approx(1e-3)]
  assert all(float(schedule(s)) == pytest.approx(2e-3) for s in (10, 50, 99, 1000))
  cosine = optim.learning_rate_schedule(tiny_config(learning_rate=2e-3, warmup_epochs=1.0),
                                        total_steps=100, steps_per_epoch=10)
  assert float(cosine(99)) < 1e-5  # the same config under AdamW decays


def test_muon_takes_the_hidden_kernels_and_adamw_the_rest():
  config = tiny_config(optimizer="muon", grad_clip_norm=0.0, weight_decay=0.0)
  params = _params(config)
  labels = flax.traverse_util.flatten_dict(optim.muon_labels(params), sep="/")
  muon = sorted(k for k, v in labels.items() if v == "muon")
  assert muon == sorted(f"MixerBlock_{b}/{mixing}/Dense_{d}/kernel" for b in range(2)
                        for mixing in ("token_mixing", "channel_mixing") for d in range(2))
  assert labels["stem/kernel"] == labels["head/kernel"] == "adamw"
  # Each half gives exactly the update its optax optimizer gives those parameters alone.
  grads = _random_like(params)
  tx = optim.make_optimizer(config, optax.constant_schedule(1e-2))
  updates, _ = tx.update(grads, tx.init(params), params)
  updates = flax.traverse_util.flatten_dict(updates, sep="/")
  flat_p = flax.traverse_util.flatten_dict(params, sep="/")
  flat_g = flax.traverse_util.flatten_dict(grads, sep="/")
  for key, alone in (("MixerBlock_1/channel_mixing/Dense_0/kernel",
                      optax.contrib.muon(1e-2, consistent_rms=optim.MUON_CONSISTENT_RMS)),
                     ("stem/kernel", optax.adamw(1e-2, weight_decay=0.0)),
                     ("head/kernel", optax.adamw(1e-2, weight_decay=0.0))):
    expected, _ = alone.update({key: flat_g[key]}, alone.init({key: flat_p[key]}),
                               {key: flat_p[key]})
    # Newton-Schulz's matmuls round differently at other shapes and fusions: ~1e-8 of ~1e-3.
    np.testing.assert_allclose(updates[key], expected[key], rtol=1e-4, atol=1e-7, err_msg=key)
  # Muon's orthogonalized update is not AdamW's.
  key = "MixerBlock_1/channel_mixing/Dense_0/kernel"
  adamw = optax.adamw(1e-2, weight_decay=0.0)
  adamw_update, _ = adamw.update({key: flat_g[key]}, adamw.init({key: flat_p[key]}),
                                 {key: flat_p[key]})
  assert np.abs(updates[key] - adamw_update[key]).max() > 1e-4


@pytest.mark.parametrize("name", ("adamw", "muon", "lion"))
def test_weight_decay_is_on_kernels_only(name):
  """With zero gradients only decoupled decay moves: kernels by -lr * wd * p, the rest not."""
  config = tiny_config(optimizer=name, weight_decay=0.5)
  params = _params(config)
  params = jax.tree.map(lambda p: p + 0.5, params)  # no zero biases, scales != 1
  tx = optim.make_optimizer(config, optax.constant_schedule(0.1))
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  for key, update in _flat(updates).items():
    p = _flat(params)[key]
    expected = -0.1 * 0.5 * p if p.ndim > 1 else np.zeros_like(p)
    np.testing.assert_allclose(update, expected, rtol=1e-5, atol=1e-7, err_msg=key)


def test_schedule_free_decays_kernels_only():
  config = tiny_config(optimizer="schedule_free_adamw", weight_decay=0.5)
  params = jax.tree.map(lambda p: p + 0.5, _params(config))
  tx = optim.make_optimizer(config, optax.constant_schedule(0.1))
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  for key, update in _flat(updates).items():
    p = _flat(params)[key]
    if p.ndim > 1:
      assert np.all(np.abs(p + update) < np.abs(p)), key
    else:
      np.testing.assert_allclose(update, 0.0, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("name", NEW)
def test_resume_is_bit_exact(name, mock_cifar, tmp_path, caplog):
  """8 steps straight vs 4, stop, resume to 8: the same parameters and optimizer state."""
  config = _config(name, **RUN)
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train_lib.train_and_evaluate(config, straight)
  shutil.copytree(straight, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "8"))  # as if stopped after step 4
  with caplog.at_level(logging.INFO):
    result = train_lib.train_and_evaluate(_config(name, **RUN), resumed)
  assert result.status == "finished" and result.step == 8
  assert "Resuming from the checkpoint at step 4" in caplog.text
  states = [checkpoints.Checkpoints(w, read_only=True).restore(8) for w in (straight, resumed)]
  first, second = (_flat({"params": s["params"], "opt_state": s["opt_state"]}) for s in states)
  assert first.keys() == second.keys()
  assert any("opt_state" in key for key in first)
  for key, value in first.items():
    np.testing.assert_array_equal(second[key], value, err_msg=key)
  start = _flat(_params(config))
  assert any(not np.array_equal(first[f"['params']{k}"], v) for k, v in start.items())
  # evaluate.py, predict.py and export.py read the parameters the optimizer evaluates.
  _, _, restored = saved_runs.restore_params(resumed, 8)
  expected = _flat(optim.eval_params(config, states[1]["opt_state"], states[1]["params"]))
  for key, value in _flat(restored).items():
    np.testing.assert_array_equal(value, expected[key], err_msg=key)
  moved = any(not np.array_equal(v, second[f"['params']{k}"]) for k, v in _flat(restored).items())
  assert moved == (name == "schedule_free_adamw")


def test_unknown_optimizer_is_one_config_error_naming_the_valid_ones():
  with pytest.raises(errors.ConfigError) as info:
    config_lib.validate(tiny_config(optimizer="muonn"))
  message = str(info.value)
  assert message.startswith("config.optimizer='muonn' is invalid: expected one of ")
  assert "\n" not in message
  for name in config_lib.OPTIMIZERS:
    assert repr(name) in message
  assert optim.OPTIMIZERS == config_lib.OPTIMIZERS  # every name validated has a builder
  with pytest.raises(errors.ConfigError, match="'schedule_free_adamw'"):
    optim.make_optimizer(tiny_config(optimizer="muonn"), optax.constant_schedule(1.0))


def test_schedule_free_with_a_weight_ema_is_refused():
  config_lib.validate(tiny_config(optimizer="schedule_free_adamw"))
  with pytest.raises(errors.ConfigError, match=r"config\.ema_decay=0\.999 is invalid: .*set ema_decay=0"):
    config_lib.validate(tiny_config(optimizer="schedule_free_adamw", ema_decay=0.999))


def test_unknown_optimizer_on_the_command_line_is_one_error_line(tmp_path):
  workdir = tmp_path / "run"
  proc = run_mock_train(str(workdir), *tiny_flags(), "--config.optimizer=muonn", check=False,
                        timeout=120)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert lines == ["error: config.optimizer='muonn' is invalid: expected one of 'adamw', "
                   "'sgd', 'muon', 'schedule_free_adamw', 'lion'."], proc.stderr[-3000:]
  assert not workdir.exists()
