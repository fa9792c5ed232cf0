"""`train_and_evaluate(config, workdir)`: a run from start (or resume) to its final evaluation.

Data flow: TFDS split -> uint8 host arrays -> replicated on every device (once) -> each
step gathers its slice of the epoch's permutation (`data.EpochOrders`, computed on the
device once per epoch; `data.indices_in_order`) inside the jitted step (`train_step`), which
augments it and updates the parameters. The host only syncs at log, eval and checkpoint
steps; `evaluator.Evaluator` scores the validation and test splits.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mixer import (budget, checkpoints, config_guard, config_lib, data, errors, init_from,
                   metrics, models, optim, parallel, probe, workdir_lock, writers)
from mixer import workdir as layout
from mixer.evaluator import Evaluator, describe_views
from mixer.progress import Progress, eval_line
from mixer.stop_signal import StopSignal
from mixer.train_step import make_train_step, new_state


def _record(result: layout.RunResult, workdir: str) -> None:
  """WORKDIR/run.json, written by process 0 only."""
  if jax.process_index() == 0:
    result.save(workdir)


def evaluated_params(config: ml_collections.ConfigDict, state: Any) -> Any:
  """The parameters an evaluation scores: the EMA when the run keeps one, else the optimizer's
  evaluation parameters (schedule_free_adamw's averaged sequence, the trained ones otherwise)."""
  if config.ema_decay:
    return state.ema_params
  return optim.eval_params(config, state.opt_state, state.params)


def _check_and_average(pending: list[jax.Array], first: int, step: int,
                       ckpt: checkpoints.Checkpoints) -> dict[str, float]:
  """Mean train loss/top1/grad norm of steps first..step; stops the run on a non-finite loss."""
  loss, top1, grad_norm = np.mean(jax.device_get(pending), axis=0)
  if not np.isfinite(loss):
    ckpt.wait()
    last = ckpt.latest_step()
    kept = (f"the last good checkpoint (step {last}) is kept" if last is not None
            else "no checkpoint had been saved yet")
    raise errors.DivergedError(
        f"Training loss became non-finite between steps {first} and {step}; stopping: "
        f"{kept}. Try a lower learning_rate or grad_clip_norm.")
  return {"train/loss": float(loss), "train/top1": float(top1), "grad_norm": float(grad_norm)}


FEWSHOT = probe.FEWSHOT_PREFIX  # the splits' key of the split the few-shot probes score


def _save_class_names(split: data.Split, workdir: str) -> None:
  """Label names for evaluation and prediction without the dataset at hand."""
  names = {"label": split.class_names}
  if split.coarse_names:
    names["coarse_label"] = split.coarse_names
  layout.write_json_atomically(layout.path(workdir, layout.CLASS_NAMES_FILE), names)


def _from_process_zero(value: int) -> int:
  """Process 0's `value` on every process (a decision that must not differ between them)."""
  if jax.process_count() == 1:
    return int(value)
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _fewshot_split(config: ml_collections.ConfigDict, splits: dict[str, data.Split]
                   ) -> data.Split:
  """The split the few-shot probes are scored on (loaded unless it is val's or eval's)."""
  name = config.fewshot_split or config.val_split or config.eval_split
  for key, loaded in (("val", config.val_split), ("eval", config.eval_split)):
    if name == loaded:
      return splits[key]
  split = data.load_split(config.dataset, name, config.data_dir)
  data.check_disjoint(splits["train"], split, config.train_split, name)
  return split


def _run_length(config: ml_collections.ConfigDict, workdir: str, num_classes: int,
                per_epoch: int) -> tuple[int, bool]:
  """(total_steps, whether budget_minutes still has to measure them: then a provisional
  length). A budget decides over total_steps, which decides over num_epochs."""
  if config.budget_pflop:
    model = models.build_model(config, num_classes, platform="cpu")
    steps = budget.steps_for_pflop(config.budget_pflop, model, config.image_size,
                                   config.batch_size)
    logging.info("budget_pflop=%g: %d steps (%.1f epochs) at %.3g MFLOP per training image.",
                 config.budget_pflop, steps, steps / per_epoch,
                 budget.train_flops_per_image(model, config.image_size) / 1e6)
    return steps, False
  if config.budget_minutes:
    decided = config_guard.read_budget(workdir) if jax.process_index() == 0 else None
    steps = _from_process_zero(decided["total_steps"] if decided else 0)
    if steps:
      logging.info("budget_minutes: %d steps, decided when the run started (recorded in "
                   "%s); not measured again.", steps, layout.CONFIG_FILE)
      return steps, False
    return max(config.total_steps, config.num_epochs * per_epoch, per_epoch), True
  return (config.total_steps if config.total_steps > 0 else config.num_epochs * per_epoch), False


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_config_change: tuple[str, ...] = ()) -> layout.RunResult:
  """Trains (or resumes) a run in `workdir` to config's end; evaluates it on the way.

  `allow_config_change` names run-defining config keys that may differ from the run's
  recorded config on resume (config_guard); any other difference is refused. Everything
  that can be checked (config, workdir, lock, data) is checked before anything is written.
  """
  config_lib.validate(config)
  if config_lib.budget_set(config):
    key = "budget_pflop" if config.budget_pflop else "budget_minutes"
    logging.info("%s=%g decides this run's length (num_epochs=%s and total_steps=%s are not "
                 "used).", key, config[key], config.num_epochs, config.total_steps)
  mesh = parallel.make_mesh()
  parallel.check_divisible(config.batch_size // config.grad_accum_steps, mesh,
                           "batch_size // config.grad_accum_steps")
  workdir_lock.check_usable(workdir, lock_holder=jax.process_index() == 0)
  changes = config_guard.check(config, workdir, allow_config_change)
  splits = {"train": data.load_split(config.dataset, config.train_split, config.data_dir)}
  if config.val_split:
    splits["val"] = data.load_split(config.dataset, config.val_split, config.data_dir)
    data.check_disjoint(splits["train"], splits["val"], config.train_split, config.val_split)
  splits["eval"] = data.load_split(config.dataset, config.eval_split, config.data_dir)
  if config.fewshot_shots:
    splits[FEWSHOT] = _fewshot_split(config, splits)
  per_epoch = data.steps_per_epoch(len(splits["train"]), config.batch_size)
  total_steps, to_measure = _run_length(config, workdir, splits["train"].num_classes, per_epoch)
  if not to_measure:
    optim.check_warmup(config, total_steps, per_epoch)
  initial_params = init_from.params_for_new_run(config, workdir, splits["train"].num_classes, mesh)
  os.makedirs(workdir, exist_ok=True)  # only once the data loaded: a typo creates nothing
  lock = workdir_lock.WorkdirLock(workdir)
  if jax.process_index() == 0:
    lock.acquire()
  try:
    run = _Run(config, workdir, mesh, splits, total_steps, per_epoch, initial_params)
    if run.start_step >= total_steps:
      logging.info("Run in %s already finished (step %d of %d); nothing to do.", workdir,
                   run.start_step, total_steps)
      run.ckpt.close()
      return dataclasses.replace(run.result(), status="already_finished")
    if jax.process_index() == 0:
      config_guard.record(config, workdir, run.start_step, changes)
      config_guard.warn_on_device_change(workdir, run.start_step, mesh.devices.size)
      _save_class_names(splits["train"], workdir)
      metrics.truncate_jsonl(layout.path(workdir, layout.METRICS_FILE), run.start_step)
    if to_measure and not run.plan_during_warmup():
      run.measure_and_plan()
    try:
      result = run.loop(lock)
    except BaseException as e:
      failed = dataclasses.replace(run.result(), status="failed", error=f"{type(e).__name__}: {e}")
      with contextlib.suppress(Exception):
        _record(failed, workdir)
      raise
    _record(result, workdir)
    return result
  finally:
    lock.release()


