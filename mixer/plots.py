"""PNG figures for evaluation reports: example predictions, a confusion matrix, training curves.

Figures are built with `matplotlib.figure.Figure` and rendered by the Agg canvas, so no
GUI backend or global pyplot state is involved (safe in scripts, tests and threads).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

RIGHT_COLOR = "#1a7f37"  # green
WRONG_COLOR = "#cf222e"  # red


def prediction_grid(images: np.ndarray, labels: Sequence[int], predictions: Sequence[int],
                    class_names: Sequence[str], path: str, columns: int = 8) -> str:
  """Images with their predicted class as title: green when right, red (and the truth) when wrong.

  `images` are uint8 (N, H, W, 3); every image given is drawn.
  """
  count = len(images)
  rows = max(1, math.ceil(count / columns))
  fig = Figure(figsize=(1.9 * columns, 2.1 * rows + 0.6), layout="constrained")
  right = sum(int(p == t) for p, t in zip(predictions, labels))
  fig.suptitle(f"Predictions on the first {count} examples: {right} right (green), "
               f"{count - right} wrong (red, true class in brackets)", fontsize=11)
  for i in range(rows * columns):
    ax = fig.add_subplot(rows, columns, i + 1)
    ax.axis("off")
    if i >= count:
      continue
    ax.imshow(images[i], interpolation="nearest")
    pred, true = int(predictions[i]), int(labels[i])
    if pred == true:
      ax.set_title(class_names[pred], color=RIGHT_COLOR, fontsize=9)
    else:
      ax.set_title(f"{class_names[pred]}\n[{class_names[true]}]", color=WRONG_COLOR, fontsize=9)
  fig.savefig(path, dpi=100)
  return path


def confusion_matrix(true: Sequence[int], pred: Sequence[int], names: Sequence[str],
                     path: str, title: str = "Superclass confusion") -> str:
  """Row-normalised confusion matrix (rows: true class, columns: predicted), in percent."""
  n = len(names)
  counts = np.zeros((n, n), np.int64)
  np.add.at(counts, (np.asarray(true, np.int64), np.asarray(pred, np.int64)), 1)
  rows = counts.sum(axis=1, keepdims=True)
  percent = 100.0 * counts / np.maximum(rows, 1)
  size = max(6.0, 0.42 * n + 3.0)
  fig = Figure(figsize=(size + 1.5, size), layout="constrained")
  ax = fig.add_subplot()
  image = ax.imshow(percent, cmap="Blues", vmin=0, vmax=100)
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="% of the true class's examples")
  ax.set_xticks(range(n), [str(x) for x in names], rotation=90, fontsize=8)
  ax.set_yticks(range(n), [f"{name} ({rows[i, 0]})" for i, name in enumerate(names)], fontsize=8)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true (examples)")
  accuracy = np.trace(counts) / max(counts.sum(), 1)
  ax.set_title(f"{title}: {100 * accuracy:.1f}% on the diagonal", fontsize=11)
  for i in range(n):
    for j in range(n):
      if counts[i, j]:
        ax.text(j, i, f"{percent[i, j]:.0f}", ha="center", va="center", fontsize=6,
                color="white" if percent[i, j] > 50 else "black")
  fig.savefig(path, dpi=100)
  return path


def _series(rows: Sequence[Mapping[str, float]], name: str) -> tuple[list[int], list[float]]:
  points = sorted((int(r["step"]), float(r[name])) for r in rows if name in r)
  return [s for s, _ in points], [v for _, v in points]


def training_curves(metrics_rows: Sequence[Mapping[str, float]], path: str) -> str:
  """Loss and top-1 against step, train, val and eval (test), from metrics.jsonl rows."""
  fig = Figure(figsize=(12, 4.5), layout="constrained")
  panels = [("loss", "Loss"), ("top1", "Top-1 accuracy")]
  for k, (metric, label) in enumerate(panels):
    ax = fig.add_subplot(1, 2, k + 1)
    for prefix, name, style in (
        ("train", "train", dict(color="tab:blue", linewidth=1.2)),
        ("val", "val", dict(color="tab:green", marker="s", linewidth=1.5)),
        ("eval", "test", dict(color="tab:orange", marker="o", linewidth=1.5))):
      steps, values = _series(metrics_rows, f"{prefix}/{metric}")
      if steps:
        ax.plot(steps, values, label=f"{name} (step {steps[-1]}: {values[-1]:.4g})", **style)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_title(label)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend()
  fig.savefig(path, dpi=100)
  return path
