"""LoRA adapters as parameters: which leaves they are, and merging them into the base.

The model holds adapters beside the kernel they adapt (`.../q_proj/lora_a`, `.../q_proj/lora_b`,
see `config.LoRA` and `models.layers.Linear`), with the kernel's stacked layer axis when it has
one. `merge` folds them in, `W + (alpha / rank) A B`, and gives the plain model's parameters,
which export to a stock HF checkpoint; `adapters` takes them alone (PEFT's adapter files).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ee_mllm_jax import params as params_lib

ADAPTER_NAMES = ("lora_a", "lora_b")
# `trainable` for LLaVA's LoRA recipe: the adapters and the projector (at full rank).
TRAINABLE = r"projector/|.*/lora_[ab]$"


def is_adapter(path: str) -> bool:
  return path.rsplit("/", 1)[-1] in ADAPTER_NAMES


def adapters(params: dict[str, Any]) -> dict[str, Any]:
  """{"llm/layers/self_attn/q_proj": (lora_a, lora_b), ...}: every adapted projection's pair."""
  flat = params_lib.flatten(params)
  return {k[:-len("/lora_a")]: (v, flat[k[:-1] + "b"]) for k, v in flat.items() if k.endswith("/lora_a")}


def without_adapters(params: dict[str, Any]) -> dict[str, Any]:
  """The parameters less every adapter leaf (the base the adapters were trained over)."""
  return params_lib.unflatten({k: v for k, v in params_lib.flatten(params).items() if not is_adapter(k)})


def delta(lora_a: jax.Array, lora_b: jax.Array, kernel_ndim: int, scale: float) -> jax.Array:
  """scale * A B in the kernel's layout, float32: A (stack..., in..., r), B (stack..., r, out...)."""
  stack = lora_a.ndim + lora_b.ndim - kernel_ndim - 2
  batch = tuple(range(stack))
  ab = jax.lax.dot_general(lora_a.astype(jnp.float32), lora_b.astype(jnp.float32),
                           (((lora_a.ndim - 1,), (stack,)), (batch, batch)))
  return scale * ab


def merge(params: dict[str, Any], scale: float) -> dict[str, Any]:
  """The parameters with every adapter folded into its kernel (in float32, then the kernel's dtype)
  and the adapter leaves gone: the plain model's parameters."""
  out = params_lib.flatten(without_adapters(params))
  for path, (a, b) in adapters(params).items():
    kernel = out[path + "/kernel"]
    out[path + "/kernel"] = (kernel.astype(jnp.float32) + delta(a, b, kernel.ndim, scale)).astype(kernel.dtype)
  return params_lib.unflatten(out)
