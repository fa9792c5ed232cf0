"""Losses, accuracies, and the run's metrics.jsonl (read and trimmed; written by `writers`)."""
from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import optax

from mixer import errors


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy against (soft) targets, in float32."""
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """1.0 where the label is among the k highest logits (ties: lower class first), per example.

  Counts the classes ranked above the label instead of calling lax.top_k, which XLA does not
  partition over the batch: with top_k every device gathered the whole batch's logits.
  """
  label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  classes = jnp.arange(logits.shape[-1])
  above = (logits > label_logit) | ((logits == label_logit) & (classes < labels[:, None]))
  return (jnp.sum(above, axis=-1) < k).astype(jnp.float32)


def truncate_jsonl(path: str, after_step: int) -> None:
  """Drops rows logged after `after_step` (they are re-run after a resume), and a torn last
  line (see read_jsonl)."""
  if not os.path.exists(path):
    return
  rows = [row for row in read_jsonl(path) if row["step"] <= after_step]
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)


def read_jsonl(path: str) -> list[dict[str, float]]:
  """The rows of a metrics.jsonl. A last line that is not JSON is dropped with a warning:
  it is what a process killed while writing it leaves. A bad line before the last is
  corruption: WorkdirError naming the file and the line."""
  with open(path, encoding="utf-8") as f:
    lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
  rows = []
  for i, (number, line) in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i < len(lines) - 1:
        raise errors.WorkdirError(
            f"{path} line {number} is not JSON ({e.msg}, column {e.colno}) and is not the last "
            "line: the file is corrupt. Delete or repair that line.") from None
      logging.warning("Dropping the last line of %s (line %d): it is not JSON (%s), as a "
                      "process killed while writing it leaves it.", path, number, e.msg)
  return rows
