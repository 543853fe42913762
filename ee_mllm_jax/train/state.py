"""Train state, optimizer, and parameter freezing.

The state is a plain dict, so Orbax saves it and `jax.tree` maps it:

    step       () int32            optimizer updates done
    params     nested dict         all parameters: the trainable ones in the model's param_dtype
                                   (float32 masters by default), the frozen ones in its compute
                                   dtype (`cast_frozen`: only read, so bf16 training holds the
                                   frozen 7B LLM in 13.2 GiB, not 26.3)
    opt_state  optax state         over the *trainable* parameters only
    rng        (2,) uint32         base key; step k uses fold_in(rng, k)

Freezing is a regex over parameter paths ("projector/linear_1/kernel"), matched from the
start (`re.match`): LLaVA stage 1 trains `projector/`, stage 2 `projector/|llm/`. Frozen
parameters are outside the differentiated and optimised tree, so they get no gradient, no
optimizer state, and pass through every step unchanged (bit-identical).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from ee_mllm_jax import batch as batch_lib
from ee_mllm_jax import params as params_lib
from ee_mllm_jax import sharding

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup and cosine decay (LLaVA / HF Trainer defaults)."""

  learning_rate: float = 2e-5
  total_steps: int = 1000
  warmup_steps: int = 0
  end_lr_ratio: float = 0.0  # final lr = learning_rate * end_lr_ratio
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_norm: float = 1.0  # global-norm clipping; <= 0 disables
  trainable: str = ".*"  # regex over parameter paths; the rest is frozen
  # ((regex, learning rate), ...): trainable parameters whose path a regex matches (the first
  # that does) train at that peak rate, on the same warmup and decay (LLaVA's LoRA recipe:
  # (("projector/", 2e-5),) beside the adapters' 2e-4). Clipping stays one global norm.
  group_learning_rates: tuple[tuple[str, float], ...] = ()


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
  warmup = min(cfg.warmup_steps, max(cfg.total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, warmup, max(cfg.total_steps, warmup + 1), cfg.learning_rate * cfg.end_lr_ratio)


# Weight decay by a parameter's role, read from its name (the last key of its path), never from its
# rank: scan-stacking gives norm scales, biases and the resampler's latents a layer axis, and a
# 1-D gate is as much a parameter as a (L, D) scale. Decayed: projection matrices ("kernel", the
# tower's patch convolution, LoRA's A and B as HF's Trainer decays them) and embedding tables
# (token and position embeddings). Not decayed:
# norm scales, biases, the resampler's latents, the cross blocks' tanh gates, CLIP's class token.
# OpenFlamingo decays only its gated cross-attention blocks' matrices (not the perceiver's); here
# every matrix that trains is decayed, the perceiver's included.
DECAYED_NAMES = ("kernel", "embedding", "patch_embedding", "position_embedding", "lora_a", "lora_b")
UNDECAYED_NAMES = ("scale", "bias", "latents", "attn_gate", "ff_gate", "class_embedding")


def _leaf_name(path) -> str:
  keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  return str(keys[-1]) if keys else ""


def decay_mask(params: Params) -> Params:
  """The tree of `params` (boxed, abstract or arrays) with True where weight decay applies
  (`DECAYED_NAMES`); a parameter whose name is in neither list is a ValueError naming it, so a
  new kind of parameter is classified before it trains."""

  def decayed(path, _):
    name = _leaf_name(path)
    if name in DECAYED_NAMES:
      return True
    if name in UNDECAYED_NAMES:
      return False
    raise ValueError(f"weight decay: parameter {jax.tree_util.keystr(path)} has a name ({name!r}) in neither "
                     f"DECAYED_NAMES {DECAYED_NAMES} nor UNDECAYED_NAMES {UNDECAYED_NAMES}; add it to one")

  return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(cfg: OptimConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Clip by global norm, then AdamW; weight decay on matrices and embeddings only (not norm
  scales, biases, latents or gates: `decay_mask`)."""
  schedule = make_schedule(cfg)
  adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                      mask=decay_mask)
  # AdamW's update (decay included) is proportional to the rate, so a group's own rate is the
  # base update scaled by rate / learning_rate.
  groups = [optax.masked(optax.scale(rate / cfg.learning_rate), functools.partial(_group_mask, i, cfg))
            for i, (_, rate) in enumerate(cfg.group_learning_rates)]
  parts = ([optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []) + [adamw] + groups
  return (optax.chain(*parts) if len(parts) > 1 else adamw), schedule


def _group_mask(index: int, cfg: OptimConfig, params: Params) -> Params:
  """True where group `index` is the first of `cfg.group_learning_rates` whose regex matches."""
  regexes = [re.compile(pattern) for pattern, _ in cfg.group_learning_rates]

  def first(path, _):
    p = "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
    hits = [i for i, r in enumerate(regexes) if r.match(p)]
    return bool(hits) and hits[0] == index

  return jax.tree_util.tree_map_with_path(first, params)


def _path(key: tuple[str, ...]) -> str:
  return "/".join(key)


def split_params(params: Params, pattern: str) -> tuple[Params, Params]:
  """(trainable, frozen) sub-trees of `params`; works on boxed and abstract trees too."""
  regex = re.compile(pattern)
  flat = traverse_util.flatten_dict(params)
  train = {k: v for k, v in flat.items() if regex.match(_path(k))}
  frozen = {k: v for k, v in flat.items() if not regex.match(_path(k))}
  return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)


def cast_frozen(params: Params, pattern: str, dtype) -> Params:
  """`params` (boxed or not) with the frozen ones (not matched by `pattern`) in `dtype`."""
  train, frozen = split_params(params, pattern)
  return merge_params(train, jax.tree.map(lambda x: x.astype(dtype), frozen))


def merge_params(train: Params, frozen: Params) -> Params:
  flat = {**traverse_util.flatten_dict(frozen), **traverse_util.flatten_dict(train)}
  return traverse_util.unflatten_dict(flat)


def make_init_fn(model: nn.Module, optimizer: optax.GradientTransformation, pattern: str,
                 seed: int = 0) -> Callable[[], dict[str, Any]]:
  """() -> boxed train state. Boxes (nn.LogicallyPartitioned) carry the logical axis names
  to the optimizer moments too, so `sharding.tree_shardings` can place the whole state. Frozen
  parameters are held in the compute dtype (`cast_frozen`)."""

  def init():
    key = jax.random.PRNGKey(seed)
    params = model.init(jax.random.fold_in(key, 0), **batch_lib.example(model.cfg))["params"]
    params = cast_frozen(params, pattern, model.cfg.dtype)
    train, _ = split_params(params, pattern)
    if not train:
      raise ValueError(f"the trainable pattern {pattern!r} matches no parameter")
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(train),
            "rng": jax.random.fold_in(key, 1)}

  return init


def create_sharded_state(init_boxed: Callable[[], dict[str, Any]], mesh: jax.sharding.Mesh):
  """eval_shape(init) -> shardings -> jit(init, out_shardings): the state is born sharded.

  Returns (init, shardings, abstract): `init(partial_params=None)` builds the state directly
  on the mesh, with the parameters that `partial_params` has taken from it (the rest freshly
  initialised, see `params.overlay`: inside the jit the replaced fresh parameters are never
  computed); `abstract` (ShapeDtypeStructs with shardings) is the restore target for
  checkpoints. The optimizer state starts empty (AdamW's moments do not depend on values).
  """
  shardings = sharding.tree_shardings(jax.eval_shape(init_boxed), mesh)

  def build(partial):
    state = nn.meta.unbox(init_boxed())
    state["params"], _ = params_lib.overlay(state["params"], partial)
    return state

  build = jax.jit(build, out_shardings=shardings, donate_argnums=0)

  def init(partial_params: Params | None = None) -> dict[str, Any]:
    return build(partial_params or {})

  return init, shardings, jax.eval_shape(build, {})  # of the jit itself: keeps the shardings
