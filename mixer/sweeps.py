"""Sweep definitions: trial expansion, `--sweep` parsing, trial names, validation, commands.

A sweep is a list of trials; a trial is a dict of config overrides keyed by dotted config
paths ({'learning_rate': 3e-3, 'model.variant': 'B/4'}). Config files may declare one next
to get_config:

  def get_sweep(arg=None):
    return sweeps.product(learning_rate=[1e-3, 3e-3], weight_decay=[0.01, 0.05])

Each trial runs as `python train.py --config=FILE --workdir=DIR/<trial name> --config.k=v ...`
(mixer/sweep_runner.py), so every trial is validated here by parsing exactly those flags the
way train.py will, before any trial starts.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import os
import re
import shlex
import sys
from typing import Any, Mapping, Sequence

from absl import flags
import ml_collections
from ml_collections import config_flags

from mixer import config_lib, errors, workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SCRIPT = os.path.join(ROOT, "train.py")
SWEEP_FILE = "sweep.json"
SEED_KEY = "seed"
MAX_NAME_CHARS = 160  # well under the usual 255-byte file-name limit
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._+=-]")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


@dataclasses.dataclass
class Trial:
  name: str  # its directory under the sweep's workdir
  overrides: dict[str, Any]


@dataclasses.dataclass
class Sweep:
  config: str  # absolute 'path/to/config.py[:arg]'
  trials: list[Trial]
  base_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # every trial
  train_script: str = TRAIN_SCRIPT


# ---------------------------------------------------------------------------------------
# Building trial lists.

def _merge_axes(axes: Sequence[Mapping[str, Sequence[Any]]],
                more_axes: Mapping[str, Sequence[Any]]) -> dict[str, list[Any]]:
  merged: dict[str, list[Any]] = {}
  for mapping in (*axes, more_axes):
    for key, values in mapping.items():
      if key in merged:
        raise errors.SweepError(f"Sweep axis {key!r} is given twice.")
      if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise errors.SweepError(f"Sweep axis {key!r} needs a list of values, got {values!r}.")
      if not values:
        raise errors.SweepError(f"Sweep axis {key!r} has no values.")
      merged[key] = list(values)
  return merged


def product(*axes: Mapping[str, Sequence[Any]], **more_axes: Sequence[Any]) -> list[dict]:
  """Every combination: product(learning_rate=[1, 2], seed=[0, 1]) gives 4 trials.

  Dotted keys go in a dict: product({'model.variant': ['S/4', 'B/4']}, seed=[0, 1]).
  The last axis varies fastest.
  """
  merged = _merge_axes(axes, more_axes)
  return [dict(zip(merged, values)) for values in itertools.product(*merged.values())]


def zipped(*axes: Mapping[str, Sequence[Any]], **more_axes: Sequence[Any]) -> list[dict]:
  """Values taken together: zipped(learning_rate=[1, 2], warmup_epochs=[5, 10]) gives 2 trials."""
  merged = _merge_axes(axes, more_axes)
  lengths = {key: len(values) for key, values in merged.items()}
  if len(set(lengths.values())) > 1:
    raise errors.SweepError(f"zipped() needs axes of equal length, got {lengths}.")
  return [dict(zip(merged, values)) for values in zip(*merged.values())]


def cross(*sweeps: Sequence[Mapping[str, Any]]) -> list[dict]:
  """Every combination of trials of several sweeps, e.g. cross(zipped(...), product(...))."""
  trials = []
  for parts in itertools.product(*sweeps):
    trial: dict[str, Any] = {}
    for part in parts:
      if shared := trial.keys() & part.keys():
        raise errors.SweepError(f"cross(): key(s) {sorted(shared)} appear in more than one sweep.")
      trial.update(part)
    trials.append(trial)
  return trials


def _split_top_level(text: str, separator: str | None) -> list[str]:
  """Splits on `separator` (None: whitespace) outside brackets and quotes."""
  parts, current, depth, quote = [], [], 0, None
  for char in text:
    if quote:
      quote = None if char == quote else quote
    elif char in "'\"":
      quote = char
    elif char in "([{":
      depth += 1
    elif char in ")]}":
      depth -= 1
      if depth < 0:
        raise errors.SweepError(f"Unbalanced {char!r} in {text!r}.")
    elif depth == 0 and (char.isspace() if separator is None else char == separator):
      parts.append("".join(current))
      current = []
      continue
    current.append(char)
  if depth or quote:
    raise errors.SweepError(f"Unclosed bracket or quote in {text!r}.")
  parts.append("".join(current))
  return [p.strip() for p in parts if separator is not None or p.strip()]


def parse_value(text: str) -> Any:
  """A Python literal when `text` is one (1e-3, 4, True, None, 'quoted'), else the string."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError, MemoryError, RecursionError):
    return text


