"""A workdir keeps the config that produced it: resuming with a different one is refused.

`WORKDIR/config.json` is the run's current config; `WORKDIR/config_history.jsonl` holds
every version it has had (the first line is the config the run started with), so an accepted
change never erases the record of what produced the earlier steps. A `budget_minutes` run also
records there, once, the length it chose from its measured speed (`budget` in config.json).

Keys that only say how a run is operated (OPERATIONAL_KEYS: where the data is, how often to
log, evaluate and save, the eval batch size) may change on any resume. Any other difference
is refused, naming the keys, unless the user names them on purpose
(`train.py --allow_config_change=total_steps,num_epochs`). Keys added to the code after the
run started compare at their defaults: a new feature that is off by default leaves old runs
resumable.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
from typing import Any, Iterable

import ml_collections

from mixer import errors
from mixer import workdir as layout

# config.json's entry for a budget_minutes decision (not a config key: it is measured).
BUDGET_KEY = "budget"
OPERATIONAL_KEYS = frozenset({"data_dir", "log_every_steps", "eval_every_steps",
                              "checkpoint_every_steps", "keep_checkpoints", "eval_batch_size",
                              "fewshot_shots", "fewshot_split", "eval_split_only_at_end"})


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'model': {'variant': 'S/4'}} -> {'model.variant': 'S/4'}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def as_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (saved value, current value)} for every key of `current` whose value differs.

  `saved` is the run's config as `workdir.load_config` reads it (over today's defaults: a key
  added to the code since compares at its default); a key the code no longer has is ignored.
  """
  old, new = flatten(saved), flatten(current)
  return {key: (old.get(key), value) for key, value in new.items() if old.get(key) != value}


def _format(changes: dict[str, tuple[Any, Any]]) -> str:
  return ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changes.items()))


def check(config: ml_collections.ConfigDict, workdir: str,
          allowed: Iterable[str] = ()) -> dict[str, tuple[Any, Any]]:
  """Raises ConfigError when `workdir` holds a run whose run-defining config differs
  (WorkdirError when its config.json is unreadable).

  Returns the accepted changes (operational or `allowed` keys); {} for a new workdir.
  """
  if not os.path.exists(layout.path(workdir, layout.CONFIG_FILE)):
    return {}
  changes = differences(as_json(layout.load_config(workdir)), as_json(config))
  allowed = set(allowed)
  refused = {k: v for k, v in changes.items() if k not in OPERATIONAL_KEYS and k not in allowed}
  if refused:
    names = ",".join(sorted(refused))
    raise errors.ConfigError(
        f"{workdir} holds a run with a different config ({_format(refused)}). Use a new "
        f"--workdir, or resume with --allow_config_change={names} to change it on purpose "
        f"(recorded in {layout.HISTORY_FILE}).")
  if changes:
    logging.info("Config changes accepted on resume: %s.", _format(changes))
  return changes


def record(config: ml_collections.ConfigDict, workdir: str, step: int,
           changes: dict[str, tuple[Any, Any]]) -> None:
  """Writes config.json and appends to the history when the run starts or its config changed."""
  history = layout.path(workdir, layout.HISTORY_FILE)
  current = as_json(config)
  if os.path.exists(history) and not changes:
    return
  entry = {"time": datetime.datetime.now().isoformat(timespec="seconds"), "step": step,
           "changes": {k: {"from": a, "to": b} for k, (a, b) in sorted(changes.items())},
           "config": current}
  if not os.path.exists(history):
    if os.path.exists(layout.path(workdir, layout.CONFIG_FILE)) and changes:
      # A run from before the history existed: its config.json is the first entry.
      first = {"time": None, "step": None, "changes": {}, "config": layout.read_config(workdir)}
      with open(history, "a", encoding="utf-8") as f:
        f.write(json.dumps(first, sort_keys=True) + "\n")
  with open(history, "a", encoding="utf-8") as f:
    f.write(json.dumps(entry, sort_keys=True) + "\n")
  budget = read_budget(workdir)
  layout.write_config(workdir, {**current, BUDGET_KEY: budget} if budget else current)


def read_budget(workdir: str) -> dict[str, Any] | None:
  """The budget_minutes decision recorded in WORKDIR/config.json; None for a new run."""
  if not os.path.exists(layout.path(workdir, layout.CONFIG_FILE)):
    return None
  return layout.read_config(workdir).get(BUDGET_KEY)


def record_budget(workdir: str, step: int, decision: dict[str, Any]) -> None:
  """Adds a budget decision (measured rates, chosen total_steps) to config.json and history."""
  layout.write_config(workdir, {**layout.read_config(workdir), BUDGET_KEY: decision})
  entry = {"time": datetime.datetime.now().isoformat(timespec="seconds"), "step": step,
           BUDGET_KEY: decision}
  with open(layout.path(workdir, layout.HISTORY_FILE), "a", encoding="utf-8") as f:
    f.write(json.dumps(entry, sort_keys=True) + "\n")


DEVICES_KEY = "devices"  # config_history.jsonl entries recording the run's device count


def record_device_count(workdir: str, step: int, count: int) -> int | None:
  """Appends the device count to the history when it is new or changed; returns the count
  recorded before when it differs (a resumed run is then not bit-exact), else None.

  The sharding of each step's batch, hence the order of float reductions, follows the device
  count: a run resumed on another count continues, but not as an uninterrupted one would.
  """
  history = layout.path(workdir, layout.HISTORY_FILE)
  previous = None
  try:
    with open(history, encoding="utf-8") as f:
      for line in f:
        try:
          entry = json.loads(line)
        except json.JSONDecodeError:
          continue
        if isinstance(entry, dict) and DEVICES_KEY in entry:
          previous = entry[DEVICES_KEY]
  except FileNotFoundError:
    pass
  if previous == count:
    return None
  entry = {"time": datetime.datetime.now().isoformat(timespec="seconds"), "step": step,
           DEVICES_KEY: count}
  changed = previous is not None and step > 0
  if changed:
    entry["not_bit_exact"] = (f"resumed at step {step} on {count} device(s), saved on "
                              f"{previous}: not bit-exact with an uninterrupted run")
  with open(history, "a", encoding="utf-8") as f:
    f.write(json.dumps(entry, sort_keys=True) + "\n")
  return previous if changed else None


def warn_on_device_change(workdir: str, step: int, devices: int) -> None:
  """Records the device count; a resume on another count is warned of (and recorded)."""
  before = record_device_count(workdir, step, devices)
  if before is not None:
    logging.warning("Resuming at step %d on %d device(s), the checkpoint was written on %d: "
                    "the resumed run will not be bit-exact with an uninterrupted one (recorded "
                    "in %s).", step, devices, before, layout.HISTORY_FILE)
