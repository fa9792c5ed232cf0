"""Checksum manifests of checkpoint steps: what a step's files were when it was saved.

A manifest is a JSON file `{"step", "algorithm": "sha256", "files": {relative path: {"size",
"sha256"}}}` listing every regular file under a step's directory, written atomically
(`write`). `problems` compares a step's directory with one: a file missing, of another size
or of other bytes is damage; files the manifest does not list are ignored, and so is a
missing OPTIONAL_ITEMS item (Orbax's per-step metrics, which only rank steps for "best").
`checkpoints.Checkpoints` decides when manifests are written and what a mismatch means.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from typing import Any

HASH = "sha256"
# Orbax's per-step metrics item (CheckpointManager's METRIC_ITEM_NAME): may be missing.
OPTIONAL_ITEMS = ("metrics",)
_CHUNK = 1 << 20


def file_digest(path: str, algorithm: str = HASH) -> str:
  digest = hashlib.new(algorithm)
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def files_under(directory: str) -> list[str]:
  """Relative paths (with '/') of the regular files under `directory`, sorted."""
  found = []
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      if os.path.isfile(path) and not os.path.islink(path):
        found.append(os.path.relpath(path, directory).replace(os.sep, "/"))
  return sorted(found)


def write(step: int, step_dir: str, target: str) -> None:
  """Writes the manifest of the files under `step_dir` to `target`, atomically."""
  files = {}
  for rel in files_under(step_dir):
    path = os.path.join(step_dir, rel)
    files[rel] = {"size": os.path.getsize(path), HASH: file_digest(path)}
  os.makedirs(os.path.dirname(target), exist_ok=True)
  tmp = f"{target}.tmp-{os.getpid()}"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump({"step": step, "algorithm": HASH, "files": files}, f, indent=1, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, target)
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)


def read(path: str, step: int) -> tuple[dict[str, Any], str] | None:
  """(files, algorithm) of the manifest at `path`; None (logged) when there is none or it
  cannot be parsed: such a manifest proves nothing, and the step is unverified."""
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
    expected = manifest["files"]
    algorithm = manifest.get("algorithm", HASH)
    if algorithm not in hashlib.algorithms_available or not all(
        isinstance(want, dict) and isinstance(want.get("size"), int)
        and isinstance(want.get(algorithm), str) for want in expected.values()):
      raise ValueError("unexpected contents")
  except FileNotFoundError:
    logging.info("Checkpoint step %d has no checksum manifest (%s): restoring it unverified.",
                 step, path)
    return None
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    logging.warning("The checksum manifest %s is unreadable (%s); checkpoint step %d is "
                    "restored unverified.", path, e, step)
    return None
  return expected, algorithm


def problems(step_dir: str, expected: dict[str, Any], algorithm: str) -> list[str]:
  """How the files under `step_dir` differ from the manifest's (empty: they match)."""
  found = []
  for rel, want in sorted(expected.items()):
    file = os.path.join(step_dir, *rel.split("/"))
    if not os.path.isfile(file):
      if rel.split("/")[0] not in OPTIONAL_ITEMS:
        found.append(f"{rel} is missing")
    elif (size := os.path.getsize(file)) != want["size"]:
      found.append(f"{rel} has {size} bytes, {want['size']} when saved")
    elif file_digest(file, algorithm) != want[algorithm]:
      found.append(f"checksum mismatch in {rel}")
  return found
