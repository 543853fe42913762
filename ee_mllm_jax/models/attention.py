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
import jax.numpy as jnp

from ee_mllm_jax.config import LLMConfig
from ee_mllm_jax.mode import LayerKind
from ee_mllm_jax.models.kernels import attend
from ee_mllm_jax.models.layers import Linear, rope
from ee_mllm_jax.models.reduction import received_attention


class Attention(nn.Module):
  """One layer's attention (HF names: q_proj, k_proj, v_proj, o_proj)."""

  cfg: LLMConfig
  mode: LayerKind  # visual queries ("self") or the aligner ("composite"), from Mode.schedule
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    c = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=c.lora)
    self.q_proj = Linear((c.width,), (c.num_heads, c.head_dim), ("embed", "heads", "head_dim"),
                         use_bias=c.qkv_bias, **kw)
    self.k_proj = Linear((c.width,), (c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"),
                         use_bias=c.qkv_bias, **kw)
    self.v_proj = Linear((c.width,), (c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"),
                         use_bias=c.qkv_bias, **kw)
    self.o_proj = Linear((c.num_heads, c.head_dim), (c.width,), ("heads", "head_dim", "embed"), **kw)

  def keys_values(self, h, pos):
    """(B, S, D) normed inputs at positions (B, S) -> rotated keys and values (B, S, K, H)."""
    return rope(self.k_proj(h), pos, self.cfg.rope_theta, self.cfg.rope_scaling), self.v_proj(h)

  def queries(self, h, pos):
    return rope(self.q_proj(h), pos, self.cfg.rope_theta, self.cfg.rope_scaling)

  def attend(self, q, k, v, q_pos, k_pos, k_valid, layer=None, same_tokens=False):
    return attend(q, k, v, q_pos, k_pos, k_valid, impl=self.cfg.attention_impl, block=self.cfg.attention_block,
                  layer=layer, same_tokens=same_tokens)

  def align(self, v_vis):
    """Aligner: the output of a visual query attending only to itself, o_proj(v), (B,V,K,H) -> (B,V,D).

    Query head n reads kv head n // G, so it is o_proj applied to the values repeated over the
    G query heads of each kv head; `repeated_input` sums o_proj's G heads instead, and the
    aligner costs K*H*D per token, not N*H*D.
    """
    return self.o_proj.repeated_input(v_vis, self.cfg.num_heads // self.cfg.num_kv_heads)

  def __call__(self, h_v, h_t, pos_v, pos_t, valid_v, valid_t, rank_t=None):
    """Forward phase. Normed streams (B,V,D), (B,T,D) -> attention outputs for both, and this
    layer's (k, v) over [visual; text], each (B, V+T, K, H). With `rank_t` (B, T) bool (FastV's
    layer K-1, see models/reduction.py) also each visual token's received attention (B, V) from
    this layer's queries: the valid visual ones (self) and the text ones `rank_t` marks."""
    n_vis = h_v.shape[1]
    pos = jnp.concatenate([pos_v, pos_t], axis=1)
    valid = jnp.concatenate([valid_v, valid_t], axis=1)
    h = jnp.concatenate([h_v, h_t], axis=1)
    k, v = self.keys_values(h, pos)
    if self.mode == "self":
      q, q_pos, q_valid = self.queries(h, pos), pos, jnp.concatenate([valid_v, rank_t], 1) if rank_t is not None else None
      out = self.o_proj(self.attend(q, k, v, pos, pos, valid, same_tokens=True))
      a_v, a_t = out[:, :n_vis], out[:, n_vis:]
    else:
      q, q_pos, q_valid = self.queries(h_t, pos_t), pos_t, rank_t
      a_v, a_t = self.align(v[:, :n_vis]), self.o_proj(self.attend(q, k, v, pos_t, pos, valid))
    if rank_t is None:
      return a_v, a_t, (k, v)
    return a_v, a_t, (k, v), received_attention(q, k, q_pos, q_valid, pos, valid, n_vis)

  def extend(self, h_t, pos_t, cache_k, cache_v, cache_pos, cache_valid, layer):
    """Extend phase. Text queries against a KV cache that already holds their own keys
    (decode steps, a prompt after a cached prefix); the same in every mode: text tokens attend
    to every earlier key, visual or text. cache_k/v are the stacked (L,B,S,K,H) cache, of which
    layer `layer` is read."""
    q = self.queries(h_t, pos_t)
    return self.o_proj(self.attend(q, cache_k, cache_v, pos_t, cache_pos, cache_valid, layer))
