"""One-shot check of a GPU/TPU machine: peaks, our train step's speed and memory, a PyTorch peer.

  python benchmarks/device_check.py --out=device_check.json           # one GPU/TPU, < 5 min
  python benchmarks/device_check.py --quick --out=/tmp/quick.json     # CPU, tiny shapes, < 2 min

Writes one JSON (rewritten after every section, so a run cut short keeps what it measured):
platform and device kind; bfloat16 and float32 matmul peaks; for Ti/4 and S/4 at 32px (batch
512) and B/16 at 224px (batch 64), with each token-mixing form, our jitted train step's img/s,
step time, MFU (analytic train FLOPs over the bfloat16 peak, the float32 one on CPU), compile
time and device memory; the same shapes trained by PyTorch (bfloat16 autocast, eager and
torch.compile; timm's MlpMixer where it imports) in the same process; and whether a short S/4
training on synthetic, learnable data lowers the loss. Compute dtype is the configs' "auto":
bfloat16 on GPU/TPU. `--quick` runs the same code with tiny shapes (torch.compile left out).

On a machine without clu, ml_collections, TFDS or dm-pix (the lent H200 has none of them),
carry the two pure-Python wheels it needs (ml_collections, dm-pix) and put them on PYTHONPATH:
  pip download --no-deps --only-binary=:all: -d .whl ml_collections dm-pix     # here
  pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
    && PYTHONPATH=/tmp/site python3 benchmarks/device_check.py --out=$OUT/device_check.json
Works with jax 0.10 and 0.11. JAX does not preallocate GPU memory here, so that PyTorch in the
same process has room too.
"""
from __future__ import annotations

import argparse
import json
import os
import platform as host_platform
import sys
import time
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before JAX starts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=wrong-import-position

# name -> (spec in specs.SPECS, batch, overrides); --quick shrinks them (QUICK).
SHAPES = {
    "Ti/4@32": ("s4", 512, {"model.variant": "Ti/4"}),
    "S/4@32": ("s4", 512, {}),
    "B/16@224": ("b16", 64, {}),
}
TINY = {"model.hidden_dim": 32, "model.num_blocks": 2, "model.tokens_mlp_dim": 16,
        "model.channels_mlp_dim": 64}
QUICK = {
    "Ti/4@32": ("s4", 16, {"model.variant": "Ti/4", **TINY}),
    "S/4@32": ("s4", 16, TINY),
    "B/16@224": ("b16", 4, {**TINY, "image_size": 64}),
}
TOKEN_MIXING = ("transpose", "batched")


class Report:
  """The JSON being built; written to `path` after every section."""

  def __init__(self, path: str, budget_s: float):
    self.path, self.start, self.budget_s = path, time.perf_counter(), budget_s
    self.data: dict[str, Any] = {"complete": False}

  def left_s(self) -> float:
    return self.budget_s - (time.perf_counter() - self.start)

  def set(self, key: str, value: Any) -> None:
    self.data[key] = value
    self.data["elapsed_s"] = round(time.perf_counter() - self.start, 1)
    with open(self.path + ".tmp", "w", encoding="utf-8") as f:
      json.dump(self.data, f, indent=1, default=str)
    os.replace(self.path + ".tmp", self.path)
    print(f"[{self.data['elapsed_s']:6.1f}s] {key}: {_short(value)}", flush=True)


def _short(value: Any) -> str:
  text = json.dumps(value, default=str)
  return text if len(text) < 300 else text[:297] + "..."


def platform_info() -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  return {"backend": jax.default_backend(), "device_kind": device.device_kind,
          "device_count": jax.device_count(), "jax": jax.__version__,
          "python": host_platform.python_version(), "host": host_platform.node()}


def matmul_peaks(backend: str, quick: bool) -> dict[str, Any]:
  import flops  # pylint: disable=g-import-not-at-top
  n = 512 if quick else None
  return {dtype: flops.jax_matmul_peak(backend, trials=3, dtype=dtype, n=n)
          for dtype in ("bfloat16", "float32")}


