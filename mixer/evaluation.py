"""Using a training run's checkpoints: evaluate a split, classify image files.

The run is read back by `saved_runs` (config, checked checkpoint, class names).
`evaluate_checkpoint` scores every example of a split once and writes
`WORKDIR/eval/<split>_step<STEP>.json` (accuracy overall, per class and per superclass,
expected calibration error) with PNGs beside it; `predict_files` classifies image files.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import struct
import warnings
from typing import Any, Sequence

import jax
import numpy as np
from PIL import Image

from mixer import data, errors, evaluator, metrics, models, parallel, plots, saved_runs
from mixer import workdir as layout

ECE_BINS = 15
GRID_IMAGES = 32


def softmax(logits: np.ndarray) -> np.ndarray:
  """Row-wise softmax in float64."""
  z = np.asarray(logits, np.float64)
  z = np.exp(z - z.max(axis=-1, keepdims=True))
  return z / z.sum(axis=-1, keepdims=True)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray,
                               num_bins: int = ECE_BINS) -> float:
  """ECE over `num_bins` equal-width bins of top-1 confidence, bins [k/n, (k+1)/n).

  ECE = sum_b (n_b / N) |accuracy_b - confidence_b| = sum_b |correct_b - confidence sum_b| / N.
  """
  probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
  confidence = probs.max(axis=-1)
  correct = (probs.argmax(axis=-1) == labels).astype(np.float64)
  bins = np.minimum((confidence * num_bins).astype(np.int64), num_bins - 1)
  gap = (np.bincount(bins, correct, num_bins) - np.bincount(bins, confidence, num_bins))
  return float(np.abs(gap).sum() / len(labels))


def accuracy_by_group(groups: np.ndarray, correct: np.ndarray, num_groups: int) -> np.ndarray:
  """Mean of `correct` over the examples of each group; NaN for a group with no examples."""
  counts = np.bincount(groups, minlength=num_groups)
  hits = np.bincount(groups, np.asarray(correct, np.float64), minlength=num_groups)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)


def superclass_of_each_class(labels: np.ndarray, coarse_labels: np.ndarray,
                             num_classes: int) -> np.ndarray:
  """The coarse label most examples of each class carry (-1 for a class with no examples)."""
  num_coarse = int(coarse_labels.max()) + 1
  pairs = np.zeros((num_classes, num_coarse), np.int64)
  np.add.at(pairs, (labels, coarse_labels), 1)
  return np.where(pairs.sum(axis=1) > 0, pairs.argmax(axis=1), -1)


def _by_name(names: Sequence[str], values: np.ndarray) -> dict[str, float | None]:
  return {n: None if np.isnan(v) else float(v) for n, v in zip(names, values)}


def worst_classes(per_class_top1: dict[str, float | None], k: int = 5) -> list[tuple[str, float]]:
  """The k classes with the lowest accuracy (classes without examples left out)."""
  scored = [(name, acc) for name, acc in per_class_top1.items() if acc is not None]
  return sorted(scored, key=lambda item: (item[1], item[0]))[:k]


def _eval_batch_size(requested: int | None, default: int, num_examples: int,
                     mesh: jax.sharding.Mesh) -> int:
  devices = mesh.devices.size
  if requested is not None:
    if requested < 1 or requested % devices:
      raise errors.ConfigError(f"--batch_size={requested} must be a positive multiple of the "
                               f"number of devices ({devices}).")
    return requested
  # No bigger than the split needs, and divisible by the device count.
  size = min(default, num_examples)
  return -(-size // devices) * devices


def evaluate_checkpoint(workdir: str, checkpoint: str | int = "latest", split: str = "test",
                        data_dir: str | None = None, batch_size: int | None = None,
                        parameters: str = "auto", single_view: bool = False
                        ) -> dict[str, Any]:
  """Evaluates one checkpoint on every example of `split` once; writes the report and PNGs.

  With the run's test-time views (eval_flip, eval_shift), or one view per image when
  `single_view` (the report's files then end in `_single_view`). Returns the report (as
  written to JSON) plus `files`, the paths written.
  """
  step, config, params = saved_runs.restore_params(workdir, checkpoint, parameters)
  eval_split = data.load_split(config.dataset, split, data_dir or config.data_dir)
  num_classes = saved_runs.num_classes_of(params)
  if eval_split.num_classes != num_classes:
    raise errors.DataError(f"{config.dataset}:{split} has {eval_split.num_classes} classes but "
                           f"the checkpoint's head has {num_classes} outputs.")
  mesh = parallel.make_mesh()
  batch = _eval_batch_size(batch_size, config.eval_batch_size, len(eval_split), mesh)
  model = models.build_model(config, num_classes)
  flip, shift = (False, 0) if single_view else (bool(config.eval_flip), int(config.eval_shift))
  score = evaluator.Evaluator(model, eval_split, config.image_size, batch, mesh,
                              flip=flip, shift=shift)
  result = score(params, keep_logits=True)
  probs = softmax(result["logits"])
  predictions = probs.argmax(axis=-1)
  correct = predictions == eval_split.labels
  report: dict[str, Any] = {
      "workdir": os.path.abspath(workdir), "dataset": config.dataset, "split": split,
      "step": step, "parameters": saved_runs.parameters_used(config, parameters),
      "parameters_described": saved_runs.describe_parameters(config, parameters),
      "eval_flip": flip, "eval_shift": shift,
      "num_examples": result["eval/num_examples"],
      "top1": float(result["eval/top1"]), "top5": float(result["eval/top5"]),
      "loss": float(result["eval/loss"]),
      "ece": expected_calibration_error(probs, eval_split.labels),
      "per_class_top1": _by_name(eval_split.class_names,
                                 accuracy_by_group(eval_split.labels, correct, num_classes)),
  }
  out_dir = layout.path(workdir, layout.EVAL_DIR)
  os.makedirs(out_dir, exist_ok=True)
  stem = os.path.join(out_dir, f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', split)}_step{step}"
                      + ("_trained" if parameters == "trained" and config.ema_decay else "")
                      + ("_single_view" if single_view else ""))
  files = [plots.prediction_grid(eval_split.images[:GRID_IMAGES], eval_split.labels[:GRID_IMAGES],
                                 predictions[:GRID_IMAGES], eval_split.class_names,
                                 f"{stem}_predictions.png")]
  if eval_split.coarse_labels is not None:
    coarse, names = eval_split.coarse_labels, eval_split.coarse_names
    report["per_superclass_top1"] = _by_name(names,
                                             accuracy_by_group(coarse, correct, len(names)))
    # A prediction's superclass is that of the predicted class (-1: class absent from the split).
    predicted_coarse = superclass_of_each_class(eval_split.labels, coarse, num_classes)[predictions]
    report["superclass_top1"] = float(np.mean(predicted_coarse == coarse))
    known = predicted_coarse >= 0
    files.append(plots.confusion_matrix(coarse[known], predicted_coarse[known], names,
                                        f"{stem}_superclass_confusion.png"))
  files += _training_curves(layout.path(workdir, layout.METRICS_FILE), out_dir)
  with open(f"{stem}.json", "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  return dict(report, files=[f"{stem}.json"] + files)


def _training_curves(metrics_path: str, out_dir: str) -> list[str]:
  """[the plot of the run's metrics.jsonl], or [] when it has none or cannot be read: the
  evaluation does not depend on it."""
  if not os.path.isfile(metrics_path):
    return []
  try:
    rows = metrics.read_jsonl(metrics_path)
  except ValueError as e:
    logging.warning("No training curves: %s", e)
    return []
  return [plots.training_curves(rows, os.path.join(out_dir, "training_curves.png"))]


@dataclasses.dataclass
class FilePrediction:
  """The top classes for one image file, or why it could not be classified."""
  path: str
  top: list[tuple[str, float]]  # (class name, probability), most probable first
  error: str | None = None


class ImageTooLarge(errors.DataError):
  """More pixels than PIL's Image.MAX_IMAGE_PIXELS: possibly a decompression bomb."""


class UnsupportedImageMode(errors.DataError):
  """A PIL image mode with no defined mapping to 8-bit RGB (float 'F', 'LAB', ...)."""


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_RGB_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV")


def _integer_grey(image: Image.Image) -> Image.Image:
  """16-bit grey ('I;16*', or 'I' with values above 255) scaled by 1/257 to 8 bits; 'I' with
  values in 0..255 is taken as 8-bit."""
  values = np.asarray(image).astype(np.float64)
  low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
  if low < 0 or high > 65535:
    raise UnsupportedImageMode(f"image mode {image.mode!r} with values {low}..{high}, outside "
                               "0..65535, has no defined brightness; save it as 8- or 16-bit")
  if image.mode in _SIXTEEN_BIT_MODES or high > 255:
    values = values / 257.0
  return Image.fromarray(np.round(values).astype(np.uint8), "L").convert("RGB")


def _over_white(image: Image.Image) -> Image.Image:
  """An image with transparency as RGB, composited over a white background."""
  rgba = np.asarray(image.convert("RGBA"), np.float64)
  alpha = rgba[..., 3:] / 255.0
  rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
  return Image.fromarray(np.round(rgb).astype(np.uint8), "RGB")


def to_rgb(image: Image.Image) -> Image.Image:
  """8-bit RGB of a decoded image, whatever its mode.

  16-bit grey is scaled by 1/257 (PIL's own convert clips it: any value above 255 became
  white); transparency (an alpha band or a PNG transparent colour) is composited over white;
  CMYK, YCbCr, HSV, palette and 1-bit images are converted by PIL. Raises
  UnsupportedImageMode for modes without a defined 8-bit range: float 'F' (0..1 or 0..255
  or anything), 'LAB', 32-bit integer values outside 0..65535.
  """
  mode = image.mode
  if mode in _SIXTEEN_BIT_MODES or mode == "I":
    return _integer_grey(image)
  if mode in _ALPHA_MODES or (mode in _RGB_MODES and "transparency" in image.info):
    try:
      return _over_white(image)
    except ValueError as e:  # PIL converts some alpha modes ('La') to nothing else
      raise UnsupportedImageMode(f"image mode {mode!r} cannot be converted to RGB ({e})") from e
  if mode in _RGB_MODES:
    return image.convert("RGB")
  what = "32-bit float, no defined range" if mode == "F" else "not convertible to RGB here"
  raise UnsupportedImageMode(f"image mode {mode!r} ({what}) is not supported; save the image "
                             "as 8-bit RGB or greyscale (or 16-bit greyscale)")


def load_image(path: str, image_size: int) -> np.ndarray:
  """uint8 (image_size, image_size, 3): RGB (see to_rgb), resized (not cropped) with PIL.

  Raises FileNotFoundError or IsADirectoryError for a bad path, ImageTooLarge for an image
  of more than Image.MAX_IMAGE_PIXELS pixels (PIL only warns below twice that; refused here
  before decoding anything), UnsupportedImageMode for a mode to_rgb refuses, else OSError
  or DataError for a file PIL cannot decode.
  """
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      with Image.open(path) as image:
        rgb = to_rgb(image).resize((image_size, image_size), Image.Resampling.BILINEAR)
  # Neither is an OSError: DecompressionBombError is an Exception, the warning a RuntimeWarning.
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise ImageTooLarge(f"too large to decode ({e})") from e
  # What PIL's decoders raise besides OSError for a corrupt file.
  except (SyntaxError, EOFError, IndexError, struct.error) as e:
    raise errors.DataError(f"{type(e).__name__}: {e}") from e
  return np.asarray(rgb, np.uint8)


def predict_files(workdir: str, paths: Sequence[str], checkpoint: str | int = "latest",
                  data_dir: str | None = None, top_k: int = 5
                  ) -> tuple[int, list[FilePrediction]]:
  """(step, one FilePrediction per path); unreadable files get `error`, the rest are classified.

  A missing, undecodable or oversized file (see load_image) is that file's error only.
  """
  step, config, params = saved_runs.restore_params(workdir, checkpoint)
  num_classes = saved_runs.num_classes_of(params)
  names = saved_runs.load_class_names(workdir, config, num_classes, data_dir)
  results, images = [], []
  for path in paths:
    try:
      images.append(load_image(path, config.image_size))
      results.append(FilePrediction(path, []))
    except FileNotFoundError:
      results.append(FilePrediction(path, [], "no such file"))
    except IsADirectoryError:
      results.append(FilePrediction(path, [], "is a directory, not an image"))
    except (ImageTooLarge, UnsupportedImageMode) as e:
      results.append(FilePrediction(path, [], str(e)))
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
      results.append(FilePrediction(path, [], f"not a readable image ({e})"))
  if images:
    model = models.build_model(config, num_classes)
    logits = evaluator.predict_logits(model, params,
                                      data.to_float(np.stack(images), config.image_size),
                                      flip=config.eval_flip, shift=config.eval_shift)
    probs = softmax(jax.device_get(logits))
    ok = [r for r in results if r.error is None]
    for result, row in zip(ok, probs):
      best = np.argsort(-row, kind="stable")[:top_k]
      result.top = [(names[i], float(row[i])) for i in best]
  return step, results
