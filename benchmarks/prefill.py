"""Prefill speed of every mode, each with its best implementation, in one process: our self
(LLaVA), composite (EE-MLLM) and cross (Flamingo) modes, and with `--torch` the PyTorch
references on the same shapes: transformers' stock LLaVA decoder (SDPA) and our PyTorch
composite port (`ee_mllm_jax.torch`) on the same modules.

The same random parameters run the self and composite modes; cross mode runs them with its own
gated cross-attention blocks (every `--cross-every` layers) and perceiver resampler
(`--resampler-latents`, as configs/flamingo_7b.py; 0: off) added. PyTorch runs its own random
weights of the same shapes (timing only). Prefill = the decoder forward over V visual tokens
(already projected; cross mode: resampled, then the blocks' keys/values) and a T-token prompt,
returning the text logits and the KV cache; the vision tower + projector cost the same in every
mode and are timed once apart.

  python benchmarks/prefill.py --torch               # width-scaled LLaVA-7B shape, CPU, ~4 min
  python benchmarks/prefill.py --preset llava-1.5-7b --dtype bfloat16 --torch   # on a GPU
  python benchmarks/prefill.py --attention-impl xla blocked chunked --visual 576 2304 4608 --skip-vision

Every prefill of one V is timed in `--repeats` interleaved rounds (each round runs every row
once), so that a slow spell of a shared machine falls on all rows alike. Prints one row per
(framework, attention implementation, mode, V): analytic GFLOPs, best and median ms, achieved
GFLOP/s at the best; "auto" rows name what it chose for the self-attention / text-query call sites.
Then, per V: the self/composite and self/cross time ratios (of the best times) beside the
analytic FLOP ratios (time/FLOP = 1: the speedup is all the FLOPs promise), and our time over
PyTorch's per mode.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import ee_mllm_jax as eem
from common import median_ms, scaled_llava, torch_llm
from ee_mllm_jax import batch as batch_lib
from ee_mllm_jax import flops
from ee_mllm_jax.models import kernels
from ee_mllm_jax.params import overlay


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default=None, help="full-size preset (e.g. llava-1.5-7b); default: width-scaled")
  p.add_argument("--width", type=int, default=1024, help="scaled LLM width (LLaVA-7B: 4096)")
  p.add_argument("--layers", type=int, default=4, help="scaled LLM depth (LLaVA-7B: 32)")
  p.add_argument("--visual", type=int, nargs="+", default=[576, 2304], help="visual token counts V")
  p.add_argument("--text", type=int, default=64, help="prompt tokens T")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--modes", nargs="+", default=["self", "composite", "cross"], choices=["self", "composite", "cross"])
  p.add_argument("--attention-impl", nargs="+", default=["auto"], choices=eem.config.ATTENTION_IMPLS,
                 help="attention implementations to compare (config attention_impl; default: auto)")
  p.add_argument("--attention-block", type=int, default=512, help="rows per block of 'blocked' and 'chunked'")
  p.add_argument("--torch", action="store_true",
                 help="also time transformers' LLaVA decoder (SDPA) and the PyTorch composite port (CUDA if present)")
  p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
  p.add_argument("--skip-vision", action="store_true", help="do not time the vision tower + projector")
  p.add_argument("--cross-every", type=int, default=4, help="cross mode: a block before every k-th layer")
  p.add_argument("--resampler-latents", type=int, default=64, help="cross mode: latents per image (0: off)")
  p.add_argument("--resampler-depth", type=int, default=6)
  return p.parse_args(argv)


def model_config(args) -> eem.ModelConfig:
  cfg = eem.ModelConfig.preset(args.preset) if args.preset else scaled_llava(args.width, args.layers)
  cfg = cfg.replace(attention="self", visual_ffn=True, dtype=args.dtype, param_dtype=args.dtype)
  return cfg.with_attention_impl(args.attention_impl[0], args.attention_block)


def mode_configs(cfg: eem.ModelConfig, args) -> dict[str, eem.ModelConfig]:
  return {"self": cfg, "composite": cfg.replace(attention="composite", visual_ffn=False),
          "cross": cfg.replace(attention="cross", visual_ffn=False, cross_every=args.cross_every,
                               resampler_latents=args.resampler_latents, resampler_depth=args.resampler_depth)}


def llm_prefill(model):
  def decoder(m, x_v, ids, pos_v, pos_t, valid_v, valid_t):
    if m.cfg.attention == "cross":  # media per image (resampled) and each image's position
      n_img = x_v.shape[1] // m.cfg.tokens_per_image
      x_v, pos_v, valid_v = m.media(x_v, valid_v[:, ::m.cfg.tokens_per_image][:, :n_img], pos_v)
    return m.llm(x_v, ids, pos_v, pos_t, valid_v, valid_t)

  def run(params, *args):
    return model.apply({"params": params}, *args, method=decoder)
  return jax.jit(run)


def auto_choice(cfg: eem.ModelConfig, mode: str, b: int, v: int, t: int) -> str:
  """What "auto" runs at the LLM's attention call site of this mode (the one that dominates)."""
  c = cfg.llm
  sds = lambda n, heads: jax.ShapeDtypeStruct((b, n, heads, c.head_dim), jnp.dtype(cfg.dtype))
  if mode == "self":
    return kernels.choose_impl(sds(v + t, c.num_heads), sds(v + t, c.num_kv_heads), None, same_tokens=True)
  return kernels.choose_impl(sds(t, c.num_heads), sds(v + t if mode == "composite" else t, c.num_kv_heads), None)