def parse_sweep_flag(text: str) -> list[dict]:
  """'learning_rate=[1e-3,3e-3] model.variant=[S/4,B/4]' -> the product: 4 trials.

  Axes are separated by spaces; a value without brackets is a single value.
  """
  axes: dict[str, list[Any]] = {}
  for axis in _split_top_level(text, None):
    key, equals, values = (part.strip() for part in axis.partition("="))
    if not equals or not _KEY.fullmatch(key):
      raise errors.SweepError(f"--sweep: expected key=[v1,v2,...], got {axis!r}.")
    if key in axes:
      raise errors.SweepError(f"--sweep: {key!r} is given twice.")
    if not (values.startswith("[") and values.endswith("]")):
      axes[key] = [parse_value(values)]
      continue
    items = _split_top_level(values[1:-1], ",")
    if items == [""]:
      raise errors.SweepError(f"--sweep: {key!r} has no values.")
    if "" in items:
      raise errors.SweepError(f"--sweep: empty value in {axis!r}.")
    axes[key] = [parse_value(item) for item in items]
  if not axes:
    raise errors.SweepError("--sweep is empty.")
  return product(axes)


# ---------------------------------------------------------------------------------------
# Names and commands.

def flag_value(value: Any) -> str:
  """How `value` is written after `--config.key=`; floats keep their shortest exact form."""
  return repr(value) if isinstance(value, float) else str(value)


def trial_name(overrides: Mapping[str, Any]) -> str:
  """'learning_rate=0.003,model.variant=B-4,seed=1': keys sorted, `seed` last (replicates of a
  trial share the name before it), unsafe characters replaced.

  Depends only on the overrides, so the same trial gets the same directory in every run.
  """
  if not overrides:
    return "base"
  keys = sorted(overrides, key=lambda k: (k == SEED_KEY, k))
  parts = [f"{key}={flag_value(overrides[key])}".replace("/", "-") for key in keys]
  name = ",".join(_UNSAFE_NAME_CHARS.sub("_", part) for part in parts)
  if len(name) > MAX_NAME_CHARS:
    digest = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()
    name = f"{name[:MAX_NAME_CHARS - 9]}-{digest[:8]}"
  return name


def group_name(overrides: Mapping[str, Any]) -> str:
  """The name of a trial without its seed: what its replicates share (summaries group by it)."""
  return trial_name({k: v for k, v in overrides.items() if k != SEED_KEY})


def _override_flags(overrides: Mapping[str, Any]) -> list[str]:
  return [f"--config.{key}={flag_value(value)}" for key, value in overrides.items()]


def trial_command(sweep: Sweep, trial: Trial, workdir: str) -> list[str]:
  """The train.py command line of one trial; trial overrides win over the base ones."""
  return [sys.executable, sweep.train_script, f"--config={sweep.config}",
          f"--workdir={os.path.join(os.path.abspath(workdir), trial.name)}",
          *_override_flags({**sweep.base_overrides, **trial.overrides})]


def shell_commands(sweep: Sweep, workdir: str) -> list[str]:
  """One shell command per trial, e.g. for a SLURM array or a Kubernetes job."""
  return [shlex.join(trial_command(sweep, trial, workdir)) for trial in sweep.trials]


# ---------------------------------------------------------------------------------------
# Loading and validating.

