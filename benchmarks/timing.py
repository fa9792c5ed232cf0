"""Measurement helpers: step-time summaries, a compile counter, peak memory."""
from __future__ import annotations

import ctypes
import resource
from typing import Any

import jax
import numpy as np

# Jitted functions held for the life of the process. On XLA:CPU with dots on oneDNN, freeing
# one just after its call returned can still abort the process ("Check failed:
# available_.size() == num_created_", mixer/runtime.py): seen in device_check.py --quick under
# load, from the matmul chain's fori_loop. A few executables are cheap to keep.
_KEPT_ALIVE: list[Any] = []


def keep_alive(fn: Any) -> Any:
  """Returns `fn`, never freed while the process runs."""
  _KEPT_ALIVE.append(fn)
  return fn

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
  """Counts XLA backend compilations (and their seconds) via jax.monitoring."""

  def __init__(self):
    self.count = 0
    self.seconds = 0.0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event: str, duration: float, **kwargs: Any) -> None:
    del kwargs
    if event == BACKEND_COMPILE_EVENT:
      self.count += 1
      self.seconds += duration


def summarize(seconds: list[float], batch_size: int) -> dict[str, float]:
  """Median step time and the images/s it gives, plus the spread."""
  median = float(np.median(seconds))
  return {"steps": len(seconds), "median_s": median, "min_s": float(min(seconds)),
          "max_s": float(max(seconds)), "img_per_s": batch_size / median}


def release_free_memory() -> str | None:
  """Returns freed heap memory to the OS (tcmalloc keeps it otherwise), so that the next
  config's peak RSS does not start from the previous one's high-water mark."""
  process = ctypes.CDLL(None)
  for symbol, args in (("MallocExtension_ReleaseFreeMemory", ()), ("malloc_trim", (0,))):
    try:
      getattr(process, symbol)(*args)
      return symbol
    except AttributeError:
      continue
  return None


def reset_peak_rss() -> bool:
  """Resets this process's VmHWM (Linux: `echo 5 > /proc/self/clear_refs`)."""
  try:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
      f.write("5")
    return True
  except OSError:
    return False


def peak_rss_bytes() -> int:
  """Peak resident set size since the last reset (VmHWM), else since the process start."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_peak_bytes(device: jax.Device) -> int | None:
  """The backend's peak bytes in use (GPU/TPU); None where it reports nothing (CPU)."""
  stats = device.memory_stats()
  if not stats:
    return None
  return stats.get("peak_bytes_in_use")
