"""What a run reports as it goes: metrics.jsonl (one JSON record per step and per evaluation,
rewritten past a resumed run's checkpoint) and the same records as TensorBoard scalars
(`train.tensorboard`), the throughput of each logging interval, and the progress bar's line."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

from ee_mllm_jax import storage
from ee_mllm_jax.train import tensorboard

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Interval:
  """Work done since the last log line: the steps, their tokens and FLOPs over every process,
  from `t0` (None until the first step has compiled and run)."""
  t0: float | None = None
  flops: float = 0.0
  tokens: float = 0.0
  steps: int = 0

  def add(self, tokens: float, flops: float):
    self.steps += 1
    self.tokens += tokens
    self.flops += flops

  def restart(self):
    self.t0, self.flops, self.tokens, self.steps = time.perf_counter(), 0.0, 0.0, 0

  def rates(self, now: float, peak_flops: float | None) -> dict[str, float]:
    """tokens/s, s/step, FLOP/s and MFU (against `peak_flops`) of the interval ending `now`."""
    if self.t0 is None or not self.steps:
      return {}
    dt = now - self.t0
    rate = {"tokens_per_s": self.tokens / dt, "step_time_s": dt / self.steps}
    if self.flops:
      rate["flops_per_s"] = self.flops / dt
      if peak_flops:
        rate["mfu"] = rate["flops_per_s"] / peak_flops
    return rate


def postfix(record: dict[str, Any]) -> str:
  """The progress bar's summary of a step record."""
  return (f"loss={record['loss']:.3f} lr={record['learning_rate']:.2e} gnorm={record['grad_norm']:.2f}"
          + (f" tok/s={record['tokens_per_s']:.0f}" if "tokens_per_s" in record else "")
          + (f" mfu={100 * record['mfu']:.1f}%" if "mfu" in record
             else f" {record['flops_per_s'] / 1e9:.0f}GFLOP/s" if "flops_per_s" in record else ""))


class MetricsFile:
  """metrics.jsonl, appended to by process 0 (other processes write nothing); opening it drops
  the records after `start`, the steps a resumed run is about to redo. With `tensorboard_events`,
  each record also goes to a new TensorBoard event file beside it, which hides the dropped steps
  of earlier files from TensorBoard (`tensorboard.EventFile`)."""

  def __init__(self, path: str, start: int, *, write: bool, tensorboard_events: bool = False):
    self.path = path
    if write:
      truncate_metrics(path, start)
    self._file = open(path, "a") if write else None
    self.events = tensorboard.EventFile(os.path.dirname(os.path.abspath(path)), start) \
        if write and tensorboard_events else None

  def write(self, record: dict[str, Any], kind: str = "train"):
    """Appends a step record (`kind` "train") or an evaluation record ("eval")."""
    if self._file:
      with storage.writing(self.path):
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
    if self.events:
      self.events.write(record, kind)
      self.events.flush()

  def close(self):
    try:
      if self._file:
        self._file.close()
    finally:
      if self.events:
        self.events.close()


def truncate_metrics(path: str, step: int | None):
  """Drops the records after `step` (those of steps a resumed run is about to redo)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  complete = complete_lines(path, lines)
  keep = [line for line in complete if line.strip() and json.loads(line).get("step", 0) <= (step or 0)]
  if len(keep) != len(lines) or (lines and not lines[-1].endswith("\n")):
    with storage.atomic_open(path) as f:
      f.writelines(line if line.endswith("\n") else line + "\n" for line in keep)
    logger.info("%s: dropped %d records after step %d", path, len(lines) - len(keep), step or 0)


def complete_lines(path: str, lines: list[str]) -> list[str]:
  """`lines` without a torn last line (a kill or a full disk in the middle of a write): one
  that does not parse as JSON is dropped with a warning; a damaged line before the last is an
  error naming it (that is not what an interrupted append leaves)."""
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      json.loads(line)
    except ValueError:
      if i == len(lines) - 1:
        logger.warning("%s: dropping a torn last line (%d characters)", path, len(line))
        return lines[:-1]
      raise ValueError(f"{path}: line {i + 1} is not JSON; it is not a torn last line, so it is left "
                       "for you to inspect") from None
  return lines
