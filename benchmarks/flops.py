"""Model FLOPs counted from the shapes, XLA's own count, and the device's matmul peak.

The count from the shapes (and its convention) is the library's: mixer/budget.py, which
training budgets (`budget_pflop`) use too.
"""
from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixer.budget import forward_flops, train_flops_per_image  # pylint: disable=unused-import

import timing  # benchmarks/, on sys.path as for every script here


def xla_flops(compiled: Any) -> float | None:
  """FLOPs of one call of a compiled computation according to XLA's cost analysis."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    return None
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def peak_dtype(platform: str) -> jnp.dtype:
  """float32 on CPU; bfloat16 where the matrix units are (GPU, TPU)."""
  return jnp.dtype(jnp.float32 if platform == "cpu" else jnp.bfloat16)


def jax_matmul_peak(platform: str, trials: int = 5, dtype: Any = None,
                    n: int | None = None) -> dict[str, Any]:
  """Best and median FLOP/s of a jitted chain of square matmuls on the default device, in
  `dtype` (default: peak_dtype(platform)) at size n x n (default: 2048 on CPU, else 8192)."""
  dtype = jnp.dtype(dtype or peak_dtype(platform))
  n, reps = (n or 2048, 8) if platform == "cpu" else (n or 8192, 50)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n, n)), dtype)
  w = jnp.asarray(rng.standard_normal((n, n)) / np.sqrt(n), dtype)  # keeps |x| stable
  chain = timing.keep_alive(
      jax.jit(lambda x, w: jax.lax.fori_loop(0, reps, lambda _, y: y @ w, x)))
  chain(x, w).block_until_ready()
  rates = []
  for _ in range(trials):
    start = time.perf_counter()
    chain(x, w).block_until_ready()
    rates.append(2.0 * n**3 * reps / (time.perf_counter() - start))
  return {"dtype": dtype.name, "n": n, "best_flops": max(rates),
          "median_flops": float(np.median(rates))}
