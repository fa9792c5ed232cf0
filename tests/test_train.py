"""train_and_evaluate on mock CIFAR-100: metrics, checkpoints, resume, devices, errors."""
import os
import shutil
import socket
import subprocess
import sys
import time

import flax
import numpy as np
import pytest

from conftest import (ROOT, METADATA_DIR, MOCK_EXAMPLES, cpu_env, metric_at, read_metrics,
                      run_mock_train, tiny_config, tiny_flags)
from mixer import checkpoints, config_lib, data, errors, models, train_lib

REQUIRED_TRAIN = ("train/loss", "train/top1", "lr", "grad_norm", "img_per_sec")
REQUIRED_EVAL = ("eval/loss", "eval/top1", "eval/top5", "eval/num_examples")


def final_params(workdir):
  manager = checkpoints.Checkpoints(workdir, read_only=True)
  step = manager.latest_step()
  restored = manager.restore(step)
  return step, flax.traverse_util.flatten_dict(restored["params"], sep="/")


def assert_params_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
  """One uninterrupted 12-step run on 1 device (checkpoints at 6 and 12)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("baseline"))
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES, data_dir=METADATA_DIR):
    result = train_lib.train_and_evaluate(tiny_config(), workdir)
  return workdir, result, final_params(workdir)[1]


def test_trains_and_writes_metrics_checkpoints_config(baseline):
  workdir, result, _ = baseline
  rows = read_metrics(workdir)
  for step in (3, 6, 9, 12):
    for name in REQUIRED_TRAIN:
      assert np.isfinite(metric_at(rows, name, step))
  for step in (6, 12):
    for name in REQUIRED_EVAL:
      metric_at(rows, name, step)
    # 128 examples in batches of 48: the padded last batch still counts each example once.
    assert metric_at(rows, "eval/num_examples", step) == MOCK_EXAMPLES
  assert result.metrics["eval/num_examples"] == MOCK_EXAMPLES and result.step == 12
  # The head starts at zero, so the first steps predict ~uniformly: the mean cross-entropy
  # against any (smoothed, mixed) target distribution is log(100). A summed loss, targets that
  # do not sum to one or a non-zero head would be far off; training then moves it.
  assert abs(metric_at(rows, "train/loss", 3) - np.log(100)) < 0.05
  assert abs(metric_at(rows, "eval/loss", 12) - np.log(100)) > 1e-3
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "6"]
  assert os.path.exists(os.path.join(workdir, "config.json"))
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))


def test_finished_run_started_again_does_nothing(baseline, mock_cifar, caplog):
  workdir, _, params = baseline
  before = read_metrics(workdir)
  result = train_lib.train_and_evaluate(tiny_config(), workdir)
  assert result.status == "already_finished" and result.step == 12
  assert read_metrics(workdir) == before
  assert_params_equal(final_params(workdir)[1], params)


def test_resume_is_bit_exact(baseline, mock_cifar, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(baseline[0], workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "12"))  # as if stopped after step 6
  train_lib.train_and_evaluate(tiny_config(), workdir)
  step, params = final_params(workdir)
  assert step == 12
  assert_params_equal(params, baseline[2])
  steps = [r["step"] for r in read_metrics(workdir) if "train/loss" in r]
  assert steps == [3, 6, 9, 12], "rows logged after the checkpoint must not repeat"


def test_corrupt_latest_checkpoint_falls_back_to_previous(baseline, mock_cifar, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(baseline[0], workdir)
  for dirpath, _, files in os.walk(os.path.join(workdir, "checkpoints", "12", "default")):
    for name in files:
      with open(os.path.join(dirpath, name), "wb") as f:
        f.write(b"garbage")
  train_lib.train_and_evaluate(tiny_config(), workdir)
  step, params = final_params(workdir)
  assert step == 12
  assert_params_equal(params, baseline[2])
  assert os.listdir(os.path.join(workdir, "corrupt_checkpoints"))


def test_eight_devices_match_one(baseline, tmp_path):
  workdir = str(tmp_path / "eight")
  run_mock_train(workdir, *tiny_flags(), devices=8)
  ref, rows = read_metrics(baseline[0]), read_metrics(workdir)
  for name, step in [("train/loss", 3), ("train/loss", 12), ("eval/loss", 12)]:
    np.testing.assert_allclose(metric_at(rows, name, step), metric_at(ref, name, step), rtol=2e-4)
  assert metric_at(rows, "eval/num_examples", 12) == MOCK_EXAMPLES


def test_default_xla_cpu_kernels_match_onednn(baseline, tmp_path):
  """The baseline ran with dots on oneDNN (runtime.configure_xla_cpu); XLA's own kernels agree."""
  workdir = str(tmp_path / "default_kernels")
  run_mock_train(workdir, *tiny_flags(), env={"MIXER_XLA_CPU": "default"})
  ref, rows = read_metrics(baseline[0]), read_metrics(workdir)
  for name, step in [("train/loss", 3), ("train/loss", 12), ("eval/loss", 12)]:
    np.testing.assert_allclose(metric_at(rows, name, step), metric_at(ref, name, step), rtol=2e-4)


