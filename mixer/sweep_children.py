"""A sweep's child processes: train.py started so that it stops cleanly and never outlives the
sweep. `start_child` puts it in a session of its own (Ctrl-C reaches the sweep only) that gets
SIGTERM when the sweep dies, even by SIGKILL (Linux, `die_with_parent`); `run_child` runs it
to its end with its output in a log; `Stopper` turns the sweep's SIGTERM/Ctrl-C into a
SIGTERM to every running child (train.py saves a checkpoint and exits).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import Any, Callable, Mapping

from mixer import sweeps


class Stopper:
  """On SIGTERM/SIGINT (once entered) or `stop()`: start no more trials and stop the running
  ones (`add`: a train.py's terminate, a job's cancel: train.py saves and exits)."""

  def __init__(self):
    self.requested = False
    self._stops: set[Callable[[], None]] = set()
    self._lock = threading.Lock()
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> "Stopper":
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def _handle(self, signum, frame) -> None:
    del frame
    logging.warning("%s received: stopping the running trials (they save a checkpoint).",
                    signal.Signals(signum).name)
    self.stop()

  def stop(self) -> None:
    with self._lock:
      self.requested = True
      for stop in self._stops:
        stop()

  def add(self, stop: Callable[[], None]) -> None:
    with self._lock:
      self._stops.add(stop)
      if self.requested:
        stop()

  def remove(self, stop: Callable[[], None]) -> None:
    with self._lock:
      self._stops.discard(stop)


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent_pid: int | None = None) -> Callable[[], None] | None:
  """A Popen `preexec_fn`: the child gets SIGTERM when its parent dies (Linux only).

  The child asks the kernel for SIGTERM on its parent's death (prctl PR_SET_PDEATHSIG), or
  ends itself at once if the parent (`parent_pid`, default this process) already died. The
  kernel signals when the *thread* that started the child ends, so start it from a thread
  that outlives it (run_child waits in it). None off Linux or without prctl: there a child
  outlives a killed sweep, and the next sweep finds it through its lock.
  """
  if not sys.platform.startswith("linux"):
    return None
  try:
    prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
  except (OSError, AttributeError):
    return None
  prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
  parent = os.getpid() if parent_pid is None else parent_pid
  sigterm, default = signal.SIGTERM, signal.SIG_DFL

  def preexec() -> None:  # runs in the forked child before exec: no logging, no locks
    # The sweep's own SIGTERM handler came along with the fork; a signal caught by it here
    # would be lost at exec, so take the default action (die) until train.py sets its own.
    signal.signal(sigterm, default)
    prctl(_PR_SET_PDEATHSIG, int(sigterm), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl: no signal would come
      os.kill(os.getpid(), sigterm)

  return preexec


def start_child(command: list[str], **popen_kwargs: Any) -> subprocess.Popen:
  """subprocess.Popen(command, ...) in a session of its own that dies with this process.

  A session of its own: Ctrl-C in the terminal reaches the sweep only, which then stops
  its trials cleanly (Stopper). `die_with_parent` ends the child if the sweep is killed.
  """
  return subprocess.Popen(command, start_new_session=True, preexec_fn=die_with_parent(),
                          cwd=sweeps.ROOT, **popen_kwargs)


def run_child(command: list[str], log_path: str, stopper: Stopper,
              env: Mapping[str, str] | None = None) -> subprocess.Popen:
  """Runs `command` to its end, its output appended to `log_path`; `stopper` can stop it."""
  with open(log_path, "a", encoding="utf-8") as log:
    proc = start_child(command, stdout=log, stderr=subprocess.STDOUT,
                       env={**os.environ, **(env or {})})
    stopper.add(proc.terminate)
    try:
      proc.wait()
    finally:
      stopper.remove(proc.terminate)
  return proc
