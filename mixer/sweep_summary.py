"""A sweep's results: DIR/summary.md, summary.csv (a row per trial, replicates grouped),
trials.csv (a row per run) and summary.png.

Replicates of a trial (the same overrides but the seed, `sweep.py --seeds=N`) form a group:
n, mean, standard deviation and 95% interval (Student t) of the final val/top1 and test
eval/top1, ranked by mean final val/top1, each group tested against the best (Welch). A
group of one run has no interval: the binomial standard error of its one evaluation stands in.
Trials without a val_split can only be ranked on the test split (eval/top1), and the summary
says so. Rows come from whatever each trial has written so far (trial.json, run.json,
metrics.jsonl, config.json).
"""
from __future__ import annotations

import csv
import json
import os
import statistics
from typing import Any

from mixer import budget, stats, sweep_runner, sweeps, workdir

# final/best_top1, best_step and final_top5 are on `ranked_on` (val, else test);
# final_test_top1 is always the test split's.
METRIC_COLUMNS = ("status", "ranked_on", "final_step", "final_top1", "best_top1", "best_step",
                  "final_top5", "final_test_top1", "params", "train_pflop",
                  "median_img_per_sec", "wall_time_s")


def _model_from_config(trial_dir: str) -> tuple[Any, Any] | None:
  """(config, model) rebuilt from the run's config.json and class_names.json, or None."""
  paths = [workdir.path(trial_dir, f) for f in (workdir.CONFIG_FILE, workdir.CLASS_NAMES_FILE)]
  if not all(os.path.exists(p) for p in paths):
    return None
  from mixer import models  # pylint: disable=g-import-not-at-top
  config = workdir.load_config(trial_dir)
  with open(paths[1], encoding="utf-8") as f:
    num_classes = len(json.load(f)["label"])
  # platform="cpu": the shapes do not depend on it, and asking JAX for its backend here
  # would make this process take GPU memory that running trials need.
  return config, models.build_model(config, num_classes, platform="cpu")


def trial_params(trial_dir: str) -> int | None:
  """The parameter count in the run's run.json, else counted from its config; None if unknown."""
  run = workdir.read_run(trial_dir)
  if run is not None:
    return int(run.num_params)
  built = _model_from_config(trial_dir)
  if built is None:
    return None
  from mixer import models  # pylint: disable=g-import-not-at-top
  return models.count_params(built[1], built[0].image_size)


def trial_pflop(trial_dir: str) -> float | None:
  """Training compute of the run's total_steps (run.json), in PFLOP; None before it started."""
  run = workdir.read_run(trial_dir)
  total_steps = run.total_steps if run else None
  built = _model_from_config(trial_dir) if total_steps else None
  if built is None:
    return None
  config, model = built
  return budget.training_pflop(model, config.image_size, config.batch_size, total_steps)


def read_metrics(trial_dir: str) -> list[dict[str, float]]:
  """The run's metrics.jsonl rows so far ([] before its first log step)."""
  # Imported here: mixer.metrics imports clu, which loads TensorFlow (seconds).
  from mixer import metrics  # pylint: disable=g-import-not-at-top
  path = workdir.path(trial_dir, workdir.METRICS_FILE)
  return metrics.read_jsonl(path) if os.path.exists(path) else []


def ranking_metric(rows: list[dict[str, float]]) -> str:
  """'val/top1' when the run has a validation split, else 'eval/top1' (the test split)."""
  return "val/top1" if any("val/top1" in r for r in rows) else "eval/top1"


def eval_curve(trial_dir: str) -> list[tuple[int, float]]:
  """(step, top1 on the ranking split) of every evaluation so far."""
  rows = read_metrics(trial_dir)
  metric = ranking_metric(rows)
  return [(int(r["step"]), r[metric]) for r in rows if metric in r]


def trial_row(sweep_dir: str, trial: sweeps.Trial) -> dict[str, Any]:
  """The summary row of one trial; metrics it has not reached yet are None."""
  trial_dir = os.path.join(sweep_dir, trial.name)
  state = sweep_runner.read_state(trial_dir)
  run = workdir.read_run(trial_dir)
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
      "trial": trial.name, **trial.overrides, "group": sweeps.group_name(trial.overrides),
      "status": status,
      # Trained to its end (whoever ran it): its final evaluation counts in the group.
      "done": bool(run) and run.status == "finished" and run.step == run.total_steps,
      "ranked_on": ("val" if split == "val" else "test") if evals else None,
      "final_step": evals[-1]["step"] if evals else None,
      "final_top1": evals[-1][metric] if evals else None,
      "best_top1": best[metric] if best else None,
      "best_step": best["step"] if best else None,
      "final_top5": evals[-1].get(f"{split}/top5") if evals else None,
      "num_examples": evals[-1].get(f"{split}/num_examples") if evals else None,
      "final_test_top1": tests[-1]["eval/top1"] if tests else None,
      "params": trial_params(trial_dir) if os.path.isdir(trial_dir) else None,
      "train_pflop": trial_pflop(trial_dir) if os.path.isdir(trial_dir) else None,
      "median_img_per_sec": statistics.median(speeds) if speeds else None,
      "wall_time_s": state.get("wall_time_s") if state else None,
      "error": state.get("error_line") if state else None,
  }


