"""Orbax checkpoints of a training run: train state, Grain iterator and the run's config together,
asynchronous, last K kept; restoring the newest one that is whole. (Loading a model from a
checkpoint directory alone, for inference or a pretrained start, is `ee_mllm_jax.loading`.)

A checkpoint directory holds, per step:

    <step>/state    the train-state pytree (step, params, opt_state, rng)
    <step>/data     each process's iterator state
    <step>/config   JSON: {"model": ModelConfig.to_dict(), "data": {tokenizer_file, template,
                    system_prompt, ...}, "tokenizer": the tokenizer.json text, "experiment": the
                    whole ml_collections config}
    <step>/integrity JSON: CRC-32 of every state leaf's bytes and of each process's iterator
                    state (`ee_mllm_jax.integrity`), checked on restore here and by `loading.load_model`

so `loading.load_model(path)` rebuilds the model (and `loading.load_tokenizer(path)` its
tokenizer) with nothing but the directory. Restoring takes an abstract target with shardings, so a
checkpoint written on one mesh loads onto another.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ee_mllm_jax import integrity
from ee_mllm_jax import storage
from ee_mllm_jax.config import ModelConfig
from ee_mllm_jax.loading import ConfigMismatchError, all_finite, check_model_config, read_json_item, read_run_config

logger = logging.getLogger(__name__)


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with the trainer's three items."""

  def __init__(self, directory: str, *, keep: int = 3, every_steps: int = 1000, async_save: bool = True,
               run_config: dict[str, Any] | None = None):
    """`run_config`: the JSON-able "config" item written with every step (see the module doc)."""
    self.directory = os.path.abspath(directory)
    self.every_steps = max(every_steps, 1)
    self.run_config = run_config
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: dict[str, Any], data_iterator=None, *, force: bool = False) -> bool:
    """Starts an (asynchronous) save when `step` is a multiple of `every_steps` (or `force`);
    returns whether it did. Device arrays are copied to host before this returns, so the
    caller may donate `state` to the next step right away."""
    if not (self.due(step) or (force and step != self.manager.latest_step())):
      return False
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if self.run_config is not None:
      items["config"] = ocp.args.JsonSave(self.run_config)
    with storage.writing(os.path.join(self.directory, str(step))):
      items["integrity"] = ocp.args.JsonSave(integrity.record(
          state, data_iterator.get_state() if data_iterator is not None else None))
      return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def run_config_at(self, step: int) -> dict[str, Any] | None:
    """The "config" item of `step`, or None for a checkpoint written without one."""
    return read_run_config(os.path.join(self.directory, str(step)))

  def restore(self, step: int, abstract_state: dict[str, Any], data_iterator=None,
              model_config: ModelConfig | None = None) -> dict[str, Any]:
    """The state at `step` placed as `abstract_state` says; restores `data_iterator` in place.
    With `model_config`, a checkpoint written by another model is refused naming the fields."""
    if model_config is not None:
      saved = self.run_config_at(step)
      if saved is not None:
        check_model_config(ModelConfig.from_dict(saved["model"]), model_config,
                           f"checkpoint {self.directory}/{step}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    state = self.manager.restore(step, args=ocp.args.Composite(**items))["state"]
    check_integrity(state, os.path.join(self.directory, str(step)), data_iterator)
    return state

  def due(self, step: int) -> bool:
    """Whether `save(step, ...)` (without force) would write a checkpoint."""
    return step % self.every_steps == 0 and step != self.manager.latest_step()

  def restore_latest(self, abstract_state: dict[str, Any], data_iterator=None,
                     model_config: ModelConfig | None = None) -> tuple[int | None, dict[str, Any] | None]:
    """(step, state) of the newest checkpoint that restores and holds finite parameters, or
    (None, None) when there is none. A damaged one (truncated files, missing metadata or items,
    non-finite values) is reported in one line and moved to `damaged/<step>` beside the others
    (kept for inspection, out of the rotation), and the next older one is tried; a checkpoint
    of another model (`ConfigMismatchError`) is not a damaged one and stops the search."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
      try:
        state = self.restore(step, abstract_state, data_iterator, model_config=model_config)
        if not all_finite({"params": state["params"], "opt_state": state.get("opt_state")}):
          raise ValueError("it holds non-finite values")
        if failures:
          logger.warning("Resuming from %s/%d, the newest checkpoint that restores", self.directory, step)
        return step, state
      except ConfigMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
        failures.append(f"{step} ({reason})")
        logger.warning("Checkpoint %s/%d cannot be restored (%s); moving it to %s/damaged/ and trying the "
                        "previous one", self.directory, step, reason, self.directory)
        self._set_aside(step)
    if failures:
      raise RuntimeError(f"no checkpoint in {self.directory} restores: " + "; ".join(failures))
    return None, None

  def _set_aside(self, step: int):
    if jax.process_index() == 0:
      damaged = os.path.join(self.directory, "damaged")
      os.makedirs(damaged, exist_ok=True)
      target = os.path.join(damaged, str(step))
      suffix = 0
      while os.path.exists(target):
        suffix += 1
        target = os.path.join(damaged, f"{step}.{suffix}")
      os.rename(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:  # every process sees the step gone before it reloads
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
    self.manager.reload()

  def wait(self):
    with storage.writing(self.directory):  # an asynchronous save's error surfaces here
      self.manager.wait_until_finished()

  def close(self):
    with storage.writing(self.directory):
      self.manager.close()


@jax.jit
def _abs_sums(tree) -> jax.Array:
  return jnp.stack([jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)])


def fingerprint(state) -> dict[str, float]:
  """{leaf path: sum of |x|} of a state: written next to each checkpoint and compared on
  restore, so bytes damaged on disk are found even where they still decode to numbers."""
  paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(state)]
  return dict(zip(paths, (float(v) for v in jax.device_get(_abs_sums(state)))))


def check_integrity(state, step_dir: str, data_iterator=None):
  """Raises ValueError when a restored `state` (or `data_iterator`'s restored state) differs
  from the checksums saved with it. A checkpoint without checksums is accepted with a warning
  (and its sums of |x| checked, where it has them), so that existing runs still resume."""
  saved = read_json_item(step_dir, "integrity")
  if saved is None or "leaves" not in saved:
    logger.warning("Checkpoint %s was written without checksums (before they were recorded): damage to its "
                    "files may go unnoticed%s", step_dir, "; checking its sums of |x| only" if saved else "")
    if saved is not None:
      check_fingerprint(state, step_dir)
    return
  integrity.verify_leaves(state, saved["leaves"], f"checkpoint {step_dir}")
  if data_iterator is not None:
    integrity.verify_data(data_iterator.get_state(), saved.get("data"), f"checkpoint {step_dir}")


def check_fingerprint(state, step_dir: str, rtol: float = 1e-3):
  """Raises ValueError when `state` differs from the sums of |x| saved with it (none saved: passes).
  The tolerance allows for another summation order on another mesh. Only checkpoints without
  checksums hold such sums: kept so that they still resume."""
  saved = read_json_item(step_dir, "integrity")
  if saved is None or "abs_sums" not in saved:
    return
  saved = saved["abs_sums"]
  now = fingerprint(state)
  for path, want in saved.items():
    got = now.get(path)
    if got is None or not np.isclose(got, want, rtol=rtol, atol=1e-6):
      raise ValueError(f"{path} does not match what was saved (sum |x| {got} vs {want}): the files are damaged")