class TorchPrefill:
  """transformers' LlamaForCausalLM (the LLaVA decoder, SDPA) of the same shape, and the composite
  port on the same modules; prefill = decoder with cache + LM head on the text rows."""

  def __init__(self, cfg: eem.ModelConfig, args):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    from ee_mllm_jax.torch import composite_decoder  # pylint: disable=g-import-not-at-top
    if args.threads:
      torch.set_num_threads(args.threads)
    self.torch, self.composite_decoder = torch, composite_decoder
    self.device = "cuda" if torch.cuda.is_available() else "cpu"
    self.dtype = getattr(torch, args.dtype)
    self.causal_lm = torch_llm(cfg).to(self.device, self.dtype)
    self.label = (f"torch {torch.__version__} ({torch.get_num_threads()} threads, {self.device}), "
                  f"transformers {transformers.__version__}")

  def prefill_fn(self, mode: str, b: int, v: int, t: int):
    """A call that runs one prefill and returns when it is done."""
    torch = self.torch
    lm, head = self.causal_lm.model, self.causal_lm.lm_head
    x = torch.randn(b, v + t, lm.config.hidden_size, device=self.device, dtype=self.dtype)
    is_visual = torch.zeros((b, v + t), dtype=torch.bool, device=self.device)
    is_visual[:, :v] = True  # images first, then the prompt

    @torch.inference_mode()
    def run():
      if mode == "self":
        hidden = lm(inputs_embeds=x, use_cache=True).last_hidden_state
      else:
        hidden = self.composite_decoder(lm, x, is_visual, use_cache=True).last_hidden_state
      head(hidden[:, v:])
      if self.device == "cuda":
        torch.cuda.synchronize()
    return run


def interleaved_ms(fns: dict, repeats: int) -> dict:
  """{key: (best ms, median ms)} of zero-argument calls, after one warm-up (compile) call each,
  timed in `repeats` rounds that run every call once: a slow spell of a shared machine then
  falls on every row alike, and the best of the rounds is what each can do."""
  for fn in fns.values():
    fn()
  times = {key: [] for key in fns}
  for _ in range(repeats):
    for key, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[key].append((time.perf_counter() - t0) * 1e3)
  return {key: (min(ts), float(np.median(ts))) for key, ts in times.items()}


