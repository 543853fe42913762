"""Composite attention over a transformers LLaMA / Qwen2 decoder: text queries only, aligner for visual tokens.

Letters (docs/design.md): B batch, Z tokens of this forward (interleaved, as HF lays them out), S keys (cached + Z),
T text rows, V visual rows (per-row maxima), D width, N query heads, K kv heads, H head dim.

The decoder keeps two streams, x_t (B, T, D) and x_v (B, V, D), gathered once from the interleaved
sequence (`split_rows`); every layer of `lm` (a `LlamaModel` / `Qwen2Model`) runs, with its own modules:

    h_t, h_v = input_layernorm(x_t), input_layernorm(x_v)
    h   = [h_v; h_t] in sequence order (B, Z, D)           keys and values of every token
    k   = rope(k_proj(h)), v = v_proj(h)                   written to the cache, in sequence order
    q   = rope(q_proj(h_t))                                text rows only: no visual query
    x_t += o_proj(attend(q, k, v))                         causal by sequence index, padding masked
    x_v += o_proj(repeat_kv(v[visual]))                    aligner: a query that sees only itself
    x_t += mlp(post_attention_layernorm(x_t))              and, if visual_ffn, the same on x_v

So the score matrix is (T, S), never (V, S), and with `visual_ffn=False` the FFN never sees a
visual row. Images may sit anywhere in the sequence and rows may hold different numbers of visual
tokens: a stream slot past its row's own count points at a scratch row Z that is dropped.

A layer schedule (`composite_from_layer=n`) runs layers [0, n) as ordinary self-attention layers in
the same loop: the queries are every row, q = rope(q_proj(h)), the mask causal over all Z, and the
output updates both streams (no aligner); the FFN runs on visual rows too. Keys/values and the
cache are written alike in both kinds of layer. Self mode is the schedule with every layer self.

FastV (`torch/reduction.py`): layer K-1 also scores the visual rows; from layer K the layers
compute the rows [kept visual; text] only (`_Compact`, a smaller V'), their keys are the only
keys of the prefill's attention, and the cache receives them at their sequence slots (zeros at
the dropped ones, which the cache marks invalid for layers >= K in every later step).
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward, rotate_half

from ee_mllm_jax.mode import Composite, Mode
from ee_mllm_jax.torch import reduction

SUPPORTED_DECODERS = ("llama", "qwen2")


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
  """x (B, heads, rows, H) rotated by cos/sin (B, rows, H): transformers' RoPE, for q and k apart
  (they are rotated at different rows here)."""
  cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
  return x * cos + rotate_half(x) * sin


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
  """x (B, Z, ...) at rows index (B, T or V); the scratch row Z reads row Z - 1 (its result is dropped)."""
  index = index.clamp(max=x.shape[1] - 1).view(index.shape + (1,) * (x.dim() - 2))
  return torch.gather(x, 1, index.expand(index.shape[:2] + x.shape[2:]))


def _interleave(length: int, *streams: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
  """(index (B, T or V), rows (B, T or V, D)) pairs -> (B, length, D) with each row at its index (scratch
  dropped; a row no stream fills, a visual token FastV dropped, is zero)."""
  first = streams[0][1]
  out = first.new_zeros((first.shape[0], length + 1) + first.shape[2:])
  for index, rows in streams:
    out.scatter_(1, index.view(index.shape + (1,) * (rows.dim() - 2)).expand(rows.shape), rows)
  return out[:, :length]


def _expand_kv_heads(v: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
  """(B, V, K*H) values -> (B, V, N*H): query head n reads kv head n // groups (transformers' repeat_kv)."""
  if groups == 1:
    return v
  b, r, width = v.shape
  return v.view(b, r, width // head_dim, 1, head_dim).expand(b, r, -1, groups, head_dim).reshape(b, r, width * groups)


def split_rows(is_visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
  """is_visual (B, Z) -> text_index (B, T), visual_index (B, V): each row's text / visual tokens in
  sequence order; slots past a row's own count hold Z (the scratch row)."""
  length = is_visual.shape[1]
  n_visual = is_visual.sum(1)
  t, v = length - int(n_visual.min()), int(n_visual.max())
  slots = torch.arange(length, device=is_visual.device)
  text_first = torch.argsort(is_visual.to(torch.int8), dim=1, stable=True)[:, :t]
  visual_first = torch.argsort((~is_visual).to(torch.int8), dim=1, stable=True)[:, :v]
  return (torch.where(slots[:t] < (length - n_visual)[:, None], text_first, length),
          torch.where(slots[:v] < n_visual[:, None], visual_first, length))


def _allowed(query_index: torch.Tensor, key_valid: torch.Tensor, key_index: torch.Tensor | None = None) -> torch.Tensor:
  """(B, 1, Q, S) bool: queries (text rows, or every row in a self-attention layer) at sequence
  indices query_index (B, Q) over S keys at key_index (B, S) (default: keys 0..S-1 in sequence
  order), causal by index, invalid keys out. A query always sees itself, so that no row is empty
  (a padded query's output is discarded, as in transformers, but must not be NaN)."""
  keys = torch.arange(key_valid.shape[1], device=key_valid.device)[None] if key_index is None else key_index
  q, keys = query_index[:, :, None], keys[:, None, :]
  return ((keys <= q) & (key_valid[:, None, :] | (keys == q)))[:, None]


def _as_mask(allowed: torch.Tensor, impl: str, dtype) -> torch.Tensor:
  """The `allowed` mask as the attention implementation takes it: boolean (sdpa), additive (eager)."""
  if impl == "sdpa":
    return allowed
  return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _attention_fn(impl: str) -> Callable:
  if impl == "eager":
    return eager_attention_forward
  if impl == "sdpa":
    return ALL_ATTENTION_FUNCTIONS["sdpa"]
  raise NotImplementedError(f"composite attention runs with attn_implementation 'eager' or 'sdpa', not {impl!r} "
                            "(its text-query mask is not a plain causal mask)")


def composite_decoder(lm, inputs_embeds: torch.Tensor, is_visual: torch.Tensor, *,
                      attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                      cache: Cache | None = None, use_cache: bool | None = None,
                      mode: Mode = Composite()) -> BaseModelOutputWithPast:
  """`lm.forward` (a LlamaModel / Qwen2Model) in `mode`: inputs_embeds (B, Z, D), is_visual (B, Z),
  attention_mask (B, S) 1 = real token (S = cached + Z), position_ids (B, Z) (default: the sequence
  index). `mode` (an `ee_mllm_jax.mode.Mode`, self or composite) gives the layer schedule (layers
  before a composite mode's `from_layer` run self attention), which layers run the visual FFN and
  FastV (`torch/reduction.py`; a forward over an empty cache whose input holds visual tokens
  prunes them after layer K-1). Writes every token's keys/values (visual included; zeros at the
  slots FastV dropped, which the cache marks) to `cache` and returns the final-norm hidden states
  (B, Z, D); visual rows hold their aligner-updated states (zeros where FastV dropped them)."""
  cfg = lm.config
  mode.validate(cfg.num_hidden_layers)
  kinds = [kind for kind, count in mode.schedule(cfg.num_hidden_layers) for _ in range(count)]
  if cfg.model_type not in SUPPORTED_DECODERS:
    raise NotImplementedError(f"composite attention supports {SUPPORTED_DECODERS} decoders, not {cfg.model_type!r}")
  if getattr(cfg, "use_sliding_window", False):
    raise NotImplementedError("composite attention with a sliding window is not supported")
  b, length, _ = inputs_embeds.shape
  if use_cache is None:
    use_cache = cfg.use_cache
  if use_cache and cache is None:
    cache = DynamicCache(config=cfg)
  past = cache.get_seq_length() if cache is not None else 0
  device = inputs_embeds.device
  if position_ids is None:
    position_ids = (torch.arange(length, device=device) + past)[None].expand(b, length)
  if attention_mask is None:
    key_valid = torch.ones((b, past + length), dtype=torch.bool, device=device)
  elif attention_mask.dim() == 2 and attention_mask.shape[1] == past + length:
    key_valid = attention_mask.bool()
  else:
    raise ValueError(f"composite attention takes a 2D attention_mask (B, {past + length}), got {tuple(attention_mask.shape)}")

  text_index, visual_index = split_rows(is_visual)
  prune = mode.fastv_layer if mode.fastv and visual_index.shape[1] else 0  # FastV: drop visual rows before it
  if prune and past:
    raise NotImplementedError("FastV prunes the visual tokens of a forward over an empty cache (a prompt with its "
                              "images), not of images after cached tokens")
  late = None if prune else reduction.late_key_valid(cache, key_valid)  # (K, validity) of a FastV-pruned cache
  impl = cfg._attn_implementation or "eager"
  attend = _attention_fn(impl)
  text_at, every_at = text_index.clamp(max=length - 1) + past, torch.arange(length, device=device)[None] + past
  key_valids = {False: key_valid} | ({True: late[1]} if late else {})  # {layer >= a pruned cache's K: validity}
  allowed = {(kind, is_late): _allowed(text_at if kind == "composite" else every_at.expand(b, length), valid)
             for kind in set(kinds) for is_late, valid in key_valids.items()}  # of the queries of each layer kind
  masks = {key: _as_mask(a, impl, inputs_embeds.dtype) for key, a in allowed.items()}

  cos, sin = lm.rotary_emb(inputs_embeds, position_ids=position_ids.expand(b, length))  # (B, Z, H)
  cos_t, sin_t = _gather(cos, text_index), _gather(sin, text_index)
  x_t, x_v = _gather(inputs_embeds, text_index), _gather(inputs_embeds, visual_index)
  kept = None  # FastV, from layer `prune`: the compact rows [kept visual; text] (`_Compact`)
  for i, layer in enumerate(lm.layers[:cfg.num_hidden_layers]):
    visual_queries = kinds[i] == "self"  # a self-attention layer of the schedule
    attn = layer.self_attn
    h_t, h_v = layer.input_layernorm(x_t), layer.input_layernorm(x_v)
    if kept is None:  # every row, interleaved in sequence order (B, Z, D)
      h, rows_cos, rows_sin = _interleave(length, (text_index, h_t), (visual_index, h_v)), cos, sin
    else:
      h, rows_cos, rows_sin = torch.cat([h_v, h_t], 1), kept.cos, kept.sin
    k_rows = attn.k_proj(h).view(b, h.shape[1], -1, attn.head_dim)  # (B, rows, K, H)
    v_rows = attn.v_proj(h)  # (B, rows, K*H)
    k = _rope(k_rows.transpose(1, 2), rows_cos, rows_sin)  # (B, K, rows, H)
    v = v_rows.view(b, h.shape[1], -1, attn.head_dim).transpose(1, 2)
    h_q, cos_q, sin_q = (h, rows_cos, rows_sin) if visual_queries else (h_t, cos_t, sin_t)
    rows = h_q.shape[1]
    q = _rope(attn.q_proj(h_q).view(b, rows, -1, attn.head_dim).transpose(1, 2), cos_q, sin_q)  # (B, N, rows, H)
    if kept is None:
      if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx)
      key = (kinds[i], late is not None and i >= late[0])
      out, _ = attend(attn, q, k, v, masks[key], dropout=0.0, scaling=attn.scaling)  # (B, rows, N, H)
    else:
      if cache is not None:  # the cache keeps every slot in sequence order: zeros where dropped
        cache.update(*(_interleave(length, (kept.index, a.transpose(1, 2))).transpose(1, 2) for a in (k, v)),
                     attn.layer_idx)
      out, _ = attend(attn, q, k, v, kept.masks[kinds[i]], dropout=0.0, scaling=attn.scaling)
    out = attn.o_proj(out.reshape(b, rows, -1))
    if visual_queries:
      a_t, a_v = (_gather(out, text_index), _gather(out, visual_index)) if kept is None else (
          out[:, x_v.shape[1]:], out[:, :x_v.shape[1]])
      x_t, x_v = x_t + a_t, x_v + a_v
    else:
      x_t = x_t + out
      # Aligner: softmax over the single key a visual query may see is 1, so its output is its own value.
      v_vis = _gather(v_rows, visual_index) if kept is None else v_rows[:, :x_v.shape[1]]
      x_v = x_v + attn.o_proj(_expand_kv_heads(v_vis, attn.num_key_value_groups, attn.head_dim))
    x_t = x_t + layer.mlp(layer.post_attention_layernorm(x_t))
    if mode.visual_ffn_in(kinds[i]):
      x_v = x_v + layer.mlp(layer.post_attention_layernorm(x_v))
    if i == prune - 1:  # FastV: rank by this layer's attention, keep the best visual rows from here on
      query_valid = (key_valid[:, past:] if visual_queries else
                     (text_index < length) & _gather(key_valid[:, past:, None], text_index)[..., 0])
      scores = reduction.received_attention(q, k, allowed[(kinds[i], False)], attn.scaling, query_valid,
                                            visual_index)
      order = reduction.fastv_order(scores, visual_index < length, mode.fastv_kept(visual_index.shape[1]))
      kept = _Compact(visual_index, order[:, :mode.fastv_kept(visual_index.shape[1])], text_index, key_valid, cos,
                      sin, impl, inputs_embeds.dtype)
      x_v = reduction.take(x_v, kept.order)
      if cache is not None:
        reduction.mark_cache(cache, prune, kept.prompt_slots(is_visual))
  hidden = lm.norm(_interleave(length, (text_index, x_t), (visual_index if kept is None else kept.visual, x_v)))
  return BaseModelOutputWithPast(last_hidden_state=hidden, cache=cache if use_cache else None)


class _Compact:
  """FastV's rows from layer K: [kept visual; text] (B, V' + T) and what a layer reads of them:
  each row's sequence index (`index`, the scratch Z for an empty slot), RoPE angles, and the
  masks of text queries / every row's queries over these rows' keys alone (this forward runs
  over an empty cache, so its own rows are every key)."""

  def __init__(self, visual_index, order, text_index, key_valid, cos, sin, impl, dtype):
    length = key_valid.shape[1]
    self.order = order  # (B, V'): the kept rows' slots in the visual stream
    self.visual = reduction.take(visual_index, order)  # (B, V') their sequence indices
    self.index = torch.cat([self.visual, text_index], 1)
    self.cos, self.sin = _gather(cos, self.index), _gather(sin, self.index)
    valid = (self.index < length) & _gather(key_valid[:, :, None], self.index)[..., 0]
    self.masks = {"self": _as_mask(_allowed(self.index, valid, self.index), impl, dtype),
                  "composite": _as_mask(_allowed(text_index, valid, self.index), impl, dtype)}

  def prompt_slots(self, is_visual):
    """(B, Z) bool: the slots layers >= K keep, every text slot and the kept visual ones."""
    kept = torch.cat([~is_visual, torch.zeros_like(is_visual[:, :1])], 1)
    return kept.scatter(1, self.visual, True)[:, :is_visual.shape[1]]
