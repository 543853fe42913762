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

import functools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp

from ee_mllm_jax.config import ATTENTION_IMPLS, AttentionImpl, LLMConfig
from ee_mllm_jax.mode import LayerKind
from ee_mllm_jax.models.layers import Linear, rope

logger = logging.getLogger(__name__)
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
# Above this many keys, "auto" (without cuDNN) prefers the chunked implementation: the dense
# (Q, S) float32 score block starts to dominate memory and falls out of cache.
AUTO_CHUNKED_MIN_KEYS = 2048


def attention_mask(q_pos: jax.Array | None, k_pos: jax.Array | None, k_valid: jax.Array | None) -> jax.Array | None:
  """(B, Q) query positions, (B, S) key positions/validity -> (B, Q, S), True = attend.

  `q_pos=None` means no causal mask (every query sees every key), `k_valid=None` all keys
  valid; None when nothing is masked at all (the vision tower)."""
  mask = None if k_valid is None else k_valid[:, None, :]
  if q_pos is not None:
    causal = k_pos[:, None, :] <= q_pos[:, :, None]
    mask = causal if mask is None else mask & causal
  return mask


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array | None = None,
           k_pos: jax.Array | None = None, k_valid: jax.Array | None = None, *, impl: AttentionImpl = "xla",
           block: int = 512, layer: jax.Array | None = None) -> jax.Array:
  """Softmax attention with GQA, masked by position: query i sees key j when
  `k_valid[j] and k_pos[j] <= q_pos[i]` (see `attention_mask` for the None cases).

  q (B,Q,N,H), k/v (B,S,K,H), positions/validity (B,Q) / (B,S) -> (B,Q,N,H). The mask is passed
  as positions, not as a dense (Q, S) array, so that an implementation may build it one block at
  a time. A fully masked row (a padding query) yields a finite value (zeros, or the mean of v
  for "xla"/"cudnn"); callers ignore such rows.

  impl: "xla" (dense einsum, the reference), "chunked" (online softmax over key blocks of
  `block`, any backend), "cudnn" (fused GPU kernel), "auto" (the best that runs here).
  layer: k and v are a stacked cache (L,B,S,K,H) and this layer's are used; "chunked" reads
  its blocks in place, so a decode step copies nothing proportional to the cache.
  """
  if impl == "auto":
    impl = choose_impl(q, k, v)
  if impl == "chunked":
    return _attend_chunked(q, k, v, q_pos, k_pos, k_valid, block, layer)
  if layer is not None:  # the dense implementations take this layer's keys/values as arrays
    k, v = (jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False) for x in (k, v))
  if impl == "xla":
    return _attend_xla(q, k, v, attention_mask(q_pos, k_pos, k_valid))
  if impl == "cudnn":
    return _attend_cudnn(q, k, v, attention_mask(q_pos, k_pos, k_valid))
  raise ValueError(f"unknown attention implementation {impl!r}; known: {ATTENTION_IMPLS}")


