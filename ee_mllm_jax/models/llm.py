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

A slice of the one `layers/` stack (L, ...) runs through `layers.stack_view`: `nn.map_variables`
presents the stack's parameters to a scan of fewer layers as that scan's own, sliced or
regrouped, so rngs and collections reach those layers as in any submodule. The whole stack
creates the parameters (at init) and runs the extend phase, which is the same in every mode.

A layer schedule (`Composite(from_layer=n)`, `Mode.schedule`): the forward phase runs two scans,
n self-attention layers then depth - n composite layers (`ScheduleRuns`), each over its slice of
`layers/`. So the parameters, the HF checkpoint and the cache do not depend on n.

Cross mode (Flamingo, `models/cross.py`): the decoder layers run over text only (their
self-attention keys are text keys; the visual stream is empty), and a gated cross-attention
block before layers k-1, 2k-1, ..., L-1 (OpenFlamingo's placement) reads the media. One `nn.scan`
over the L/k groups (`CrossGroup`), each a scan of its first k-1 decoder layers, the block, then
its last layer. The view regroups the parameters: `layers/` (L, ...) as (L/k, k, ...) and the
blocks' own `cross/` (L/k, ...), so a pretrained LLM loads unchanged. The group returns (forward)
or takes (extend, from the cache) the cross keys/values of its block, computed once from the media.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ee_mllm_jax.batch import Cache, last_valid_index
from ee_mllm_jax.config import LLMConfig
from ee_mllm_jax.mode import Cross, LayerKind, Mode
from ee_mllm_jax.models.attention import Attention
from ee_mllm_jax.models import reduction
from ee_mllm_jax.models.cross import GatedCrossBlock, MediaContext
from ee_mllm_jax.models.layers import Linear, RMSNorm, SwiGLU, layer_slice, logical, scan_layers, stack_view


@flax.struct.dataclass
class ForwardContext:
  """Forward phase: positions (B, V) / (B, T) and validity of both streams."""

  pos_v: jax.Array
  pos_t: jax.Array
  valid_v: jax.Array
  valid_t: jax.Array
  rank_t: jax.Array | None = None  # FastV: the text queries that rank visual tokens (None: valid_t)


@flax.struct.dataclass
class ExtendContext:
  """Extend phase: the new text tokens' positions (B, T), the write slot, and every cache
  slot's position/validity (B, S) with the new tokens already written."""

  pos_t: jax.Array
  index: jax.Array
  cache_pos: jax.Array
  cache_valid: jax.Array
  late_valid: jax.Array | None = None  # FastV: slot validity for layers >= late_from (Cache.late_valid)
  late_from: int = flax.struct.field(pytree_node=False, default=0)


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
  scores: bool = False  # FastV's layer K-1: also returns each visual token's received attention

  def setup(self):
    c = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.self_attn = Attention(c, self.mode, **kw)
    self.input_layernorm = RMSNorm(c.rms_norm_eps, **kw)
    self.post_attention_layernorm = RMSNorm(c.rms_norm_eps, **kw)
    self.mlp = SwiGLU(c.width, c.mlp_dim, lora=c.lora, **kw)

  def __call__(self, carry, layer, ctx):
    """The scanned step: `layer` is this layer's index in the stack (extend phase only)."""
    if isinstance(ctx, ForwardContext):
      return self.forward(carry, ctx)
    if isinstance(ctx, ExtendContext):
      return self.extend(carry, layer, ctx), None
    raise TypeError(f"a decoder layer runs with a ForwardContext or an ExtendContext, got {type(ctx).__name__}")

  def forward(self, carry: Streams, ctx: ForwardContext) -> tuple[Streams, tuple[jax.Array, jax.Array]]:
    norm1 = self.input_layernorm
    rank = () if not self.scores else (ctx.valid_t if ctx.rank_t is None else ctx.rank_t & ctx.valid_t,)
    a_v, a_t, kv, *scores = self.self_attn(norm1(carry.x_v), norm1(carry.x_t), ctx.pos_v, ctx.pos_t, ctx.valid_v,
                                           ctx.valid_t, *rank)
    x_v = carry.x_v + a_v
    if self.visual_ffn:
      x_v = x_v + self.mlp(self.post_attention_layernorm(x_v))
    return Streams(x_v=x_v, x_t=self._text_rest(carry.x_t, a_t)), (kv, scores[0]) if scores else kv

  def extend(self, carry: ExtendCarry, layer: jax.Array, ctx: ExtendContext) -> ExtendCarry:
    h = self.input_layernorm(carry.x_t)
    k_new, v_new = self.self_attn.keys_values(h, ctx.pos_t)
    at = (layer, 0, ctx.index, 0, 0)
    k_all = jax.lax.dynamic_update_slice(carry.k, k_new[None].astype(carry.k.dtype), at)
    v_all = jax.lax.dynamic_update_slice(carry.v, v_new[None].astype(carry.v.dtype), at)
    valid = ctx.cache_valid if ctx.late_valid is None else jnp.where(layer >= ctx.late_from, ctx.late_valid,
                                                                     ctx.cache_valid)
    a_t = self.self_attn.extend(h, ctx.pos_t, k_all, v_all, ctx.cache_pos, valid, layer)
    return ExtendCarry(x_t=self._text_rest(carry.x_t, a_t), k=k_all, v=v_all)

  def _text_rest(self, x_t, a_t):
    """Text stream after attention: residual, FFN, sharding constraint (both phases)."""
    x_t = x_t + a_t
    x_t = x_t + self.mlp(self.post_attention_layernorm(x_t))
    return nn.with_logical_constraint(x_t, ("activation_batch", "activation_length", "activation_embed"))


def _decoder_stack(length: int, remat: str, unroll):
  """The scanned decoder layer class (`length` layers; xs: the layer indices in the extend phase)."""
  return scan_layers(DecoderLayer, length=length, remat=remat, unroll=unroll, in_axes=(0, nn.broadcast))


def _concat_layers(*kvs):
  """Per-layer (k, v) of consecutive runs of layers -> one (k, v) stacked over all of them."""
  return jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *kvs)


