"""Runs train.py under `tfds.testing.mock_data`, for tests that need a fresh process.

  python tests/mock_train.py --config=configs/cifar100_ti.py:smoke --workdir=DIR [...]

MOCK_NUM_EXAMPLES sets the size of every split (default 128).
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
from absl import app  # pylint: disable=g-import-not-at-top

import train  # pylint: disable=g-import-not-at-top
from mixer import runtime  # pylint: disable=g-import-not-at-top

METADATA_DIR = os.path.join(ROOT, "tests", "tfds_metadata")

if __name__ == "__main__":
  runtime.configure_xla_cpu()  # as train.py does (tcmalloc comes from the test's environment)
  with tfds.testing.mock_data(num_examples=int(os.environ.get("MOCK_NUM_EXAMPLES", "128")),
                              data_dir=METADATA_DIR):
    app.run(train.main)
