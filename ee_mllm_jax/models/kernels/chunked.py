"""The "chunked" attention kernel: online softmax over key blocks, with its own (flash-attention)
backward pass, so that no (Q, S) score block is ever held. Any backend.
Letters: docs/design.md, "Letters".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ee_mllm_jax.models.kernels.dense import MASKED

# --- chunked: online softmax over key blocks -------------------------------------------------
#
# Layouts inside: q (B,Q,K,G,H); queries run in blocks of up to `blk` rows, and for each, keys
# in blocks of `blk`: scores of one (query block, key block) pair (B,K,G,qblk,blk) float32,
# running max m and sum l (B,K,G,qblk) float32, accumulator (B,qblk,K,G,H) float32. A pair in
# which the mask allows nothing (causal-by-position: keys after every query of the block) is
# skipped with `lax.cond`, which halves self-mode attention when positions are in order. Which
# pairs to skip is decided for all pairs at once before the loops (`_pairs_allowed`): one
# reduction over the batch, where `jnp.any(mask)` in the loop would be one per pair -- under a
# batch-sharded mask, one all-reduce across devices per block pair.
#
# Blocks are read with dynamic slices in place (no padded or transposed copy of k/v, which at
# decode time is the whole cache): when a length is not a multiple of the block, the last block
# is shifted back to end at that length. Its keys already seen by the previous block are masked
# out; its queries already computed by the previous block are computed again (same values) and
# dropped when the blocks are put back together (and masked in the backward pass, so that they
# add nothing to dk/dv twice).


def _shifted(i, blk, n):
  """First index of block i of `blk` over a length n, and which of its entries are new."""
  start = jnp.minimum(i * blk, n - blk)
  return start, start + jnp.arange(blk) >= i * blk


def _unblock(blocks, n, axis):
  """(nb, ..., blk at `axis`, ...) blocks from `_shifted` -> the length-n array (entries that
  the shifted last block shares with the previous one are taken from the previous one)."""
  nb, blk = blocks.shape[0], blocks.shape[axis + 1]
  head = jnp.moveaxis(blocks[:-1], 0, axis)  # (..., nb - 1, blk, ...)
  head = head.reshape(head.shape[:axis] + ((nb - 1) * blk,) + head.shape[axis + 2:])
  tail = jax.lax.slice_in_dim(blocks[-1], nb * blk - n, blk, axis=axis)
  return jnp.concatenate([head, tail], axis=axis)


def _block_mask(qi, qblk, ki, kblk, nq, s, q_pos, k_pos, k_valid):
  """Mask (B,1,1,qblk,kblk) of query block qi x key block ki, their starts, and whether the
  block's queries are new (qblk,)."""
  qs, q_new = _shifted(qi, qblk, nq)
  ks, k_new = _shifted(ki, kblk, s)
  mask = k_new[None, None, :]
  if k_valid is not None:
    mask = mask & jax.lax.dynamic_slice_in_dim(k_valid, ks, kblk, axis=1)[:, None, :]
  if q_pos is not None:
    kp = jax.lax.dynamic_slice_in_dim(k_pos, ks, kblk, axis=1)
    qp = jax.lax.dynamic_slice_in_dim(q_pos, qs, qblk, axis=1)
    mask = mask & (kp[:, None, :] <= qp[:, :, None])
  return mask[:, None, None], qs, ks, q_new


