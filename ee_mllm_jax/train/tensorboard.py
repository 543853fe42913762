"""TensorBoard event files beside metrics.jsonl: `MetricsFile` hands each record it writes to
`EventFile`, which writes its numeric fields as scalars at the record's step (tags by `tag`:
train/loss, perf/mfu, eval/val_accuracy, skipped/records_skipped, ...), so the two never disagree.
`tensorboard --logdir WORKDIR` shows them (TensorBoard itself is installed separately).

The file is framed and encoded with tensorboardX's pieces (its masked CRC32C and its Event /
Summary protos), written synchronously and flushed with each record as metrics.jsonl is:
SummaryWriter's queue thread leaves events unwritten at a flush, and it names its files by the
second, so a run restarted within the second would truncate the previous run's file.

A resumed run must not show the steps it redoes twice. Each run writes a new file, named so that
files sort in creation order (the order TensorBoard reads a run's files in), which starts with a
SessionLog.START at step `start + 1`: what tensorboardX's SummaryWriter(purge_step=start + 1)
writes. TensorBoard's Python loader then drops the events of earlier files at steps > start (the
records metrics.jsonl drops). Its Rust data server ignores SessionLog and drops a series' points
from step s on when a point at step s comes: a redone step's points go once the resumed run logs
that series again, so until then it still shows what the killed run logged past the checkpoint
for series the resumed run has not reached (an evaluation not yet redone; the throughput of the
first step after the resume, which compiles and has none).
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time
from typing import Any

from ee_mllm_jax import storage

PERF = ("tokens_per_s", "step_time_s", "flops_per_s", "mfu")  # progress.Interval.rates
SKIPPED = ("records_skipped", "updates_skipped")  # counts so far (train.loop._log)
NOT_PLOTTED = ("step", "finite", "applied", "params_finite")  # the step; flags summed up in SKIPPED


def tag(kind: str, key: str) -> str:
  """The TensorBoard tag of field `key` of a `kind` ("train" or "eval") record."""
  if kind == "eval":
    return f"eval/{key}"
  return f"{'perf' if key in PERF else 'skipped' if key in SKIPPED else 'train'}/{key}"


def scalars(record: dict[str, Any], kind: str) -> dict[str, float]:
  """The record's numeric fields, but the step and the flags, as {tag: value}."""
  return {tag(kind, k): float(v) for k, v in record.items()
          if k not in NOT_PLOTTED and isinstance(v, (int, float))}


def _tensorboardx():
  """tensorboardX's record CRC and protos. Its package imports torch when torch is installed
  (only to accept torch tensors): 2 s and 180 MB in a trainer that never passes one. Unless
  torch is already loaded, it is imported with torch hidden (0.05 s); torch imports normally
  afterwards."""
  if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
    sys.modules["torch"] = None  # `import torch` raises ImportError while this stands
    try:
      import tensorboardX  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:  # a tensorboardX that needs torch after all: imported below with it
      for name in [m for m in sys.modules if m.split(".")[0] == "tensorboardX"]:
        del sys.modules[name]
    finally:
      if sys.modules.get("torch", 0) is None:
        del sys.modules["torch"]
  try:
    from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
    from tensorboardX.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as e:
    if e.name != "tensorboardX":
      raise
    raise ModuleNotFoundError("TensorBoard events need tensorboardX, a core dependency: pip install tensorboardX "
                              "(or run with --config.tensorboard=False)", name=e.name) from e
  return record_writer, event_pb2, summary_pb2


class EventFile:
  """A new event file in `logdir` for a run that starts at step `start` (see the module's note)."""

  def __init__(self, logdir: str, start: int):
    self._record_writer, self._event_pb2, self._summary_pb2 = _tensorboardx()
    ns = time.time_ns()
    self.path = os.path.join(logdir, f"events.out.tfevents.{ns // 10**9}.{ns % 10**9:09d}."
                             f"{socket.gethostname()}.{os.getpid()}")
    with storage.writing(self.path):
      self._file = open(self.path, "xb")  # never an existing file
    event = self._event_pb2.Event
    self._write(event(wall_time=time.time(), file_version="brain.Event:2"))
    self._write(event(wall_time=time.time(), step=start + 1,
                      session_log=self._event_pb2.SessionLog(status=self._event_pb2.SessionLog.START)))
    self.flush()

  def write(self, record: dict[str, Any], kind: str):
    """One event at the record's step with a scalar per numeric field (`scalars`)."""
    values = [self._summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars(record, kind).items()]
    if values:
      self._write(self._event_pb2.Event(wall_time=time.time(), step=int(record["step"]),
                                        summary=self._summary_pb2.Summary(value=values)))

  def _write(self, event):
    """A TFRecord: length, its masked CRC32C, the serialized event, its masked CRC32C."""
    data = event.SerializeToString()
    header = struct.pack("<Q", len(data))
    crc = lambda b: struct.pack("<I", self._record_writer.masked_crc32c(b))
    with storage.writing(self.path):
      self._file.write(header + crc(header) + data + crc(data))

  def flush(self):
    with storage.writing(self.path):
      self._file.flush()

  def close(self):
    if not self._file.closed:
      try:
        with storage.writing(self.path):
          self._file.flush()
          os.fsync(self._file.fileno())
      finally:
        self._file.close()
