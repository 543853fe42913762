"""Attention of one decoder layer, in every interaction mode, with the layer's own weights.

Letters: B batch, V visual tokens, T text tokens, Q queries, S keys (V + T, or the cache),
D width, N query heads, K kv heads, G = N / K query heads per kv head, H head dim.

Both streams carry their positions in the interleaved sequence; RoPE rotates by position
and the mask compares positions, so the memory order of the streams never matters.

* self (LLaVA):       queries [visual; text] attend to all keys, causal by position.
* composite (EE-MLLM): queries are text only (causal by position over [visual; text] keys);
  each visual token is updated by the aligner `o_proj(v_proj(h_v))` -- the attention output
  of a query that may attend only to itself -- so no visual query, no V x V scores.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ee_mllm_jax.config import AttentionMode, LLMConfig
from ee_mllm_jax.models.layers import Linear, rope

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, k_valid: jax.Array) -> jax.Array:
  """(B, Q) query positions, (B, S) key positions/validity -> (B, Q, S), True = attend."""
  return k_valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Masked softmax attention with GQA. q (B,Q,N,H), k/v (B,S,K,H), mask (B,Q,S) -> (B,Q,N,H).

  A fully masked row (a padding query) yields a finite average; callers ignore such rows.
  """
  b, nq, n, h = q.shape
  kv = k.shape[2]
  q = q.reshape(b, nq, kv, n // kv, h)
  scores = jnp.einsum("bqkgh,bskh->bkgqs", q, k, preferred_element_type=jnp.float32) * h ** -0.5
  scores = jnp.where(mask[:, None, None], scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgqs,bskh->bqkgh", probs, v).reshape(b, nq, n, h)


class Attention(nn.Module):
  """One layer's attention (HF names: q_proj, k_proj, v_proj, o_proj)."""

  cfg: LLMConfig
  mode: AttentionMode  # validated once, by ModelConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    c = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.q_proj = Linear((c.width,), (c.num_heads, c.head_dim), ("embed", "heads", "head_dim"),
                         use_bias=c.qkv_bias, **kw)
    self.k_proj = Linear((c.width,), (c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"),
                         use_bias=c.qkv_bias, **kw)
    self.v_proj = Linear((c.width,), (c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"),
                         use_bias=c.qkv_bias, **kw)
    self.o_proj = Linear((c.num_heads, c.head_dim), (c.width,), ("heads", "head_dim", "embed"), **kw)

  def keys_values(self, h, pos):
    """(B, L, D) normed inputs at positions (B, L) -> rotated keys and values (B, L, K, H)."""
    return rope(self.k_proj(h), pos, self.cfg.rope_theta), self.v_proj(h)

  def queries(self, h, pos):
    return rope(self.q_proj(h), pos, self.cfg.rope_theta)

  def align(self, v_vis):
    """Aligner: the output of a visual query attending only to itself, o_proj(v), (B,V,K,H) -> (B,V,D).

    Query head n reads kv head n // G, so it is o_proj applied to the values repeated over the
    G query heads of each kv head; `repeated_input` sums o_proj's G heads instead, and the
    aligner costs K*H*D per token, not N*H*D.
    """
    return self.o_proj.repeated_input(v_vis, self.cfg.num_heads // self.cfg.num_kv_heads)

  def __call__(self, h_v, h_t, pos_v, pos_t, valid_v, valid_t):
    """Forward phase. Normed streams (B,V,D), (B,T,D) -> attention outputs for both, and this
    layer's (k, v) over [visual; text], each (B, V+T, K, H)."""
    n_vis = h_v.shape[1]
    pos = jnp.concatenate([pos_v, pos_t], axis=1)
    valid = jnp.concatenate([valid_v, valid_t], axis=1)
    h = jnp.concatenate([h_v, h_t], axis=1)
    k, v = self.keys_values(h, pos)
    if self.mode == "self":
      out = self.o_proj(attend(self.queries(h, pos), k, v, attention_mask(pos, pos, valid)))
      return out[:, :n_vis], out[:, n_vis:], (k, v)
    out_t = self.o_proj(attend(self.queries(h_t, pos_t), k, v, attention_mask(pos_t, pos, valid)))
    return self.align(v[:, :n_vis]), out_t, (k, v)

  def extend(self, h_t, pos_t, cache_k, cache_v, cache_pos, cache_valid):
    """Extend phase. Text queries against a KV cache that already holds their own keys
    (decode steps, a prompt after a cached prefix); the same in every mode: text tokens attend
    to every earlier key, visual or text."""
    q = self.queries(h_t, pos_t)
    return self.o_proj(attend(q, cache_k, cache_v, attention_mask(pos_t, cache_pos, cache_valid)))
