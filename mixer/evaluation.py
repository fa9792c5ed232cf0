"""Using a training run's checkpoints: restore the parameters, evaluate a split, classify files.

A run's workdir describes itself: `config.json` rebuilds the model, `checkpoints/<step>/`
holds the TrainState and `class_names.json` the label names. `evaluate_checkpoint` scores
every example of a split once and writes `WORKDIR/eval/<split>_step<STEP>.json` (accuracy
overall, per class and per superclass, expected calibration error) with PNGs beside it.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
import struct
import warnings
from typing import Any, Sequence

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from PIL import Image

from mixer import (checkpoints, config_lib, data, evaluator, metrics, models, parallel, plots,
                   pretrained)

CLASS_NAMES_FILE = "class_names.json"
ECE_BINS = 15
GRID_IMAGES = 32
# CheckpointManager stores its single item under this name inside each step's directory.
CHECKPOINT_ITEM = "default"


def _contents(directory: str) -> str:
  if not os.path.isdir(directory):
    return f"{directory} does not exist"
  names = sorted(os.listdir(directory))
  return f"{directory} holds: {', '.join(names)}" if names else f"{directory} is empty"


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's resolved config from WORKDIR/config.json, over today's defaults.

  The defaults fill keys that older runs did not save (e.g. explicit model dimensions).
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No config.json in {workdir} ({_contents(workdir)}); "
                            "--workdir must be a training run's directory.")
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)

  def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
      both_dicts = isinstance(value, dict) and isinstance(base.get(key), dict)
      out[key] = merge(base[key], value) if both_dicts else value
    return out

  return ml_collections.ConfigDict(merge(config_lib.base_config().to_dict(), saved))


def resolve_step(ckpt: checkpoints.Checkpoints, workdir: str, checkpoint: str | int) -> int:
  """'latest', 'best' (by val/top1; latest when no step has it) or a saved step."""
  steps = ckpt.all_steps()
  if not steps:
    raise FileNotFoundError(f"No checkpoint in {ckpt.directory} ({_contents(workdir)}).")
  if isinstance(checkpoint, int) or str(checkpoint).isdigit():
    step = int(checkpoint)
    if step not in steps:
      raise ValueError(f"No checkpoint at step {step} in {ckpt.directory}; saved steps: "
                       f"{', '.join(map(str, steps))}.")
    return step
  if checkpoint == "latest":
    return steps[-1]
  if checkpoint == "best":
    best = ckpt.best_step()
    if best is None:
      logging.warning("No checkpoint in %s has val/top1 to pick the best by (runs without a "
                      "val_split have none); using the latest, step %d.", ckpt.directory,
                      steps[-1])
      return steps[-1]
    return best
  raise ValueError(f"checkpoint must be 'latest', 'best' or a step number, got {checkpoint!r}.")


def _restore_target(ckpt: checkpoints.Checkpoints, step: int) -> Any:
  """The step's own shapes and dtypes, replicated on this process's devices."""
  item_dir = epath.Path(ckpt.directory) / str(step) / CHECKPOINT_ITEM
  saved = ocp.StandardCheckpointHandler().metadata(item_dir).tree
  sharding = parallel.replicated(parallel.make_mesh())
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), saved)


def restore_checked(ckpt: checkpoints.Checkpoints, step: int, target_fn=None) -> Any:
  """Restores `step` after checking it against its checksums; ValueError when it cannot.

  A step whose files differ from the checksums written at save is refused ("damaged",
  naming the file and the good steps); any other failure to read it (including
  `target_fn(ckpt, step)`, which builds the restore target) is a ValueError naming the step
  and the other steps, so that the entry scripts print one `error:` line.
  """
  try:
    ckpt.verify(step)
  except checkpoints.CorruptCheckpointError as e:
    raise ValueError(f"{e}; good steps: {ckpt.good_steps(exclude=step)}.") from e
  except OSError as e:
    raise ValueError(f"The checkpoint at step {step} in {ckpt.directory} could not be checked "
                     f"({type(e).__name__}: {str(e)[:500]}).") from e
  try:
    return ckpt.restore(step, target_fn(ckpt, step) if target_fn else None)
  except Exception as e:  # pylint: disable=broad-except
    others = [s for s in ckpt.all_steps() if s != step]
    raise ValueError(f"The checkpoint at step {step} in {ckpt.directory} could not be read "
                     f"({type(e).__name__}: {str(e)[:500]}); other saved steps: {others}."
                     ) from e


def num_classes_of(params: Any) -> int:
  """Width of the classification head (0 when the parameters have none)."""
  return int(params["head"]["bias"].shape[-1]) if "head" in params else 0


def _by_module(keys: set[str]) -> str:
  counts = collections.Counter(key.split("/")[0] for key in keys)
  return ", ".join(f"{module} ({n} array{'s' if n > 1 else ''})"
                   for module, n in sorted(counts.items()))


def check_param_shapes(params: Any, expected: Any, where: str) -> None:
  """Raises ValueError naming the parameters missing, extra or of another shape."""
  got = flax.traverse_util.flatten_dict(params, sep="/")
  want = flax.traverse_util.flatten_dict(expected, sep="/")
  missing, extra, misshaped = pretrained.tree_diff(got, want)
  first = lambda key: (key.startswith("MixerBlock_"), key)  # stem, head, norm before the blocks
  shapes = [f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(want[k].shape)}"
            for k in sorted(misshaped, key=first)]
  problems = []
  if missing:
    problems.append(f"Missing from the checkpoint: {_by_module(set(missing))}")
  if extra:
    problems.append(f"Not in the model: {_by_module(set(extra))}")
  if shapes:
    shown = "; ".join(shapes[:8]) + (f"; and {len(shapes) - 8} more" if len(shapes) > 8 else "")
    problems.append(f"Of another shape ({len(shapes)}): {shown}")
  if problems:
    raise ValueError(f"{where} does not match the model built from its config.json. "
                     f"{'. '.join(problems)}. Was config.json edited, or the checkpoint copied "
                     "from another run?")


def restore_params(workdir: str, checkpoint: str | int = "latest", parameters: str = "auto"
                   ) -> tuple[int, ml_collections.ConfigDict, Any]:
  """(step, config, params) of a run; params replicated over this process's mesh.

  `parameters`: 'auto' (the run's EMA parameters when it kept them, config.ema_decay > 0,
  else the trained ones; `parameters_used(config)` says which), 'ema' or 'trained'. Works
  whatever the device count at training time: the arrays are restored against a
  target built from the checkpoint's own shapes, replicated on today's devices.
  """
  config = load_config(workdir)
  use = parameters_used(config, parameters)
  ckpt = checkpoints.Checkpoints(workdir, read_only=True)
  try:
    step = resolve_step(ckpt, workdir, checkpoint)
    state = restore_checked(ckpt, step, _restore_target)
    params = state["ema_params" if use == "ema" else "params"]  # the optimizer state is dropped
  finally:
    ckpt.close()
  model = models.build_model(config, num_classes_of(params))
  expected = jax.eval_shape(lambda: models.init_params(model, config.image_size, config.seed))
  check_param_shapes(params, expected, f"The checkpoint at step {step} in {workdir}")
  return step, config, params


PARAMETERS = ("auto", "ema", "trained")


def parameters_used(config: ml_collections.ConfigDict, parameters: str = "auto") -> str:
  """Which parameters restore_params returns for `parameters`: 'ema' or 'trained'."""
  if parameters not in PARAMETERS:
    raise ValueError(f"parameters must be one of {PARAMETERS}, got {parameters!r}.")
  if parameters == "ema" and not config.ema_decay:
    raise ValueError("This run kept no EMA parameters (its config.ema_decay is 0); use "
                     "parameters 'trained' or 'auto'.")
  if parameters == "auto":
    return "ema" if config.ema_decay else "trained"
  return parameters


def _tfds_label_names(dataset: str, data_dir: str | None) -> list[str]:
  """The `label` names in the dataset's TFDS metadata; raises if it has none."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")  # as in data.load_split: keep TF off accelerators
  names = list(tfds.builder(dataset, data_dir=data.resolve_data_dir(data_dir))
               .info.features["label"].names)
  # Builders that read their names at preparation time report "0", "1", ... until then.
  if names == [str(i) for i in range(len(names))]:
    raise LookupError("it holds indices only (the dataset is not prepared here)")
  return names


