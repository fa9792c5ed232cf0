"""timm export and import: names and layouts, logits parity, round trip, the CLI, errors.

The logits are compared twice: against an independent numpy forward pass written from timm's
`MlpMixer` source (always runs), and against timm itself where it imports (it needs a
torchvision matching torch; skipped with the reason otherwise).
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixer
from mixer import errors, pretrained, saved_runs, timm_format, train_lib
from tests.conftest import ROOT, metric_at, read_metrics, tiny_config

# (variant, image_size, num_classes, dims): the tiny test model, patch 8 at 64px, 10 classes.
CASES = {
    "patch8_32px_100": ("Ti/8", 32, 100, dict(hidden_dim=32, num_blocks=2, tokens_mlp_dim=16,
                                              channels_mlp_dim=64)),
    "patch8_64px_100": ("Ti/8", 64, 100, dict(hidden_dim=24, num_blocks=3, tokens_mlp_dim=20,
                                              channels_mlp_dim=72)),
    "patch4_32px_10": ("Ti/4", 32, 10, dict(hidden_dim=16, num_blocks=2, tokens_mlp_dim=24,
                                            channels_mlp_dim=40)),
}


def _random_params(case, seed=0):
  """Parameters of the case's model with every leaf random (the init's head is zero)."""
  variant, image_size, num_classes, dims = CASES[case]
  model = mixer.create_model(variant, num_classes, **dims)
  params = model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))["params"]
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  leaves = [rng.normal(1.0 if x.ndim == 1 else 0.0, 0.3, x.shape).astype(np.float32)
            for x in leaves]
  return model, jax.tree.unflatten(treedef, leaves)


def _images(image_size, n=8, seed=1):
  return np.random.default_rng(seed).integers(0, 256, (n, image_size, image_size, 3), np.uint8)


def _preprocess_as_json_says(images_uint8, meta):
  """NHWC uint8 -> NCHW float64, exactly as the metadata's preprocessing describes."""
  pre = meta["preprocessing"]
  x = images_uint8.astype(np.float64) * pre["scale"]
  x = (x - np.array(pre["mean"])) / np.array(pre["std"])
  return x.transpose(0, 3, 1, 2)


