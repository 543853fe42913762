"""Prefill speed of self (LLaVA) vs composite (EE-MLLM) vs cross (Flamingo), in one process.

The same random parameters run in the self and composite modes; cross mode runs them with its
own gated cross-attention blocks (every `--cross-every` layers) and perceiver resampler
(`--resampler-latents`, as configs/flamingo_7b.py; 0: off) added. Prefill = the decoder forward
over V visual tokens (already projected; cross mode: resampled, then the blocks' keys/values)
and a T-token prompt, returning the text logits and the KV cache; the vision tower + projector
cost the same in every mode and are timed once apart.

  python benchmarks/prefill.py                       # width-scaled LLaVA-7B shape, CPU, ~2 min
  python benchmarks/prefill.py --preset llava-1.5-7b --dtype bfloat16   # on a GPU
  python benchmarks/prefill.py --attention-impl xla chunked --visual 576 2880 4608 --skip-vision

Prints one row per (attention implementation, mode, V): analytic GFLOPs, median ms, achieved
GFLOP/s; then, per implementation and V, the self/composite and self/cross time ratios beside
the analytic FLOP ratios. The tower runs the first implementation given.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import ee_mllm_jax as eem
from common import median_ms, scaled_llava
from ee_mllm_jax import batch as batch_lib
from ee_mllm_jax import flops
from ee_mllm_jax.params import overlay


def parse_args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default=None, help="full-size preset (e.g. llava-1.5-7b); default: width-scaled")
  p.add_argument("--width", type=int, default=1024, help="scaled LLM width (LLaVA-7B: 4096)")
  p.add_argument("--layers", type=int, default=4, help="scaled LLM depth (LLaVA-7B: 32)")
  p.add_argument("--visual", type=int, nargs="+", default=[576, 2880], help="visual token counts V")
  p.add_argument("--text", type=int, default=64, help="prompt tokens T")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--attention-impl", nargs="+", default=["xla"], choices=eem.config.ATTENTION_IMPLS,
                 help="attention implementations to compare (config attention_impl)")
  p.add_argument("--attention-block", type=int, default=512, help="keys per block of 'chunked'")
  p.add_argument("--skip-vision", action="store_true", help="do not time the vision tower + projector")
  p.add_argument("--cross-every", type=int, default=4, help="cross mode: a block before every k-th layer")
  p.add_argument("--resampler-latents", type=int, default=64, help="cross mode: latents per image (0: off)")
  p.add_argument("--resampler-depth", type=int, default=6)
  return p.parse_args()


def model_config(args) -> eem.ModelConfig:
  cfg = eem.ModelConfig.preset(args.preset) if args.preset else scaled_llava(args.width, args.layers)
  cfg = cfg.replace(attention="self", visual_ffn=True, dtype=args.dtype, param_dtype=args.dtype)
  return cfg.with_attention_impl(args.attention_impl[0], args.attention_block)


def llm_prefill(model):
  def decoder(m, x_v, ids, pos_v, pos_t, valid_v, valid_t):
    if m.cfg.attention == "cross":  # media per image (resampled) and each image's position
      n_img = x_v.shape[1] // m.cfg.tokens_per_image
      x_v, pos_v, valid_v = m.media(x_v, valid_v[:, ::m.cfg.tokens_per_image][:, :n_img], pos_v)
    return m.llm(x_v, ids, pos_v, pos_t, valid_v, valid_t)

  def run(params, *args):
    return model.apply({"params": params}, *args, method=decoder)
  return jax.jit(run)


def main():
  args = parse_args()
  cfg = model_config(args)
  cross = cfg.replace(attention="cross", visual_ffn=False, cross_every=args.cross_every,
                      resampler_latents=args.resampler_latents, resampler_depth=args.resampler_depth)
  modes = {(impl, mode): mcfg.with_attention_impl(impl)
           for impl in args.attention_impl
           for mode, mcfg in {"self": cfg, "composite": cfg.replace(attention="composite", visual_ffn=False),
                              "cross": cross}.items()}
  c, b, t = cfg.llm, args.batch, args.text
  dtype = jnp.dtype(args.dtype)
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; LLM width {c.width}, depth {c.depth}, "
        f"heads {c.num_heads}/{c.num_kv_heads}, mlp {c.mlp_dim}; tower width {cfg.vision.width}, "
        f"depth {cfg.vision.depth}; dtype {args.dtype}")

  rng = np.random.default_rng(0)
  params = None
  rows = {}
  print(f"{'attention':>9} {'mode':>9} {'V':>6} {'T':>4} {'GFLOPs':>10} {'ms':>10} {'GFLOP/s':>9}")
  for v in args.visual:
    n_img = -(-v // cfg.tokens_per_image)
    pos_v = np.broadcast_to(np.arange(v, dtype=np.int32), (b, v))
    pos_t = np.broadcast_to(np.arange(v, v + t, dtype=np.int32), (b, t))
    ids = rng.integers(0, c.vocab_size, (b, t)).astype(np.int32)
    x_v = jnp.asarray(rng.standard_normal((b, v, c.width)), dtype)
    ones_v, ones_t = np.ones((b, v), bool), np.ones((b, t), bool)
    if params is None:  # one random parameter set for every mode and V (cross: plus its blocks)
      init = lambda cfg: jax.jit(lambda key: eem.EEMLLM(cfg).init(key, **batch_lib.example(cfg)))
      params = nn.meta.unbox(init(cfg)(jax.random.key(0))["params"])
      cross_params, _ = overlay(nn.meta.unbox(init(cross)(jax.random.key(1))["params"]), params)
    for (impl, mode), mcfg in modes.items():
      p = cross_params if mode == "cross" else params
      ms = median_ms(llm_prefill(eem.EEMLLM(mcfg)), p, x_v, ids, pos_v, pos_t, ones_v, ones_t, repeats=args.repeats)
      gflop = flops.llm_flops(mcfg, visual_len=v, text_len=t, batch=b)["total"] / 1e9
      gflop += flops.resampler_flops(mcfg, images=b * n_img) / 1e9
      rows[impl, mode, v] = (gflop, ms)
      print(f"{impl:>9} {mode:>9} {v:>6} {t:>4} {gflop:>10.1f} {ms:>10.1f} {gflop / ms * 1e3:>9.1f}")
    if not args.skip_vision:
      tower = jax.jit(lambda p, px: eem.EEMLLM(cfg).apply({"params": p}, px, method="embed_image"))
      px = jnp.asarray(rng.standard_normal((b, n_img) + (cfg.vision.image_size,) * 2 + (3,)), dtype)
      ms = median_ms(tower, params, px, repeats=max(1, args.repeats // 2))
      gflop = (flops.vision_flops(cfg.vision, images=b * n_img) + flops.projector_flops(cfg, images=b * n_img)) / 1e9
      print(f"{args.attention_impl[0]:>9} {'tower':>9} {v:>6} {'':>4} {gflop:>10.1f} {ms:>10.1f} {gflop / ms * 1e3:>9.1f}   "
            f"({n_img} image(s) through vision tower + projector, same in both modes)")

  for other in ("composite", "cross"):
    print(f"\nself / {other}:")
    print(f"{'attention':>9} {'V':>6} {'time ratio':>11} {'FLOP ratio':>11} {'time/FLOP':>10}")
    for impl in args.attention_impl:
      for v in args.visual:
        (fs, ts), (fc, tc) = rows[impl, "self", v], rows[impl, other, v]
        print(f"{impl:>9} {v:>6} {ts / tc:>11.2f} {fs / fc:>11.2f} {(ts / tc) / (fs / fc):>10.2f}")


if __name__ == "__main__":
  main()
