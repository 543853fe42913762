"""Training-free visual-token reduction: FastV in the decoder, VisionZip at the tower's output
(docs/design.md, "Token reduction"). Settings of `ModelConfig.mode` (`fastv_layer`, `fastv_ratio`,
`visionzip_dominant`, `visionzip_contextual`); no parameters.

Letters: B batch (images in the tower), V visual tokens, T text tokens, Q queries, S keys,
P tokens per image, D width, N/K query/kv heads, G = N / K, H head dim.

FastV (Chen et al., arXiv 2403.06764). Layers [0, K) run on all V visual tokens. Layer K-1 also
scores each visual token by the attention it receives: the softmax weights of that layer's
queries, averaged over the heads and summed over the valid queries (`received_attention`; a
row's sum and mean rank alike). The queries are the layer's own: every valid token in a self
layer, the valid text tokens in a composite layer, where visual tokens are not queries. Each row
keeps its ceil((1 - R) V) best (`Mode.fastv_kept`; invalid visual tokens score -inf, so padding
is never kept over a valid token), in their original order (`fastv_order`), and layers [K, L)
run on the gathered (B, V', D) stream, a static smaller length.

VisionZip (Yang et al., arXiv 2412.04467), per image, on the tower's last computed layer: the
`dominant` patches with the most attention from the CLS query (CLIP), or the most mean attention
received (SigLIP, no CLS), are kept in order; of the rest, `contextual` centres evenly spaced
among them (every (P - d) // c-th) each absorb the remaining tokens most similar to them
(cosine of the layer's keys, averaged over the heads), and become the mean of their features
(`visionzip_merge`). The image becomes d + c tokens, dominant first.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def attention_weights(q, k, q_pos, q_valid, k_pos, k_valid):
  """Softmax weights (B, Q, S) averaged over the N heads, float32, of queries (B, Q, N, H) over
  keys (B, S, K, H), causal by position (no positions: every key); invalid queries' rows are 0."""
  b, nq, n, h = q.shape
  kv = k.shape[2]
  qg = q.astype(jnp.float32).reshape(b, nq, kv, n // kv, h)
  s = jnp.einsum("bqkgh,bskh->bkgqs", qg, k.astype(jnp.float32)) / math.sqrt(h)
  allowed = jnp.ones((b, nq, k.shape[1]), bool) if k_valid is None else k_valid[:, None, :]
  if q_pos is not None:
    allowed = allowed & (k_pos[:, None, :] <= q_pos[:, :, None])
  w = jax.nn.softmax(jnp.where(allowed[:, None, None], s, -jnp.inf), axis=-1)
  w = jnp.where(allowed[:, None, None], w, 0.0).mean(axis=(1, 2))
  return w if q_valid is None else jnp.where(q_valid[:, :, None], w, 0.0)


def received_attention(q, k, q_pos, q_valid, k_pos, k_valid, n_vis: int):
  """FastV's score of each of the first `n_vis` keys (B, V): the attention it receives, summed
  over the valid queries, averaged over the heads."""
  return attention_weights(q, k, q_pos, q_valid, k_pos, k_valid)[:, :, :n_vis].sum(axis=1)


def fastv_order(scores, valid_v, kept: int):
  """(B, V) scores -> (B, V) slot order: the `kept` best valid tokens in their original order,
  then the dropped ones in theirs (invalid tokens rank below every valid one)."""
  v = scores.shape[1]
  ranked = jnp.where(valid_v, scores.astype(jnp.float32), -jnp.inf)
  top = jax.lax.top_k(ranked, kept)[1]
  keep = jax.vmap(lambda t: jnp.zeros((v,), bool).at[t].set(True))(top)
  return jnp.argsort(jnp.where(keep, 0, v) + jnp.arange(v)[None, :], axis=1)


def take_tokens(x, idx):
  """Rows of x (B, V, ...) at idx (B, V'): x[b, idx[b]]."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def visionzip_merge(feats, scores, keys, dominant: int, contextual: int):
  """VisionZip per image: feats (B, P, D), scores (B, P), keys (B, P, H') -> (B, d + c, D)."""
  p = feats.shape[1]
  order = fastv_order(scores, jnp.ones(scores.shape, bool), dominant)
  out = take_tokens(feats, order[:, :dominant])
  if not contextual:
    return out
  rest = p - dominant
  step = rest // contextual
  is_centre = jnp.zeros((rest,), bool).at[jnp.arange(contextual) * step].set(True)
  centres, others = jnp.nonzero(is_centre, size=contextual)[0], jnp.nonzero(~is_centre, size=rest - contextual)[0]
  r_feats, r_keys = take_tokens(feats, order[:, dominant:]), take_tokens(keys, order[:, dominant:])
  unit = r_keys.astype(jnp.float32) / jnp.linalg.norm(r_keys.astype(jnp.float32), axis=-1, keepdims=True)
  sim = jnp.einsum("bod,bcd->boc", unit[:, others], unit[:, centres])  # (B, P-d-c, c)
  assign = jax.nn.one_hot(jnp.argmax(sim, axis=-1), contextual, dtype=jnp.float32)
  total = r_feats[:, centres].astype(jnp.float32) + jnp.einsum("boc,bod->bcd", assign, r_feats[:, others].astype(jnp.float32))
  merged = total / (1.0 + assign.sum(axis=1))[:, :, None]
  return jnp.concatenate([out, merged.astype(feats.dtype)], axis=1)


def segments(mode, depth: int) -> tuple[tuple[str, int, bool], ...]:
  """The forward phase's scans: the layer schedule's runs (`Mode.schedule`) as (kind, count,
  scores) with, under FastV, layer K-1 a run of its own that also scores (`scores` True): the
  visual stream is pruned after it."""
  out, start = [], 0
  cuts = {mode.fastv_layer - 1, mode.fastv_layer} if mode.fastv else set()
  for kind, count in mode.schedule(depth):
    bounds = sorted({start, start + count} | {c for c in cuts if start < c < start + count})
    out += [(kind, b - a, mode.fastv and b == mode.fastv_layer and b - a == 1) for a, b in zip(bounds, bounds[1:])]
    start += count
  return tuple(out)


def fastv_keys_values(early, late, order, kept: int):
  """Every layer's (k, v) in one (L, B, V+T, K, H) stack over the cache's slots: layers [0, K)
  (`early`, S = V + T) with their visual slots in `order` (kept first), layers [K, L) (`late`,
  S = V' + T) with zeros in the dropped slots [V', V), which the cache marks invalid for them."""
  v = order.shape[1]

  def one(e, l):
    vis = jnp.take_along_axis(e[:, :, :v], order[None, :, :, None, None], axis=2)
    gap = jnp.zeros(l.shape[:2] + (v - kept,) + l.shape[3:], l.dtype)
    return jnp.concatenate([jnp.concatenate([vis, e[:, :, v:]], 2), jnp.concatenate([l[:, :, :kept], gap, l[:, :, kept:]], 2)], 0)

  return tuple(one(e, l) for e, l in zip(early, late))
