"""LLaMA / Qwen2 decoder over two streams (visual and text), with scanned layers.

Letters: B batch, V visual tokens, T text tokens, S cache length, D width, K kv heads,
H head dim, L layers. HF names: embed_tokens, layers/{input_layernorm, self_attn,
post_attention_layernorm, mlp}, norm, lm_head.

A layer is called in one of two phases, chosen by whether it receives a cache:
* forward: both streams through the layer in the configured mode (training, prefill);
  also returns the layer's keys/values over [visual; text] for a cache.
* extend: new text tokens only, against a KV cache (decode steps, prompts after a cached
  image prefix). Text queries attend to all earlier keys in every mode, so this phase has
  no mode switch.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ee_mllm_jax.config import LLMConfig
from ee_mllm_jax.models.attention import Attention
from ee_mllm_jax.models.layers import Linear, RMSNorm, SwiGLU, logical, scan_layers

Cache = dict[str, Any]  # k, v: (L, B, S, K, H); pos: (B, S) int32; valid: (B, S) bool; index: () int32


def pad_cache(cache: Cache, size: int) -> Cache:
  """Grow a cache to `size` slots; the new slots are empty (invalid) until `extend` writes them."""
  extra = size - cache["pos"].shape[1]
  if extra < 0:
    raise ValueError(f"cannot shrink a cache of {cache['pos'].shape[1]} slots to {size}")
  grow = lambda x, axis: jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])
  return dict(k=grow(cache["k"], 2), v=grow(cache["v"], 2), pos=grow(cache["pos"], 1),
              valid=grow(cache["valid"], 1), index=cache["index"])


def repeat_cache(cache: Cache, repeats: int) -> Cache:
  """Repeat each row of a cache `repeats` times (row b -> rows b*repeats ... b*repeats+repeats-1),
  e.g. one image prefix shared by several prompts."""
  return dict(k=jnp.repeat(cache["k"], repeats, axis=1), v=jnp.repeat(cache["v"], repeats, axis=1),
              pos=jnp.repeat(cache["pos"], repeats, axis=0), valid=jnp.repeat(cache["valid"], repeats, axis=0),
              index=cache["index"])


def last_valid_index(pos_t: jax.Array, valid_t: jax.Array) -> jax.Array:
  """(B, T) text positions/validity -> (B,) column of each row's last (highest-position) valid token."""
  return jnp.argmax(jnp.where(valid_t, pos_t, jnp.iinfo(jnp.int32).min), axis=1)


class DecoderLayer(nn.Module):
  cfg: LLMConfig
  mode: str
  visual_ffn: bool
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, carry, layer, ctx):
    """carry: {"x_v", "x_t"} (forward) or {"x_t", "k", "v"} with the whole stacked cache
    (extend: updated in place at this layer's slot, so a decode step copies no cache);
    layer: this layer's index in the stack (extend only)."""
    c = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = Attention(c, self.mode, name="self_attn", **kw)
    norm1 = RMSNorm(c.rms_norm_eps, name="input_layernorm", **kw)
    norm2 = RMSNorm(c.rms_norm_eps, name="post_attention_layernorm", **kw)
    mlp = SwiGLU(c.width, c.mlp_dim, name="mlp", **kw)
    x_t = carry["x_t"]
    if "k" not in carry:
      x_v = carry["x_v"]
      a_v, a_t, out = attn(norm1(x_v), norm1(x_t), ctx["pos_v"], ctx["pos_t"], ctx["valid_v"], ctx["valid_t"])
      x_v = x_v + a_v
      if self.visual_ffn:
        x_v = x_v + mlp(norm2(x_v))
      new = dict(x_v=x_v)
    else:
      h = norm1(x_t)
      k_new, v_new = attn.keys_values(h, ctx["pos_t"])
      at = (layer, 0, ctx["index"], 0, 0)
      k_all = jax.lax.dynamic_update_slice(carry["k"], k_new[None].astype(carry["k"].dtype), at)
      v_all = jax.lax.dynamic_update_slice(carry["v"], v_new[None].astype(carry["v"].dtype), at)
      k, v = (jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False) for a in (k_all, v_all))
      a_t = attn.extend(h, ctx["pos_t"], k, v, ctx["cache_pos"], ctx["cache_valid"])
      new, out = dict(k=k_all, v=v_all), None
    x_t = x_t + a_t
    x_t = x_t + mlp(norm2(x_t))
    x_t = nn.with_logical_constraint(x_t, ("activation_batch", "activation_length", "activation_embed"))
    return dict(new, x_t=x_t), out


