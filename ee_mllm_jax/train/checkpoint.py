"""Orbax checkpoints: train state and Grain iterator together, asynchronous, last K kept.

A checkpoint directory holds `<step>/state` (the train-state pytree: step, params,
opt_state, rng) and `<step>/data` (each process's iterator state). Restoring takes an
abstract target with shardings, so a checkpoint written on one mesh loads onto another.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with the trainer's two items."""

  def __init__(self, directory: str, *, keep: int = 3, every_steps: int = 1000, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.every_steps = max(every_steps, 1)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: dict[str, Any], data_iterator=None, *, force: bool = False) -> bool:
    """Starts an (asynchronous) save when `step` is a multiple of `every_steps` (or `force`);
    returns whether it did. Device arrays are copied to host before this returns, so the
    caller may donate `state` to the next step right away."""
    if (not force and step % self.every_steps) or step == self.manager.latest_step():
      return False
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state: dict[str, Any], data_iterator=None) -> dict[str, Any]:
    """The state at `step` placed as `abstract_state` says; restores `data_iterator` in place."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def load_params(path: str, abstract_params: dict[str, Any]) -> dict[str, Any]:
  """Parameters from an Orbax checkpoint, placed as `abstract_params` (ShapeDtypeStructs
  with shardings) says. `path` is one of:

  * a directory written by `Checkpointer` (its latest step's `state/params` is read),
  * one step of it (`.../<step>`), or its `state` item,
  * any Orbax pytree checkpoint whose top level is the parameter tree, or has `params`.

  Only parameters are read (partial restore), so optimizer state from another training
  stage, with other trainable groups, does not get in the way.
  """
  path = os.path.abspath(path)
  if os.path.isdir(path) and not os.path.exists(os.path.join(path, "_METADATA")):
    steps = ocp.utils.checkpoint_steps(path) if not os.path.isdir(os.path.join(path, "state")) else []
    if steps:
      path = os.path.join(path, str(max(steps)))
    if os.path.isdir(os.path.join(path, "state")):
      path = os.path.join(path, "state")
  checkpointer = ocp.PyTreeCheckpointer()
  saved = checkpointer.metadata(path).item_metadata.tree
  wrapped = "params" in saved and "params" not in abstract_params
  item = {"params": abstract_params} if wrapped else abstract_params
  restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
  return restored["params"] if wrapped else restored


def save_params(path: str, params: dict[str, Any]):
  """Writes a parameter tree as a standalone Orbax checkpoint (what `load_params` reads)."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(path), params)
  checkpointer.wait_until_finished()


def abstract_with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