def jax_train(shape: tuple[str, int, dict], token_mixing: str, steps: int, peak: float,
              counter: Any) -> dict[str, Any]:
  """Our jitted train step (benchmarks/jax_bench.py) on random data: speed, MFU, memory."""
  import jax  # pylint: disable=g-import-not-at-top
  import flops  # pylint: disable=g-import-not-at-top
  import jax_bench  # pylint: disable=g-import-not-at-top
  import specs  # pylint: disable=g-import-not-at-top
  import timing  # pylint: disable=g-import-not-at-top
  spec_name, batch, overrides = shape
  spec = specs.SPECS[spec_name]
  config = specs.load_config(spec, batch, {**overrides, "model.token_mixing": token_mixing})
  bench = jax_bench.JaxBench(config, spec.num_classes, 4 * batch, counter)
  first = bench.train_step()
  seconds = [bench.train_step() for _ in range(steps)]
  summary = timing.summarize(seconds, batch)
  train_flops = flops.train_flops_per_image(bench.model, config.image_size)
  result = {"params": bench.num_params, "batch": batch, "image_size": config.image_size,
            "dtype": np.dtype(bench.model.dtype).name, "token_mixing": bench.model.token_mixing,
            "img_per_s": summary["img_per_s"], "step_ms": 1e3 * summary["median_s"],
            "mfu": train_flops * summary["img_per_s"] / peak, "compile_s": bench.compile_s,
            "first_step_s": first, "xla_memory_bytes": bench.xla_memory,
            "device_peak_bytes_so_far": timing.device_peak_bytes(jax.devices()[0]),
            "loss": bench.loss()}
  del bench
  return result


def torch_train(shape: tuple[str, int, dict], compiled: bool, steps: int,
                peak: float) -> dict[str, Any]:
  """The same shape trained by PyTorch with bfloat16 autocast (benchmarks/torch_mixer.py)."""
  import torch  # pylint: disable=g-import-not-at-top
  import flops  # pylint: disable=g-import-not-at-top
  import specs  # pylint: disable=g-import-not-at-top
  import timing  # pylint: disable=g-import-not-at-top
  import torch_mixer  # pylint: disable=g-import-not-at-top
  from mixer import models  # pylint: disable=g-import-not-at-top
  spec_name, batch, overrides = shape
  spec = specs.SPECS[spec_name]
  config = specs.load_config(spec, batch, overrides)
  model = models.build_model(config, spec.num_classes)
  dims = {k: getattr(model, k) for k in ("patch_size", "hidden_dim", "num_blocks",
                                         "tokens_mlp_dim", "channels_mlp_dim", "stoch_depth")}
  device = "cuda" if torch.cuda.is_available() else "cpu"
  net, impl, timm_error = torch_mixer.build(dims, spec.num_classes, config.image_size)
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  start = time.perf_counter()
  trainer = torch_mixer.Trainer(net, config, spec.num_classes, batch, config.image_size, device,
                                compiled=compiled, autocast=torch.bfloat16)
  trainer.step()
  first = time.perf_counter() - start  # building, compiling and the first step
  seconds = [trainer.step() for _ in range(steps)]
  summary = timing.summarize(seconds, batch)
  train_flops = flops.train_flops_per_image(model, config.image_size)
  return {"impl": impl + ("+compile" if compiled else " eager"), "timm_error": timm_error,
          "device": device, "params": torch_mixer.num_params(net),
          "img_per_s": summary["img_per_s"], "step_ms": 1e3 * summary["median_s"],
          "mfu": train_flops * summary["img_per_s"] / peak, "first_step_s": first,
          "device_peak_bytes": (torch.cuda.max_memory_allocated() if device == "cuda" else None),
          "loss": float(trainer.last_loss)}


