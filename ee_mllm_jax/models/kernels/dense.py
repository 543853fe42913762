"""Dense attention kernels: "xla" (one einsum over the whole (Q, S) score block, the reference)
and "cudnn" (jax.nn.dot_product_attention's fused GPU kernel), with the probe that says whether
cuDNN runs here. Letters: docs/design.md, "Letters".
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

logger = logging.getLogger(__name__)

MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_pos: jax.Array | None, k_pos: jax.Array | None, k_valid: jax.Array | None) -> jax.Array | None:
  """(B, Q) query positions, (B, S) key positions/validity -> (B, Q, S), True = attend.

  `q_pos=None` means no causal mask (every query sees every key), `k_valid=None` all keys
  valid; None when nothing is masked at all (the vision tower)."""
  mask = None if k_valid is None else k_valid[:, None, :]
  if q_pos is not None:
    causal = k_pos[:, None, :] <= q_pos[:, :, None]
    mask = causal if mask is None else mask & causal
  return mask


def attend_xla(q, k, v, mask):
  b, nq, n, h = q.shape
  kv = k.shape[2]
  q = q.reshape(b, nq, kv, n // kv, h)
  scores = jnp.einsum("bqkgh,bskh->bkgqs", q, k, preferred_element_type=jnp.float32) * h ** -0.5
  if mask is not None:
    scores = jnp.where(mask[:, None, None], scores, MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgqs,bskh->bqkgh", probs, v).reshape(b, nq, n, h)


def attend_cudnn(q, k, v, mask):
  # (B, 1, Q, S): one mask shared by all heads. cuDNN turns it into a bias; positions need not be
  # sorted, so `is_causal` cannot express it.
  mask = None if mask is None else mask[:, None]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn").astype(v.dtype)


@functools.cache
def cudnn_works(dtype: str, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
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
