"""Replicates and their statistics: --seeds, grouped summaries, intervals, Welch p-values."""
import csv
import math
import os

import numpy as np
import pytest
from scipy import stats as scipy_stats

from mixer import errors, stats, sweep_runner, sweep_summary, sweeps
from sweep_helpers import CONFIG, ENV, read_text, run_sweep_cli
from test_sweeps import BASE, MOCK_TRAIN

pytestmark = pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning")


def _run(group, seed, top1, test, examples=1000):
  return {"trial": f"{group},seed={seed}", "group": group, "seed": seed, "done": True,
          "final_top1": top1, "final_test_top1": test, "num_examples": examples,
          "ranked_on": "val", "train_pflop": 0.2}


def test_group_statistics_equal_an_independent_computation():
  a, b, c = [0.552, 0.561, 0.549], [0.530, 0.541, 0.528], [0.512]
  rows = ([_run("erasing=0.25", s, v, v - 0.01) for s, v in enumerate(a)]
          + [_run("erasing=0.0", s, v, v + 0.005) for s, v in enumerate(b)]
          + [_run("patch=2", 0, c[0], 0.5, examples=5000)])
  groups = {g["group"]: g for g in sweep_summary.group_rows(rows, [])}
  assert [g["rank"] for g in sweep_summary.group_rows(rows, [])] == [1, 2, 3]

  best = groups["erasing=0.25"]
  mean, sd = sum(a) / 3, math.sqrt(sum((x - sum(a) / 3) ** 2 for x in a) / 2)
  half = scipy_stats.t.ppf(0.975, 2) * sd / math.sqrt(3)
  assert best["n"] == 3 and best["top1_mean"] == pytest.approx(mean, abs=1e-12)
  assert best["top1_sd"] == pytest.approx(sd, abs=1e-12)
  assert (best["top1_ci_low"], best["top1_ci_high"]) == pytest.approx((mean - half, mean + half))
  assert best["test_top1_mean"] == pytest.approx(mean - 0.01)
  assert best["verdict"].startswith("best") and best["p_vs_best"] is None

  # Welch by hand: t from the unpooled variances, Welch-Satterthwaite degrees of freedom.
  va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 3
  t = (np.mean(b) - np.mean(a)) / math.sqrt(va + vb)
  df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)
  second = groups["erasing=0.0"]
  assert second["p_vs_best"] == pytest.approx(2 * scipy_stats.t.sf(abs(t), df), rel=1e-9)
  assert second["p_vs_best"] < 0.05 and second["verdict"].startswith("worse than the best")

  single = groups["patch=2"]
  assert single["n"] == 1 and single["top1_sd"] is None and single["top1_ci_low"] is None
  assert single["top1_binomial_se"] == pytest.approx(math.sqrt(0.512 * 0.488 / 5000))
  assert "not testable at n=1" in single["verdict"]


def test_overlapping_groups_are_not_separable():
  rows = ([_run("A", s, v, v) for s, v in enumerate([0.55, 0.53, 0.57])]
          + [_run("B", s, v, v) for s, v in enumerate([0.54, 0.56, 0.52])])
  worse = sweep_summary.group_rows(rows, [])[1]
  assert worse["p_vs_best"] > 0.05
  assert worse["verdict"] == f"not separable from the best at n=3 (p={worse['p_vs_best']:.2f})"
  assert stats.describe([]).n == 0 and stats.welch_p([0.5], [0.4, 0.6]) is None


def test_seeds_expand_every_trial_and_name_replicates_together():
  sweep = sweeps.make_sweep(CONFIG, [{"learning_rate": 1e-3}, {"learning_rate": 4e-3}], BASE,
                            seeds=2)
  names = [t.name for t in sweep.trials]
  assert names == ["learning_rate=0.001,seed=0", "learning_rate=0.001,seed=1",
                   "learning_rate=0.004,seed=0", "learning_rate=0.004,seed=1"]
  assert [sweeps.group_name(t.overrides) for t in sweep.trials][1] == "learning_rate=0.001"
  assert sweeps.trial_name({"weight_decay": 0.1, "seed": 3}) == "weight_decay=0.1,seed=3"
  with pytest.raises(errors.UserError, match="sets seed itself"):
    sweeps.make_sweep(CONFIG, [{"seed": 1}], BASE, seeds=2)