@flax.struct.dataclass
class Decoded:
  """The forward phase's result: the final text stream (B, T, D); every layer's keys and values,
  each (L, B, V+T, K, H) (cross mode: text keys only, (L, B, T, K, H)); in cross mode every
  block's keys/values of the media, each (J, B, I, M, N, H) (None in the other modes)."""

  x_t: jax.Array
  k: jax.Array | None
  v: jax.Array | None
  cross_k: jax.Array | None = None
  cross_v: jax.Array | None = None
  order: jax.Array | None = None  # FastV: the visual slots' order (B, V), kept tokens first


class ScheduleRuns(nn.Module):
  """The forward phase through a multi-run layer schedule: one scan per run (`runs_0`,
  `runs_1`, ...: `reduction.segments`), the carry handed on; -> final carry, (k, v) over all L
  layers and FastV's visual order (None without FastV). It runs as a `stack_view` of LLM's
  `layers/` (`_run_views`): each run reads its slice of the one stack. Under FastV the run of
  layer K-1 scores the visual tokens, and the later runs get the gathered stream and its
  positions: a smaller static V' (models/reduction.py)."""

  cfg: LLMConfig
  mode: Mode
  remat: str = "none"
  unroll: int | bool = 1
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.runs = [_decoder_stack(count, self.remat, self.unroll)(self.cfg, kind, self.mode.visual_ffn_in(kind),
                                                                 scores=scores, **kw)
                 for kind, count, scores in reduction.segments(self.mode, self.cfg.depth)]

  def __call__(self, carry: Streams, ctx: ForwardContext):
    kvs, order, early = [], None, None
    for (_, _, scores), run in zip(reduction.segments(self.mode, self.cfg.depth), self.runs):
      carry, kv = run(carry, None, ctx)
      if not scores:
        kvs.append(kv)
        continue
      kvs.append(kv[0])
      kept = self.mode.fastv_kept(carry.x_v.shape[1])
      order = reduction.fastv_order(kv[1][0], ctx.valid_v, kept)
      take = lambda x: reduction.take_tokens(x, order[:, :kept])
      carry = carry.replace(x_v=take(carry.x_v))
      ctx = ctx.replace(pos_v=take(ctx.pos_v), valid_v=take(ctx.valid_v))
      early, kvs = _concat_layers(*kvs), []
    if order is None:
      return carry, _concat_layers(*kvs), None
    return carry, reduction.fastv_keys_values(early, _concat_layers(*kvs), order, kept), order