def _layer_norm(x, weight, bias, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * weight + bias


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _timm_forward_numpy(state, meta, x):
  """timm's MlpMixer.forward (PatchEmbed, MixerBlock, norm, avg pool, head) in float64 numpy,
  the widths computed as timm computes them from the constructor arguments."""
  args = meta["constructor"]
  p, dim = args["patch_size"], args["embed_dim"]
  tokens_dim, channels_dim = (int(r * dim) for r in args["mlp_ratio"])
  s = {k: v.astype(np.float64) for k, v in state.items()}
  b, c, h, w = x.shape
  patches = x.reshape(b, c, h // p, p, w // p, p)
  tokens = np.einsum("bchpwq,dcpq->bhwd", patches, s["stem.proj.weight"]) + s["stem.proj.bias"]
  tokens = tokens.reshape(b, -1, dim)  # flatten(2).transpose(1, 2): row-major patch order
  linear = lambda y, name: y @ s[f"{name}.weight"].T + s[f"{name}.bias"]
  for i in range(args["num_blocks"]):
    pre = f"blocks.{i}"
    assert s[f"{pre}.mlp_tokens.fc1.weight"].shape[0] == tokens_dim
    assert s[f"{pre}.mlp_channels.fc1.weight"].shape[0] == channels_dim
    y = _layer_norm(tokens, s[f"{pre}.norm1.weight"], s[f"{pre}.norm1.bias"]).transpose(0, 2, 1)
    y = linear(_gelu_tanh(linear(y, f"{pre}.mlp_tokens.fc1")), f"{pre}.mlp_tokens.fc2")
    tokens = tokens + y.transpose(0, 2, 1)
    y = _layer_norm(tokens, s[f"{pre}.norm2.weight"], s[f"{pre}.norm2.bias"])
    tokens = tokens + linear(_gelu_tanh(linear(y, f"{pre}.mlp_channels.fc1")),
                             f"{pre}.mlp_channels.fc2")
  pooled = _layer_norm(tokens, s["norm.weight"], s["norm.bias"]).mean(axis=1)
  return linear(pooled, "head")


def _ours(model, params, images_uint8):
  x = jnp.asarray(images_uint8, jnp.float32) / 127.5 - 1.0  # data.to_float
  return np.asarray(model.apply({"params": params}, x))


@pytest.mark.parametrize("case", sorted(CASES))
def test_exported_state_dict_gives_our_logits_in_timms_forward(case, tmp_path):
  model, params = _random_params(case)
  path = tmp_path / "model.safetensors"
  meta_path = pretrained.export_timm(params, path)
  assert meta_path == str(tmp_path / "model.json")
  with open(meta_path, encoding="utf-8") as f:
    meta = json.load(f)
  variant, image_size, num_classes, dims = CASES[case]
  assert meta["constructor"] == dict(
      num_classes=num_classes, img_size=image_size, in_chans=3, patch_size=int(variant[3:]),
      num_blocks=dims["num_blocks"], embed_dim=dims["hidden_dim"],
      mlp_ratio=meta["constructor"]["mlp_ratio"])
  state = timm_format.read_state(path)
  images = _images(image_size)
  want = _ours(model, params, images)
  got = _timm_forward_numpy(state, meta, _preprocess_as_json_says(images, meta))
  assert np.abs(want).max() > 1.0  # the comparison is not between near-zero logits
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


# Run in its own process: torch beside JAX's and TensorFlow's XLA:CPU (oneDNN) flags in one
# process crashed (segmentation fault) with torch 2.14.1 + torchvision 0.29.1.
_TIMM_LOGITS = """
import json, sys
import numpy as np
try:
  import torch
  from safetensors.torch import load_file
  from timm.layers import get_act_layer
  from timm.models.mlp_mixer import MlpMixer
except Exception as e:  # e.g. no torchvision built for this torch
  print(f"SKIP {type(e).__name__}: {str(e)[:150]}")
  sys.exit(0)
path, meta_path, inputs, out = sys.argv[1:]
meta = json.load(open(meta_path))
model = MlpMixer(**meta["constructor"], act_layer=get_act_layer(meta["act_layer"]))
model.load_state_dict(load_file(path), strict=True)
with torch.no_grad():
  np.save(out, model.eval()(torch.from_numpy(np.load(inputs))).numpy())
"""


@pytest.mark.parametrize("case", sorted(CASES))
def test_timm_rebuilt_from_the_json_gives_our_logits(case, tmp_path):
  """timm's MlpMixer built from the JSON, the state dict loaded with strict=True."""
  model, params = _random_params(case)
  path = tmp_path / "model.safetensors"
  meta_path = pretrained.export_timm(params, path)
  with open(meta_path, encoding="utf-8") as f:
    meta = json.load(f)
  images = _images(meta["constructor"]["img_size"])
  np.save(tmp_path / "x.npy", _preprocess_as_json_says(images, meta).astype(np.float32))
  proc = subprocess.run([sys.executable, "-c", _TIMM_LOGITS, str(path), meta_path,
                         str(tmp_path / "x.npy"), str(tmp_path / "logits.npy")],
                        capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  if proc.stdout.startswith("SKIP"):
    pytest.skip(f"timm does not import here ({proc.stdout[5:].strip()}); it needs a "
                "torchvision built for the installed torch (README, Export to PyTorch/timm)")
  got = np.load(tmp_path / "logits.npy")
  np.testing.assert_allclose(got, _ours(model, params, images), atol=1e-4, rtol=0)


def test_round_trip_gives_identical_parameters(tmp_path):
  _, params = _random_params("patch8_64px_100", seed=3)
  path = tmp_path / "m.safetensors"
  pretrained.export_timm(params, path)
  back = pretrained.load_timm(path)
  flat = pretrained.flatten_params(params)
  assert set(back) == set(flat)
  for key, value in flat.items():
    np.testing.assert_array_equal(back[key], np.asarray(value), err_msg=key)
  assert pretrained.load_checkpoint(path).keys() == back.keys()


def test_unreadable_or_foreign_files_are_user_errors(tmp_path):
  with pytest.raises(errors.MissingFileError, match="No safetensors file"):
    pretrained.load_timm(tmp_path / "missing.safetensors")
  text = tmp_path / "text.safetensors"
  text.write_text("hello, not tensors")
  with pytest.raises(errors.CheckpointError, match="not a readable safetensors file"):
    pretrained.load_checkpoint(text)
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  other = tmp_path / "resnet.safetensors"
  save_file({"conv1.weight": np.zeros((4, 3, 3, 3), np.float32)}, str(other))
  with pytest.raises(errors.CheckpointError, match="not a timm MlpMixer state dict"):
    pretrained.load_timm(other)


@pytest.fixture(scope="module")
def run(tmp_path_factory, mock_cifar_module):
  """A 4-step training run of the tiny test model."""
  del mock_cifar_module
  workdir = str(tmp_path_factory.mktemp("run"))
  train_lib.train_and_evaluate(tiny_config(total_steps=4, eval_every_steps=4,
                                           checkpoint_every_steps=4), workdir)
  return workdir


@pytest.fixture(scope="module")
def mock_cifar_module():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tests.conftest import METADATA_DIR, MOCK_EXAMPLES  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES, data_dir=METADATA_DIR):
    yield


def _export(run, out, *flags):
  return subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), f"--workdir={run}",
                         f"--out={out}", *flags], capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=ROOT)


