"""Evaluators the training loop calls at `eval_every` steps and at the end.

An evaluator is any object with `run(params, step) -> dict` (metrics, written to
metrics.jsonl) and `describe(result) -> str` (a phrase for the log line and the run's summary).
The loop knows nothing else about them, so benchmark evaluation can plug in beside `Validation`.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Mapping, Protocol

import jax
import numpy as np

from ee_mllm_jax import data as data_lib
from ee_mllm_jax import sharding


class Evaluator(Protocol):

  def run(self, params, step: int) -> dict[str, Any]:
    ...

  def describe(self, result: Mapping[str, Any]) -> str:
    ...


class Validation:
  """Val loss and teacher-forced answer accuracy (`train.step.eval_metrics`) over the val file;
  optionally the accuracy with blank (mean-colour) images, which shows how much the answers
  depend on the image, beside reference accuracies a model must beat (e.g. an answer prior)."""

  def __init__(self, data_cfg: data_lib.DataConfig, eval_step: Callable, mesh, *,
               prepare: Callable[[dict], dict] = lambda b: b, max_batches: int = -1, blank_images: bool = False,
               references: Mapping[str, float] | None = None):
    self.data_cfg, self.eval_step, self.mesh, self.prepare = data_cfg, eval_step, mesh, prepare
    self.max_batches, self.blank_images = max_batches, blank_images
    self.references = dict(references or {})

  def _totals(self, params, blank: bool) -> dict[str, float]:
    it = data_lib.make_eval_iterator(self.data_cfg)
    totals = collections.Counter()
    try:
      for i, batch in enumerate(it):
        if 0 <= self.max_batches <= i:
          break
        batch = self.prepare(batch)
        if blank:  # the normalised mean colour: a constant image with nothing in it
          batch["pixel_values"] = np.zeros_like(batch["pixel_values"])
        metrics = jax.device_get(self.eval_step(params, sharding.shard_batch(batch, self.mesh)))
        totals.update({k: float(v) for k, v in metrics.items()})
    finally:
      it.close()
    return {"loss": totals["loss_sum"] / max(totals["tokens"], 1.0),
            "accuracy": totals["correct"] / max(totals["rows"], 1.0)}

  def run(self, params, step: int) -> dict[str, Any]:
    v = self._totals(params, blank=False)
    result = {"val_loss": v["loss"], "val_accuracy": v["accuracy"]}
    if self.blank_images:
      result["val_accuracy_blank_images"] = self._totals(params, blank=True)["accuracy"]
    for name, value in self.references.items():
      result[f"{name.replace(' ', '_')}_accuracy"] = value
    return result

  def describe(self, result: Mapping[str, Any]) -> str:
    parts = [f"val loss {result['val_loss']:.4f}, val accuracy {100 * result['val_accuracy']:.1f}%"]
    if "val_accuracy_blank_images" in result:
      parts.append(f"blank images {100 * result['val_accuracy_blank_images']:.1f}%")
    parts += [f"{name} {100 * value:.1f}%" for name, value in self.references.items()]
    return parts[0] + (f" (vs {', '.join(parts[1:])})" if len(parts) > 1 else "")
