"""Datasets from TFDS, decoded once into uint8 arrays, and the per-step batch indices.

A split is read whole (CIFAR-100's train split is 150 MB) and then lives on the
accelerator; each training step's example indices are a pure function of (seed, step),
which makes resume exact and leaves the host idle.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from mixer import rng_streams


class DatasetNotFoundError(FileNotFoundError):
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
  where we looked and how to provide it.
  """
  import tensorflow as tf  # Imported here so that TF never grabs an accelerator.
  import tensorflow_datasets as tfds
  tf.config.set_visible_devices([], "GPU")
  data_dir = resolve_data_dir(data_dir)
  where = data_dir or os.path.expanduser("~/tensorflow_datasets") + " (TFDS's default)"
  try:
    ds, info = tfds.load(dataset, split=split, data_dir=data_dir, download=False,
                         batch_size=-1, with_info=True)
  except (AssertionError, tfds.core.DatasetNotFoundError, FileNotFoundError) as e:
    raise DatasetNotFoundError(
        f"Dataset {dataset!r} (split {split!r}) is not prepared in {where}. Point "
        f"TFDS_DATA_DIR or --config.data_dir at a directory holding {dataset}/<version>/ "
        f"in TFDS format, or prepare it on a machine with internet access "
        f"(`tfds build {dataset} --data_dir=DIR`) and copy DIR here. ({e})") from None
  missing = {"image", "label"} - set(info.features)
  if missing:
    raise ValueError(f"Dataset {dataset!r} has no {sorted(missing)} feature; "
                     "Mixer needs an image-classification dataset with `image` and `label`.")
  arrays = tfds.as_numpy(ds)
  images = np.asarray(arrays["image"], np.uint8)
  if images.ndim != 4:
    raise ValueError(f"Dataset {dataset!r} images have shape {images.shape[1:]}; "
                     "variable-size images are not supported.")
  coarse = None
  if "coarse_label" in info.features:
    coarse = (np.asarray(arrays["coarse_label"], np.int32),
              list(info.features["coarse_label"].names))
  return Split(images=images, labels=np.asarray(arrays["label"], np.int32),
               class_names=list(info.features["label"].names),
               coarse_labels=coarse[0] if coarse else None,
               coarse_names=coarse[1] if coarse else None)


def check_disjoint(train: Split, val: Split, train_name: str, val_name: str) -> None:
  """Raises ValueError when validation examples also appear in training (a split overlap).

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
    raise ValueError(
        f"config.val_split={val_name!r} shares {shared} of its {len(val)} examples with "
        f"config.train_split={train_name!r}; hold validation out of training, e.g. "
        "train_split='train[:98%]' with val_split='train[98%:]'.")


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Training drops each epoch's last partial batch; every epoch is a fresh permutation."""
  if num_examples < batch_size:
    raise ValueError(f"batch_size={batch_size} is larger than the training split "
                     f"({num_examples} examples).")
  return num_examples // batch_size


def epoch_order(seed: int, epoch: jax.Array, num_examples: int) -> jax.Array:
  """Epoch `epoch`'s order of the training examples: a permutation, a pure function of
  (seed, epoch). Jittable. For CIFAR's 50,000 examples it costs 21 ms on the 2-core VM (4% of
  a Ti/4 step), so the train step takes it precomputed once per epoch."""
  return jax.random.permutation(rng_streams.key(seed, rng_streams.EPOCH_ORDER, epoch),
                                num_examples)


def indices_in_order(order: jax.Array, step: jax.Array, batch_size: int) -> jax.Array:
  """Step `step`'s examples: its slice of `order` = epoch_order(seed, step // steps_per_epoch)."""
  per_epoch = order.shape[0] // batch_size
  return jax.lax.dynamic_slice_in_dim(order, (step % per_epoch) * batch_size, batch_size)


def batch_indices(seed: int, step: jax.Array, num_examples: int, batch_size: int) -> jax.Array:
  """Indices of training step `step`'s examples; jittable, a pure function of (seed, step)."""
  epoch = step // steps_per_epoch(num_examples, batch_size)
  return indices_in_order(epoch_order(seed, epoch, num_examples), step, batch_size)


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