class _Run:
  """A run's model, optimizer and state (restored or new), and its training loop."""

  def __init__(self, config, workdir: str, mesh: jax.sharding.Mesh,
               splits: dict[str, data.Split], total_steps: int, per_epoch: int,
               initial_params: Any = None):
    self.config, self.workdir, self.mesh, self.splits = config, workdir, mesh, splits
    self.initial_params = initial_params  # from init_from, when the run starts now
    self.total_steps, self.per_epoch = total_steps, per_epoch
    num_classes = splits["train"].num_classes
    self.model = models.build_model(config, num_classes)
    self.schedule = optim.learning_rate_schedule(config, total_steps, per_epoch)
    self.tx = optim.make_optimizer(config, self.schedule)
    self.ckpt = checkpoints.Checkpoints(workdir, keep=config.keep_checkpoints)
    self.start_step, self.state = self._restore_or_init()
    self.step = self.start_step
    self.num_params = int(sum(x.size for x in jax.tree.leaves(self.state.params)))
    self.last_eval: dict[str, float] = {}
    self.deciding = False  # budget_minutes: timing the first steps, total_steps provisional

  @functools.cached_property
  def device_data(self) -> tuple[jax.Array, jax.Array, data.EpochOrders]:
    """The training images and labels on the devices, and the epochs' example orders."""
    train, mesh = self.splits["train"], self.mesh
    images, labels = (parallel.put_replicated(a, mesh) for a in (train.images, train.labels))
    return images, labels, data.EpochOrders(self.config.seed, len(train), self.config.batch_size,
                                            parallel.replicated(mesh))

  @functools.cached_property
  def evaluators(self) -> dict[str, Any]:
    """Callables params -> {metric: value}: one Evaluator per split, the few-shot probes."""
    config = self.config
    evals: dict[str, Any] = {
        name: Evaluator(self.model, split, config.image_size, config.eval_batch_size,
                        self.mesh, flip=config.eval_flip, shift=config.eval_shift, prefix=name)
        for name, split in self.splits.items() if name not in ("train", FEWSHOT)}
    if config.fewshot_shots:
      evals[FEWSHOT] = probe.FewShotEvaluator(
          self.model, self.splits["train"], self.splits[FEWSHOT], config.fewshot_shots,
          config.image_size, config.eval_batch_size, config.seed)
    return evals

  @property
  def only_at_end(self) -> tuple[str, ...]:
    """Evaluators run only at the last step (config.eval_split_only_at_end: the test split)."""
    return ("eval",) if self.config.eval_split_only_at_end else ()

  def _step_fn(self):
    return jax.jit(make_train_step(self.model, self.tx, self.config,
                                   self.splits["train"].num_classes, self.mesh),
                   donate_argnums=0, out_shardings=parallel.replicated(self.mesh))

  def _train_step(self, step_fn, state, step: int):
    """Training step `step` (1-based) from `state`; everything it needs is on the devices."""
    images, labels, orders = self.device_data
    # A host<->device copy here would be a slowdown on every step, so it is an error.
    with jax.transfer_guard("disallow"):
      return step_fn(state, images, labels, orders(step - 1, state.step))

  def measure_and_plan(self) -> budget.MinutesPlan:
    """budget_minutes: times training steps (on a copy of the state, then discarded) and an
    evaluation, fixes total_steps, records the decision and rebuilds the schedule for it."""
    config, replicated = self.config, parallel.replicated(self.mesh)
    step_fn = self._step_fn()
    state = jax.jit(lambda s: jax.tree.map(jnp.copy, s), out_shardings=replicated)(self.state)
    started = budget.now()
    state, _ = self._train_step(step_fn, state, self.start_step + 1)
    jax.block_until_ready(state)
    first, steps, window_start = budget.now() - started, 0, budget.now()
    while True:  # as the loop runs them: dispatched ahead, synced at each log step
      pending = []
      for _ in range(config.log_every_steps):
        state, step_metrics = self._train_step(step_fn, state, self.start_step + 2 + steps)
        pending.append(step_metrics)
        steps += 1
      jax.device_get(pending)
      jax.block_until_ready(state)
      elapsed = budget.now() - window_start
      if elapsed >= budget.COPY_WINDOW_SECONDS:
        break
    del state, step_fn  # both finished (block_until_ready above)
    return self._adopt_plan(elapsed / steps, first, self.start_step, self.state.params)

  def plan_during_warmup(self) -> bool:
    """Whether budget_minutes can time the run's own first steps: they must lie in the warmup,
    whose learning rates do not depend on the length (then the loop decides, `_adopt_plan`)."""
    warmup = optim.warmup_steps(self.config, self.per_epoch)
    self.deciding = warmup - self.start_step > 2 * self.config.log_every_steps
    if self.deciding:
      self.total_steps = max(self.total_steps, warmup + 1)  # until decided
    return self.deciding

  def _adopt_plan(self, step_s: float, first_step_s: float, done_steps: int,
                  params: Any) -> budget.MinutesPlan:
    """Fixes total_steps from the measured rate (and the evaluation cost, timed on `params`),
    records it, and rebuilds the schedule for it."""
    config = self.config
    costs = {name: e.seconds_per_call(params, budget.now) for name, e in self.evaluators.items()}
    final_eval_s = sum(costs.pop(name) for name in self.only_at_end)
    plan = budget.plan_minutes(config.budget_minutes, budget.now() - budget.process_start(),
                               step_s, sum(costs.values()), max(first_step_s - step_s, 0.0),
                               config.eval_every_steps, done_steps, final_eval_s)
    total = _from_process_zero(plan.total_steps)
    logging.info("%s.", plan.describe(config.batch_size, self.per_epoch))
    optim.check_warmup(config, total, self.per_epoch)
    if jax.process_index() == 0:
      config_guard.record_budget(self.workdir, done_steps,
                                 dataclasses.asdict(dataclasses.replace(plan, total_steps=total)))
    self.total_steps, self.deciding = total, False
    self.schedule = optim.learning_rate_schedule(config, total, self.per_epoch)
    self.tx = optim.make_optimizer(config, self.schedule)
    return plan

  def result(self, status: str = "running") -> layout.RunResult:
    return layout.RunResult(status, int(self.step), self.total_steps, self.num_params,
                     {k: float(v) for k, v in self.last_eval.items()})

  def _restore_or_init(self) -> tuple[int, Any]:
    config, replicated = self.config, parallel.replicated(self.mesh)
    state_from = lambda params: new_state(params, self.tx, config.ema_decay)
    create = lambda: state_from(models.init_params(self.model, config.image_size, config.seed))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                            jax.eval_shape(create))
    restored = self.ckpt.restore_latest_good(abstract, model_params=abstract.params)
    if restored:
      logging.info("Resuming from the checkpoint at step %d.", restored[0])
      return restored
    if config.init_from:
      params = self.initial_params
      if params is None:  # checkpoints were there, but none could be restored
        params = init_from.load_params(config, self.model, self.mesh)
      return 0, jax.jit(state_from, out_shardings=replicated)(params)
    return 0, jax.jit(create, out_shardings=replicated)()

  def loop(self, lock: workdir_lock.WorkdirLock) -> layout.RunResult:
    """Trains from start_step to total_steps (or SIGTERM), logging, evaluating and saving."""
    config, mesh = self.config, self.mesh
    logging.info("Mixer %s: %d parameters; %d steps (%d per epoch), batch %d on %d device(s).",
                 config.model.variant, self.num_params, self.total_steps, self.per_epoch,
                 config.batch_size, mesh.devices.size)
    if config.ema_decay or config.eval_flip or config.eval_shift:
      logging.info("Evaluating %s.", " with ".join(filter(None, [
          "the EMA parameters" if config.ema_decay else "the parameters",
          describe_views(config.eval_flip, config.eval_shift)])))
    evaluators, step_fn = self.evaluators, self._step_fn()
    writer = writers.create_writer(self.workdir)
    progress = Progress(self.total_steps, config.batch_size)
    stop = StopSignal()
    state, ckpt, status = self.state, self.ckpt, "finished"
    _record(self.result(), self.workdir)
    pending, pending_from = [], self.start_step + 1  # device metrics not yet checked
    window_start, window_time = self.start_step, time.time()  # training steps timed since
    step = self.start_step
    try:
      while step < self.total_steps:
        step += 1
        state, step_metrics = self._train_step(step_fn, state, step)
        pending.append(step_metrics)
        self.step = step
        if step == self.start_step + 1:  # Keep compilation out of img/s and the ETA.
          jax.block_until_ready(state)
          first_step_s = time.time() - window_time
          logging.info("First step (with compilation) took %.1fs.", first_step_s)
          window_start, window_time = step, time.time()
          timed_from, timed_since = step, budget.now() if self.deciding else 0.0
        is_last, stopping = step == self.total_steps, stop.agreed(step)
        log_due = step % config.log_every_steps == 0 or is_last
        eval_due = step % config.eval_every_steps == 0 or is_last
        save_due = step % config.checkpoint_every_steps == 0 or is_last or stopping
        if log_due or eval_due or save_due:
          scalars = _check_and_average(pending, pending_from, step, ckpt)
          scalars["lr"] = float(self.schedule(step - 1))
          progress.record(step - window_start, time.time() - window_time)
          if progress.img_per_sec is not None:
            scalars["img_per_sec"] = progress.img_per_sec
          writer.write_scalars(step, scalars)
          if log_due:
            logging.info(progress.line(step, scalars))
            lock.heartbeat()
          pending, pending_from = [], step + 1
        if self.deciding and log_due and step > timed_from and (
            budget.now() - timed_since >= budget.WINDOW_SECONDS or
            step + 2 * config.log_every_steps > optim.warmup_steps(config, self.per_epoch)):
          jax.block_until_ready(state)  # the old step function is freed below
          params = evaluated_params(config, state)
          self._adopt_plan((budget.now() - timed_since) / (step - timed_from), first_step_s,
                           step, params)
          step_fn = self._step_fn()  # with the schedule of the chosen length
          progress.total_steps = self.total_steps
          is_last = step == self.total_steps
          eval_due, save_due = eval_due or is_last, save_due or is_last
        step_eval = None
        if eval_due:
          started, params = time.time(), evaluated_params(config, state)
          step_eval = {k: v for name, e in evaluators.items()
                       if is_last or name not in self.only_at_end for k, v in e(params).items()}
          logging.info(eval_line(step, step_eval, time.time() - started))
          writer.write_scalars(step, step_eval)
          self.last_eval = step_eval
          _record(self.result(), self.workdir)
        if save_due:
          ckpt.save(step, state, metrics=step_eval if "val" in evaluators else None)
        if self.deciding and (eval_due or save_due):
          timed_from, timed_since = step, budget.now()  # time training steps only
        if log_due or eval_due or save_due:
          window_start, window_time = step, time.time()
        if stopping and not is_last:
          logging.warning("Stopped by %s after step %d, checkpoint saved; run the same "
                          "command to resume.", stop.name, step)
          status = "stopped"
          break
    finally:
      if jax.default_backend() == "cpu":
        # Let a step still running (an exception mid-loop) finish before step_fn is freed:
        # with dots on oneDNN (runtime.configure_xla_cpu) XLA aborts the process otherwise.
        with contextlib.suppress(Exception):
          jax.block_until_ready(state)
      writer.close()
      ckpt.close()
      stop.restore()
    return self.result(status)