def _attend_xla(q, k, v, mask):
  b, nq, n, h = q.shape
  kv = k.shape[2]
  q = q.reshape(b, nq, kv, n // kv, h)
  scores = jnp.einsum("bqkgh,bskh->bkgqs", q, k, preferred_element_type=jnp.float32) * h ** -0.5
  if mask is not None:
    scores = jnp.where(mask[:, None, None], scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgqs,bskh->bqkgh", probs, v).reshape(b, nq, n, h)


def _attend_cudnn(q, k, v, mask):
  # (B, 1, Q, S): one mask shared by all heads. cuDNN turns it into a bias; positions need not be
  # sorted, so `is_causal` cannot express it.
  mask = None if mask is None else mask[:, None]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn").astype(v.dtype)


@functools.cache
def _cudnn_works(dtype: str, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
  """Whether cuDNN's fused attention compiles for these head shapes and dtype (it needs a GPU,
  half-precision inputs and a supported head dim): one tiny compile, once per signature."""
  if jax.default_backend() != "gpu":
    return False
  try:
    # Compiled for abstract inputs (nothing runs), so that this also works inside a jit trace.
    q = jax.ShapeDtypeStruct((1, 8, num_heads, head_dim), dtype)
    k = jax.ShapeDtypeStruct((1, 8, num_kv_heads, head_dim), dtype)
    mask = jax.ShapeDtypeStruct((1, 1, 8, 8), bool)
    jax.jit(functools.partial(jax.nn.dot_product_attention, implementation="cudnn")).lower(
        q, k, k, mask=mask).compile()
    return True
  except Exception as e:  # pylint: disable=broad-except  # any failure means: not here
    logger.info("cuDNN attention unavailable for %s heads %d/%d dim %d: %s", dtype, num_heads, num_kv_heads,
                head_dim, str(e).splitlines()[0] if str(e) else type(e).__name__)
    return False


@functools.cache
def _log_choice(impl: str, why: str):
  logger.info("attention_impl='auto' chose %r (%s)", impl, why)


def choose_impl(q, k, v) -> str:
  """What "auto" runs: cuDNN where it works, else "chunked" for long key sequences, else "xla"."""
  del v
  if _cudnn_works(jnp.dtype(q.dtype).name, q.shape[2], k.shape[-2], q.shape[3]):
    impl, why = "cudnn", "GPU backend with cuDNN attention"
  elif k.shape[-3] > AUTO_CHUNKED_MIN_KEYS:
    impl, why = "chunked", f"{jax.default_backend()} backend, {k.shape[-3]} keys > {AUTO_CHUNKED_MIN_KEYS}"
  else:
    impl, why = "xla", f"{jax.default_backend()} backend, {k.shape[-3]} keys <= {AUTO_CHUNKED_MIN_KEYS}"
  _log_choice(impl, why)
  return impl


# --- chunked: online softmax over key blocks -------------------------------------------------
#
# Layouts inside: q (B,Q,K,G,H); queries run in blocks of up to `blk` rows, and for each, keys
# in blocks of `blk`: scores of one (query block, key block) pair (B,K,G,qblk,blk) float32,
# running max m and sum l (B,K,G,qblk) float32, accumulator (B,qblk,K,G,H) float32. A pair in
# which the mask allows nothing (causal-by-position: keys after every query of the block) is
# skipped with `lax.cond`, which halves self-mode attention when positions are in order.
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

  def q_block(_, qi):
    qs, _ = _shifted(qi, qblk, nq)
    qb = jax.lax.dynamic_slice_in_dim(q, qs, qblk, axis=1)

    def k_block(carry, ki):
      mask, _, ks, _ = _block_mask(qi, qblk, ki, kblk, nq, s, q_pos, k_pos, k_valid)

      def update(carry):
        m, l, acc = carry
        scores = jnp.where(mask, _scores(qb, _keys(k, layer, ks, kblk)), _MASKED)
        # m only keeps exp() in range; the result does not depend on it.
        m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
        p = jnp.where(mask, jnp.exp(scores - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        vb = _keys(v, layer, ks, kblk)
        pv = jnp.einsum("bkgqs,bskh->bqkgh", p.astype(v.dtype), vb, preferred_element_type=jnp.float32)
        return m_new, l * corr + jnp.sum(p, axis=-1), acc * jnp.moveaxis(corr, 3, 1)[..., None] + pv

      return jax.lax.cond(jnp.any(mask), update, lambda c: c, carry), None

    init = (jnp.full((b, kv, g, qblk), _MASKED, jnp.float32), jnp.zeros((b, kv, g, qblk), jnp.float32),
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

      return jax.lax.cond(jnp.any(mask), update, lambda dq: (dq, (zeros, zeros)), dq)

    dq, (dk_b, dv_b) = jax.lax.scan(k_block, jnp.zeros(qb.shape, jnp.float32), jnp.arange(nkb))
    # A shifted last key block overlaps the previous one only on keys it masked (zero gradient).
    dk, dv = dkv
    return (dk + _unblock(dk_b, s, axis=1), dv + _unblock(dv_b, s, axis=1)), dq

  zeros = jnp.zeros(k.shape, jnp.float32)
  (dk, dv), dq = jax.lax.scan(q_block, (zeros, zeros), jnp.arange(nqb))
  dq = _unblock(dq, nq, axis=1)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def _attend_chunked(q, k, v, q_pos, k_pos, k_valid, block, layer=None):
  b, nq, n, h = q.shape
  kv = k.shape[-2]
  blk = min(block, k.shape[-3])
  q = q.reshape(b, nq, kv, n // kv, h)
  if layer is None:
    out = _chunked(q, k, v, q_pos, k_pos, k_valid, blk)
  else:  # reading a stacked cache (extend / decode): forward only, nothing to differentiate
    out = _chunked_fwd_impl(q, k, v, q_pos, k_pos, k_valid, blk, layer)[0]
  return out.reshape(b, nq, n, h)


class Attention(nn.Module):
  """One layer's attention (HF names: q_proj, k_proj, v_proj, o_proj)."""

  cfg: LLMConfig
  mode: LayerKind  # visual queries ("self") or the aligner ("composite"), from Mode.schedule
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    c = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
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

  def attend(self, q, k, v, q_pos, k_pos, k_valid, layer=None):
    return attend(q, k, v, q_pos, k_pos, k_valid, impl=self.cfg.attention_impl, block=self.cfg.attention_block,
                  layer=layer)

  def align(self, v_vis):
    """Aligner: the output of a visual query attending only to itself, o_proj(v), (B,V,K,H) -> (B,V,D).

    Query head n reads kv head n // G, so it is o_proj applied to the values repeated over the
    G query heads of each kv head; `repeated_input` sums o_proj's G heads instead, and the
    aligner costs K*H*D per token, not N*H*D.
    """
    return self.o_proj.repeated_input(v_vis, self.cfg.num_heads // self.cfg.num_kv_heads)

  def __call__(self, h_v, h_t, pos_v, pos_t, valid_v, valid_t):
    """Forward phase. Normed streams (B,V,D), (B,T,D) -> attention outputs for both, and this
    layer's (k, v) over [visual; text], each (B, V+T, K, H)."""
    n_vis = h_v.shape[1]
    pos = jnp.concatenate([pos_v, pos_t], axis=1)
    valid = jnp.concatenate([valid_v, valid_t], axis=1)
    h = jnp.concatenate([h_v, h_t], axis=1)
    k, v = self.keys_values(h, pos)
    if self.mode == "self":
      out = self.o_proj(self.attend(self.queries(h, pos), k, v, pos, pos, valid))
      return out[:, :n_vis], out[:, n_vis:], (k, v)
    out_t = self.o_proj(self.attend(self.queries(h_t, pos_t), k, v, pos_t, pos, valid))
    return self.align(v[:, :n_vis]), out_t, (k, v)

  def extend(self, h_t, pos_t, cache_k, cache_v, cache_pos, cache_valid, layer):
    """Extend phase. Text queries against a KV cache that already holds their own keys
    (decode steps, a prompt after a cached prefix); the same in every mode: text tokens attend
    to every earlier key, visual or text. cache_k/v are the stacked (L,B,S,K,H) cache, of which
    layer `layer` is read."""
    q = self.queries(h_t, pos_t)
    return self.o_proj(self.attend(q, cache_k, cache_v, pos_t, cache_pos, cache_valid, layer))
