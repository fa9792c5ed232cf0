"""The recipe machinery around the train step: EMA, flip TTA, validation split, rng streams."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import (MOCK_EXAMPLES, ROOT, metric_at, read_metrics, sliced_mock_cifar,
                      tiny_config)
from mixer import (checkpoints, config_lib, data, evaluation, evaluator, models, optim, parallel,
                   rng_streams, saved_runs, sweep_summary, sweeps, train_lib, train_step)
from mixer import workdir as layout

RECIPE = {"randaugment_ops": 2, "randaugment_magnitude": 9, "random_erasing": 0.5,
          "ema_decay": 0.9, "eval_flip": True, "train_split": "train[:75%]",
          "val_split": "train[75%:]"}


def flat(tree):
  return flax.traverse_util.flatten_dict(tree, sep="/")


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
  """12 steps with every recipe option on: checkpoints at 6 and 12."""
  workdir = str(tmp_path_factory.mktemp("recipe"))
  with sliced_mock_cifar():
    result = train_lib.train_and_evaluate(tiny_config(**RECIPE), workdir)
  manager = checkpoints.Checkpoints(workdir, read_only=True)
  state = manager.restore(12)
  manager.close()
  return workdir, result, state


def test_recipe_run_writes_val_and_test_metrics(recipe_run):
  workdir, result, _ = recipe_run
  rows = read_metrics(workdir)
  for step in (6, 12):
    assert metric_at(rows, "val/num_examples", step) == MOCK_EXAMPLES // 4
    assert metric_at(rows, "eval/num_examples", step) == MOCK_EXAMPLES
  assert result.metrics["eval/num_examples"] == MOCK_EXAMPLES and "val/top1" in result.metrics


def test_best_checkpoint_is_chosen_by_val_top1(recipe_run):
  workdir, _, _ = recipe_run
  rows = read_metrics(workdir)
  val = {s: metric_at(rows, "val/top1", s) for s in (6, 12)}
  manager = checkpoints.Checkpoints(workdir, read_only=True)
  assert val[manager.best_step()] == max(val.values())
  assert manager.best_step() in manager.all_steps()
  manager.close()


def test_without_val_split_there_is_no_best_checkpoint(mock_cifar, tmp_path):
  workdir = str(tmp_path / "run")
  train_lib.train_and_evaluate(tiny_config(total_steps=6, eval_every_steps=3,
                                           checkpoint_every_steps=3), workdir)
  manager = checkpoints.Checkpoints(workdir, read_only=True)
  assert manager.best_step() is None and manager.all_steps() == [3, 6]
  manager.close()
  assert "val/top1" not in read_metrics(workdir)[-1]


def test_ema_params_are_in_the_checkpoint_and_differ_from_params(recipe_run):
  _, _, state = recipe_run
  ema, params = flat(state["ema_params"]), flat(state["params"])
  assert ema.keys() == params.keys()
  assert any(not np.array_equal(ema[k], params[k]) for k in params)


def test_ema_update_math(mock_cifar):
  config = tiny_config(**{**RECIPE, "train_split": "train"})
  split = data.load_split(config.dataset, config.train_split)
  model = models.build_model(config, split.num_classes)
  mesh = parallel.make_mesh()
  tx = optax.sgd(0.1)
  params = models.init_params(model, config.image_size, config.seed)
  ema0 = jax.tree.map(lambda p: p + 1.0, params)  # an EMA that differs from the params
  state = train_step.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params), ema_params=ema0)
  order = data.epoch_order(config.seed, 0, len(split))
  step = jax.jit(train_step.make_train_step(model, tx, config, split.num_classes, mesh))
  new, _ = step(state, split.images, split.labels, order)
  for key, value in flat(new.ema_params).items():
    expected = 0.9 * flat(ema0)[key] + 0.1 * flat(new.params)[key]
    np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-6, err_msg=key)


def test_resume_with_recipe_is_bit_exact(recipe_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(recipe_run[0], workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "12"))
  with sliced_mock_cifar():
    train_lib.train_and_evaluate(tiny_config(**RECIPE), workdir)
  manager = checkpoints.Checkpoints(workdir, read_only=True)
  resumed = manager.restore(12)
  manager.close()
  for part in ("params", "ema_params"):
    a, b = flat(resumed[part]), flat(recipe_run[2][part])
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f"{part}/{key}")


def test_evaluation_uses_ema_params_and_flip_like_training(recipe_run, mock_cifar):
  workdir, result, state = recipe_run
  step, config, params = saved_runs.restore_params(workdir, 12)
  assert step == 12 and saved_runs.parameters_used(config) == "ema"
  for key, value in flat(params).items():
    np.testing.assert_array_equal(value, flat(state["ema_params"])[key])
  report = evaluation.evaluate_checkpoint(workdir, 12, "test")
  assert report["parameters"] == "ema" and report["eval_flip"]
  np.testing.assert_allclose(report["top1"], result.metrics["eval/top1"], atol=1e-6)


def _model_with_distinct_params():
  """(config, mock test split, model, params) with parameters far from init's symmetries."""
  config = tiny_config()
  split = data.load_split(config.dataset, "test")
  model = models.build_model(config, split.num_classes)
  params = models.init_params(model, config.image_size, 1)
  params = jax.tree.map(lambda p: p + 0.01 * jnp.arange(p.size).reshape(p.shape) % 0.3, params)
  return config, split, model, params


