"""The PyTorch eager peer for `--compare`: the same Mixer shapes trained with AdamW.

timm's `MlpMixer` is used when it imports; otherwise (timm missing, or timm failing to
import torchvision, as PyPI's CUDA-built torchvision does next to torch's CPU wheel) a
minimal Mixer of identical shapes defined here. Both use the tanh GELU and LayerNorm
epsilon 1e-6 of `mixer.models`. The torch step gets a ready float batch (no gather,
crop/flip or mixup, which the JAX step does on the device).
"""
from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

LN_EPSILON = 1e-6
DEFAULT_THREADS = torch.get_num_threads()  # before pick_threads changes it


class MlpBlock(nn.Sequential):

  def __init__(self, width: int, mlp_dim: int):
    super().__init__(nn.Linear(width, mlp_dim), nn.GELU(approximate="tanh"),
                     nn.Linear(mlp_dim, width))


class MixerBlock(nn.Module):

  def __init__(self, tokens: int, width: int, tokens_mlp_dim: int, channels_mlp_dim: int,
               drop_path: float):
    super().__init__()
    self.norm1 = nn.LayerNorm(width, eps=LN_EPSILON)
    self.token_mixing = MlpBlock(tokens, tokens_mlp_dim)
    self.norm2 = nn.LayerNorm(width, eps=LN_EPSILON)
    self.channel_mixing = MlpBlock(width, channels_mlp_dim)
    self.drop_path = drop_path

  def _drop(self, y: torch.Tensor) -> torch.Tensor:
    if not self.training or self.drop_path == 0:
      return y
    keep = 1.0 - self.drop_path
    mask = torch.empty((y.shape[0], 1, 1), dtype=y.dtype, device=y.device).bernoulli_(keep)
    return y * mask / keep

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + self._drop(self.token_mixing(self.norm1(x).transpose(1, 2)).transpose(1, 2))
    return x + self._drop(self.channel_mixing(self.norm2(x)))


class MinimalMixer(nn.Module):
  """Patch stem, Mixer blocks, LayerNorm, mean over tokens, linear head (NCHW input)."""

  def __init__(self, num_classes: int, image_size: int, patch_size: int, hidden_dim: int,
               num_blocks: int, tokens_mlp_dim: int, channels_mlp_dim: int,
               stoch_depth: float = 0.0):
    super().__init__()
    tokens = (image_size // patch_size) ** 2
    self.stem = nn.Conv2d(3, hidden_dim, patch_size, stride=patch_size)
    self.blocks = nn.Sequential(*[
        MixerBlock(tokens, hidden_dim, tokens_mlp_dim, channels_mlp_dim,
                   stoch_depth * i / max(num_blocks - 1, 1)) for i in range(num_blocks)])
    self.norm = nn.LayerNorm(hidden_dim, eps=LN_EPSILON)
    self.head = nn.Linear(hidden_dim, num_classes)

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    x = self.stem(images).flatten(2).transpose(1, 2)  # (batch, tokens, channels)
    return self.head(self.norm(self.blocks(x)).mean(dim=1))


def _timm_mixer(dims: dict[str, Any], num_classes: int, image_size: int) -> nn.Module:
  from timm.models import mlp_mixer  # pylint: disable=g-import-not-at-top
  width = dims["hidden_dim"]
  # timm applies one drop-path rate to every block (ours grows linearly); close enough.
  return mlp_mixer.MlpMixer(
      num_classes=num_classes, img_size=image_size, patch_size=dims["patch_size"],
      num_blocks=dims["num_blocks"], embed_dim=width,
      mlp_ratio=(dims["tokens_mlp_dim"] / width, dims["channels_mlp_dim"] / width),
      act_layer=functools.partial(nn.GELU, approximate="tanh"),
      drop_path_rate=dims["stoch_depth"])


def build(dims: dict[str, Any], num_classes: int, image_size: int,
          impl: str = "auto") -> tuple[nn.Module, str, str | None]:
  """(model, 'timm' or 'minimal', why timm was not used); impl: 'auto', 'timm', 'minimal'."""
  timm_error = None
  if impl in ("auto", "timm"):
    try:
      return _timm_mixer(dims, num_classes, image_size), "timm", None
    except Exception as e:  # pylint: disable=broad-except  # e.g. a broken torchvision
      if impl == "timm":
        raise
      timm_error = f"{type(e).__name__}: {e}"
  model = MinimalMixer(num_classes, image_size, dims["patch_size"], dims["hidden_dim"],
                       dims["num_blocks"], dims["tokens_mlp_dim"], dims["channels_mlp_dim"],
                       dims["stoch_depth"])
  return model, "minimal", timm_error


class Trainer:
  """One AdamW step of forward, backward, clipping and update on a fixed batch."""

  def __init__(self, model: nn.Module, config: Any, num_classes: int,
               batch_size: int, image_size: int, device: str = "cpu", seed: int = 0,
               compiled: bool = False, autocast: torch.dtype | None = None):
    """`config`: a training config (optimizer settings); `autocast`: e.g. torch.bfloat16 for
    mixed precision (float32 parameters, bfloat16 matmuls), None for float32."""
    torch.manual_seed(seed)
    self.autocast = autocast
    self.device = torch.device(device)
    self.model = model.to(self.device).train()
    # torch.compile (inductor) traces forward and backward on the first call; the optimizer
    # stays eager, as in most PyTorch training scripts.
    self.forward = torch.compile(self.model) if compiled else self.model
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    self.opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}], lr=config.learning_rate)
    self.clip = config.grad_clip_norm
    self.label_smoothing = config.label_smoothing
    self.images = torch.randn(batch_size, 3, image_size, image_size, device=self.device)
    self.labels = torch.randint(0, num_classes, (batch_size,), device=self.device)

  def step(self) -> float:
    """Seconds for one step, waited for."""
    start = time.perf_counter()
    self.opt.zero_grad(set_to_none=True)
    with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
      logits = self.forward(self.images)
      loss = F.cross_entropy(logits.float(), self.labels, label_smoothing=self.label_smoothing)
    self.last_loss = loss.detach()
    loss.backward()
    if self.clip > 0:
      nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
    self.opt.step()
    if self.device.type == "cuda":
      torch.cuda.synchronize()
    return time.perf_counter() - start


