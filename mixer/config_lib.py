"""The training config: defaults shared by every `configs/*.py`, the `:smoke` argument, validation.

Every key a user may set is declared here (ml_collections rejects unknown keys), so a
mistyped `--config.key=value` fails before any work.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from mixer import errors, models

OPTIMIZERS = ("adamw", "sgd", "muon", "schedule_free_adamw", "lion")  # mixer/optim.py
LR_SCHEDULES = ("cosine", "linear")
DTYPES = ("auto", "float32", "bfloat16")
TOKEN_MIXING = ("auto", *models.TOKEN_MIXING)


def base_config() -> ml_collections.ConfigDict:
  """Defaults; each experiment file changes what it needs."""
  c = ml_collections.ConfigDict()
  c.dataset = "cifar100"
  c.data_dir = config_dict.placeholder(str)  # None: $TFDS_DATA_DIR, else TFDS's default.
  c.train_split = "train"
  # Held-out validation (e.g. "train[98%:]" with train_split "train[:98%]"): picks the best
  # checkpoint and ranks sweeps. None: no validation; eval_split (test) is only reported.
  c.val_split = config_dict.placeholder(str)
  c.eval_split = "test"
  # True: eval_split is scored only at the last step (val_split at every evaluation): the
  # protocol of selecting on val and reporting one test number, at a fraction of the cost.
  c.eval_split_only_at_end = False
  c.image_size = 32  # model input; images are resized on device when the data differs.

  c.model = ml_collections.ConfigDict()
  c.model.variant = "S/4"
  c.model.stoch_depth = 0.0
  c.model.dropout = 0.0
  # Compute dtype; parameters and optimizer state stay float32. "auto": bfloat16 on GPU/TPU,
  # float32 on CPU (where bfloat16 measured slower).
  c.model.dtype = "auto"
  # "auto": TokenDense's batched matmul on CPU (measured faster there), the official
  # transpose + Dense elsewhere; same parameters either way.
  c.model.token_mixing = "auto"
  # Explicit dimensions override the variant's (None: the variant's own).
  for key in ("hidden_dim", "num_blocks", "tokens_mlp_dim", "channels_mlp_dim"):
    c.model[key] = config_dict.placeholder(int)

  c.batch_size = 128  # global, over all devices and processes.
  c.eval_batch_size = 500
  c.num_epochs = 100
  c.total_steps = 0  # > 0 overrides num_epochs.
  # Compute budgets (0 disables; at most one). Either decides the run's length over num_epochs
  # and total_steps (mixer/budget.py). budget_pflop: training compute in PFLOP, the same steps
  # on every machine. budget_minutes: wall time of the whole run, evaluations included; the
  # steps are chosen once from the step rate measured after compilation and recorded in
  # config.json, so a resume runs the same steps.
  c.budget_pflop = 0.0
  c.budget_minutes = 0.0
  c.optimizer = "adamw"
  c.learning_rate = 1e-3
  c.momentum = 0.9  # sgd only.
  c.weight_decay = 0.05  # kernels only.
  c.warmup_epochs = 5.0
  c.lr_schedule = "cosine"
  c.grad_clip_norm = 1.0  # 0 disables clipping.
  c.label_smoothing = 0.1
  c.grad_accum_steps = 1

  c.augment = True  # random crop (4-pixel padding) + horizontal flip.
  c.randaugment_ops = 0  # RandAugment ops per image (0 disables).
  c.randaugment_magnitude = 9  # 0..10 (RandAugment's integer scale).
  c.random_erasing = 0.0  # probability of erasing one random box per image (0 disables).
  c.mixup_alpha = 0.0
  c.cutmix_alpha = 0.0

  c.ema_decay = 0.0  # exponential moving average of the parameters (0 disables).
  c.eval_flip = False  # evaluate on the mean logits of each image and its mirror.
  # Also average the image moved this many pixels up, down, left and right (black fill, as the
  # training crops pad): 5 views, 10 with eval_flip. 0 disables.
  c.eval_shift = 0

  # k-shot linear probes on the pre-logits at every evaluation, logged as fewshot/<k>shot, e.g.
  # (5, 10): k training images per class, scored on fewshot_split (None: val_split, else
  # eval_split). Empty: off.
  c.fewshot_shots = ()
  c.fewshot_split = config_dict.placeholder(str)

  c.init_from = config_dict.placeholder(str)  # a published-layout Mixer .npz or a timm .safetensors to fine-tune.

  c.seed = 0
  c.log_every_steps = 100
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 2
  return c


def parse_arg(arg: str | None, choices: tuple[str, ...] = ()) -> tuple[str | None, bool]:
  """A config file's argument, 'CHOICE', 'smoke' or 'CHOICE,smoke' -> (CHOICE or None, smoke).

  `choices` are the values the config file accepts besides 'smoke' (e.g. Mixer variants).
  """
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  smoke = "smoke" in parts
  rest = [p for p in parts if p != "smoke"]
  if len(rest) > 1 or (rest and rest[0] not in choices):
    allowed = ", ".join(repr(c) for c in (*choices, "smoke"))
    raise errors.ConfigError(f"Unknown config argument {arg!r}; expected one of {allowed}"
                             f"{' (or CHOICE,smoke)' if choices else ''}.")
  return (rest[0] if rest else None), smoke


def apply_arg(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies the config-file argument: `smoke` shrinks any config to a 1-2 minute CPU run."""
  _, smoke = parse_arg(arg)
  return shrink_to_smoke(config) if smoke else config


