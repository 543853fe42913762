"""Loading a model's weights, without the trainer: a train.py checkpoint directory alone
(`load_model`, `load_tokenizer`, `read_run_config`), the parameters of any Orbax checkpoint
(`load_params`), and the pretrained start of a run (`load_pretrained`: an Orbax checkpoint, an HF
LLaVA, or an HF tower and LLM). Nothing here imports Grain, so eval.py and export load a model
without the data pipeline.

A train.py checkpoint step holds `state` (the train state), `data` (the iterator states),
`config` (JSON: the model config, data settings, tokenizer and experiment) and `integrity`
(checksums, `ee_mllm_jax.integrity`); `train.checkpoint` writes them.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ee_mllm_jax import integrity
from ee_mllm_jax import mode as mode_lib
from ee_mllm_jax import params as params_lib
from ee_mllm_jax.config import ModelConfig

logger = logging.getLogger(__name__)


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
    logger.warning("%s was trained in mode %s; running it as %s", source, trained.flags(), run.mode_name)


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


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
  return read_json_item(resolve_step_dir(path), "config")


def read_json_item(step_dir: str, name: str) -> dict[str, Any] | None:
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
      saved = read_json_item(step_dir, "integrity")
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
      logger.warning("Checkpoint %s was written without checksums: damage to its files may go unnoticed", step_dir)
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


def load_pretrained(init_from, model_cfg: ModelConfig, abstract_params) -> dict[str, Any]:
  """The parameters a pretrained source has for this model, placed on their shardings (a
  subset where it covers part of the model: the rest is initialised, see `params.overlay`).
  Sources (`init_from.kind`):

  * "orbax": an Orbax checkpoint (its recorded model config must match);
  * "hf": a saved HF LLaVA directory (or .safetensors file), via `convert.hf`;
  * "hf_parts": an HF vision tower (`vision_path`) and an HF LLM (`llm_path`), LLaVA's
    stage-1 start: the projector is left to the fresh init. Their configs must describe the
    run's model (a difference is a ConfigMismatchError naming the fields).

  HF tensors are read one by one and each parameter goes onto its sharding, in the run's
  param dtype, before the next is read."""
  from ee_mllm_jax.convert import hf, hf_config  # pylint: disable=g-import-not-at-top

  if init_from.kind not in ("orbax", "hf", "hf_parts"):
    raise ValueError(f"init_from.kind must be 'orbax', 'hf' or 'hf_parts', got {init_from.kind!r}")
  for key in ("vision_path", "llm_path") if init_from.kind == "hf_parts" else ("path",):
    if not os.path.exists(init_from[key]):
      raise FileNotFoundError(f"init_from.{key} {init_from[key]!r} does not exist")
  if init_from.kind == "orbax":
    saved = read_run_config(init_from.path)
    if saved is not None:
      check_model_config(ModelConfig.from_dict(saved["model"]), model_cfg, f"init_from {init_from.path}")
    return load_params(init_from.path, abstract_params)
  want = params_lib.flatten(abstract_params)
  dtype = np.dtype(jax.tree.leaves(abstract_params)[0].dtype)  # HF tensors are kept in the param dtype

  def place(path, value):
    if path not in want:
      raise ValueError(f"the HF checkpoint has {path}, which the model {model_cfg} has not")
    if tuple(value.shape) != tuple(want[path].shape):
      raise ValueError(f"{path}: source {tuple(value.shape)}, model {tuple(want[path].shape)}")
    return jax.device_put(np.asarray(value, want[path].dtype), want[path].sharding)

  if init_from.kind == "hf":
    if os.path.isdir(init_from.path):  # its config.json must describe the run's model
      check_model_config(hf_config.config_from_hf(hf.read_config(init_from.path)), model_cfg,
                         f"init_from {init_from.path}")
    return hf.params_from_hf(hf.TensorReader(init_from.path), model_cfg, dtype, missing="skip", place=place)
  # hf_parts: the configs are checked before any tensor is read
  vision = hf_config.vision_config_from_hf(hf.read_config(init_from.vision_path), model_cfg.vision.feature_layer)
  llm = hf_config.llm_config_from_hf(hf.read_config(init_from.llm_path))
  check_model_config(model_cfg.replace(vision=vision, llm=llm), model_cfg,
                     f"init_from {init_from.vision_path} + {init_from.llm_path}")
  _, vision_params = hf.load_hf_vision(init_from.vision_path, feature_layer=vision.feature_layer, dtype=dtype,
                                       place=place)
  _, llm_params = hf.load_hf_llm(init_from.llm_path, dtype=dtype, place=place)
  return {"vision": vision_params, "llm": llm_params}


def init_from_given(init_from) -> bool:
  """Whether a run's `init_from` names a pretrained source (else the run starts from its init)."""
  return bool(init_from.get("path") or (init_from.get("kind") == "hf_parts" and init_from.get("llm_path")))
