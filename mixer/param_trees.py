"""Parameter trees compared with the model's: which keys are missing, extra or of another shape.

`diff` compares flat ('/'-joined) trees; `check_shapes` raises one CheckpointError naming
every difference, grouped by module, for a run's checkpoint against the model its config builds
(`checkpoints.Checkpoints.restore`). `pretrained.load_pretrained` uses `diff` for published
checkpoints, whose head may differ.
"""
from __future__ import annotations

import collections
from typing import Any, Mapping

import flax
import numpy as np

from mixer import errors
from mixer import workdir as layout


def diff(got: Mapping[str, Any], want: Mapping[str, Any],
         ignore: frozenset[str] = frozenset()) -> tuple[list[str], list[str], list[str]]:
  """Flat parameter trees compared: keys of `want` missing from `got`, keys of `got` not in
  `want`, and shared keys whose shapes differ (each sorted; `ignore`d keys skipped)."""
  missing = sorted(k for k in want if k not in got and k not in ignore)
  extra = sorted(k for k in got if k not in want and k not in ignore)
  misshaped = sorted(k for k in want.keys() & got.keys() if k not in ignore
                     and tuple(np.shape(got[k])) != tuple(want[k].shape))
  return missing, extra, misshaped


def _by_module(keys: set[str]) -> str:
  counts = collections.Counter(key.split("/")[0] for key in keys)
  return ", ".join(f"{module} ({n} array{'s' if n > 1 else ''})"
                   for module, n in sorted(counts.items()))


def check_shapes(params: Any, expected: Any, where: str) -> None:
  """Raises CheckpointError naming the parameters missing, extra or of another shape.

  `params` and `expected`: nested dicts of anything with a `.shape` (arrays, metadata).
  """
  got = flax.traverse_util.flatten_dict(params, sep="/")
  want = flax.traverse_util.flatten_dict(expected, sep="/")
  missing, extra, misshaped = diff(got, want)
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
    raise errors.CheckpointError(
        f"{where} does not match the model built from the run's config. "
        f"{'. '.join(problems)}. Was {layout.CONFIG_FILE} edited, the model changed on "
        "resume, or the checkpoint copied from another run?")
