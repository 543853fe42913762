"""One workdir, one run: an exclusive OS lock (`fcntl.flock`) on a file in the run's workdir.

The lock belongs to the open file, so it dies with the process that holds it: a run killed by
SIGKILL (or a crashed host) leaves the file behind but never blocks a restart. The file holds
the holder's host and pid, for the message that refuses a second run.

Multi-process runs: every process of a job locks its own file (`train.lock.process<i>`), so the
processes of one job never contend with each other, while a second job on the same workdir
meets the first job's lock in each of its processes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket


class WorkdirLockedError(RuntimeError):
  """Another live process holds the workdir."""


def lock_path(workdir: str, process_index: int = 0) -> str:
  return os.path.join(workdir, f"train.lock.process{process_index}")


def _holder(path: str) -> str:
  try:
    with open(path) as f:
      info = json.loads(f.read() or "{}")
    return f"host {info.get('host', '?')}, pid {info.get('pid', '?')}"
  except (OSError, ValueError):
    return "host ?, pid ?"


class WorkdirLock:
  """`acquire()` or raise WorkdirLockedError naming the holder; `release()` (idempotent)."""

  def __init__(self, workdir: str, process_index: int = 0):
    self.workdir = os.path.abspath(workdir)
    self.path = lock_path(self.workdir, process_index)
    self._fd: int | None = None

  def acquire(self) -> "WorkdirLock":
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise WorkdirLockedError(f"workdir {self.workdir} is in use by another run ({_holder(self.path)}, "
                                 f"lock {self.path}); stop it or choose another workdir") from None
      raise
    # Ours now: whatever a killed holder wrote is replaced by this process's host and pid.
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode(), 0)
    self._fd = fd
    return self

  def release(self):
    if self._fd is not None:
      fd, self._fd = self._fd, None
      try:
        fcntl.flock(fd, fcntl.LOCK_UN)
      finally:
        os.close(fd)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


@contextlib.contextmanager
def hold(workdir: str, process_index: int = 0):
  """Holds the workdir's lock for the duration of the block."""
  with WorkdirLock(workdir, process_index) as lock:
    yield lock
