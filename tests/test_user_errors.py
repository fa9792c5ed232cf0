"""A user's mistake ends train.py with one `error:` line naming it, and nothing is created."""
import errno
import glob
import os
import shutil

import pytest

from conftest import run_mock_train, tiny_config, tiny_flags
from mixer import config_lib, data

REAL_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                         "shared", "tfds")
REAL_DATA = os.environ.get("TFDS_DATA_DIR", REAL_DATA)


def _one_error_line(proc):
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, proc.stderr[-3000:]
  return errors[0]


@pytest.mark.parametrize("flags,expected", [
    (["--config.learning_rate=-1"], "error: config.learning_rate=-1.0 is invalid: must be > 0"),
    (["--config.batch_sizee=3"], "batch_sizee"),
    (["--config=configs/no_such_config.py"], "config file configs/no_such_config.py does not exist"),
])
def test_bad_config_is_one_error_line_and_creates_nothing(tmp_path, flags, expected):
  workdir = tmp_path / "run"
  proc = run_mock_train(str(workdir), *tiny_flags(), *flags, check=False, timeout=120)
  assert expected in _one_error_line(proc)
  assert not workdir.exists()


def test_float16_is_refused_in_one_line_recommending_bfloat16():
  with pytest.raises(ValueError) as info:
    config_lib.validate(tiny_config(**{"model.dtype": "float16"}))
  message = str(info.value)
  assert message.startswith("config.model.dtype='float16' is invalid: ") and "\n" not in message
  assert "loss scaling" in message and "use bfloat16" in message


def test_mixer_debug_shows_the_traceback(tmp_path):
  proc = run_mock_train(str(tmp_path / "run"), *tiny_flags(), "--config.learning_rate=-1",
                        env={"MIXER_DEBUG": "1"}, check=False, timeout=120)
  assert proc.returncode != 0 and "Traceback" in proc.stderr and "learning_rate" in proc.stderr


def test_workdir_that_is_a_file_is_one_error_line(tmp_path):
  path = tmp_path / "file"
  path.write_text("not a directory")
  proc = run_mock_train(str(path), *tiny_flags(), check=False, timeout=120)
  assert f"{path} is a file" in _one_error_line(proc)
  assert path.read_text() == "not a directory"


def test_unknown_dataset_names_close_matches_only(tmp_path):
  with pytest.raises(data.DatasetNotFoundError) as info:
    data.load_split("cifar1000", "train", str(tmp_path))
  message = str(info.value)
  assert "Unknown dataset 'cifar1000'" in message and "'cifar100'" in message
  assert "mnist" not in message and len(message) < 300


def test_wrong_version_names_expected_and_found(tmp_path):
  os.makedirs(tmp_path / "cifar100" / "9.9.9")
  with pytest.raises(data.DatasetNotFoundError, match=r"version\(s\) \['9\.9\.9'\].*reads "
                                                      r"version 3\.0\.2"):
    data.load_split("cifar100", "test", str(tmp_path))


def test_missing_data_dir_says_so(tmp_path):
  with pytest.raises(data.DatasetNotFoundError, match="does not exist"):
    data.load_split("cifar100", "test", str(tmp_path / "nowhere"))


@pytest.mark.skipif(not os.path.isdir(os.path.join(REAL_DATA, "cifar100", "3.0.2")),
                    reason="real CIFAR-100 (TFDS) not available")
def test_corrupt_record_file_is_named(tmp_path):
  source = os.path.join(REAL_DATA, "cifar100", "3.0.2")
  target = tmp_path / "cifar100" / "3.0.2"
  os.makedirs(target)
  for path in glob.glob(os.path.join(source, "*")):
    if "train.tfrecord" not in path:
      shutil.copy(path, target)
  record = glob.glob(str(target / "cifar100-test.tfrecord*"))[0]
  os.chmod(record, 0o644)
  with open(record, "r+b") as f:
    f.seek(os.path.getsize(record) // 2)
    f.write(b"\xff" * 64)
  with pytest.raises(ValueError, match=f"Corrupt data file {record}"):
    data.load_split("cifar100", "test", str(tmp_path))


def test_disk_full_at_a_save_names_the_path_and_keeps_the_last_checkpoint(mock_cifar, tmp_path,
                                                                           monkeypatch):
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from mixer import checkpoints, cli_errors, train_lib  # pylint: disable=g-import-not-at-top
  from mixer import workdir as layout  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  train_lib.train_and_evaluate(tiny_config(total_steps=6), workdir)

  def disk_full(self, step, state, metrics=None):
    del state, metrics
    raise OSError(errno.ENOSPC, "No space left on device", os.path.join(self.directory, str(step)))

  monkeypatch.setattr(checkpoints.Checkpoints, "save", disk_full)
  with pytest.raises(OSError) as info:
    train_lib.train_and_evaluate(tiny_config(), workdir, allow_config_change=("total_steps",))
  assert cli_errors.message(info.value).startswith(
      f"disk full: {os.path.join(workdir, 'checkpoints', '12')}")
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["6"]
  assert layout.read_run(workdir).status == "failed"
  assert not os.path.exists(os.path.join(workdir, "lock.json"))
