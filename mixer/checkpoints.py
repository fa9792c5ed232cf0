"""Orbax checkpoints in `WORKDIR/checkpoints`: async, atomic, latest N plus the best, checksummed.

Steps are saved explicitly by the training loop. `restore` is the one way a step is read back,
for resuming (`restore_latest_good`) and for evaluate/predict/export (`saved_runs`): it checks
the step against its checksums and its parameters' shapes against the model's, and every
failure is an `errors.UserError` naming the step (see "Restoring a step" below).

Integrity. Once a step saved by this process is final (Orbax renames its temporary
directory when the async save finishes; `wait_until_finished` returns after that), its
`checkpoint_manifest` goes to `WORKDIR/checkpoints_checksums/<step>.json` (outside Orbax's
directory, by process 0 only). Manifests are written at the start of the next `save` (Orbax
waits for the previous save there anyway) and in `wait`/`close`; manifests of steps Orbax
has since garbage-collected are dropped then too. Only steps this process wrote get one: a manifest
vouches for bytes known to be as saved, so steps of older runs, or a step whose process
died before its manifest, stay "unverified" and are restored as before.

A step whose files differ from its manifest (`checkpoint_manifest.problems`) is *proven*
damaged: `verify` raises `CorruptCheckpointError`.

A save that fails (a full disk: Orbax's writer thread reports ENOSPC as RESOURCE_EXHAUSTED
text, raised at the next save or at close) leaves no partial `<step>.orbax-checkpoint-tmp`
directory: it is removed, and the MachineError names the step and the last complete one.

Restoring a step (`restore`) raises
  * CorruptCheckpointError when its files differ from its manifest (proven damaged), naming
    the steps that are not;
  * CheckpointError when its parameters do not fit the model (naming the arrays missing,
    extra or of another shape) or it cannot be read for another reason;
  * MachineError when reading failed because of the machine rather than the files
    (MemoryError, an OSError other than a missing file, e.g. ENOSPC, EIO, EACCES, or a
    TensorStore error saying so: RESOURCE_EXHAUSTED, PERMISSION_DENIED, "No space left", ...).

`restore_latest_good` (resuming a run) goes from the newest step down:
  * a proven-damaged step is moved to `WORKDIR/corrupt_checkpoints/` with its manifest,
    and the next older step is tried;
  * a MachineError stops at once; nothing is moved, since the same step will load once the
    cause is fixed;
  * any other restore error (truncated or garbled files of a step without a manifest, a
    structure that no longer fits) sets the step aside only if an older step does load,
    as before: a run's steps share one structure, so the newer step is the damaged one.
    When no step loads, only proven-damaged steps are moved, and the error lists why
    each step failed (e.g. a config that no longer matches the run).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from typing import Any

import jax
from etils import epath
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from mixer import checkpoint_manifest, errors, parallel, param_trees
from mixer import workdir as layout

BEST_METRIC = "val/top1"  # only runs with a validation split have a "best" step
# CheckpointManager stores its single item under this name inside each step's directory.
CHECKPOINT_ITEM = "default"
TMP_MARKER = ".orbax-checkpoint-tmp"  # in the name of a step directory Orbax still writes

class CorruptCheckpointError(errors.CheckpointError):
  """A step's files differ from the checksums written when it was saved."""

  def __init__(self, step: int, directory: str, problems: list[str],
               good_steps: list[int] | None = None):
    self.step, self.directory, self.problems = step, directory, problems
    shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more"
                                       if len(problems) > 3 else "")
    good = f"; good steps: {good_steps}" if good_steps is not None else ""
    super().__init__(f"The checkpoint at step {step} in {directory} is damaged ({shown}){good}")


def _best_metric(metrics: dict[str, float]) -> float:
  return float(metrics[BEST_METRIC])


