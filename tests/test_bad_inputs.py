"""Bad inputs that used to slip through (issue 24): each is one `error:` line or handled."""
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from conftest import METADATA_DIR, ROOT, tiny_config
from mixer import cli_errors, data, errors, evaluation, metrics, train_lib
from mixer import workdir as layout

ENV = {k: v for k, v in os.environ.items() if k != cli_errors.DEBUG_ENV}


def run_script(script, *args):
  env = dict(ENV, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True,
                        text=True, timeout=180, cwd=ROOT, env=env)


def one_error_line(proc):
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, proc.stderr[-3000:]
  return errors[0]


# 1. A torn metrics.jsonl.

ROWS = [{"step": 3, "train/loss": 4.6}, {"step": 6, "train/loss": 4.5}]
TORN = '{"step": 9, "train/lo'  # what kill -9 during a write leaves


def write_lines(path, *lines):
  with open(path, "w", encoding="utf-8") as f:
    f.write("".join(lines))


def test_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
  path = str(tmp_path / "metrics.jsonl")
  write_lines(path, *(json.dumps(r) + "\n" for r in ROWS), TORN)
  with caplog.at_level(logging.WARNING):
    assert metrics.read_jsonl(path) == ROWS
  assert "Dropping the last line" in caplog.text and path in caplog.text
  metrics.truncate_jsonl(path, after_step=6)
  with open(path, encoding="utf-8") as f:
    assert f.read() == "".join(json.dumps(r) + "\n" for r in ROWS)