def _run_views(schedule, layers):
  """`layers/` (L, ...) -> {"runs_i": its slice} for `ScheduleRuns` (schedule: its segments)."""
  views, start = {}, 0
  for i, (_, count, _) in enumerate(schedule):
    views[f"runs_{i}"] = layer_slice(layers, start, start + count)
    start += count
  return views


@flax.struct.dataclass
class GroupCache:
  """Extend phase, per cross group (the group scan's xs): the block's cached media keys/values,
  each (B, I, M, N, H), and the indices (k,) of the group's decoder layers in the stacked cache."""

  cross_k: jax.Array
  cross_v: jax.Array
  layers: jax.Array


class CrossGroup(nn.Module):
  """One group of cross mode: `every` decoder layers with the gated cross-attention block before
  the last of them, as OpenFlamingo places its blocks (before layer l when (l + 1) % every == 0:
  layers every-1, 2*every-1, ..., L-1), so that no block reads the raw embeddings unless every == 1.

  The scanned step over groups, run as a `stack_view` of LLM's parameters (`_group_views`):
  `before` reads the group's first every-1 layers of `layers/`, `last` its last one, `cross` its
  block (`cross/`). Forward phase (xs None): -> ((k, v) of the group's layers, the block's media
  (k, v)); extend phase (xs a `GroupCache`): -> None."""

  cfg: LLMConfig
  cross_mode: Cross
  media_dim: int
  every: int = 1
  remat: str = "none"
  unroll: int | bool = 1
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    stack = lambda n: _decoder_stack(n, self.remat, self.unroll)(self.cfg, "self", False, **kw)
    if self.every > 1:
      self.before = stack(self.every - 1)
    self.last = stack(1)
    self.cross = GatedCrossBlock(self.cfg, self.cross_mode, self.media_dim, **kw)

  def __call__(self, carry, xs: GroupCache | None, media_ctx: MediaContext, ctx):
    k = self.every
    if isinstance(ctx, ForwardContext):
      kv_cross, before, last = self.cross.keys_values(media_ctx.media), None, None
    else:
      kv_cross, before, last = (xs.cross_k, xs.cross_v), xs.layers[:k - 1], xs.layers[k - 1:]
    kvs = []
    if k > 1:
      carry, kv = self.before(carry, before, ctx)
      kvs.append(kv)
    carry = carry.replace(x_t=self.cross.update(carry.x_t, media_ctx.pos_t, kv_cross, media_ctx.media_pos,
                                                media_ctx.media_valid))
    carry, kv = self.last(carry, last, ctx)
    if xs is not None:
      return carry, None
    return carry, (_concat_layers(*kvs, kv), kv_cross)  # (k, ...): the group's layers in order