def test_export_script_and_init_from_the_timm_file(run, mock_cifar_module, tmp_path):
  """export.py --format=timm writes the run's parameters in timm's layout with the JSON; a run
  initialised from the file (init_from) starts exactly where the source run ended."""
  del mock_cifar_module
  out = tmp_path / "run.safetensors"
  proc = _export(run, out, "--format=timm")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "trained parameters of step 4" in proc.stdout and "run.json" in proc.stdout
  with open(tmp_path / "run.json", encoding="utf-8") as f:
    meta = json.load(f)
  assert meta["step"] == 4 and meta["parameters"] == "trained parameters"
  assert meta["constructor"]["img_size"] == 32 and meta["constructor"]["num_classes"] == 100
  _, _, params = saved_runs.restore_params(run, 4)
  back = pretrained.load_timm(out)
  for key, value in pretrained.flatten_params(params).items():
    np.testing.assert_array_equal(back[key], np.asarray(value), err_msg=key)

  config = tiny_config(init_from=str(out), optimizer="sgd", learning_rate=1e-12, total_steps=1,
                       eval_every_steps=1, warmup_epochs=0.0)
  result = train_lib.train_and_evaluate(config, str(tmp_path / "ft"))
  np.testing.assert_allclose(result.metrics["eval/loss"],
                             metric_at(read_metrics(run), "eval/loss", 4), rtol=1e-5)
  with pytest.raises(errors.ConfigError, match="config.init_from=.*does not fit"):
    train_lib.train_and_evaluate(tiny_config(init_from=str(out), **{"model.hidden_dim": 48}),
                                 str(tmp_path / "bad"))
  assert not (tmp_path / "bad").exists()


def test_export_script_refuses_a_suffix_of_the_other_format(run, tmp_path):
  proc = _export(run, tmp_path / "run.npz", "--format=timm")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: --format=timm writes a .safetensors file; --out='{tmp_path / 'run.npz'}' "
      "does not end with .safetensors.")
  assert not os.listdir(tmp_path)


def test_mlp_ratio_reproduces_the_width_in_timms_arithmetic():
  for width, dim in [(64, 128), (256, 768), (384, 768), (3072, 768), (7, 3), (20, 24), (1, 7)]:
    assert int(timm_format._mlp_ratio(width, dim) * dim) == width  # pylint: disable=protected-access
