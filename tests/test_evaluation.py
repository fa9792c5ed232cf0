"""Evaluation and prediction from a run's workdir on mock CIFAR-100, the metric helpers, errors."""
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from conftest import (METADATA_DIR, MOCK_EXAMPLES, ROOT, metric_at, read_metrics,
                      sliced_mock_cifar, tiny_config)
from mixer import checkpoints, data, evaluation, saved_runs, train_lib

REPORT_KEYS = {"workdir", "dataset", "split", "step", "parameters", "parameters_described",
               "eval_flip", "eval_shift", "num_examples",
               "top1", "top5", "loss", "ece", "per_class_top1", "per_superclass_top1",
               "superclass_top1"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """One 6-step training run with checkpoints, val and eval metrics at steps 3 and 6."""
  workdir = str(tmp_path_factory.mktemp("run"))
  with sliced_mock_cifar():
    train_lib.train_and_evaluate(
        tiny_config(total_steps=6, eval_every_steps=3, checkpoint_every_steps=3,
                    train_split="train[:75%]", val_split="train[75%:]"), workdir)
  return workdir


@pytest.fixture(scope="module")
def latest(run):
  """The report of the latest checkpoint on the test split, and that split."""
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES, data_dir=METADATA_DIR):
    return evaluation.evaluate_checkpoint(run), data.load_split("cifar100", "test")


