"""Training-free visual-token reduction in the PyTorch port: FastV in the decoder, VisionZip at the
tower's output, the rules of the JAX model's `ee_mllm_jax/models/reduction.py` (its docstring and
docs/design.md, "Token reduction", hold the definitions; the settings are the mode's fields).

Letters (docs/design.md): B batch (images in the tower), Z tokens of this forward, S keys, V visual
rows, Q queries, P tokens per image, D width, N query heads, H head dim.

FastV runs inside `composite.composite_decoder` (self and composite mode alike): layer K-1 also
scores each visual token (`received_attention`), the visual stream keeps each row's
`Mode.fastv_kept(V)` best in their original order (`fastv_order`), and layers [K, L) compute only
the kept visual rows and the text rows. The cache keeps every prompt slot in sequence order (so
transformers' attention mask and cache length stay as they are); a layer >= K writes zeros at
the dropped slots and the cache carries which slots those are (`mark_cache`), so every later
step of that cache (decode steps of `generate()`) masks them in layers >= K, as the JAX cache's
`late_valid` does. Layers [0, K) keep every visual token for the decode steps too.

VisionZip replaces LLaVA's image features (`visionzip_features`): per image, `d + c` tokens in
place of the tower's P, so a prompt holds d + c image tokens per image (an export records it as
`image_seq_length`).
"""

from __future__ import annotations

import torch

# The attribute of a transformers Cache that a FastV prefill sets: (K, kept (B, S0) bool), every
# prompt slot True but the visual ones dropped at layer K.
CACHE_ATTR = "ee_mllm_fastv"


def mark_cache(cache, layer: int, kept: torch.Tensor) -> None:
  setattr(cache, CACHE_ATTR, (layer, kept))


def is_marked(cache) -> bool:
  """Whether a FastV prefill pruned the prompt of `cache` (its later steps mask the dropped slots)."""
  return getattr(cache, CACHE_ATTR, None) is not None


def late_key_valid(cache, key_valid: torch.Tensor) -> tuple[int, torch.Tensor] | None:
  """(K, key validity (B, S) of layers >= K) for a cache that a FastV prefill marked, else None:
  the dropped slots of its prompt are invalid, every later slot as `key_valid` says."""
  if not is_marked(cache):
    return None
  layer, kept = getattr(cache, CACHE_ATTR)
  grown = torch.ones(key_valid.shape, dtype=torch.bool, device=key_valid.device)
  grown[:, :kept.shape[1]] = kept
  return layer, key_valid & grown


def attention_weights(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor, scaling: float) -> torch.Tensor:
  """Softmax weights (B, Q, S), float32, averaged over the heads, of queries q (B, N, Q, H) over
  keys k (B, K, S, H) (query head n reads kv head n // (N / K)); `allowed` (B, 1, Q, S) bool."""
  groups = q.shape[1] // k.shape[1]
  k = k.float().repeat_interleave(groups, dim=1)
  s = torch.matmul(q.float(), k.transpose(-1, -2)) * scaling
  w = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
  return w.masked_fill(~allowed, 0.0).mean(dim=1)


def received_attention(q, k, allowed, scaling, query_valid, visual_index) -> torch.Tensor:
  """FastV's score of each visual row (B, V): the attention it receives from the valid queries
  (query_valid (B, Q)), averaged over the heads, summed over the queries; keys are in sequence
  order and visual_index (B, V) holds each visual row's index (past the keys: a scratch slot)."""
  w = attention_weights(q, k, allowed, scaling).masked_fill(~query_valid[:, :, None], 0.0).sum(dim=1)  # (B, S)
  scores = torch.gather(w, 1, visual_index.clamp(max=w.shape[1] - 1))
  return scores.masked_fill(visual_index >= w.shape[1], float("-inf"))


def fastv_order(scores: torch.Tensor, valid: torch.Tensor, kept: int) -> torch.Tensor:
  """(B, V) scores -> (B, V) slot order: the `kept` best valid tokens in their original order, then
  the dropped ones in theirs (an invalid token ranks below every valid one)."""
  v = scores.shape[1]
  ranked = scores.float().masked_fill(~valid, float("-inf"))
  top = torch.topk(ranked, kept, dim=1).indices
  keep = torch.zeros_like(valid).scatter_(1, top, True)
  slots = torch.arange(v, device=scores.device)[None]
  return torch.argsort(torch.where(keep, 0, v) + slots, dim=1)