def _group_views(groups: int, every: int, params):
  """LLM's parameters -> the view `CrossGroup`'s scan reads: `layers/` (L, ...) as (L/k, k, ...),
  split into each group's first k-1 layers and its last; `cross/` (L/k, ...) as it is."""
  grouped = jax.tree.map(lambda a: a.reshape((groups, every) + a.shape[1:]), params["layers"])
  view = {"cross": params["cross"], "last": jax.tree.map(lambda a: a[:, every - 1:], grouped)}
  if every > 1:
    view["before"] = jax.tree.map(lambda a: a[:, :every - 1], grouped)
  return view


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
    # The whole stack creates the parameters and runs the extend phase (neither depends on the mode);
    # schedule runs and cross groups read slices of it through `stack_view`s.
    schedule = self.mode.schedule(c.depth)
    kind = schedule[-1][0]
    self.layers = _decoder_stack(c.depth, self.remat, self.unroll)(c, kind, self.mode.visual_ffn_in(kind), **kw)
    if len(reduction.segments(self.mode, c.depth)) > 1:
      self.schedule_runs = stack_view(ScheduleRuns, functools.partial(_run_views, reduction.segments(self.mode, c.depth)))(
          c, self.mode, remat=self.remat, unroll=self.unroll, **kw)
      nn.share_scope(self.schedule_runs, self.layers)  # it reads `layers/`
    if isinstance(self.mode, Cross):
      groups, media_dim = self.mode.blocks(c.depth), self.media_dim or c.width
      blocks = scan_layers(GatedCrossBlock, length=groups, remat="none", unroll=self.unroll)
      self.cross = blocks(c, self.mode, media_dim, **kw)  # creates `cross/` (init)
      group_scan = scan_layers(CrossGroup, length=groups, remat="none", unroll=self.unroll,
                               in_axes=(0, nn.broadcast, nn.broadcast))
      self.cross_groups = stack_view(group_scan, functools.partial(_group_views, groups, self.mode.every))(
          c, self.mode, media_dim, every=self.mode.every, remat=self.remat, unroll=self.unroll, **kw)
      nn.share_scope(self, self.cross_groups)  # it reads `layers/` and `cross/`
    self.norm = RMSNorm(c.rms_norm_eps, **kw)
    if not c.tie_embeddings:
      self.lm_head = Linear((c.width,), (c.vocab_size,), ("embed", "vocab"), lora=c.lora, **kw)

  def embed(self, input_ids):
    return self.embed_tokens(input_ids)

  def logits(self, x_t):
    h = self.norm(x_t)
    logits = self.embed_tokens.attend(h) if self.cfg.tie_embeddings else self.lm_head(h)
    return logits.astype(jnp.float32)

  def _forward_layers(self, x_v, input_ids, pos_v, pos_t, valid_v, valid_t, rank_t=None) -> Decoded:
    """Both streams through every layer (see `Decoded`). Cross mode: x_v (B, I, M, E) are the
    media, pos_v / valid_v (B, I) each image's last position and validity. FastV: `rank_t`
    (B, T) bool, the text queries that rank the visual tokens (None: every valid one)."""
    x_t = self.embed(input_ids)
    init = self.is_initializing()
    if self.mode.visual_in_decoder:
      ctx = ForwardContext(pos_v=pos_v, pos_t=pos_t, valid_v=valid_v, valid_t=valid_t, rank_t=rank_t)
      carry = Streams(x_v=x_v.astype(self.dtype), x_t=x_t)
      if hasattr(self, "schedule_runs") and not init:
        carry, (k, v), order = self.schedule_runs(carry, ctx)
      else:
        (carry, (k, v)), order = self.layers(carry, None, ctx), None
      return Decoded(x_t=carry.x_t, k=k, v=v, order=order)
    b = x_t.shape[0]
    ctx = ForwardContext(pos_v=jnp.zeros((b, 0), pos_t.dtype), pos_t=pos_t, valid_v=jnp.zeros((b, 0), bool),
                         valid_t=valid_t)
    carry = Streams(x_v=jnp.zeros((b, 0, self.cfg.width), self.dtype), x_t=x_t)
    media_ctx = MediaContext(pos_t=pos_t, media_pos=pos_v, media_valid=valid_v, media=x_v.astype(self.dtype))
    if init:  # creates both stacks' parameters, which the groups' view reads
      self.layers(carry, None, ctx)
      return Decoded(x_t=self.cross(x_t, media_ctx)[0], k=None, v=None)
    carry, ((k, v), (cross_k, cross_v)) = self.cross_groups(carry, None, media_ctx, ctx)
    k, v = (a.reshape((self.cfg.depth,) + a.shape[2:]) for a in (k, v))  # (J, k, ...) -> (L, ...)
    return Decoded(x_t=carry.x_t, k=k, v=v, cross_k=cross_k, cross_v=cross_v)

  def __call__(self, x_v, input_ids, pos_v, pos_t, valid_v, valid_t, rank_t=None):
    """Full forward -> text logits (B, T, vocab) and per-layer (k, v), each (L, B, V+T, K, H)
    (cross mode: (L, B, T, K, H), text keys only; FastV: the cache's slot order)."""
    out = self._forward_layers(x_v, input_ids, pos_v, pos_t, valid_v, valid_t, rank_t)
    return self.logits(out.x_t), (out.k, out.v)

  def prefill(self, x_v, input_ids, pos_v, pos_t, valid_v, valid_t, cache_size: int | None = None):
    """Full forward -> next-token logits (B, vocab) float32 at each row's last valid text token,
    and the cache over [visual; text] grown to `cache_size` slots (default V + T), index V + T.
    Cross mode: the self-attention cache holds text only (T slots); the blocks' keys/values of
    the media and the images' positions/validity ride along, computed once here.

    The same layers as `__call__`; only the last token per row goes through the LM head.
    """
    out = self._forward_layers(x_v, input_ids, pos_v, pos_t, valid_v, valid_t)
    last = last_valid_index(pos_t, valid_t)
    logits = self.logits(jnp.take_along_axis(out.x_t, last[:, None, None], axis=1)[:, 0])
    index = jnp.asarray(out.k.shape[2], jnp.int32)
    if not self.mode.visual_in_decoder:
      cache = Cache(k=out.k, v=out.v, pos=pos_t.astype(jnp.int32), valid=valid_t, index=index, cross_k=out.cross_k,
                    cross_v=out.cross_v, media_pos=pos_v.astype(jnp.int32), media_valid=valid_v)
    else:
      late_valid = None
      if out.order is not None:  # FastV: visual slots kept-first; layers >= K see only the kept ones
        pos_v, valid_v = (reduction.take_tokens(a, out.order) for a in (pos_v, valid_v))
        kept = jnp.arange(valid_v.shape[1]) < self.mode.fastv_kept(valid_v.shape[1])
        late_valid = jnp.concatenate([valid_v & kept, valid_t], 1)
      cache = Cache(k=out.k, v=out.v, pos=jnp.concatenate([pos_v, pos_t], 1).astype(jnp.int32),
                    valid=jnp.concatenate([valid_v, valid_t], 1), index=index, late_valid=late_valid)
    return logits, cache.pad(cache_size or out.k.shape[2])

  def extend(self, input_ids, pos_t, valid_t, cache: Cache):
    """Append text tokens (B, T) at slots [index, index + T) of the cache; -> logits, new cache."""
    new = cache.with_text(pos_t, valid_t)
    ctx = ExtendContext(pos_t=pos_t, index=cache.index, cache_pos=new.pos, cache_valid=new.valid,
                        late_valid=new.late_valid, late_from=self.mode.fastv_layer)
    carry = ExtendCarry(x_t=self.embed(input_ids), k=cache.k, v=cache.v)
    if not self.mode.visual_in_decoder:
      layers = jnp.arange(self.cfg.depth).reshape(self.mode.blocks(self.cfg.depth), self.mode.every)
      media_ctx = MediaContext(pos_t=pos_t, media_pos=cache.media_pos, media_valid=cache.media_valid)
      xs = GroupCache(cross_k=cache.cross_k, cross_v=cache.cross_v, layers=layers)
      carry, _ = self.cross_groups(carry, xs, media_ctx, ctx)
    else:
      carry, _ = self.layers(carry, jnp.arange(self.cfg.depth), ctx)
    return self.logits(carry.x_t), new.replace(k=carry.k, v=carry.v)