def main(argv=None):
  args = parse_args(argv)
  cfg = model_config(args)
  by_mode = mode_configs(cfg, args)
  modes = {(impl, mode): by_mode[mode].with_attention_impl(impl) for impl in args.attention_impl for mode in args.modes}
  c, b, t = cfg.llm, args.batch, args.text
  dtype = jnp.dtype(args.dtype)
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; LLM width {c.width}, depth {c.depth}, "
        f"heads {c.num_heads}/{c.num_kv_heads}, mlp {c.mlp_dim}; tower width {cfg.vision.width}, "
        f"depth {cfg.vision.depth}; T {t}; batch {b}; dtype {args.dtype}")
  ref = TorchPrefill(cfg, args) if args.torch else None
  if ref:
    print(ref.label)

  rng = np.random.default_rng(0)
  params = cross_params = None
  rows = {}  # (framework, mode, v) -> (gflop, ms); ours keyed by impl as well
  print(f"{'framework':>9} {'attention':>15} {'mode':>9} {'V':>6} {'GFLOPs':>10} {'best ms':>10} {'median ms':>10} "
        f"{'GFLOP/s':>9}")

  def row(framework, impl, mode, v, gflop, ms, median, label=None):
    rows[framework, impl, mode, v] = (gflop, ms)
    print(f"{framework:>9} {label or impl:>15} {mode:>9} {v:>6} {gflop:>10.1f} {ms:>10.1f} {median:>10.1f} "
          f"{gflop / ms * 1e3:>9.1f}", flush=True)

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
      if "cross" in args.modes:
        cross_params, _ = overlay(nn.meta.unbox(init(by_mode["cross"])(jax.random.key(1))["params"]), params)
    gflops = {mode: (flops.llm_flops(m, visual_len=v, text_len=t, batch=b)["total"]
                     + flops.resampler_flops(m, images=b * n_img)) / 1e9 for mode, m in by_mode.items()}
    fns = {}
    for (impl, mode), mcfg in modes.items():
      fn, p = llm_prefill(eem.EEMLLM(mcfg)), cross_params if mode == "cross" else params
      fns["jax", impl, mode] = lambda fn=fn, p=p: jax.block_until_ready(fn(p, x_v, ids, pos_v, pos_t, ones_v, ones_t))
      rows["ran", impl, mode, v] = f"auto:{auto_choice(mcfg, mode, b, v, t)}" if impl == "auto" else impl
    if ref:
      for mode in [m for m in ("self", "composite") if m in args.modes]:
        fns["torch", "sdpa" if mode == "self" else "sdpa (port)", mode] = ref.prefill_fn(mode, b, v, t)
    for (framework, impl, mode), (best, median) in interleaved_ms(fns, args.repeats).items():
      row(framework, impl, mode, v, gflops[mode], best, median, rows.get(("ran", impl, mode, v)))
    if not args.skip_vision:
      tower = jax.jit(lambda p, px: eem.EEMLLM(cfg).apply({"params": p}, px, method="embed_image"))
      px = jnp.asarray(rng.standard_normal((b, n_img) + (cfg.vision.image_size,) * 2 + (3,)), dtype)
      ms = median_ms(tower, params, px, repeats=max(1, args.repeats // 2))
      gflop = (flops.vision_flops(cfg.vision, images=b * n_img) + flops.projector_flops(cfg, images=b * n_img)) / 1e9
      print(f"{'jax':>9} {args.attention_impl[0]:>15} {'tower':>9} {v:>6} {gflop:>10.1f} {'':>10} {ms:>10.1f} "
            f"{gflop / ms * 1e3:>9.1f}   ({n_img} image(s) through vision tower + projector, same in every mode)")
  summarize(rows, args)


def summarize(rows, args):
  """The ratios: self over each other mode (time beside FLOPs), and ours over PyTorch's."""
  frameworks = [("jax", impl) for impl in args.attention_impl] + ([("torch", None)] if args.torch else [])
  key = lambda fw, impl, mode, v: (fw, impl if fw == "jax" else ("sdpa" if mode == "self" else "sdpa (port)"), mode, v)
  for other in [m for m in ("composite", "cross") if m in args.modes and "self" in args.modes]:
    print(f"\nself / {other}:")
    print(f"{'framework':>9} {'attention':>9} {'V':>6} {'time ratio':>11} {'FLOP ratio':>11} {'time/FLOP':>10}")
    for fw, impl in frameworks:
      for v in args.visual:
        if key(fw, impl, other, v) not in rows:
          continue
        (fs, ts), (fc, tc) = rows[key(fw, impl, "self", v)], rows[key(fw, impl, other, v)]
        print(f"{fw:>9} {impl or 'sdpa':>9} {v:>6} {ts / tc:>11.2f} {fs / fc:>11.2f} {(ts / tc) / (fs / fc):>10.2f}")
  if args.torch:
    print("\nours / PyTorch (< 1: ours is faster):")
    print(f"{'mode':>9} {'attention':>9} {'V':>6} {'jax ms':>9} {'torch ms':>9} {'ratio':>7}   ran")
    for mode in [m for m in ("self", "composite") if m in args.modes]:
      for impl in args.attention_impl:
        for v in args.visual:
          ours, theirs = rows[key("jax", impl, mode, v)][1], rows[key("torch", None, mode, v)][1]
          print(f"{mode:>9} {impl:>9} {v:>6} {ours:>9.1f} {theirs:>9.1f} {ours / theirs:>7.2f}   "
                f"{rows['ran', impl, mode, v]}")


if __name__ == "__main__":
  main()
