"""Compute budgets: a run's length from `budget_pflop` (training FLOPs) or `budget_minutes`.

FLOP convention: a multiply-add is 2 FLOPs; only matmuls count (stem, the four Dense layers of
each block, head); a training step is 3x the forward matmul FLOPs (forward, gradient w.r.t.
activations, gradient w.r.t. weights). benchmarks/ use the same functions.

`budget_pflop` is deterministic: every machine runs `steps_for_pflop` steps. `budget_minutes`
is decided once per run by `plan_minutes` from the step rate and evaluation cost measured after
compilation, recorded in the workdir (config_guard.record_budget) and reused on resume.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from mixer import errors

# Seconds of training timed to measure the step rate, and what the plan keeps in reserve for
# what it does not time: checkpoint saves, the end of the process, the rate's drift. The
# window is the run's own first steps when they fall in the warmup (whose learning rates do
# not depend on the run's length), else steps on a copy of the state, discarded; either way
# the run is the one given the chosen total_steps. (A 30-s window on a copy, right after
# compiling, was 6% off the loop's rate in both directions on the 2-core VM, 2026-12-05.)
WINDOW_SECONDS = 90.0
COPY_WINDOW_SECONDS = 30.0  # on a copy: every second of it is lost to training
MARGIN_FRACTION = 0.02
MARGIN_SECONDS = 10.0


def forward_flops(model: Any, image_size: int) -> dict[str, float]:
  """Forward matmul FLOPs per image of an MlpMixer (or anything with its fields), by part."""
  p, c = model.patch_size, model.hidden_dim
  tokens = (image_size // p) ** 2
  parts = {
      "stem": 2.0 * tokens * (p * p * 3) * c,
      # Dense(tokens -> tokens_mlp_dim) and back, applied to each of the c channels.
      "token_mixing": model.num_blocks * 2 * (2.0 * c * tokens * model.tokens_mlp_dim),
      # Dense(c -> channels_mlp_dim) and back, applied to each token.
      "channel_mixing": model.num_blocks * 2 * (2.0 * tokens * c * model.channels_mlp_dim),
      "head": 2.0 * c * model.num_classes,
  }
  parts["total"] = sum(parts.values())
  return parts


def train_flops_per_image(model: Any, image_size: int) -> float:
  return 3.0 * forward_flops(model, image_size)["total"]


def training_pflop(model: Any, image_size: int, batch_size: int, steps: int) -> float:
  """Training compute of `steps` steps of `batch_size` images, in PFLOP (1e15 FLOPs)."""
  return train_flops_per_image(model, image_size) * batch_size * steps / 1e15


def steps_for_pflop(budget_pflop: float, model: Any, image_size: int, batch_size: int) -> int:
  """The most whole steps whose training compute fits in `budget_pflop`."""
  per_step = training_pflop(model, image_size, batch_size, 1)
  steps = int(budget_pflop // per_step)
  if steps < 1:
    raise errors.ConfigError(f"config.budget_pflop={budget_pflop} is less than one training "
                             f"step ({per_step:.3g} PFLOP at batch_size={batch_size}).")
  return steps


def now() -> float:
  """The clock budgets are measured with (tests replace it)."""
  return time.time()


def process_start() -> float:
  """When this process started, on now()'s clock: the budget counts start-up and data loading.

  Linux's /proc gives the start of the process (kept across the allocator re-exec); elsewhere
  the import of this module stands in for it.
  """
  try:
    with open("/proc/self/stat", encoding="ascii") as f:
      start_ticks = float(f.read().rpartition(")")[2].split()[19])
    with open("/proc/uptime", encoding="ascii") as f:
      uptime = float(f.read().split()[0])
    return now() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
  except (OSError, ValueError, IndexError):
    return _IMPORTED


_IMPORTED = time.time()


def count_events(steps: int, every: int) -> int:
  """How many times an action due every `every` steps and at the last step runs in `steps`."""
  return -(-steps // every)


@dataclasses.dataclass
class MinutesPlan:
  """A budget_minutes decision, as recorded in config.json's `budget` entry."""
  budget_minutes: float
  elapsed_s: float  # since the process started, when the rate had been measured
  step_s: float  # seconds per training step
  eval_s: float  # seconds per evaluation (all splits)
  compile_s: float  # the train step's compilation, paid again for the chosen schedule
  reserve_s: float
  total_steps: int
  decided_at_step: int = 0  # steps trained (within the warmup) when the rate was measured
  final_eval_s: float = 0.0  # paid once, at the last step (eval_split_only_at_end's test)

  def describe(self, batch_size: int, per_epoch: int) -> str:
    return (f"budget_minutes={self.budget_minutes:g}: measured {self.step_s * 1e3:.1f} ms/step "
            f"({batch_size / self.step_s:.0f} img/s), {self.eval_s:.1f} s per evaluation"
            f"{f' (+{self.final_eval_s:.1f} s at the end)' if self.final_eval_s else ''}, "
            f"{self.elapsed_s:.0f} s spent so far -> {self.total_steps} steps "
            f"({self.total_steps / per_epoch:.1f} epochs)")


def plan_minutes(budget_minutes: float, elapsed_s: float, step_s: float, eval_s: float,
                 compile_s: float, eval_every: int, done_steps: int = 0,
                 final_eval_s: float = 0.0) -> MinutesPlan:
  """The most steps that end the run (evaluations included) within `budget_minutes`, when
  `done_steps` are trained and `elapsed_s` spent; `final_eval_s` is paid once, at the end."""
  reserve = MARGIN_SECONDS + MARGIN_FRACTION * budget_minutes * 60
  left = budget_minutes * 60 - elapsed_s - compile_s - reserve - final_eval_s
  evals_done = done_steps // eval_every
  cost = lambda n: n * step_s + (count_events(done_steps + n, eval_every) - evals_done) * eval_s
  lo, hi = 0, max(int(left / step_s), 0)
  while lo < hi:  # the largest n with cost(n) <= left (cost grows with n)
    mid = (lo + hi + 1) // 2
    lo, hi = (mid, hi) if cost(mid) <= left else (lo, mid - 1)
  if lo < 1:
    raise errors.ConfigError(
        f"config.budget_minutes={budget_minutes:g} leaves no time to train: {elapsed_s:.0f} s "
        f"were spent before training, a step takes {step_s:.2f} s and an evaluation "
        f"{eval_s:.0f} s. Raise the budget.")
  return MinutesPlan(budget_minutes, elapsed_s, step_s, eval_s, compile_s, reserve,
                     done_steps + lo, done_steps, final_eval_s)
