"""Where a train step's time goes: parts timed alone, page faults, and per-HLO-op time.

  python benchmarks/profile_step.py                      # Mixer-S/4 32x32, batch 128
  python benchmarks/profile_step.py --config ti4 --batch_size 256 --trace_steps 3

Times the real step of `train_step.make_train_step`, then jitted pieces of it on the same
shapes (input pipeline = gather + crop/flip + mixup; forward; forward + backward; optimizer
update), counts minor page faults per step, and sums a `jax.profiler` trace per HLO op,
grouped by what the op computes and by the model part it comes from.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(1, os.path.dirname(HERE))

from mixer import runtime  # pylint: disable=wrong-import-position

import specs  # pylint: disable=wrong-import-position


def _median_seconds(fn: Callable[[], Any], reps: int) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn())  # compile and warm up
  seconds = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    seconds.append(time.perf_counter() - start)
  return float(np.median(seconds))


def time_parts(bench: Any, num_classes: int, reps: int) -> dict[str, float]:
  """Median seconds of the step's pieces, each jitted alone on the step's shapes."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from mixer import train_step  # pylint: disable=g-import-not-at-top
  config, model, tx = bench.config, bench.model, bench.tx

  inputs = train_step.make_batch_fn(config, num_classes)
  loss_fn = train_step.make_loss_fn(model)

  def update(grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, step = bench.state.params, bench.state.step
  input_fn = jax.jit(inputs)
  batch = input_fn(step, bench.images, bench.labels, bench.order)
  forward = jax.jit(loss_fn)
  forward_backward = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  _, grads = forward_backward(params, *batch)
  update_fn = jax.jit(update)
  return {
      "input pipeline": _median_seconds(
          lambda: input_fn(step, bench.images, bench.labels, bench.order), reps),
      "forward (train mode) + loss": _median_seconds(lambda: forward(params, *batch), reps),
      "forward + backward": _median_seconds(lambda: forward_backward(params, *batch), reps),
      "optimizer update": _median_seconds(
          lambda: update_fn(grads, bench.state.opt_state, params), reps),
  }


def page_faults(bench: Any, steps: int) -> dict[str, float]:
  """Minor/major page faults and seconds per real step."""
  before = resource.getrusage(resource.RUSAGE_SELF)
  seconds = [bench.train_step() for _ in range(steps)]
  after = resource.getrusage(resource.RUSAGE_SELF)
  return {"minor_per_step": (after.ru_minflt - before.ru_minflt) / steps,
          "major_per_step": (after.ru_majflt - before.ru_majflt) / steps,
          "step_s": sorted(seconds)[len(seconds) // 2]}


def trace_ops(bench: Any, steps: int, trace_dir: str) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  import hlo_profile  # pylint: disable=g-import-not-at-top
  jax.profiler.start_trace(trace_dir)
  wall = [bench.train_step() for _ in range(steps)]
  jax.profiler.stop_trace()
  hlo = hlo_profile.parse_hlo(bench.compiled.as_text())
  times = hlo_profile.op_times(trace_dir)
  per_step = {k: {"seconds": v["seconds"] / steps, "count": v["count"] / steps}
              for k, v in times.items()}
  return {
      "traced_step_s": sum(wall) / steps,
      "op_seconds_per_step": sum(v["seconds"] for v in per_step.values()),
      "by_category": hlo_profile.group(per_step, lambda n: hlo_profile.category(n, hlo)),
      "by_origin": hlo_profile.group(per_step, lambda n: hlo_profile.origin(n, hlo)),
      "by_origin_and_category": hlo_profile.group(
          per_step, lambda n: f"{hlo_profile.origin(n, hlo)}: {hlo_profile.category(n, hlo)}"),
      "top_ops": [
          {"op": n, "seconds": v["seconds"], "category": hlo_profile.category(n, hlo),
           "origin": hlo_profile.origin(n, hlo)}
          for n, v in sorted(per_step.items(), key=lambda kv: -kv[1]["seconds"])[:15]],
  }


def _print_shares(title: str, seconds: dict[str, float], total: float,
                  at_least: float = 0.005) -> None:
  print(f"\n{title}")
  for key, value in seconds.items():
    if value / total >= at_least:
      print(f"  {key:45s} {value:8.3f} s  {100 * value / total:5.1f}%")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="s4", choices=sorted(specs.SPECS))
  parser.add_argument("--batch_size", type=int, default=None)
  parser.add_argument("--reps", type=int, default=2, help="timed calls per piece")
  parser.add_argument("--trace_steps", type=int, default=1)
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. optimizer=adamw (repeatable; VALUE as JSON)")
  parser.add_argument("--out", default=None, help="optional JSON path")
  args = parser.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  import flops  # pylint: disable=g-import-not-at-top
  import jax_bench  # pylint: disable=g-import-not-at-top
  import timing  # pylint: disable=g-import-not-at-top
  spec = specs.SPECS[args.config]
  config = specs.load_config(spec, args.batch_size or spec.batch_size,
                             specs.parse_overrides(args.set))
  print(f"{spec.description}, batch {config.batch_size}; {jax.devices()[0].platform}, "
        f"allocator {runtime.allocator_in_use()}, XLA:CPU dots {runtime.xla_cpu_dots()}, load {os.getloadavg()[0]:.2f}", flush=True)
  bench = jax_bench.JaxBench(config, spec.num_classes, spec.num_examples(config.image_size),
                             timing.CompileCounter())
  bench.train_step()
  bench.train_step()
  report: dict[str, Any] = {"config": spec.name, "batch_size": config.batch_size,
                            "allocator": runtime.allocator_in_use(),
                            "xla_cpu_dots": runtime.xla_cpu_dots(),
                            "load_start": os.getloadavg()}
  report["page_faults"] = page_faults(bench, 2)
  step_s = report["page_faults"]["step_s"]
  print(f"\nreal step {step_s:.2f} s; minor page faults/step "
        f"{report['page_faults']['minor_per_step']:.0f}", flush=True)
  report["parts"] = time_parts(bench, spec.num_classes, args.reps)
  _print_shares("pieces jitted alone (share of the real step):", report["parts"], step_s, 0.0)
  with tempfile.TemporaryDirectory() as trace_dir:
    report["trace"] = trace_ops(bench, args.trace_steps, trace_dir)
  trace = report["trace"]
  total = trace["op_seconds_per_step"]
  print(f"\ntraced step {trace['traced_step_s']:.2f} s; op time summed over XLA threads "
        f"{total:.2f} s")
  _print_shares("op time by kind:", trace["by_category"], total)
  _print_shares("op time by origin:", trace["by_origin"], total)
  _print_shares("op time by origin and kind:", trace["by_origin_and_category"], total, 0.01)
  matmul_s = sum(v for k, v in trace["by_category"].items() if k.startswith("matmul"))
  train_flops = flops.train_flops_per_image(bench.model, config.image_size) * config.batch_size
  report["matmul_flops_per_s_in_matmul_ops"] = train_flops / matmul_s if matmul_s else None
  print(f"\nanalytic matmul FLOPs / time in matmul ops: "
        f"{train_flops / matmul_s / 1e9:.0f} GFLOP/s" if matmul_s else "")
  print("\ntop ops:")
  for op in trace["top_ops"][:10]:
    print(f"  {op['op']:32s} {op['seconds']:.3f} s  {op['category']:20s} {op['origin']}")
  report["load_end"] = os.getloadavg()
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  runtime.prepare_process()
  main()
