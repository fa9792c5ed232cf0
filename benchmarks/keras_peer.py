"""The Keras 3 peer: the benchmark's Mixer shapes trained with Keras on its JAX or TF backend.

  python benchmarks/keras_peer.py --configs ti4,s4,small64 [--backend jax|tensorflow]

Builds each spec's Mixer (same parameter count as ours, checked) from Keras layers — Conv2D
stem, Permute + Dense token mixing, tanh-GELU, LayerNorm, mean pooling — and times
`train_on_batch` (AdamW, global-norm clipping, cross-entropy, one fixed random batch; no
augmentation, mixup or stochastic depth, like the PyTorch peer) with `jit_compile=True`.
Keras 3 comes with TensorFlow, a dependency already. The process gets the same set-up as ours
(`runtime.prepare_process`: tcmalloc, and on the JAX backend our oneDNN XLA flags unless
MIXER_XLA_CPU=default).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(1, os.path.dirname(HERE))

from mixer import runtime  # pylint: disable=wrong-import-position

import specs  # pylint: disable=wrong-import-position


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


def bench(name: str, seconds: float, warmup: int) -> dict[str, float]:
  import keras  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import flops  # pylint: disable=g-import-not-at-top
  from mixer import models  # pylint: disable=g-import-not-at-top
  spec = specs.SPECS[name]
  config = specs.load_config(spec, spec.batch_size)
  flax_model = models.build_model(config, spec.num_classes)
  model = build(flax_model, config.image_size, spec.num_classes)
  model.compile(
      optimizer=keras.optimizers.AdamW(config.learning_rate, weight_decay=config.weight_decay,
                                       global_clipnorm=config.grad_clip_norm or None),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
  rng = np.random.default_rng(0)
  batch = config.batch_size
  x = rng.standard_normal((batch, config.image_size, config.image_size, 3), np.float32)
  y = rng.integers(0, spec.num_classes, (batch,))
  start = time.perf_counter()
  model.train_on_batch(x, y)  # compiles
  first = time.perf_counter() - start
  for _ in range(warmup):
    model.train_on_batch(x, y)
  times = []
  while sum(times) < seconds or len(times) < 3:
    start = time.perf_counter()
    model.train_on_batch(x, y)  # returns the loss as a host float: synchronised
    times.append(time.perf_counter() - start)
  img_per_s = batch / float(np.median(times))
  train_flops = flops.train_flops_per_image(flax_model, config.image_size)
  return {"config": name, "batch": batch, "params": model.count_params(),
          "first_step_s": first, "steps": len(times), "img_per_s": img_per_s,
          "achieved_flops": img_per_s * train_flops}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="ti4,s4,small64")
  parser.add_argument("--backend", choices=("jax", "tensorflow"), default="jax")
  parser.add_argument("--seconds", type=float, default=15.0, help="timed seconds per config")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/)")
  args = parser.parse_args()
  if os.environ.get("KERAS_BACKEND") != args.backend:
    os.environ["KERAS_BACKEND"] = args.backend
    os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ))
  import keras  # pylint: disable=g-import-not-at-top
  import flops  # pylint: disable=g-import-not-at-top
  peak = flops.jax_matmul_peak("cpu")["best_flops"]
  print(f"keras {keras.__version__}, backend {keras.backend.backend()}; allocator "
        f"{runtime.allocator_in_use()}; XLA:CPU dots {runtime.xla_cpu_dots()}; "
        f"float32 matmul peak {peak / 1e9:.0f} GFLOP/s", flush=True)
  print("| config | batch | params | Keras img/s | MFU | first step s |")
  print("|---|---|---|---|---|---|")
  results = []
  for name in args.configs.split(","):
    r = bench(name, args.seconds, args.warmup)
    r["mfu"] = r["achieved_flops"] / peak
    results.append(r)
    print(f"| {name} | {r['batch']} | {r['params']:,} | {r['img_per_s']:.1f} | "
          f"{100 * r['mfu']:.1f}% | {r['first_step_s']:.1f} |", flush=True)
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  out = args.out or os.path.join(HERE, "results", f"keras-{args.backend}-"
                                 f"{runtime.xla_cpu_dots()}_{stamp}.json")
  with open(out, "w", encoding="utf-8") as f:
    json.dump({"keras": keras.__version__, "backend": args.backend,
               "allocator": runtime.allocator_in_use(), "xla_cpu_dots": runtime.xla_cpu_dots(),
               "xla_flags": os.environ.get("XLA_FLAGS", ""), "matmul_peak_flops": peak,
               "load_average": os.getloadavg(), "results": results}, f, indent=1)
  print(f"wrote {out}")


if __name__ == "__main__":
  runtime.prepare_process()
  main()
