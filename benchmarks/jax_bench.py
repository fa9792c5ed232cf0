"""The real jitted train and eval steps (`mixer.train_step`, `mixer.evaluator`) on random uint8 data."""
from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from mixer import data, evaluator, models, optim, parallel, train_step

import flops
import timing

SCHEDULE_EPOCHS = 100  # only shapes the learning-rate schedule; never reached


def xla_memory(compiled: Any) -> dict[str, int] | None:
  """Argument, output and temporary buffer bytes of a compiled computation, per XLA."""
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    return None
  if analysis is None:
    return None
  return {k: int(getattr(analysis, f"{k}_size_in_bytes"))
          for k in ("argument", "output", "alias", "temp")}


class JaxBench:
  """Builds the state and data, compiles the train step ahead of time, times single steps.

  The step is jitted exactly as `train_lib.train_and_evaluate` does (donated state,
  replicated outputs); the ahead-of-time compile fills the same cache that calls use.
  """

  def __init__(self, config: Any, num_classes: int, num_examples: int,
               counter: timing.CompileCounter, seed: int = 0,
               arrays: tuple[np.ndarray, np.ndarray] | None = None):
    """`config`: a training config (ml_collections); `arrays`: (uint8 images, int32 labels) of
    `num_examples` rows, else random ones."""
    self.config, self.counter = config, counter
    self.mesh = parallel.make_mesh()
    self.batch_size = config.batch_size
    self.model = models.build_model(config, num_classes)
    per_epoch = data.steps_per_epoch(num_examples, config.batch_size)
    schedule = optim.learning_rate_schedule(config, SCHEDULE_EPOCHS * per_epoch, per_epoch)
    self.tx = tx = optim.make_optimizer(config, schedule)

    def create_state():
      params = models.init_params(self.model, config.image_size, config.seed)
      return train_step.new_state(params, tx, config.ema_decay)

    replicated = parallel.replicated(self.mesh)
    self.state = jax.block_until_ready(
        timing.keep_alive(jax.jit(create_state, out_shardings=replicated))())
    self.num_params = sum(int(x.size) for x in jax.tree.leaves(self.state.params))
    rng = np.random.default_rng(seed)
    shape = (num_examples, config.image_size, config.image_size, 3)
    images, labels = arrays or (rng.integers(0, 256, shape, np.uint8),
                              rng.integers(0, num_classes, (num_examples,), np.int32))
    self.images = parallel.put_replicated(images, self.mesh)
    self.labels = parallel.put_replicated(labels, self.mesh)
    self.step_fn = timing.keep_alive(jax.jit(
        train_step.make_train_step(self.model, tx, config, num_classes, self.mesh),
        donate_argnums=0, out_shardings=replicated))
    # Timed steps stay in epoch 0 (the loop recomputes the order once per epoch).
    self.orders = timing.keep_alive(
        data.EpochOrders(config.seed, num_examples, self.batch_size, replicated))
    self.order = jax.block_until_ready(self.orders(0, self.state.step))

    start = time.perf_counter()
    lowered = self.step_fn.lower(self.state, self.images, self.labels, self.order)
    self.lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    self.compile_s = time.perf_counter() - start
    self.compiled = compiled
    self.xla_flops_per_step = flops.xla_flops(compiled)
    self.xla_memory = xla_memory(compiled)
    self.compiles_in_first_call: int | None = None
    self.compiles_after_first_call = 0
    self.last_metrics = None

  def train_step(self) -> float:
    """Seconds for one step, waited for (params and metrics); counts compilations in it."""
    compiles = self.counter.count
    start = time.perf_counter()
    self.state, self.last_metrics = self.step_fn(self.state, self.images, self.labels,
                                                 self.order)
    jax.block_until_ready((self.state, self.last_metrics))
    seconds = time.perf_counter() - start
    compiles = self.counter.count - compiles
    if self.compiles_in_first_call is None:
      self.compiles_in_first_call = compiles
    else:
      self.compiles_after_first_call += compiles
    return seconds

  def loss(self) -> float:
    return float(jax.device_get(self.last_metrics)[0])


class EvalBench:
  """`evaluator.Evaluator` on random uint8 images; times its jitted step batch by batch."""

  def __init__(self, bench: JaxBench, num_classes: int, num_batches: int = 4, seed: int = 1):
    config, batch = bench.config, bench.batch_size
    rng = np.random.default_rng(seed)
    n = num_batches * batch
    split = data.Split(
        images=rng.integers(0, 256, (n, config.image_size, config.image_size, 3), np.uint8),
        labels=rng.integers(0, num_classes, (n,), np.int32),
        class_names=[str(i) for i in range(num_classes)])
    self.bench = bench
    self.evaluator = timing.keep_alive(
        evaluator.Evaluator(bench.model, split, config.image_size, batch, bench.mesh))
    start = time.perf_counter()
    self.evaluator.step.lower(bench.state.params, *self.evaluator.arrays, np.int32(0)).compile()
    self.compile_s = time.perf_counter() - start
    self.calls = 0

  def eval_step(self) -> float:
    index = np.int32(self.calls % self.evaluator.num_batches)
    self.calls += 1
    start = time.perf_counter()
    jax.block_until_ready(self.evaluator.step(self.bench.state.params, *self.evaluator.arrays,
                                              index))
    return time.perf_counter() - start

  def full_pass(self) -> dict[str, Any]:
    """One `Evaluator.__call__` over the whole (random) split: checks the real path runs."""
    return self.evaluator(self.bench.state.params)
