"""Orbax checkpoints: train state, Grain iterator and the run's config together, asynchronous,
last K kept; and loading a model from a checkpoint directory alone.

A checkpoint directory holds, per step:

    <step>/state    the train-state pytree (step, params, opt_state, rng)
    <step>/data     each process's iterator state
    <step>/config   JSON: {"model": ModelConfig.to_dict(), "data": {tokenizer_file, template,
                    system_prompt, ...}, "tokenizer": the tokenizer.json text, "experiment": the
                    whole ml_collections config}
    <step>/integrity JSON: CRC-32 of every state leaf's bytes and of each process's iterator
                    state (`ee_mllm_jax.integrity`), checked on restore here and by `load_model`

so `load_model(path)` rebuilds the model (and `load_tokenizer(path)` its tokenizer) with nothing
but the directory. Restoring takes an abstract target with shardings, so a checkpoint written
on one mesh loads onto another.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from ee_mllm_jax import integrity
from ee_mllm_jax import params as params_lib
from ee_mllm_jax import mode as mode_lib
from ee_mllm_jax import storage
from ee_mllm_jax.config import ModelConfig


class ConfigMismatchError(ValueError):
  """A checkpoint written by a different model than the one asked to load it."""


class DamagedCheckpointError(ValueError):
  """A checkpoint whose files cannot be read, or whose contents fail their checksums or are
  not finite; the message is one line naming it."""


def check_model_config(saved: ModelConfig, run: ModelConfig, source: str):
  """Raises ConfigMismatchError listing every architecture field in which the checkpoint's
  model differs from the run's (runtime fields may differ; of the mode, only the fields that shape
  the parameters of one mode, `Mode.params_key`); logs a warning when the run's mode is not the
  one the weights were trained in (EE-MLLM-F, fine-tuning in another mode)."""
  skip = set(ModelConfig.runtime_fields())
  arch = {k: v for k, v in saved.diff(run).items()
          if k not in skip and not k.startswith(("mode.", "trained_mode"))}
  trained = saved.weights_mode
  if type(trained) is type(run.mode) and trained.params_key() != run.mode.params_key():
    arch.update({f"mode.{k}": (a, b) for (k, a), (_, b) in zip(trained.params_key()[1:], run.mode.params_key()[1:])
                 if a != b})
  if arch:
    fields = ", ".join(f"{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in arch.items())
    raise ConfigMismatchError(f"{source} holds a different model ({fields})")
  if trained != run.mode:
    logging.warning("%s was trained in mode %s; running it as %s", source, trained.flags(), run.mode_name)


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
          logging.warning("Resuming from %s/%d, the newest checkpoint that restores", self.directory, step)
        return step, state
      except ConfigMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
        failures.append(f"{step} ({reason})")
        logging.warning("Checkpoint %s/%d cannot be restored (%s); moving it to %s/damaged/ and trying the "
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
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


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
  saved = _read_json_item(step_dir, "integrity")
  if saved is None or "leaves" not in saved:
    logging.warning("Checkpoint %s was written without checksums (before they were recorded): damage to its "
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
  saved = _read_json_item(step_dir, "integrity")
  if saved is None or "abs_sums" not in saved:
    return
  saved = saved["abs_sums"]
  now = fingerprint(state)
  for path, want in saved.items():
    got = now.get(path)
    if got is None or not np.isclose(got, want, rtol=rtol, atol=1e-6):
      raise ValueError(f"{path} does not match what was saved (sum |x| {got} vs {want}): the files are damaged")


def all_finite(tree) -> bool:
  """Whether every float leaf of `tree` is finite (one jitted reduction)."""
  return bool(_all_finite(tree))


def resolve_step_dir(path: str) -> str:
  """A run's workdir, its `checkpoints/` directory, or one step of it -> that step's directory
  (the latest step where a directory of steps is given)."""
  path = os.path.abspath(path)
  if os.path.basename(path) == "state" and os.path.isdir(os.path.join(os.path.dirname(path), "state")):
    return os.path.dirname(path)
  if os.path.isdir(os.path.join(path, "checkpoints")) and not os.path.isdir(os.path.join(path, "state")):
    path = os.path.join(path, "checkpoints")
  if os.path.isdir(os.path.join(path, "state")) or os.path.exists(os.path.join(path, "_METADATA")):
    return path
  steps = ocp.utils.checkpoint_steps(path) if os.path.isdir(path) else []
  if not steps:
    raise FileNotFoundError(f"{path} is neither a checkpoint nor a directory of checkpoints")
  return os.path.join(path, str(max(steps)))


def read_run_config(path: str) -> dict[str, Any] | None:
  """The "config" item (model config, data settings, tokenizer, experiment) of a checkpoint;
  None when it has none (written before checkpoints carried their config)."""
  return _read_json_item(resolve_step_dir(path), "config")


def _read_json_item(step_dir: str, name: str) -> dict[str, Any] | None:
  """A JSON item of one checkpoint step, or None when the step has none."""
  if not os.path.isdir(os.path.join(step_dir, name)):
    return None
  return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(os.path.join(step_dir, name))


def load_params(path: str, abstract_params: dict[str, Any]) -> dict[str, Any]:
  """The parameters an Orbax checkpoint has for the model of `abstract_params`
  (ShapeDtypeStructs with shardings), placed as it says; a subset where the checkpoint covers
  only part of the model (combine with `params.overlay`). `path` is one of:

  * a run's workdir, or a directory written by `Checkpointer` (its latest step is read),
  * one step of it (`.../<step>`), or its `state` item,
  * any Orbax pytree checkpoint whose top level is the parameter tree, or has `params`.

  Only parameters are read (partial restore), so optimizer state from another training
  stage, with other trainable groups, does not get in the way. A parameter whose shape
  differs from the model's is an error naming it.
  """
  path = resolve_step_dir(path)
  if os.path.isdir(os.path.join(path, "state")):
    path = os.path.join(path, "state")
  checkpointer = ocp.PyTreeCheckpointer()
  saved = checkpointer.metadata(path).item_metadata.tree
  wrapped = "params" in saved and "params" not in abstract_params
  saved_params = saved["params"] if wrapped else saved
  params_lib.InitReport.of(abstract_params, saved_params)  # raises on a shape mismatch
  have = params_lib.flatten(saved_params)
  subset = params_lib.unflatten({k: v for k, v in params_lib.flatten(abstract_params).items() if k in have})
  item = {"params": subset} if wrapped else subset
  try:
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
  except Exception as e:  # pylint: disable=broad-except
    raise DamagedCheckpointError(f"checkpoint {path} cannot be read: {_first_line(e)}") from None
  step_dir = os.path.dirname(path) if os.path.basename(path) == "state" else None
  if step_dir is not None and os.path.isdir(os.path.join(step_dir, "integrity")):
    try:
      saved = _read_json_item(step_dir, "integrity")
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpointError(f"checkpoint {step_dir}: its integrity record cannot be read: "
                                   f"{_first_line(e)}") from None
    if isinstance(saved, dict) and "leaves" in saved:
      try:
        integrity.verify_leaves(restored, saved["leaves"], f"checkpoint {step_dir}", prefix="" if wrapped else
                                "['params']")
      except ValueError as e:
        raise DamagedCheckpointError(str(e)) from None
    else:
      logging.warning("Checkpoint %s was written without checksums: damage to its files may go unnoticed", step_dir)
  return restored["params"] if wrapped else restored


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def load_model(path: str, **overrides) -> tuple[ModelConfig, dict[str, Any]]:
  """(ModelConfig, params) from a checkpoint directory alone: its recorded config rebuilds the
  model, `overrides` change fields: mode flags (attention="composite" for EE-MLLM-F) switch the
  mode the weights run in (`ModelConfig.run_as`), others replace fields (dtype). Parameters are
  placed on the default device, in the config's `param_dtype`."""
  run_config = read_run_config(path)
  if run_config is None:
    raise ValueError(f"{resolve_step_dir(path)} records no model config (written before checkpoints "
                     "carried one); build the ModelConfig yourself and call load_params")
  cfg = with_overrides(ModelConfig.from_dict(run_config["model"]), overrides)
  abstract = params_lib.abstract_params(cfg)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  params = load_params(path, abstract)
  missing = params_lib.InitReport.of(abstract, params).initialised
  if missing:
    raise ValueError(f"{resolve_step_dir(path)} lacks parameters of its own model: {list(missing[:5])}")
  if not all_finite(params):
    raise DamagedCheckpointError(f"checkpoint {resolve_step_dir(path)} holds non-finite parameters: its files "
                                 "are damaged")
  return cfg, params


def with_overrides(cfg: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
  """`cfg` (as loaded: its mode the one its weights were trained in) run as `overrides` ask: mode
  flags through `run_as` (None: as trained), other fields replaced."""
  flags = {k: overrides[k] for k in overrides if k in mode_lib.FLAGS}
  rest = {k: v for k, v in overrides.items() if k not in flags}
  cfg = cfg.run_as(**flags) if any(v is not None for v in flags.values()) else cfg
  return cfg.replace(**rest) if rest else cfg


def load_tokenizer(path: str):
  """The tokenizer a run used, from its checkpoint (a `tokenizers.Tokenizer`)."""
  import tokenizers  # pylint: disable=g-import-not-at-top

  run_config = read_run_config(path) or {}
  if not run_config.get("tokenizer"):
    raise ValueError(f"{resolve_step_dir(path)} records no tokenizer")
  return tokenizers.Tokenizer.from_str(run_config["tokenizer"])