def test_two_processes_match_one(baseline, tmp_path):
  workdir = str(tmp_path / "two")
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = cpu_env(1)
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "tests", "mock_train.py"),
       "--config=" + os.path.join(ROOT, "configs", "cifar100_ti.py:smoke"), f"--workdir={workdir}",
       "--num_processes=2", f"--process_id={i}", f"--coordinator_address=localhost:{port}",
       *tiny_flags()], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-5000:]
  ref, rows = read_metrics(baseline[0]), read_metrics(workdir)
  for name, step in [("train/loss", 3), ("train/loss", 12), ("eval/loss", 12)]:
    np.testing.assert_allclose(metric_at(rows, name, step), metric_at(ref, name, step), rtol=2e-4)
  assert metric_at(rows, "eval/num_examples", 12) == MOCK_EXAMPLES


def test_grad_accumulation_matches_full_batch(mock_cifar, tmp_path):
  """Parameters after one plain SGD step (no momentum, clipping, decay or warmup: nothing that
  would normalise the gradient's scale away) equal the full batch's."""
  plain = dict(total_steps=1, log_every_steps=1, eval_every_steps=1, checkpoint_every_steps=1,
               mixup_alpha=0.0, cutmix_alpha=0.0, optimizer="sgd", momentum=0.0,
               learning_rate=0.5, grad_clip_norm=0.0, weight_decay=0.0, warmup_epochs=0.0,
               **{"model.dropout": 0.0, "model.stoch_depth": 0.0})
  params = []
  for accum in (1, 2):
    workdir = str(tmp_path / f"accum{accum}")
    train_lib.train_and_evaluate(tiny_config(grad_accum_steps=accum, **plain), workdir)
    params.append(final_params(workdir)[1])
  config = tiny_config(**plain)
  init = flax.traverse_util.flatten_dict(
      models.init_params(models.build_model(config, 100), config.image_size, config.seed),
      sep="/")
  # The step moved the parameters far more than the tolerance: a gradient off by the
  # accumulation factor would show.
  assert max(float(np.abs(params[0][k] - init[k]).max()) for k in init) > 1e-2
  for key in params[0]:
    np.testing.assert_allclose(params[1][key], params[0][key], rtol=1e-5, atol=1e-6,
                               err_msg=key)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(mock_cifar, tmp_path):
  workdir = str(tmp_path / "nan")
  train_lib.train_and_evaluate(tiny_config(total_steps=6), workdir)
  with pytest.raises(errors.DivergedError, match=r"between steps 7 and 9.*\(step 6\) is kept"):
    train_lib.train_and_evaluate(tiny_config(learning_rate=1e30), workdir,
                                 allow_config_change=("learning_rate", "total_steps"))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["6"]


