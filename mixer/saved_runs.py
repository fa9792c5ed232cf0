"""A training run's workdir, read back: its config, a checked checkpoint, its class names.

A run's workdir describes itself (`workdir`): its config.json rebuilds the model, its
checkpoints hold the TrainState (restored and checked by `checkpoints.Checkpoints.restore`,
the same path training resumes by) and class_names.json the label names. evaluate.py,
predict.py and export.py start here.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import ml_collections

from mixer import checkpoints, data, errors, models, optim
from mixer import workdir as layout

def num_classes_of(params: Any) -> int:
  """Width of the classification head (0 when the parameters have none)."""
  return int(params["head"]["bias"].shape[-1]) if "head" in params else 0


def restore_params(workdir: str, checkpoint: str | int = "latest", parameters: str = "auto"
                   ) -> tuple[int, ml_collections.ConfigDict, Any]:
  """(step, config, params) of a run; params replicated over this process's mesh.

  `checkpoint`: 'latest', 'best' or a step (`Checkpoints.resolve_step`). `parameters`:
  'auto' (the run's EMA parameters when it kept them, config.ema_decay > 0, else the trained
  ones; `parameters_used(config)` says which), 'ema' or 'trained'. Works whatever the device
  count at training time: the arrays are restored with the checkpoint's own shapes,
  replicated on today's devices, after checking them against the model of the run's config.
  """
  config = layout.load_config(workdir)
  use = parameters_used(config, parameters)

  def model_params(saved_params: Any) -> Any:
    model = models.build_model(config, num_classes_of(saved_params))
    return jax.eval_shape(lambda: models.init_params(model, config.image_size, config.seed))

  ckpt = checkpoints.Checkpoints(workdir, read_only=True)
  try:
    step = ckpt.resolve_step(checkpoint)
    state = ckpt.restore(step, model_params=model_params)
  finally:
    ckpt.close()
  key = "ema_params" if use == "ema" else "params"
  if state.get(key) is None:
    raise errors.CheckpointError(f"The checkpoint at step {step} in {workdir} holds no {key}, "
                                 f"though the run's config.ema_decay is {config.ema_decay}; "
                                 "use parameters 'trained'.")
  if key == "params":
    return step, config, optim.eval_params(config, state["opt_state"], state[key])
  return step, config, state[key]


PARAMETERS = ("auto", "ema", "trained")


def parameters_used(config: ml_collections.ConfigDict, parameters: str = "auto") -> str:
  """Which parameters restore_params returns for `parameters`: 'ema' or 'trained'."""
  if parameters not in PARAMETERS:
    raise errors.ConfigError(f"parameters must be one of {PARAMETERS}, got {parameters!r}.")
  if parameters == "ema" and not config.ema_decay:
    raise errors.ConfigError("This run kept no EMA parameters (its config.ema_decay is 0); "
                             "use parameters 'trained' or 'auto'.")
  if parameters == "auto":
    return "ema" if config.ema_decay else "trained"
  return parameters


def describe_parameters(config: ml_collections.ConfigDict, parameters: str = "auto") -> str:
  """What restore_params returns, in words: 'EMA parameters', 'schedule-free evaluation
  parameters' (schedule_free_adamw's averaged sequence) or 'trained parameters'."""
  if parameters_used(config, parameters) == "ema":
    return "EMA parameters"
  if config.optimizer == optim.SCHEDULE_FREE:
    return "schedule-free evaluation parameters"
  return "trained parameters"


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
  path = layout.path(workdir, layout.CLASS_NAMES_FILE)
  if os.path.isfile(path):
    names, source = _read_class_names(path), path
  else:
    source = f"the TFDS metadata of {config.dataset!r}"
    try:
      names = _tfds_label_names(config.dataset, data_dir or config.data_dir)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("No %s, and no label names in %s (%s: %s); naming classes class_<i>.",
                      path, source, type(e).__name__, str(e)[:300])
      return [f"class_{i}" for i in range(num_classes)]
  if len(names) != num_classes:
    error = errors.WorkdirError if source == path else errors.DataError
    raise error(f"{source} lists {len(names)} class names but the checkpoint's head has "
                f"{num_classes} outputs.")
  return names


def _read_class_names(path: str) -> list[str]:
  """The "label" list of a class_names.json; WorkdirError naming the file when it has none."""
  try:
    with open(path, encoding="utf-8") as f:
      names = json.load(f)["label"]
  except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
    names, problem = None, f"{type(e).__name__}: {e}"
  else:
    problem = "its \"label\" entry is not a list of names"
  if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
    raise errors.WorkdirError(f"{path} is unreadable ({problem}); delete it to name the classes "
                              "from the dataset's metadata instead.")
  return names
