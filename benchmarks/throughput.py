"""Throughput, FLOPs, MFU, memory and compile behaviour of the real Mixer train/eval steps.

  python benchmarks/throughput.py                          # every shape, this device
  python benchmarks/throughput.py --configs s4,b16 --compare
  python benchmarks/throughput.py --batch_size s4=256,b16=16 --steps 10

For each shape (benchmarks/specs.py) it times the jitted step of `train_step.make_train_step`
(gather by (seed, step), on-device augmentation, update) on random uint8 data held on the
device, one synchronised step at a time, median over the timed steps after warm-up; the
eval step of `evaluator.Evaluator` likewise. With --compare a PyTorch eager peer of the
same shapes (benchmarks/torch_mixer.py) is timed in passes interleaved with the JAX ones,
so that a change of machine load hits both. MFU divides the analytic training FLOP/s by the
matmul peak measured in the same run (float32 on CPU, bfloat16 on GPU/TPU).

Writes one JSON file (--out) and prints a markdown table. A script, not a test: numbers
depend on the machine and its load (printed with them).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import re
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(1, os.path.dirname(HERE))  # the repository root, for `mixer`

from mixer import runtime  # pylint: disable=wrong-import-position

import specs  # pylint: disable=wrong-import-position


def _per_config(value: str | None, names: list[str], what: str) -> dict[str, int]:
  """'64' (every config) or 's4=64,b16=4' -> {name: int}."""
  if not value:
    return {}
  if "=" not in value:
    return {name: int(value) for name in names}
  out = {}
  for item in value.split(","):
    name, _, number = item.partition("=")
    if name not in specs.SPECS:
      raise SystemExit(f"--{what}: unknown config {name!r}; known: {', '.join(specs.SPECS)}")
    out[name] = int(number)
  return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--configs", default=",".join(specs.DEFAULT_ORDER),
                      help=f"comma-separated subset of: {', '.join(specs.SPECS)}")
  parser.add_argument("--batch_size", default=None,
                      help="one int for every config, or NAME=INT,... (defaults: "
                      + ", ".join(f"{s.name}={s.batch_size}" for s in specs.SPECS.values()) + ")")
  parser.add_argument("--steps", default=None,
                      help="timed train steps: one int, or NAME=INT,... (default: enough for "
                      "--seconds, at least 2 per pass)")
  parser.add_argument("--seconds", type=float, default=10.0,
                      help="target seconds of timed JAX train steps per config")
  parser.add_argument("--passes", type=int, default=3, help="interleaved timing passes")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  parser.add_argument("--compare", action="store_true",
                      help="also time a PyTorch eager peer (needs torch; timm optional)")
  parser.add_argument("--torch_compile", action="store_true",
                      help="with --compare: the peer runs under torch.compile instead of eager")
  parser.add_argument("--torch_impl", choices=("auto", "timm", "minimal"), default="auto")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override for every selected config, e.g. "
                      "model.dtype=bfloat16 (repeatable; VALUE parsed as JSON, else a string)")
  parser.add_argument("--no_eval", action="store_true", help="skip the eval-step timing")
  parser.add_argument("--out", default=None,
                      help="JSON path (default benchmarks/results/<device>_<timestamp>.json)")
  args = parser.parse_args(argv)
  args.names = [n.strip() for n in args.configs.split(",") if n.strip()]
  unknown = [n for n in args.names if n not in specs.SPECS]
  if unknown:
    parser.error(f"unknown configs {unknown}; known: {', '.join(specs.SPECS)}")
  args.batch_sizes = _per_config(args.batch_size, args.names, "batch_size")
  args.step_counts = _per_config(args.steps, args.names, "steps")
  args.overrides = specs.parse_overrides(args.set)
  if args.passes < 1 or args.warmup < 1:
    parser.error("--passes and --warmup must be >= 1")
  return args


def _timed_steps_per_pass(args: argparse.Namespace, name: str, step_s: float) -> int:
  total = args.step_counts.get(name)
  if total is None:
    total = max(2 * args.passes, min(60, round(args.seconds / max(step_s, 1e-6))))
  return max(1, math.ceil(total / args.passes))


MODEL_FIELDS = ("patch_size", "hidden_dim", "num_blocks", "tokens_mlp_dim", "channels_mlp_dim",
                "stoch_depth")


def _model_dims(model: Any) -> dict[str, Any]:
  return {k: getattr(model, k) for k in MODEL_FIELDS}


def _memory(device: Any) -> dict[str, Any]:
  import timing  # pylint: disable=g-import-not-at-top
  peak = timing.device_peak_bytes(device)
  if peak is not None:
    return {"peak_bytes": peak, "source": "device.memory_stats peak_bytes_in_use"}
  return {"peak_bytes": timing.peak_rss_bytes(), "source": "process peak RSS (VmHWM)"}


def bench_config(name: str, args: argparse.Namespace, counter: Any, peaks: list[float],
                 device: Any) -> dict[str, Any]:
  """Every measurement of one shape; the PyTorch peer too with --compare.

  Appends a fresh matmul-peak measurement to `peaks` (the load may change during a run).
  """
  import flops  # pylint: disable=g-import-not-at-top
  import jax_bench  # pylint: disable=g-import-not-at-top
  import timing  # pylint: disable=g-import-not-at-top
  spec = specs.SPECS[name]
  batch = args.batch_sizes.get(name, spec.batch_size)
  config = specs.load_config(spec, batch, args.overrides)
  num_examples = spec.num_examples(config.image_size)
  gc.collect()
  timing.release_free_memory()
  timing.reset_peak_rss()
  start_rss = timing.peak_rss_bytes()
  print(f"[{name}] {spec.description}, batch {batch}: compiling ...", flush=True)
  bench = jax_bench.JaxBench(config, spec.num_classes, num_examples, counter)
  warmup = [bench.train_step() for _ in range(args.warmup)]
  peaks.append(flops.jax_matmul_peak(device.platform, trials=3)["best_flops"])
  per_pass = _timed_steps_per_pass(args, name, warmup[-1])
  print(f"[{name}] compiled in {bench.compile_s:.1f}s; first step {warmup[0]:.2f}s, then "
        f"{warmup[-1]:.2f}s; timing {args.passes} x {per_pass} steps", flush=True)

  train_s, torch_s, eval_s = [], [], []
  result: dict[str, Any] = {}
  peer = None
  for p in range(args.passes):
    train_s += [bench.train_step() for _ in range(per_pass)]
    if p == 0:
      if not args.no_eval:
        evaluator = jax_bench.EvalBench(bench, spec.num_classes)
        evaluator.full_pass()
        eval_s = [evaluator.eval_step() for _ in range(args.passes * per_pass + 1)][1:]
        result["eval"] = dict(timing.summarize(eval_s, batch), compile_s=evaluator.compile_s)
        del evaluator
      result["memory"] = dict(_memory(device), start_rss_bytes=start_rss)
      if args.compare:
        peer = _torch_peer(bench, config, spec, args)
        result["torch_setup"] = peer[1]
    if peer is not None:
      torch_s += [peer[0].step() for _ in range(per_pass)]

  dims = bench.model
  analytic = flops.forward_flops(dims, config.image_size)
  train_flops = 3.0 * analytic["total"]
  xla = bench.xla_flops_per_step / batch if bench.xla_flops_per_step else None
  summary = timing.summarize(train_s, batch)
  achieved = train_flops * summary["img_per_s"]
  result.update({
      "name": name, "description": spec.description, "config_file": spec.config_file,
      "config_arg": spec.config_arg, "overrides": dict(spec.overrides, **args.overrides),
      "batch_size": batch,
      "image_size": config.image_size, "num_classes": spec.num_classes,
      "optimizer": config.optimizer, "num_examples_on_device": num_examples,
      "params": bench.num_params,
      "model": _model_dims(dims),
      "forward_flops_per_image": analytic,
      "train_flops_per_image": {"analytic": train_flops, "xla": xla,
                                "xla_over_analytic": xla / train_flops if xla else None},
      "compile": {"lower_s": bench.lower_s, "compile_s": bench.compile_s,
                  "compiles_in_first_call": bench.compiles_in_first_call,
                  "compiles_after_first_call": bench.compiles_after_first_call,
                  "jit_cache_size": bench.step_fn._cache_size()},  # pylint: disable=protected-access
      "warmup_s": warmup, "train": summary, "train_step_seconds": train_s,
      "xla_memory": bench.xla_memory,
      "achieved_flops": achieved, "mfu": achieved / max(peaks),
      "matmul_peak_before_timing": peaks[-1],
      "final_loss": bench.loss(),
  })
  if peer is not None:
    torch_summary = timing.summarize(torch_s, batch)
    result["torch"] = dict(torch_summary, step_seconds=torch_s,
                           jax_over_torch=summary["img_per_s"] / torch_summary["img_per_s"],
                           mfu=train_flops * torch_summary["img_per_s"] / max(peaks))
  print(f"[{name}] train {summary['img_per_s']:.1f} img/s (MFU {100 * result['mfu']:.1f}%)"
        + (f", torch {result['torch']['img_per_s']:.1f} img/s" if "torch" in result else ""),
        flush=True)
  del bench, peer
  gc.collect()
  return result


def _torch_peer(bench: Any, config: Any, spec: Any, args: argparse.Namespace) -> tuple[Any, dict]:
  import torch_mixer  # pylint: disable=g-import-not-at-top
  dims = _model_dims(bench.model)
  model, impl, timm_error = torch_mixer.build(dims, spec.num_classes, config.image_size,
                                              args.torch_impl)
  trainer = torch_mixer.Trainer(model, config, spec.num_classes, config.batch_size,
                                config.image_size, args.torch_device, compiled=args.torch_compile)
  threads = torch_mixer.pick_threads(trainer, args.warmup)
  impl += "+compile" if args.torch_compile else " eager"
  setup = {"impl": impl, "timm_error": timm_error, "params": torch_mixer.num_params(model),
           **threads}
  if setup["params"] != bench.num_params:
    print(f"  warning: torch peer has {setup['params']} parameters, JAX {bench.num_params}")
  return trainer, setup


def _fmt_memory(memory: dict[str, Any]) -> str:
  """Device peak; on CPU the process peak RSS and its rise over the config's start."""
  peak = memory["peak_bytes"]
  if peak is None:
    return "n/a"
  if memory["source"].startswith("device"):
    return f"{peak / 2**30:.2f} GiB"
  return f"{peak / 2**30:.2f} GiB RSS (+{(peak - memory['start_rss_bytes']) / 2**30:.2f})"