class Checkpoints:
  """Saves and restores one pytree (the train state) per step."""

  def __init__(self, workdir: str, keep: int = 2, read_only: bool = False):
    self.workdir = os.path.abspath(workdir)
    self.directory = layout.path(self.workdir, layout.CHECKPOINT_DIR)
    self.checksums_dir = layout.path(self.workdir, layout.CHECKSUMS_DIR)
    self.read_only = read_only
    self._unmanifested: set[int] = set()  # steps saved here whose manifest is not written yet
    self._saving: int | None = None  # the step of the latest save started here
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

  def resolve_step(self, checkpoint: str | int) -> int:
    """'latest', 'best' (by val/top1; the latest when no step has it) or a saved step."""
    steps = self.all_steps()
    if not steps:
      raise errors.MissingFileError(f"No checkpoint in {self.directory} "
                                    f"({layout.contents(self.workdir)}).")
    if isinstance(checkpoint, int) or str(checkpoint).isdigit():
      step = int(checkpoint)
      if step not in steps:
        raise errors.CheckpointError(f"No checkpoint at step {step} in {self.directory}; saved "
                                     f"steps: {', '.join(map(str, steps))}.")
      return step
    if checkpoint == "latest":
      return steps[-1]
    if checkpoint == "best":
      best = self.best_step()
      if best is None:
        logging.warning("No checkpoint in %s has val/top1 to pick the best by (runs without a "
                        "val_split have none); using the latest, step %d.", self.directory,
                        steps[-1])
        return steps[-1]
      return best
    raise errors.ConfigError(f"checkpoint must be 'latest', 'best' or a step number, got "
                             f"{checkpoint!r}.")

  def save(self, step: int, state: Any, metrics: dict[str, float] | None = None) -> None:
    """Starts an async save; `metrics` with val/top1 make the step a candidate for best."""
    if metrics is not None and BEST_METRIC not in metrics:
      metrics = None
    self._finish_saved_steps()  # waits for the previous save, as Orbax's save would
    self._saving = step
    try:
      saved = self.manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics,
                                force=True)
    except Exception as e:  # pylint: disable=broad-except  # e.g. a full disk
      self._raise_save_failed(e)
    if saved:
      self._unmanifested.add(step)

  # --- Restoring: the one way back from a saved step.

  def restore(self, step: int, target: Any = None, model_params: Any = None) -> Any:
    """Step `step`'s state, checked: its files against their checksums, its `params` against
    `model_params`; errors as in the module docstring, each naming the step.

    `target`: the abstract state to restore into (shapes, dtypes, shardings; training's
    TrainState). None: the step's own tree (nested dicts) replicated on this process's
    devices, whatever the device count it was saved on (evaluation).
    `model_params`: the abstract parameters the model expects, or a function of the step's
    saved parameter metadata that returns them (evaluation sizes the head from it); None
    skips the shape check.
    """
    try:
      self.verify(step)
    except CorruptCheckpointError as e:
      raise CorruptCheckpointError(step, self.directory, e.problems,
                                   self.good_steps(exclude=step)) from None
    except Exception as e:  # pylint: disable=broad-except
      self._raise_unreadable(step, e)
    saved = None
    if target is None or model_params is not None:
      try:
        item_dir = epath.Path(self.directory) / str(step) / CHECKPOINT_ITEM
        saved = ocp.StandardCheckpointHandler().metadata(item_dir).tree
      except Exception as e:  # pylint: disable=broad-except
        self._raise_unreadable(step, e)
    if model_params is not None:
      saved_params = saved.get("params") if isinstance(saved, dict) else None
      if saved_params is None:
        raise errors.CheckpointError(f"The checkpoint at step {step} in {self.directory} "
                                     "holds no parameters ('params'): it is not a training "
                                     "state saved by train.py.")
      expected = model_params(saved_params) if callable(model_params) else model_params
      param_trees.check_shapes(saved_params, expected,
                               f"The checkpoint at step {step} in {self.directory}")
    if target is None:
      replicated = parallel.replicated(parallel.make_mesh())
      target = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated), saved)
    try:
      return self.manager.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as e:  # pylint: disable=broad-except
      self._raise_unreadable(step, e)

  def _raise_unreadable(self, step: int, error: Exception) -> None:
    """MachineError when the machine is to blame (see environment_error), else
    CheckpointError; both name the step."""
    cause = errors.environment_error(error)
    if cause is not None:
      raise errors.MachineError(
          f"The checkpoint at step {step} in {self.directory} could not be read because of "
          f"the machine, not the checkpoint ({type(cause).__name__}: {str(cause)[:500]}); it "
          "is left where it is. Free memory or disk space, or fix the permissions, and run "
          "again.") from error
    others = [s for s in self.all_steps() if s != step]
    raise errors.CheckpointError(
        f"The checkpoint at step {step} in {self.directory} could not be read "
        f"({type(error).__name__}: {str(error)[:500]}); other saved steps: {others}.") from error

  # --- Checksums.

  def manifest_path(self, step: int) -> str:
    return os.path.join(self.checksums_dir, f"{step}.json")

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _write_manifest(self, step: int) -> None:
    checkpoint_manifest.write(step, self._step_dir(step), self.manifest_path(step))

  def _finish_saved_steps(self) -> None:
    """Waits for async saves; writes manifests of finished steps, drops those of gone steps."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  # e.g. a full disk
      self._raise_save_failed(e)
    if self.read_only or jax.process_index() != 0:
      self._unmanifested.clear()
      return
    steps = set(self.manager.all_steps())
    for step in sorted(self._unmanifested & steps):
      if not os.path.isdir(self._step_dir(step)):  # final once renamed from Orbax's tmp dir
        continue
      try:
        self._write_manifest(step)
      except OSError as e:  # e.g. a full disk: the step stays usable, only unverified
        logging.warning("Could not write the checksum manifest of checkpoint step %d (%s); "
                        "it will be restored unverified.", step, e)
    self._unmanifested.clear()
    if os.path.isdir(self.checksums_dir):
      for name in os.listdir(self.checksums_dir):
        stem = name.split(".json")[0]
        if stem.isdigit() and (int(stem) not in steps or ".json.tmp-" in name):
          with contextlib.suppress(FileNotFoundError):  # garbage-collected by Orbax
            os.remove(os.path.join(self.checksums_dir, name))

  def _raise_save_failed(self, error: Exception) -> None:
    """Removes the partial step directory a failed save left, then raises: for an error of
    the machine (a full disk, which Orbax reports from its writer thread, I/O, permission)
    a MachineError naming the step and the last complete one; any other error as it is.
    Complete steps are untouched (Orbax renames a step into place once fully written)."""
    removed = self._remove_partial_saves()
    self._unmanifested.discard(self._saving)
    if errors.environment_error(error) is None:
      raise error
    complete = sorted(int(n) for n in os.listdir(self.directory)
                      if n.isdigit() and os.path.isdir(os.path.join(self.directory, n))
                      ) if os.path.isdir(self.directory) else []
    kept = (f"the last complete checkpoint (step {complete[-1]}) is kept" if complete
            else "no complete checkpoint was saved")
    cleaned = f"its partial files were removed ({', '.join(removed)}); " if removed else ""
    # A full disk is named by cli_errors with the file; other causes are told here.
    why = ("" if "no space left" in str(error).lower()
           else f" ({type(error).__name__}: {str(error)[:300]})")
    raise errors.MachineError(f"Saving the checkpoint of step {self._saving} in "
                              f"{self.directory} failed; {cleaned}{kept}{why}.") from error

  def _remove_partial_saves(self) -> list[str]:
    """Deletes Orbax's temporary step directories (process 0); returns their names."""
    if self.read_only or jax.process_index() != 0 or not os.path.isdir(self.directory):
      return []
    partial = sorted(n for n in os.listdir(self.directory) if TMP_MARKER in n)
    for name in partial:
      shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
    return partial

  def verify(self, step: int) -> bool:
    """True when `step` matches its manifest; False when it has none (unverified).

    Raises CorruptCheckpointError naming the files that are missing, of another size or of
    other bytes. A manifest that cannot be parsed proves nothing: the step is unverified.
    """
    found = checkpoint_manifest.read(self.manifest_path(step), step)
    if found is None:
      return False
    expected, algorithm = found
    problems = checkpoint_manifest.problems(self._step_dir(step), expected, algorithm)
    if problems:
      raise CorruptCheckpointError(step, self.directory, problems)
    logging.info("Checkpoint step %d matches its checksums (%d files).", step, len(expected))
    return True

  def good_steps(self, exclude: int | None = None) -> list[int]:
    """Saved steps (but `exclude`) not proven damaged: verified or without a manifest."""
    good = []
    for step in self.all_steps():
      if step == exclude:
        continue
      try:
        self.verify(step)
      except (CorruptCheckpointError, OSError):
        continue
      good.append(step)
    return good

  # --- Resuming.

  def restore_latest_good(self, abstract_state: Any, model_params: Any = None
                          ) -> tuple[int, Any] | None:
    """Restores (`restore`) the newest step that loads; None when there is no checkpoint.

    See the module docstring: proven-damaged steps are moved to `corrupt_checkpoints/`
    (never deleted); a MachineError stops at once, moving nothing; other restore errors move
    the newer steps aside only when an older step loads.
    """
    failures = []  # (step, error, proven damaged)
    for step in reversed(self.all_steps()):
      try:
        state = self.restore(step, abstract_state, model_params)
      except CorruptCheckpointError as e:
        logging.warning("%s.", e)
        failures.append((step, e, True))
        continue
      except errors.MachineError:
        raise
      except errors.CheckpointError as e:
        logging.warning("%s", e)
        failures.append((step, e, False))
        continue
      for bad_step, error, proven in failures:
        why = "is damaged (checksums differ)" if proven else "is unreadable"
        logging.warning("Checkpoint step %d %s but step %d loads: moving step %d to %s and "
                        "resuming from step %d.", bad_step, why, step, bad_step,
                        self.quarantine_dir, step)
        self._quarantine(bad_step)
      return step, state
    if failures:
      moved = [s for s, _, proven in failures if proven]
      for bad_step in moved:
        self._quarantine(bad_step)
      details = "; ".join(
          f"step {s}: damaged ({'; '.join(e.problems[:3])}), moved to {self.quarantine_dir}"
          if proven else
          f"step {s}: {str(e).replace(f'The checkpoint at step {s} in {self.directory} ', '')}"
          for s, e, proven in failures)
      if len(moved) == len(failures):
        raise errors.CheckpointError(
            f"Every checkpoint in {self.directory} was damaged ({details}). Nothing is left "
            "to resume from: run again to start from step 0, or use a new --workdir.")
      raise errors.CheckpointError(
          f"No checkpoint in {self.directory} could be restored for this config ({details}). "
          "If the model, optimizer or dataset changed, use a new --workdir.")
    return None

  @property
  def quarantine_dir(self) -> str:
    return layout.path(self.workdir, layout.QUARANTINE_DIR)

  def _quarantine(self, step: int) -> None:
    """Moves a damaged step (and its manifest) aside, not deleted, so it can be saved again."""
    self.manager.wait_until_finished()
    if jax.process_index() == 0:
      os.makedirs(self.quarantine_dir, exist_ok=True)
      target = os.path.join(self.quarantine_dir, f"{step}.{int(time.time())}")
      shutil.move(self._step_dir(step), target)
      if os.path.exists(self.manifest_path(step)):
        shutil.move(self.manifest_path(step), f"{target}.checksums.json")
    multihost_utils.sync_global_devices(f"mixer_quarantine_{step}")
    self.manager.reload()

  def wait(self) -> None:
    self._finish_saved_steps()

  def close(self) -> None:
    self._finish_saved_steps()
    self.manager.close()
