"""mixer/workdir.py owns a run's layout: the names a real run writes, config.json read over
today's defaults, its errors, and run.json."""
import json
import os
import re

import pytest

from conftest import tiny_config
from mixer import config_lib, errors, train_lib, workdir_lock
from mixer import workdir as layout


def test_a_run_writes_exactly_the_layouts_names(mock_cifar, tmp_path):
  workdir = str(tmp_path / "run")
  result = train_lib.train_and_evaluate(
      tiny_config(total_steps=2, warmup_epochs=0.0, log_every_steps=1, eval_every_steps=2,
                  checkpoint_every_steps=2), workdir)
  assert result.status == "finished"
  names = set(os.listdir(workdir))
  events = {n for n in names if n.startswith("events.out.tfevents")}
  assert events  # TensorBoard's own file names
  assert names - events == {layout.CONFIG_FILE, layout.HISTORY_FILE, layout.RUN_FILE,
                            layout.METRICS_FILE, layout.CLASS_NAMES_FILE, layout.CHECKPOINT_DIR,
                            layout.CHECKSUMS_DIR}  # the lock was released
  assert os.listdir(layout.path(workdir, layout.CHECKPOINT_DIR)) == ["2"]
  assert layout.read_run(workdir).status == "finished"
  assert layout.load_config(workdir).total_steps == 2
  lock = workdir_lock.WorkdirLock(workdir)
  lock.acquire()
  assert os.path.isfile(layout.path(workdir, layout.LOCK_FILE))
  lock.release()


def test_load_config_reads_the_saved_values_over_todays_defaults(tmp_path):
  workdir = str(tmp_path)
  layout.write_config(workdir, {"learning_rate": 0.5, "model": {"variant": "B/16"},
                                "budget": {"total_steps": 7}})
  config = layout.load_config(workdir)
  defaults = config_lib.base_config()
  assert config.learning_rate == 0.5 and config.model.variant == "B/16"
  # Keys the file lacks (added to the code since) are today's defaults, nested ones too.
  assert config.batch_size == defaults.batch_size
  assert config.model.token_mixing == defaults.model.token_mixing
  assert config.budget.total_steps == 7  # recorded entries besides the config are kept
  assert layout.read_config(workdir) == {"learning_rate": 0.5, "model": {"variant": "B/16"},
                                         "budget": {"total_steps": 7}}


def test_missing_or_corrupt_config_json_names_the_file(tmp_path):
  workdir = str(tmp_path)
  with pytest.raises(errors.MissingFileError, match=f"No config.json in {re.escape(workdir)} "
                     r"\(.* is empty\)"):
    layout.load_config(workdir)
  path = layout.path(workdir, layout.CONFIG_FILE)
  with open(path, "w", encoding="utf-8") as f:
    f.write('{"learning_rate": 0.1,')
  with pytest.raises(errors.WorkdirError, match=f"{re.escape(path)} is not valid JSON .*"
                     "Restore it from a copy\\.$"):
    layout.load_config(workdir)
  with open(layout.path(workdir, layout.HISTORY_FILE), "w", encoding="utf-8") as f:
    f.write("{}\n")
  with open(path, "w", encoding="utf-8") as f:
    json.dump([1, 2], f)
  with pytest.raises(errors.WorkdirError, match=f"{re.escape(path)} holds a list, not a JSON "
                     f"object.*the last entry of .*{layout.HISTORY_FILE} .*holds it"):
    layout.load_config(workdir)


def test_run_json_round_trip(tmp_path):
  workdir = str(tmp_path)
  assert layout.read_run(workdir) is None
  result = layout.RunResult("stopped", 5, 10, 1234, {"eval/top1": 0.25})
  result.save(workdir)
  with open(layout.path(workdir, layout.RUN_FILE), encoding="utf-8") as f:
    assert json.load(f) == {"status": "stopped", "step": 5, "total_steps": 10,
                            "num_params": 1234, "metrics": {"eval/top1": 0.25}, "error": None}
  assert layout.read_run(workdir) == result
  assert not os.path.exists(layout.path(workdir, layout.RUN_FILE) + ".tmp")
  with open(layout.path(workdir, layout.RUN_FILE), "w", encoding="utf-8") as f:
    f.write('{"status": "runn')  # torn: read as absent, never an exception
  assert layout.read_run(workdir) is None
  with open(layout.path(workdir, layout.RUN_FILE), "w", encoding="utf-8") as f:
    json.dump({"status": "finished", "step": 3}, f)  # another layout
  assert layout.read_run(workdir) is None
  assert layout.read_run(str(tmp_path / "missing")) is None