def copy_run(run, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(run, workdir, ignore=shutil.ignore_patterns("eval"))
  return workdir


def test_latest_matches_the_training_runs_final_eval(run, latest):
  report, _ = latest
  rows = read_metrics(run)
  assert report["step"] == 6 and report["num_examples"] == MOCK_EXAMPLES
  for name in ("top1", "top5", "loss"):
    np.testing.assert_allclose(report[name], metric_at(rows, f"eval/{name}", 6), rtol=1e-6)


def test_report_matches_an_independent_computation(run, latest):
  """top-1/top-5/loss recomputed in numpy from plain model.apply (no Evaluator, no padding)."""
  report, split = latest
  from mixer import models  # pylint: disable=g-import-not-at-top
  step, config, params = saved_runs.restore_params(run)
  model = models.build_model(config, split.num_classes)
  x = np.asarray(split.images, np.float32) / 127.5 - 1.0
  logits = np.asarray(model.apply({"params": params}, x, train=False), np.float64)
  if config.eval_flip:
    logits = (logits + np.asarray(model.apply({"params": params}, x[:, :, ::-1], train=False))) / 2
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  labels = split.labels
  top5 = np.argsort(-logits, axis=-1)[:, :5]
  assert step == report["step"]
  one = 1.5 / len(labels)  # float32 near-ties may order one example differently
  np.testing.assert_allclose(report["top1"], np.mean(logits.argmax(-1) == labels), atol=one)
  np.testing.assert_allclose(report["top5"], np.mean((top5 == labels[:, None]).any(-1)),
                             atol=one)
  np.testing.assert_allclose(report["loss"], -np.mean(logp[np.arange(len(labels)), labels]),
                             rtol=1e-4)


def test_report_json_has_every_class_and_superclass(latest):
  report, split = latest
  path = report["files"][0]
  assert path.endswith(os.path.join("eval", "test_step6.json"))
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  assert set(saved) == REPORT_KEYS and saved == {k: v for k, v in report.items() if k != "files"}
  assert len(saved["per_class_top1"]) == 100 and len(saved["per_superclass_top1"]) == 20
  assert list(saved["per_class_top1"]) == split.class_names
  assert list(saved["per_superclass_top1"]) == split.coarse_names
  assert 0.0 <= saved["ece"] <= 1.0 and 0.0 <= saved["superclass_top1"] <= 1.0
  # 128 mock examples leave some classes empty: null there, and the rest average to top1.
  counts = np.bincount(split.labels, minlength=100)
  accuracies = list(saved["per_class_top1"].values())
  assert [a is None for a in accuracies] == list(counts == 0)
  weighted = sum(a * n for a, n in zip(accuracies, counts) if a is not None)
  np.testing.assert_allclose(weighted / MOCK_EXAMPLES, saved["top1"], rtol=1e-6)
  coarse_counts = np.bincount(split.coarse_labels, minlength=20)
  weighted = sum((a or 0.0) * n for a, n in zip(saved["per_superclass_top1"].values(),
                                                coarse_counts))
  np.testing.assert_allclose(weighted / MOCK_EXAMPLES, saved["top1"], rtol=1e-6)


def test_pngs_are_written_and_valid(latest):
  report, _ = latest
  pngs = report["files"][1:]
  assert [os.path.basename(p) for p in pngs] == [
      "test_step6_predictions.png", "test_step6_superclass_confusion.png", "training_curves.png"]
  for path in pngs:
    with Image.open(path) as image:
      assert image.format == "PNG" and min(image.size) >= 400
      image.verify()


def test_a_chosen_step_with_another_batch_size_matches_its_training_eval(run, mock_cifar):
  # 128 examples in batches of 40: the last batch is padded, each example counted once.
  report = evaluation.evaluate_checkpoint(run, checkpoint="3", batch_size=40)
  rows = read_metrics(run)
  assert report["step"] == 3 and report["num_examples"] == MOCK_EXAMPLES
  for name in ("top1", "top5", "loss"):
    np.testing.assert_allclose(report[name], metric_at(rows, f"eval/{name}", 3), rtol=1e-5)
  assert os.path.exists(os.path.join(run, "eval", "test_step3.json"))


def test_checkpoint_choice(run):
  ckpt = checkpoints.Checkpoints(run, read_only=True)
  best = ckpt.best_step()
  ckpt.close()
  top1 = {s: metric_at(read_metrics(run), "val/top1", s) for s in (3, 6)}
  assert top1[best] == max(top1.values())
  step, config, params = saved_runs.restore_params(run, "best")
  assert step == best and config.model.hidden_dim == 32
  assert set(params) >= {"stem", "head", "MixerBlock_0"} and "opt_state" not in params
  assert saved_runs.restore_params(run, 3)[0] == 3
  assert saved_runs.restore_params(run, "latest")[0] == 6


def test_best_without_eval_metrics_falls_back_to_latest(run, tmp_path, caplog):
  workdir = copy_run(run, tmp_path)
  for step in ("3", "6"):
    shutil.rmtree(os.path.join(workdir, "checkpoints", step, "metrics"))
  with caplog.at_level(logging.WARNING):
    assert saved_runs.restore_params(workdir, "best")[0] == 6
  assert "has val/top1" in caplog.text


def test_missing_config_or_checkpoint_names_the_workdir(run, tmp_path):
  where = re.escape(str(tmp_path))
  with pytest.raises(FileNotFoundError, match=f"No config.json in {where}.*is empty"):
    saved_runs.restore_params(str(tmp_path))
  shutil.copy(os.path.join(run, "config.json"), tmp_path)
  with pytest.raises(FileNotFoundError, match=f"No checkpoint in {where}.*holds: config.json"):
    saved_runs.restore_params(str(tmp_path))


def test_missing_step_lists_the_saved_ones(run):
  with pytest.raises(ValueError, match="No checkpoint at step 7 .*saved steps: 3, 6"):
    saved_runs.restore_params(run, 7)
  with pytest.raises(ValueError, match="'latest', 'best' or a step number, got 'newest'"):
    saved_runs.restore_params(run, "newest")


def test_config_that_does_not_match_the_checkpoint_lists_mismatches(run, tmp_path):
  workdir = copy_run(run, tmp_path)
  path = os.path.join(workdir, "config.json")
  with open(path, encoding="utf-8") as f:
    config = json.load(f)
  config["model"].update(hidden_dim=48, num_blocks=3)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match=r"step 6 .*does not match.*"
                     r"Missing from the checkpoint: MixerBlock_2 \(12 arrays\).*Of another shape.*"
                     r"stem/kernel: checkpoint \(8, 8, 3, 32\) vs model \(8, 8, 3, 48\)"):
    saved_runs.restore_params(workdir)