def _pairs_allowed(q_pos, k_pos, k_valid, nq, s, qblk, nqb, kblk, nkb, new_queries_only=False):
  """(nqb, nkb) bool: whether the mask of `_block_mask(qi, .., ki, ..)` allows anything, i.e.
  some row has a new valid key of block ki at or before the last query position of block qi
  (of its new queries only, for the backward pass). Equals `jnp.any` of each block's mask."""
  q_idx, q_new = jax.vmap(lambda i: _shifted(i, qblk, nq))(jnp.arange(nqb))  # (nqb,), (nqb, qblk)
  k_idx, k_new = jax.vmap(lambda i: _shifted(i, kblk, s))(jnp.arange(nkb))
  q_idx, k_idx = q_idx[:, None] + jnp.arange(qblk), k_idx[:, None] + jnp.arange(kblk)  # (nqb, qblk), (nkb, kblk)
  k_ok = k_new[None] if k_valid is None else k_new[None] & jnp.take(k_valid, k_idx, axis=1)  # (B or 1, nkb, kblk)
  q_ok = q_new if new_queries_only else jnp.ones_like(q_new)  # (nqb, qblk)
  if q_pos is None:  # no causal mask: any allowed key will do
    pairs = jnp.any(q_ok, axis=1)[None, :, None] & jnp.any(k_ok, axis=2)[:, None, :]
  else:
    big = jnp.iinfo(jnp.asarray(k_pos).dtype).max
    first_key = jnp.min(jnp.where(k_ok, jnp.take(k_pos, k_idx, axis=1), big), axis=2)  # (B, nkb)
    last_query = jnp.max(jnp.where(q_ok, jnp.take(q_pos, q_idx, axis=1), -big), axis=2)  # (B, nqb)
    pairs = ((first_key[:, None, :] <= last_query[:, :, None]) & jnp.any(k_ok, axis=2)[:, None, :]
             & jnp.any(q_ok, axis=1)[None, :, None])
  return jnp.any(pairs, axis=0)


def _scores(qb, kb):
  return jnp.einsum("bqkgh,bskh->bkgqs", qb, kb, preferred_element_type=jnp.float32) * qb.shape[-1] ** -0.5


def _keys(k, layer, start, size):
  """Keys/values [start, start + size) of k (B,S,K,H), or of layer `layer` of a stacked cache
  (L,B,S,K,H), read in place: one dynamic slice, no copy of the layer."""
  if layer is None:
    return jax.lax.dynamic_slice_in_dim(k, start, size, axis=1)
  return jax.lax.dynamic_slice(k, (layer, 0, start, 0, 0), (1, k.shape[1], size) + k.shape[3:])[0]


