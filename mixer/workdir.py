"""A run's workdir: the one place that knows its layout.

  WORKDIR/
    config.json            the resolved config (+ `budget`, a budget_minutes decision)
    config_history.jsonl   one entry per start or config change, device-count changes
    run.json               status for sweeps and scripts (RunResult)
    metrics.jsonl          one JSON object per log/eval step (writers)
    class_names.json       label names, for predict.py and export.py
    lock.json              the live train.py that owns the workdir (workdir_lock)
    checkpoints/<step>/    Orbax TrainState (checkpoints)
    checkpoints_checksums/<step>.json   size and SHA-256 of each file of a step (checkpoints)
    corrupt_checkpoints/   damaged steps, moved aside when resuming (checkpoints)
    eval/                  evaluate.py's reports and pictures (evaluation)

Every other module names these files through this module. `load_config` is the one reader
of a saved config: config.json over today's defaults.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections

from mixer import config_lib, errors

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
CLASS_NAMES_FILE = "class_names.json"
LOCK_FILE = "lock.json"
CHECKPOINT_DIR = "checkpoints"
CHECKSUMS_DIR = "checkpoints_checksums"
QUARANTINE_DIR = "corrupt_checkpoints"
EVAL_DIR = "eval"


def path(workdir: str, name: str) -> str:
  """WORKDIR/name."""
  return os.path.join(workdir, name)


def contents(directory: str) -> str:
  """What `directory` holds, for error messages: '<dir> holds: a, b' (or is empty, or absent)."""
  if not os.path.isdir(directory):
    return f"{directory} does not exist"
  names = sorted(os.listdir(directory))
  return f"{directory} holds: {', '.join(names)}" if names else f"{directory} is empty"


def write_json_atomically(file: str, content: Any, **dump_args: Any) -> None:
  """Writes `content` to file.tmp, then renames it: readers never see half a file."""
  with open(file + ".tmp", "w", encoding="utf-8") as f:
    json.dump(content, f, **{"indent": 1, **dump_args})
  os.replace(file + ".tmp", file)


# --- run.json

@dataclasses.dataclass
class RunResult:
  """WORKDIR/run.json: what a call of `train_lib.train_and_evaluate` did (or is doing).

  status: 'finished' (trained to total_steps in that call), 'already_finished' (nothing to
  do), 'stopped' (SIGTERM: saved, resumable), 'running' (only in run.json, while training),
  'failed' (only in run.json: `error` says why). `metrics` is the call's last evaluation.
  """
  status: str
  step: int
  total_steps: int
  num_params: int
  metrics: dict[str, float] = dataclasses.field(default_factory=dict)
  error: str | None = None

  def save(self, workdir: str) -> None:
    """WORKDIR/run.json, atomically (one process should write it: train_lib's process 0)."""
    write_json_atomically(path(workdir, RUN_FILE), dataclasses.asdict(self))


def read_run(workdir: str) -> RunResult | None:
  """WORKDIR/run.json; None before training started, or when missing or unreadable."""
  try:
    with open(path(workdir, RUN_FILE), encoding="utf-8") as f:
      return RunResult(**json.load(f))
  except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError,
          TypeError):  # TypeError: not an object, or another layout
    return None


# --- config.json

def read_config(workdir: str) -> dict[str, Any]:
  """WORKDIR/config.json exactly as saved (a JSON object; with `budget` when recorded).

  MissingFileError when there is none; WorkdirError naming the file (and where a copy is)
  when it is not a JSON object.
  """
  file = path(workdir, CONFIG_FILE)
  if not os.path.isfile(file):
    raise errors.MissingFileError(f"No {CONFIG_FILE} in {workdir} ({contents(workdir)}); "
                                  "--workdir must be a training run's directory.")
  try:
    with open(file, encoding="utf-8") as f:
      saved = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    problem = f"is not valid JSON ({e})"
  else:
    if isinstance(saved, dict):
      return saved
    problem = f"holds a {type(saved).__name__}, not a JSON object"
  history = path(workdir, HISTORY_FILE)
  hint = (f" (the last entry of {history} with a \"config\" key holds it)"
          if os.path.isfile(history) else "")
  raise errors.WorkdirError(f"{file} {problem}: it records the config the run in {workdir} was "
                            f"trained with. Restore it from a copy{hint}.")


def write_config(workdir: str, content: dict[str, Any]) -> None:
  """WORKDIR/config.json, atomically."""
  write_json_atomically(path(workdir, CONFIG_FILE), content, indent=2, sort_keys=True)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's resolved config: WORKDIR/config.json over today's defaults.

  The defaults fill keys that older runs did not save (added to the code since), so a
  new key compares and runs at its default. Errors as `read_config`.
  """
  def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
      both_dicts = isinstance(value, dict) and isinstance(base.get(key), dict)
      out[key] = merge(base[key], value) if both_dicts else value
    return out

  return ml_collections.ConfigDict(merge(config_lib.base_config().to_dict(),
                                         read_config(workdir)))
