"""Process set-up shared by the entry scripts: XLA:CPU kernels, memory allocator, quiet logs.

JAX on CPU allocates and frees hundreds of MB per step; with glibc malloc much of a step
goes to page faults. tcmalloc (Debian: libtcmalloc-minimal4) made a Mixer-Ti/4 train step
1.5x faster on a 2-core CPU VM, so the entry scripts re-execute themselves with it preloaded
when it is installed. Set MIXER_ALLOCATOR=system to opt out.

XLA:CPU (jaxlib 0.10) hands dots to YNNPACK by default. On the same VM, oneDNN for every dot
made the train step faster: Mixer-S/4 18.9 -> 22.7 img/s, Ti/4 204 -> 256, B/16 2.3 -> 2.4-2.5
(float32 results, max relative error 1e-6 against float64). Part of the gain: YNNPACK left
the weight-gradient dots with a transposed operand to Eigen, whose asynchronous work then
competed for the two cores with the next YNNPACK dot. 'individual_dot' keeps each dot in its
own oneDNN fusion: the 'dot' type also fuses chains of dots, and oneDNN failed to compile
such a chain ("partition compile failed", process killed). Set MIXER_XLA_CPU=default to opt
out; flags already in XLA_FLAGS win.

Known XLA bug with these flags (jaxlib 0.10.2): freeing a compiled function while a call of
it still runs aborts the process ("Check failed: available_.size() == num_created_" in
~OneDnnFusionThunk), e.g. `jax.jit(lambda x: x @ w)(x)` with the result not yet waited for.
The scripts keep their compiled steps alive and wait for results before dropping them; code
of your own run under these flags should do the same (`jax.block_until_ready`).
"""
from __future__ import annotations

import glob
import importlib.metadata
import os
import sys

ONEDNN_DOT_FLAGS = ("--xla_cpu_use_onednn=true",
                    "--xla_cpu_experimental_onednn_fusion_type=individual_dot",
                    "--xla_cpu_experimental_ynn_fusion_type=-dot")
# The flags above are experimental: only set them for the jaxlib they were measured with.
ONEDNN_DOT_JAXLIB = "0.10."

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


def _jaxlib_version() -> str:
  try:
    return importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return ""


def configure_xla_cpu() -> None:
  """Adds ONEDNN_DOT_FLAGS to XLA_FLAGS (inherited by child processes); call before JAX starts."""
  if os.environ.get("MIXER_XLA_CPU", "onednn") != "onednn":
    return
  if not _jaxlib_version().startswith(ONEDNN_DOT_JAXLIB):
    return
  current = os.environ.get("XLA_FLAGS", "")
  if any(flag.split("=")[0] in current for flag in ONEDNN_DOT_FLAGS):
    return
  os.environ["XLA_FLAGS"] = " ".join(filter(None, [current, *ONEDNN_DOT_FLAGS]))


def xla_cpu_dots() -> str:
  """'onednn' when this process's XLA_FLAGS give dots to oneDNN, else 'default'."""
  return "onednn" if ONEDNN_DOT_FLAGS[1] in os.environ.get("XLA_FLAGS", "") else "default"


def prepare_process() -> None:
  """The entry scripts' first call: XLA:CPU flags, then the tcmalloc re-exec."""
  configure_xla_cpu()
  reexec_with_tcmalloc()


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
