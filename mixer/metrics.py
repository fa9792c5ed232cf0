"""Losses, accuracies and metric writers (clu: TensorBoard + logging, plus metrics.jsonl)."""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metric_writers


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy against (soft) targets, in float32."""
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """1.0 where the label is among the k highest logits, per example."""
  _, top = jax.lax.top_k(logits, k)
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


class JsonlWriter(metric_writers.MetricWriter):
  """Appends one JSON object per write: {"step": ..., name: value, ...}."""

  def __init__(self, path: str):
    self.path = path
    self._file = open(path, "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    row = {"step": int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()

  def write_summaries(self, step, values, metadata=None): pass
  def write_images(self, step, images): pass
  def write_videos(self, step, videos): pass
  def write_audios(self, step, audios, *, sample_rate): pass
  def write_texts(self, step, texts): pass
  def write_histograms(self, step, arrays, num_buckets=None): pass
  def write_hparams(self, hparams): pass
  def flush(self): self._file.flush()
  def close(self): self._file.close()


def truncate_jsonl(path: str, after_step: int) -> None:
  """Drops rows logged after `after_step` (they are re-run after a resume)."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    rows = [line for line in f if line.strip() and json.loads(line)["step"] <= after_step]
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(rows)


def read_jsonl(path: str) -> list[dict[str, float]]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard events and logging via clu, plus `workdir/metrics.jsonl` (process 0 only)."""
  if jax.process_index() > 0:
    return metric_writers.create_default_writer(workdir, just_logging=True)
  default = metric_writers.create_default_writer(workdir, asynchronous=False)
  return metric_writers.MultiWriter([default, JsonlWriter(os.path.join(workdir, "metrics.jsonl"))])