def test_expected_calibration_error_by_hand():
  probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
  labels = np.array([0, 1, 0, 0])  # right, wrong, right, wrong
  # 15 bins: {0.9, 0.9} in bin 13 (accuracy 0.5), 0.6 in bin 9 (1.0), 0.7 in bin 10 (0.0):
  # 2/4 * |0.5 - 0.9| + 1/4 * |1 - 0.6| + 1/4 * |0 - 0.7| = 0.2 + 0.1 + 0.175.
  assert evaluation.expected_calibration_error(probs, labels) == pytest.approx(0.475)
  # 2 bins: all four in [0.5, 1]: |0.5 - mean(0.9, 0.9, 0.6, 0.7)| = 0.275.
  assert evaluation.expected_calibration_error(probs, labels, num_bins=2) == pytest.approx(0.275)
  # Certain and right (confidence exactly 1.0 lands in the last bin): perfectly calibrated.
  assert evaluation.expected_calibration_error(np.eye(3), np.arange(3)) == 0.0


def test_accuracy_by_group_and_superclass_mapping():
  groups, correct = np.array([0, 0, 2, 2, 2]), np.array([1, 0, 1, 1, 0])
  np.testing.assert_allclose(evaluation.accuracy_by_group(groups, correct, 4),
                             [0.5, np.nan, 2 / 3, np.nan])
  labels, coarse = np.array([0, 0, 0, 1, 3]), np.array([2, 2, 1, 0, 1])
  np.testing.assert_array_equal(evaluation.superclass_of_each_class(labels, coarse, 4),
                                [2, 0, -1, 1])
  assert evaluation.worst_classes({"a": 0.5, "b": None, "c": 0.1, "d": 0.9}, 2) == [
      ("c", 0.1), ("a", 0.5)]


def write_test_files(directory):
  rng = np.random.default_rng(0)
  rgba, gray = str(directory / "rgba.png"), str(directory / "gray.png")
  Image.fromarray(rng.integers(0, 256, (50, 40, 4), np.uint8), "RGBA").save(rgba)
  Image.fromarray(rng.integers(0, 256, (16, 16), np.uint8), "L").save(gray)
  text = directory / "notes.txt"
  text.write_text("not an image")
  return [rgba, str(text), gray]


def test_predict_classifies_images_and_reports_bad_files(run, tmp_path):
  step, results = evaluation.predict_files(run, write_test_files(tmp_path) + ["missing.png"])
  assert step == 6
  assert [r.error is None for r in results] == [True, False, True, False]
  assert "not a readable image" in results[1].error and results[3].error == "no such file"
  with open(os.path.join(run, "class_names.json"), encoding="utf-8") as f:
    names = json.load(f)["label"]
  for result in (results[0], results[2]):
    probabilities = [p for _, p in result.top]
    assert len(result.top) == 5 and all(name in names for name, _ in result.top)
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0 + 1e-9


def png_declaring(path, width, height):
  """A PNG whose header declares width x height (no pixel data: opening it reads the header)."""
  def chunk(kind, body):
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
  header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
  return str(path)


def test_predict_oversized_or_corrupt_image_is_that_files_error_only(run, tmp_path,
                                                                        monkeypatch):
  good = write_test_files(tmp_path)[2]  # 16x16 = 256 pixels
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
  rng = np.random.default_rng(1)
  warned, refused = str(tmp_path / "1600px.png"), str(tmp_path / "4096px.png")
  Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)).save(warned)  # PIL warns
  Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(refused)  # PIL raises
  truncated = str(tmp_path / "truncated.png")  # 900 pixels, under the limit, cut short
  Image.fromarray(rng.integers(0, 256, (30, 30, 3), np.uint8)).save(truncated)
  with open(truncated, "rb") as f:
    head = f.read()[:1000]
  with open(truncated, "wb") as f:
    f.write(head)
  _, results = evaluation.predict_files(run, [warned, good, refused, truncated])
  assert [r.error is None for r in results] == [False, True, False, False]
  assert results[0].error.startswith("too large to decode (Image size (1600 pixels) exceeds")
  assert results[2].error.startswith("too large to decode (Image size (4096 pixels) exceeds")
  assert results[3].error.startswith("not a readable image (")
  assert len(results[1].top) == 5


