"""Attention alone: every implementation of `attend` at the call sites of a prefill and a decode,
beside PyTorch's fused `scaled_dot_product_attention`, and what "auto" picks. This is where the
crossovers of `ee_mllm_jax.models.kernels.choose_impl` come from.

  python benchmarks/attention.py                 # LLaVA-7B heads (8 x 128 at width 1024), CPU, ~2 min
  python benchmarks/attention.py --heads 32 --dtype bfloat16      # on a GPU

Call sites (B = 1): "self" = causal self-attention over S = V + 64 tokens in mixed order (the
self-mode prefill); "tower" = S tokens that all see each other (the vision tower; a 672 px CLIP
image is 2305 tokens); "text" = 64 text queries over S keys (composite prefill, a prompt after a
cached prefix); "decode" = one query against layer 0 of a stacked (2, B, S, K, H) cache.

"gemms" (self site only) is a bound, not an implementation: the two einsums of "blocked" (each
query block against its key prefix, heads leading) and nothing else -- no sort, mask or softmax.
When it is slower than torch's fused kernel, no composition of XLA ops on this backend reaches
the fused kernel's speed.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from common import median_ms
from ee_mllm_jax.config import ATTENTION_IMPLS
from ee_mllm_jax.models import kernels


def parse_args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tokens", type=int, nargs="+", default=[256, 640, 1088, 2368, 4672], help="S per call")
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--block", type=int, default=512)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--skip-torch", action="store_true")
  return p.parse_args()


def torch_sdpa_ms(site, s, args):
  import torch  # pylint: disable=g-import-not-at-top
  nq = {"self": s, "tower": s, "text": 64, "decode": 1}[site]
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = getattr(torch, args.dtype)
  q, k, v = (torch.randn(1, args.heads, n, args.head_dim, device=dev, dtype=dtype) for n in (nq, s, s))
  # The causal mask of a query block that ends the sequence (is_causal aligns it top-left).
  mask = None if site in ("self", "tower") else torch.ones(nq, s, dtype=torch.bool, device=dev).tril(s - nq)
  fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=site == "self")
  with torch.inference_mode():
    fn()
    times = []
    for _ in range(args.repeats):
      if dev == "cuda":
        torch.cuda.synchronize()
      t0 = time.perf_counter()
      fn()
      if dev == "cuda":
        torch.cuda.synchronize()
      times.append(time.perf_counter() - t0)
  return float(np.median(times)) * 1e3


def blocked_gemms(q, k, v, block):
  """The GEMMs of "blocked" in self-attention alone (q/k/v already heads-leading (B,N,S,H))."""
  s, outs = q.shape[2], []
  for start in range(0, s, block):
    end = min(s, start + block)
    scores = jnp.einsum("bnqh,bnsh->bnqs", q[:, :, start:end], k[:, :, :end])
    outs.append(jnp.einsum("bnqs,bnsh->bnqh", scores, v[:, :, :end]))
  return jnp.concatenate(outs, axis=2)


def site_inputs(site, s, args, rng):
  """(q, k, v, q_pos, k_pos, k_valid, layer, same_tokens) of one call site."""
  n, h, dtype = args.heads, args.head_dim, jnp.dtype(args.dtype)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
  valid = jnp.ones((1, s), bool)
  if site == "self":  # [visual; text] in memory, a 30-token system prompt before the image in position
    v = s - 64
    pos = jnp.asarray(np.concatenate([np.arange(30, 30 + v), np.arange(30), np.arange(30 + v, s)])[None], jnp.int32)
    return normal(1, s, n, h), normal(1, s, n, h), normal(1, s, n, h), pos, pos, valid, None, True
  if site == "tower":
    return normal(1, s, n, h), normal(1, s, n, h), normal(1, s, n, h), None, None, None, None, True
  k_pos = jnp.arange(s, dtype=jnp.int32)[None]
  if site == "text":
    return normal(1, 64, n, h), normal(1, s, n, h), normal(1, s, n, h), k_pos[:, -64:], k_pos, valid, None, False
  cache = normal(2, 1, s, n, h)
  return normal(1, 1, n, h), cache, cache, k_pos[:, -1:], k_pos, valid, jnp.asarray(0), False


def main():
  args = parse_args()
  impls = [i for i in ATTENTION_IMPLS if i != "auto" and (i != "cudnn" or jax.default_backend() == "gpu")]
  print(f"device: {jax.devices()[0].device_kind}; heads {args.heads} x {args.head_dim}, {args.dtype}, "
        f"block {args.block}; median ms of {args.repeats}")
  print(f"{'site':>6} {'S':>6} " + " ".join(f"{i:>9}" for i in impls) + f" {'torch':>9} {'auto':>9} {'gemms':>9}")
  rng = np.random.default_rng(0)
  for site in ("self", "tower", "text", "decode"):
    for s in args.tokens:
      q, k, v, q_pos, k_pos, k_valid, layer, same = site_inputs(site, s, args, rng)
      row = []
      for impl in impls:
        fn = jax.jit(lambda q, k, v, qp, kp, kv, layer, impl=impl: kernels.attend(
            q, k, v, qp, kp, kv, impl=impl, block=args.block, layer=layer, same_tokens=same))
        row.append(median_ms(fn, q, k, v, q_pos, k_pos, k_valid, layer, repeats=args.repeats))
      ref = float("nan") if args.skip_torch else torch_sdpa_ms(site, s, args)
      auto = kernels.choose_impl(q, k, v, same_tokens=same, causal=q_pos is not None,
                                 stacked=layer is not None)
      bound = ""
      if site == "self":
        qh, kh, vh = (jnp.moveaxis(x, 2, 1) for x in (q, k, v))
        bound = f" {median_ms(jax.jit(lambda *x: blocked_gemms(*x, args.block)), qh, kh, vh, repeats=args.repeats):>9.2f}"
      print(f"{site:>6} {s:>6} " + " ".join(f"{ms:>9.2f}" for ms in row) + f" {ref:>9.2f} {auto:>9}{bound}",
            flush=True)


if __name__ == "__main__":
  main()
