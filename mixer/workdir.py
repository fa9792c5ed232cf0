"""A run's workdir: the one place that knows its layout.

  WORKDIR/
    config.json            the resolved config (+ `budget`, a budget_minutes decision)
    config_history.jsonl   one entry per start or config change, device-count changes
    run.json               status for sweeps and scripts (train_lib.RunResult)
    metrics.jsonl          one JSON object per log/eval step (writers)
    class_names.json       label names, for predict.py and export.py
    checkpoints/<step>/    Orbax TrainState + checksums (checkpoints)
    .lock                  the live process that owns the workdir (workdir_lock)

Every other module names these files through this module.
"""
from __future__ import annotations

import json
import os
from typing import Any

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
CLASS_NAMES_FILE = "class_names.json"
CHECKPOINT_DIR = "checkpoints"


def path(workdir: str, name: str) -> str:
  """WORKDIR/name."""
  return os.path.join(workdir, name)


def write_json_atomically(file: str, content: Any) -> None:
  """Writes `content` to file.tmp, then renames it: readers never see half a file."""
  with open(file + ".tmp", "w", encoding="utf-8") as f:
    json.dump(content, f, indent=1)
  os.replace(file + ".tmp", file)


def read_run(workdir: str) -> dict[str, Any]:
  """WORKDIR/run.json as written by train.py; {} before training started or when unreadable."""
  try:
    with open(path(workdir, RUN_FILE), encoding="utf-8") as f:
      content = json.load(f)
  except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
    return {}
  return content if isinstance(content, dict) else {}


def write_run(workdir: str, content: dict[str, Any]) -> None:
  """WORKDIR/run.json, atomically."""
  write_json_atomically(path(workdir, RUN_FILE), content)
