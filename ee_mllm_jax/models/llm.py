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

A layer schedule (`Composite(from_layer=n)`, `Mode.schedule`):
the forward phase runs two scans, n self-attention layers then depth - n composite layers, each
applied, as a module of its own, to its slice of the one `layers/` stack (L, ...); the extend
phase, the same in every mode, stays one scan over all layers. So the parameters, the HF
checkpoint and the cache do not depend on n.

Cross mode (Flamingo, `models/cross.py`): the decoder layers run over text only (their
self-attention keys are text keys; the visual stream is empty), and a gated cross-attention
block before layers k-1, 2k-1, ..., L-1 (OpenFlamingo's placement) reads the media. One `nn.scan`
over the L/k groups, each an inner scan of its first k-1 decoder layers, the block, then its last
layer. The cross blocks' parameters are the group
scan's own (`cross/...`, stacked over groups); the decoder's stay `layers/...` (L, ...) as in
every mode, so a pretrained LLM loads unchanged, and each group reads its k layers from that
stack viewed as (L/k, k, ...). In both phases the group also takes (forward) or returns
(prefill) the cross keys/values of its block, computed once from the media.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ee_mllm_jax.batch import Cache, last_valid_index
from ee_mllm_jax.config import LLMConfig
from ee_mllm_jax.mode import Cross, LayerKind, Mode
from ee_mllm_jax.models.attention import Attention
from ee_mllm_jax.models.cross import GatedCrossBlock
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
  mode: LayerKind
  visual_ffn: bool  # Mode.visual_ffn_in(mode)
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


@flax.struct.dataclass
class MediaContext:
  """Cross mode: what the cross blocks read besides their keys/values. Text positions (B, T),
  each image's last position and validity (B, I), and the media (B, I, M, D) the keys/values
  are computed from (forward phase; None when they come from the cache)."""

  pos_t: jax.Array
  media_pos: jax.Array
  media_valid: jax.Array
  media: jax.Array | None = None


def _decoder_stack(length: int, remat: str, unroll):
  """The scanned decoder layer class (`length` layers; xs: the layer indices in the extend phase)."""
  return scan_layers(DecoderLayer, length=length, remat=remat, unroll=unroll, in_axes=(0, nn.broadcast))


def detached_stack(cfg: LLMConfig, length: int, mode: LayerKind, visual_ffn: bool, *, remat: str, unroll,
                   dtype, param_dtype):
  """`length` scanned decoder layers as a module of their own (no parent), to be applied to a
  slice (length, ...) of LLM's `layers/` parameters: the runs of a layer schedule, the layers of
  a cross-mode group."""
  return _decoder_stack(length, remat, unroll)(cfg, mode, visual_ffn, parent=None, dtype=dtype,
                                               param_dtype=param_dtype)


class CrossGroup(GatedCrossBlock):
  """One group of cross mode: `every` decoder layers with the gated cross-attention block (whose
  parameters it owns) before the last of them, as OpenFlamingo places its blocks (before layer l
  when (l + 1) % every == 0: layers every-1, 2*every-1, ..., L-1), so that no block reads the raw
  embeddings unless every == 1.

  The scanned step over groups: the first every-1 layers (an inner scan), the block, the last
  layer. xs: this group's decoder parameters (k, ...) and, in the extend phase, its block's cached
  keys/values and the group's layer indices."""

  every: int = 1
  remat: str = "none"
  unroll: int | bool = 1

  def _decoder(self, length: int):
    """`length` decoder layers, detached: applied to a slice of this group's part of `layers/`."""
    return detached_stack(self.cfg, length, "self", False, remat=self.remat, unroll=self.unroll,
                          dtype=self.dtype, param_dtype=self.param_dtype)

  def _layers(self, carry, layer_params, layers, ctx, before_block: bool):
    """The group's layers before the block (the first every-1) or after it (the last one)."""
    k = self.every
    part = (lambda a: a[:k - 1]) if before_block else (lambda a: a[k - 1:])
    layers = None if layers is None else part(layers)
    return self._decoder(k - 1 if before_block else 1).apply({"params": jax.tree.map(part, layer_params)}, carry,
                                                              layers, ctx)

  def __call__(self, carry, xs, media_ctx: MediaContext, ctx):
    layer_params = xs[0]
    block = lambda carry, kv_cross: carry.replace(x_t=self.update(carry.x_t, media_ctx.pos_t, kv_cross,
                                                                  media_ctx.media_pos, media_ctx.media_valid))
    if isinstance(ctx, ForwardContext):
      kv_cross = self.keys_values(media_ctx.media)
      if layer_params is None:  # init: the decoder's parameters are LLM.layers' own
        return block(carry, kv_cross), (None, kv_cross)
      kvs = []
      if self.every > 1:
        carry, kv = self._layers(carry, layer_params, None, ctx, before_block=True)
        kvs.append(kv)
      carry, kv = self._layers(block(carry, kv_cross), layer_params, None, ctx, before_block=False)
      kv = jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *kvs, kv)  # (k, ...): the group's layers in order
      return carry, (kv, kv_cross)
    kv_cross, layers = xs[1], xs[2]
    if self.every > 1:
      carry, _ = self._layers(carry, layer_params, layers, ctx, before_block=True)
    carry, _ = self._layers(block(carry, kv_cross), layer_params, layers, ctx, before_block=False)
    return carry, None


