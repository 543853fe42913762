"""LLaMA / Qwen2 decoder over two streams (visual and text), with scanned layers.

Letters: B batch, V visual tokens, T text tokens, S cache length, D width, K kv heads,
H head dim, L layers. HF names: embed_tokens, layers/{input_layernorm, self_attn,
post_attention_layernorm, mlp}, norm, lm_head.

A layer runs in one of two phases, told by the type of its context:
* `ForwardContext`: both streams through the layer in the configured mode (training,
  prefill); the carry is `Streams` and the layer also returns its keys/values over
  [visual; text] for a cache.
* `ExtendContext`: new text tokens only, against the KV cache (decode steps, prompts after a
  cached image prefix); the carry holds the whole stacked cache, updated in place at this
  layer's slot, so a decode step copies no cache. Text queries attend to all earlier keys in
  every mode, so this phase has no mode switch.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ee_mllm_jax.batch import Cache, last_valid_index
from ee_mllm_jax.config import AttentionMode, LLMConfig
from ee_mllm_jax.models.attention import Attention
from ee_mllm_jax.models.layers import Linear, RMSNorm, SwiGLU, logical, scan_layers


@flax.struct.dataclass
class ForwardContext:
  """Forward phase: positions (B, V) / (B, T) and validity of both streams."""

  pos_v: jax.Array
  pos_t: jax.Array
  valid_v: jax.Array
  valid_t: jax.Array


@flax.struct.dataclass
class ExtendContext:
  """Extend phase: the new text tokens' positions (B, T), the write slot, and every cache
  slot's position/validity (B, S) with the new tokens already written."""

  pos_t: jax.Array
  index: jax.Array
  cache_pos: jax.Array
  cache_valid: jax.Array


@flax.struct.dataclass
class Streams:
  """Forward carry: the visual (B, V, D) and text (B, T, D) streams."""

  x_v: jax.Array
  x_t: jax.Array


@flax.struct.dataclass
class ExtendCarry:
  """Extend carry: the text stream and the stacked cache keys/values (L, B, S, K, H)."""

  x_t: jax.Array
  k: jax.Array
  v: jax.Array


class DecoderLayer(nn.Module):
  cfg: LLMConfig
  mode: AttentionMode
  visual_ffn: bool
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    c = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.self_attn = Attention(c, self.mode, **kw)
    self.input_layernorm = RMSNorm(c.rms_norm_eps, **kw)
    self.post_attention_layernorm = RMSNorm(c.rms_norm_eps, **kw)
    self.mlp = SwiGLU(c.width, c.mlp_dim, **kw)

  def __call__(self, carry, layer, ctx):
    """The scanned step: `layer` is this layer's index in the stack (extend phase only)."""
    if isinstance(ctx, ForwardContext):
      return self.forward(carry, ctx)
    if isinstance(ctx, ExtendContext):
      return self.extend(carry, layer, ctx), None
    raise TypeError(f"a decoder layer runs with a ForwardContext or an ExtendContext, got {type(ctx).__name__}")

  def forward(self, carry: Streams, ctx: ForwardContext) -> tuple[Streams, tuple[jax.Array, jax.Array]]:
    norm1 = self.input_layernorm
    a_v, a_t, kv = self.self_attn(norm1(carry.x_v), norm1(carry.x_t), ctx.pos_v, ctx.pos_t, ctx.valid_v,
                                  ctx.valid_t)
    x_v = carry.x_v + a_v
    if self.visual_ffn:
      x_v = x_v + self.mlp(self.post_attention_layernorm(x_v))
    return Streams(x_v=x_v, x_t=self._text_rest(carry.x_t, a_t)), kv

  def extend(self, carry: ExtendCarry, layer: jax.Array, ctx: ExtendContext) -> ExtendCarry:
    h = self.input_layernorm(carry.x_t)
    k_new, v_new = self.self_attn.keys_values(h, ctx.pos_t)
    at = (layer, 0, ctx.index, 0, 0)
    k_all = jax.lax.dynamic_update_slice(carry.k, k_new[None].astype(carry.k.dtype), at)
    v_all = jax.lax.dynamic_update_slice(carry.v, v_new[None].astype(carry.v.dtype), at)
    a_t = self.self_attn.extend(h, ctx.pos_t, k_all, v_all, ctx.cache_pos, ctx.cache_valid, layer)
    return ExtendCarry(x_t=self._text_rest(carry.x_t, a_t), k=k_all, v=v_all)

  def _text_rest(self, x_t, a_t):
    """Text stream after attention: residual, FFN, sharding constraint (both phases)."""
    x_t = x_t + a_t
    x_t = x_t + self.mlp(self.post_attention_layernorm(x_t))
    return nn.with_logical_constraint(x_t, ("activation_batch", "activation_length", "activation_embed"))


class LLM(nn.Module):
  cfg: LLMConfig
  mode: AttentionMode
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
    ctx = ForwardContext(pos_v=pos_v, pos_t=pos_t, valid_v=valid_v, valid_t=valid_t)
    carry, kv = self.layers(Streams(x_v=x_v.astype(self.dtype), x_t=self.embed(input_ids)), None, ctx)
    return carry.x_t, kv

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
    cache = Cache(k=k, v=v, pos=jnp.concatenate([pos_v, pos_t], 1).astype(jnp.int32),
                  valid=jnp.concatenate([valid_v, valid_t], 1), index=jnp.asarray(k.shape[2], jnp.int32))
    return logits, cache.pad(cache_size or k.shape[2])

  def extend(self, input_ids, pos_t, valid_t, cache: Cache):
    """Append text tokens (B, T) at slots [index, index + T) of the cache; -> logits, new cache."""
    new = cache.with_text(pos_t, valid_t)
    ctx = ExtendContext(pos_t=pos_t, index=cache.index, cache_pos=new.pos, cache_valid=new.valid)
    carry = ExtendCarry(x_t=self.embed(input_ids), k=cache.k, v=cache.v)
    carry, _ = self.layers(carry, jnp.arange(self.cfg.depth), ctx)
    return self.logits(carry.x_t), new.replace(k=carry.k, v=carry.v)