def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
  """Rows of x (B, V, ...) at index (B, V'): x[b, index[b]]."""
  index = index.view(index.shape + (1,) * (x.dim() - 2))
  return torch.gather(x, 1, index.expand(index.shape[:2] + x.shape[2:]))


def visionzip_merge(feats, scores, keys, dominant: int, contextual: int) -> torch.Tensor:
  """VisionZip per image: feats (B, P, D), scores (B, P), keys (B, P, H) -> (B, d + c, D): the
  `dominant` best by score in order, then `contextual` centres (every (P - d) // c-th of the
  rest), each the mean of itself and the rest's tokens whose keys are most cosine-similar to it."""
  p = feats.shape[1]
  order = fastv_order(scores, torch.ones(scores.shape, dtype=torch.bool, device=scores.device), dominant)
  out = take(feats, order[:, :dominant])
  if not contextual:
    return out
  rest = p - dominant
  is_centre = torch.zeros(rest, dtype=torch.bool, device=feats.device)
  is_centre[torch.arange(contextual, device=feats.device) * (rest // contextual)] = True
  centres, others = is_centre.nonzero()[:, 0], (~is_centre).nonzero()[:, 0]
  r_feats, r_keys = take(feats, order[:, dominant:]).float(), take(keys, order[:, dominant:]).float()
  unit = r_keys / torch.linalg.vector_norm(r_keys, dim=-1, keepdim=True)
  sim = torch.einsum("bod,bcd->boc", unit[:, others], unit[:, centres])  # (B, P-d-c, c)
  assign = torch.nn.functional.one_hot(sim.argmax(dim=-1), contextual).float()
  total = r_feats[:, centres] + torch.einsum("boc,bod->bcd", assign, r_feats[:, others])
  merged = total / (1.0 + assign.sum(dim=1))[:, :, None]
  return torch.cat([out, merged.to(feats.dtype)], dim=1)


def visionzip_features(llava, pixel_values: torch.Tensor, mode, feature_layer: int, strategy: str) -> torch.Tensor:
  """VisionZip's projected image features (images, d + c, D) of a `LlavaModel` (CLIP or SigLIP
  tower). The scores and keys are those of the tower layer whose output is the selected feature
  layer: attention from its CLS query (CLIP) or mean attention received over its queries
  (SigLIP), averaged over the heads; its keys averaged over the heads. The merged features are
  that layer's output, CLS dropped."""
  tower = llava.vision_tower
  body = getattr(tower, "vision_model", tower)  # transformers before 5 nests the tower's modules one level down
  encoder_layers = body.encoder.layers
  class_token = hasattr(body.embeddings, "class_embedding")
  if not isinstance(feature_layer, int):
    raise NotImplementedError(f"VisionZip reads one vision feature layer, not {feature_layer}")
  if strategy != ("default" if class_token else "full"):
    raise NotImplementedError(f"VisionZip runs with the patch features only: vision_feature_select_strategy "
                              f"{'default' if class_token else 'full'!r} for this tower, not {strategy!r}")
  index = feature_layer % (len(encoder_layers) + 1)  # hidden_states[index] is the output of layer index - 1
  if index == 0:
    raise ValueError("VisionZip needs a tower layer's attention: the feature layer is the embeddings")
  hidden = tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
  layer = encoder_layers[index - 1]
  h = layer.layer_norm1(hidden[index - 1])
  b, tokens, _ = h.shape
  attn = layer.self_attn
  q = attn.q_proj(h).view(b, tokens, attn.num_heads, attn.head_dim).transpose(1, 2)
  k = attn.k_proj(h).view(b, tokens, attn.num_heads, attn.head_dim).transpose(1, 2)  # (B, N, P', H)
  allowed = torch.ones((b, 1, tokens, tokens), dtype=torch.bool, device=h.device)
  w = attention_weights(q, k, allowed, attn.head_dim ** -0.5)  # (B, P', P')
  first = 1 if class_token else 0
  scores = (w[:, 0] if class_token else w.mean(dim=1))[:, first:]
  keys = k.mean(dim=1)[:, first:]
  merged = visionzip_merge(hidden[index][:, first:], scores, keys, mode.visionzip_dominant, mode.visionzip_contextual)
  return llava.multi_modal_projector(merged)
