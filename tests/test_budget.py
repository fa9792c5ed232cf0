"""Compute budgets: budget_pflop's step count, budget_minutes' one decision, bad budgets."""
import json
import os

import flax
import numpy as np
import pytest

from conftest import run_mock_train, tiny_config
from mixer import budget, config_lib, models, stop_signal, train_lib
from mixer.checkpoints import Checkpoints


def test_budget_pflop_gives_the_step_count_computed_by_hand():
  # Mixer-Ti/4 at 32px, 100 classes: 64 tokens of 4x4x3 pixels, width 128, 8 blocks, token
  # MLP 64, channel MLP 512. Forward FLOPs per image (2 per multiply-add):
  stem = 2 * 64 * 48 * 128
  token_mixing = 8 * 2 * (2 * 128 * 64 * 64)
  channel_mixing = 8 * 2 * (2 * 64 * 128 * 512)
  head = 2 * 128 * 100
  per_step = 3 * (stem + token_mixing + channel_mixing + head) * 128  # batch 128
  assert per_step == 58_293_878_784
  model = models.create_model("Ti/4", 100)
  assert budget.steps_for_pflop(0.2, model, 32, 128) == 3430 == int(0.2e15 // per_step)
  assert budget.training_pflop(model, 32, 128, 3430) == pytest.approx(3430 * per_step / 1e15)
  with pytest.raises(ValueError, match="less than one training step"):
    budget.steps_for_pflop(1e-5, model, 32, 128)


def test_minutes_plan_fits_steps_and_evaluations_in_the_budget():
  # 60 s - 10 s spent - reserve (10 s + 2% of 60 s) leaves 38.8 s: 139 steps of 0.25 s and
  # 2 evaluations (steps 100 and 139) of 2 s take 38.75 s; 140 would take 39 s.
  plan = budget.plan_minutes(1.0, elapsed_s=10.0, step_s=0.25, eval_s=2.0, compile_s=0.0,
                             eval_every=100)
  assert plan.total_steps == 139
  assert budget.count_events(141, 100) == 2 and budget.count_events(200, 100) == 2
  with pytest.raises(ValueError, match="leaves no time to train"):
    budget.plan_minutes(0.2, elapsed_s=10.0, step_s=0.25, eval_s=2.0, compile_s=0.0,
                        eval_every=100)
  # A final-only evaluation of 5 s leaves 33.8 s: 119 steps and 2 evaluations take 33.75 s.
  plan = budget.plan_minutes(1.0, elapsed_s=10.0, step_s=0.25, eval_s=2.0, compile_s=0.0,
                             eval_every=100, final_eval_s=5.0)
  assert plan.total_steps == 119 and plan.final_eval_s == 5.0
  assert "(+5.0 s at the end)" in plan.describe(128, 100)


def test_eval_split_only_at_end_scores_test_once_and_val_every_time(tmp_path):
  from conftest import read_metrics, sliced_mock_cifar  # pylint: disable=g-import-not-at-top
  config = tiny_config(eval_split_only_at_end=True, total_steps=6, eval_every_steps=2,
                       train_split="train[:75%]", val_split="train[75%:]")
  with sliced_mock_cifar():
    result = train_lib.train_and_evaluate(config, str(tmp_path / "run"))
  rows = read_metrics(str(tmp_path / "run"))
  assert [r["step"] for r in rows if "val/top1" in r] == [2, 4, 6]
  assert [r["step"] for r in rows if "eval/top1" in r] == [6]
  assert "eval/top1" in result.metrics and "val/top1" in result.metrics


def test_budget_pflop_run_trains_that_many_steps(tmp_path, mock_cifar):
  config = tiny_config(budget_pflop=1e-6, total_steps=12)
  result = train_lib.train_and_evaluate(config, str(tmp_path))
  model = models.build_model(config, 100, platform="cpu")
  expected = budget.steps_for_pflop(1e-6, model, config.image_size, config.batch_size)
  assert result.total_steps == result.step == expected != 12


class FakeClock:
  """A second passes at every reading; the process started at 0."""

  def __init__(self):
    self.t = 0.0

  def __call__(self):
    self.t += 1.0
    return self.t


def _params(workdir):
  manager = Checkpoints(workdir, read_only=True)
  step = manager.latest_step()
  return step, flax.traverse_util.flatten_dict(manager.restore(step)["params"], sep="/")


@pytest.mark.parametrize("warmup_epochs,decided_at,stop_at", [
    (0.5, 0, 4),  # a 2-step warmup: the rate is timed on a copy of the state, then discarded
    (4.0, 12, 13),  # a 16-step warmup: the run's own first steps are timed
])
def test_budget_minutes_decides_once_records_and_resumes_exactly(
    tmp_path, mock_cifar, monkeypatch, warmup_epochs, decided_at, stop_at):
  clock = FakeClock()
  monkeypatch.setattr(budget, "now", clock)
  monkeypatch.setattr(budget, "process_start", lambda: 0.0)
  monkeypatch.setattr(budget, "WINDOW_SECONDS", 3.0)
  monkeypatch.setattr(budget, "COPY_WINDOW_SECONDS", 3.0)
  overrides = dict(budget_minutes=1.0, eval_every_steps=1000, checkpoint_every_steps=4,
                   warmup_epochs=warmup_epochs)
  workdir = str(tmp_path / "budget")
  # Stopped (as by SIGTERM) after the decision: it is recorded.
  monkeypatch.setattr(stop_signal.StopSignal, "agreed", lambda self, step: step == stop_at)
  stopped = train_lib.train_and_evaluate(tiny_config(**overrides), workdir)
  assert stopped.status == "stopped" and stopped.step == stop_at
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    decision = json.load(f)["budget"]
  assert decision["decided_at_step"] == decided_at
  if decided_at == 0:
    # The copy: 3 log intervals of 3 steps in 3 fake seconds; the compiling step took 1 s.
    assert decision["step_s"] == pytest.approx(1 / 3)
    assert decision["compile_s"] == pytest.approx(2 / 3)
  replanned = budget.plan_minutes(1.0, decision["elapsed_s"], decision["step_s"],
                                  decision["eval_s"], decision["compile_s"], 1000, decided_at)
  total = decision["total_steps"]
  assert total == replanned.total_steps > stop_at and stopped.total_steps == total
  with open(os.path.join(workdir, "config_history.jsonl"), encoding="utf-8") as f:
    history = [json.loads(line) for line in f]
  assert [h["budget"]["total_steps"] for h in history if "budget" in h] == [total]

  # The resume reads the decision and never measures (the clock would fail it).
  monkeypatch.setattr(budget, "now", lambda: pytest.fail("measured again on resume"))
  monkeypatch.setattr(stop_signal.StopSignal, "agreed", lambda self, step: False)
  # Resumed without periodic saves (a save may change on resume; each costs ~0.2 s).
  overrides["checkpoint_every_steps"] = 10_000
  resumed = train_lib.train_and_evaluate(tiny_config(**overrides), workdir)
  assert resumed.status == "finished" and resumed.step == total
  # Bit-exact with a run given total_steps: the timed steps were discarded, or were warmup
  # steps, whose learning rates do not depend on the length.
  plain = str(tmp_path / "plain")
  train_lib.train_and_evaluate(tiny_config(total_steps=total, eval_every_steps=1000,
                                           checkpoint_every_steps=10_000,
                                           warmup_epochs=warmup_epochs), plain)
  (step_a, a), (step_b, b) = _params(workdir), _params(plain)
  assert step_a == step_b == total and a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("flags,message", [
    (["--config.budget_pflop=0.1", "--config.budget_minutes=5"], "set at most one budget"),
    (["--config.budget_minutes=-1"], "config.budget_minutes=-1.0 is invalid"),
    (["--config.budget_pflop=-0.5"], "config.budget_pflop=-0.5 is invalid"),
    (["--config.total_steps=-5"], "config.total_steps=-5 is invalid"),
    (["--config.budget_pflop=3e-4", "--config.warmup_epochs=100"], "warmup_epochs=100"),
])
def test_bad_budget_is_one_error_line_and_creates_nothing(tmp_path, flags, message):
  workdir = tmp_path / "run"
  proc = run_mock_train(workdir, *flags, check=False)
  assert proc.returncode != 0
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not workdir.exists()


def test_smoke_argument_turns_budgets_off():
  from configs import cifar100_cpu_hour  # pylint: disable=g-import-not-at-top
  assert cifar100_cpu_hour.get_config().budget_minutes > 0
  smoke = cifar100_cpu_hour.get_config("smoke")
  assert not config_lib.budget_set(smoke) and smoke.total_steps == 60
