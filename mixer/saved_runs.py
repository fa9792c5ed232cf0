"""A training run's workdir, read back: its config, a checked checkpoint, its class names.

A run's workdir describes itself: `config.json` rebuilds the model, `checkpoints/<step>/`
holds the TrainState (checked against the checksums written at save) and `class_names.json`
the label names. evaluate.py, predict.py and export.py start here.
"""
from __future__ import annotations

import collections
import json
import logging
import os
from typing import Any

import flax
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from mixer import checkpoints, config_guard, config_lib, data, models, parallel, pretrained

CLASS_NAMES_FILE = "class_names.json"
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
  saved = _read_config_json(path, workdir)

  def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
      both_dicts = isinstance(value, dict) and isinstance(base.get(key), dict)
      out[key] = merge(base[key], value) if both_dicts else value
    return out

  return ml_collections.ConfigDict(merge(config_lib.base_config().to_dict(), saved))


def _read_config_json(path: str, workdir: str) -> dict[str, Any]:
  """The JSON object in `path`; ValueError naming the file and what to do when it is not one."""
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    problem = f"is not valid JSON ({e})"
  else:
    if isinstance(saved, dict):
      return saved
    problem = f"holds a {type(saved).__name__}, not a JSON object"
  history = os.path.join(workdir, config_guard.HISTORY_FILE)
  hint = (f" (the last entry of {history} with a \"config\" key holds it)"
          if os.path.isfile(history) else "")
  raise ValueError(f"{path} {problem}: it records the config the run in {workdir} was "
                   f"trained with. Restore it from a copy{hint}.")


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