@pytest.mark.parametrize("args,message", [
    (["--seeds=0"], "error: --seeds=0: need at least 1 replicate per trial."),
    (["--config.budget_pflop=0.1", "--config.budget_minutes=5"], "set at most one budget"),
    (["--config.budget_minutes=-2"], "config.budget_minutes=-2.0 is invalid"),
])
def test_bad_sweep_input_is_one_error_line_and_creates_nothing(tmp_path, args, message):
  workdir = tmp_path / "sweep"
  proc = run_sweep_cli(f"--config={CONFIG}", f"--workdir={workdir}",
                       "--sweep=learning_rate=[1e-3]", *args)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("error:") and message in lines[-1], proc.stderr[-2000:]
  assert not workdir.exists()


def test_summarize_of_a_directory_without_a_sweep_is_one_error_line(tmp_path):
  for workdir in (tmp_path / "missing", tmp_path):
    proc = run_sweep_cli(f"--workdir={workdir}", "--summarize")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: No sweep.json in ")


def test_two_trials_two_seeds_group_skip_and_summarize_again(tmp_path):
  workdir = str(tmp_path / "sweep")
  sweep = sweeps.make_sweep(CONFIG, [{"learning_rate": 1e-3}, {"learning_rate": 4e-3}], BASE,
                            train_script=MOCK_TRAIN, seeds=2)
  first = sweep_runner.run_sweep(sweep, workdir, parallel=2, env=ENV)
  assert list(first.values()) == ["finished"] * 4
  sweep_summary.summarize(workdir)
  with open(os.path.join(workdir, "summary.csv"), encoding="utf-8") as f:
    groups = list(csv.DictReader(f))
  assert sorted(g["group"] for g in groups) == ["learning_rate=0.001", "learning_rate=0.004"]
  for g in groups:
    assert g["n"] == "2" and g["seeds"] == "0,1"
    values = []
    for seed in (0, 1):
      with open(os.path.join(workdir, f"{g['group']},seed={seed}", "run.json"),
                encoding="utf-8") as f:
        values.append(__import__("json").load(f)["metrics"]["eval/top1"])
    assert float(g["top1_mean"]) == pytest.approx(np.mean(values), abs=1e-4)
    if values[0] != values[1]:
      assert float(g["top1_ci_low"]) < float(g["top1_mean"]) < float(g["top1_ci_high"])
    assert float(g["train_pflop"]) > 0
  assert groups[0]["verdict"].startswith("best") and groups[1]["p_vs_best"] != ""
  markdown = read_text(os.path.join(workdir, "summary.md"))
  assert "4 runs in 2 group(s) of replicates: 4 finished" in markdown
  summary_before = read_text(os.path.join(workdir, "summary.csv"))

  # The same command again skips every run; --summarize rebuilds the same table.
  logs = {t.name: read_text(os.path.join(workdir, t.name, "train.log")) for t in sweep.trials}
  again = sweep_runner.run_sweep(sweep, workdir, parallel=2, env=ENV)
  assert list(again.values()) == ["finished"] * 4
  assert logs == {t.name: read_text(os.path.join(workdir, t.name, "train.log"))
                  for t in sweep.trials}
  os.remove(os.path.join(workdir, "summary.csv"))
  proc = run_sweep_cli(f"--workdir={workdir}", "--summarize")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert read_text(os.path.join(workdir, "summary.csv")) == summary_before


def test_print_commands_with_seeds_gives_one_command_per_replicate(tmp_path):
  proc = run_sweep_cli(f"--config={CONFIG}", f"--workdir={tmp_path}",
                       "--sweep=learning_rate=[1e-3,4e-3]", "--seeds=3", "--print_commands")
  assert proc.returncode == 0, proc.stderr[-2000:]
  commands = proc.stdout.strip().splitlines()
  assert len(commands) == 6
  assert sum("--config.seed=2" in c for c in commands) == 2
  assert sum("learning_rate=0.004,seed=1" in c for c in commands) == 1
