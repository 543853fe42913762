"""Writing files. A full disk is one line, not a traceback: `writing(path)` turns an ENOSPC
raised inside its block (by Python's file I/O, or by Orbax/TensorStore, whose errors carry the OS
message in their text) into `DiskFullError("no space left on DEVICE writing PATH")`. A file that
is rewritten is replaced whole (`atomic_open`, `atomic_write`): a reader, or a run killed in
the middle, never sees part of it."""

from __future__ import annotations

import contextlib
import errno
import os
import re

_ENOSPC_TEXT = ("no space left on device", "enospc", "disk quota exceeded")


class DiskFullError(OSError):
  """A write failed for want of space; names the device (the filesystem's source) and the file."""

  def __init__(self, device: str, path: str):
    super().__init__(errno.ENOSPC, f"no space left on {device} writing {path}")
    self.device, self.path = device, path

  def __str__(self):
    return self.args[1]


def is_disk_full(exc: BaseException | None) -> bool:
  """Whether `exc`, or an exception it was raised from, is a full disk (or quota)."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, DiskFullError):
      return True
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if any(t in str(exc).lower() for t in _ENOSPC_TEXT):
      return True
    exc = exc.__cause__ or exc.__context__
  return False


def device_of(path: str) -> str:
  """The device (the mount's source, e.g. /dev/nvme0n1p2 or tmpfs) holding `path`, else its mount point."""
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  mount = path
  while not os.path.ismount(mount):
    mount = os.path.dirname(mount)
  device = None
  try:
    with open("/proc/mounts") as f:
      for line in f:  # the last entry for a mount point is the one on top
        fields = line.split()
        if len(fields) >= 2 and fields[1].replace("\\040", " ") == mount:
          device = fields[0]
  except OSError:
    pass
  return f"{device} ({mount})" if device else mount


def _filename(exc: BaseException | None) -> str | None:
  """The file the failed write was to: the OSError's, else the last quoted absolute path in the
  message (TensorStore: 'Failed writing: "/path/..." ...: No space left on device')."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.filename:
      return str(exc.filename)
    quoted = re.findall(r'"(/[^"]+)"', str(exc))
    if quoted and is_disk_full(exc):
      return quoted[-1]
    exc = exc.__cause__ or exc.__context__
  return None


@contextlib.contextmanager
def writing(path: str):
  """Raises DiskFullError naming the device and the file (the OS's file name when it gives
  one, else `path`) when the block fails on a full disk; other errors pass unchanged."""
  try:
    yield
  except DiskFullError:
    raise
  except BaseException as e:  # pylint: disable=broad-except
    if not is_disk_full(e):
      raise
    target = _filename(e) or path
    raise DiskFullError(device_of(target), target) from e


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs):
  """A file to write `path` through: its block writes `path`.tmp, which replaces `path` (one
  `os.replace`) when the block ends without error, so readers see the old file or the new one,
  never a part. On an error the .tmp file is removed and `path` is left as it was; a full disk
  is a DiskFullError naming the .tmp file (`writing`)."""
  tmp = path + ".tmp"
  try:
    with writing(tmp), open(tmp, mode, **kwargs) as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def atomic_write(path: str, data: str | bytes):
  """Writes `data` (text or bytes) to `path` atomically (`atomic_open`)."""
  with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)
