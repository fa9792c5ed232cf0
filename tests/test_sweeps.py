"""Sweeps: expansion, --sweep parsing, names, validation, and trials run as subprocesses.

One module fixture runs a 3-trial sweep under mock data (two 4-step trials and one that
fails at run time), makes one trial look interrupted, and runs the two good trials again.
"""
import csv
import dataclasses
import json
import os
import shlex
import shutil
import sys
import types

import pytest

from conftest import ROOT, TINY, tiny_config
from mixer import count_params, errors, models, sweep_runner, sweep_summary, sweeps
from sweep_helpers import CONFIG, ENV, read_text, run_sweep_cli, state

MOCK_TRAIN = os.path.join(ROOT, "tests", "mock_train.py")
# Evaluated and saved at steps 2 and 4; a trial takes ~10 s of CPU, mostly start-up and
# compilation (mixup, cutmix, dropout and stochastic depth would add ~5 s to compile).
BASE = {**TINY, "total_steps": 4, "log_every_steps": 2, "eval_every_steps": 2,
        "checkpoint_every_steps": 2, "mixup_alpha": 0.0, "cutmix_alpha": 0.0,
        "model.dropout": 0.0, "model.stoch_depth": 0.0, "augment": False}
TRIALS = [{"learning_rate": 1e-3}, {"learning_rate": 4e-3},
          {"learning_rate": 1e-3, "dataset": "no_such_dataset"}]  # valid, fails when run
FAILING = "dataset=no_such_dataset,learning_rate=0.001"
# Trials start with a preexec_fn, so Python forks; JAX warns when it runs threads in the
# forking process. It does in this test process, not in sweep.py (tested below).
pytestmark = pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning")


# ---------------------------------------------------------------------------------------
# Pure: expansion, parsing, names, validation.

def test_product_zipped_cross():
  assert sweeps.product(learning_rate=[1, 2], seed=[0, 1]) == [
      {"learning_rate": 1, "seed": 0}, {"learning_rate": 1, "seed": 1},
      {"learning_rate": 2, "seed": 0}, {"learning_rate": 2, "seed": 1}]
  assert sweeps.product({"model.variant": ["S/4", "B/4"]}) == [
      {"model.variant": "S/4"}, {"model.variant": "B/4"}]
  assert sweeps.zipped(learning_rate=[1, 2], warmup_epochs=[5, 10]) == [
      {"learning_rate": 1, "warmup_epochs": 5}, {"learning_rate": 2, "warmup_epochs": 10}]
  assert sweeps.cross(sweeps.zipped(a=[1, 2], b=[3, 4]), sweeps.product(c=[5, 6])) == [
      {"a": 1, "b": 3, "c": 5}, {"a": 1, "b": 3, "c": 6},
      {"a": 2, "b": 4, "c": 5}, {"a": 2, "b": 4, "c": 6}]
  with pytest.raises(errors.UserError, match="equal length"):
    sweeps.zipped(a=[1, 2], b=[3])
  with pytest.raises(errors.UserError, match="'a' needs a list"):
    sweeps.product(a="S/4")
  with pytest.raises(errors.UserError, match=r"\['a'\] appear in more than one"):
    sweeps.cross([{"a": 1}], [{"a": 2}])


def test_parse_sweep_flag_is_a_product_of_literals():
  assert sweeps.parse_sweep_flag("learning_rate=[1e-3,3e-3] model.variant=[S/4,B/4]") == [
      {"learning_rate": 0.001, "model.variant": "S/4"},
      {"learning_rate": 0.001, "model.variant": "B/4"},
      {"learning_rate": 0.003, "model.variant": "S/4"},
      {"learning_rate": 0.003, "model.variant": "B/4"}]
  trials = sweeps.parse_sweep_flag("augment=[True, False]  seed=3 data_dir=['/a, b',None]")
  assert len(trials) == 4
  assert trials[0] == {"augment": True, "seed": 3, "data_dir": "/a, b"}
  assert trials[1]["data_dir"] is None and trials[2]["augment"] is False
  assert isinstance(trials[0]["seed"], int)


@pytest.mark.parametrize("text,match", [
    ("learning_rate", "expected key="), ("learning_rate=[]", "no values"),
    ("seed=[1] seed=[2]", "'seed' is given twice"), ("seed=[1,2", "Unclosed"),
    ("seed=[1,,2]", "empty value"), ("", "empty"), ("9lives=[1]", "expected key="),
])
def test_parse_sweep_flag_errors(text, match):
  with pytest.raises(errors.UserError, match=match):
    sweeps.parse_sweep_flag(text)