def group_rows(trials: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
  """One row per group of replicates (finished runs only), best mean final top1 first."""
  groups: dict[str, list[dict[str, Any]]] = {}
  for row in trials:
    groups.setdefault(row["group"], []).append(row)
  out = []
  for name, members in groups.items():
    done = [r for r in members if r["done"] and r["final_top1"] is not None]
    ranked, test = (stats.describe([r[c] for r in done if r[c] is not None])
                    for c in ("final_top1", "final_test_top1"))
    pflop = [r["train_pflop"] for r in done if r["train_pflop"] is not None]
    out.append({
        "group": name, **{k: members[0].get(k) for k in keys}, "runs": len(members),
        "n": ranked.n, "seeds": ",".join(sorted(str(r.get(sweeps.SEED_KEY, "")) for r in done)),
        "ranked_on": done[0]["ranked_on"] if done else None,
        "top1_mean": ranked.mean, "top1_sd": ranked.sd, "top1_ci_low": ranked.ci_low,
        "top1_ci_high": ranked.ci_high,
        # n=1: no interval; how precisely the one evaluation measured that model instead.
        "top1_binomial_se": (stats.binomial_se(done[0]["final_top1"], done[0]["num_examples"])
                             if ranked.n == 1 and done[0]["num_examples"] else None),
        "num_examples": done[0]["num_examples"] if done else None,
        "test_top1_mean": test.mean, "test_top1_sd": test.sd, "test_top1_ci_low": test.ci_low,
        "test_top1_ci_high": test.ci_high,
        "train_pflop": statistics.mean(pflop) if pflop else None,
        "values": [r["final_top1"] for r in done],
    })
  out.sort(key=lambda g: (g["top1_mean"] is None, -(g["top1_mean"] or 0.0), g["group"]))
  best = out[0] if out and out[0]["top1_mean"] is not None else None
  for rank, group in enumerate(out, 1):
    group["rank"] = rank if group["n"] else None
    group["p_vs_best"] = (None if best is None or group is best
                          else stats.welch_p(group["values"], best["values"]))
    group["verdict"] = stats.verdict(group is best, group["n"], best["n"] if best else 0,
                                     group["p_vs_best"])
  return out


PERCENT_COLUMNS = ("final_top1", "best_top1", "final_top5", "final_test_top1")


def _text(value: Any, column: str) -> str:
  if value is None:
    return ""
  if isinstance(value, float) and (column in PERCENT_COLUMNS or "top1" in column):
    return f"{value:.4f}"
  if isinstance(value, float) and column in ("median_img_per_sec", "wall_time_s"):
    return f"{value:.0f}"
  if isinstance(value, float) and column in ("p_vs_best", "train_pflop"):
    return f"{value:.3g}"
  return sweeps.flag_value(value)


def _write_csv(path: str, columns: list[str], rows: list[dict[str, Any]]) -> None:
  with open(path, "w", encoding="utf-8", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    for row in rows:
      writer.writerow(["" if row.get(c) is None else row[c] for c in columns])


def _percent(value: float | None, digits: int = 2) -> str:
  return "" if value is None else f"{100 * value:.{digits}f}"


def _interval(group: dict[str, Any], prefix: str) -> str:
  """'55.10 [54.20, 56.00]' (mean and 95% interval, %), or the mean alone."""
  mean, low, high = (group[f"{prefix}_{k}"] for k in ("mean", "ci_low", "ci_high"))
  if mean is None:
    return ""
  if low is None:
    return _percent(mean)
  return f"{_percent(mean)} [{_percent(low)}, {_percent(high)}]"


def _group_table(groups: list[dict[str, Any]], keys: list[str]) -> list[str]:
  split = next((g["ranked_on"] for g in groups if g["ranked_on"]), "val")
  head = ["rank", *keys, "n", f"{split} top1 % mean [95% CI]", "sd", "test top1 % mean [95% CI]",
          "p vs best", "verdict", "PFLOP"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for g in groups:
    sd = _percent(g["top1_sd"]) if g["top1_sd"] is not None else (
        f"n=1, one evaluation ±{_percent(g['top1_binomial_se'], 1)} (binomial SE, "
        f"{g['num_examples']} images)" if g["top1_binomial_se"] is not None else "")
    cells = [str(g["rank"] or ""), *(_text(g.get(k), k) for k in keys), str(g["n"]),
             _interval(g, "top1"), sd, _interval(g, "test_top1"),
             _text(g["p_vs_best"], "p_vs_best"), g["verdict"], _text(g["train_pflop"], "train_pflop")]
    lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
  return lines


def _write_markdown(path: str, sweep: sweeps.Sweep, columns: list[str],
                    rows: list[dict[str, Any]], groups: list[dict[str, Any]],
                    keys: list[str]) -> None:
  counts: dict[str, int] = {}
  for row in rows:
    counts[row["status"]] = counts.get(row["status"], 0) + 1
  on_test = [row["trial"] for row in rows if row["ranked_on"] == "test"]
  ranking = ("Ranked by mean final val/top1 (held-out validation split)." if not on_test else
             f"Ranked on the TEST split (eval/top1) for {len(on_test)} trial(s) without a "
             "val_split: choosing among them by this table tunes on test.")
  lines = [f"# Sweep: {os.path.basename(sweep.config)}", "",
           f"{len(rows)} runs in {len(groups)} group(s) of replicates: "
           + ", ".join(f"{n} {s}" for s, n in counts.items()) + ". " + ranking,
           "Means and 95% intervals (Student t) over each group's finished seeds; p: Welch's "
           "t-test against the best group (below 0.05: worse). A group of one run has no "
           "interval: its binomial standard error says how precisely one evaluation measured "
           "it, not how another seed would do.", "", *_group_table(groups, keys), "",
           "## Runs", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for row in rows:
    cells = [_text(row.get(c), c).replace("|", "\\|") for c in columns]
    lines.append("| " + " | ".join(cells) + " |")
  errors = [f"- `{row['trial']}`: {row['error']}" for row in rows if row["error"]]
  if errors:
    lines += ["", "Errors (full tail in each trial's trial.json):", *errors]
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


def _write_plot(path: str, sweep_dir: str, rows: list[dict[str, Any]],
                groups: list[dict[str, Any]]) -> None:
  """Left: each group's mean final top1 and 95% interval against training compute (each run
  a dot). Right: top1 against step, a line per run (Agg via Figure: no pyplot state)."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(13, 4.8), layout="constrained")
  by_compute, curves = fig.subplots(1, 2)
  for g in groups:
    if g["top1_mean"] is None or g["train_pflop"] is None:
      continue
    low, high = g["top1_ci_low"], g["top1_ci_high"]
    err = [[g["top1_mean"] - low], [high - g["top1_mean"]]] if low is not None else None
    line = by_compute.errorbar([g["train_pflop"]], [g["top1_mean"]], yerr=err, fmt="o",
                               capsize=4, label=f"{g['group']} (n={g['n']})")
    by_compute.plot([g["train_pflop"]] * len(g["values"]), g["values"], ".", alpha=0.4,
                    color=line[0].get_color())
  by_compute.set_xlabel("training compute (PFLOP)")
  by_compute.set_ylabel("final top1 (val where the runs have it, else test)")
  by_compute.set_title("mean and 95% interval over seeds (dots: runs)")
  by_compute.grid(alpha=0.3)
  if by_compute.get_legend_handles_labels()[0]:
    by_compute.legend(fontsize=7)
  for row in rows:
    curve = eval_curve(os.path.join(sweep_dir, row["trial"]))
    if curve:
      steps, top1 = zip(*curve)
      curves.plot(steps, top1, marker="o", markersize=3, label=row["trial"])
  curves.xaxis.set_major_locator(MaxNLocator(integer=True))
  curves.set_xlabel("step")
  curves.set_title(f"{os.path.basename(os.path.normpath(sweep_dir))}: top1 per run")
  curves.grid(alpha=0.3)
  if curves.get_legend_handles_labels()[0]:
    curves.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
  else:
    curves.text(0.5, 0.5, "no evaluations yet", ha="center", transform=curves.transAxes)
  fig.savefig(path, dpi=110)


GROUP_COLUMNS = ("rank", "group", "n", "seeds", "ranked_on", "top1_mean", "top1_sd",
                 "top1_ci_low", "top1_ci_high", "top1_binomial_se", "num_examples",
                 "test_top1_mean", "test_top1_sd", "test_top1_ci_low", "test_top1_ci_high",
                 "p_vs_best", "verdict", "train_pflop", "runs")


def summarize(sweep_dir: str) -> list[dict[str, Any]]:
  """Writes DIR/summary.{md,csv,png} and DIR/trials.csv; returns the runs' rows, best first
  (group_rows(rows, keys) gives the groups)."""
  sweep = sweeps.load_sweep(sweep_dir)
  rows = [trial_row(sweep_dir, trial) for trial in sweep.trials]
  rows.sort(key=lambda r: (r["best_top1"] is None, -(r["best_top1"] or 0.0), r["trial"]))
  keys: list[str] = []
  for trial in sweep.trials:
    keys += [k for k in trial.overrides if k not in keys]
  group_keys = [k for k in keys if k != sweeps.SEED_KEY]
  groups = group_rows(rows, group_keys)
  columns = ["trial", *keys, *METRIC_COLUMNS]
  _write_csv(os.path.join(sweep_dir, "trials.csv"), columns + ["error"], rows)
  _write_csv(os.path.join(sweep_dir, "summary.csv"),
             [GROUP_COLUMNS[0], GROUP_COLUMNS[1], *group_keys, *GROUP_COLUMNS[2:]], groups)
  _write_markdown(os.path.join(sweep_dir, "summary.md"), sweep, columns, rows, groups, group_keys)
  _write_plot(os.path.join(sweep_dir, "summary.png"), sweep_dir, rows, groups)
  return rows
