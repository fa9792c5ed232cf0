"""Mixer-Ti/4 (1.14M parameters) from scratch on CIFAR-100 in one hour on 2 CPU cores.

  time python train.py --config=configs/cifar100_cpu_hour.py --workdir=/tmp/cpu_hour
  python train.py --config=configs/cifar100_cpu_hour.py:smoke --workdir=/tmp/smoke

Its sweep, get_sweep(), at a reduced budget of 4 epochs, ranked on the held-out validation
split (2% of train):

  python sweep.py --config=configs/cifar100_cpu_hour.py --workdir=/tmp/cpu_hour_sweep \
      --config.num_epochs=4

Measured: not yet.
"""
from mixer import config_lib, sweeps


def get_config(arg=None):
  config = config_lib.base_config()
  config.train_split = "train[:98%]"
  config.val_split = "train[98%:]"
  config.model.variant = "Ti/4"
  config.num_epochs = 15
  config.learning_rate = 2e-3
  config.warmup_epochs = 1.0
  config.randaugment_magnitude = 5
  config.ema_decay = 0.999
  config.eval_flip = True
  config.log_every_steps = 50
  config.eval_every_steps = 1146  # 3 epochs of 382 steps
  config.checkpoint_every_steps = 382
  return config_lib.apply_arg(config, arg)


def get_sweep(arg=None):
  del arg
  return sweeps.product(randaugment_ops=[0, 2], weight_decay=[0.05, 0.2])
