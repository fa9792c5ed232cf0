"""Mixer-Ti/4 (1.14M parameters) from scratch on CIFAR-100: the config for 2 CPU cores.

  python train.py --config=configs/cifar100_ti.py --workdir=/tmp/ti
  python train.py --config=configs/cifar100_ti.py:smoke --workdir=/tmp/smoke   # 1-2 minutes

Accuracy: not re-measured since the random streams changed (2026-12-02); the number measured
before that is gone from here because it no longer describes this code. For the best
result in an hour on 2 CPU cores use configs/cifar100_cpu_hour.py.

Its sweep, get_sweep(): learning rate x weight decay, 6 runs in DIR/<trial>/, ranked in
DIR/summary.md (`:smoke` sweeps the same grid on the smoke config):

  python sweep.py --config=configs/cifar100_ti.py --workdir=/tmp/ti_sweep
"""
from mixer import config_lib, sweeps


def get_config(arg=None):
  config = config_lib.base_config()
  config.model.variant = "Ti/4"
  config.num_epochs = 5
  config.learning_rate = 2e-3
  config.warmup_epochs = 1.0
  config.log_every_steps = 50
  config.eval_every_steps = 780
  config.checkpoint_every_steps = 780
  return config_lib.apply_arg(config, arg)


def get_sweep(arg=None):
  del arg  # the same grid for the full and the smoke config
  return sweeps.product(learning_rate=[1e-3, 2e-3, 4e-3], weight_decay=[0.01, 0.05])
