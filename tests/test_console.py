"""The console of a run: one line per log step, one per evaluation, no third-party chatter."""
import os
import re

import pytest

from conftest import ROOT, run_mock_train, tiny_flags
from mixer import progress

ABSL_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\] (.*)$")
OUR_FILES = {f for d in (ROOT, os.path.join(ROOT, "mixer"), os.path.join(ROOT, "tests"))
             for f in os.listdir(d) if f.endswith(".py")}


def test_smoke_run_prints_one_line_per_log_step_and_eval(tmp_path):
  proc = run_mock_train(str(tmp_path / "run"), *tiny_flags())  # 12 steps, log 3, eval 6
  lines = [ABSL_LINE.match(line) for line in proc.stderr.splitlines()]
  records = [m.groups() for m in lines if m]
  foreign = [r for r in records if r[0] == "I" and r[1] not in OUR_FILES]
  assert not foreign, foreign
  steps = [r[2] for r in records if r[2].startswith("step ")]
  assert [int(re.match(r"step (\d+)/12 ", s).group(1)) for s in steps] == [3, 6, 9, 12]
  assert all(re.search(r"\| loss \d+\.\d{3} \| top1 [\d.]+% \| lr [\d.e+-]+ \| \d+ img/s \| "
                       r"ETA \w+$", s) for s in steps), steps
  evals = [r[2] for r in records if r[2].startswith("eval step ")]
  assert len(evals) == 2 and evals[0].startswith("eval step 6 | eval top1 ")


def test_eta_ignores_a_slow_window_outside_training():
  p = progress.Progress(total_steps=1000, batch_size=100)
  for _ in range(5):
    p.record(10, 1.0)  # 0.1 s per step
  assert p.eta_seconds(500) == pytest.approx(50.0) and p.img_per_sec == pytest.approx(1000.0)
  p.record(10, 2.0)  # one slower window moves the average by a fraction only
  assert 50.0 < p.eta_seconds(500) < 70.0
  p.record(0, 30.0)  # nothing trained (e.g. a window of evaluation only): ignored
  assert p.eta_seconds(500) < 70.0


def test_durations_read_naturally():
  assert [progress.format_duration(s) for s in (42, 27 * 60, 3 * 3600 + 43 * 60, 50 * 3600)] == [
      "42s", "27m", "3h43m", "2d2h"]