def shrink_to_smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """60 steps of batch 64 of a Ti-sized Mixer at (at most) 32x32: the recipe, not its cost."""
  config.total_steps = 60
  config.budget_pflop = config.budget_minutes = 0.0
  config.batch_size = 64
  config.eval_batch_size = 500
  config.warmup_epochs = 0.0
  config.log_every_steps = 10
  config.eval_every_steps = 30
  config.checkpoint_every_steps = 30
  size, _, patch = config.model.variant.partition("/")
  if size not in ("Ti",):
    config.model.variant = f"Ti/{patch}"
  config.image_size = min(config.image_size, 32)
  # Shifted test-time views multiply each evaluation of the 10,000 test images (~2 minutes for
  # 10 views on 2 CPU cores); they have their own tests, the smoke run keeps only the flip.
  config.eval_shift = 0
  return config


def budget_set(c: ml_collections.ConfigDict) -> bool:
  return bool(c.budget_pflop or c.budget_minutes)


def _check(ok: bool, key: str, value, why: str) -> None:
  if not ok:
    raise errors.ConfigError(f"config.{key}={value!r} is invalid: {why}.")


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises errors.ConfigError (a ValueError) naming the key for any bad value."""
  try:
    models.parse_variant(c.model.variant)
  except ValueError as e:
    raise errors.ConfigError(f"config.model.variant: {e}") from None
  for key in ("hidden_dim", "num_blocks", "tokens_mlp_dim", "channels_mlp_dim"):
    value = c.model[key]
    _check(value is None or value >= 1, f"model.{key}", value, "must be >= 1 (or None)")
  patch = models.parse_variant(c.model.variant)["patch_size"]
  _check(c.image_size > 0 and c.image_size % patch == 0, "image_size", c.image_size,
         f"must be a positive multiple of the patch size {patch}")
  _check(c.model.dtype != "float16", "model.dtype", c.model.dtype,
         "float16 training needs loss scaling, which this codebase does not do; use bfloat16 "
         "(float32's range, as fast on GPU/TPU, no loss scaling)")
  _check(c.model.dtype in DTYPES, "model.dtype", c.model.dtype, f"expected one of {DTYPES}")
  _check(c.model.token_mixing in TOKEN_MIXING, "model.token_mixing", c.model.token_mixing,
         f"expected one of {TOKEN_MIXING}")
  _check(0.0 <= c.model.stoch_depth < 1.0, "model.stoch_depth", c.model.stoch_depth, "need 0 <= p < 1")
  _check(0.0 <= c.model.dropout < 1.0, "model.dropout", c.model.dropout, "need 0 <= p < 1")
  for key in ("batch_size", "eval_batch_size", "grad_accum_steps", "log_every_steps",
              "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    _check(c[key] >= 1, key, c[key], "must be >= 1")
  _check(c.batch_size % c.grad_accum_steps == 0, "grad_accum_steps", c.grad_accum_steps,
         f"must divide batch_size={c.batch_size}")
  _check(c.total_steps >= 0, "total_steps", c.total_steps, "must be >= 0 (0: use num_epochs)")
  _check(c.total_steps > 0 or c.num_epochs > 0 or budget_set(c), "num_epochs", c.num_epochs,
         "must be > 0 unless total_steps or a budget is set")
  for key in ("budget_pflop", "budget_minutes"):
    _check(c[key] >= 0, key, c[key], "must be >= 0 (0 disables)")
  _check(not (c.budget_pflop and c.budget_minutes), "budget_minutes", c.budget_minutes,
         f"set at most one budget (budget_pflop={c.budget_pflop} is set too; 0 turns one off)")
  _check(c.optimizer in OPTIMIZERS, "optimizer", c.optimizer,
         f"expected one of {', '.join(repr(o) for o in OPTIMIZERS)}")
  _check(not (c.optimizer == "schedule_free_adamw" and c.ema_decay), "ema_decay", c.ema_decay,
         "optimizer='schedule_free_adamw' evaluates its own average of the iterates; set "
         "ema_decay=0")
  _check(c.lr_schedule in LR_SCHEDULES, "lr_schedule", c.lr_schedule,
         f"expected one of {LR_SCHEDULES}")
  _check(c.learning_rate > 0, "learning_rate", c.learning_rate, "must be > 0")
  for key in ("weight_decay", "warmup_epochs", "grad_clip_norm", "mixup_alpha", "cutmix_alpha",
              "momentum"):
    _check(c[key] >= 0, key, c[key], "must be >= 0")
  _check(0.0 <= c.label_smoothing < 1.0, "label_smoothing", c.label_smoothing, "need 0 <= x < 1")
  _check(c.randaugment_ops >= 0, "randaugment_ops", c.randaugment_ops, "must be >= 0")
  _check(0 <= c.randaugment_magnitude <= 10, "randaugment_magnitude", c.randaugment_magnitude,
         "need 0 <= magnitude <= 10")
  _check(0.0 <= c.random_erasing <= 1.0, "random_erasing", c.random_erasing, "need 0 <= p <= 1")
  _check(isinstance(c.eval_shift, int) and 0 <= c.eval_shift < c.image_size, "eval_shift",
         c.eval_shift, f"need a whole number of pixels, 0 <= shift < image_size={c.image_size}")
  _check(0.0 <= c.ema_decay < 1.0, "ema_decay", c.ema_decay, "need 0 <= decay < 1")
  _check(isinstance(c.fewshot_shots, (tuple, list)) and all(
      isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in c.fewshot_shots),
         "fewshot_shots", c.fewshot_shots, "need whole numbers >= 1, e.g. (5, 10), or ()")
  _check(c.val_split is None or c.val_split.strip() != "", "val_split", c.val_split,
         "must be a TFDS split such as 'train[98%:]', or None")