def _blocks(q, k, blk):
  nq, s = q.shape[1], k.shape[-3]
  qblk, kblk = min(blk, nq), min(blk, s)
  return qblk, -(-nq // qblk), kblk, -(-s // kblk)


def _chunked_fwd_impl(q, k, v, q_pos, k_pos, k_valid, blk, layer=None):
  """-> output (B,Q,K,G,H) in v's dtype and the log-sum-exp (B,K,G,Q) float32 (+inf on fully
  masked rows, so that exp(score - lse) is 0 there in the backward pass). With `layer`, k and v
  are a stacked cache (L,B,S,K,H) and this layer's blocks are read from it in place."""
  b, nq, kv, g, h = q.shape
  s = k.shape[-3]
  qblk, nqb, kblk, nkb = _blocks(q, k, blk)
  allowed = _pairs_allowed(q_pos, k_pos, k_valid, nq, s, qblk, nqb, kblk, nkb)

  def q_block(_, qi):
    qs, _ = _shifted(qi, qblk, nq)
    qb = jax.lax.dynamic_slice_in_dim(q, qs, qblk, axis=1)

    def k_block(carry, ki):
      mask, _, ks, _ = _block_mask(qi, qblk, ki, kblk, nq, s, q_pos, k_pos, k_valid)

      def update(carry):
        m, l, acc = carry
        scores = jnp.where(mask, _scores(qb, _keys(k, layer, ks, kblk)), MASKED)
        # m only keeps exp() in range; the result does not depend on it.
        m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
        p = jnp.where(mask, jnp.exp(scores - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        vb = _keys(v, layer, ks, kblk)
        pv = jnp.einsum("bkgqs,bskh->bqkgh", p.astype(v.dtype), vb, preferred_element_type=jnp.float32)
        return m_new, l * corr + jnp.sum(p, axis=-1), acc * jnp.moveaxis(corr, 3, 1)[..., None] + pv

      return jax.lax.cond(allowed[qi, ki], update, lambda c: c, carry), None

    init = (jnp.full((b, kv, g, qblk), MASKED, jnp.float32), jnp.zeros((b, kv, g, qblk), jnp.float32),
            jnp.zeros((b, qblk, kv, g, h), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(k_block, init, jnp.arange(nkb))
    seen = l > 0
    out = acc / jnp.moveaxis(jnp.where(seen, l, 1.0), 3, 1)[..., None]  # 0 on fully masked rows
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
    return None, (out.astype(v.dtype), lse)

  _, (out, lse) = jax.lax.scan(q_block, None, jnp.arange(nqb))
  return _unblock(out, nq, axis=1), _unblock(lse, nq, axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _chunked(q, k, v, q_pos, k_pos, k_valid, blk):
  return _chunked_fwd_impl(q, k, v, q_pos, k_pos, k_valid, blk)[0]


def _chunked_fwd(q, k, v, q_pos, k_pos, k_valid, blk):
  out, lse = _chunked_fwd_impl(q, k, v, q_pos, k_pos, k_valid, blk)
  # Residuals: inputs, output and one float per (query, head) -- nothing of size (Q, S).
  return out, (q, k, v, q_pos, k_pos, k_valid, out, lse)


def _chunked_bwd(blk, res, d_out):
  """The flash-attention backward: probabilities recomputed block by block from the saved
  log-sum-exp; dq per query block, dk/dv summed over query blocks."""
  q, k, v, q_pos, k_pos, k_valid, out, lse = res
  nq, s = q.shape[1], k.shape[1]
  qblk, nqb, kblk, nkb = _blocks(q, k, blk)
  allowed = _pairs_allowed(q_pos, k_pos, k_valid, nq, s, qblk, nqb, kblk, nkb, new_queries_only=True)
  d_out = d_out.astype(jnp.float32)
  delta = jnp.moveaxis(jnp.sum(d_out * out.astype(jnp.float32), axis=-1), 1, 3)  # (B,K,G,Q)
  scale = q.shape[-1] ** -0.5

  def q_block(dkv, qi):
    qs, _ = _shifted(qi, qblk, nq)
    qb, dob = (jax.lax.dynamic_slice_in_dim(x, qs, qblk, axis=1) for x in (q, d_out))
    lse_b, delta_b = (jax.lax.dynamic_slice_in_dim(x, qs, qblk, axis=3) for x in (lse, delta))

    def k_block(dq, ki):
      mask, _, ks, q_new = _block_mask(qi, qblk, ki, kblk, nq, s, q_pos, k_pos, k_valid)
      mask = mask & q_new[:, None]  # queries of the previous block count once
      zeros = jnp.zeros((k.shape[0], kblk) + k.shape[2:], jnp.float32)

      def update(dq):
        kb, vb = (jax.lax.dynamic_slice_in_dim(x, ks, kblk, axis=1) for x in (k, v))
        p = jnp.where(mask, jnp.exp(_scores(qb, kb) - lse_b[..., None]), 0.0)  # (B,K,G,qblk,kblk)
        dv = jnp.einsum("bkgqs,bqkgh->bskh", p, dob)
        dp = jnp.einsum("bqkgh,bskh->bkgqs", dob, vb, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_b[..., None]) * scale
        dq = dq + jnp.einsum("bkgqs,bskh->bqkgh", ds, kb, preferred_element_type=jnp.float32)
        return dq, (jnp.einsum("bkgqs,bqkgh->bskh", ds, qb, preferred_element_type=jnp.float32), dv)

      return jax.lax.cond(allowed[qi, ki], update, lambda dq: (dq, (zeros, zeros)), dq)

    dq, (dk_b, dv_b) = jax.lax.scan(k_block, jnp.zeros(qb.shape, jnp.float32), jnp.arange(nkb))
    # A shifted last key block overlaps the previous one only on keys it masked (zero gradient).
    dk, dv = dkv
    return (dk + _unblock(dk_b, s, axis=1), dv + _unblock(dv_b, s, axis=1)), dq

  zeros = jnp.zeros(k.shape, jnp.float32)
  (dk, dv), dq = jax.lax.scan(q_block, (zeros, zeros), jnp.arange(nqb))
  dq = _unblock(dq, nq, axis=1)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def attend_chunked(q, k, v, q_pos, k_pos, k_valid, block, layer=None):
  b, nq, n, h = q.shape
  kv = k.shape[-2]
  blk = min(block, k.shape[-3])
  q = q.reshape(b, nq, kv, n // kv, h)
  if layer is None:
    out = _chunked(q, k, v, q_pos, k_pos, k_valid, blk)
  else:  # reading a stacked cache (extend / decode): forward only, nothing to differentiate
    out = _chunked_fwd_impl(q, k, v, q_pos, k_pos, k_valid, blk, layer)[0]
  return out.reshape(b, nq, n, h)
