"""The console of a run: one line per log step and one per evaluation.

  step 1200/5850 (20.5%) | loss 3.120 | top1 24.1% | lr 1.9e-03 | 281 img/s | ETA 27m
  eval step 1528 | val top1 35.2% loss 2.610 | eval top1 33.4% top5 62.0% loss 2.700 | 25s

The ETA is the remaining steps times a moving average of the seconds per training step,
measured over windows that exclude compilation, evaluation and checkpointing, so it does
not jump when an evaluation runs.
"""
from __future__ import annotations

from typing import Any, Mapping


def format_duration(seconds: float) -> str:
  """45s, 27m, 3h43m, 2d4h."""
  seconds = max(0.0, seconds)
  if seconds < 60:
    return f"{seconds:.0f}s"
  minutes = int(round(seconds / 60))
  if minutes < 60:
    return f"{minutes}m"
  hours, minutes = divmod(minutes, 60)
  if hours < 48:
    return f"{hours}h{minutes:02d}m"
  days, hours = divmod(hours, 24)
  return f"{days}d{hours}h"


class Progress:
  """Turns timed windows of training steps into img/s and a stable ETA."""

  def __init__(self, total_steps: int, batch_size: int, smoothing: float = 0.3):
    self.total_steps, self.batch_size, self.smoothing = total_steps, batch_size, smoothing
    self.seconds_per_step: float | None = None

  def record(self, steps: int, seconds: float) -> None:
    """A window of `steps` training steps that took `seconds` (nothing else in it)."""
    if steps <= 0 or seconds <= 0:
      return
    rate = seconds / steps
    if self.seconds_per_step is None:
      self.seconds_per_step = rate
    else:
      self.seconds_per_step += self.smoothing * (rate - self.seconds_per_step)

  @property
  def img_per_sec(self) -> float | None:
    return self.batch_size / self.seconds_per_step if self.seconds_per_step else None

  def eta_seconds(self, step: int) -> float | None:
    if self.seconds_per_step is None:
      return None
    return (self.total_steps - step) * self.seconds_per_step

  def line(self, step: int, scalars: Mapping[str, Any]) -> str:
    parts = [f"step {step}/{self.total_steps} ({100 * step / self.total_steps:.1f}%)",
             f"loss {float(scalars['train/loss']):.3f}",
             f"top1 {100 * float(scalars['train/top1']):.1f}%",
             f"lr {float(scalars['lr']):.1e}"]
    if self.img_per_sec is not None:
      parts.append(f"{self.img_per_sec:.0f} img/s")
      parts.append(f"ETA {format_duration(self.eta_seconds(step))}")
    return " | ".join(parts)


def eval_line(step: int, results: Mapping[str, Any], seconds: float) -> str:
  """One line for an evaluation of one or more splits (`{prefix}/top1`, ... keys)."""
  parts = [f"eval step {step}"]
  prefixes = sorted({k.split("/")[0] for k in results if k.endswith("/top1")},
                    key=lambda p: (p != "val", p))
  for p in prefixes:
    top5 = results.get(f"{p}/top5")
    parts.append(" ".join(filter(None, [
        f"{p} top1 {100 * results[f'{p}/top1']:.2f}%",
        f"top5 {100 * top5:.2f}%" if top5 is not None else "",
        f"loss {results[f'{p}/loss']:.3f}"])))
  shots = sorted((k for k in results if k.startswith("fewshot/")),
                 key=lambda k: int(k.split("/")[1].rstrip("shot")))
  if shots:
    parts.append("fewshot " + " ".join(
        f"{k.split('/')[1]} {100 * results[k]:.2f}%" for k in shots))
  parts.append(format_duration(seconds))
  return " | ".join(parts)
