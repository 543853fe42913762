"""Prefill speed in PyTorch: composite attention (`ee_mllm_jax.torch`, EE-MLLM) vs stock LLaVA, beside JAX.

The same shape as `prefill.py` (width-scaled LLaVA-1.5-7B LLM: head dim 128, MHA, FFN 11008/4096 x
width), random weights. Prefill = the decoder over V visual tokens (already projected) and a
T-token prompt, filling the KV cache, plus the LM head on the text rows (what JAX's prefill returns).
PyTorch stock = transformers' LlamaModel forward (sdpa); PyTorch composite = `composite_decoder` on the
same modules (EE-MLLM: no visual FFN). JAX runs its self / composite modes on the same shape in the
same process. On this CPU XLA's float32 GEMM is ~2.2x faster than torch's (ENVIRONMENT.md): compare
the ratios, not absolute times across frameworks.

  python benchmarks/torch_prefill.py                      # ~3 minutes on 2 CPU cores
  python benchmarks/torch_prefill.py --visual 576 --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import transformers

import ee_mllm_jax as eem
from common import median_ms, scaled_llava
from ee_mllm_jax import flops
from ee_mllm_jax.mode import Composite
from ee_mllm_jax.torch import composite_decoder
from prefill import llm_prefill


def parse_args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--width", type=int, default=1024, help="scaled LLM width (LLaVA-7B: 4096)")
  p.add_argument("--layers", type=int, default=4, help="scaled LLM depth (LLaVA-7B: 32)")
  p.add_argument("--visual", type=int, nargs="+", default=[576, 2880], help="visual token counts V")
  p.add_argument("--text", type=int, default=64, help="prompt tokens T")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--threads", type=int, default=None,
                 help="torch intra-op threads (default: torch's); 1 is steadier on a loaded machine, where a "
                      "parallel op waits for its slowest thread")
  p.add_argument("--skip-jax", action="store_true", help="time PyTorch only")
  return p.parse_args()


def torch_llm(cfg: eem.ModelConfig) -> transformers.LlamaModel:
  c = cfg.llm
  text = transformers.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=c.mlp_dim,
                                  num_hidden_layers=c.depth, num_attention_heads=c.num_heads,
                                  num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
                                  rope_theta=c.rope_theta, attn_implementation="sdpa")
  torch.manual_seed(0)
  return transformers.LlamaForCausalLM(text).eval()


def torch_ms(fn, repeats: int) -> float:
  """Median wall milliseconds of `repeats` calls after one warmup call."""
  with torch.inference_mode():
    fn()
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t0)
  return float(np.median(times)) * 1e3


def main():
  args = parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  cfg = scaled_llava(args.width, args.layers).replace(attention="self", visual_ffn=True)
  modes = {"self": cfg, "composite": cfg.replace(attention="composite", visual_ffn=False)}
  c, t = cfg.llm, args.text
  print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
        f"LLM width {c.width}, depth {c.depth}, heads {c.num_heads}/{c.num_kv_heads}, mlp {c.mlp_dim}; T {t}; float32")
  causal_lm = torch_llm(cfg)
  lm, head = causal_lm.model, causal_lm.lm_head
  jax_params = None
  if not args.skip_jax:
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    from ee_mllm_jax import batch as batch_lib  # pylint: disable=g-import-not-at-top
    init = jax.jit(lambda key: eem.EEMLLM(cfg).init(key, **batch_lib.example(cfg)))
    jax_params = nn.meta.unbox(init(jax.random.key(0))["params"])

  rng = np.random.default_rng(0)
  rows = {}
  print(f"{'framework':>9} {'mode':>9} {'V':>6} {'GFLOPs':>8} {'ms':>9}")
  for v in args.visual:
    x = torch.tensor(rng.standard_normal((1, v + t, c.width)), dtype=torch.float32)
    is_visual = torch.zeros((1, v + t), dtype=torch.bool)
    is_visual[:, :v] = True  # images first, then the prompt (as prefill.py)

    def stock():
      hidden = lm(inputs_embeds=x, use_cache=True).last_hidden_state
      return head(hidden[:, v:])

    def composite():
      hidden = composite_decoder(lm, x, is_visual, use_cache=True, mode=Composite()).last_hidden_state
      return head(hidden[:, v:])

    timed = {("torch", "self"): lambda: torch_ms(stock, args.repeats),
             ("torch", "composite"): lambda: torch_ms(composite, args.repeats)}
    if jax_params is not None:
      ids = rng.integers(0, c.vocab_size, (1, t)).astype(np.int32)
      x_v = jax.numpy.asarray(x[:, :v].numpy())
      pos_v, pos_t = np.arange(v, dtype=np.int32)[None], np.arange(v, v + t, dtype=np.int32)[None]
      ones_v, ones_t = np.ones((1, v), bool), np.ones((1, t), bool)
      for mode, mcfg in modes.items():
        fn = llm_prefill(eem.EEMLLM(mcfg))
        timed["jax", mode] = (lambda fn=fn: median_ms(fn, jax_params, x_v, ids, pos_v, pos_t, ones_v, ones_t,
                                                      repeats=args.repeats))
    for (framework, mode), run in timed.items():
      ms = run()
      gflop = flops.llm_flops(modes[mode], visual_len=v, text_len=t, batch=1)["total"] / 1e9
      rows[framework, mode, v] = ms
      print(f"{framework:>9} {mode:>9} {v:>6} {gflop:>8.1f} {ms:>9.1f}")

  print("\nself / composite prefill time:")
  print(f"{'V':>6} {'torch':>7} {'jax':>7} {'FLOPs':>7}")
  for v in args.visual:
    ratio = lambda f: rows[f, "self", v] / rows[f, "composite", v] if (f, "self", v) in rows else float("nan")
    fl = [flops.llm_flops(modes[m], visual_len=v, text_len=t, batch=1)["total"] for m in modes]
    print(f"{v:>6} {ratio('torch'):>7.2f} {ratio('jax'):>7.2f} {fl[0] / fl[1]:>7.2f}")


if __name__ == "__main__":
  main()
