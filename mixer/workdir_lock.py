"""One writer per run: `WORKDIR/lock.json` names the train.py process that owns the workdir.

The lock holds the host, pid, start time and a heartbeat (refreshed at log steps). A second
train.py on the same workdir is refused, naming the holder. A lock is stale, and is taken
over with a warning, when its process is gone (same host) or its heartbeat is older than
`STALE_AFTER_S` (another host, e.g. a cluster job requeued on a new node). Readers
(evaluate.py, predict.py, export.py) never take the lock: they read finished checkpoints only.
In a multi-process run process 0 holds it.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import socket
import time
from typing import Any

from mixer import errors
from mixer import workdir as layout

# A holder on another host whose heartbeat is older than this is presumed dead. Log steps
# refresh it, so keep log_every_steps well under this many seconds of training.
STALE_AFTER_S = 15 * 60


class WorkdirLocked(errors.BusyError):
  """Another live process holds the workdir."""


def read_lock(workdir: str, lock_file: str = layout.LOCK_FILE) -> dict[str, Any] | None:
  """The lock's content ({host, pid, start_time, heartbeat}), or None when unlocked/unreadable."""
  try:
    with open(layout.path(workdir, lock_file), encoding="utf-8") as f:
      info = json.load(f)
  except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
    return None
  return info if isinstance(info, dict) else None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


def holder_alive(info: dict[str, Any], now: float | None = None) -> bool:
  """Whether the lock's holder still runs: its pid (same host) or a fresh heartbeat (other host)."""
  now = time.time() if now is None else now
  if info.get("host") == socket.gethostname():
    return _pid_alive(int(info.get("pid", -1)))
  return now - float(info.get("heartbeat", 0)) < STALE_AFTER_S


def describe(info: dict[str, Any]) -> str:
  beat = datetime.datetime.fromtimestamp(float(info.get("heartbeat", 0))).isoformat(
      sep=" ", timespec="seconds")
  return (f"pid {info.get('pid')} on {info.get('host')} (started {info.get('start_time')}, "
          f"last heartbeat {beat})")


class WorkdirLock:
  """Holds `WORKDIR/lock.json` from `acquire()` to `release()`; `heartbeat()` at log steps.

  `lock_file` names another lock in the same directory (a sweep's claim on a trial)."""

  def __init__(self, workdir: str, lock_file: str = layout.LOCK_FILE):
    self.workdir, self.lock_file = workdir, lock_file
    self.path = layout.path(workdir, lock_file)
    self.info = {"host": socket.gethostname(), "pid": os.getpid(),
                 "start_time": datetime.datetime.now().isoformat(sep=" ", timespec="seconds"),
                 "heartbeat": time.time()}
    self.held = False

  def acquire(self) -> None:
    """Takes the lock, or raises WorkdirLocked naming the live holder."""
    for _ in range(3):  # a racing taker may remove a stale lock between our attempts
      try:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        holder = read_lock(self.workdir, self.lock_file)
        if holder is None:  # being written right now, or garbled: look again shortly
          time.sleep(0.2)
          holder = read_lock(self.workdir, self.lock_file)
        if holder is not None and holder_alive(holder):
          if holder.get("pid") == os.getpid() and holder.get("host") == self.info["host"]:
            self.held = True  # this process already holds it (e.g. train_and_evaluate twice)
            self._write()
            return
          raise WorkdirLocked(
              f"{self.workdir} is in use by another train.py: {describe(holder)}. Wait for it "
              f"to finish or stop it; if that process is gone, delete {self.path}.")
        logging.warning("Taking over a stale lock in %s (%s).", self.workdir,
                        describe(holder) if holder else "unreadable lock file")
        with contextlib.suppress(FileNotFoundError):
          os.remove(self.path)
        continue
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(self.info, f)
      self.held = True
      return
    raise WorkdirLocked(f"Could not take the lock {self.path}: another process keeps "
                        "replacing it.")

  def _write(self) -> None:
    tmp = f"{self.path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(self.info, f)
    os.replace(tmp, self.path)

  def heartbeat(self) -> None:
    """Refreshes the heartbeat; never fails the run (a full disk is reported elsewhere)."""
    if not self.held:
      return
    self.info["heartbeat"] = time.time()
    try:
      self._write()
    except OSError as e:
      if e.errno != errno.ENOSPC:
        logging.warning("Could not refresh %s: %s", self.path, e)

  def release(self) -> None:
    if not self.held:
      return
    self.held = False
    holder = read_lock(self.workdir, self.lock_file)
    if holder and holder.get("pid") == self.info["pid"] and holder.get("host") == self.info["host"]:
      with contextlib.suppress(FileNotFoundError):
        os.remove(self.path)


def check_usable(workdir: str, lock_holder: bool = True) -> None:
  """Fails fast on a workdir that cannot hold a run (before any data is read): a file, or
  locked by another live train.py. `lock_holder`: this process takes the lock (multi-process
  runs: process 0 only, which checks for all)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.WorkdirError(f"--workdir={workdir} is a file, not a directory.")
  if not lock_holder:
    return
  holder = read_lock(workdir) if os.path.isdir(workdir) else None
  if holder and holder_alive(holder) and holder.get("pid") != os.getpid():
    raise WorkdirLocked(f"{workdir} is in use by another train.py: {describe(holder)}.")