def pick_threads(trainer: Trainer, warmup: int = 1) -> dict[str, Any]:
  """Keeps the faster of torch's default thread count and 1 thread, timed on this trainer.

  On a CPU shared with other work, OpenMP's busy-waiting threads can make the default
  several times slower than one thread (unless OMP_WAIT_POLICY=PASSIVE), so the peer gets
  whichever of the two is faster now.
  """
  default = DEFAULT_THREADS
  torch.set_num_threads(default)
  for _ in range(warmup):
    trainer.step()
  seconds = {}
  candidates = {default, 1} if trainer.device.type == "cpu" else {default}
  for threads in sorted(candidates, reverse=True):
    torch.set_num_threads(threads)
    seconds[threads] = trainer.step()
  best = min(seconds, key=seconds.get)
  torch.set_num_threads(best)
  return {"threads": best, "default_threads": default,
          "probe_step_s": {str(k): v for k, v in seconds.items()}}


def num_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def device_for(platform: str) -> str | None:
  """The torch device matching JAX's platform, or None when torch cannot use it."""
  if platform == "cpu":
    return "cpu"
  if platform == "gpu" and torch.cuda.is_available():
    return "cuda"
  return None


def matmul_peak(device: str = "cpu", trials: int = 5, n: int = 2048,
                reps: int = 8) -> dict[str, Any]:
  """Best and median float32 torch.mm FLOP/s."""
  x = torch.randn(n, n, device=device)
  w = torch.randn(n, n, device=device) / n**0.5
  rates = []
  for trial in range(trials + 1):
    start = time.perf_counter()
    y = x
    for _ in range(reps):
      y = y @ w
    if device == "cuda":
      torch.cuda.synchronize()
    if trial:  # the first is a warm-up
      rates.append(2.0 * n**3 * reps / (time.perf_counter() - start))
  return {"dtype": "float32", "n": n, "threads": torch.get_num_threads(),
          "best_flops": max(rates), "median_flops": float(np.median(rates))}
