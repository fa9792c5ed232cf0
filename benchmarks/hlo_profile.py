"""Per-HLO-op time of a compiled step on CPU, from a `jax.profiler` trace.

XLA:CPU records one trace event per executed thunk (named after the HLO instruction);
the XSpace protobuf is read with TensorFlow's copy of `xplane_pb2` (TensorFlow is a
dependency already). Ops are grouped by what they compute, found in the compiled HLO.
"""
from __future__ import annotations

import collections
import glob
import os
import re
from typing import Any

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][\w\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_KIND = re.compile(r"kind=(k\w+)")
# Fusions handed to a kernel library (YNNPACK, XNNPACK, oneDNN): dots, and the odd reduction.
_LIBRARY_FUSION = re.compile(r'"__(?:ynn|xnn|onednn)_fusion"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
MATMUL_OPS = ("dot", "convolution")
# Trace events that are not HLO ops (thread-pool bookkeeping, runtime wrappers).
NOT_OPS = ("SlinkyThreadPool", "ThunkExecutor", "PjRt", "Execute")


def parse_hlo(text: str) -> dict[str, dict[str, Any]]:
  """instruction name -> {opcode, kind, calls, has_matmul} for an optimized HLO module."""
  computations: dict[str, set[str]] = collections.defaultdict(set)
  instructions: dict[str, dict[str, Any]] = {}
  current = None
  for line in text.splitlines():
    match = _INSTRUCTION.match(line)
    if match:
      name, opcode, rest = match.groups()
      calls = _CALLS.findall(rest)
      kind = _KIND.search(rest)
      op_name = _OP_NAME.search(rest)
      instructions[name] = {"opcode": opcode, "kind": kind.group(1) if kind else None,
                            "calls": calls, "library": bool(_LIBRARY_FUSION.search(rest)),
                            "op_name": op_name.group(1) if op_name else ""}
      if current:
        computations[current].add(opcode)
        computations[current].update(f"call:{c}" for c in calls)
      continue
    match = _COMPUTATION.match(line)
    if match and "=" not in line.split("{")[0]:
      current = match.group(1)

  def contains_matmul(comp: str, seen: set[str]) -> bool:
    if comp in seen:
      return False
    seen.add(comp)
    ops = computations.get(comp, set())
    return any(op in MATMUL_OPS for op in ops) or any(
        contains_matmul(op[5:], seen) for op in ops if op.startswith("call:"))

  for info in instructions.values():
    info["has_matmul"] = info["opcode"] in MATMUL_OPS or any(
        contains_matmul(c, set()) for c in info["calls"])
  return instructions


def _lookup(name: str, hlo: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
  return hlo.get(name.removeprefix("end: "))


def category(name: str, hlo: dict[str, dict[str, Any]]) -> str:
  """What an op computes: matmul/conv, elementwise fusion, reduction, copy, ..."""
  info = _lookup(name, hlo)
  if info is None:
    return "other"
  if info["has_matmul"]:
    return "matmul/conv"
  if info["library"]:
    return "library fusion (no dot)"
  opcode, kind = info["opcode"], info["kind"]
  if opcode == "fusion":
    return {"kLoop": "elementwise fusion", "kInput": "reduction fusion"}.get(kind, f"fusion {kind}")
  if opcode in ("copy", "transpose"):
    return "copy/transpose"
  if opcode in ("reduce", "reduce-window"):
    return "reduction"
  if opcode in ("gather", "dynamic-slice", "dynamic-update-slice", "scatter", "sort"):
    return "gather/slice/sort"
  if opcode in ("while", "conditional", "call"):
    return "control flow (body ops counted separately)"
  return opcode


def op_times(trace_dir: str) -> dict[str, dict[str, float]]:
  """{op name: {'seconds', 'count'}} summed over the XLA:CPU threads of the newest trace."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                 key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
  space = xplane_pb2.XSpace()
  with open(paths[-1], "rb") as f:
    space.ParseFromString(f.read())
  times: dict[str, dict[str, float]] = collections.defaultdict(lambda: {"seconds": 0.0,
                                                                         "count": 0})
  for plane in space.planes:
    if not plane.name.startswith("/host:CPU"):
      continue
    for line in plane.lines:
      if "XLA" not in line.name:  # the python thread holds the dispatch, not the ops
        continue
      for event in line.events:
        name = plane.event_metadata[event.metadata_id].name
        if any(name.startswith(p) for p in NOT_OPS):
          continue
        times[name]["seconds"] += event.duration_ps * 1e-12
        times[name]["count"] += 1
  return dict(times)


PARTS = ("stem", "token_mixing", "channel_mixing", "LayerNorm", "pre_head_layer_norm", "head")


def origin(name: str, hlo: dict[str, dict[str, Any]]) -> str:
  """Where an op comes from, by its source op_name: 'forward token_mixing', 'backward head',
  'model other', 'optimizer/input/loss', or 'no source' for ops XLA kept no op_name for
  (e.g. the dots of mixer.layer_norm's written-out LayerNorm)."""
  info = _lookup(name, hlo)
  op_name = info["op_name"] if info else ""
  if not op_name:
    return "no source" if info else "other"
  if "MlpMixer" not in op_name:
    return "optimizer/input/loss"
  phase = "backward" if "transpose(jvp(MlpMixer" in op_name else "forward"
  part = next((p for p in PARTS if f"/{p}" in op_name), "other")
  return f"{phase} {part}"


def group(times: dict[str, dict[str, float]], key: Any) -> dict[str, float]:
  """Seconds summed by key(op name), largest first."""
  totals: dict[str, float] = collections.defaultdict(float)
  for name, t in times.items():
    totals[key(name)] += t["seconds"]
  return dict(sorted(totals.items(), key=lambda kv: -kv[1]))
