"""Datasets from TFDS, decoded once into uint8 arrays, and the per-step batch indices.

A split is read whole (CIFAR-100's train split is 150 MB) and then lives on the
accelerator; each training step's example indices are a pure function of (seed, step),
which makes resume exact and leaves the host idle.
"""
from __future__ import annotations

import dataclasses
import difflib
import glob
import logging
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixer import errors, rng_streams


class DatasetNotFoundError(errors.MissingFileError):
  """The dataset is not prepared where we looked, and we will not try to download it."""


@dataclasses.dataclass
class Split:
  """One split as host arrays, plus the label metadata."""
  images: np.ndarray  # uint8, (N, H, W, C)
  labels: np.ndarray  # int32, (N,)
  class_names: list[str]
  coarse_labels: np.ndarray | None = None  # int32, (N,), e.g. CIFAR-100's 20 superclasses
  coarse_names: list[str] | None = None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return len(self.labels)


def resolve_data_dir(data_dir: str | None) -> str | None:
  """config.data_dir, else $TFDS_DATA_DIR, else None (TFDS's default, ~/tensorflow_datasets)."""
  return data_dir or os.environ.get("TFDS_DATA_DIR") or None


def load_split(dataset: str, split: str, data_dir: str | None = None) -> Split:
  """Reads a TFDS image-classification split (features `image`, `label`) into memory.

  Never downloads: a dataset that is not prepared fails at once with a message saying
  where we looked and how to provide it. A split string TFDS refuses (an unknown split, a
  slice that selects nothing) is a DataError naming it.
  """
  import tensorflow as tf  # Imported here so that TF never grabs an accelerator.
  import tensorflow_datasets as tfds
  tf.config.set_visible_devices([], "GPU")
  data_dir = resolve_data_dir(data_dir)
  root = data_dir or os.path.expanduser("~/tensorflow_datasets")
  _check_metadata(dataset, root)
  try:
    ds, info = tfds.load(dataset, split=split, data_dir=data_dir, download=False,
                         batch_size=-1, with_info=True)
    arrays = tfds.as_numpy(ds)
  except (AssertionError, tfds.core.DatasetNotFoundError, FileNotFoundError) as e:
    raise DatasetNotFoundError(_not_found_message(dataset, split, root, data_dir, e)) from None
  except tf.errors.DataLossError as e:
    raise errors.DataError(_corrupt_message(dataset, split, root, e)) from None
  except (ValueError, tf.errors.OpError) as e:  # TFDS's split parsing; an empty/reversed slice
    raise errors.DataError(_bad_split_message(dataset, split, e)) from None
  missing = {"image", "label"} - set(info.features)
  if missing:
    raise errors.DataError(f"Dataset {dataset!r} has no {sorted(missing)} feature; "
                           "Mixer needs an image-classification dataset with `image` and `label`.")
  images = np.asarray(arrays["image"], np.uint8)
  if images.ndim != 4:
    raise errors.DataError(f"Dataset {dataset!r} images have shape {images.shape[1:]}; "
                           "variable-size images are not supported.")
  _warn_unnamed_classes(dataset, root, info.features)
  coarse = None
  if "coarse_label" in info.features:
    coarse = (np.asarray(arrays["coarse_label"], np.int32),
              list(info.features["coarse_label"].names))
  return Split(images=images, labels=np.asarray(arrays["label"], np.int32),
               class_names=list(info.features["label"].names),
               coarse_labels=coarse[0] if coarse else None,
               coarse_names=coarse[1] if coarse else None)


def _expected_version(dataset: str) -> str | None:
  import tensorflow_datasets as tfds
  try:
    return str(tfds.builder_cls(dataset).VERSION)
  except Exception:  # pylint: disable=broad-except  # unknown name, or a name with a config
    return None


