"""Process set-up shared by the entry scripts: the memory allocator and quiet logs.

JAX on CPU allocates and frees hundreds of MB per step; with glibc malloc much of a step
goes to page faults. tcmalloc (Debian: libtcmalloc-minimal4) made a Mixer-Ti/4 train step
1.5x faster on a 2-core CPU VM, so the entry scripts re-execute themselves with it preloaded
when it is installed. Set MIXER_ALLOCATOR=system to opt out.
"""
from __future__ import annotations

import glob
import os
import sys

TCMALLOC_GLOBS = ("/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/libtcmalloc_minimal.so.4",
                  "/usr/lib/*-linux-gnu/libtcmalloc.so.4")


def find_tcmalloc() -> str | None:
  for pattern in TCMALLOC_GLOBS:
    found = sorted(glob.glob(pattern))
    if found:
      return found[0]
  return None


def allocator_in_use() -> str:
  """'tcmalloc' when it is preloaded into this process, else 'system'."""
  return "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "system"


def reexec_with_tcmalloc() -> None:
  """Re-runs this process with tcmalloc preloaded, if available and not already in use."""
  if os.environ.get("MIXER_ALLOCATOR", "tcmalloc") != "tcmalloc" or allocator_in_use() == "tcmalloc":
    return
  library = find_tcmalloc()
  if library is None:
    return
  env = dict(os.environ, LD_PRELOAD=" ".join(filter(None, [library, os.environ.get("LD_PRELOAD")])))
  os.execve(sys.executable, [sys.executable] + sys.argv, env)


def quiet_orbax_logs() -> None:
  """Orbax logs every file it writes at INFO; keep its warnings only."""
  import logging as std_logging  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  keep = lambda r: r.levelno >= std_logging.WARNING or "/orbax/" not in r.pathname
  # absl's handler forwards records to its python handler without applying its own filters.
  logging.get_absl_handler().python_handler.addFilter(keep)
