"""Attention kernels apart from the modules that call them (as MaxText keeps `attention_op` apart
from `attentions`): one entry point, `attend`, masked by positions, and the implementations it
dispatches to -- `dense.py` ("xla", "cudnn"), `blocked.py` ("blocked": query blocks, causal
block skipping) and `chunked.py` ("chunked", online softmax with its own backward).
Letters: docs/design.md, "Letters".
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from ee_mllm_jax.config import ATTENTION_IMPLS, AttentionImpl
from ee_mllm_jax.models.kernels.blocked import attend_blocked
from ee_mllm_jax.models.kernels.chunked import attend_chunked
from ee_mllm_jax.models.kernels.dense import attend_cudnn, attend_xla, attention_mask, cudnn_works

__all__ = ["AUTO_BLOCKED_MIN_QUERIES", "AUTO_LONG_KEYS", "attend", "attention_mask", "choose_impl"]

logger = logging.getLogger(__name__)

# Crossovers of "auto" without cuDNN (see `choose_impl`), measured by benchmarks/attention.py.
AUTO_BLOCKED_MIN_QUERIES = 256
AUTO_LONG_KEYS = 2048


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array | None = None,
           k_pos: jax.Array | None = None, k_valid: jax.Array | None = None, *, impl: AttentionImpl = "auto",
           block: int = 512, layer: jax.Array | None = None, same_tokens: bool = False) -> jax.Array:
  """Softmax attention with GQA, masked by position: query i sees key j when
  `k_valid[j] and k_pos[j] <= q_pos[i]` (see `attention_mask` for the None cases).

  q (B,Q,N,H), k/v (B,S,K,H), positions/validity (B,Q) / (B,S) -> (B,Q,N,H). The mask is passed
  as positions, not as a dense (Q, S) array, so that an implementation may build it one block at
  a time. A fully masked row (a padding query) yields a finite value (zeros, or the mean of v
  for "xla"/"cudnn"); callers ignore such rows.

  impl: "xla" (dense einsum, the reference), "blocked" (dense, `block` queries at a time, with
  causal block skipping), "chunked" (online softmax over key blocks of `block`, any backend),
  "cudnn" (fused GPU kernel), "auto" (the default: per call, the best for these shapes here;
  see `choose_impl`).
  layer: k and v are a stacked cache (L,B,S,K,H) and this layer's are used; "chunked" reads
  its blocks in place, so a decode step copies nothing proportional to the cache.
  same_tokens: the queries are the keys (self-attention over one sequence; `k_valid` is then
  the queries' validity too, and valid positions are distinct, as the batch contract has them).
  "blocked" then reads, for each query block, only the keys up to it in position order.
  """
  if impl == "auto":
    impl = choose_impl(q, k, v, same_tokens=same_tokens, causal=q_pos is not None, stacked=layer is not None)
  if impl == "chunked":
    return attend_chunked(q, k, v, q_pos, k_pos, k_valid, block, layer)
  if layer is not None:  # the dense implementations take this layer's keys/values as arrays
    k, v = (jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False) for x in (k, v))
  if impl == "blocked":
    return attend_blocked(q, k, v, q_pos, k_pos, k_valid, block, same_tokens)
  if impl == "xla":
    return attend_xla(q, k, v, attention_mask(q_pos, k_pos, k_valid))
  if impl == "cudnn":
    return attend_cudnn(q, k, v, attention_mask(q_pos, k_pos, k_valid))
  raise ValueError(f"unknown attention implementation {impl!r}; known: {ATTENTION_IMPLS}")


@functools.cache
def _log_choice(impl: str, why: str):
  logger.info("attention_impl='auto' chose %r (%s)", impl, why)


def choose_impl(q, k, v, *, same_tokens: bool = False, causal: bool = True, stacked: bool = False) -> str:
  """What "auto" runs for these shapes, from crossovers measured on CPU (`benchmarks/attention.py`):

  * cuDNN where it compiles (a GPU, half precision);
  * "blocked" for self-attention over more than AUTO_BLOCKED_MIN_QUERIES tokens: cache-sized
    score blocks with the heads leading run the GEMMs near full speed, and causal block skipping
    halves the work (the LLM's prefill and training forward in self mode; the vision tower, not
    causal, at 336 px and above);
  * over more than AUTO_LONG_KEYS keys: "chunked" when reading a stacked cache (decode steps:
    its blocks are read in place, where the dense kernels copy the layer's keys), else "blocked"
    (composite's text queries over [visual; text]: one heads-leading block per `block` queries);
  * "xla" otherwise (short sequences, where the choice hardly matters).
  """
  del v
  nq, s = q.shape[1], k.shape[-3]
  if cudnn_works(jnp.dtype(q.dtype).name, q.shape[2], k.shape[-2], q.shape[3]):
    impl, why = "cudnn", "GPU backend with cuDNN attention"
  elif same_tokens and not stacked and nq > AUTO_BLOCKED_MIN_QUERIES:
    impl, why = "blocked", f"{'causal ' if causal else ''}self-attention over {nq} > {AUTO_BLOCKED_MIN_QUERIES} tokens"
  elif s > AUTO_LONG_KEYS:
    impl = "chunked" if stacked else "blocked"
    why = f"{nq} queries over {s} keys > {AUTO_LONG_KEYS}{' of a stacked cache' if stacked else ''}"
  else:
    impl, why = "xla", f"{nq} queries over {s} keys"
  _log_choice(impl, f"{jax.default_backend()} backend: {why}")
  return impl
