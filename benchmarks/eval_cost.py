"""What evaluation with test-time views costs at the CPU-hour shape, before and after stacking.

  python benchmarks/eval_cost.py                       # 1,000 and 10,000 images, 10 and 1 views
  python benchmarks/eval_cost.py --images 1000 --repeats 5

Times a whole `evaluator.Evaluator` call (every batch of a split, metrics summed) on random
uint8 images and random parameters of configs/cifar100_cpu_hour.py's model (Mixer-Ti/4,
channel MLP 256, 32px, 100 classes) at its eval_batch_size, two ways: "per-view", one model
call per view as mixer/evaluator.py did before (copied below as the peer), and "stacked",
today's evaluator (all views of a chunk of examples in one model call). The two run
interleaved, median over --repeats. Then, from the config's own eval_every_steps and
splits, the evaluations' share of the hour (budget_minutes) for --total_steps, as it is and
for the changes that would cut it. A script, not a test: numbers depend on the machine's load.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, ROOT)  # for `mixer`

from mixer import runtime  # pylint: disable=wrong-import-position

CONFIG = os.path.join(ROOT, "configs", "cifar100_cpu_hour.py")
# The 56-minute run in the config's docstring chose 8,901 steps; its val split (train[98%:])
# has 1,000 images and the test split 10,000, both evaluated at every evaluation.
MEASURED_STEPS = 8901
SPLIT_SIZES = {"val": 1000, "eval": 10000}


def per_view_logits(model: Any, params: Any, images: Any, flip: bool, shift: int) -> Any:
  """predict_logits before the views were stacked: one model call per view."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mixer import evaluator  # pylint: disable=g-import-not-at-top
  views = [evaluator.shifted(images, dy, dx) for dy, dx in evaluator.test_time_views(shift)]
  if flip:
    views += [v[:, :, ::-1, :] for v in views]
  logits = [model.apply({"params": params}, v, train=False).astype(jnp.float32) for v in views]
  return sum(logits[1:], logits[0]) / len(logits)


