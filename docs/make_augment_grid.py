"""Draws CIFAR-100 training images as the train step augments them, to docs/augmented_examples.png.

  TFDS_DATA_DIR=/path/to/tfds python docs/make_augment_grid.py
  python docs/make_augment_grid.py --data_dir /path/to/tfds --num_ops 2 --magnitude 9 --rows 4

The top row is the originals (the first `--images` of the train split); each further row is
one independent draw of crop+flip, RandAugment(num_ops, magnitude) and random erasing
(applied, as in training, to the [-1, 1] floats; noise is clipped for display).
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir", default=os.environ.get("TFDS_DATA_DIR"))
  parser.add_argument("--images", type=int, default=16)
  parser.add_argument("--rows", type=int, default=4, help="augmented rows")
  parser.add_argument("--num_ops", type=int, default=2)
  parser.add_argument("--magnitude", type=float, default=9.0)
  parser.add_argument("--erasing", type=float, default=0.25)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=os.path.join(ROOT, "docs", "augmented_examples.png"))
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from mixer import augment, data, randaugment  # pylint: disable=g-import-not-at-top

  split = data.load_split("cifar100", f"train[:{args.images}]", args.data_dir)

  @jax.jit
  def augmented(key, images):
    k_crop, k_ra, k_erase = jax.random.split(key, 3)
    images = augment.random_crop_flip(k_crop, images)
    images = randaugment.rand_augment(k_ra, images, args.num_ops, args.magnitude)
    images = randaugment.random_erasing(k_erase, images / 127.5 - 1.0, args.erasing)
    return (images + 1.0) * 127.5

  keys = jax.random.split(jax.random.key(args.seed), args.rows)
  rows = [split.images] + [np.asarray(augmented(k, split.images)) for k in keys]
  fig = Figure(figsize=(args.images * 0.8, (args.rows + 1) * 0.9), dpi=100)
  axes = fig.subplots(args.rows + 1, args.images, squeeze=False)
  for r, row in enumerate(rows):
    for i, image in enumerate(row):
      ax = axes[r, i]
      ax.imshow(np.clip(image, 0, 255).astype(np.uint8), interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(split.class_names[split.labels[i]], fontsize=6)
    axes[r, 0].set_ylabel("original" if r == 0 else f"draw {r}", fontsize=7)
  fig.suptitle(f"crop+flip, RandAugment({args.num_ops}, {args.magnitude:g}), random erasing "
               f"{args.erasing:g}", fontsize=9)
  fig.tight_layout()
  fig.savefig(args.out)
  print(f"Wrote {args.out}")


if __name__ == "__main__":
  main()