def test_flip_tta_is_the_mean_of_both_views(mock_cifar):
  config, split, model, params = _model_with_distinct_params()
  score = evaluator.Evaluator(model, split, config.image_size, 48, parallel.make_mesh(),
                              flip=True)
  got = score(params, keep_logits=True)["logits"]
  x = np.asarray(split.images, np.float32) / 127.5 - 1.0
  plain = model.apply({"params": params}, x, train=False)
  mirror = model.apply({"params": params}, x[:, :, ::-1, :], train=False)
  np.testing.assert_allclose(got, (plain + mirror) / 2, rtol=1e-4, atol=1e-5)
  assert not np.allclose(plain, mirror, atol=1e-4)  # the two views do differ


def test_shifted_moves_the_image_and_fills_black():
  image = jnp.arange(1, 17, dtype=jnp.float32).reshape(1, 4, 4, 1)
  down_left = np.asarray(evaluator.shifted(image, 1, -2))[0, :, :, 0]
  np.testing.assert_array_equal(down_left[0], [-1, -1, -1, -1])
  np.testing.assert_array_equal(down_left[1:, :2], np.asarray(image)[0, :3, 2:, 0])
  np.testing.assert_array_equal(down_left[1:, 2:], -np.ones((3, 2)))


def test_shift_tta_is_the_mean_of_ten_views_cropped_like_training(mock_cifar):
  """eval_shift=2 with flips: 10 views, each a 2-pixel move of the zero-padded uint8 image
  (what a training crop at that offset sees), recomputed here without the Evaluator."""
  config, split, model, params = _model_with_distinct_params()
  score = evaluator.Evaluator(model, split, config.image_size, 48, parallel.make_mesh(),
                              flip=True, shift=2)
  got = score(params, keep_logits=True)["logits"]
  padded = np.pad(split.images, ((0, 0), (2, 2), (2, 2), (0, 0)))
  size = config.image_size
  views = []
  for y, x in ((2, 2), (4, 2), (0, 2), (2, 4), (2, 0)):  # self, up, down, left, right
    crop = padded[:, y:y + size, x:x + size].astype(np.float32) / 127.5 - 1.0
    views += [crop, crop[:, :, ::-1]]
  logits = [np.asarray(model.apply({"params": params}, v, train=False)) for v in views]
  np.testing.assert_allclose(got, np.mean(logits, axis=0), rtol=1e-4, atol=1e-5)
  assert not np.allclose(logits[0], logits[2], atol=1e-4)  # a shifted view does differ
  assert evaluator.describe_views(True, 2) == (
      "10-view test-time augmentation (2-pixel shifts, flips)")


@pytest.mark.parametrize("shift", [-1, 32])
def test_bad_eval_shift_is_refused(shift):
  with pytest.raises(ValueError, match=r"config.eval_shift=.* is invalid: need a whole number"):
    config_lib.validate(tiny_config(eval_shift=shift))


