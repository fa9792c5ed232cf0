"""Where a run's scalars go: TensorBoard events (clu) and `metrics.jsonl`, on process 0 only."""
from __future__ import annotations

import json
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers

from mixer import workdir as layout


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


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard events and `workdir/metrics.jsonl`, on process 0 only.

  No logging writer: the console gets one line per log step from `mixer.progress`.
  """
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  return metric_writers.MultiWriter([metric_writers.SummaryWriter(workdir),
                                     JsonlWriter(layout.path(workdir, layout.METRICS_FILE))])
