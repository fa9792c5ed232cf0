"""Stopping a run cleanly on a signal: finish the step, save, exit (resumable).

SIGTERM (and SIGUSR2, a scheduler's usual time-limit warning, and SIGINT: Ctrl-C) only sets a
flag; the training loop asks `StopSignal.agreed(step)` after every step. With several
processes the flags are shared so that all stop after the same step.
"""
from __future__ import annotations

import logging
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

# With several processes, they compare their SIGTERM flags every this many steps and stop
# together: one process stopping alone would leave the others waiting forever at the next
# collective. SLURM's grace period after SIGTERM (KillWait) is 30 s by default.
STOP_SYNC_STEPS = 10


class StopSignal:
  """Records SIGTERM (or SIGUSR2, a scheduler's usual time-limit warning, or SIGINT: Ctrl-C)
  so that the loop can finish its step, save and exit cleanly. A second Ctrl-C gets Python's
  default handling (KeyboardInterrupt: abort at once, unsaved)."""

  SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)

  def __init__(self):
    self.received = False
    self.name = "SIGTERM"  # of the signal received (SIGTERM when another process got one)
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      # A SIGINT ignored on purpose (e.g. `nohup ... &`) stays ignored.
      signals = [s for s in self.SIGNALS
                 if s != signal.SIGINT or signal.getsignal(s) is not signal.SIG_IGN]
      self._previous = {s: signal.signal(s, self._handle) for s in signals}

  def _handle(self, signum, frame):
    del frame
    again = ""
    if signum == signal.SIGINT:
      signal.signal(signum, self._previous[signum] or signal.SIG_DFL)  # the next one aborts
      again = " (Ctrl-C again to abort without saving)"
    logging.warning("%s received: finishing the current step, then saving%s.",
                    signal.Signals(signum).name, again)
    self.received, self.name = True, signal.Signals(signum).name

  def agreed(self, step: int) -> bool:
    """Whether to stop after `step`. One process: once SIGTERM came. Several: every
    STOP_SYNC_STEPS steps all processes share their flags and stop together if any has it."""
    if jax.process_count() == 1:
      return self.received
    if step % STOP_SYNC_STEPS:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.received))
    if np.any(flags) and not self.received:
      logging.warning("Another process received SIGTERM: stopping together after step %d.",
                      step)
    return bool(np.any(flags))

  def restore(self):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
