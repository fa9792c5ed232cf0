"""inspect_model.py on a smoke run: token-mixing pictures on the patch grid, probes, errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import METADATA_DIR, ROOT, sliced_mock_cifar, tiny_config
from mixer import inspection, models, plots, pretrained, train_lib

# inspect_model.py under mock CIFAR-100 (64 examples per split), in a fresh process.
MOCK_SCRIPT = f"""
import sys
sys.path.insert(0, {ROOT!r})
import tensorflow_datasets as tfds
from absl import app
import inspect_model
from mixer import cli_errors
with tfds.testing.mock_data(num_examples=64, data_dir={METADATA_DIR!r}):
  app.run(inspect_model.main, flags_parser=cli_errors.parse_flags)
"""


def _script(*args, mock=True):
  command = ([sys.executable, "-c", MOCK_SCRIPT, *args] if mock else
             [sys.executable, os.path.join(ROOT, "inspect_model.py"), *args])
  env = {k: v for k, v in os.environ.items() if k != "MIXER_DEBUG"}
  return subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=ROOT,
                        env=dict(env, JAX_PLATFORMS="cpu"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 4-step Ti/8 run (2 blocks, 4x4 patches at 32 px, 16 token-mixing units) with a val split."""
  workdir = str(tmp_path_factory.mktemp("run"))
  with sliced_mock_cifar():
    train_lib.train_and_evaluate(
        tiny_config(total_steps=4, eval_every_steps=4, checkpoint_every_steps=4,
                    train_split="train[:75%]", val_split="train[75%:]"), workdir)
  return workdir


@pytest.fixture(scope="module")
def inspected(run, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("inspect"))
  proc = _script(f"--workdir={run}", f"--out={out}", "--probe_examples=50", "--batch_size=24")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc, out


def test_token_mixing_pictures_show_every_unit_on_the_patch_grid(inspected):
  _, out = inspected
  g = plots.mosaic_geometry(16, (4, 4))
  assert (g["zoom"], g["cols"], g["rows"], g["cell_width"]) == (12, 4, 4, 48)
  for block in (0, 1):
    image = np.asarray(Image.open(os.path.join(out, f"token_mixing_block{block}.png"))
                       .convert("RGB")).astype(int)
    assert image.shape[1] == g["width"] == max(plots.MIN_WIDTH, 2 + 4 * 50 + 2 * 10 + 70)
    bottom = image.shape[0] - plots.MARGIN  # the mosaic sits MARGIN pixels above the bottom
    mosaic = image[bottom - g["mosaic_height"]:bottom, g["left"]:g["left"] + g["mosaic_width"]]
    grey = round(255 * plots.GAP_COLOR)
    assert np.all(np.abs(mosaic[0] - grey) <= 1) and np.all(np.abs(mosaic[:, 0] - grey) <= 1)
    for r in range(4):
      for c in range(4):
        y, x = 2 + r * 50, 2 + c * 50
        cell = mosaic[y:y + 48, x:x + 48]
        # 4x4 patches, each a 12x12 square of one colour; the unit's largest |weight| saturates.
        tokens = cell.reshape(4, 12, 4, 12, 3)
        assert np.all(tokens == tokens[:, :1, :, :1]), (block, r, c)
        assert np.all(np.abs(mosaic[y + 48, x:x + 48] - grey) <= 1)  # a gap below each cell


def test_probe_json_has_one_entry_per_representation(inspected, run):
  proc, out = inspected
  with open(os.path.join(out, "linear_probe.json"), encoding="utf-8") as f:
    report = json.load(f)
  assert [layer["name"] for layer in report["layers"]] == ["stem", "block_0", "block_1",
                                                           "pre_logits"]
  for layer in report["layers"]:
    assert 0.0 <= layer["test_top1"] <= 1.0 and layer["l2"] > 0
  assert report["num_classes"] == 100 and 0.0 <= report["model_test_top1"] <= 1.0
  assert report["val_split"] == "train[75%:]" and "step 4" in report["source"]
  assert Image.open(os.path.join(out, "linear_probe.png")).size[0] <= 1000


def test_console_has_one_line_per_output_and_the_feature_pass_progress(inspected):
  proc, out = inspected
  lines = proc.stdout.strip().splitlines()
  assert sum(line.startswith(out) for line in lines) == 3, proc.stdout
  for split, count in (("train", 50), ("val", 64), ("test", 64)):
    assert any(line.startswith(f"features of {split} (") and f": {count}/{count} examples, "
               in line for line in lines), proc.stdout


def test_units_are_ordered_from_smooth_to_checkerboard():
  y, x = np.mgrid[0:8, 0:8]
  checker, smooth, stripes = (-1.0) ** (x + y), np.exp(-((x - 3.5) ** 2) / 8), np.cos(np.pi * x / 2)
  assert list(inspection.by_frequency(np.stack([checker, smooth, stripes]))) == [1, 2, 0]


def test_bad_workdir_is_one_error_line(tmp_path):
  proc = _script(f"--workdir={tmp_path}", mock=False)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith(f"error: No config.json in {tmp_path}")


def test_checkpoint_of_another_shape_is_one_error_line(run, tmp_path):
  other = models.create_model("Ti/8", 100, hidden_dim=48, num_blocks=2, tokens_mlp_dim=16,
                              channels_mlp_dim=64)
  npz = str(tmp_path / "other.npz")
  pretrained.export_npz(models.init_params(other, 32, 0), npz)
  proc = _script(f"--workdir={run}", f"--npz={npz}", f"--out={tmp_path}", mock=False)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()
  assert any(line.startswith(f"error: {npz!r} does not fit the model") for line in last), last
  assert not os.path.exists(tmp_path / "linear_probe.json")