def test_complete_last_row_without_newline_is_kept_and_ended(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  write_lines(path, json.dumps(ROWS[0]) + "\n", json.dumps(ROWS[1]))
  metrics.truncate_jsonl(path, after_step=6)
  with open(path, encoding="utf-8") as f:
    assert f.read().endswith("}\n")  # the next row appended starts a line of its own
  assert metrics.read_jsonl(path) == ROWS


def test_bad_metrics_line_before_the_last_names_file_and_line(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  write_lines(path, json.dumps(ROWS[0]) + "\n", TORN + "\n", json.dumps(ROWS[1]) + "\n")
  for call in (lambda: metrics.read_jsonl(path), lambda: metrics.truncate_jsonl(path, 6)):
    with pytest.raises(ValueError) as info:
      call()
    message = str(info.value)
    assert f"{path} line 2 is not JSON" in message and "\n" not in message


def test_resume_and_evaluation_survive_a_torn_metrics_line(mock_cifar, tmp_path, caplog):
  workdir = str(tmp_path / "run")
  train_lib.train_and_evaluate(tiny_config(total_steps=6), workdir)
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path, "a", encoding="utf-8") as f:
    f.write(TORN)
  with caplog.at_level(logging.WARNING):
    train_lib.train_and_evaluate(tiny_config(total_steps=12), workdir, ("total_steps",))
  assert "Dropping the last line" in caplog.text
  rows = metrics.read_jsonl(path)
  assert max(r["step"] for r in rows) == 12
  with open(path, encoding="utf-8") as f:
    assert all(json.loads(line) for line in f)

  with open(path, "a", encoding="utf-8") as f:
    f.write(TORN)
  report = evaluation.evaluate_checkpoint(workdir)
  assert any(p.endswith("training_curves.png") for p in report["files"])

  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  write_lines(path, lines[0], TORN + "\n", *lines[1:])
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    report = evaluation.evaluate_checkpoint(workdir)  # the curves are not needed to evaluate
  assert report["step"] == 12 and os.path.isfile(report["files"][0])
  assert not any(p.endswith("training_curves.png") for p in report["files"])
  assert f"{path} line 2 is not JSON" in caplog.text

  # predict.py: a mode it cannot interpret is that file's error, naming the mode.
  float_image, grey16 = str(tmp_path / "float.tif"), str(tmp_path / "grey16.png")
  Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(float_image)
  Image.fromarray(np.full((8, 8), 1000, np.uint16)).save(grey16)
  _, results = evaluation.predict_files(workdir, [float_image, grey16])
  assert "image mode 'F'" in results[0].error and not results[0].top
  assert results[1].error is None and len(results[1].top) == 5


# 2. predict.py's images of every PIL mode.

def load(tmp_path, image, name="image.png", **save):
  path = str(tmp_path / name)
  image.save(path, **save)
  return evaluation.load_image(path, 8)


def test_16_bit_grey_is_scaled_not_clipped_to_white(tmp_path):
  white = load(tmp_path, Image.new("RGB", (8, 8), (255, 255, 255)), "white.png")
  for dtype in ("<u2", ">u2"):  # PIL modes I;16 and I;16B
    image = Image.fromarray(np.full((8, 8), 1000, dtype))
    assert image.mode in ("I;16", "I;16B")
    array = evaluation.to_rgb(image)
    np.testing.assert_array_equal(np.asarray(array), np.full((8, 8, 3), 4, np.uint8))
  loaded = load(tmp_path, Image.fromarray(np.full((8, 8), 1000, np.uint16)))  # a 16-bit PNG
  np.testing.assert_array_equal(loaded, np.full((8, 8, 3), 4, np.uint8))  # 1000/257 = 3.9
  assert not np.array_equal(loaded, white)


def test_32_bit_integer_grey_is_16_bit_above_255_and_refused_outside_0_to_65535():
  as_i = lambda value: Image.fromarray(np.full((2, 2), value, np.int32))
  assert as_i(1000).mode == "I"
  assert np.asarray(evaluation.to_rgb(as_i(1000)))[0, 0].tolist() == [4, 4, 4]
  assert np.asarray(evaluation.to_rgb(as_i(200)))[0, 0].tolist() == [200, 200, 200]
  with pytest.raises(evaluation.UnsupportedImageMode, match=r"'I' with values 70000"):
    evaluation.to_rgb(as_i(70000))


def test_transparency_is_composited_over_white(tmp_path):
  rgba = np.zeros((8, 8, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[:, 4:, 3] = 255  # left half transparent, right half opaque red
  loaded = load(tmp_path, Image.fromarray(rgba, "RGBA"))
  assert loaded[0, 0].tolist() == [255, 255, 255] and loaded[0, 7].tolist() == [200, 0, 0]
  la = Image.fromarray(np.stack([np.full((8, 8), 10, np.uint8),
                                 np.full((8, 8), 128, np.uint8)], -1), "LA")
  assert load(tmp_path, la, "la.png")[0, 0].tolist() == [132, 132, 132]  # 10*.502 + 255*.498
  palette = Image.new("P", (8, 8), 1)
  palette.putpalette([255, 0, 0, 0, 0, 255])
  transparent = load(tmp_path, palette, "p.png", transparency=1)
  assert transparent[0, 0].tolist() == [255, 255, 255]
  assert load(tmp_path, palette, "p_opaque.png")[0, 0].tolist() == [0, 0, 255]


def test_cmyk_is_converted_and_float_is_refused_naming_the_mode(tmp_path):
  cmyk = load(tmp_path, Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "cmyk.jpg", quality=100)
  assert cmyk[0, 0].tolist()[0] > 240 and max(cmyk[0, 0].tolist()[1:]) < 15  # red
  path = str(tmp_path / "float.tif")
  Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(path)
  with pytest.raises(evaluation.UnsupportedImageMode) as info:
    evaluation.load_image(path, 8)
  assert "image mode 'F'" in str(info.value) and "\n" not in str(info.value)


# 3. A TFDS version directory without dataset_info.json or without its label names.

def test_tfds_directory_without_dataset_info_names_it(tmp_path):
  version_dir = tmp_path / "cifar100" / "3.0.2"
  version_dir.mkdir(parents=True)
  (version_dir / "cifar100-test.tfrecord-00000-of-00001").write_bytes(b"")
  with pytest.raises(data.DatasetNotFoundError) as info:
    data.load_split("cifar100", "test", str(tmp_path))
  assert isinstance(info.value, errors.MissingFileError)  # a user error, one line in scripts
  message = cli_errors.message(info.value)
  assert f"{version_dir} has no dataset_info.json" in message and "\n" not in message
  assert "cifar100-test.tfrecord-00000-of-00001" in message


def _metadata_copy(tmp_path, *leave_out):
  """tmp_path/cifar100/3.0.2 holding the dataset's small metadata files but `leave_out`."""
  source = os.path.join(METADATA_DIR, "cifar100", "3.0.2")
  version_dir = tmp_path / "cifar100" / "3.0.2"
  version_dir.mkdir(parents=True)
  for name in os.listdir(source):
    if name not in leave_out:
      shutil.copy(os.path.join(source, name), version_dir)
  return version_dir


def test_tfds_directory_without_label_names_warns_in_one_line(tmp_path, caplog):
  version_dir = _metadata_copy(tmp_path, "label.labels.txt", "features.json")
  with tfds.testing.mock_data(num_examples=8, data_dir=str(tmp_path)), \
       caplog.at_level(logging.WARNING):
    split = data.load_split("cifar100", "test", str(tmp_path))
  assert split.class_names[:3] == ["0", "1", "2"] and split.num_classes == 100
  assert split.coarse_names[0] == "aquatic_mammals"  # its own names file is there
  warnings = [r.getMessage() for r in caplog.records if "labels.txt" in r.getMessage()]
  assert len(warnings) == 1 and "\n" not in warnings[0]
  assert warnings[0].startswith(f"{version_dir} has no label.labels.txt: the 100 classes of "
                                "'label' are named by their index ('0' to '99')")


def test_complete_tfds_metadata_names_the_classes_without_warning(tmp_path, caplog):
  _metadata_copy(tmp_path)
  with tfds.testing.mock_data(num_examples=8, data_dir=str(tmp_path)), \
       caplog.at_level(logging.WARNING):
    split = data.load_split("cifar100", "test", str(tmp_path))
  assert split.class_names[:2] == ["apple", "aquarium_fish"]
  assert "labels.txt" not in caplog.text


@pytest.mark.parametrize("split,expected", [
    ("tset", "Unknown split 'tset'. Should be one of ['train', 'test']."),
    ("test[:abc]", "Error parsing split 'test[:abc]'."),
])
def test_split_tfds_refuses_is_a_data_error_naming_it(mock_cifar, split, expected):
  with pytest.raises(errors.DataError) as info:
    data.load_split("cifar100", split, METADATA_DIR)
  message = cli_errors.message(info.value)
  assert message.startswith(f"Dataset 'cifar100' split {split!r} could not be read: {expected}")
  assert "https://www.tensorflow.org/datasets/splits" in message and "\n" not in message


# 4. A corrupt config.json in evaluate.py / predict.py / export.py.

def test_corrupt_config_json_is_one_error_line_naming_it(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text('{"learning_rate": 0.002,\n "batch_size" 64}')
  with pytest.raises(ValueError, match=r"config\.json is not valid JSON \(Expecting ':' "
                                       r"delimiter: line 2.*Restore it"):
    layout.load_config(str(workdir))
  (workdir / "config.json").write_text("[1, 2]")
  with pytest.raises(ValueError, match="holds a list, not a JSON object"):
    layout.load_config(str(workdir))
  (workdir / "config.json").write_text('{"learning_rate": 0.0')
  line = one_error_line(run_script("evaluate.py", f"--workdir={workdir}"))
  assert line.startswith(f"error: {workdir / 'config.json'} is not valid JSON")


# 5 and 6. A bad config-file argument or an unknown --config key, in each script taking --config.

@pytest.mark.parametrize("script", ["train.py", "sweep.py"])
@pytest.mark.parametrize("flags,expected", [
    (["--config=configs/cifar100_ti.py:foo"],
     "error: --config=configs/cifar100_ti.py:foo: Unknown config argument 'foo'; "
     "expected one of 'smoke'."),
    (["--config=configs/cifar100_ti.py", "--config.learning_rat=0.1"],
     "error: unknown config key 'learning_rat' (did you mean 'learning_rate'?)"),
    (["--config=configs/cifar100_ti.py", "--config.model.variantt=S/4"],
     "error: unknown config key 'model.variantt' (did you mean 'model.variant'?)"),
])
def test_bad_config_argument_or_key_is_one_clean_line(tmp_path, script, flags, expected):
  workdir = tmp_path / "run"
  proc = run_script(script, *flags, f"--workdir={workdir}")
  assert one_error_line(proc) == expected
  assert not workdir.exists()
