"""Fine-tunes a published MLP-Mixer checkpoint on CIFAR-100 at 224x224 (the paper's transfer recipe).

SGD momentum 0.9, batch 512, clipping at 1, warmup then cosine, no weight decay, no mixup or
label smoothing; CIFAR's 32x32 images are cropped/flipped and resized to 224 on the device.
Weights (ImageNet-21k or -1k pre-training) from google-research/vision_transformer's bucket:
  https://storage.googleapis.com/mixer_models/imagenet21k/Mixer-B_16.npz  (`gsutil ls gs://mixer_models`)

  python train.py --config=configs/cifar100_finetune.py --workdir=workdirs/ft_b16 \\
      --config.init_from=/path/to/Mixer-B_16.npz
  python train.py --config=configs/cifar100_finetune.py:L/16 ... --config.init_from=.../Mixer-L_16.npz

The argument is the variant ('B/16' by default; one of VARIANTS), optionally followed by
',smoke' (`:smoke` alone: B/16's recipe on a Ti/16 at 32x32). At image_size 448 pass
--config.model.tokens_mlp_dim=4x the original (e.g. 1536 for B/16): block-diagonal token mixing.

Measured: not yet (needs an accelerator and the published weights, which our CI machines
cannot download).
"""
from mixer import config_lib, models


# The published Mixers are B/16, L/16, B/32 and L/32; any size at these patches is accepted.
VARIANTS = tuple(f"{size}/{patch}" for size in models.SIZES for patch in (8, 14, 16, 32))


def get_config(arg=None):
  variant, smoke = config_lib.parse_arg(arg, VARIANTS)
  config = config_lib.base_config()
  config.model.variant = variant or "B/16"
  config.image_size = 224
  config.init_from = ""  # set with --config.init_from=PATH; empty trains from scratch.
  config.optimizer = "sgd"
  config.momentum = 0.9
  config.learning_rate = 0.01
  config.weight_decay = 0.0
  config.batch_size = 512
  config.total_steps = 2500
  config.warmup_epochs = 5.0  # 485 steps at 97 steps per epoch
  config.label_smoothing = 0.0
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  return config_lib.shrink_to_smoke(config) if smoke else config