class LLM(nn.Module):
  cfg: LLMConfig
  mode: str
  visual_ffn: bool
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  remat: str = "none"
  unroll: int | bool = 1

  def setup(self):
    c = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embed_tokens = nn.Embed(c.vocab_size, c.width, embedding_init=logical(nn.initializers.normal(0.02),
                                                                               ("vocab", "embed")), **kw)
    stack = scan_layers(DecoderLayer, length=c.depth, remat=self.remat, unroll=self.unroll,
                        in_axes=(0, nn.broadcast))
    self.layers = stack(c, self.mode, self.visual_ffn, **kw)
    self.norm = RMSNorm(c.rms_norm_eps, **kw)
    if not c.tie_embeddings:
      self.lm_head = Linear((c.width,), (c.vocab_size,), ("embed", "vocab"), **kw)

  def embed(self, input_ids):
    return self.embed_tokens(input_ids)

  def logits(self, x_t):
    h = self.norm(x_t)
    logits = self.embed_tokens.attend(h) if self.cfg.tie_embeddings else self.lm_head(h)
    return logits.astype(jnp.float32)

  def _forward_layers(self, x_v, input_ids, pos_v, pos_t, valid_v, valid_t):
    """Both streams through every layer -> final text stream (B, T, D) and per-layer (k, v)."""
    ctx = dict(pos_v=pos_v, pos_t=pos_t, valid_v=valid_v, valid_t=valid_t)
    carry, kv = self.layers(dict(x_v=x_v.astype(self.dtype), x_t=self.embed(input_ids)), None, ctx)
    return carry["x_t"], kv

  def __call__(self, x_v, input_ids, pos_v, pos_t, valid_v, valid_t):
    """Full forward -> text logits (B, T, vocab) and per-layer (k, v), each (L, B, V+T, K, H)."""
    x_t, kv = self._forward_layers(x_v, input_ids, pos_v, pos_t, valid_v, valid_t)
    return self.logits(x_t), kv

  def prefill(self, x_v, input_ids, pos_v, pos_t, valid_v, valid_t, cache_size: int | None = None):
    """Full forward -> next-token logits (B, vocab) float32 at each row's last valid text token,
    and the cache over [visual; text] grown to `cache_size` slots (default V + T), index V + T.

    The same layers as `__call__`; only the last token per row goes through the LM head.
    """
    x_t, (k, v) = self._forward_layers(x_v, input_ids, pos_v, pos_t, valid_v, valid_t)
    last = last_valid_index(pos_t, valid_t)
    logits = self.logits(jnp.take_along_axis(x_t, last[:, None, None], axis=1)[:, 0])
    cache = dict(k=k, v=v, pos=jnp.concatenate([pos_v, pos_t], 1).astype(jnp.int32),
                 valid=jnp.concatenate([valid_v, valid_t], 1), index=jnp.asarray(k.shape[2], jnp.int32))
    return logits, pad_cache(cache, cache_size or k.shape[2])

  def extend(self, input_ids, pos_t, valid_t, cache: Cache):
    """Append text tokens (B, T) at slots [index, index + T) of the cache; -> logits, new cache."""
    index = cache["index"]
    cache_pos = jax.lax.dynamic_update_slice(cache["pos"], pos_t.astype(cache["pos"].dtype), (0, index))
    cache_valid = jax.lax.dynamic_update_slice(cache["valid"], valid_t, (0, index))
    ctx = dict(pos_t=pos_t, index=index, cache_pos=cache_pos, cache_valid=cache_valid)
    carry = dict(x_t=self.embed(input_ids), k=cache["k"], v=cache["v"])
    carry, _ = self.layers(carry, jnp.arange(self.cfg.depth), ctx)
    new_cache = dict(k=carry["k"], v=carry["v"], pos=cache_pos, valid=cache_valid, index=index + input_ids.shape[1])
    return self.logits(carry["x_t"]), new_cache