def per_view_eval_step(model: Any, image_size: int, batch_size: int, mesh: Any, flip: bool,
                       shift: int) -> Callable:
  """make_eval_step before the views were stacked (with_logits=False)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mixer import data, metrics, parallel  # pylint: disable=g-import-not-at-top

  def eval_step(params, all_images, all_labels, all_mask, index):
    shard = lambda x: jax.lax.with_sharding_constraint(x, parallel.batch_sharded(mesh))
    images, labels, mask = map(shard, data.eval_batch(all_images, all_labels, all_mask, index,
                                                      batch_size))
    logits = per_view_logits(model, params, data.to_float(images, image_size), flip, shift)
    loss = metrics.cross_entropy(logits, jax.nn.one_hot(labels, logits.shape[-1]))
    top5 = metrics.topk_correct(logits, labels, min(5, logits.shape[-1]))
    return jnp.stack([jnp.sum(loss * mask),
                      jnp.sum(metrics.topk_correct(logits, labels, 1) * mask),
                      jnp.sum(top5 * mask), jnp.sum(mask)])
  return eval_step


def load_config() -> Any:
  spec = importlib.util.spec_from_file_location("cpu_hour_config", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--images", default="1000,10000", help="split sizes, comma-separated")
  parser.add_argument("--views", default="10,1",
                      help="10: the config's views (eval_flip, eval_shift); 1: one view")
  parser.add_argument("--repeats", type=int, default=3, help="interleaved timed calls per case")
  parser.add_argument("--batch_size", type=int, default=None,
                      help="eval batch (default: the config's eval_batch_size)")
  parser.add_argument("--total_steps", type=int, default=MEASURED_STEPS,
                      help="steps of the hour, for the estimate (default: the measured run's)")
  args = parser.parse_args()
  runtime.prepare_process()

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mixer import budget, data, evaluator, models, parallel  # pylint: disable=g-import-not-at-top

  config = load_config()
  batch = args.batch_size or config.eval_batch_size
  mesh = parallel.make_mesh()
  model = models.build_model(config, 100)
  params = models.init_params(model, config.image_size, 0)
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
  params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(next(keys), p.shape), params)
  rng = np.random.default_rng(0)
  view_args = {10: (bool(config.eval_flip), int(config.eval_shift)), 1: (False, 0)}
  sizes = [int(n) for n in args.images.split(",")]
  views = [int(v) for v in args.views.split(",")]
  padded_batch = -(-batch // mesh.devices.size) * mesh.devices.size

  cases, compile_s = {}, {}
  for n in sizes:
    split = data.Split(rng.integers(0, 256, (n, config.image_size, config.image_size, 3),
                                    dtype=np.uint8),
                       rng.integers(0, 100, n).astype(np.int32), [str(i) for i in range(100)])
    for v in views:
      flip, shift = view_args[v]
      assert evaluator.num_views(flip, shift) == v, (flip, shift)
      stacked = evaluator.Evaluator(model, split, config.image_size, batch, mesh, flip, shift)
      old = evaluator.Evaluator(model, split, config.image_size, batch, mesh, flip, shift)
      old.step = jax.jit(per_view_eval_step(model, config.image_size, padded_batch, mesh, flip,
                                            shift),
                         out_shardings=parallel.replicated(mesh))
      for way, score in (("per-view", old), ("stacked", stacked)):
        start = time.perf_counter()  # the first batch: compiling, then one batch
        jax.block_until_ready(score.step(params, *score.arrays, np.int32(0)))
        compile_s[(way, v)] = time.perf_counter() - start
        cases[(n, v, way)] = score
  # Same numbers both ways (the first case), so the timing compares equal work.
  first = next(iter(cases))[:2]
  a, b = (cases[first + (w,)](params) for w in ("per-view", "stacked"))
  assert abs(a["eval/loss"] - b["eval/loss"]) < 1e-4 * abs(a["eval/loss"]), (a, b)

  seconds = {key: [] for key in cases}
  for r in range(args.repeats):
    for n in sizes:
      for v in views:
        ways = ("per-view", "stacked") if r % 2 == 0 else ("stacked", "per-view")
        for way in ways:
          start = time.perf_counter()
          jax.block_until_ready(cases[(n, v, way)](params)["eval/loss"])
          seconds[(n, v, way)].append(time.perf_counter() - start)
  median = {key: float(np.median(s)) for key, s in seconds.items()}

  rows = cases[next(iter(cases))].rows_per_apply
  print(f"{runtime.describe_devices()}; {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f}\nMixer {config.model.variant} channel MLP "
        f"{config.model.channels_mlp_dim}, {config.image_size}px, 100 classes, float32, eval "
        f"batch {batch}, stacked in model calls of <= {rows or 'all'} rows per device; median "
        f"of {args.repeats} interleaved calls\n")
  print("| images | views | per-view s/call | stacked s/call | speed-up | stacked img-views/s |")
  print("|---|---|---|---|---|---|")
  for n in sizes:
    for v in views:
      old, new = median[(n, v, "per-view")], median[(n, v, "stacked")]
      print(f"| {n:,} | {v} | {old:.2f} | {new:.2f} | {old / new:.2f}x | {n * v / new:,.0f} |")
  print("\nCompilation + first batch (s): " + ", ".join(
      f"{way} {v} views {s:.1f}" for (way, v), s in compile_s.items()))

  # The hour: cost per image-view from the largest split timed, for each way.
  if 10 not in views or 1 not in views:
    return
  n = max(sizes)
  per = {(way, v): median[(n, v, way)] / n for way in ("per-view", "stacked") for v in views}
  hour = config.budget_minutes * 60
  evals = budget.count_events(args.total_steps, config.eval_every_steps)
  val, test = SPLIT_SIZES["val"], SPLIT_SIZES["eval"]

  def cost(way: str, during: list[tuple[int, int]], final: list[tuple[int, int]],
           count: int) -> float:
    """(count - 1) evaluations of `during` [(images, views)], then the last of `final`, plus
    the evaluators' compilation and budget_minutes' timing of one batch each."""
    run = lambda splits: sum(per[(way, v)] * images for images, v in splits)
    setup = sum(compile_s[(way, v)] + per[(way, v)] * padded_batch for _, v in final)
    return (count - 1) * run(during) + run(final) + setup

  full = [(val, 10), (test, 10)]
  scenarios = [
      (f"as configured: {evals} evaluations (eval_every_steps={config.eval_every_steps}) of "
       "val + test, 10 views", full, full, evals),
      ("eval_every_steps=4584: 2 evaluations", full, full,
       budget.count_events(args.total_steps, 4584)),
      ("eval_every_steps >= total steps: the final evaluation only", full, full, 1),
      (f"{evals} evaluations, test only at the last (eval_split_only_at_end=True)",
       [(val, 10)], full, evals),
      (f"{evals} evaluations, 1 view before the last (not implemented)",
       [(val, 1), (test, 1)], full, evals),
      (f"{evals} evaluations, val with 1 view before the last, test only at the last "
       "(not implemented)", [(val, 1)], full, evals),
  ]
  print(f"\nEvaluations in the hour ({config.budget_minutes:g} min, {args.total_steps} steps; "
        f"val {val:,} + test {test:,} images; costs from the {n:,}-image calls above, plus "
        "compilation and budget_minutes' one-batch timing):\n")
  print("| schedule | per-view s | % of hour | stacked s | % of hour |\n|---|---|---|---|---|")
  for name, during, final, count in scenarios:
    old, new = cost("per-view", during, final, count), cost("stacked", during, final, count)
    print(f"| {name} | {old:.0f} | {100 * old / hour:.1f}% | {new:.0f} | "
          f"{100 * new / hour:.1f}% |")


if __name__ == "__main__":
  main()
