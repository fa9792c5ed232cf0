"""The model, data arrays, augmentation and train step import without clu, ml_collections or
TensorFlow, so a bare accelerator machine can run them (and the benchmarks)."""
import subprocess
import sys

from conftest import ROOT

SCRIPT = r"""
import sys
for name in ("clu", "ml_collections", "tensorflow", "tensorflow_datasets"):
  sys.modules[name] = None  # any import of them now fails
import types
import jax, jax.numpy as jnp, numpy as np
from mixer import data, evaluator, models, optim, parallel, train_step
config = types.SimpleNamespace(
    model=types.SimpleNamespace(variant="Ti/8", hidden_dim=16, num_blocks=1, tokens_mlp_dim=8,
                                channels_mlp_dim=16, stoch_depth=0.0, dropout=0.0, dtype="auto"),
    batch_size=4, grad_accum_steps=1, ema_decay=0.0, seed=0, augment=True, randaugment_ops=1,
    randaugment_magnitude=5, random_erasing=0.5, image_size=32, label_smoothing=0.1,
    mixup_alpha=0.2, cutmix_alpha=0.2, learning_rate=1e-3, weight_decay=0.05, warmup_epochs=0.0,
    lr_schedule="cosine", grad_clip_norm=1.0, optimizer="adamw", momentum=0.9)
model = models.build_model(config, 10)
tx = optim.make_optimizer(config, optim.learning_rate_schedule(config, 10, 2))
state = train_step.new_state(models.init_params(model, 32, 0), tx, 0.0)
mesh = parallel.make_mesh()
images = jnp.zeros((8, 32, 32, 3), jnp.uint8)
labels = jnp.arange(8, dtype=jnp.int32) % 10
order = data.EpochOrders(0, 8, 4, parallel.replicated(mesh))(0, state.step)
state, out = jax.jit(train_step.make_train_step(model, tx, config, 10, mesh))(
    state, images, labels, order)
print("step", int(state.step), "loss", float(out[0]))
"""


def test_train_step_runs_without_clu_ml_collections_or_tensorflow():
  proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                        cwd=ROOT, timeout=120, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith("step 1 loss ")