def test_smoke_keeps_the_flip_but_not_the_shifted_views():
  spec = importlib.util.spec_from_file_location("cpu_hour",
                                                os.path.join(ROOT, "configs", "cifar100_cpu_hour.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  full, smoke = module.get_config(), module.get_config("smoke")
  assert (full.eval_shift, full.eval_flip) == (2, True)
  assert (smoke.eval_shift, smoke.eval_flip, smoke.total_steps) == (0, True, 60)


def test_overlapping_val_split_is_refused_before_training(mock_cifar, tmp_path):
  # Unsliced mock splits hold the same examples: validation would be training data.
  with pytest.raises(ValueError, match=r"val_split='test' shares 128 of its 128 examples"):
    train_lib.train_and_evaluate(tiny_config(val_split="test"), str(tmp_path / "run"))
  assert not os.path.exists(os.path.join(tmp_path, "run", "checkpoints"))


def test_warmup_as_long_as_the_run_is_an_error(mock_cifar, tmp_path):
  # 128 examples / batch 32 = 4 steps per epoch: 3 warmup epochs = 12 steps = the whole run.
  with pytest.raises(ValueError, match=r"warmup_epochs=3.0 is 12 steps .* run's 12 steps"):
    train_lib.train_and_evaluate(tiny_config(warmup_epochs=3.0), str(tmp_path / "run"))
  optim.check_warmup(tiny_config(warmup_epochs=2.75), 12, 4)  # 11 steps: fine


def test_random_streams_are_independent():
  keys = [rng_streams.key(0, s) for s in (rng_streams.INIT, rng_streams.EPOCH_ORDER,
                                          rng_streams.AUGMENT, rng_streams.DROPOUT)]
  keys += [rng_streams.key(0, rng_streams.AUGMENT, 5), rng_streams.key(0, rng_streams.DROPOUT, 5),
           rng_streams.key(0, rng_streams.EPOCH_ORDER, 5), rng_streams.key(1, rng_streams.INIT)]
  data_ = {tuple(np.asarray(jax.random.key_data(k)).ravel()) for k in keys}
  assert len(data_) == len(keys)


def test_sweep_ranking_prefers_val_and_says_when_on_test(tmp_path):
  with_val = [{"step": 6, "eval/top1": 0.9, "val/top1": 0.1}]
  assert sweep_summary.ranking_metric(with_val) == "val/top1"
  assert sweep_summary.ranking_metric([{"step": 6, "eval/top1": 0.9}]) == "eval/top1"
  # The summary of trials without a val_split says, in words, that it ranks on test.
  trial = sweeps.Trial("lr=1", {"learning_rate": 1.0})
  os.makedirs(tmp_path / trial.name)
  with open(tmp_path / trial.name / "metrics.jsonl", "w", encoding="utf-8") as f:
    f.write(json.dumps({"step": 6, "eval/top1": 0.9, "eval/num_examples": 100}) + "\n")
  sweeps.save_sweep(sweeps.Sweep("c.py", [trial]), str(tmp_path))
  sweep_summary.summarize(str(tmp_path))
  with open(tmp_path / "summary.md", encoding="utf-8") as f:
    assert "Ranked on the TEST split (eval/top1) for 1 trial(s) without a val_split" in f.read()


def test_evaluation_can_choose_the_trained_params_of_an_ema_run(recipe_run):
  workdir, _, state = recipe_run
  with sliced_mock_cifar():
    _, _, params = saved_runs.restore_params(workdir, 12, "trained")
    report = evaluation.evaluate_checkpoint(workdir, 12, "test", parameters="trained")
  for key, value in flat(params).items():
    np.testing.assert_array_equal(value, flat(state["params"])[key])
  assert report["parameters"] == "trained" and report["files"][0].endswith("_trained.json")
  with pytest.raises(ValueError, match="kept no EMA parameters"):
    saved_runs.parameters_used(tiny_config(), "ema")


def test_single_view_evaluation_drops_the_runs_test_time_views(recipe_run, mock_cifar):
  """evaluate.py --single_view: one plain view per image of the EMA parameters, its own file."""
  workdir, _, state = recipe_run
  report = evaluation.evaluate_checkpoint(workdir, 12, "test", single_view=True)
  assert not report["eval_flip"] and report["eval_shift"] == 0
  assert report["files"][0].endswith("test_step12_single_view.json")
  split = data.load_split("cifar100", "test")
  model = models.build_model(layout.load_config(workdir), split.num_classes)
  x = np.asarray(split.images, np.float32) / 127.5 - 1.0
  logits = np.asarray(model.apply({"params": state["ema_params"]}, x, train=False))
  np.testing.assert_allclose(report["top1"], np.mean(logits.argmax(-1) == split.labels),
                             atol=1.5 / len(split.labels))
  flipped = evaluation.evaluate_checkpoint(workdir, 12, "test")
  assert flipped["eval_flip"] and flipped["files"][0].endswith("test_step12.json")


def test_predict_and_export_use_the_ema_params_and_say_so(recipe_run, tmp_path):
  from mixer import pretrained  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  workdir, _, state = recipe_run
  image, out = str(tmp_path / "a.png"), str(tmp_path / "run.npz")
  Image.fromarray(np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)).save(image)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = lambda script, *args: subprocess.run(
      [sys.executable, os.path.join(ROOT, script), f"--workdir={workdir}", *args],
      capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
  predicted = run("predict.py", image)
  assert predicted.returncode == 0, predicted.stderr[-3000:]
  assert "(EMA parameters, flip test-time augmentation)" in predicted.stdout.splitlines()[0]
  exported = run("export.py", "--checkpoint=12", f"--out={out}")
  assert exported.returncode == 0, exported.stderr[-3000:]
  assert "Wrote the EMA parameters of step 12" in exported.stdout
  flat_npz, ema = pretrained.load_npz(out), flat(state["ema_params"])
  for key, value in ema.items():
    np.testing.assert_array_equal(flat_npz[key], value, err_msg=key)
