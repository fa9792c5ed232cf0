"""PNG figures for evaluation reports (example predictions, a confusion matrix, training
curves) and for inspect_model.py (token-mixing units, linear probes by depth).

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


# token_mixing_units: one token is TOKEN_PIXELS // (grid side) pixels wide (at least 1), cells
# are GAP pixels apart, the caption sits above the mosaic and a colour bar on its right.
TOKEN_PIXELS = 48
GAP = 2
MARGIN = 10
COLORBAR = 70
MIN_WIDTH = 560
CAPTION_LINE = 17
GAP_COLOR = 0.8  # light grey between cells


def mosaic_geometry(num_units: int, grid: tuple[int, int]) -> dict[str, int]:
  """Pixel layout of token_mixing_units' PNG: `zoom` (pixels per token), `rows`, `cols`,
  `cell` (pixels per unit, side), `mosaic_width`/`mosaic_height`, `left`/`top` (the mosaic's
  corner in the PNG), `width` and `height` of the PNG, `caption_chars` (per caption line)."""
  h, w = grid
  zoom = max(1, TOKEN_PIXELS // max(h, w))
  cols = math.ceil(math.sqrt(num_units))
  rows = math.ceil(num_units / cols)
  mosaic_width, mosaic_height = GAP + cols * (w * zoom + GAP), GAP + rows * (h * zoom + GAP)
  width = max(MIN_WIDTH, mosaic_width + 2 * MARGIN + COLORBAR)
  caption_chars = (width - 2 * MARGIN) // 7
  return dict(zoom=zoom, rows=rows, cols=cols, cell_height=h * zoom, cell_width=w * zoom,
              mosaic_width=mosaic_width, mosaic_height=mosaic_height, left=MARGIN,
              width=width, caption_chars=caption_chars)


def token_mixing_units(units: np.ndarray, caption: str, path: str) -> str:
  """Every unit (units: (U, h, w) weights on the patch grid) as a small picture, row by row
  in the given order, on a diverging map centred at zero (red > 0, blue < 0, white 0), each
  scaled by its own largest |weight|; `caption` above. The PNG's size is exactly
  mosaic_geometry's: each token a zoom x zoom square of one colour."""
  import textwrap  # pylint: disable=g-import-not-at-top
  from matplotlib import colormaps, colors  # pylint: disable=g-import-not-at-top
  from matplotlib.cm import ScalarMappable  # pylint: disable=g-import-not-at-top
  units = np.asarray(units, np.float64)
  num, h, w = units.shape
  g = mosaic_geometry(num, (h, w))
  lines = textwrap.wrap(caption, g["caption_chars"])
  top = MARGIN + CAPTION_LINE * len(lines) + 6
  height = top + g["mosaic_height"] + MARGIN
  scale = np.abs(units).reshape(num, -1).max(axis=1)
  normed = units / np.where(scale > 0, scale, 1.0)[:, None, None]
  cmap = colormaps["RdBu_r"]
  mosaic = np.full((g["mosaic_height"], g["mosaic_width"], 3), GAP_COLOR)
  for i, unit in enumerate(normed):
    r, c = divmod(i, g["cols"])
    y, x = GAP + r * (g["cell_height"] + GAP), GAP + c * (g["cell_width"] + GAP)
    rgb = cmap((unit + 1.0) / 2.0)[..., :3]
    mosaic[y:y + g["cell_height"], x:x + g["cell_width"]] = np.kron(
        rgb, np.ones((g["zoom"], g["zoom"], 1)))
  fig = Figure(figsize=(g["width"] / 100, height / 100), dpi=100)
  fig.figimage(mosaic, xo=g["left"], yo=MARGIN, origin="upper")
  fig.text(MARGIN / g["width"], 1 - MARGIN / height, "\n".join(lines), va="top", ha="left",
           fontsize=9, linespacing=1.3)
  bar_height = min(g["mosaic_height"], 240)
  cax = fig.add_axes([(g["left"] + g["mosaic_width"] + 12) / g["width"],
                      (MARGIN + g["mosaic_height"] - bar_height) / height,
                      12 / g["width"], bar_height / height])
  fig.colorbar(ScalarMappable(colors.Normalize(-1, 1), cmap), cax=cax, ticks=[-1, 0, 1])
  cax.tick_params(labelsize=7)
  cax.set_ylabel("weight / unit's max |weight|", fontsize=7)
  fig.savefig(path, dpi=100)
  return path


def probe_by_depth(names: Sequence[str], test_top1: Sequence[float], path: str,
                   caption: str, model_top1: float | None = None,
                   chance: float | None = None) -> str:
  """Linear-probe test top-1 against depth (one point per representation), with the model's
  own top-1 and chance as horizontal lines when given."""
  fig = Figure(figsize=(7.5, 4.2), layout="constrained")
  ax = fig.add_subplot()
  x = np.arange(len(names))
  ax.plot(x, 100 * np.asarray(test_top1), marker="o", color="tab:blue",
          label="linear probe (test top-1)")
  for i, value in enumerate(test_top1):
    ax.annotate(f"{100 * value:.1f}", (i, 100 * value), textcoords="offset points",
                xytext=(0, 6), ha="center", fontsize=7)
  if model_top1 is not None:
    ax.axhline(100 * model_top1, color="tab:orange", linestyle="--",
               label=f"the model's own head, one view per image ({100 * model_top1:.1f})")
  if chance is not None:
    ax.axhline(100 * chance, color="grey", linestyle=":", label=f"chance ({100 * chance:.1f})")
  ax.set_xticks(x, list(names), rotation=45 if len(names) > 10 else 0, fontsize=8)
  ax.set_ylabel("test top-1 (%)")
  ax.set_xlabel("representation (mean-pooled over tokens)")
  ax.set_ylim(0, min(100.0, 100 * max([*test_top1, model_top1 or 0.0]) * 1.2 + 5))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="best")
  fig.suptitle(caption, fontsize=9, wrap=True)
  fig.savefig(path, dpi=100)
  return path
