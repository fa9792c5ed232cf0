"""Process set-up shared by the entry scripts: XLA:CPU kernels, memory allocator, quiet logs.

The CPU tuning below applies only when JAX will run on CPU (`will_run_on_cpu`, decided
before JAX starts from JAX_PLATFORMS, else from the accelerator plugins installed and the
devices present); on a GPU or TPU node the scripts run untouched.

JAX on CPU allocates and frees hundreds of MB per step; with glibc malloc much of a step
goes to page faults, so the entry scripts re-execute themselves with tcmalloc (Debian:
libtcmalloc-minimal4) preloaded when it is installed. Set MIXER_ALLOCATOR=system to opt out.

XLA:CPU (jaxlib 0.10) hands dots to YNNPACK by default; oneDNN for every dot made the train
step faster (float32 results, max relative error 1e-6 against float64). 'individual_dot'
keeps each dot in its own oneDNN fusion: the 'dot' type also fuses chains of dots, and oneDNN
failed to compile such a chain ("partition compile failed", process killed). Set
MIXER_XLA_CPU=default to opt out; flags already in XLA_FLAGS win. What each of these gained,
measured: docs/BENCHMARKS.md.

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

# Installed distributions that give JAX a non-CPU backend, and the device files it then needs.
ACCELERATOR_PLUGINS = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu")
ACCELERATOR_DEVICES = ("nvidia[0-9]*", "kfd", "accel[0-9]*", "vfio/[0-9]*")

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


def _installed_distributions() -> list[str]:
  return [d.metadata["Name"] or "" for d in importlib.metadata.distributions()]


def accelerator_present(dev: str = "/dev") -> bool:
  """Whether an accelerator plugin for JAX is installed and a device file for one exists."""
  plugin = any(name.lower().startswith(ACCELERATOR_PLUGINS) for name in _installed_distributions())
  return plugin and any(glob.glob(os.path.join(dev, pattern)) for pattern in ACCELERATOR_DEVICES)


def will_run_on_cpu() -> bool:
  """Whether JAX will pick its CPU backend, decided without starting JAX: JAX_PLATFORMS's
  first entry when set, else whether an accelerator is present (`accelerator_present`)."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not accelerator_present()


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


def quiet_cpp_logs() -> None:
  """Hides TensorFlow's C++ INFO banners unless --verbosity is given. TensorFlow only decodes
  data here, so its oneDNN graph rewrites (whose banner ignores the log level) are off."""
  if not verbosity_given():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def prepare_process() -> None:
  """The entry scripts' first call: quiet C++ logs and, when JAX will run on CPU, the XLA:CPU
  flags and the tcmalloc re-exec."""
  quiet_cpp_logs()
  if will_run_on_cpu():
    configure_xla_cpu()
    reexec_with_tcmalloc()


def reexec_argv() -> list[str]:
  """This process's command line with the interpreter's own flags (-X, -W, -u, ...) kept."""
  return [sys.executable, *sys.orig_argv[1:]]


def reexec_with_tcmalloc() -> None:
  """Re-runs this process with tcmalloc preloaded, if available and not already in use."""
  if os.environ.get("MIXER_ALLOCATOR", "tcmalloc") != "tcmalloc" or allocator_in_use() == "tcmalloc":
    return
  library = find_tcmalloc()
  if library is None:
    return
  env = dict(os.environ, LD_PRELOAD=" ".join(filter(None, [library, os.environ.get("LD_PRELOAD")])))
  os.execve(sys.executable, reexec_argv(), env)


def slurm_step_tasks(environ: dict[str, str] | None = None) -> int:
  """Processes of the `srun` step this process is one of (what JAX's SLURM detection will
  use: SLURM_NTASKS, given SLURM_JOB_ID, SLURM_STEP_NODELIST and SLURM_PROCID); 0 outside
  srun (under `sbatch` alone there is no step: one process)."""
  environ = os.environ if environ is None else environ
  if not all(k in environ for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID")):
    return 0
  try:
    return int(environ.get("SLURM_NTASKS", "1"))
  except ValueError:
    return 0


def describe_devices() -> str:
  """One line on where this process computes, e.g. 'JAX 0.10.2 on cpu: 8 devices (cpu) in 1
  process (this is process 0); allocator tcmalloc, XLA:CPU dots onednn'."""
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  line = (f"JAX {jax.__version__} on {jax.default_backend()}: {len(devices)} device(s) "
          f"({', '.join(kinds)}) in {jax.process_count()} process(es), "
          f"{jax.local_device_count()} here (this is process {jax.process_index()})")
  if jax.default_backend() == "cpu":
    line += f"; allocator {allocator_in_use()}, XLA:CPU dots {xla_cpu_dots()}"
  return line


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Orbax warns at every save without eval metrics although the best-step policy expects that.
_NOISE = ("Requested `tracked_metric`",)


def _ours(pathname: str) -> bool:
  relative = os.path.relpath(pathname, ROOT)
  return not relative.startswith((os.pardir, ".venv")) and "site-packages" not in pathname


def _keep_record(record) -> bool:
  if any(noise in str(record.msg) for noise in _NOISE):
    return False
  return record.levelno >= 30 or _ours(record.pathname)  # 30: logging.WARNING


def verbosity_given(argv: list[str] | None = None) -> bool:
  """Whether the command line sets absl's --verbosity (or -v): then every log line shows."""
  argv = sys.argv if argv is None else argv
  return any(a == "-v" or a.startswith(("--verbosity", "-v=")) for a in argv[1:])


def quiet_logs() -> None:
  """The console shows this codebase's INFO lines and everyone's warnings, unless
  --verbosity is given: JAX's backend probe, TFDS's reader and Orbax's per-file INFO lines
  (and their TensorFlow C++ banners, see prepare_process) are hidden."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  if verbosity_given():
    return
  # absl's handler forwards records to its python handler without applying its own filters.
  logging.get_absl_handler().python_handler.addFilter(_keep_record)
