"""Time the on-device augmentation of one CIFAR-sized batch on CPU.

  python benchmarks/augment_cost.py                 # batch 128 of 32x32x3 uint8
  python benchmarks/augment_cost.py --batch_size 256 --calls 30

Times the jitted crop+flip alone and crop+flip + RandAugment(2 ops, magnitude 9) + random
erasing(0.25) (with the uint8 -> [-1, 1] conversion in both), median over the timed calls
after a warm-up call, and prints a markdown table of ms per batch. A script, not a test:
the numbers depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mixer import runtime  # pylint: disable=wrong-import-position


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--calls", type=int, default=20)
  parser.add_argument("--num_ops", type=int, default=2)
  parser.add_argument("--magnitude", type=float, default=9.0)
  parser.add_argument("--erasing", type=float, default=0.25)
  args = parser.parse_args()
  runtime.prepare_process()

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mixer import augment, randaugment  # pylint: disable=g-import-not-at-top

  def crop_flip(key, images):
    return augment.random_crop_flip(key, images).astype(np.float32) / 127.5 - 1.0

  def full(key, images):
    k_crop, k_ra, k_erase = jax.random.split(key, 3)
    images = augment.random_crop_flip(k_crop, images)
    images = randaugment.rand_augment(k_ra, images, args.num_ops, args.magnitude)
    images = images.astype(np.float32) / 127.5 - 1.0
    return randaugment.random_erasing(k_erase, images, args.erasing)

  shape = (args.batch_size, args.image_size, args.image_size, 3)
  images = jax.device_put(np.random.default_rng(0).integers(0, 256, shape, np.uint8))
  rows = []
  for name, fn in (("crop+flip", crop_flip),
                   (f"crop+flip + rand_augment({args.num_ops}, {args.magnitude:g}) + "
                    f"random_erasing({args.erasing:g})", full)):
    step = jax.jit(fn)
    step(jax.random.key(0), images).block_until_ready()  # compile and warm up
    seconds = []
    for i in range(args.calls):
      start = time.perf_counter()
      step(jax.random.key(i + 1), images).block_until_ready()
      seconds.append(time.perf_counter() - start)
    rows.append((name, 1e3 * float(np.median(seconds)), 1e3 * min(seconds)))
  print(f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, allocator "
        f"{runtime.allocator_in_use()}, load average {os.getloadavg()[0]:.2f}; "
        f"batch {args.batch_size} of {args.image_size}x{args.image_size}x3 uint8, "
        f"median of {args.calls} calls\n")
  print("| augmentation | median ms/batch | min ms/batch |\n|---|---|---|")
  for name, median, fastest in rows:
    print(f"| {name} | {median:.2f} | {fastest:.2f} |")
  print(f"| added by rand_augment + random_erasing | {rows[1][1] - rows[0][1]:.2f} | |")


if __name__ == "__main__":
  main()