@pytest.mark.parametrize("key,value,match", [
    ("optimizer", "adamx", "config.optimizer='adamx'"),
    ("model.variant", "Z/4", "config.model.variant"),
    ("image_size", 30, "config.image_size=30"),
    ("grad_accum_steps", 3, "config.grad_accum_steps=3"),
    ("lr_schedule", "step", "config.lr_schedule"),
    ("label_smoothing", 1.5, "config.label_smoothing"),
])
def test_bad_config_values_name_the_key(key, value, match):
  with pytest.raises(ValueError, match=match.replace(".", r"\.").replace("(", r"\(")):
    config_lib.validate(tiny_config(**{key: value}))


def test_checkpoint_of_another_config_is_an_error_and_kept(baseline, mock_cifar, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(baseline[0], workdir)
  with pytest.raises(errors.CheckpointError, match=r"No checkpoint .* could be restored .*step 12: "
                     r"does not match the model.*stem/kernel: checkpoint \(8, 8, 3, 32\) vs "
                     r"model \(8, 8, 3, 48\).*new --workdir"):
    train_lib.train_and_evaluate(tiny_config(**{"model.hidden_dim": 48}), workdir,
                                 allow_config_change=("model.hidden_dim",))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "6"]


def test_mistyped_config_key_fails_before_work(tmp_path):
  proc = run_mock_train(str(tmp_path / "typo"), "--config.batch_sizee=3", check=False, timeout=120)
  assert proc.returncode != 0
  assert "batch_sizee" in proc.stderr
  assert not os.path.exists(tmp_path / "typo")


def test_batch_not_divisible_by_devices_fails_early(tmp_path):
  proc = run_mock_train(str(tmp_path / "b"), *tiny_flags(batch_size=36), devices=8, check=False,
                        timeout=120)
  assert proc.returncode != 0
  assert "config.batch_size" in proc.stderr and "number of devices (8" in proc.stderr


def test_missing_dataset_fails_fast_with_directions(tmp_path):
  start = time.time()
  with pytest.raises(data.DatasetNotFoundError) as info:
    train_lib.train_and_evaluate(tiny_config(data_dir=str(tmp_path)), str(tmp_path / "w"))
  assert time.time() - start < 60, "must not retry downloads for minutes"
  message = str(info.value)
  assert str(tmp_path) in message and "TFDS_DATA_DIR" in message and "--config.data_dir" in message


def test_init_from_published_layout_npz(baseline, mock_cifar, tmp_path):
  """A run initialised from an exported .npz starts exactly where the source run ended."""
  from mixer import pretrained  # pylint: disable=g-import-not-at-top
  npz = str(tmp_path / "source.npz")
  pretrained.export_npz(flax.traverse_util.unflatten_dict(baseline[2], sep="/"), npz)
  config = tiny_config(init_from=npz, optimizer="sgd", learning_rate=1e-12, total_steps=1,
                       eval_every_steps=1, warmup_epochs=0.0)
  result = train_lib.train_and_evaluate(config, str(tmp_path / "ft"))
  source = read_metrics(baseline[0])
  np.testing.assert_allclose(result.metrics["eval/loss"], metric_at(source, "eval/loss", 12),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="config.init_from=.*does not fit"):
    train_lib.train_and_evaluate(tiny_config(init_from=npz, **{"model.hidden_dim": 48}),
                                 str(tmp_path / "bad"))
  # A file of another shape, a missing file, a file that is no npz: an error, nothing created.
  not_npz = tmp_path / "not.npz"
  not_npz.write_text("hello")
  for source in (npz, str(tmp_path / "missing.npz"), str(not_npz)):
    overrides = {"model.hidden_dim": 48} if source == npz else {}
    with pytest.raises((ValueError, OSError)):
      train_lib.train_and_evaluate(tiny_config(init_from=source, **overrides),
                                   str(tmp_path / "bad"))
  assert not (tmp_path / "bad").exists()