def load_class_names(workdir: str, config: ml_collections.ConfigDict, num_classes: int,
                     data_dir: str | None = None) -> list[str]:
  """WORKDIR/class_names.json, else the dataset's TFDS metadata, else 'class_<i>'."""
  path = os.path.join(workdir, CLASS_NAMES_FILE)
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      names, source = json.load(f)["label"], path
  else:
    source = f"the TFDS metadata of {config.dataset!r}"
    try:
      names = _tfds_label_names(config.dataset, data_dir or config.data_dir)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("No %s, and no label names in %s (%s: %s); naming classes class_<i>.",
                      path, source, type(e).__name__, str(e)[:300])
      return [f"class_{i}" for i in range(num_classes)]
  if len(names) != num_classes:
    raise ValueError(f"{source} lists {len(names)} class names but the checkpoint's head has "
                     f"{num_classes} outputs.")
  return names


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
      raise ValueError(f"--batch_size={requested} must be a positive multiple of the number of "
                       f"devices ({devices}).")
    return requested
  # No bigger than the split needs, and divisible by the device count.
  size = min(default, num_examples)
  return -(-size // devices) * devices


def evaluate_checkpoint(workdir: str, checkpoint: str | int = "latest", split: str = "test",
                        data_dir: str | None = None, batch_size: int | None = None,
                        parameters: str = "auto") -> dict[str, Any]:
  """Evaluates one checkpoint on every example of `split` once; writes the report and PNGs.

  Returns the report (as written to JSON) plus `files`, the paths written.
  """
  step, config, params = restore_params(workdir, checkpoint, parameters)
  eval_split = data.load_split(config.dataset, split, data_dir or config.data_dir)
  num_classes = num_classes_of(params)
  if eval_split.num_classes != num_classes:
    raise ValueError(f"{config.dataset}:{split} has {eval_split.num_classes} classes but the "
                     f"checkpoint's head has {num_classes} outputs.")
  mesh = parallel.make_mesh()
  batch = _eval_batch_size(batch_size, config.eval_batch_size, len(eval_split), mesh)
  model = models.build_model(config, num_classes)
  score = evaluator.Evaluator(model, eval_split, config.image_size, batch, mesh,
                              flip=config.eval_flip)
  result = score(params, keep_logits=True)
  probs = softmax(result["logits"])
  predictions = probs.argmax(axis=-1)
  correct = predictions == eval_split.labels
  report: dict[str, Any] = {
      "workdir": os.path.abspath(workdir), "dataset": config.dataset, "split": split,
      "step": step, "parameters": parameters_used(config, parameters),
      "eval_flip": bool(config.eval_flip),
      "num_examples": result["eval/num_examples"],
      "top1": float(result["eval/top1"]), "top5": float(result["eval/top5"]),
      "loss": float(result["eval/loss"]),
      "ece": expected_calibration_error(probs, eval_split.labels),
      "per_class_top1": _by_name(eval_split.class_names,
                                 accuracy_by_group(eval_split.labels, correct, num_classes)),
  }
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  stem = os.path.join(out_dir, f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', split)}_step{step}"
                      + ("_trained" if parameters == "trained" and config.ema_decay else ""))
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
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if os.path.isfile(metrics_path):
    files.append(plots.training_curves(metrics.read_jsonl(metrics_path),
                                       os.path.join(out_dir, "training_curves.png")))
  with open(f"{stem}.json", "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  return dict(report, files=[f"{stem}.json"] + files)


@dataclasses.dataclass
class FilePrediction:
  """The top classes for one image file, or why it could not be classified."""
  path: str
  top: list[tuple[str, float]]  # (class name, probability), most probable first
  error: str | None = None


class ImageTooLarge(ValueError):
  """More pixels than PIL's Image.MAX_IMAGE_PIXELS: possibly a decompression bomb."""


def load_image(path: str, image_size: int) -> np.ndarray:
  """uint8 (image_size, image_size, 3): RGB, resized (not cropped) with PIL.

  Raises FileNotFoundError or IsADirectoryError for a bad path, ImageTooLarge for an image
  of more than Image.MAX_IMAGE_PIXELS pixels (PIL only warns below twice that; refused here
  before decoding anything), else OSError or ValueError for a file PIL cannot decode.
  """
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      with Image.open(path) as image:
        rgb = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
  # Neither is an OSError: DecompressionBombError is an Exception, the warning a RuntimeWarning.
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise ImageTooLarge(f"too large to decode ({e})") from e
  # What PIL's decoders raise besides OSError for a corrupt file.
  except (SyntaxError, EOFError, IndexError, struct.error) as e:
    raise ValueError(f"{type(e).__name__}: {e}") from e
  return np.asarray(rgb, np.uint8)


def predict_files(workdir: str, paths: Sequence[str], checkpoint: str | int = "latest",
                  data_dir: str | None = None, top_k: int = 5
                  ) -> tuple[int, list[FilePrediction]]:
  """(step, one FilePrediction per path); unreadable files get `error`, the rest are classified.

  A missing, undecodable or oversized file (see load_image) is that file's error only.
  """
  step, config, params = restore_params(workdir, checkpoint)
  num_classes = num_classes_of(params)
  names = load_class_names(workdir, config, num_classes, data_dir)
  results, images = [], []
  for path in paths:
    try:
      images.append(load_image(path, config.image_size))
      results.append(FilePrediction(path, []))
    except FileNotFoundError:
      results.append(FilePrediction(path, [], "no such file"))
    except IsADirectoryError:
      results.append(FilePrediction(path, [], "is a directory, not an image"))
    except ImageTooLarge as e:
      results.append(FilePrediction(path, [], str(e)))
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
      results.append(FilePrediction(path, [], f"not a readable image ({e})"))
  if images:
    model = models.build_model(config, num_classes)
    logits = evaluator.predict_logits(model, params,
                                      data.to_float(np.stack(images), config.image_size),
                                      flip=config.eval_flip)
    probs = softmax(jax.device_get(logits))
    ok = [r for r in results if r.error is None]
    for result, row in zip(ok, probs):
      best = np.argsort(-row, kind="stable")[:top_k]
      result.top = [(names[i], float(row[i])) for i in best]
  return step, results
