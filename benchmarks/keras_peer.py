"""The Keras 3 peer: the benchmark's Mixer shapes trained with Keras on its JAX or TF backend.

  python benchmarks/keras_peer.py --configs ti4,s4,small64 [--backend jax|tensorflow]
  python benchmarks/keras_peer.py --configs ti4_hour,s4 --backend tensorflow --ours

Builds each spec's Mixer (same parameter count as ours, checked) from Keras layers — Conv2D
stem, Permute + Dense token mixing, tanh-GELU, LayerNorm, mean pooling — and times
`train_on_batch` (AdamW, global-norm clipping, cross-entropy, one fixed random batch; no
augmentation, mixup or stochastic depth, like the PyTorch peer) with `jit_compile=True`.
Keras 3 comes with TensorFlow, a dependency already. The process gets the same set-up as ours
(`runtime.prepare_process`: tcmalloc, and on the JAX backend our oneDNN XLA flags unless
MIXER_XLA_CPU=default). With --ours, our real train step (`benchmarks/jax_bench.py`: gather,
on-device augmentation, update; AdamW like the peer) is timed in the same process, in passes
interleaved with Keras's, so that a change of machine load hits both; medians, and MFU against
the float32 matmul peak measured in the same run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(1, os.path.dirname(HERE))

from mixer import runtime  # pylint: disable=wrong-import-position

import specs  # pylint: disable=wrong-import-position

# The Keras side trains with AdamW; ours does too, unless --set optimizer=... says otherwise.
OURS_OVERRIDES = {"optimizer": "adamw"}


def build(model, image_size: int, num_classes: int):
  """A Keras Mixer with the shapes of the Flax `model` (an MlpMixer, used for its fields)."""
  import keras  # pylint: disable=g-import-not-at-top
  from keras import layers  # pylint: disable=g-import-not-at-top
  gelu = lambda x: keras.activations.gelu(x, approximate=True)
  p, width = model.patch_size, model.hidden_dim
  tokens = (image_size // p) ** 2
  images = keras.Input((image_size, image_size, 3))
  x = layers.Conv2D(width, p, strides=p)(images)
  x = layers.Reshape((tokens, width))(x)
  for _ in range(model.num_blocks):
    y = layers.LayerNormalization(epsilon=1e-6)(x)
    y = layers.Permute((2, 1))(y)
    y = layers.Dense(tokens, activation=None)(layers.Dense(model.tokens_mlp_dim,
                                                           activation=gelu)(y))
    x = layers.Add()([x, layers.Permute((2, 1))(y)])
    y = layers.LayerNormalization(epsilon=1e-6)(x)
    y = layers.Dense(width)(layers.Dense(model.channels_mlp_dim, activation=gelu)(y))
    x = layers.Add()([x, y])
  x = layers.GlobalAveragePooling1D()(layers.LayerNormalization(epsilon=1e-6)(x))
  return keras.Model(images, layers.Dense(num_classes)(x))


class KerasBench:
  """A compiled Keras train step (`train_on_batch`) of one spec's shape on one random batch."""

  def __init__(self, config, num_classes: int):
    import keras  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from mixer import models  # pylint: disable=g-import-not-at-top
    self.flax_model = models.build_model(config, num_classes)
    self.model = build(self.flax_model, config.image_size, num_classes)
    self.model.compile(
        optimizer=keras.optimizers.AdamW(config.learning_rate, weight_decay=config.weight_decay,
                                         global_clipnorm=config.grad_clip_norm or None),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    rng = np.random.default_rng(0)
    self.batch_size = batch = config.batch_size
    self.x = rng.standard_normal((batch, config.image_size, config.image_size, 3), np.float32)
    self.y = rng.integers(0, num_classes, (batch,))
    self.first_step_s = self.step()  # compiles

  def step(self) -> float:
    start = time.perf_counter()
    self.model.train_on_batch(self.x, self.y)  # returns the loss as a host float: synchronised
    return time.perf_counter() - start


def bench(name: str, args: argparse.Namespace) -> dict[str, Any]:
  """Keras steps of one spec; with --ours our real train step too, in interleaved passes."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import flops  # pylint: disable=g-import-not-at-top
  import timing  # pylint: disable=g-import-not-at-top
  spec = specs.SPECS[name]
  config = specs.load_config(spec, spec.batch_size, dict(OURS_OVERRIDES, **args.overrides))
  peer = KerasBench(config, spec.num_classes)
  ours = None
  if args.ours:
    import jax_bench  # pylint: disable=g-import-not-at-top
    ours = jax_bench.JaxBench(config, spec.num_classes, spec.num_examples(config.image_size),
                              timing.CompileCounter())
    if ours.num_params != peer.model.count_params():
      raise SystemExit(f"{name}: Keras has {peer.model.count_params()} parameters, "
                       f"ours {ours.num_params}")
  benches = {"keras": peer.step, **({"ours": ours.train_step} if ours else {})}
  for step in benches.values():
    for _ in range(args.warmup):
      step()
  per_pass = max(2, round(args.seconds / args.passes / peer.step()))
  times: dict[str, list[float]] = {k: [] for k in benches}
  for _ in range(args.passes):
    for key, step in benches.items():
      times[key] += [step() for _ in range(per_pass)]
  train_flops = flops.train_flops_per_image(peer.flax_model, config.image_size)
  result = {"config": name, "batch": peer.batch_size, "params": peer.model.count_params(),
            "optimizer": config.optimizer, "first_step_s": peer.first_step_s,
            "passes": args.passes, "steps_per_pass": per_pass}
  for key, seconds in times.items():
    img_per_s = peer.batch_size / float(np.median(seconds))
    result[key] = {"img_per_s": img_per_s, "achieved_flops": img_per_s * train_flops,
                   "step_seconds": seconds}
  if ours:
    result["ours_over_keras"] = result["ours"]["img_per_s"] / result["keras"]["img_per_s"]
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="ti4,s4,small64")
  parser.add_argument("--backend", choices=("jax", "tensorflow"), default="jax")
  parser.add_argument("--ours", action="store_true",
                      help="also time our train step, in passes interleaved with Keras's")
  parser.add_argument("--seconds", type=float, default=15.0,
                      help="timed Keras seconds per config (as many steps of ours)")
  parser.add_argument("--passes", type=int, default=3, help="interleaved timing passes")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override for both sides (repeatable; VALUE as JSON)")
  parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/)")
  args = parser.parse_args()
  args.overrides = specs.parse_overrides(args.set)
  if os.environ.get("KERAS_BACKEND") != args.backend:
    os.environ["KERAS_BACKEND"] = args.backend
    os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ))
  import keras  # pylint: disable=g-import-not-at-top
  import flops  # pylint: disable=g-import-not-at-top
  peaks = [flops.jax_matmul_peak("cpu")["best_flops"]]
  print(f"keras {keras.__version__}, backend {keras.backend.backend()}; allocator "
        f"{runtime.allocator_in_use()}; XLA:CPU dots {runtime.xla_cpu_dots()}; load "
        f"{os.getloadavg()[0]:.2f}; float32 matmul peak {peaks[0] / 1e9:.0f} GFLOP/s", flush=True)
  results = [bench(name, args) for name in args.configs.split(",")]
  peaks.append(flops.jax_matmul_peak("cpu")["best_flops"])
  peak = max(peaks)
  print(f"\nmatmul peak {peak / 1e9:.0f} GFLOP/s (best of start and end); load "
        f"{os.getloadavg()[0]:.2f}")
  print("| config | batch | params | Keras img/s | MFU |"
        + (" ours img/s | MFU | ours/Keras |" if args.ours else ""))
  print("|---|---|---|---|---|" + ("---|---|---|" if args.ours else ""))
  for r in results:
    cells = [r["config"], str(r["batch"]), f"{r['params']:,}"]
    for key in ("keras", "ours"):
      if key in r:
        r[key]["mfu"] = r[key]["achieved_flops"] / peak
        cells += [f"{r[key]['img_per_s']:.1f}", f"{100 * r[key]['mfu']:.1f}%"]
    if "ours_over_keras" in r:
      cells.append(f"{r['ours_over_keras']:.3f}x")
    print("| " + " | ".join(cells) + " |")
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  out = args.out or os.path.join(HERE, "results", f"keras-{args.backend}-"
                                 f"{runtime.xla_cpu_dots()}_{stamp}.json")
  with open(out, "w", encoding="utf-8") as f:
    json.dump({"keras": keras.__version__, "backend": args.backend,
               "allocator": runtime.allocator_in_use(), "xla_cpu_dots": runtime.xla_cpu_dots(),
               "xla_flags": os.environ.get("XLA_FLAGS", ""), "matmul_peak_flops": peaks,
               "load_average": os.getloadavg(), "args": vars(args), "results": results},
              f, indent=1)
  print(f"wrote {out}")


if __name__ == "__main__":
  runtime.prepare_process()
  main()