def table(results: list[dict[str, Any]], compare: bool) -> str:
  head = ["config", "batch", "params", "GFLOP/img train (analytic / XLA = ratio)",
          "img/s train", "img/s eval", "compile s", "MFU", "peak mem", "XLA temp",
          "recompiles"]
  if compare:
    head += ["torch img/s", "JAX/torch"]
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in results:
    f = r["train_flops_per_image"]
    xla = f"{f['xla'] / 1e9:.3f} = {f['xla_over_analytic']:.2f}" if f["xla"] else "n/a"
    comp = r["compile"]
    recompiles = comp["compiles_after_first_call"]
    cells = [r["name"], str(r["batch_size"]), f"{r['params'] / 1e6:.2f}M",
             f"{f['analytic'] / 1e9:.3f} / {xla}", f"{r['train']['img_per_s']:.1f}",
             f"{r['eval']['img_per_s']:.1f}" if "eval" in r else "n/a",
             f"{comp['lower_s'] + comp['compile_s']:.1f}", f"{100 * r['mfu']:.1f}%",
             _fmt_memory(r["memory"]),
             f"{r['xla_memory']['temp'] / 2**30:.2f} GiB" if r["xla_memory"] else "n/a",
             f"{recompiles}" + ("" if recompiles == 0 else " (!)")]
    if compare:
      t = r.get("torch")
      setup = r.get("torch_setup", {})
      cells += [f"{t['img_per_s']:.1f} ({setup['impl']}, {setup['threads']}t)" if t else "n/a",
                f"{t['jax_over_torch']:.2f}x" if t else "n/a"]
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows)