def test_trial_names_are_readable_safe_and_stable():
  name = sweeps.trial_name({"model.variant": "B/4", "learning_rate": 0.003})
  assert name == "learning_rate=0.003,model.variant=B-4"  # keys sorted, '/' replaced
  assert sweeps.trial_name({"learning_rate": 0.003, "model.variant": "B/4"}) == name
  assert sweeps.trial_name({"data_dir": "/x y/$HOME,z"}) == "data_dir=-x_y-_HOME_z"
  assert sweeps.trial_name({"learning_rate": 1e-5, "augment": False}) == (
      "augment=False,learning_rate=1e-05")
  assert sweeps.trial_name({}) == "base"
  long = {"data_dir": "d" * 400}
  assert len(sweeps.trial_name(long)) == sweeps.MAX_NAME_CHARS
  assert sweeps.trial_name(long) == sweeps.trial_name(dict(long))
  assert sweeps.trial_name(long) != sweeps.trial_name({"data_dir": "d" * 399})


def test_config_get_sweep_and_command_line_replaces_it():
  from_config = sweeps.make_sweep(CONFIG)
  assert [t.name for t in from_config.trials] == [
      f"learning_rate={lr},weight_decay={wd}"
      for lr in (0.001, 0.002, 0.004) for wd in (0.01, 0.05)]
  assert from_config.config == CONFIG and from_config.train_script == sweeps.TRAIN_SCRIPT
  given = sweeps.make_sweep(CONFIG, sweeps.parse_sweep_flag("seed=[1,2]"))
  assert [t.overrides for t in given.trials] == [{"seed": 1}, {"seed": 2}]


@pytest.mark.parametrize("trials,base,match", [
    ([{"seed": 1}, {"learning_rat": 1e-3}], {}, r"trial 1 \(learning_rat=0.001\): unknown "
                                                r"config key 'learning_rat'"),
    ([{"model.varient": "S/4"}], {}, "unknown config key 'model.varient'"),
    ([{"model": 3}], {}, "'model' is a group of keys"),
    ([{"learning_rate": "fast"}], {}, r"--config.learning_rate=fast: could not convert"),
    ([{"total_steps": 0.5}], {}, r"--config.total_steps=0.5"),
    ([{"optimizer": "adamx"}], {}, r"config.optimizer='adamx' is invalid"),
    ([{"seed": 1}, {"model.variant": "Z/4"}], {}, r"trial 1 .*config.model.variant"),
    ([{"data_dir": None}], {}, r"config.data_dir=None would reach train.py as 'None'"),
    ([{"data_dir": 5}], {}, r"give a str value"),
    ([{"seed": 1}], {"batch_siz": 8}, "base overrides: unknown config key 'batch_siz'"),
    ([{"grad_accum_steps": 3}], {"batch_size": 32}, r"config.grad_accum_steps=3"),
    ([{"model.variant": "S/4"}, {"model.variant": "S-4"}], {}, "same directory name"),
    ([{}, {"learning_rate": 2e-3}], {}, r"trial 1 \(learning_rate=0.002\) trains the same "
                                        r"config as trial 0 \(base\)"),
])
def test_every_trial_is_validated_before_anything_runs(trials, base, match):
  with pytest.raises(errors.UserError, match=match):
    sweeps.make_sweep(CONFIG, trials, base)