def config_sweep(config: str) -> list[dict] | None:
  """The config file's get_sweep(arg), or None when it declares none."""
  path, _, arg = config.partition(":")
  spec = importlib.util.spec_from_file_location("_sweep_config", path)
  if spec is None or spec.loader is None:
    raise errors.ConfigError(f"Cannot load config file {path!r}.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  get_sweep = getattr(module, "get_sweep", None)
  return None if get_sweep is None else list(get_sweep(arg or None))


def _config_like_train(config: str, override_flags: list[str]):
  """The config train.py builds from these flags (same parser, same locked config)."""
  argv = ["train.py", f"--config={config}", *override_flags]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Config.", flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def _node(config, key: str) -> tuple[Any, str]:
  """(the group holding dotted `key`, or None where there is none; the key's last part)."""
  *parents, leaf = key.split(".")
  for part in parents:
    config = config.get(part) if hasattr(config, "get") else None
  return config, leaf


def validate_overrides(config: str, overrides: Mapping[str, Any], where: str
                       ) -> ml_collections.ConfigDict:
  """The config train.py builds with these overrides; ConfigError (naming `where`, the key
  and the value) unless train.py accepts them."""
  base = _config_like_train(config, [])
  for key in overrides:
    group, leaf = _node(base, key)
    if not hasattr(group, "keys") or leaf not in group.keys():
      raise errors.ConfigError(f"{where}: unknown config key {key!r}.")
    if hasattr(group[leaf], "keys"):
      raise errors.ConfigError(f"{where}: {key!r} is a group of keys; set its fields instead.")
  try:
    parsed = _config_like_train(config, _override_flags(overrides))
  except (flags.Error, ValueError, TypeError, AttributeError, KeyError) as e:
    raise errors.ConfigError(f"{where}: {e}") from None
  for key, value in overrides.items():
    group, leaf = _node(parsed, key)
    arrived = group[leaf]
    # Values travel as text: a None or a str field given an int would arrive changed.
    if arrived != value or type(arrived) is str and not isinstance(value, str):
      raise errors.ConfigError(
          f"{where}: config.{key}={value!r} would reach train.py as {arrived!r} (it gets "
          f"--config.{key}={flag_value(value)}); give a "
          f"{_node(base, key)[0].get_type(leaf).__name__} value.")
  try:
    config_lib.validate(parsed)
  except ValueError as e:
    raise errors.ConfigError(f"{where}: {e}") from None
  return parsed


def make_sweep(config: str, trials: Sequence[Mapping[str, Any]] | None = None,
               base_overrides: Mapping[str, Any] | None = None,
               train_script: str = TRAIN_SCRIPT, seeds: int | None = None) -> Sweep:
  """Validates every trial of `trials` (None: the config's get_sweep) before anything runs.

  `trials` replaces the config file's get_sweep entirely (the command line wins). `seeds`
  runs each trial with seed=0..seeds-1 (replicates for intervals).
  """
  if seeds is not None and seeds < 1:
    raise errors.SweepError(f"--seeds={seeds}: need at least 1 replicate per trial.")
  path, colon, arg = config.partition(":")
  config = os.path.abspath(path) + colon + arg
  base_overrides = dict(base_overrides or {})
  validate_overrides(config, base_overrides, "base overrides")
  if trials is None and (trials := config_sweep(config)) is None:
    raise errors.SweepError(f"{config} has no get_sweep(); pass --sweep='key=[v1,v2] ...'.")
  if not trials:
    raise errors.SweepError("The sweep has no trials.")
  if seeds is not None:
    if SEED_KEY in base_overrides:
      raise errors.SweepError("--config.seed and --seeds together: --seeds gives every trial "
                              "seeds 0..N-1; drop one or the other.")
    for i, overrides in enumerate(trials):
      if SEED_KEY in overrides:
        raise errors.SweepError(f"trial {i} ({trial_name(overrides)}) sets seed itself; --seeds "
                                "gives every trial seeds 0..N-1: drop one or the other.")
    trials = [{**overrides, SEED_KEY: seed} for overrides in trials for seed in range(seeds)]
  named: dict[str, Trial] = {}
  trains: dict[str, str] = {}  # each resolved config (as JSON) -> the trial that trains it
  for i, overrides in enumerate(trials):
    trial = Trial(trial_name(overrides), dict(overrides))
    where = f"trial {i} ({trial.name})"
    if trial.name in named:
      raise errors.SweepError(f"{where} has the same directory name as "
                              f"{named[trial.name].overrides}; make the trials distinct.")
    resolved = validate_overrides(config, {**base_overrides, **trial.overrides}, where)
    as_json = resolved.to_json(sort_keys=True)
    if as_json in trains:
      raise errors.SweepError(f"{where} trains the same config as {trains[as_json]} (a value "
                              "equal to the config's own?); make the trials distinct.")
    trains[as_json] = where
    named[trial.name] = trial
  return Sweep(config, list(named.values()), base_overrides, os.path.abspath(train_script))


# ---------------------------------------------------------------------------------------
# DIR/sweep.json: the definition, for resuming and for --summarize.

def save_sweep(sweep: Sweep, workdir: str) -> Sweep:
  """Writes DIR/sweep.json, adding to the trials already there; returns all of them.

  A different config file or base overrides in the same DIR is an error: one directory,
  one experiment.
  """
  os.makedirs(workdir, exist_ok=True)
  trials = list(sweep.trials)
  if os.path.exists(os.path.join(workdir, SWEEP_FILE)):
    old = load_sweep(workdir)
    for field in ("config", "base_overrides"):
      if getattr(old, field) != getattr(sweep, field):
        raise errors.SweepError(f"{workdir} holds a sweep with {field} {getattr(old, field)!r}, "
                                f"not {getattr(sweep, field)!r}; use another --workdir.")
    old_names = {t.name for t in old.trials}
    trials = old.trials + [t for t in trials if t.name not in old_names]
  merged = dataclasses.replace(sweep, trials=trials)
  workdir_lib.write_json_atomically(os.path.join(workdir, SWEEP_FILE), dataclasses.asdict(merged))
  return merged


def load_sweep(workdir: str) -> Sweep:
  """DIR/sweep.json; MissingFileError where DIR holds no sweep."""
  path = os.path.join(workdir, SWEEP_FILE)
  if not os.path.exists(path):
    raise errors.MissingFileError(f"No {SWEEP_FILE} in {workdir}: is it a sweep's --workdir?")
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
    return Sweep(raw["config"], [Trial(**t) for t in raw["trials"]], raw["base_overrides"],
                 raw["train_script"])
  except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
    raise errors.SweepError(f"{path} is damaged ({type(e).__name__}: {e}); it holds the "
                            "sweep's definition: restore it, or use another --workdir.") from e
