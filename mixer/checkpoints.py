"""Orbax checkpoints under `WORKDIR/checkpoints`: async, atomic, latest N plus the best.

Steps are saved explicitly by the training loop. A latest checkpoint that fails to
restore (corrupt, truncated) is skipped with a warning in favour of the one before it.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

BEST_METRIC = "val/top1"  # only runs with a validation split have a "best" step


def _best_metric(metrics: dict[str, float]) -> float:
  return float(metrics[BEST_METRIC])


class Checkpoints:
  """Saves and restores one pytree (the train state) per step."""

  def __init__(self, workdir: str, keep: int = 2, read_only: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    policy = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep),
        policies.BestN(get_metric_fn=_best_metric, n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=None if read_only else policy, best_fn=_best_metric,
        best_mode="max", enable_async_checkpointing=not read_only, create=not read_only,
        read_only=read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def save(self, step: int, state: Any, metrics: dict[str, float] | None = None) -> None:
    """Starts an async save; `metrics` with val/top1 make the step a candidate for best."""
    if metrics is not None and BEST_METRIC not in metrics:
      metrics = None
    self.manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)

  def restore(self, step: int, abstract_state: Any = None) -> Any:
    """Restores `step`; without `abstract_state`, as saved (nested dicts, default device)."""
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def restore_latest_good(self, abstract_state: Any) -> tuple[int, Any] | None:
    """Restores the newest step that loads; None when there is no checkpoint at all.

    Newer steps that fail while an older one loads with the same structure are corrupt:
    they are moved to `corrupt_checkpoints/` (never deleted). When no step loads, nothing
    is moved and the error lists why each failed (e.g. a config that no longer matches).
    """
    failures = []
    for step in reversed(self.all_steps()):
      try:
        state = self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Checkpoint at step %d could not be restored (%s: %s).", step,
                        type(e).__name__, str(e)[:500])
        failures.append((step, e))
        continue
      for bad_step, _ in failures:
        logging.warning("Step %d is unreadable but step %d loads: moving step %d to %s and "
                        "resuming from step %d.", bad_step, step, bad_step, self.quarantine_dir,
                        step)
        self._quarantine(bad_step)
      return step, state
    if failures:
      details = "; ".join(f"step {s}: {type(e).__name__}: {str(e)[:300]}" for s, e in failures)
      raise RuntimeError(
          f"No checkpoint in {self.directory} could be restored for this config ({details}). "
          "If the model, optimizer or dataset changed, use a new --workdir.")
    return None

  @property
  def quarantine_dir(self) -> str:
    return os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")

  def _quarantine(self, step: int) -> None:
    """Moves an unreadable step aside (not deleted), so that it can be saved again."""
    self.manager.wait_until_finished()
    if jax.process_index() == 0:
      os.makedirs(self.quarantine_dir, exist_ok=True)
      target = os.path.join(self.quarantine_dir, f"{step}.{int(time.time())}")
      shutil.move(os.path.join(self.directory, str(step)), target)
    multihost_utils.sync_global_devices(f"mixer_quarantine_{step}")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