def test_device_envs_split_gpus_evenly():
  assert sweep_runner.device_envs(2, []) == [{}, {}]
  assert sweep_runner.device_envs(2, ["0", "1", "2", "3"]) == [
      {"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}]
  assert [e["CUDA_VISIBLE_DEVICES"] for e in sweep_runner.device_envs(3, list("0123"))] == [
      "0", "1", "2"]
  with pytest.raises(errors.UserError, match="needs at least 4 GPUs; found 2"):
    sweep_runner.device_envs(4, ["0", "1"])
  assert sweep_runner.visible_gpus({"CUDA_VISIBLE_DEVICES": "3, 5"}) == ["3", "5"]
  assert sweep_runner.visible_gpus({"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "0"}) == []


def test_sweep_json_grows_but_keeps_its_config(tmp_path):
  first = sweeps.make_sweep(CONFIG, [{"seed": 1}], {"total_steps": 4})
  sweeps.save_sweep(first, str(tmp_path))
  more = sweeps.make_sweep(CONFIG, [{"seed": 2}, {"seed": 1}], {"total_steps": 4})
  merged = sweeps.save_sweep(more, str(tmp_path))
  assert [t.name for t in merged.trials] == ["seed=1", "seed=2"]
  assert sweeps.load_sweep(str(tmp_path)) == merged
  other = sweeps.make_sweep(CONFIG, [{"seed": 1}], {"total_steps": 5})
  with pytest.raises(errors.UserError, match="base_overrides.*use another --workdir"):
    sweeps.save_sweep(other, str(tmp_path))


def test_params_counted_from_config_without_a_log(tmp_path):
  config = tiny_config()
  with open(tmp_path / "config.json", "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort())
  with open(tmp_path / "class_names.json", "w", encoding="utf-8") as f:
    json.dump({"label": [str(i) for i in range(10)]}, f)
  expected = count_params(models.build_model(config, 10), config.image_size)
  assert sweep_summary.trial_params(str(tmp_path)) == expected


# ---------------------------------------------------------------------------------------
# Command line: nothing runs on errors or with --print_commands.

def test_cli_invalid_trial_fails_before_anything_runs(tmp_path):
  workdir = tmp_path / "sweep"
  proc = run_sweep_cli(f"--config={CONFIG}", f"--workdir={workdir}",
                       "--sweep=learning_rate=[1e-3,2e-3] weight_decay=[0.1,-1.0]")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr  # a user error: one line
  assert "config.weight_decay=-1.0 is invalid" in proc.stderr.strip().splitlines()[-1]
  assert "trial 1 (learning_rate=0.001,weight_decay=-1.0)" in proc.stderr
  assert not workdir.exists()


def test_print_commands_prints_one_command_per_trial_and_runs_nothing(tmp_path):
  workdir = tmp_path / "sweep"
  proc = run_sweep_cli(f"--config={CONFIG}", f"--workdir={workdir}", "--config.total_steps=7",
                       "--sweep=learning_rate=[1e-3,3e-3] model.variant=[Ti/8,S/8]",
                       "--print_commands")
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 4
  argv = shlex.split(lines[3])
  assert argv[1:] == [os.path.join(ROOT, "train.py"), f"--config={CONFIG}",
                      f"--workdir={workdir}/learning_rate=0.003,model.variant=S-8",
                      "--config.total_steps=7", "--config.learning_rate=0.003",
                      "--config.model.variant=S/8"]
  assert os.listdir(workdir) == ["sweep.json"]  # for --summarize once the runs are done


# ---------------------------------------------------------------------------------------
# Running: one sweep, run twice.

@pytest.fixture(scope="module")
def ran(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sweep"))
  sweep = sweeps.make_sweep(CONFIG, TRIALS, BASE, train_script=MOCK_TRAIN)
  names = [t.name for t in sweep.trials]
  first = sweep_runner.run_sweep(sweep, workdir, parallel=2, env=ENV)
  first_states = {name: state(workdir, name) for name in names}
  first_log = read_text(os.path.join(workdir, names[0], sweep_runner.LOG_FILE))

  # Make trial 1 look interrupted after its step-2 checkpoint (sweep killed mid-run).
  interrupted = os.path.join(workdir, names[1])
  shutil.rmtree(os.path.join(interrupted, "checkpoints", "4"))
  running = dict(state(workdir, names[1]), status="running")
  with open(os.path.join(interrupted, sweep_runner.TRIAL_FILE), "w", encoding="utf-8") as f:
    json.dump(running, f)
  step2_rows = [line for line in read_text(os.path.join(interrupted, "metrics.jsonl"))
                .splitlines() if json.loads(line)["step"] == 2]

  # The failed trial would be tried again too; left out to keep this file fast.
  second = sweep_runner.run_sweep(dataclasses.replace(sweep, trials=sweep.trials[:2]), workdir,
                                  parallel=2, env=ENV)
  rows = sweep_summary.summarize(workdir)
  return types.SimpleNamespace(workdir=workdir, names=names, first=first, second=second,
                               first_states=first_states, first_log=first_log,
                               step2_rows=step2_rows, rows=rows)


def test_trials_run_with_their_overrides_and_record_their_command(ran):
  assert ran.names == ["learning_rate=0.001", "learning_rate=0.004", FAILING]
  assert ran.first == {ran.names[0]: "finished", ran.names[1]: "finished", FAILING: "failed"}
  for name, lr in [(ran.names[0], 1e-3), (ran.names[1], 4e-3)]:
    first = ran.first_states[name]
    assert first["status"] == "finished" and first["returncode"] == 0
    assert first["wall_time_s"] > 0 and first["error"] is None
    argv = shlex.split(first["command"])
    assert argv[:2] == [sys.executable, MOCK_TRAIN]
    assert f"--workdir={os.path.join(ran.workdir, name)}" in argv
    assert f"--config.learning_rate={lr!r}" in argv and "--config.total_steps=4" in argv
    with open(os.path.join(ran.workdir, name, "config.json"), encoding="utf-8") as f:
      assert json.load(f)["learning_rate"] == lr  # the override reached the run


def test_failed_trial_is_recorded_and_the_sweep_goes_on(ran):
  failed = ran.first_states[FAILING]
  assert failed["status"] == "failed" and failed["returncode"] != 0
  assert "no_such_dataset" in failed["error"] and len(failed["error"]) <= 4000
  # train.py ends a user error with one `error:` line (mixer.cli_errors), no traceback.
  assert failed["error_line"].startswith("error: Unknown dataset 'no_such_dataset'")
  line = sweep_runner.report_line(ran.workdir, ran.first)
  assert "3 trials: 2 finished, 1 failed." in line and f"failed: {FAILING}: error: Unknown dataset" in line


def test_rerun_skips_finished_trials(ran):
  assert ran.second[ran.names[0]] == "finished"
  assert state(ran.workdir, ran.names[0]) == ran.first_states[ran.names[0]]
  assert read_text(os.path.join(ran.workdir, ran.names[0], "train.log")) == ran.first_log


def test_rerun_resumes_an_interrupted_trial(ran):
  trial_dir = os.path.join(ran.workdir, ran.names[1])
  assert ran.second[ran.names[1]] == "finished"
  resumed = state(ran.workdir, ran.names[1])
  assert resumed["attempts"] == 2 and resumed["wall_time_s"] > (
      ran.first_states[ran.names[1]]["wall_time_s"])
  last_attempt = read_text(os.path.join(trial_dir, "train.log")).split("=== attempt 2")[1]
  assert "Resuming from the checkpoint at step 2" in last_attempt
  lines = read_text(os.path.join(trial_dir, "metrics.jsonl")).splitlines()
  # A restart would have rewritten the step-2 rows (new timings); a resume keeps them.
  assert [line for line in lines if json.loads(line)["step"] == 2] == ran.step2_rows
  assert [json.loads(line)["step"] for line in lines if "eval/top1" in line] == [2, 4]
  assert sorted(os.listdir(os.path.join(trial_dir, "checkpoints"))) == ["2", "4"]


def test_summary_rows_sorted_by_best_top1_with_all_columns(ran):
  rows = ran.rows
  assert [r["trial"] for r in rows][-1] == FAILING
  best = [r["best_top1"] for r in rows[:2]]
  assert best == sorted(best, reverse=True) and all(0 <= b <= 1 for b in best)
  expected_params = count_params(models.build_model(tiny_config(), 100), 32)
  for row in rows[:2]:
    assert row["status"] == "finished" and row["final_step"] == 4
    assert row["best_top1"] >= row["final_top1"] and 0 <= row["final_top5"] <= 1
    assert row["params"] == expected_params and row["median_img_per_sec"] > 0
    assert row["wall_time_s"] > 0
  assert rows[2]["status"] == "failed" and rows[2]["best_top1"] is None

  with open(os.path.join(ran.workdir, "trials.csv"), encoding="utf-8") as f:
    table = list(csv.DictReader(f))
  assert list(table[0]) == ["trial", "learning_rate", "dataset", *sweep_summary.METRIC_COLUMNS,
                            "error"]
  assert [r["trial"] for r in table] == [r["trial"] for r in rows]
  assert table[2]["best_top1"] == "" and "Unknown dataset" in table[2]["error"]
  markdown = read_text(os.path.join(ran.workdir, "summary.md"))
  assert "3 runs in 3 group(s) of replicates: 2 finished, 1 failed" in markdown
  assert "| trial | learning_rate | dataset | status |" in markdown
  assert f"| {rows[0]['trial']} | " in markdown and "Unknown dataset" in markdown
  assert os.path.getsize(os.path.join(ran.workdir, "summary.png")) > 10_000


def test_summarize_from_the_command_line_needs_only_the_workdir(ran):
  csv_before = read_text(os.path.join(ran.workdir, "summary.csv"))
  for name in ("summary.csv", "summary.md", "summary.png"):
    os.remove(os.path.join(ran.workdir, name))
  proc = run_sweep_cli(f"--workdir={ran.workdir}", "--summarize")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert read_text(os.path.join(ran.workdir, "summary.csv")) == csv_before
  assert os.path.exists(os.path.join(ran.workdir, "summary.png"))



@pytest.mark.parametrize("config_file", sorted(
    name for name in os.listdir(os.path.join(ROOT, "configs"))
    if "def get_sweep" in read_text(os.path.join(ROOT, "configs", name))))
def test_every_configs_sweep_is_valid_and_its_trials_distinct(config_file):
  """make_sweep refuses two trials that train one config (as when a config changes under its
  sweep); each config's get_sweep() passes."""
  sweep = sweeps.make_sweep(os.path.join(ROOT, "configs", config_file))
  assert len(sweep.trials) >= 2