def _default_out(device_name: str) -> str:
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  return os.path.join(HERE, "results", f"{re.sub(r'[^A-Za-z0-9]+', '-', device_name)}_{stamp}.json")


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  import flax  # pylint: disable=g-import-not-at-top  # after the allocator re-exec
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import flops  # pylint: disable=g-import-not-at-top
  import timing  # pylint: disable=g-import-not-at-top
  counter = timing.CompileCounter()
  device = jax.devices()[0]
  load_start = os.getloadavg()
  print(f"device: {device.platform} {device.device_kind} x{jax.device_count()}; allocator: "
        f"{runtime.allocator_in_use()}; XLA:CPU dots: {runtime.xla_cpu_dots()}; load average {load_start[0]:.2f} {load_start[1]:.2f} "
        f"{load_start[2]:.2f} on {os.cpu_count()} CPUs", flush=True)
  peaks = {"jax_start": flops.jax_matmul_peak(device.platform)}
  torch_info = None
  if args.compare:
    try:
      import torch  # pylint: disable=g-import-not-at-top
      import torch_mixer  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise SystemExit(f"--compare needs PyTorch: pip install torch==2.13.0 timm ({e})")
    args.torch_device = torch_mixer.device_for(device.platform)
    if args.torch_device is None:
      print(f"--compare: this torch cannot use the {device.platform} device; skipping the "
            "PyTorch peer (a CPU peer would not be comparable).")
      args.compare = False
  if args.compare:
    torch_info = {"version": torch.__version__, "threads": torch.get_num_threads(),
                  "device": args.torch_device,
                  "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    peaks["torch_start"] = torch_mixer.matmul_peak(args.torch_device)
  print(f"matmul peak ({peaks['jax_start']['dtype']}): "
        f"{peaks['jax_start']['best_flops'] / 1e9:.0f} GFLOP/s", flush=True)

  jax_peaks = [peaks["jax_start"]["best_flops"]]
  results = [bench_config(name, args, counter, jax_peaks, device) for name in args.names]

  peaks["jax_end"] = flops.jax_matmul_peak(device.platform)
  if args.compare:
    peaks["torch_end"] = torch_mixer.matmul_peak(args.torch_device)
  peaks["jax_per_config"] = jax_peaks[1:]
  best = max(jax_peaks + [peaks["jax_end"]["best_flops"]])
  for r in results:  # MFU against the best peak seen in this run
    r["mfu"] = r["achieved_flops"] / best
    if "torch" in r:
      r["torch"]["mfu"] = r["train_flops_per_image"]["analytic"] * r["torch"]["img_per_s"] / best
  load_end = os.getloadavg()
  report = {
      "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
      "device": {"platform": device.platform, "kind": device.device_kind,
                 "count": jax.device_count(), "cpu_count": os.cpu_count(),
                 "processor": platform.processor() or platform.machine()},
      "allocator": runtime.allocator_in_use(), "ld_preload": os.environ.get("LD_PRELOAD", ""),
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "xla_cpu_dots": runtime.xla_cpu_dots(),
      "versions": {"python": platform.python_version(), "jax": jax.__version__,
                   "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                   "optax": optax.__version__},
      "torch": torch_info,
      "load_average": {"start": load_start, "end": load_end},
      "matmul_peak": peaks, "peak_flops_for_mfu": best,
      "args": {k: v for k, v in vars(args).items()},
      "results": results,
  }
  out = args.out or _default_out(f"{device.platform}-{device.device_kind}")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1, default=str)
  print()
  print(f"{device.platform} {device.device_kind}, allocator {report['allocator']}, "
        f"load {load_start[0]:.2f} -> {load_end[0]:.2f}, matmul peak {best / 1e9:.0f} GFLOP/s "
        f"({peaks['jax_start']['dtype']})")
  print(table(results, args.compare))
  print(f"\nwrote {out}")
  return report


if __name__ == "__main__":
  runtime.prepare_process()
  main()