def _not_found_message(dataset: str, split: str, root: str, data_dir: str | None,
                       error: Exception) -> str:
  """Why `dataset` could not be loaded from `root`, and what to do, in one sentence or two."""
  import tensorflow_datasets as tfds
  where = root if data_dir else f"{root} (TFDS's default; set TFDS_DATA_DIR or --config.data_dir)"
  name = re.split(r"[:/]", dataset)[0]
  expected = _expected_version(dataset)
  if expected is None and "/" not in dataset and ":" not in dataset:
    close = difflib.get_close_matches(name, tfds.list_builders(with_community_datasets=False),
                                      n=4, cutoff=0.7)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"Unknown dataset {dataset!r}: TFDS has no dataset of that name.{hint}"
  if not os.path.isdir(root):
    return f"The data directory {where} does not exist."
  dataset_dir = os.path.join(root, name)
  if not os.path.isdir(dataset_dir):
    present = sorted(d for d in os.listdir(root) if not d.startswith("."))
    return (f"Dataset {dataset!r} is not prepared in {where} (it holds: "
            f"{', '.join(present[:10]) or 'nothing'}). Point TFDS_DATA_DIR or --config.data_dir "
            f"at a directory holding {name}/<version>/ in TFDS format, or prepare it on a machine "
            f"with internet access (`tfds build {name} --data_dir=DIR`) and copy DIR here.")
  found = sorted(d for d in os.listdir(dataset_dir) if re.fullmatch(r"\d+\.\d+\.\d+", d))
  if expected and expected not in found:
    return (f"Dataset {dataset!r} in {dataset_dir} has version(s) {found or 'none'}, but this "
            f"TFDS ({tfds.__version__}) reads version {expected}: prepare {name}/{expected} "
            "with this TFDS version.")
  first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
  return f"Dataset {dataset!r} split {split!r} could not be read from {where}: {first_line}"


def _check_metadata(dataset: str, root: str) -> None:
  """Raises DatasetNotFoundError when the version directory TFDS will read exists without its
  dataset_info.json (e.g. only the tfrecords were copied): TFDS then finds no splits."""
  version_dir = _version_dir(dataset, root)
  if version_dir is None or not os.path.isdir(version_dir):
    return
  info = os.path.join(version_dir, "dataset_info.json")
  if not os.path.isfile(info):
    raise DatasetNotFoundError(
        f"{version_dir} has no dataset_info.json ({_listing(version_dir)}), so TFDS cannot "
        "read it: copy the whole directory from where the dataset was prepared (with "
        "dataset_info.json and features.json), or rebuild it with `tfds build`.")


def _bad_split_message(dataset: str, split: str, error: Exception) -> str:
  """The first line of TFDS's complaint about `split`, without TF's `{{function_node ...}}`."""
  text = re.sub(r"^\{\{[^}]*\}\}\s*", "", getattr(error, "message", str(error)).strip())
  first = re.sub(r"\s*\[Op:\w+\].*$", "", (text.splitlines() or [type(error).__name__])[0])[:300]
  if _SPLIT_SYNTAX not in first:
    first += f" (split syntax: {_SPLIT_SYNTAX})"
  return f"Dataset {dataset!r} split {split!r} could not be read: {first}"


_SPLIT_SYNTAX = "https://www.tensorflow.org/datasets/splits"


def _warn_unnamed_classes(dataset: str, root: str, features: Any) -> None:
  """One warning line per label feature whose names file (`<feature>.labels.txt`, written by
  TFDS beside dataset_info.json) is missing: TFDS then names the classes '0', '1', ... (the
  labels themselves, and so training, are unaffected)."""
  version_dir = _version_dir(dataset, root)
  if version_dir is None or not os.path.isdir(version_dir):
    return
  for key in ("label", "coarse_label"):
    names_file = f"{key}.labels.txt"
    if key in features and not os.path.isfile(os.path.join(version_dir, names_file)):
      count = features[key].num_classes
      logging.warning(
          "%s has no %s: the %d classes of '%s' are named by their index ('0' to '%d') in "
          "reports, predictions and class_names.json; copy %s from where the dataset was "
          "prepared to name them.", version_dir, names_file, count, key, count - 1, names_file)


def _version_dir(dataset: str, root: str) -> str | None:
  """root/NAME[/CONFIG]/VERSION for 'NAME[/CONFIG][:VERSION]' (VERSION: this TFDS's)."""
  name, _, version = dataset.partition(":")
  version = version or _expected_version(name)
  return os.path.join(root, *name.split("/"), version) if version else None


def _listing(directory: str) -> str:
  names = sorted(os.listdir(directory))
  shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
  return f"it holds: {shown}" if names else "it is empty"


def _corrupt_message(dataset: str, split: str, root: str, error: Exception) -> str:
  """Names the damaged record file of `split` (found by reading each of its files)."""
  import tensorflow as tf
  name, base = re.split(r"[:/]", dataset)[0], re.split(r"[\[+]", split)[0]
  expected = _expected_version(dataset) or "*"
  files = sorted(glob.glob(os.path.join(root, name, expected, f"*-{base}.tfrecord*")))
  for path in files:
    try:
      for _ in tf.data.TFRecordDataset(path):
        pass
    except tf.errors.DataLossError:
      return (f"Corrupt data file {path} (dataset {dataset!r}, split {split!r}): re-copy or "
              "rebuild the dataset.")
  message = getattr(error, "message", str(error)).strip().splitlines()[0][:300]
  return f"Corrupt data in dataset {dataset!r} split {split!r} under {root}: {message}"


