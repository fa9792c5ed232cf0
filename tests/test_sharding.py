"""Data parallelism, read from the compiled program: on 8 devices each one computes 1/8 of the
batch with replicated parameters (the multi-device runs in test_train.py check the numbers,
and their steps run under jax.transfer_guard("disallow"), see train_lib)."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, cpu_env

# Widths chosen so that no two of batch (64), per-device batch (8), hidden (48), tokens (16)
# and classes (100) coincide: a shape in the HLO text then says which it is.
SCRIPT = r"""
import json, sys, types
import jax, jax.numpy as jnp
from mixer import data, models, optim, parallel, train_step
config = types.SimpleNamespace(
    model=types.SimpleNamespace(variant="Ti/8", hidden_dim=48, num_blocks=2, tokens_mlp_dim=24,
                                channels_mlp_dim=96, stoch_depth=0.1, dropout=0.0, dtype="auto",
                                token_mixing=sys.argv[1]),
    batch_size=64, grad_accum_steps=1, ema_decay=0.0, seed=0, augment=True, randaugment_ops=0,
    randaugment_magnitude=5, random_erasing=0.0, image_size=32, label_smoothing=0.1,
    mixup_alpha=0.0, cutmix_alpha=0.0, learning_rate=1e-3, weight_decay=0.05,
    warmup_epochs=0.0, lr_schedule="cosine", grad_clip_norm=1.0, optimizer="adamw",
    momentum=0.9)
mesh = parallel.make_mesh()
replicated = parallel.replicated(mesh)
model = models.build_model(config, 100)
tx = optim.make_optimizer(config, optim.learning_rate_schedule(config, 10, 2))
state = jax.jit(lambda: train_step.new_state(models.init_params(model, 32, 0), tx, 0.0),
                out_shardings=replicated)()
images = jax.device_put(jnp.zeros((256, 32, 32, 3), jnp.uint8), replicated)
labels = jax.device_put(jnp.arange(256, dtype=jnp.int32) % 100, replicated)
order = data.EpochOrders(0, 256, 64, replicated)(0, state.step)
step = jax.jit(train_step.make_train_step(model, tx, config, 100, mesh), donate_argnums=0,
               out_shardings=replicated)
compiled = step.lower(state, images, labels, order).compile()
with open(sys.argv[2], "w") as f:
  f.write(compiled.as_text())
print(json.dumps({"devices": len(mesh.devices.flat), "token_mixing": model.token_mixing}))
"""


def compiled_hlo(tmp_path, token_mixing):
  path = tmp_path / "step.hlo.txt"
  env = cpu_env(8)
  proc = subprocess.run([sys.executable, "-c", SCRIPT, token_mixing, str(path)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  info = json.loads(proc.stdout.strip().splitlines()[-1])
  assert info == {"devices": 8, "token_mixing": token_mixing}
  return path.read_text()


def shapes(hlo):
  """Every array shape in the HLO text, as tuples of ints."""
  return {tuple(int(d) for d in dims.split(",") if d)
          for dims in re.findall(r"(?:f32|bf16|s32|u8)\[([\d,]*)\]", hlo)}


@pytest.mark.parametrize("token_mixing", ["batched", "transpose"])
def test_each_device_computes_an_eighth_of_the_batch_with_replicated_params(tmp_path,
                                                                             token_mixing):
  hlo = compiled_hlo(tmp_path, token_mixing)
  found = shapes(hlo)
  # Activations: (batch, tokens, hidden) per device is (8, 16, 48); never the global 64.
  assert (8, 16, 48) in found
  assert not [s for s in found if s[:1] == (64,) and len(s) >= 2 and s[-1] in (48, 96, 100)]
  assert (8, 100) in found and (64, 100) not in found  # per-device logits
  # Parameters whole on every device (the head's kernel and the stem's), and their gradients
  # summed over devices.
  assert (48, 100) in found and (8, 8, 3, 48) in found
  assert "all-reduce" in hlo
