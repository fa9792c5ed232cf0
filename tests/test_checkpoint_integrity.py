"""Checkpoint integrity: checksums written at save, verified at restore (mixer.checkpoints)."""
import errno
import hashlib
import json
import logging
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest  # pylint: disable=unused-import  (sys.path and XLA flags, as for every test)
from mixer import checkpoints, errors
from mixer import workdir as layout


def tree(value):
  return {"a": jnp.arange(4096.0) + value, "b": {"c": jnp.full((3, 5), value, jnp.int32)}}


def abstract():
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      tree(0))


def save_steps(workdir, values, keep=3, with_metrics=False):
  """Saves tree(v) at step i + 1 for each value and closes: {step: value}."""
  ckpt = checkpoints.Checkpoints(str(workdir), keep=keep)
  for i, value in enumerate(values):
    ckpt.save(i + 1, tree(value), metrics={"val/top1": value / 10} if with_metrics else None)
  ckpt.close()
  return {i + 1: v for i, v in enumerate(values)}


def step_dir(workdir, step):
  return os.path.join(str(workdir), "checkpoints", str(step))


def largest_file(workdir, step):
  files = [os.path.join(root, name) for root, _, names in os.walk(step_dir(workdir, step))
           for name in names]
  return max(files, key=os.path.getsize)


