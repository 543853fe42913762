"""Attention kernels apart from the modules that call them (as MaxText keeps `attention_op` apart
from `attentions`): one entry point, `attend`, masked by positions, and the implementations it
dispatches to -- `dense.py` ("xla", "cudnn") and `chunked.py` ("chunked", with its own backward).
Letters: docs/design.md, "Letters".
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from ee_mllm_jax.config import ATTENTION_IMPLS, AttentionImpl
from ee_mllm_jax.models.kernels.chunked import attend_chunked
from ee_mllm_jax.models.kernels.dense import attend_cudnn, attend_xla, attention_mask, cudnn_works

__all__ = ["AUTO_CHUNKED_MIN_KEYS", "attend", "attention_mask", "choose_impl"]

logger = logging.getLogger(__name__)

# Above this many keys, "auto" (without cuDNN) prefers the chunked implementation: the dense
# (Q, S) float32 score block starts to dominate memory and falls out of cache.
AUTO_CHUNKED_MIN_KEYS = 2048


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
    return attend_chunked(q, k, v, q_pos, k_pos, k_valid, block, layer)
  if layer is not None:  # the dense implementations take this layer's keys/values as arrays
    k, v = (jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False) for x in (k, v))
  if impl == "xla":
    return attend_xla(q, k, v, attention_mask(q_pos, k_pos, k_valid))
  if impl == "cudnn":
    return attend_cudnn(q, k, v, attention_mask(q_pos, k_pos, k_valid))
  raise ValueError(f"unknown attention implementation {impl!r}; known: {ATTENTION_IMPLS}")


@functools.cache
def _log_choice(impl: str, why: str):
  logger.info("attention_impl='auto' chose %r (%s)", impl, why)


def choose_impl(q, k, v) -> str:
  """What "auto" runs: cuDNN where it works, else "chunked" for long key sequences, else "xla"."""
  del v
  if cudnn_works(jnp.dtype(q.dtype).name, q.shape[2], k.shape[-2], q.shape[3]):
    impl, why = "cudnn", "GPU backend with cuDNN attention"
  elif k.shape[-3] > AUTO_CHUNKED_MIN_KEYS:
    impl, why = "chunked", f"{jax.default_backend()} backend, {k.shape[-3]} keys > {AUTO_CHUNKED_MIN_KEYS}"
  else:
    impl, why = "xla", f"{jax.default_backend()} backend, {k.shape[-3]} keys <= {AUTO_CHUNKED_MIN_KEYS}"
  _log_choice(impl, why)
  return impl