def learnable_data(num_examples: int, image_size: int, num_classes: int,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Each class a fixed random picture, each example its class's picture plus noise."""
  rng = np.random.default_rng(seed)
  templates = rng.integers(0, 256, (num_classes, image_size, image_size, 3))
  labels = rng.integers(0, num_classes, (num_examples,)).astype(np.int32)
  noise = rng.integers(0, 256, (num_examples, image_size, image_size, 3))
  return (0.7 * templates[labels] + 0.3 * noise).astype(np.uint8), labels


def convergence(shape: tuple[str, int, dict], steps: int, counter: Any) -> dict[str, Any]:
  """A short training of the shape on learnable synthetic data: does the loss fall?"""
  import jax_bench  # pylint: disable=g-import-not-at-top
  import specs  # pylint: disable=g-import-not-at-top
  spec_name, batch, overrides = shape
  spec = specs.SPECS[spec_name]
  # Plain AdamW at a constant-ish rate, no augmentation and no stochastic depth, so the loss
  # reads directly: each class is a fixed random-pixel picture, and a 4-pixel crop or a flip
  # of one is a different picture (with them, 40 --quick steps left the loss at ln 10; without,
  # it falls to ~1.89).
  config = specs.load_config(spec, batch, {**overrides, "mixup_alpha": 0.0, "cutmix_alpha": 0.0,
                                           "randaugment_ops": 0, "random_erasing": 0.0,
                                           "augment": False, "model.stoch_depth": 0.0,
                                           "ema_decay": 0.0, "warmup_epochs": 0.0,
                                           "learning_rate": 1e-3})
  num_classes = 10
  data = learnable_data(4 * batch, config.image_size, num_classes)
  bench = jax_bench.JaxBench(config, num_classes, 4 * batch, counter, arrays=data)
  losses = []
  for _ in range(steps):
    bench.train_step()
    losses.append(bench.loss())
  k = max(steps // 5, 1)
  first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
  return {"steps": steps, "batch": batch, "num_classes": num_classes, "losses": losses,
          "first_mean": first, "last_mean": last, "loss_fell": last < 0.9 * first}


def run(args: argparse.Namespace) -> dict[str, Any]:
  import timing  # pylint: disable=g-import-not-at-top
  report = Report(args.out, args.budget_s)
  info = platform_info()
  report.set("platform", info)
  peaks = matmul_peaks(info["backend"], args.quick)
  report.set("matmul_peaks", peaks)
  peak = peaks["float32" if info["backend"] == "cpu" else "bfloat16"]["best_flops"]
  report.set("mfu_peak", {"dtype": "float32" if info["backend"] == "cpu" else "bfloat16",
                          "flops": peak})
  shapes = QUICK if args.quick else SHAPES
  steps = 3 if args.quick else 20
  counter = timing.CompileCounter()
  jax_results: dict[str, Any] = {}
  for name, shape in shapes.items():
    for form in TOKEN_MIXING:
      key = f"{name} {form}"
      if report.left_s() < args.reserve_s:
        jax_results[key] = {"skipped": "time budget"}
        continue
      try:
        jax_results[key] = jax_train(shape, form, steps, peak, counter)
      except Exception as e:  # pylint: disable=broad-except  # e.g. out of memory: say so
        jax_results[key] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
      report.set("jax", jax_results)
  report.set("convergence", convergence(shapes["S/4@32"], 40 if args.quick else 60, counter))
  torch_results: dict[str, Any] = {}
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    torch_results = {"skipped": f"torch not importable: {e}"}
  else:
    for name, shape in shapes.items():
      for compiled in ((False,) if args.quick else (False, True)):
        key = f"{name} {'compile' if compiled else 'eager'}"
        if report.left_s() < (90 if compiled else 20):  # torch.compile takes a minute
          torch_results[key] = {"skipped": "time budget"}
          continue
        try:
          torch_results[key] = torch_train(shape, compiled, steps, peak)
        except Exception as e:  # pylint: disable=broad-except
          torch_results[key] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        report.set("torch", torch_results)
  report.set("torch", torch_results)
  for name in shapes:
    ours = jax_results.get(f"{name} transpose", {}).get("img_per_s")
    theirs = [r.get("img_per_s") for k, r in torch_results.items()
              if k.startswith(name) and isinstance(r, dict) and r.get("img_per_s")]
    if ours and theirs:
      jax_results.setdefault("jax_over_best_torch", {})[name] = ours / max(theirs)
  report.set("jax", jax_results)
  report.set("complete", True)
  return report.data


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="JSON file to write.")
  parser.add_argument("--quick", action="store_true", help="Tiny shapes on CPU, < 2 minutes.")
  parser.add_argument("--budget_s", type=float, default=280.0,
                      help="Sections not started by then are marked skipped.")
  parser.add_argument("--reserve_s", type=float, default=60.0,
                      help="Time kept for the convergence check and the torch peer.")
  args = parser.parse_args()
  from mixer import runtime  # pylint: disable=g-import-not-at-top
  runtime.prepare_process()  # CPU-only tuning where JAX will run on CPU, nothing elsewhere
  run(args)


if __name__ == "__main__":
  main()
