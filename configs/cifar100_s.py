"""Mixer-S/4 (17.2M parameters) from scratch on CIFAR-100 at 32x32: the GPU/TPU recipe.

The long recipe the published evidence supports for Mixers and ViTs trained from scratch on
small datasets: 300 epochs of AdamW (5 warmup, cosine to zero), crop + flip, RandAugment
2 ops at magnitude 9, mixup 0.8 / cutmix 1.0, label smoothing 0.1, stochastic depth 0.1,
weight EMA and flip test-time augmentation; 2% of train held out to pick the best checkpoint.

  python train.py --config=configs/cifar100_s.py --workdir=/tmp/s4
  python train.py --config=configs/cifar100_s.py:smoke --workdir=/tmp/smoke   # CPU, ~2 minutes

(`:smoke`, Ti/4 for 60 steps of 64, real CIFAR-100: 2 min 9 s end to end on the 2-core CPU
VM while another job shared it, 2026-12-02; it exercises the recipe, not its accuracy.)

Computed (benchmarks/flops.py, matmuls only): 7.26 GFLOP per training image (3x the
forward pass), 0.356 PFLOP per epoch of 49,000 images, 107 PFLOP for the 300 epochs.
Accuracy not measured yet: it needs an accelerator (on the 2-core CPU VM the S/4 step runs
at 22-24 img/s, about 8 days for this recipe; `make train` picks configs/cifar100_cpu_hour.py
there).
"""
from mixer import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.train_split = "train[:98%]"
  config.val_split = "train[98%:]"
  config.model.stoch_depth = 0.1
  config.batch_size = 512
  config.num_epochs = 300
  config.randaugment_ops = 2
  config.randaugment_magnitude = 9
  config.mixup_alpha = 0.8
  config.cutmix_alpha = 1.0
  config.ema_decay = 0.9995  # averages ~2,000 steps: ~20 of the 300 epochs, as DeiT's 0.99996
  config.eval_flip = True
  config.eval_every_steps = 950
  config.checkpoint_every_steps = 950
  return config_lib.apply_arg(config, arg)
