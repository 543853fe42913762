"""The "blocked" attention kernel: dense softmax one query block at a time, with causal block
skipping that needs no mask-dependent control flow per block. Any backend; differentiated by
JAX (every block is plain dense attention).

Why: on a CPU, XLA runs each op of dense attention over the whole (Q, S) score block, which at
thousands of tokens no longer fits in cache; the score einsum then runs at half the speed of a
GEMM and the softmax passes go to memory. A block of `block` queries keeps its scores
(K, block, G, S) near cache size. And self-attention is causal: query block i needs only the
keys up to its own end, which halves the work, as a fused flash kernel does.

The mask compares positions, and the streams are not in position order (the visual stream
comes first; a system prompt before an image is text at earlier positions). So in
self-attention (`same_tokens`: the queries are the keys, causal by position) the tokens are
first sorted by position, padding last; then the keys a query may see are a prefix of the
sorted keys that ends at the query itself, and query block i reads keys [0, end of block i).
This needs the valid positions of a row to be distinct, as the batch contract has them
(docs/design.md, "Batch contract"): two valid tokens at one position see each other, which no
triangle can hold. The mask is still applied by position inside every block, so the result
equals the "xla" reference.

Layouts inside: q (B,K,Q,G,H), k/v (B,K,S,H) -- heads leading, so that each
block's two einsums are plain batched GEMMs over (B, K); scores (B,K,qblk,G,s_i) float32.
Letters: docs/design.md, "Letters".
"""

from __future__ import annotations

import jax.numpy as jnp

from ee_mllm_jax.models.kernels.dense import MASKED


def _block_bounds(nq: int, blk: int):
  """Static [start, end) of each query block."""
  return [(s, min(s + blk, nq)) for s in range(0, nq, blk)]


def _dense_block(qb, k, v, mask):
  """One query block: qb (B,K,q,G,H), k/v (B,K,s,H), mask (B,q,s) or None -> (B,K,q,G,H).

  The softmax is normalised after the second einsum (q*G*H divisions instead of q*G*s)."""
  scores = jnp.einsum("bkqgh,bksh->bkqgs", qb, k, preferred_element_type=jnp.float32) * qb.shape[-1] ** -0.5
  if mask is not None:
    scores = jnp.where(mask[:, None, :, None, :], scores, MASKED)
  m = jnp.max(scores, axis=-1, keepdims=True)
  p = jnp.exp(scores - m)
  out = jnp.einsum("bkqgs,bksh->bkqgh", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out / jnp.sum(p, axis=-1)[..., None]


def _blocks(q, k, v, q_pos, k_pos, k_valid, blk, causal_prefix: bool):
  """All query blocks; with `causal_prefix`, block i reads only keys [0, end of block i)."""
  outs = []
  for start, end in _block_bounds(q.shape[2], blk):
    s = end if causal_prefix else k.shape[2]
    mask = None if k_valid is None else k_valid[:, None, :s]
    if q_pos is not None:
      causal = k_pos[:, None, :s] <= q_pos[:, start:end, None]
      mask = causal if mask is None else mask & causal
    outs.append(_dense_block(q[:, :, start:end], k[:, :, :s], v[:, :, :s], mask))
  return jnp.concatenate(outs, axis=2)


def attend_blocked(q, k, v, q_pos, k_pos, k_valid, block, same_tokens=False):
  """q (B,Q,N,H), k/v (B,S,K,H) -> (B,Q,N,H), masked as `attend` says."""
  b, nq, n, h = q.shape
  kv = k.shape[2]
  blk = min(block, nq)
  q = q.reshape(b, nq, kv, n // kv, h)
  heads = lambda x: jnp.moveaxis(x, 2, 1)  # (B,Q,K,G,H) -> (B,K,Q,G,H); (B,S,K,H) -> (B,K,S,H)
  if q_pos is None or not same_tokens:  # no causal structure to exploit: every block reads every key
    out = _blocks(heads(q), heads(k), heads(v), q_pos, k_pos, k_valid, blk, causal_prefix=False)
    return jnp.moveaxis(out, 1, 2).reshape(b, nq, n, h)

  # One order for queries and keys: by position, padding last (its position is 0).
  big = jnp.iinfo(jnp.int32).max
  order = jnp.argsort(q_pos.astype(jnp.int32) if k_valid is None else jnp.where(k_valid, q_pos, big), axis=1,
                      stable=True)
  take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)
  pos, valid = take(q_pos), None if k_valid is None else take(k_valid)
  out = _blocks(heads(take(q)), heads(take(k)), heads(take(v)), pos, pos, valid, blk, causal_prefix=True)
  # Back to the queries' own order: sorted query i is row i of out.
  inverse = jnp.argsort(order, axis=1)
  out = jnp.take_along_axis(jnp.moveaxis(out, 1, 2), inverse[:, :, None, None, None], axis=1)
  return out.reshape(b, nq, n, h)
