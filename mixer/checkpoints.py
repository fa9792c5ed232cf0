"""Orbax checkpoints under `WORKDIR/checkpoints`: async, atomic, latest N plus the best.

Steps are saved explicitly by the training loop. A latest checkpoint that fails to
restore (corrupt, truncated) is skipped with a warning in favour of the one before it.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

BEST_METRIC = "eval/top1"


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
    """Starts an async save; `metrics` with eval/top1 make the step a candidate for best."""
    if metrics is not None and BEST_METRIC not in metrics:
      metrics = None
    self.manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)

  def restore(self, step: int, abstract_state: Any) -> Any:
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def restore_latest_good(self, abstract_state: Any,
                          on_skip: Callable[[int, Exception], None] | None = None
                          ) -> tuple[int, Any] | None:
    """Restores the newest step that loads; None when there is no usable checkpoint."""
    for step in reversed(self.all_steps()):
      try:
        return step, self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Checkpoint at step %d could not be restored (%s: %s); trying the "
                        "previous one.", step, type(e).__name__, e)
        if on_skip:
          on_skip(step, e)
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
