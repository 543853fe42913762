"""Vision-to-LLM projector (HF `multi_modal_projector`: linear_1 [-> GELU -> linear_2])."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ee_mllm_jax.models.layers import Linear


class Projector(nn.Module):
  kind: str  # "linear" | "mlp2x_gelu"
  in_dim: int
  out_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
    x = Linear((self.in_dim,), (self.out_dim,), (None, "embed"), name="linear_1", **kw)(x)
    if self.kind == "mlp2x_gelu":
      x = jax.nn.gelu(x, approximate=False)
      x = Linear((self.out_dim,), (self.out_dim,), (None, "embed"), name="linear_2", **kw)(x)
    return x
