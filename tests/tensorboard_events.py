"""Reading a run's TensorBoard event files as TensorBoard does, without TensorBoard: TFRecord
framing with both masked CRC32C checked, tensorboardX's Event proto, and the two ways TensorBoard
hides the steps a resumed run redid."""

import glob
import json
import os
import struct

from ee_mllm_jax.train import tensorboard

_, event_pb2, _ = tensorboard._tensorboardx()  # pylint: disable=protected-access
from tensorboardX.record_writer import masked_crc32c  # noqa: E402  pylint: disable=g-import-not-at-top
from tensorboardX.crc32c import crc32c  # noqa: E402  pylint: disable=g-import-not-at-top

assert crc32c(b"123456789") == 0xE3069283  # CRC-32C's check value: the CRC below is the real one


def event_files(logdir: str) -> list[str]:
  """The run's event files in the order TensorBoard reads them (by name)."""
  return sorted(glob.glob(os.path.join(logdir, "*tfevents*")))


def read_events(path: str) -> tuple[list, bool]:
  """(the file's events, whether it ends in a torn record). A torn last record (a writer killed
  mid-write) ends the file, as it does for TensorBoard; a bad CRC anywhere is an error."""
  with open(path, "rb") as f:
    data = f.read()
  events, i = [], 0
  while i < len(data):
    if len(data) - i < 12:
      return events, True
    header = data[i:i + 8]
    (length,) = struct.unpack("<Q", header)
    assert struct.unpack("<I", data[i + 8:i + 12])[0] == masked_crc32c(header), f"{path}@{i}: length CRC"
    if len(data) - i < 16 + length:
      return events, True
    body = data[i + 12:i + 12 + length]
    assert struct.unpack("<I", data[i + 12 + length:i + 16 + length])[0] == masked_crc32c(body), f"{path}@{i}: CRC"
    events.append(event_pb2.Event.FromString(body))
    i += 16 + length
  return events, False


def read_scalars(logdir: str, purge: str) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} as TensorBoard shows a run. `purge`: "session_log" (its Python loader:
  a SessionLog.START at step s drops every point at steps >= s read before it), "preemption"
  (its Rust data server: a point at step s drops the points of its series at steps >= s) or
  "none" (every point; a step shown twice is an error)."""
  series: dict[str, list[tuple[int, float]]] = {}
  for path in event_files(logdir):
    events, _ = read_events(path)
    assert events[0].file_version == "brain.Event:2", path  # SessionLog.START counts only in version 2
    for event in events:
      if purge == "session_log" and event.session_log.status == event_pb2.SessionLog.START:
        series = {k: [(s, v) for s, v in points if s < event.step] for k, points in series.items()}
      for value in event.summary.value:
        points = series.setdefault(value.tag, [])
        if purge == "preemption":
          points[:] = [(s, v) for s, v in points if s < event.step]
        points.append((event.step, value.simple_value))
  result = {}
  for tag, points in series.items():
    steps = [s for s, _ in points]
    assert len(steps) == len(set(steps)), f"{tag}: a step shown twice: {steps}"
    result[tag] = dict(points)
  return {k: v for k, v in result.items() if v}


def metrics_scalars(workdir: str) -> dict[str, dict[int, float]]:
  """metrics.jsonl's records as {tag: {step: value}}, the values rounded to float32 as an
  event's simple_value is: what the event files must hold."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  result: dict[str, dict[int, float]] = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      kind = "train" if "loss" in record else "eval"
      for tag, value in tensorboard.scalars(record, kind).items():
        assert record["step"] not in result.get(tag, {}), f"{tag}: step {record['step']} twice in metrics.jsonl"
        result.setdefault(tag, {})[record["step"]] = float(np.float32(value))
  return result