def flip_bytes(path):
  """Overwrites 16 bytes in the middle of `path` with their complement; the size is kept."""
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.seek(size // 2)
    chunk = f.read(16)
    f.seek(size // 2)
    f.write(bytes(255 - b for b in chunk))
  assert os.path.getsize(path) == size


def manifest(workdir, step):
  with open(os.path.join(str(workdir), layout.CHECKSUMS_DIR, f"{step}.json"),
            encoding="utf-8") as f:
    return json.load(f)


def assert_is_tree(state, value):
  np.testing.assert_array_equal(state["a"], np.arange(4096.0) + value)
  np.testing.assert_array_equal(state["b"]["c"], np.full((3, 5), value, np.int32))


def test_manifest_lists_every_file_once_the_step_is_final(tmp_path):
  ckpt = checkpoints.Checkpoints(str(tmp_path), keep=3)
  ckpt.save(1, tree(1))
  ckpt.save(2, tree(2))  # step 1 is final once this save starts: its manifest is written
  assert os.path.exists(ckpt.manifest_path(1))
  ckpt.close()  # and step 2's here
  checksums = os.listdir(tmp_path / layout.CHECKSUMS_DIR)
  assert sorted(checksums) == ["1.json", "2.json"]
  assert layout.CHECKSUMS_DIR not in os.listdir(tmp_path / "checkpoints")  # not in Orbax's
  for step in (1, 2):
    listed = manifest(tmp_path, step)["files"]
    on_disk = {}
    for root, _, names in os.walk(step_dir(tmp_path, step)):
      for name in names:
        path = os.path.join(root, name)
        with open(path, "rb") as f:
          on_disk[os.path.relpath(path, step_dir(tmp_path, step))] = {
              "size": os.path.getsize(path), "sha256": hashlib.sha256(f.read()).hexdigest()}
    assert listed == on_disk and any(k.startswith("default/") for k in listed)
  reader = checkpoints.Checkpoints(str(tmp_path), read_only=True)
  assert reader.verify(1) is True and reader.verify(2) is True
  reader.close()


def test_manifests_of_garbage_collected_steps_are_dropped(tmp_path):
  save_steps(tmp_path, [1, 2, 3], keep=1)
  assert os.listdir(tmp_path / "checkpoints") == ["3"]
  assert os.listdir(tmp_path / layout.CHECKSUMS_DIR) == ["3.json"]


def test_a_step_saved_again_gets_a_new_manifest(tmp_path):
  save_steps(tmp_path, [1, 2])
  shutil.rmtree(step_dir(tmp_path, 2))  # as if the run stopped before step 2
  ckpt = checkpoints.Checkpoints(str(tmp_path), keep=3)
  ckpt.save(2, tree(20))  # other bytes than the first step 2: the old manifest must not stay
  ckpt.close()
  reader = checkpoints.Checkpoints(str(tmp_path), read_only=True)
  assert reader.verify(2) is True
  assert_is_tree(reader.restore(2, abstract()), 20)
  reader.close()


def test_flipped_bytes_fall_back_to_the_previous_step_and_quarantine(tmp_path, caplog):
  save_steps(tmp_path, [1, 2])
  flip_bytes(largest_file(tmp_path, 2))
  ckpt = checkpoints.Checkpoints(str(tmp_path), keep=3)
  with caplog.at_level(logging.WARNING):
    step, state = ckpt.restore_latest_good(abstract())
  assert step == 1
  assert_is_tree(state, 1)
  assert ckpt.all_steps() == [1]
  ckpt.close()
  assert os.listdir(tmp_path / "checkpoints") == ["1"]
  moved = sorted(os.listdir(tmp_path / "corrupt_checkpoints"))
  assert len(moved) == 2 and moved[0].startswith("2.") and moved[1].endswith(".checksums.json")
  assert not os.path.exists(tmp_path / layout.CHECKSUMS_DIR / "2.json")
  assert re.search(r"step 2 .*damaged.*checksum mismatch in default/", caplog.text)
  assert re.search(r"step 2 is damaged .*but step 1 loads.*resuming from step 1", caplog.text)


def test_changed_size_or_missing_file_is_damage_but_missing_metrics_are_not(tmp_path):
  save_steps(tmp_path, [1, 2, 3], with_metrics=True)
  ckpt = checkpoints.Checkpoints(str(tmp_path), read_only=True)
  path = largest_file(tmp_path, 3)
  rel = os.path.relpath(path, step_dir(tmp_path, 3))
  with open(path, "ab") as f:
    f.write(b"\0")
  with pytest.raises(checkpoints.CorruptCheckpointError, match=f"{re.escape(rel)} has .* bytes"):
    ckpt.verify(3)
  os.remove(path)
  with pytest.raises(checkpoints.CorruptCheckpointError, match=f"{re.escape(rel)} is missing"):
    ckpt.verify(3)
  # Orbax's metrics item only ranks steps for "best"; without it the step still restores.
  assert any(name.startswith("metrics/") for name in manifest(tmp_path, 2)["files"])
  shutil.rmtree(os.path.join(step_dir(tmp_path, 2), "metrics"))
  assert ckpt.verify(2) is True
  ckpt.close()


def test_unverified_truncated_step_is_still_set_aside_when_an_older_one_loads(tmp_path):
  save_steps(tmp_path, [1, 2])
  shutil.rmtree(tmp_path / layout.CHECKSUMS_DIR)  # a run from before the checksums
  for root, _, names in os.walk(os.path.join(step_dir(tmp_path, 2), "default")):
    for name in names:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  ckpt = checkpoints.Checkpoints(str(tmp_path), keep=3)
  step, state = ckpt.restore_latest_good(abstract())
  ckpt.close()
  assert step == 1
  assert_is_tree(state, 1)
  assert len(os.listdir(tmp_path / "corrupt_checkpoints")) == 1


@pytest.mark.parametrize("error", [
    MemoryError("out of host memory"),
    OSError(errno.EIO, "Input/output error"),
    PermissionError(errno.EACCES, "Permission denied"),
    ValueError("PERMISSION_DENIED: Error opening file"),  # how TensorStore reports it
])
def test_an_error_of_the_machine_stops_and_moves_nothing(tmp_path, monkeypatch, error):
  save_steps(tmp_path, [1, 2])
  ckpt = checkpoints.Checkpoints(str(tmp_path), keep=3)
  restore = ckpt.manager.restore

  def failing_restore(step, *args, **kwargs):
    if step == 2:
      raise error
    return restore(step, *args, **kwargs)

  monkeypatch.setattr(ckpt.manager, "restore", failing_restore)
  with pytest.raises(errors.MachineError, match=r"The checkpoint at step 2 in .*checkpoints "
                     r"could not be read because of the machine.*left where it is") as info:
    ckpt.restore_latest_good(abstract())
  assert type(error).__name__ in str(info.value)
  ckpt.close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
  assert not os.path.exists(tmp_path / "corrupt_checkpoints")


def test_the_only_step_damaged_is_moved_and_an_error(tmp_path):
  save_steps(tmp_path, [1])
  flip_bytes(largest_file(tmp_path, 1))
  ckpt = checkpoints.Checkpoints(str(tmp_path), keep=3)
  with pytest.raises(errors.CheckpointError, match=r"Every checkpoint .* was damaged \(step 1: "
                     r".*checksum mismatch.*start from step 0"):
    ckpt.restore_latest_good(abstract())
  ckpt.close()
  assert os.listdir(tmp_path / "checkpoints") == []


def test_environment_error_classification():
  assert errors.environment_error(FileNotFoundError(errno.ENOENT, "gone")) is None
  assert errors.environment_error(ValueError("DATA_LOSS: truncated chunk")) is None
  disk = OSError(errno.ENOSPC, "No space left on device")
  try:
    try:
      raise disk
    except OSError as e:
      raise ValueError("could not read array") from e
  except ValueError as wrapped:
    assert errors.environment_error(wrapped) is disk


def test_a_damaged_step_read_alone_is_refused_naming_the_good_ones(tmp_path, monkeypatch):
  """As evaluate/predict/export read a chosen step: refused, nothing moved."""
  save_steps(tmp_path, [1, 2, 3])
  flip_bytes(largest_file(tmp_path, 3))
  ckpt = checkpoints.Checkpoints(str(tmp_path), read_only=True)
  with pytest.raises(checkpoints.CorruptCheckpointError, match=r"The checkpoint at step 3 in "
                     r".*checkpoints is damaged \(checksum mismatch in default/.*\); good steps: "
                     r"\[1, 2\]"):
    ckpt.restore(3)
  assert_is_tree(ckpt.restore(2, abstract()), 2)
  assert_is_tree(ckpt.restore(2), 2)  # as saved, replicated on this process's devices
  monkeypatch.setattr(ckpt.manager, "restore",
                      lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
  with pytest.raises(errors.CheckpointError, match=r"The checkpoint at step 2 in .* could not be "
                     r"read \(RuntimeError: boom\); other saved steps: \[1, 3\]"):
    ckpt.restore(2)
  ckpt.close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2", "3"]  # evaluation moves nothing


def test_an_unreadable_manifest_proves_nothing(tmp_path):
  save_steps(tmp_path, [1])
  with open(tmp_path / layout.CHECKSUMS_DIR / "1.json", "w", encoding="utf-8") as f:
    f.write('{"files": {"default/x": {"size": "?"}}}')
  ckpt = checkpoints.Checkpoints(str(tmp_path), keep=3)
  assert ckpt.verify(1) is False
  step, state = ckpt.restore_latest_good(abstract())
  ckpt.close()
  assert step == 1
  assert_is_tree(state, 1)


def test_parameters_of_another_shape_are_named_before_anything_is_read(tmp_path):
  params = {"stem": {"kernel": jnp.ones((4, 8))}, "head": {"bias": jnp.arange(10.0)}}
  ckpt = checkpoints.Checkpoints(str(tmp_path), keep=3)
  ckpt.save(1, {"params": params, "step": jnp.int32(1)})
  ckpt.close()
  shape = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.float32)
  model = {"stem": {"kernel": shape(4, 16)}, "head": {"bias": shape(10)},
           "norm": {"scale": shape(16)}}
  reader = checkpoints.Checkpoints(str(tmp_path), read_only=True)
  with pytest.raises(errors.CheckpointError, match=r"step 1 .*does not match the model.*Missing "
                     r"from the checkpoint: norm \(1 array\).*Of another shape \(1\): "
                     r"stem/kernel: checkpoint \(4, 8\) vs model \(4, 16\)"):
    reader.restore(1, model_params=model)
  # A function of the saved parameters' shapes: how evaluation sizes the model's head.
  heads = []
  state = reader.restore(1, model_params=lambda saved: heads.append(saved["head"]["bias"].shape)
                         or jax.tree.map(lambda x: shape(*x.shape), params))
  reader.close()
  assert heads == [(10,)]
  np.testing.assert_array_equal(state["params"]["head"]["bias"], np.arange(10.0))
  assert int(state["step"]) == 1
