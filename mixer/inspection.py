"""Looking inside a trained Mixer: its token-mixing units as pictures, linear probes by depth.

`inspect_run` restores a run's parameters (`saved_runs`, or a published-layout `.npz` fitted
to the run's model by `pretrained.load_pretrained`) and writes to its output directory:
- `token_mixing_block{K}.png`: the hidden units of block K's first token-mixing Dense, each
  the weights it gives the patch grid, ordered by spatial frequency (`by_frequency`);
- `linear_probe.json` + `.png`: for the stem, each block and the pre-logits (the features
  `models.features` returns, mean-pooled over the tokens), the test top-1 of a ridge probe
  (`probe.fit_probe`) fitted on a random subset of the run's training split, its penalty
  chosen on the run's validation split (or, for a run without one, on other training
  examples, which the report says).
All features come from one jitted pass over each split (`probe.FeaturePass`).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from mixer import data, errors, models, plots, pretrained, probe, saved_runs
from mixer import workdir as layout

OUT_DIR = "inspect"  # under the workdir
PROBE_FILE = "linear_probe"
DEFAULT_BLOCKS = (0, 1)
PROBE_SEED = 0  # which training examples the probe sees
FALLBACK_VAL_EXAMPLES = 5000  # held-out training examples when the run has no val split
PROGRESS_SECONDS = 10.0


def restore(workdir: str, checkpoint: str | int = "latest", npz: str | None = None,
            parameters: str = "auto") -> tuple[ml_collections.ConfigDict, Any, str]:
  """(config, params, where the params come from in words) of a run, or of `npz` fitted to
  the model of the run's config (CheckpointError listing what does not fit)."""
  if npz is None:
    step, config, params = saved_runs.restore_params(workdir, checkpoint, parameters)
    return config, params, (f"{workdir}, step {step} "
                            f"({saved_runs.describe_parameters(config, parameters)})")
  config = layout.load_config(workdir)
  flat = pretrained.load_checkpoint(npz)
  num_classes = int(flat["head/bias"].shape[-1]) if "head/bias" in flat else 0
  model = models.build_model(config, num_classes)
  template = jax.eval_shape(lambda: models.init_params(model, config.image_size, config.seed))
  params = pretrained.load_pretrained(npz, template)  # its errors name the file
  return config, params, f"{npz} (in the model of {workdir}'s config)"


def patch_grid(config: ml_collections.ConfigDict, params: Any) -> tuple[int, int]:
  """(rows, columns) of patches the model sees."""
  side = config.image_size // params["stem"]["kernel"].shape[0]
  return side, side


def token_mixing_units(params: Any, block: int, grid: tuple[int, int]) -> np.ndarray:
  """(units, rows, columns): each hidden unit's weights in block `block`'s first token-mixing
  Dense, on the patch grid (tokens are the grid in row-major order)."""
  kernel = np.asarray(jax.device_get(params[f"MixerBlock_{block}"]["token_mixing"]["Dense_0"]
                                     ["kernel"]), np.float64)
  if kernel.shape[0] != grid[0] * grid[1]:
    raise errors.CheckpointError(f"Block {block} mixes {kernel.shape[0]} tokens, not the "
                                 f"{grid[0]}x{grid[1]} patch grid of the run's image size.")
  return kernel.T.reshape(-1, *grid)