def test_predict_without_class_names_falls_back_with_a_warning(run, tmp_path, caplog):
  workdir = copy_run(run, tmp_path)
  os.remove(os.path.join(workdir, "class_names.json"))
  path = os.path.join(workdir, "config.json")
  with open(path, encoding="utf-8") as f:
    config = json.load(f)
  config["dataset"] = "no_such_dataset"
  with open(path, "w", encoding="utf-8") as f:
    json.dump(config, f)
  with caplog.at_level(logging.WARNING):
    _, results = evaluation.predict_files(workdir, write_test_files(tmp_path)[:1])
  assert all(name.startswith("class_") for name, _ in results[0].top)
  assert "naming classes class_<i>" in caplog.text


def test_predict_script_exit_status_and_output(run, tmp_path):
  # 30000 x 30000 pixels, over twice PIL's default MAX_IMAGE_PIXELS: refused unread.
  files = write_test_files(tmp_path) + [png_declaring(tmp_path / "bomb.png", 30000, 30000)]
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "predict.py"), f"--workdir={run}",
                         *files], capture_output=True, text=True, timeout=120, cwd=ROOT,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert f"{files[1]}: error: not a readable image" in proc.stderr
  assert f"{files[3]}: error: too large to decode (Image size (900000000 pixels)" in proc.stderr
  lines = proc.stdout.splitlines()
  for image in (files[0], files[2]):
    start = lines.index(image)
    assert all(re.fullmatch(r"\s+\d+\.\d\d%  \w+", line) for line in lines[start + 1:start + 6])
  assert len(lines) == 1 + 2 * 6



def test_unreadable_checkpoint_is_one_error_line_unless_debugging(run, tmp_path):
  workdir = copy_run(run, tmp_path)
  item = os.path.join(workdir, "checkpoints", "6", checkpoints.CHECKPOINT_ITEM)
  for name in os.listdir(item):  # the arrays are gone, the step directory is still there
    path = os.path.join(item, name)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  command = [sys.executable, os.path.join(ROOT, "export.py"), f"--workdir={workdir}",
             f"--out={tmp_path / 'out.npz'}"]
  env = {k: v for k, v in os.environ.items() if k != "MIXER_DEBUG"}
  proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT,
                        env=dict(env, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith(
      f"error: The checkpoint at step 6 in {workdir}")
  assert not os.path.exists(tmp_path / "out.npz")
  proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT,
                        env=dict(env, JAX_PLATFORMS="cpu", MIXER_DEBUG="1"))
  assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr
  # The step's manifest lists the files removed: proven damage.
  assert "CorruptCheckpointError: The checkpoint at step 6" in proc.stderr


def test_export_script_writes_the_published_layout(run, tmp_path):
  """export.py -> .npz whose arrays equal the checkpoint's params under '/'-joined names."""
  from mixer import pretrained  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "run.npz")
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), f"--workdir={run}",
                         "--checkpoint=3", f"--out={out}"], capture_output=True, text=True,
                        timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "step 3" in proc.stdout
  flat = pretrained.load_npz(out)
  _, _, params = saved_runs.restore_params(run, 3)
  expected = pretrained.flatten_params(params)
  assert set(flat) == set(expected) and "MixerBlock_0/token_mixing/Dense_0/kernel" in flat
  for key, value in expected.items():
    np.testing.assert_array_equal(flat[key], np.asarray(value), err_msg=key)
