"""A sweep's results: DIR/summary.csv, DIR/summary.md and DIR/summary.png.

One row per trial of DIR/sweep.json, from whatever each trial has written so far
(trial.json, run.json, metrics.jsonl, config.json), ranked by best val/top1 (the held-out
validation split); trials without a val_split can only be ranked on the test split
(eval/top1), and the summary says so.
"""
from __future__ import annotations

import csv
import json
import os
import statistics
from typing import Any

from mixer import sweep_runner, sweeps

# final/best_top1, best_step and final_top5 are on `ranked_on` (val, else test);
# final_test_top1 is always the test split's.
METRIC_COLUMNS = ("status", "ranked_on", "final_step", "final_top1", "best_top1", "best_step",
                  "final_top5", "final_test_top1", "params", "median_img_per_sec", "wall_time_s")


def _params_from_config(trial_dir: str) -> int | None:
  """Counts parameters from the run's config.json and class_names.json (shapes only)."""
  paths = [os.path.join(trial_dir, f) for f in ("config.json", "class_names.json")]
  if not all(os.path.exists(p) for p in paths):
    return None
  import ml_collections  # pylint: disable=g-import-not-at-top
  from mixer import models  # pylint: disable=g-import-not-at-top
  with open(paths[0], encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  with open(paths[1], encoding="utf-8") as f:
    num_classes = len(json.load(f)["label"])
  # platform="cpu": the count does not depend on it, and asking JAX for its backend here
  # would make this process take GPU memory that running trials need.
  return models.count_params(models.build_model(config, num_classes, platform="cpu"),
                             config.image_size)


def trial_params(trial_dir: str) -> int | None:
  """The parameter count in the run's run.json, else counted from its config; None if unknown."""
  num_params = sweep_runner.read_run(trial_dir).get("num_params")
  return int(num_params) if num_params is not None else _params_from_config(trial_dir)


def read_metrics(trial_dir: str) -> list[dict[str, float]]:
  """The run's metrics.jsonl rows so far ([] before its first log step)."""
  # Imported here: mixer.metrics imports clu, which loads TensorFlow (seconds).
  from mixer import metrics  # pylint: disable=g-import-not-at-top
  path = os.path.join(trial_dir, "metrics.jsonl")
  return metrics.read_jsonl(path) if os.path.exists(path) else []


def ranking_metric(rows: list[dict[str, float]]) -> str:
  """'val/top1' when the run has a validation split, else 'eval/top1' (the test split)."""
  return "val/top1" if any("val/top1" in r for r in rows) else "eval/top1"


def eval_curve(trial_dir: str) -> list[tuple[int, float]]:
  """(step, top1 on the ranking split) of every evaluation so far."""
  rows = read_metrics(trial_dir)
  metric = ranking_metric(rows)
  return [(int(r["step"]), r[metric]) for r in rows if metric in r]


def trial_row(workdir: str, trial: sweeps.Trial) -> dict[str, Any]:
  """The summary row of one trial; metrics it has not reached yet are None."""
  trial_dir = os.path.join(workdir, trial.name)
  state = sweep_runner.read_state(trial_dir)
  rows = read_metrics(trial_dir)
  metric = ranking_metric(rows)
  split = metric.split("/")[0]
  evals = [r for r in rows if metric in r]
  tests = [r for r in rows if "eval/top1" in r]
  speeds = [r["img_per_sec"] for r in rows if "img_per_sec" in r]
  best = max(evals, key=lambda r: r[metric]) if evals else None
  # No trial.json: never started here (pending), or run by a scheduler (--print_commands).
  status = state["status"] if state else ("unknown" if rows else "pending")
  return {
      "trial": trial.name, **trial.overrides, "status": status,
      "ranked_on": ("val" if split == "val" else "test") if evals else None,
      "final_step": evals[-1]["step"] if evals else None,
      "final_top1": evals[-1][metric] if evals else None,
      "best_top1": best[metric] if best else None,
      "best_step": best["step"] if best else None,
      "final_top5": evals[-1].get(f"{split}/top5") if evals else None,
      "final_test_top1": tests[-1]["eval/top1"] if tests else None,
      "params": trial_params(trial_dir) if os.path.isdir(trial_dir) else None,
      "median_img_per_sec": statistics.median(speeds) if speeds else None,
      "wall_time_s": state.get("wall_time_s") if state else None,
      "error": state.get("error_line") if state else None,
  }


def _text(value: Any, column: str) -> str:
  if value is None:
    return ""
  if isinstance(value, float) and column in ("final_top1", "best_top1", "final_top5",
                                             "final_test_top1"):
    return f"{value:.4f}"
  if isinstance(value, float) and column in ("median_img_per_sec", "wall_time_s"):
    return f"{value:.0f}"
  return sweeps.flag_value(value)


def _write_csv(path: str, columns: list[str], rows: list[dict[str, Any]]) -> None:
  with open(path, "w", encoding="utf-8", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    for row in rows:
      writer.writerow(["" if row.get(c) is None else row[c] for c in columns])


def _write_markdown(path: str, sweep: sweeps.Sweep, columns: list[str],
                    rows: list[dict[str, Any]]) -> None:
  counts: dict[str, int] = {}
  for row in rows:
    counts[row["status"]] = counts.get(row["status"], 0) + 1
  on_test = [row["trial"] for row in rows if row["ranked_on"] == "test"]
  ranking = ("Ranked by best val/top1 (held-out validation split)." if not on_test else
             f"Ranked on the TEST split (eval/top1) for {len(on_test)} trial(s) without a "
             "val_split: choosing among them by this table tunes on test.")
  lines = [f"# Sweep: {os.path.basename(sweep.config)}", "",
           f"{len(rows)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items())
           + ". " + ranking, "",
           "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for row in rows:
    cells = [_text(row.get(c), c).replace("|", "\\|") for c in columns]
    lines.append("| " + " | ".join(cells) + " |")
  errors = [f"- `{row['trial']}`: {row['error']}" for row in rows if row["error"]]
  if errors:
    lines += ["", "Errors (full tail in each trial's trial.json):", *errors]
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


def _write_plot(path: str, workdir: str, rows: list[dict[str, Any]]) -> None:
  """eval/top1 against step, one line per trial (Agg via Figure: no pyplot state)."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(9, 4.5), layout="constrained")
  ax = fig.add_subplot()
  for row in rows:
    curve = eval_curve(os.path.join(workdir, row["trial"]))
    if curve:
      steps, top1 = zip(*curve)
      ax.plot(steps, top1, marker="o", markersize=3, label=row["trial"])
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_xlabel("step")
  ax.set_ylabel("top1 (val where the trial has it, else test)")
  ax.set_title(f"{os.path.basename(os.path.normpath(workdir))}: top1 per trial "
               "(legend: best first)")
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
  else:
    ax.text(0.5, 0.5, "no evaluations yet", ha="center", transform=ax.transAxes)
  fig.savefig(path, dpi=120)


def summarize(workdir: str) -> list[dict[str, Any]]:
  """Writes DIR/summary.{csv,md,png}; returns the rows, best first (val/top1, else test)."""
  sweep = sweeps.load_sweep(workdir)
  rows = [trial_row(workdir, trial) for trial in sweep.trials]
  rows.sort(key=lambda r: (r["best_top1"] is None, -(r["best_top1"] or 0.0), r["trial"]))
  keys: list[str] = []
  for trial in sweep.trials:
    keys += [k for k in trial.overrides if k not in keys]
  columns = ["trial", *keys, *METRIC_COLUMNS]
  _write_csv(os.path.join(workdir, "summary.csv"), columns + ["error"], rows)
  _write_markdown(os.path.join(workdir, "summary.md"), sweep, columns, rows)
  _write_plot(os.path.join(workdir, "summary.png"), workdir, rows)
  return rows