def check_disjoint(train: Split, val: Split, train_name: str, val_name: str) -> None:
  """Raises ConfigError when validation examples also appear in training (a split overlap).

  Compares image bytes with labels. Datasets repeat a few images (CIFAR-100's train split
  has 49,986 distinct images in 50,000), so a handful shared is tolerated with a warning;
  more than 1% of the validation split means the two split strings overlap.
  """
  def keys(split):
    rows = np.ascontiguousarray(split.images).reshape(len(split), -1)
    return {row.tobytes() + label.tobytes() for row, label in zip(rows, split.labels)}
  shared = len(keys(train) & keys(val))
  if shared and shared <= 0.01 * len(val):
    logging.warning("%d of the %d validation examples (%s) also appear in %s (repeated "
                    "images in the dataset).", shared, len(val), val_name, train_name)
  elif shared:
    raise errors.ConfigError(
        f"config.val_split={val_name!r} shares {shared} of its {len(val)} examples with "
        f"config.train_split={train_name!r}; hold validation out of training, e.g. "
        "train_split='train[:98%]' with val_split='train[98%:]'.")


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Training drops each epoch's last partial batch; every epoch is a fresh permutation."""
  if num_examples < batch_size:
    raise errors.ConfigError(f"batch_size={batch_size} is larger than the training split "
                     f"({num_examples} examples).")
  return num_examples // batch_size


def epoch_order(seed: int, epoch: jax.Array, num_examples: int) -> jax.Array:
  """Epoch `epoch`'s order of the training examples: a permutation, a pure function of
  (seed, epoch). Jittable. Not cheap for 50,000 examples (docs/BENCHMARKS.md), so the train
  step takes it precomputed once per epoch (EpochOrders)."""
  return jax.random.permutation(rng_streams.key(seed, rng_streams.EPOCH_ORDER, epoch),
                                num_examples)


def indices_in_order(order: jax.Array, step: jax.Array, batch_size: int) -> jax.Array:
  """Step `step`'s examples: its slice of `order` = epoch_order(seed, step // steps_per_epoch)."""
  per_epoch = order.shape[0] // batch_size
  return jax.lax.dynamic_slice_in_dim(order, (step % per_epoch) * batch_size, batch_size)


def pad_to_multiple(split: Split, multiple: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Images, labels and a 0/1 mask padded so that every example is evaluated exactly once."""
  n = len(split)
  padded = -(-n // multiple) * multiple
  pad = padded - n
  images = np.concatenate([split.images, np.zeros((pad,) + split.images.shape[1:], np.uint8)])
  labels = np.concatenate([split.labels, np.zeros((pad,), np.int32)])
  mask = np.concatenate([np.ones((n,), np.float32), np.zeros((pad,), np.float32)])
  return images, labels, mask


def eval_batch(images: jax.Array, labels: jax.Array, mask: jax.Array, index: jax.Array,
               batch_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Batch `index` of padded eval arrays (jittable)."""
  start = index * batch_size
  take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, batch_size)
  return take(images), take(labels), take(mask)


def to_float(images: jax.Array, image_size: int) -> jax.Array:
  """uint8 images -> float32 in [-1, 1] (the published Mixers' input range), resized if needed."""
  x = images.astype(jnp.float32) / 127.5 - 1.0
  if x.shape[1] != image_size or x.shape[2] != image_size:
    x = jax.image.resize(x, (x.shape[0], image_size, image_size, x.shape[3]), "bilinear")
  return x


class EpochOrders:
  """Each epoch's example order (epoch_order), computed on the devices once per epoch.

  Called with the host's step number and the state's step array before each train step: the
  order is recomputed from the device array when the epoch changes, so nothing is copied from
  the host and resuming mid-epoch rebuilds the same order.
  """

  def __init__(self, seed: int, num_examples: int, batch_size: int,
               sharding: jax.sharding.Sharding):
    self.per_epoch = steps_per_epoch(num_examples, batch_size)
    self._compute = jax.jit(
        lambda step: epoch_order(seed, step // self.per_epoch, num_examples),
        out_shardings=sharding)
    self._epoch: int | None = None
    self._order: jax.Array | None = None

  def __call__(self, step: int, step_array: jax.Array) -> jax.Array:
    """The order for 0-based step `step` (== step_array, the state's step)."""
    if step // self.per_epoch != self._epoch:
      self._epoch, self._order = step // self.per_epoch, self._compute(step_array)
    return self._order
