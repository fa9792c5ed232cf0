"""Runs train.py under `tfds.testing.mock_data`, for tests that need a fresh process.

  python tests/mock_train.py --config=configs/cifar100_ti.py:smoke --workdir=DIR [...]

MOCK_NUM_EXAMPLES sets the size of every split (default 128).
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# As runtime.quiet_cpp_logs does for train.py, before TensorFlow loads:
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
from absl import app  # pylint: disable=g-import-not-at-top

import train  # pylint: disable=g-import-not-at-top
from mixer import cli_errors, runtime  # pylint: disable=g-import-not-at-top

METADATA_DIR = os.path.join(ROOT, "tests", "tfds_metadata")

if __name__ == "__main__":
  runtime.configure_xla_cpu()
  runtime.quiet_cpp_logs()  # as train.py does (tcmalloc comes from the test's environment)
  with tfds.testing.mock_data(num_examples=int(os.environ.get("MOCK_NUM_EXAMPLES", "128")),
                              data_dir=METADATA_DIR):
    app.run(train.main, flags_parser=cli_errors.parse_flags)