def spatial_frequency(units: np.ndarray) -> np.ndarray:
  """Each unit's power-weighted mean spatial frequency (cycles per grid side, 0 .. ~0.7) of
  its weights minus their mean: low for smooth blobs, high for checkerboards."""
  _, h, w = units.shape
  centred = units - units.mean(axis=(1, 2), keepdims=True)
  power = np.abs(np.fft.fft2(centred)) ** 2
  radius = np.hypot(*np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij"))
  total = power.sum(axis=(1, 2))
  return (power * radius).sum(axis=(1, 2)) / np.where(total > 0, total, 1.0)


def by_frequency(units: np.ndarray) -> np.ndarray:
  """Unit indices ordered by spatial_frequency, lowest first (stable)."""
  return np.argsort(spatial_frequency(units), kind="stable")


def probe_splits(config: ml_collections.ConfigDict, examples: int, data_dir: str | None
                 ) -> tuple[dict[str, data.Split], dict[str, str]]:
  """The probe's train/val/test splits (train: `examples` random training examples) and a
  description of each."""
  data_dir = data_dir or config.data_dir
  train = data.load_split(config.dataset, config.train_split, data_dir)
  order = np.random.default_rng(PROBE_SEED).permutation(len(train))
  if config.val_split:
    val, val_what = data.load_split(config.dataset, config.val_split, data_dir), config.val_split
    take = order[:examples]
  else:
    held = min(FALLBACK_VAL_EXAMPLES, len(train) // 5)
    val = _subset(train, order[:held])
    take = order[held:held + examples]
    val_what = (f"{held} random examples of {config.train_split}, left out of the probe's "
                "training set (the run has no val_split)")
  test = data.load_split(config.dataset, config.eval_split, data_dir)
  splits = {"train": _subset(train, take), "val": val, "test": test}
  what = {"train": f"{len(take)} random examples of {config.train_split}", "val": val_what,
          "test": f"{config.eval_split} ({len(test)} examples)"}
  return splits, what


def _subset(split: data.Split, index: np.ndarray) -> data.Split:
  return data.Split(split.images[index], split.labels[index], split.class_names)


def inspect_run(workdir: str, out_dir: str | None = None, checkpoint: str | int = "latest",
                npz: str | None = None, blocks: Sequence[int] = DEFAULT_BLOCKS,
                probe_examples: int = 10000, data_dir: str | None = None,
                batch_size: int | None = None, parameters: str = "auto",
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Writes the token-mixing pictures and the linear probes (module docstring) to `out_dir`
  (default WORKDIR/inspect); returns the probe report plus `files` and `summaries` (one line
  per file written)."""
  if probe_examples < 1:
    raise errors.ConfigError(f"--probe_examples must be positive, got {probe_examples}.")
  config, params, source = restore(workdir, checkpoint, npz, parameters)
  num_blocks = len([k for k in params if k.startswith("MixerBlock_")])
  bad = [b for b in blocks if not 0 <= b < num_blocks]
  if bad:
    raise errors.ConfigError(f"--blocks {bad}: the model has blocks 0..{num_blocks - 1}.")
  out_dir = out_dir or layout.path(workdir, OUT_DIR)
  os.makedirs(out_dir, exist_ok=True)
  files, summaries = [], []
  grid = patch_grid(config, params)
  for block in blocks:
    units = token_mixing_units(params, block, grid)
    freq = spatial_frequency(units)
    order = np.argsort(freq, kind="stable")
    caption = (f"Block {block}, first token-mixing Dense: each of its {len(units)} hidden units "
               f"as the weights it gives the {grid[0]}x{grid[1]} patch grid (one square per "
               "patch; red > 0, blue < 0, white 0; each unit scaled to its own largest |weight|),"
               " ordered by spatial frequency, lowest first, row by row. "
               f"Parameters: {source}.")
    path = plots.token_mixing_units(units[order], caption,
                                     os.path.join(out_dir, f"token_mixing_block{block}.png"))
    files.append(path)
    summaries.append(f"{path}: {len(units)} units on the {grid[0]}x{grid[1]} grid, spatial "
                     f"frequency {freq.min():.2f}..{freq.max():.2f} cycles/patch")
  report = linear_probes(config, params, probe_examples, data_dir, batch_size, progress)
  report = {"source": source, **report}
  stem = os.path.join(out_dir, PROBE_FILE)
  with open(f"{stem}.json", "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  names = [layer["name"] for layer in report["layers"]]
  tops = [layer["test_top1"] for layer in report["layers"]]
  caption = (f"Where the classes become linearly separable: ridge probe on frozen mean-pooled "
             f"features of {report['train']}, penalty chosen on {report['val_split']}. "
             f"{source}")
  files += [plots.probe_by_depth(names, tops, f"{stem}.png", caption, report["model_test_top1"],
                                 1.0 / report["num_classes"]), f"{stem}.json"]
  best = int(np.argmax(tops))
  summaries.append(f"{stem}.png/.json: probe test top-1 {tops[0]:.3f} (stem) .. {tops[-1]:.3f} "
                   f"(pre_logits), best {tops[best]:.3f} at {names[best]}"
                   + (f"; the model's head {report['model_test_top1']:.3f}"
                      if report["model_test_top1"] is not None else ""))
  return dict(report, files=files, summaries=summaries)


def linear_probes(config: ml_collections.ConfigDict, params: Any, probe_examples: int,
                  data_dir: str | None = None, batch_size: int | None = None,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
  """The probe report: splits used and one entry per representation, in depth order."""
  splits, what = probe_splits(config, probe_examples, data_dir)
  num_classes = splits["train"].num_classes
  head = saved_runs.num_classes_of(params)
  model = models.build_model(config, head)
  feats, logits = {}, {}
  feature_pass = probe.FeaturePass(model, config.image_size, batch_size or config.eval_batch_size)
  for name, split in splits.items():
    clock = {"start": time.monotonic(), "told": time.monotonic()}

    def tell(done: int, total: int, name=name, clock=clock) -> None:
      now = time.monotonic()  # a line every PROGRESS_SECONDS, and when the split is done
      if progress is not None and (done == total or now - clock["told"] >= PROGRESS_SECONDS):
        clock["told"] = now
        progress(f"features of {name} ({what[name]}): {done}/{total} examples, "
                 f"{now - clock['start']:.0f} s")
    logits[name], feats[name] = feature_pass(params, split.images, tell)
  test_labels = splits["test"].labels
  layers = []
  for name in models.feature_names(model.num_blocks):
    result = probe.fit_probe(*[(feats[s][name], splits[s].labels) for s in splits],
                             num_classes=num_classes)
    layers.append({"name": name, **result})
  model_top1 = (float(np.mean(logits["test"].argmax(axis=1) == test_labels))
                if head == num_classes else None)
  return {"dataset": config.dataset, "num_classes": num_classes, "probe_examples": probe_examples,
          "train": what["train"], "val_split": what["val"], "test_split": what["test"],
          "features": "mean over tokens (pre_logits: after the pre-head LayerNorm)",
          "probe": "ridge regression on standardised features onto one-hot targets in {-1, 1} "
                   "(big_vision's few-shot evaluator); l2 from 2^-10..2^19 by val top-1",
          "model_test_top1": model_top1,
          "model_test_top1_views": "one view per image (no test-time augmentation)",
          "layers": layers}