class LLM(nn.Module):
  cfg: LLMConfig
  mode: Mode  # its schedule, visual FFN per layer kind, and (Cross) the blocks' settings
  media_dim: int = 0  # cross mode: the media's width E (0: the LLM's)
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  remat: str = "none"
  unroll: int | bool = 1

  def setup(self):
    c = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embed_tokens = nn.Embed(c.vocab_size, c.width, embedding_init=logical(nn.initializers.normal(0.02),
                                                                               ("vocab", "embed")), **kw)
    cross = isinstance(self.mode, Cross)
    # With a two-run schedule this stack creates the parameters and runs the extend phase (neither
    # depends on the mode); the forward phase applies one detached stack per run to its slice.
    kind = self._runs()[-1][0]
    self.layers = _decoder_stack(c.depth, self.remat, self.unroll)(c, kind, self.mode.visual_ffn_in(kind), **kw)
    if cross:
      groups = scan_layers(CrossGroup, length=self.mode.blocks(c.depth), remat="none", unroll=self.unroll,
                           in_axes=(0, nn.broadcast, nn.broadcast))
      self.cross = groups(c, self.mode, self.media_dim or c.width, every=self.mode.every, remat=self.remat,
                          unroll=self.unroll, **kw)
    self.norm = RMSNorm(c.rms_norm_eps, **kw)
    if not c.tie_embeddings:
      self.lm_head = Linear((c.width,), (c.vocab_size,), ("embed", "vocab"), **kw)

  def _runs(self) -> tuple[tuple[LayerKind, int], ...]:
    return self.mode.schedule(self.cfg.depth)

  def _scheduled_layers(self, carry: Streams, ctx: ForwardContext):
    """The forward phase through a multi-run schedule: one detached scan per run over its slice
    of `layers/`, the carry handed on; -> final carry and (k, v) stacked over all L layers."""
    params = nn.meta.unbox(self.variables["params"]["layers"])
    kvs, start = [], 0
    for kind, count in self._runs():
      run = detached_stack(self.cfg, count, kind, self.mode.visual_ffn_in(kind), remat=self.remat, unroll=self.unroll,
                           dtype=self.dtype, param_dtype=self.param_dtype)
      piece = jax.tree.map(lambda a, s=start, n=count: jax.lax.slice_in_dim(a, s, s + n, axis=0), params)
      carry, kv = run.apply({"params": piece}, carry, None, ctx)
      kvs.append(kv)
      start += count
    return carry, jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *kvs)

  def embed(self, input_ids):
    return self.embed_tokens(input_ids)

  def logits(self, x_t):
    h = self.norm(x_t)
    logits = self.embed_tokens.attend(h) if self.cfg.tie_embeddings else self.lm_head(h)
    return logits.astype(jnp.float32)

  def _grouped_layers(self):
    """Cross mode: the decoder's stacked parameters (L, ...) viewed as (L/k, k, ...), one slice per group."""
    g, every = self.mode.blocks(self.cfg.depth), self.mode.every
    return jax.tree.map(lambda a: a.reshape((g, every) + a.shape[1:]),
                        nn.meta.unbox(self.variables["params"]["layers"]))

  def _forward_layers(self, x_v, input_ids, pos_v, pos_t, valid_v, valid_t):
    """Both streams through every layer -> final text stream (B, T, D), per-layer (k, v) and, in
    cross mode, every block's cross (k, v) (J, B, I, M, N, H) (None in the other modes).

    Cross mode: x_v (B, I, M, E) are the media, pos_v / valid_v (B, I) each image's last position
    and validity."""
    x_t = self.embed(input_ids)
    if self.mode.visual_in_decoder:
      ctx = ForwardContext(pos_v=pos_v, pos_t=pos_t, valid_v=valid_v, valid_t=valid_t)
      carry = Streams(x_v=x_v.astype(self.dtype), x_t=x_t)
      if len(self._runs()) > 1 and not self.is_initializing():
        carry, kv = self._scheduled_layers(carry, ctx)
      else:
        carry, kv = self.layers(carry, None, ctx)
      return carry.x_t, kv, None
    b = x_t.shape[0]
    ctx = ForwardContext(pos_v=jnp.zeros((b, 0), pos_t.dtype), pos_t=pos_t, valid_v=jnp.zeros((b, 0), bool),
                         valid_t=valid_t)
    carry = Streams(x_v=jnp.zeros((b, 0, self.cfg.width), self.dtype), x_t=x_t)
    media_ctx = MediaContext(pos_t=pos_t, media_pos=pos_v, media_valid=valid_v, media=x_v.astype(self.dtype))
    if self.is_initializing():  # creates both stacks' parameters (layers/ first: the groups read them)
      self.layers(carry, None, ctx)
      carry, (_, kv_cross) = self.cross(carry, (None,), media_ctx, ctx)
      return carry.x_t, (None, None), kv_cross
    carry, (kv, kv_cross) = self.cross(carry, (self._grouped_layers(),), media_ctx, ctx)
    kv = jax.tree.map(lambda a: a.reshape((self.cfg.depth,) + a.shape[2:]), kv)  # (J, k, ...) -> (L, ...)
    return carry.x_t, kv, kv_cross

  def __call__(self, x_v, input_ids, pos_v, pos_t, valid_v, valid_t):
    """Full forward -> text logits (B, T, vocab) and per-layer (k, v), each (L, B, V+T, K, H)
    (cross mode: (L, B, T, K, H), text keys only)."""
    x_t, kv, _ = self._forward_layers(x_v, input_ids, pos_v, pos_t, valid_v, valid_t)
    return self.logits(x_t), kv

  def prefill(self, x_v, input_ids, pos_v, pos_t, valid_v, valid_t, cache_size: int | None = None):
    """Full forward -> next-token logits (B, vocab) float32 at each row's last valid text token,
    and the cache over [visual; text] grown to `cache_size` slots (default V + T), index V + T.
    Cross mode: the self-attention cache holds text only (T slots); the blocks' keys/values of
    the media and the images' positions/validity ride along, computed once here.

    The same layers as `__call__`; only the last token per row goes through the LM head.
    """
    x_t, (k, v), kv_cross = self._forward_layers(x_v, input_ids, pos_v, pos_t, valid_v, valid_t)
    last = last_valid_index(pos_t, valid_t)
    logits = self.logits(jnp.take_along_axis(x_t, last[:, None, None], axis=1)[:, 0])
    if not self.mode.visual_in_decoder:
      cache = Cache(k=k, v=v, pos=pos_t.astype(jnp.int32), valid=valid_t, index=jnp.asarray(k.shape[2], jnp.int32),
                    cross_k=kv_cross[0], cross_v=kv_cross[1], media_pos=pos_v.astype(jnp.int32), media_valid=valid_v)
    else:
      cache = Cache(k=k, v=v, pos=jnp.concatenate([pos_v, pos_t], 1).astype(jnp.int32),
                    valid=jnp.concatenate([valid_v, valid_t], 1), index=jnp.asarray(k.shape[2], jnp.int32))
    return logits, cache.pad(cache_size or k.shape[2])

  def extend(self, input_ids, pos_t, valid_t, cache: Cache):
    """Append text tokens (B, T) at slots [index, index + T) of the cache; -> logits, new cache."""
    new = cache.with_text(pos_t, valid_t)
    ctx = ExtendContext(pos_t=pos_t, index=cache.index, cache_pos=new.pos, cache_valid=new.valid)
    carry = ExtendCarry(x_t=self.embed(input_ids), k=cache.k, v=cache.v)
    if not self.mode.visual_in_decoder:
      layers = jnp.arange(self.cfg.depth).reshape(self.mode.blocks(self.cfg.depth), self.mode.every)
      media_ctx = MediaContext(pos_t=pos_t, media_pos=cache.media_pos, media_valid=cache.media_valid)
      xs = (self._grouped_layers(), (cache.cross_k, cache.cross_v), layers)
      carry, _ = self.cross(carry, xs, media_ctx, ctx)
    else:
      carry, _ = self.layers(carry, jnp.arange(self.cfg.depth), ctx)
    return self.logits(carry.x_t), new.replace(k=carry.k, v=carry.v)
