"""Composite attention over a transformers LLaMA / Qwen2 decoder: text queries only, aligner for visual tokens.

Letters: B batch, L tokens of this forward (interleaved, as HF lays them out), S keys (cached + L),
T text rows, V visual rows (per-row maxima), D width, N query heads, K kv heads, H head dim.

Every decoder layer of `lm` (a `LlamaModel` / `Qwen2Model`) runs, with its own modules:

    h   = input_layernorm(x)                               all L rows (keys and values need them)
    k   = rope(k_proj(h)), v = v_proj(h)                   all L rows, written to the cache
    q   = rope(q_proj(h[text]))                            text rows only: no visual query
    x[text]   += o_proj(attend(q, k, v))                   causal by sequence index, padding masked
    x[visual] += o_proj(repeat_kv(v[visual]))              aligner: a query that sees only itself
    x[text]   += mlp(post_attention_layernorm(x[text]))    and, if visual_ffn, on the visual rows too

So the score matrix is (T, S), never (V, S), and with `visual_ffn=False` the FFN never sees a
visual row. Rows are gathered per batch row (`text_index`, `visual_index`), so images may sit
anywhere in the sequence and rows may hold different numbers of visual tokens; slots past a row's
own count are computed but add nothing (`scatter_add` of zeros).
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward, repeat_kv, rotate_half

SUPPORTED_DECODERS = ("llama", "qwen2")


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
  """x (B, heads, rows, H) rotated by cos/sin (B, rows, H): transformers' RoPE, for q and k apart
  (they are rotated at different rows here)."""
  cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
  return x * cos + rotate_half(x) * sin


def _rows(x: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
  """x gathered at index (B, R) along `dim` (the batch dimension is 0)."""
  shape = list(x.shape)
  shape[dim] = index.shape[1]
  view = [index.shape[0]] + [1] * (x.dim() - 1)
  view[dim] = index.shape[1]
  return torch.gather(x, dim, index.view(view).expand(shape))


def _add_rows(x: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
  """x (B, L, D) plus update (B, R, D) at rows index (B, R) where valid (B, R)."""
  update = update.masked_fill(~valid[..., None], 0)
  return x.scatter_add(1, index[..., None].expand(update.shape), update)


def split_rows(is_visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
  """is_visual (B, L) -> text_index (B, T), text_valid (B, T), visual_index (B, V), visual_valid (B, V),
  each row's tokens in sequence order."""
  n_visual = is_visual.sum(1)
  length = is_visual.shape[1]
  t, v = length - int(n_visual.min()), int(n_visual.max())
  text_first = torch.argsort(is_visual.to(torch.int8), dim=1, stable=True)
  visual_first = torch.argsort((~is_visual).to(torch.int8), dim=1, stable=True)
  rows = torch.arange(length, device=is_visual.device)
  return (text_first[:, :t], rows[:t] < (length - n_visual)[:, None],
          visual_first[:, :v], rows[:v] < n_visual[:, None])


def _attention_mask(query_index: torch.Tensor, key_valid: torch.Tensor, impl: str, dtype) -> torch.Tensor:
  """(B, 1, T, S) mask of text queries at sequence indices query_index (B, T) over S keys: causal by
  index, padded keys out. A query always sees itself, so that no row is empty (a padded query's
  output is discarded, as in transformers, but must not be NaN)."""
  keys = torch.arange(key_valid.shape[1], device=key_valid.device)
  q = query_index[:, :, None]
  allowed = (keys <= q) & (key_valid[:, None, :] | (keys == q))
  allowed = allowed[:, None]
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
                      visual_ffn: bool = False) -> BaseModelOutputWithPast:
  """`lm.forward` (a LlamaModel / Qwen2Model) in composite mode: inputs_embeds (B, L, D), is_visual (B, L),
  attention_mask (B, S) 1 = real token (S = cached + L), position_ids (B, L) (default: the sequence
  index). Writes every token's keys/values (visual included) to `cache` and returns the final-norm
  hidden states (B, L, D); visual rows hold their aligner-updated states."""
  cfg = lm.config
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

  text_index, text_valid, visual_index, visual_valid = split_rows(is_visual)
  impl = cfg._attn_implementation or "eager"
  attend = _attention_fn(impl)
  mask = _attention_mask(text_index + past, key_valid, impl, inputs_embeds.dtype)

  x = inputs_embeds
  cos, sin = lm.rotary_emb(x, position_ids=position_ids.expand(b, length))  # (B, L, H)
  cos_t, sin_t = _rows(cos, text_index), _rows(sin, text_index)
  for layer in lm.layers[:cfg.num_hidden_layers]:
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    k = _rope(attn.k_proj(h).view(b, length, -1, attn.head_dim).transpose(1, 2), cos, sin)  # (B, K, L, H)
    v = attn.v_proj(h).view(b, length, -1, attn.head_dim).transpose(1, 2)  # (B, K, L, H)
    q = attn.q_proj(_rows(h, text_index)).view(b, text_index.shape[1], -1, attn.head_dim).transpose(1, 2)
    q = _rope(q, cos_t, sin_t)  # (B, N, T, H)
    v_visual = _rows(v, visual_index, dim=2)  # before the cache: this forward's own values
    if cache is not None:
      k, v = cache.update(k, v, attn.layer_idx)
    out_t, _ = attend(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling)  # (B, T, N, H)
    out_t = attn.o_proj(out_t.reshape(b, text_index.shape[1], -1))
    # Aligner: softmax over the single key a visual query may see is 1, so its output is its own value.
    out_v = repeat_kv(v_visual, attn.num_key_value_groups).transpose(1, 2).reshape(b, visual_index.shape[1], -1)
    x = _add_rows(_add_rows(x, text_index, text_valid, out_t), visual_index, visual_valid, attn.o_proj(out_v))
    if visual_ffn:
      x = x + layer.mlp(layer.post_attention_layernorm(x))
    else:
      x = _add_rows(x, text_index, text_valid, layer.mlp(layer.post_attention_layernorm(_rows(x, text_index))))
  return BaseModelOutputWithPast(last_hidden_state=lm.norm(x), cache=cache if use_cache else None)
